//! Moving one stage key between the local store and the remote.
//!
//! **Push** ([`Remote::push_key`]): the key's objects first (each skipped
//! when the remote has it; content-addressed, so a retried push rewrites
//! nothing and two pushers write the same bytes), large ones as multipart
//! uploads; every byte is hashed on the way out and a local object that no
//! longer matches its name aborts the push. The run record goes last, with a
//! create-only write (`PutMode::Create`): a reader that sees a record sees
//! all its objects, and of two writers of one key exactly one record wins.
//!
//! **Pull** ([`Remote::pull_key`]): the record (whose key inputs must hash to
//! the key), then every manifest and object it names, each hashed while it
//! streams in and adopted into the local store only when it matches. A
//! missing, truncated or corrupt remote object makes the whole key a miss
//! with the reason ([`PullOutcome::Unusable`]), never a half-used entry; the
//! local record is written last, so the local store never names an object
//! it does not hold.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use object_store::{ObjectStoreExt, PutMode, PutOptions, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{io_err, Remote, RemoteError};
use crate::cache::hash::{self, Manifest};
use crate::cache::store::{OutputRecord, RunRecord};
use crate::cache::Store;

/// Objects up to this size go in one PUT; larger ones as multipart uploads
/// of parts this size (S3's minimum part is 5 MiB).
pub const PART: usize = 8 << 20;
/// Parts of one object in flight at once (memory: jobs × this × PART).
const PARTS_IN_FLIGHT: usize = 2;

/// What pulling a key found.
#[derive(Debug)]
pub enum PullOutcome {
    /// Record and every object are now in the local store, verified.
    Pulled { record: Box<RunRecord>, objects: usize, bytes: u64 },
    /// The remote has no record of this key.
    Missing,
    /// The remote's entry cannot be trusted (the reason: a missing,
    /// truncated or corrupt object, a record that does not match its key).
    /// Nothing of it was recorded locally.
    Unusable(String),
}

/// What pushing a key did.
#[derive(Debug, Clone, PartialEq)]
pub enum PushOutcome {
    /// Objects (those the remote lacked) and the record were written.
    Pushed { objects: usize, bytes: u64 },
    /// The remote already had this key's record (objects found corrupt by
    /// this process were rewritten first; `objects` counts them).
    AlreadyThere { objects: usize, bytes: u64 },
    /// Another writer's record won the create-only write, with other
    /// outputs (a stage that is not deterministic); the remote keeps theirs.
    Differs { objects: usize, bytes: u64 },
}

/// Bytes and rate of a transfer. On a terminal (stderr) a bar; without one
/// a plain line every `interval` (batch jobs, CI, redirected output).
#[derive(Debug)]
pub struct Progress {
    verb: String,
    done: AtomicU64,
    total: AtomicU64,
    objects: AtomicU64,
    t0: Instant,
    out: Out,
}

#[derive(Debug)]
enum Out {
    Hidden,
    Bar(ProgressBar),
    Lines { interval: Duration, last: Mutex<Instant> },
}

/// `12.3 MB` (decimal units, as rates are usually quoted).
pub fn fmt_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

impl Progress {
    /// Reports nothing (the runner's read- and write-through).
    pub fn hidden() -> Progress {
        Progress { verb: String::new(), done: AtomicU64::new(0), total: AtomicU64::new(0), objects: AtomicU64::new(0), t0: Instant::now(), out: Out::Hidden }
    }

