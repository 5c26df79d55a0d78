//! The teacher response cache: every answer stored as soon as it arrives,
//! keyed by request identity ([`super::Request::identity`]).
//!
//! Layout: a directory (default `<store>/responses/`) of append-only JSON-lines
//! journals `journal-<nanos>-<pid>.jsonl`, one per writing process, so two
//! runs sharing a store never interleave writes. Each line is
//! `{"id": HEX, "reply": {...}}`; the API key and other operational
//! settings never enter it.
//!
//! Durability: [`ResponseCache::put`] hands the entry to a writer thread and
//! resolves only after the line is written *and* `fdatasync`ed. The writer
//! group-commits: whatever queued up while the previous fsync ran is written
//! and synced together, so at concurrency 64 one fsync covers many answers
//! (see docs/teacher.md for measured fsyncs per answer). An answer is used by
//! the rationalization loop only after `put` resolved, so a kill -9 at any
//! moment loses only answers still in flight. A torn last line (killed
//! mid-write) fails to parse and is skipped on load, like a corrupt cache
//! entry: a miss, never a crash.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::Reply;

/// Errors of the response cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("response cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("response cache writer stopped (an earlier write failed)")]
    WriterGone,
}

#[derive(Serialize, Deserialize)]
struct Line {
    id: String,
    reply: Reply,
}

/// Counters for benchmarks and logs.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub loaded: AtomicU64,
    pub skipped_lines: AtomicU64,
    pub appended: AtomicU64,
    pub fsyncs: AtomicU64,
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// An open response cache (cheap to share behind an `Arc`).
pub struct ResponseCache {
    dir: PathBuf,
    index: Mutex<HashMap<String, Reply>>,
    tx: Mutex<Option<mpsc::Sender<(String, Ack)>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub stats: Arc<CacheStats>,
}

