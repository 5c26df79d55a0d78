//! The remote store on the real services: S3 through `moto_server` (started
//! and stopped here, on a free loopback port) and a `file://` directory,
//! driven through the real `recflow` binary in temp projects: push/pull
//! round trips, read-through from a second empty store, two runners racing
//! on one key, corrupt and truncated remote objects, kill -9 during a push,
//! leases expiring and taken over, bad settings, secrets, and gc's roots.
mod engine_common;
mod remote_common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use engine_common::*;
use remote_common::*;

const BUCKET: &str = "lab-bucket";

/// A remote for the tests: S3 on a moto server, or a directory.
enum Backend<'a> {
    S3(&'a Moto),
    Dir(&'a Path),
}

impl Backend<'_> {
    /// `[remote]` of recflow.toml for it (`extra`: more keys).
    fn toml(&self, extra: &str) -> String {
        match self {
            Backend::S3(m) => format!("[remote]\nurl = \"s3://{BUCKET}/lab\"\nendpoint = \"{}\"\n{extra}", m.endpoint()),
            Backend::Dir(d) => format!("[remote]\nurl = \"file://{}\"\n{extra}", d.display()),
        }
    }

    /// Run records in the remote.
    fn records(&self) -> Vec<String> {
        match self {
            Backend::S3(m) => m.keys(BUCKET, "lab/records"),
            Backend::Dir(d) => files_under(&d.join("records")),
        }
    }

    /// Every object (name → bytes) in the remote.
    fn objects(&self) -> Vec<(String, Vec<u8>)> {
        match self {
            Backend::S3(m) => m.keys(BUCKET, "lab/objects").into_iter().map(|k| (k.clone(), m.get(BUCKET, &k).unwrap_or_default())).collect(),
            Backend::Dir(d) => files_under(&d.join("objects")).into_iter().map(|k| (k.clone(), std::fs::read(&k).unwrap_or_default())).collect(),
        }
    }

    /// Replaces the object `hex` with `bytes` behind the runner's back.
    fn tamper(&self, hex: &str, bytes: &[u8]) {
        match self {
            Backend::S3(m) => m.put(BUCKET, &format!("lab/objects/{}/{hex}", &hex[..2]), bytes),
            Backend::Dir(d) => {
                let p = d.join(format!("objects/{}/{hex}", &hex[..2]));
                assert!(p.exists(), "object {hex} is in the remote");
                std::fs::write(p, bytes).unwrap();
            }
        }
    }
}

fn files_under(d: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![d.to_path_buf()];
    while let Some(x) = stack.pop() {
        for e in std::fs::read_dir(&x).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                v.push(e.path().to_string_lossy().into_owned());
            }
        }
    }
    v.sort();
    v
}

/// `$s3` and `$file`: one check (a fn taking the backend) on S3 and on a directory.
macro_rules! on_both {
    ($s3:ident, $file:ident, $check:expr) => {
        #[test]
        fn $s3() {
            let m = moto_with_bucket();
            $check(&Backend::S3(&m));
        }
        #[test]
        fn $file() {
            let d = tempfile::tempdir().unwrap();
            $check(&Backend::Dir(d.path()));
        }
    };
}

fn moto_with_bucket() -> Moto {
    let m = Moto::start();
    m.bucket(BUCKET);
    m
}

/// `recflow ARGS` in a project, with S3 test credentials and no remote
/// from the environment.
fn rf(p: &Proj, args: &[&str]) -> Command {
    let mut c = p.cmd(args);
    c.env_remove("RECFLOW_REMOTE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_PROFILE")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1");
    c
}

fn out(p: &Proj, args: &[&str]) -> Output {
    rf(p, args).output().expect("start recflow")
}

fn ok(p: &Proj, args: &[&str]) -> (String, String) {
    let o = out(p, args);
    let (so, se) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "`recflow {}` must succeed; stderr:\n{se}\nstdout:\n{so}", args.join(" "));
    (so, se)
}

/// A project whose recflow.toml points at `b` (extra keys in `[remote]`).
fn project(b: &Backend, extra: &str) -> Proj {
    let p = Proj::new();
    p.write("recflow.toml", &b.toml(extra));
    p
}

