//! Helpers for the remote store's tests: a real S3 API (`moto_server` from
//! PyPI's `moto[server]`, installed into the project venv by
//! scripts/setup.sh), started on a free loopback port by the test that needs
//! it and stopped (killed, with its process group) when it is dropped.
#![allow(dead_code)]
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server.
pub struct Moto {
    child: Child,
    pub port: u16,
    _log: tempfile::NamedTempFile,
}

fn moto_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server")
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local addr").port()
}

impl Moto {
    /// Starts moto_server on a free loopback port and waits until it answers.
    pub fn start() -> Moto {
        let bin = moto_bin();
        assert!(
            bin.is_file(),
            "{} not found: the S3 tests need moto[server] in the project venv (`source scripts/setup.sh` installs it)",
            bin.display()
        );
        for _attempt in 0..3 {
            let port = free_port();
            let log = tempfile::NamedTempFile::new().expect("log file");
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.reopen().expect("log")))
                .stderr(Stdio::from(log.reopen().expect("log")));
            // Its own process group (killed whole on drop), and it dies with
            // the test process even if the test is killed.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::setpgid(0, 0);
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                    Ok(())
                });
            }
            let child = cmd.spawn().expect("start moto_server");
            let mut m = Moto { child, port, _log: log };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = m.child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if m.request("GET", "/", b"").is_some_and(|(code, _)| code == 200) {
                    return m;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("moto_server did not start on a loopback port (see its log)");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP/1.1 request (moto does not check signatures); the
    /// status code and body.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(body).ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).ok()?;
        let text = String::from_utf8_lossy(&resp);
        let code: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
        let at = resp.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(resp.len());
        Some((code, resp[at..].to_vec()))
    }

    /// Creates a bucket.
    pub fn bucket(&self, name: &str) {
        let (code, body) = self.request("PUT", &format!("/{name}"), b"").expect("create bucket");
        assert_eq!(code, 200, "create bucket {name}: {}", String::from_utf8_lossy(&body));
    }

    /// A signed S3 client of `bucket` (object_store, as the runner uses),
    /// for what a test does behind the runner's back.
    pub fn client(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .expect("S3 client")
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    /// Every key under `prefix` in `bucket`.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let c = self.client(bucket);
        let p = object_store::path::Path::from(prefix);
        let v: Vec<object_store::ObjectMeta> = Self::rt().block_on(c.list(Some(&p)).try_collect()).expect("list");
        let mut keys: Vec<String> = v.into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        keys
    }

    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let c = self.client(bucket);
        Self::rt().block_on(async { c.get(&object_store::path::Path::from(key)).await.ok()?.bytes().await.ok().map(|b| b.to_vec()) })
    }

    /// Overwrites an object (a test corrupting the remote).
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        use object_store::ObjectStoreExt;
        let c = self.client(bucket);
        Self::rt().block_on(c.put(&object_store::path::Path::from(key), body.to_vec().into())).expect("put");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // SAFETY: signals the process group of the server we started.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}