    /// `verb` ("push", "pull") starts each line.
    pub fn new(verb: &str, interval: Duration) -> Progress {
        let out = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(verb.to_string());
            Out::Bar(bar)
        } else {
            Out::Lines { interval, last: Mutex::new(Instant::now()) }
        };
        Progress { verb: verb.to_string(), done: AtomicU64::new(0), total: AtomicU64::new(0), objects: AtomicU64::new(0), t0: Instant::now(), out }
    }

    /// More bytes will be moved.
    pub fn add_total(&self, n: u64) {
        let t = self.total.fetch_add(n, Ordering::Relaxed) + n;
        if let Out::Bar(b) = &self.out {
            b.set_length(t);
        }
    }

    /// `n` bytes moved.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        match &self.out {
            Out::Hidden => {}
            Out::Bar(b) => b.inc(n),
            Out::Lines { interval, last } => {
                let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
                if l.elapsed() >= *interval {
                    *l = Instant::now();
                    eprintln!("{}", self.line());
                }
            }
        }
    }

    /// One object moved.
    pub fn object_done(&self) {
        let n = self.objects.fetch_add(1, Ordering::Relaxed) + 1;
        if let Out::Bar(b) = &self.out {
            b.set_message(format!("{n} objects"));
        }
    }

    pub fn bytes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn objects(&self) -> u64 {
        self.objects.load(Ordering::Relaxed)
    }

    /// `push: 12.3 MB / 40.0 MB (31%), 10.2 MB/s, 3 objects, 1.2 s`.
    pub fn line(&self) -> String {
        let (d, t) = (self.bytes(), self.total.load(Ordering::Relaxed).max(self.bytes()));
        let s = self.t0.elapsed().as_secs_f64();
        let pct = if t > 0 { d as f64 * 100.0 / t as f64 } else { 100.0 };
        format!(
            "{}: {} / {} ({pct:.0}%), {}/s, {} objects, {s:.1} s",
            self.verb,
            fmt_bytes(d),
            fmt_bytes(t),
            fmt_bytes((d as f64 / s.max(1e-3)) as u64),
            self.objects()
        )
    }

    /// Clears the bar; returns the last line.
    pub fn finish(&self) -> String {
        if let Out::Bar(b) = &self.out {
            b.finish_and_clear();
        }
        self.line()
    }
}

/// One object of a key: its hex and (locally) its size and path.
#[derive(Debug, Clone)]
struct Obj {
    hex: String,
    size: u64,
    path: PathBuf,
}

/// The local objects behind a record's outputs: each file object, and for
/// a tree its manifest and every file it lists. Errors when one is missing.
fn local_objects(local: &Store, outputs: &BTreeMap<String, OutputRecord>) -> Result<Vec<Obj>, RemoteError> {
    let mut hexes: Vec<String> = Vec::new();
    for o in outputs.values() {
        hexes.push(hash::hex_of(&o.id).to_string());
        if hash::is_tree(&o.id) {
            hexes.extend(local.manifest(&o.id)?.entries.into_iter().map(|e| e.hash));
        }
    }
    hexes.sort();
    hexes.dedup();
    hexes
        .into_iter()
        .map(|hex| {
            let path = local.object_path(&hex);
            let size = std::fs::metadata(&path).map_err(|_| crate::cache::CacheError::Missing(hex.clone()))?.len();
            Ok(Obj { hex, size, path })
        })
        .collect()
}

/// Whether a fetch of one object worked.
enum Fetched {
    Ok(u64),
    Missing,
    Corrupt(String),
}

impl Remote {
    /// Whether the remote holds a run record for `key` (one HEAD request).
    pub async fn has_record(&self, key: &str) -> Result<bool, RemoteError> {
        match self.store().head(&self.record_loc(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.classify(e, "reading a run record")),
        }
    }

    /// The remote's run record of `key`: None when absent; an error string
    /// when it is unreadable or does not belong to the key.
    pub async fn read_record(&self, key: &str) -> Result<Option<Result<RunRecord, String>>, RemoteError> {
        let Some((b, _)) = self.get_small(&self.record_loc(key), "reading a run record").await? else { return Ok(None) };
        let rec: RunRecord = match serde_json::from_slice(&b) {
            Ok(r) => r,
            Err(e) => return Ok(Some(Err(format!("its run record does not parse ({e})")))),
        };
        // The key is the hash of the key inputs: a record that does not
        // hash to its own name is not this key's.
        match rec.key_inputs.key() {
            Ok(k) if k == key && rec.key == key => Ok(Some(Ok(rec))),
            _ => Ok(Some(Err("its run record's key inputs do not hash to the key".into()))),
        }
    }