/// Shell stages with a 23 MB deterministic file (a multipart upload), a
/// directory output (a tree: manifest + files) and a stage reading both.
/// Runs are counted in `cnt/` (outside the projects: the same key everywhere).
fn pipeline(cnt: &Path, lines: u32) -> String {
    let c = cnt.display();
    format!(
        r#"
stages:
  gen:
    cmd: "echo x >> {c}/gen; seq 1 {lines} > big.txt; mkdir -p tree/sub; echo a > tree/a.txt; echo b > tree/sub/b.txt"
    outs: [big.txt, tree]
  sum:
    cmd: "echo x >> {c}/sum; cksum big.txt tree/a.txt tree/sub/b.txt > sum.txt"
    deps: [big.txt, tree]
    outs: [sum.txt]
"#
    )
}

const BIG: u32 = 3_000_000;

fn runs(cnt: &Path, stage: &str) -> usize {
    std::fs::read_to_string(cnt.join(stage)).unwrap_or_default().lines().count()
}

fn copy_pipeline(from: &Proj, to: &Proj, with_lock: bool) {
    to.write("p.yaml", &from.read("p.yaml"));
    if with_lock {
        to.write("p.lock", &from.read("p.lock"));
    }
}

fn same_outputs(a: &Proj, b: &Proj) {
    for f in ["big.txt", "tree/a.txt", "tree/sub/b.txt", "sum.txt"] {
        let (x, y) = (std::fs::read(a.path(f)).unwrap_or_default(), std::fs::read(b.path(f)).unwrap_or_default());
        assert!(!x.is_empty() && x == y, "{f} is byte-identical in both projects");
    }
}

// ------------------------------------------------------------------ round trip

/// `recflow push` then `recflow pull` into an empty store: byte-identical
/// outputs, nothing reruns, and CI's `verify` of one stage works on what was
/// pulled; progress lines (bytes, rate) appear without a terminal.
fn push_pull_round_trip(b: &Backend) {
    let cnt = tempfile::tempdir().unwrap();
    let a = project(b, "");
    a.write("p.yaml", &pipeline(cnt.path(), BIG));
    let o = rf(&a, &["run", "p.yaml", "-q"]).env("RECFLOW_REMOTE", "off").output().unwrap();
    assert!(o.status.success(), "a run with the remote turned off works");
    assert!(b.records().is_empty(), "RECFLOW_REMOTE=off: nothing was written through");
    let (so, se) = ok(&a, &["push", "p.yaml", "--progress-interval", "0.01"]);
    assert!(so.contains("pushed 2 keys"), "both keys pushed: {so}");
    assert!(se.lines().any(|l| l.starts_with("push: ") && l.contains("/s, ")), "plain progress lines with bytes and rate: {se}");
    assert_eq!(b.records().len(), 2, "one record per key in the remote");
    let (so, _) = ok(&a, &["push", "p.yaml"]);
    assert!(so.contains("pushed 0 keys") && so.contains("2 already in the remote"), "a second push sends nothing: {so}");

    let c = project(b, "");
    copy_pipeline(&a, &c, true);
    let (so, se) = ok(&c, &["pull", "p.yaml", "--jobs", "3", "--progress-interval", "0.01"]);
    assert!(so.contains("pulled 2 keys"), "{so}");
    assert!(se.lines().any(|l| l.starts_with("pull: ") && l.contains("MB")), "pull reports bytes: {se}");
    same_outputs(&a, &c);
    ok(&c, &["status", "p.yaml", "--check"]);
    let (so, _) = ok(&c, &["run", "p.yaml"]);
    assert!(so.contains("cached") && !so.contains("ran"), "after a pull nothing runs: {so}");
    assert_eq!((runs(cnt.path(), "gen"), runs(cnt.path(), "sum")), (1, 1), "each stage ran once, on the first machine");
    // What CI does with a GPU node's results: pull, then verify one stage.
    let (so, _) = ok(&c, &["verify", "p.yaml", "--stage", "sum"]);
    assert!(so.contains("all outputs match"), "{so}");
}

on_both!(push_pull_round_trip_s3, push_pull_round_trip_file, push_pull_round_trip);

// --------------------------------------------------------- read-through reuse