impl ResponseCache {
    /// Opens (creating) the cache directory and loads every journal in it.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Io { path: dir.to_path_buf(), source })?;
        Self::load(dir)
    }

    /// Loads every journal in `dir` without creating anything (a missing
    /// directory is an empty cache): for previews. Writing through a loaded
    /// cache creates its journal file as `open` would.
    pub fn load(dir: &Path) -> Result<Self, CacheError> {
        let io = |source| CacheError::Io { path: dir.to_path_buf(), source };
        let stats = Arc::new(CacheStats::default());
        let mut index = HashMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let mut names: Vec<PathBuf> = entries
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("journal-") && n.ends_with(".jsonl"))
            })
            .collect();
        names.sort();
        for path in names {
            let f = File::open(&path).map_err(|source| CacheError::Io { path: path.clone(), source })?;
            for line in BufReader::new(f).split(b'\n') {
                let line = line.map_err(|source| CacheError::Io { path: path.clone(), source })?;
                match serde_json::from_slice::<Line>(&line) {
                    Ok(l) => {
                        index.insert(l.id, l.reply);
                        stats.loaded.fetch_add(1, Ordering::Relaxed);
                    }
                    // A torn tail after a crash: not acknowledged, so not needed.
                    Err(_) => {
                        stats.skipped_lines.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(ResponseCache {
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
            tx: Mutex::new(None),
            writer: Mutex::new(None),
            stats,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of answers known.
    pub fn len(&self) -> usize {
        self.index.lock().map(|i| i.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A stored answer.
    pub fn get(&self, id: &str) -> Option<Reply> {
        self.index.lock().ok().and_then(|i| i.get(id).cloned())
    }

    /// Stores an answer durably; resolves once it is fsynced.
    pub async fn put(&self, id: &str, reply: &Reply) -> Result<(), CacheError> {
        let line = serde_json::to_string(&Line { id: id.to_string(), reply: reply.clone() })
            .map_err(|e| CacheError::Io { path: self.dir.clone(), source: e.into() })?;
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        self.sender()?.send((line, ack_tx)).map_err(|_| CacheError::WriterGone)?;
        match ack_rx.await {
            Ok(Ok(())) => {
                if let Ok(mut i) = self.index.lock() {
                    i.insert(id.to_string(), reply.clone());
                }
                Ok(())
            }
            Ok(Err(msg)) => Err(CacheError::Io { path: self.dir.clone(), source: std::io::Error::other(msg) }),
            Err(_) => Err(CacheError::WriterGone),
        }
    }

    /// The writer thread's queue, starting the thread (and creating this
    /// process's journal file) on first use.
    fn sender(&self) -> Result<mpsc::Sender<(String, Ack)>, CacheError> {
        let mut guard = self.tx.lock().map_err(|_| CacheError::WriterGone)?;
        if let Some(tx) = guard.as_ref() {
            return Ok(tx.clone());
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = self.dir.join(format!("journal-{nanos}-{}.jsonl", std::process::id()));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| CacheError::Io { path: path.clone(), source })?;
        // The new file's directory entry must survive a crash too.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let (tx, rx) = mpsc::channel::<(String, Ack)>();
        let stats = self.stats.clone();
        let handle = std::thread::Builder::new()
            .name("teacher-journal".into())
            .spawn(move || writer_loop(file, rx, stats))
            .map_err(|source| CacheError::Io { path: path.clone(), source })?;
        *guard = Some(tx.clone());
        if let Ok(mut w) = self.writer.lock() {
            *w = Some(handle);
        }
        Ok(tx)
    }

    /// Stops the writer after it has flushed everything queued.
    pub fn close(&self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }
}

impl Drop for ResponseCache {
    fn drop(&mut self) {
        self.close();
    }
}

/// Group commit: block for one entry, drain whatever else is queued, write
/// all, fdatasync once, then acknowledge all.
fn writer_loop(file: File, rx: mpsc::Receiver<(String, Ack)>, stats: Arc<CacheStats>) {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
    let mut acks: Vec<Ack> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut result: std::io::Result<()> = Ok(());
        for (line, ack) in batch {
            if result.is_ok() {
                result = out.write_all(line.as_bytes()).and_then(|_| out.write_all(b"\n"));
            }
            acks.push(ack);
        }
        let result = result.and_then(|_| out.flush()).and_then(|_| out.get_ref().sync_data());
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        let ok = result.is_ok();
        let n = acks.len() as u64;
        let msg = result.err().map(|e| e.to_string());
        for ack in acks.drain(..) {
            let _ = ack.send(match &msg {
                None => Ok(()),
                Some(m) => Err(m.clone()),
            });
        }
        if !ok {
            // A failed write leaves the file in an unknown state: stop, and
            // let every later put fail loudly instead of pretending.
            return;
        }
        stats.appended.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teacher::Usage;

    fn reply(s: &str) -> Reply {
        Reply { content: s.into(), reasoning_content: None, usage: Usage { prompt_tokens: 1, completion_tokens: 2 } }
    }

    #[test]
    fn load_of_a_missing_dir_is_empty_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("responses");
        let c = ResponseCache::load(&missing).unwrap();
        assert!(c.is_empty());
        drop(c);
        assert!(!missing.exists(), "a preview (dry run) must not create the response cache");
    }

    #[test]
    fn put_survives_reopen_and_torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        {
            let c = ResponseCache::open(dir.path()).unwrap();
            rt.block_on(async {
                c.put("a", &reply("A")).await.unwrap();
                c.put("b", &reply("B")).await.unwrap();
            });
            assert_eq!(c.get("a"), Some(reply("A")), "an acknowledged answer is readable at once");
        }
        // Simulate a kill mid-write: a torn line at the end of a journal.
        let j = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let mut f = OpenOptions::new().append(true).open(&j).unwrap();
        f.write_all(b"{\"id\":\"c\",\"reply\":{\"cont").unwrap();
        let c = ResponseCache::open(dir.path()).unwrap();
        assert_eq!(c.len(), 2, "acknowledged answers survive reopening");
        assert_eq!(c.get("b"), Some(reply("B")));
        assert_eq!(c.stats.skipped_lines.load(Ordering::Relaxed), 1, "the torn line is a miss, not a crash");
    }
}