    /// Pulls `key` into `local` (see the module doc). Objects already in the
    /// local store are not fetched again.
    pub async fn pull_key(&self, local: &Store, key: &str, progress: &Progress) -> Result<PullOutcome, RemoteError> {
        let rec = match self.read_record(key).await? {
            None => return Ok(PullOutcome::Missing),
            Some(Err(why)) => return Ok(PullOutcome::Unusable(why)),
            Some(Ok(r)) => r,
        };
        let (mut objects, mut bytes) = (0usize, 0u64);
        // Files first named by id; trees by their manifest (fetched first).
        let mut files: Vec<(String, Option<u64>)> = Vec::new();
        for o in rec.outputs.values() {
            let hex = hash::hex_of(&o.id).to_string();
            if !hash::is_tree(&o.id) {
                files.push((hex, None));
                continue;
            }
            if !local.object_path(&hex).exists() {
                match self.fetch(local, &hex, None, progress).await? {
                    Fetched::Ok(n) => {
                        objects += 1;
                        bytes += n;
                    }
                    Fetched::Missing => return Ok(PullOutcome::Unusable(format!("manifest {hex} of output `{}` is missing", o.path))),
                    Fetched::Corrupt(why) => return Ok(PullOutcome::Unusable(why)),
                }
            }
            let m: Manifest = match local.manifest(&o.id) {
                Ok(m) => m,
                Err(e) => {
                    local.evict_object(&hex);
                    return Ok(PullOutcome::Unusable(format!("manifest of output `{}`: {e}", o.path)));
                }
            };
            files.extend(m.entries.into_iter().map(|e| (e.hash, Some(e.size))));
        }
        files.sort();
        files.dedup();
        let want: Vec<(String, Option<u64>)> = files.into_iter().filter(|(h, _)| !local.object_path(h).exists()).collect();
        let jobs = self.spec().jobs;
        let results: Vec<(String, Fetched)> = futures::stream::iter(want)
            .map(|(hex, size)| async move {
                let r = self.fetch(local, &hex, size, progress).await;
                r.map(|f| (hex, f))
            })
            .buffer_unordered(jobs)
            .try_collect()
            .await?;
        let mut problems = Vec::new();
        for (hex, f) in results {
            match f {
                Fetched::Ok(n) => {
                    objects += 1;
                    bytes += n;
                }
                Fetched::Missing => problems.push(format!("object {hex} is missing")),
                Fetched::Corrupt(why) => problems.push(why),
            }
        }
        if !problems.is_empty() {
            problems.sort();
            return Ok(PullOutcome::Unusable(problems.join("; ")));
        }
        local.write_record(&rec)?;
        Ok(PullOutcome::Pulled { record: Box::new(rec), objects, bytes })
    }

    /// Fetches one object into the local store, hashing it as it streams
    /// in; adopted only when it hashes to `hex` (and has `size` bytes when given).
    async fn fetch(&self, local: &Store, hex: &str, size: Option<u64>, progress: &Progress) -> Result<Fetched, RemoteError> {
        let loc = self.object_loc(hex);
        let got = match self.store().get(&loc).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(Fetched::Missing),
            Err(e) => return Err(self.classify(e, &format!("fetching object {hex}"))),
        };
        progress.add_total(got.meta.size);
        let tmp = local.tmp_path("pull")?;
        let res = self.stream_to_file(got, &tmp, progress).await;
        let (actual, n) = match res {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if actual != hex || size.is_some_and(|s| s != n) {
            let _ = std::fs::remove_file(&tmp);
            self.mark_bad(hex);
            return Ok(Fetched::Corrupt(format!("object {hex} is corrupt or truncated in the remote ({n} bytes hash to {})", &actual[..12])));
        }
        local.adopt_object(hex, &tmp)?;
        self.note_present(hex);
        progress.object_done();
        Ok(Fetched::Ok(n))
    }