/// A runner on a second, empty local store reuses what the first pushed
/// (write-through), shell stages and a built-in stage alike, without
/// running anything.
#[test]
fn second_store_reuses_remote_keys_without_running() {
    let m = moto_with_bucket();
    let b = Backend::S3(&m);
    let cnt = tempfile::tempdir().unwrap();
    let worker = Path::new(BIN).parent().unwrap().join("examples/torch_free_worker");
    assert!(worker.is_file(), "the torch_free_worker example must be built first (`cargo build --example torch_free_worker`)");
    let yaml = format!(
        "worker: {}\n{}  ingest:\n    uses: ingest\n    with: {{format: synthetic}}\n",
        worker.display(),
        pipeline(cnt.path(), 1000)
    );
    let a = project(&b, "");
    a.write("p.yaml", &yaml);
    let (_, se) = ok(&a, &["run", "p.yaml"]);
    assert_eq!(se.matches("pushed key").count(), 3, "each stage is written through after its commit: {se}");

    let c = project(&b, "");
    copy_pipeline(&a, &c, false);
    let (so, se) = ok(&c, &["run", "p.yaml"]);
    assert_eq!(se.matches("pulled key").count(), 3, "every key is read through from the remote: {se}");
    assert!(!so.contains("ran"), "nothing ran on the second store: {so}");
    assert_eq!((runs(cnt.path(), "gen"), runs(cnt.path(), "sum")), (1, 1), "the shell stages ran once");
    for f in ["interactions.parquet", "items.parquet"] {
        let x = std::fs::read(a.path(&format!("runs/p/ingest/{f}"))).unwrap();
        let y = std::fs::read(c.path(&format!("runs/p/ingest/{f}"))).unwrap();
        assert!(x == y, "built-in output {f} is byte-identical");
    }
    assert_eq!(a.read("p.lock"), c.read("p.lock"), "both runs write the same lock");
    // A no-op rerun stays local.
    let (so, se) = ok(&c, &["run", "p.yaml"]);
    assert!(!se.contains("pulled") && !so.contains("ran"), "no-op: {se}");
}

// ------------------------------------------------------------------ the race

