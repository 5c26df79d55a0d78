//! The store's registry of roots (ARCHITECTURE "Store lifetime"): every
//! lock file a run writes is registered here, so `gc` keeps what *every*
//! project using a shared store (a shared `RECFLOW_CACHE`) references, not
//! only the project it is run from.
//!
//! `roots/locks/ID.json` holds `{"lock": "/abs/path/to/NAME.lock"}`, `ID`
//! being [`root_id`] of that path. Registering is idempotent and costs one
//! `stat` when the entry exists (every stage of a no-op run asks). An entry
//! whose lock file is gone is a stale root: `gc` drops it.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One registered lock file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockRoot {
    pub lock: PathBuf,
}

/// `HOST`-qualified id of a lock path: the same project cloned on two
/// machines sharing a store (or pushing to one remote) gets two roots, so
/// one never overwrites the other's.
pub fn root_id(lock: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let abs = std::path::absolute(lock).unwrap_or_else(|_| lock.to_path_buf());
    crate::cache::hash::sha256_hex(format!("{host}:{}", abs.display()).as_bytes())[..16].to_string()
}

fn dir(store_dir: &Path) -> PathBuf {
    store_dir.join("roots").join("locks")
}

/// Registers `lock` as a root of the store at `store_dir` (best effort: a
/// store that cannot be written fails later, where it matters).
pub fn register_lock(store_dir: &Path, lock: &Path) {
    let abs = std::path::absolute(lock).unwrap_or_else(|_| lock.to_path_buf());
    let entry = dir(store_dir).join(format!("{}.json", root_id(&abs)));
    if entry.exists() {
        return;
    }
    let body = serde_json::to_vec_pretty(&LockRoot { lock: abs }).unwrap_or_default();
    let _ = crate::util::write_atomic(&entry, &body);
}

/// Every registered root: (entry file, the lock it names).
pub fn registered_locks(store_dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut v: Vec<(PathBuf, PathBuf)> = std::fs::read_dir(dir(store_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| {
            let r: LockRoot = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((e.path(), r.lock))
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registering_is_idempotent_and_lists_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join("proj/p.lock");
        register_lock(&d.path().join("cache"), &lock);
        register_lock(&d.path().join("cache"), &lock);
        let got = registered_locks(&d.path().join("cache"));
        assert_eq!(got.len(), 1, "one entry per lock file");
        assert_eq!(got[0].1, lock, "the entry names the lock's absolute path");
        assert_ne!(root_id(&lock), root_id(&d.path().join("other/p.lock")), "two locks, two ids");
    }
}
