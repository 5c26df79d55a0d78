//! The stat cache: (path, size, mtime, inode) → sha256, so a no-op run
//! stats files instead of rehashing them. Loaded once per command, merged
//! into the on-disk copy under a file lock and written atomically.
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::hash::{self, Entry, Manifest};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    ino: u64,
}

fn stat_of(md: &std::fs::Metadata) -> Stat {
    Stat { size: md.len(), mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128, ino: md.ino() }
}

#[derive(Debug, Default)]
pub struct StatCache {
    file: Option<PathBuf>,
    map: HashMap<PathBuf, (Stat, String)>,
    dirty: HashMap<PathBuf, (Stat, String)>,
    /// Bytes hashed by this process (reported by `run`).
    pub hashed_bytes: u64,
}

type OnDisk = HashMap<PathBuf, (u64, i128, u64, String)>;

impl StatCache {
    /// Loads `store_dir/statcache.json` (a missing or unreadable cache is empty).
    pub fn load(store_dir: &Path) -> Self {
        let file = store_dir.join("statcache.json");
        let map = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<OnDisk>(&b).ok())
            .map(|m| m.into_iter().map(|(p, (size, mtime_ns, ino, h))| (p, (Stat { size, mtime_ns, ino }, h))).collect())
            .unwrap_or_default();
        StatCache { file: Some(file), map, dirty: HashMap::new(), hashed_bytes: 0 }
    }

    /// In-memory only (tests, scratch stores).
    pub fn ephemeral() -> Self {
        Self::default()
    }

    /// sha256 hex of a file, from the cache when its stat is unchanged.
    pub fn hash_file(&mut self, path: &Path) -> std::io::Result<String> {
        let md = std::fs::metadata(path)?;
        let st = stat_of(&md);
        if let Some((s, h)) = self.map.get(path) {
            if *s == st {
                return Ok(h.clone());
            }
        }
        let h = hash::hash_file(path)?;
        self.hashed_bytes += st.size;
        // Re-stat: a file written while we hashed must not be cached under the new stat.
        if std::fs::metadata(path).ok().map(|m| stat_of(&m)) == Some(st) {
            self.remember(path, st, &h);
        }
        Ok(h)
    }

    /// Records that `path` (as it is now) has hash `h` (after we wrote it).
    pub fn record(&mut self, path: &Path, h: &str) {
        if let Ok(md) = std::fs::metadata(path) {
            self.remember(path, stat_of(&md), h);
        }
    }

    fn remember(&mut self, path: &Path, st: Stat, h: &str) {
        self.map.insert(path.to_path_buf(), (st, h.to_string()));
        self.dirty.insert(path.to_path_buf(), (st, h.to_string()));
    }

    /// Drops a path (after detecting corruption).
    pub fn forget(&mut self, path: &Path) {
        self.map.remove(path);
        self.dirty.remove(path);
    }

    /// Content id of a file or directory plus, for a directory, its manifest.
    pub fn content_id(&mut self, path: &Path) -> std::io::Result<(String, Option<Manifest>)> {
        let md = std::fs::metadata(path)?;
        if md.is_dir() {
            let mut m = Manifest::default();
            for (rel, p) in hash::walk_files(path)? {
                let fmd = std::fs::metadata(&p)?;
                let h = self.hash_file(&p)?;
                m.entries.push(Entry { path: rel, hash: h, size: fmd.len(), exec: fmd.mode() & 0o111 != 0 });
            }
            Ok((m.id(), Some(m)))
        } else {
            Ok((format!("sha256:{}", self.hash_file(path)?), None))
        }
    }

    /// Merges our new entries into the on-disk cache and writes it atomically.
    pub fn save(&mut self) {
        let Some(file) = self.file.clone() else { return };
        if self.dirty.is_empty() {
            return;
        }
        let Some(dir) = file.parent() else { return };
        let _guard = super::locks::FileLock::exclusive(&dir.join("locks").join("statcache.lock")).ok();
        let mut disk: OnDisk = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        for (p, (s, h)) in self.dirty.drain() {
            disk.insert(p, (s.size, s.mtime_ns, s.ino, h));
        }
        // Entries for files that no longer exist only cost space: drop them.
        disk.retain(|p, _| p.exists());
        if let Ok(bytes) = serde_json::to_vec(&disk) {
            // A cache: failing to write only costs rehashing next time.
            let _ = crate::util::write_atomic(&file, &bytes);
        }
    }
}