/// Two runners with separate local stores race on one key: it is computed
/// once; the other waits on the lease and pulls the result.
fn race(b: &Backend) {
    let cnt = tempfile::tempdir().unwrap();
    let c = cnt.path().display();
    let yaml = format!("stages:\n  slow:\n    cmd: \"echo x >> {c}/slow; sleep 2; seq 1 1000 > r.txt\"\n    outs: [r.txt]\n");
    let (p1, p2) = (project(b, "lease_s = 5\n"), project(b, "lease_s = 5\n"));
    p1.write("p.yaml", &yaml);
    p2.write("p.yaml", &yaml);
    let c1 = rf(&p1, &["run", "p.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let c2 = rf(&p2, &["run", "p.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (o1, o2) = (c1.wait_with_output().unwrap(), c2.wait_with_output().unwrap());
    let e = format!("{}\n---\n{}", String::from_utf8_lossy(&o1.stderr), String::from_utf8_lossy(&o2.stderr));
    assert!(o1.status.success() && o2.status.success(), "both runners succeed: {e}");
    assert_eq!(runs(cnt.path(), "slow"), 1, "the key was computed once: {e}");
    assert!(e.contains("another runner") && e.contains("pulled key"), "the loser waited on the lease, then pulled: {e}");
    assert_eq!(p1.read("r.txt"), p2.read("r.txt"), "same output on both");
    assert_eq!(b.records().len(), 1, "exactly one record in the remote");
}

on_both!(two_runners_race_on_one_key_s3, two_runners_race_on_one_key_file, race);

// --------------------------------------------------------------- corruption

/// A truncated (directory remote) or corrupted (S3) remote object is
/// detected by hash: a warning and a miss, the stage is rebuilt, and the
/// rebuild repairs the remote for the next reader.
fn corrupt_remote_object_is_rebuilt(b: &Backend, truncate: bool) {
    let cnt = tempfile::tempdir().unwrap();
    let a = project(b, "");
    a.write("p.yaml", &pipeline(cnt.path(), BIG));
    ok(&a, &["run", "p.yaml", "-q"]);
    let big = std::fs::read(a.path("big.txt")).unwrap();
    let hex = sha256(&big);
    let bad = if truncate { big[..big.len() / 2].to_vec() } else { big.iter().map(|c| if *c == b'7' { b'8' } else { *c }).collect() };
    b.tamper(&hex, &bad);

    let c = project(b, "");
    copy_pipeline(&a, &c, false);
    let (_, se) = ok(&c, &["run", "p.yaml"]);
    assert!(se.contains("is not usable") && se.contains(&hex), "the bad object is named in a warning: {se}");
    assert_eq!(runs(cnt.path(), "gen"), 2, "gen was rebuilt, never used corrupt");
    assert_eq!(std::fs::read(c.path("big.txt")).unwrap(), big, "the rebuilt output is right");
    let d = project(b, "");
    copy_pipeline(&a, &d, false);
    let (_, se) = ok(&d, &["run", "p.yaml"]);
    assert!(!se.contains("not usable"), "the rebuild repaired the remote: {se}");
    assert_eq!(runs(cnt.path(), "gen"), 2, "the third store pulled it");
    same_outputs(&a, &d);
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

// Corrupted in place on S3 (same length), truncated in the directory, and the other way round.
on_both!(corrupted_remote_object_is_detected_and_rebuilt_s3, corrupted_remote_object_is_detected_and_rebuilt_file, |b| {
    corrupt_remote_object_is_rebuilt(b, false)
});
on_both!(truncated_remote_object_is_detected_and_rebuilt_s3, truncated_remote_object_is_detected_and_rebuilt_file, |b| {
    corrupt_remote_object_is_rebuilt(b, true)
});

// --------------------------------------------------------- kill during push

/// `kill -9` of `recflow push` in the middle of a multipart upload leaves
/// no run record, and every object a reader can see is whole; a reader
/// treats the key as missing and a later push completes it.
#[test]
fn kill_during_push_leaves_nothing_a_reader_trusts() {
    let m = moto_with_bucket();
    let b = Backend::S3(&m);
    let cnt = tempfile::tempdir().unwrap();
    let a = project(&b, "");
    a.write("p.yaml", &pipeline(cnt.path(), 8_000_000));
    let o = rf(&a, &["run", "p.yaml", "-q"]).env("RECFLOW_REMOTE", "off").output().unwrap();
    assert!(o.status.success());
    let mut child = rf(&a, &["push", "p.yaml", "--jobs", "1", "--progress-interval", "0.001"]).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    // The first progress line: bytes are moving.
    while std::io::BufRead::read_line(&mut err, &mut line).unwrap_or(0) > 0 && !line.starts_with("push: ") {
        line.clear();
    }
    assert!(line.starts_with("push: "), "the push started moving bytes");
    // SAFETY: kills the push we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    assert!(b.records().is_empty(), "no run record after a killed push");
    for (name, bytes) in b.objects() {
        let hex = name.rsplit('/').next().unwrap();
        assert_eq!(sha256(&bytes), hex, "every visible object is whole: {name}");
    }
    let c = project(&b, "");
    copy_pipeline(&a, &c, true);
    let o = out(&c, &["pull", "p.yaml"]);
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "pull of a key the remote does not hold fails: {se}");
    assert!(se.contains("not in the remote"), "{se}");
    ok(&a, &["push", "p.yaml"]);
    ok(&c, &["pull", "p.yaml"]);
    same_outputs(&a, &c);
}

// ------------------------------------------------------------------- leases

/// The pid of the first running shell stage (written into its work dir).
fn stage_pid(p: &Proj) -> Option<i32> {
    for e in std::fs::read_dir(p.path("cache/work")).into_iter().flatten().flatten() {
        if let Some(pid) = std::fs::read_to_string(e.path().join("pid")).ok().and_then(|s| s.trim().parse().ok()) {
            return Some(pid);
        }
    }
    None
}

fn slow_yaml(cnt: &Path) -> String {
    format!(
        "stages:\n  slow:\n    cmd: |\n      echo $$ > \"$RECFLOW_WORK_DIR/pid\"\n      echo x >> {}/slow\n      i=0; while [ $i -lt 40 ]; do i=$((i+1)); sleep 0.5; done\n      echo done > s.txt\n    outs: [s.txt]\n",
        cnt.display()
    )
}

/// A runner killed while it holds a key's lease leaves the lease behind;
/// another runner (its own local store) waits until it expires, takes it
/// over and computes the key.
#[test]
fn expired_lease_is_taken_over_s3() {
    let m = moto_with_bucket();
    let b = Backend::S3(&m);
    let cnt = tempfile::tempdir().unwrap();
    let fast = slow_yaml(cnt.path()).replace("-lt 40", "-lt 2");
    let a = project(&b, "lease_s = 1.5\n");
    a.write("p.yaml", &fast);
    let mut child = rf(&a, &["run", "p.yaml", "-q"]).stderr(Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || runs(cnt.path(), "slow") >= 1), "the first runner started the stage");
    // SAFETY: kills the runner we started (its stage dies with it).
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    assert_eq!(m.keys(BUCKET, "lab/leases").len(), 1, "the dead runner's lease is still there");
    let c = project(&b, "lease_s = 1.5\n");
    c.write("p.yaml", &fast);
    let (_, se) = ok(&c, &["run", "p.yaml"]);
    assert!(se.contains("another runner"), "the second runner first found the lease held: {se}");
    assert_eq!(runs(cnt.path(), "slow"), 2, "then took it over and ran the stage");
    assert_eq!(c.read("s.txt"), "done\n");
    assert_eq!(b.records().len(), 1);
}

/// A holder whose lease is taken over stops its stage (and records nothing).
#[test]
fn holder_that_loses_its_lease_stops_file() {
    let d = tempfile::tempdir().unwrap();
    let b = Backend::Dir(d.path());
    let cnt = tempfile::tempdir().unwrap();
    let a = project(&b, "lease_s = 1\n");
    a.write("p.yaml", &slow_yaml(cnt.path()));
    let child = rf(&a, &["run", "p.yaml", "-q"]).stderr(Stdio::piped()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || stage_pid(&a).is_some()), "the stage runs");
    let leases: Vec<PathBuf> = std::fs::read_dir(d.path().join("leases")).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
    assert_eq!(leases.len(), 1, "one lease for the running key");
    let key = leases[0].file_stem().unwrap().to_string_lossy().into_owned();
    let thief = format!(
        "{{\"key\":\"{key}\",\"holder\":\"thief:1:0\",\"ttl_ms\":60000,\"expires_unix_ms\":{},\"renewals\":0,\"released\":false}}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 60_000
    );
    std::fs::write(&leases[0], thief).unwrap();
    let o = child.wait_with_output().unwrap();
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "the stage failed: {se}");
    assert!(se.contains("lost the remote lease") && se.contains("thief"), "says why: {se}");
    let pid = stage_pid(&a).unwrap();
    // SAFETY: probes (signal 0) whether the stage process still exists.
    assert!(wait_for(Duration::from_secs(10), || unsafe { libc::kill(pid, 0) } != 0), "the stage process was stopped");
    assert!(!a.path("s.txt").exists() && b.records().is_empty(), "nothing recorded");
}