    /// Streams a GET into a new file; returns its sha256 and length.
    pub(crate) async fn stream_to_file(&self, got: object_store::GetResult, tmp: &Path, progress: &Progress) -> Result<(String, u64), RemoteError> {
        let mut f = tokio::fs::File::create(tmp).await.map_err(io_err(tmp))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.classify(e, "reading an object"))?;
            h.update(&chunk);
            f.write_all(&chunk).await.map_err(io_err(tmp))?;
            n += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
        }
        f.flush().await.map_err(io_err(tmp))?;
        Ok((hex::encode(h.finalize()), n))
    }

    /// Pushes `key` from `local` (see the module doc).
    pub async fn push_key(&self, local: &Store, key: &str, progress: &Progress) -> Result<PushOutcome, RemoteError> {
        let rec = local.read_record(key).ok_or_else(|| RemoteError::NotLocal(key.to_string()))?;
        let objs = local_objects(local, &rec.outputs)?;
        let there = self.has_record(key).await?;
        if there && !objs.iter().any(|o| self.is_bad(&o.hex)) {
            return Ok(PushOutcome::AlreadyThere { objects: 0, bytes: 0 });
        }
        // Objects first; with the record present only those found bad are rewritten.
        let objs: Vec<Obj> = if there { objs.into_iter().filter(|o| self.is_bad(&o.hex)).collect() } else { objs };
        let jobs = self.spec().jobs;
        let sent: Vec<u64> = futures::stream::iter(objs)
            .map(|o| async move { Ok::<u64, RemoteError>(if self.send_new(key, &o.hex, &o.path, o.size, progress).await? { o.size } else { 0 }) })
            .buffer_unordered(jobs)
            .try_collect()
            .await?;
        let objects = sent.iter().filter(|n| **n > 0).count();
        let bytes: u64 = sent.iter().sum();
        if there {
            return Ok(PushOutcome::AlreadyThere { objects, bytes });
        }
        // The record last, create-only.
        let path = local.record_path(key);
        let body = std::fs::read(&path).map_err(io_err(&path))?;
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store().put_opts(&self.record_loc(key), bytes::Bytes::from(body).into(), opts).await {
            Ok(_) => Ok(PushOutcome::Pushed { objects, bytes }),
            Err(object_store::Error::AlreadyExists { .. }) => match self.read_record(key).await? {
                Some(Ok(theirs)) if theirs.outputs == rec.outputs => Ok(PushOutcome::AlreadyThere { objects, bytes }),
                _ => Ok(PushOutcome::Differs { objects, bytes }),
            },
            Err(e) => Err(self.classify(e, "writing a run record")),
        }
    }

    /// Uploads one object unless the remote has it intact (as far as this
    /// process knows: objects found corrupt are sent again); whether it was sent.
    pub(crate) async fn send_new(&self, key: &str, hex: &str, path: &Path, size: u64, progress: &Progress) -> Result<bool, RemoteError> {
        if self.known_present(hex) {
            return Ok(false);
        }
        if !self.is_bad(hex) {
            match self.store().head(&self.object_loc(hex)).await {
                Ok(m) if m.size == size => {
                    self.note_present(hex);
                    return Ok(false);
                }
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.classify(e, &format!("looking up object {hex}"))),
            }
        }
        self.upload(key, hex, path, size, progress).await?;
        self.clear_bad(hex);
        self.note_present(hex);
        progress.object_done();
        Ok(true)
    }

    /// Uploads a file as object `hex`, hashing what is sent: one PUT up to
    /// [`PART`] bytes, a multipart upload above (aborted when the bytes do
    /// not hash to `hex`, so nothing is left under its name).
    pub(crate) async fn upload(&self, key: &str, hex: &str, path: &Path, size: u64, progress: &Progress) -> Result<(), RemoteError> {
        let loc = self.object_loc(hex);
        progress.add_total(size);
        let corrupt = || RemoteError::LocalCorrupt { key: key.to_string(), hex: hex.to_string() };
        if size <= PART as u64 {
            let b = tokio::fs::read(path).await.map_err(io_err(path))?;
            if hash::sha256_hex(&b) != hex {
                return Err(corrupt());
            }
            let n = b.len() as u64;
            self.store().put(&loc, bytes::Bytes::from(b).into()).await.map_err(|e| self.classify(e, &format!("writing object {hex}")))?;
            progress.advance(n);
            return Ok(());
        }
        let up = self.store().put_multipart(&loc).await.map_err(|e| self.classify(e, &format!("starting the upload of {hex}")))?;
        let mut w = WriteMultipart::new_with_chunk_size(up, PART);
        let mut f = tokio::fs::File::open(path).await.map_err(io_err(path))?;
        let mut h = Sha256::new();
        loop {
            let mut buf = vec![0u8; PART];
            let mut filled = 0;
            while filled < PART {
                let n = f.read(&mut buf[filled..]).await.map_err(io_err(path))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            h.update(&buf);
            if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                return Err(self.classify(e, &format!("uploading object {hex}")));
            }
            w.put(bytes::Bytes::from(buf));
            progress.advance(filled as u64);
            if filled < PART {
                break;
            }
        }
        if hex::encode(h.finalize()) != hex {
            let _ = w.abort().await;
            return Err(corrupt());
        }
        w.finish().await.map_err(|e| self.classify(e, &format!("completing the upload of {hex}")))?;
        Ok(())
    }
}
