//! The content-addressed store and stage keys.
//!
//! * [`key`] — [`key::StageKeyInputs`] → canonical JSON → sha256.
//! * [`hash`] — file and directory (manifest) hashing, content ids.
//! * [`statcache`] — (path, size, mtime, inode) → hash, so unchanged files are not rehashed.
//! * [`store`] — objects, run records, materialised outputs, work dirs, logs.
//! * [`locks`] — per-key file locks (`flock`: a dead holder's lock is freed by the kernel).
//! * [`roots`] — the registry of lock files of every project using the store (what `gc` keeps).
//!
//! Layout of `cache/` (the project root's, or `RECFLOW_CACHE`):
//! ```text
//! objects/AB/HEX     file contents and directory manifests, read-only
//! records/KEY.json   run record: key inputs, output ids, metrics, timings
//! out/KEY/NAME[.EXT] outputs of a key, hard links to objects (what stages read)
//! work/KEY/          persistent work dir of a key (checkpoints), removed on success
//! logs/KEY.log       stage logs (all attempts)
//! locks/KEY.lock     per-key lock files
//! describe/HASH.json a custom worker's `describe --json`, by binary hash
//! responses/         teacher response cache (gc keeps it unless --responses)
//! roots/locks/ID.json a registered lock file of a project using this store
//! statcache.json     stat cache
//! ```
use std::path::{Path, PathBuf};

pub mod hash;
pub mod key;
pub mod locks;
pub mod roots;
pub mod statcache;
pub mod store;

pub use key::StageKeyInputs;
pub use statcache::StatCache;
pub use store::{RunRecord, Store};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt object {id}: content hashes to {actual}")]
    Corrupt { id: String, actual: String },
    #[error("object {0} is not in the store")]
    Missing(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io { path: path.to_path_buf(), source }
}

/// The store directory for a project root: `RECFLOW_CACHE`, else `ROOT/cache`.
pub fn store_dir(root: &Path) -> PathBuf {
    match std::env::var_os("RECFLOW_CACHE") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            std::path::absolute(&p).unwrap_or(p)
        }
        _ => root.join("cache"),
    }
}