// --------------------------------------------------------- no request, bad input

/// With everything local, a configured remote is never contacted: the
/// endpoint here does not exist and the no-op run still succeeds. A stage
/// that does need the remote then stops the run as bad input (exit 2),
/// before it runs, naming the endpoint.
#[test]
fn no_op_rerun_makes_no_request() {
    let cnt = tempfile::tempdir().unwrap();
    let p = Proj::new();
    p.write("p.yaml", &pipeline(cnt.path(), 100));
    ok(&p, &["run", "p.yaml", "-q"]);
    let port = free_port();
    p.write("recflow.toml", &format!("[remote]\nurl = \"s3://{BUCKET}/x\"\nendpoint = \"http://127.0.0.1:{port}\"\n"));
    let (so, se) = ok(&p, &["run", "p.yaml"]);
    assert!(so.contains("cached") && !so.contains("ran") && !se.contains("remote"), "no-op with an unreachable remote: {so}{se}");
    p.write("p.yaml", &format!("{}  more:\n    cmd: \"echo x >> {}/more; echo m > m.txt\"\n    outs: [m.txt]\n", pipeline(cnt.path(), 100), cnt.path().display()));
    let o = out(&p, &["run", "p.yaml"]);
    let se = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "an unreachable remote is bad input: {se}");
    assert!(se.contains(&format!("cannot reach http://127.0.0.1:{port}")) && se.contains("endpoint"), "names the endpoint and the setting: {se}");
    assert_eq!(runs(cnt.path(), "more"), 0, "the stage did not run");
}

/// Each bad setting: exit 2, the field and value named with what to do,
/// nothing written to the store or the remote.
#[test]
fn bad_remote_settings_are_named_and_exit_2() {
    let m = Moto::start(); // no bucket
    let cnt = tempfile::tempdir().unwrap();
    let p = Proj::new();
    p.write("p.yaml", &pipeline(cnt.path(), 100));
    let cases: Vec<(String, &str)> = vec![
        ("[remote]\nurl = \"lab-bucket/x\"\n".into(), "recflow.toml [remote] url = \"lab-bucket/x\": not a URL"),
        ("[remote]\nurl = \"gs://lab-bucket\"\n".into(), "unknown scheme `gs`"),
        ("[remote]\nurl = \"file:///no/such/recflow/remote\"\n".into(), "does not exist"),
        ("[remote]\nurll = \"s3://x\"\n".into(), "unknown field `urll`"),
        ("[remote]\nurl = \"s3://lab-bucket\"\nendpoint = \"localhost:9000\"\n".into(), "[remote] endpoint = \"localhost:9000\""),
        (format!("[remote]\nurl = \"s3://{BUCKET}/x\"\nendpoint = \"{}\"\n", m.endpoint()), "bucket `lab-bucket` does not exist"),
    ];
    for (toml, want) in &cases {
        p.write("recflow.toml", toml);
        for args in [&["run", "p.yaml"][..], &["pull", "p.yaml"][..]] {
            let o = out(&p, args);
            let se = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "`recflow {}` with {toml:?}: exit 2: {se}", args.join(" "));
            let want_here = if args[0] == "pull" && !p.path("p.lock").exists() { "no lock file" } else { want };
            assert!(se.contains(want_here) || se.contains(want), "`recflow {}` with {toml:?} says {want:?}: {se}", args.join(" "));
        }
    }
    assert_eq!((runs(cnt.path(), "gen"), runs(cnt.path(), "sum")), (0, 0), "nothing ran");
    assert!(std::fs::read_dir(p.path("cache/records")).map(|r| r.count()).unwrap_or(0) == 0, "nothing recorded");
    let o = rf(&p, &["run", "p.yaml"]).env("RECFLOW_REMOTE", "ftp://x").output().unwrap();
    let se = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(2) && se.contains("RECFLOW_REMOTE = \"ftp://x\""), "the variable is named: {se}");
}

// ------------------------------------------------------------------ secrets

/// A run with AWS credentials in the environment leaves no trace of the
/// secret in the store, the lock, the logs or the output (runner at debug
/// log level), here or in what the remote holds.
#[test]
fn secret_never_reaches_store_lock_or_logs() {
    let m = moto_with_bucket();
    let b = Backend::S3(&m);
    let cnt = tempfile::tempdir().unwrap();
    let secret = format!("rfSecret{:x}", std::process::id() as u64 * 7919 + 123_456_789);
    let a = project(&b, "");
    a.write("p.yaml", &pipeline(cnt.path(), 1000));
    let run = |p: &Proj, args: &[&str]| {
        let o = rf(p, args).env("AWS_SECRET_ACCESS_KEY", &secret).env("RUST_LOG", "debug").output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    let mut said = run(&a, &["run", "p.yaml"]);
    said += &run(&a, &["push", "p.yaml"]);
    let c = project(&b, "");
    copy_pipeline(&a, &c, true);
    said += &run(&c, &["pull", "p.yaml"]);
    assert!(!said.contains(&secret), "the secret is not in any output or log line");
    for p in [&a, &c] {
        let hits = files_containing(&p.all_files(), &secret);
        assert!(hits.is_empty(), "the secret is in no file of the project, store, lock or logs: {hits:?}");
    }
    for (name, bytes) in b.objects() {
        assert!(!String::from_utf8_lossy(&bytes).contains(&secret), "the secret is not in remote object {name}");
    }
}

// ------------------------------------------------------------------------ gc

/// Two projects sharing one local store: gc from one keeps the other's
/// outputs (its lock is a registered root) and never touches the remote;
/// `gc --remote` collects only what no pushed lock, lease or young entry keeps.
#[test]
fn gc_keeps_every_project_and_remote_gc_is_explicit() {
    let d = tempfile::tempdir().unwrap();
    let b = Backend::Dir(d.path());
    let store = tempfile::tempdir().unwrap();
    let cnt = tempfile::tempdir().unwrap();
    let (p1, p2) = (project(&b, ""), project(&b, ""));
    let y = |v: u32| format!("params:\n  v: {v}\nstages:\n  s:\n    cmd: \"echo x >> {}/s${{params.v}}; echo ${{params.v}} > s.txt\"\n    outs: [s.txt]\n", cnt.path().display());
    p1.write("p.yaml", &y(1));
    p2.write("q.yaml", &y(2));
    let shared = |p: &Proj, args: &[&str]| {
        let o = rf(p, args).env("RECFLOW_CACHE", store.path()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    shared(&p1, &["run", "p.yaml", "-q"]);
    shared(&p2, &["run", "q.yaml", "-q"]);
    let remote_objects = b.objects().len();
    assert_eq!(b.records().len(), 2, "both keys written through");
    let so = shared(&p1, &["gc", "--keep-days", "0"]);
    assert!(so.contains("removed 0 run records"), "gc from one project keeps the other's registered outputs: {so}");
    let so = shared(&p2, &["run", "q.yaml"]);
    assert!(so.contains("cached"), "the other project's stage is still cached: {so}");
    assert_eq!(runs(cnt.path(), "s2"), 1);
    assert_eq!(b.objects().len(), remote_objects, "local gc never deletes remote objects");
    // p1 moves on to v=3: v=1 is no longer in any pushed lock.
    p1.write("p.yaml", &y(3));
    shared(&p1, &["run", "p.yaml", "-q"]);
    shared(&p2, &["push", "q.yaml"]);
    assert_eq!(b.records().len(), 3);
    let so = shared(&p1, &["gc", "--remote", "--keep-days", "0", "--dry-run"]);
    assert!(so.contains("would have removed 1 run records"), "{so}");
    assert_eq!(b.records().len(), 3, "a dry run removes nothing");
    let so = shared(&p1, &["gc", "--remote", "--keep-days", "0"]);
    assert!(so.contains("removed 1 run records") && so.contains("2 pushed lock files"), "{so}");
    let left: Vec<String> = b.records();
    assert_eq!(left.len(), 2, "the keys of both pushed locks stay: {left:?}");
    // What stays is whole: a fresh store pulls p2's key.
    let p3 = project(&b, "");
    p3.write("q.yaml", &p2.read("q.yaml"));
    p3.write("q.lock", &p2.read("q.lock"));
    ok(&p3, &["pull", "q.yaml"]);
    assert_eq!(p3.read("s.txt"), "2\n");
}

// ----------------------------------------------------- work dirs (library API)

/// `push_workdir` / `pull_workdir`: a work dir (checkpoints) crosses to an
/// empty directory byte for byte; an unchanged push sends nothing; a
/// corrupt remote file makes the pull a miss.
fn workdir_round_trip(b: &Backend) {
    use recflow::remote::{Remote, RemoteSpec};
    let cfg_text = b.toml("");
    let cfg = recflow::config::ProjectConfig::parse(&cfg_text).unwrap();
    // Credentials as the runner gets them: from the environment.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    let spec = RemoteSpec::resolve(cfg.remote.as_ref(), None, Path::new("recflow.toml")).unwrap().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let remote = Remote::open(&spec).unwrap();
    let w = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(w.path().join("ckpt")).unwrap();
    std::fs::write(w.path().join("ckpt/model.bin"), vec![7u8; 9 << 20]).unwrap();
    std::fs::write(w.path().join("step"), "120\n").unwrap();
    let key = "k".repeat(64);
    let mut sc = recflow::cache::StatCache::ephemeral();
    rt.block_on(async {
        remote.check().await.unwrap();
        let s = remote.push_workdir(&key, w.path(), &mut sc).await.unwrap();
        assert_eq!((s.files, s.transferred), (2, 2), "first push sends both files");
        std::fs::write(w.path().join("step"), "240\n").unwrap();
        let s = remote.push_workdir(&key, w.path(), &mut sc).await.unwrap();
        assert_eq!(s.transferred, 1, "only the changed file is sent again");
        let to = tempfile::tempdir().unwrap();
        let s = remote.pull_workdir(&key, to.path()).await.unwrap().expect("a work dir in the remote");
        assert_eq!(s.files, 2);
        assert_eq!(std::fs::read(to.path().join("ckpt/model.bin")).unwrap(), vec![7u8; 9 << 20], "checkpoint byte-identical");
        assert_eq!(std::fs::read_to_string(to.path().join("step")).unwrap(), "240\n", "the last push wins");
    });
    b.tamper(&sha256(b"240\n"), b"999\n");
    rt.block_on(async {
        let again = tempfile::tempdir().unwrap();
        assert!(remote.pull_workdir(&key, again.path()).await.unwrap().is_none(), "a corrupt file makes the pull a miss");
        remote.drop_workdir(&key).await.unwrap();
        assert!(remote.pull_workdir(&key, again.path()).await.unwrap().is_none(), "dropped");
    });
}

on_both!(workdir_push_pull_s3, workdir_push_pull_file, workdir_round_trip);
