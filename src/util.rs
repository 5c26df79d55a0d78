//! Small process and file helpers shared by the runner and the workers.
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Writes `bytes` to `path` atomically: temp file in the same dir, fsync,
/// rename, fsync of the directory. Readers see the old or the new content,
/// never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Asks the kernel to SIGKILL this process when its parent dies, so a stage
/// never outlives the runner that owns its lock (Linux `PR_SET_PDEATHSIG`).
pub fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_PDEATHSIG takes an integer signal number and
    // touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
        // The parent may have died before the prctl: then we were re-parented.
        if libc::getppid() == 1 {
            libc::_exit(137);
        }
    }
}

static CANCEL: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    if let Some(c) = CANCEL.get() {
        c.store(true, Ordering::SeqCst);
    }
}

/// SIGINT and SIGTERM set `cancel` (once per process); stages poll it and
/// stop at a safe point, keeping their work dir.
pub fn set_cancel_on_signals(cancel: Arc<AtomicBool>) {
    if CANCEL.set(cancel).is_err() {
        return;
    }
    // SAFETY: installs a handler that only performs an atomic store.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// A Hugging Face `tokenizer.json`, given as the file or as a model
/// directory holding it (`${base.model}` in a pipeline).
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, String> {
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    tokenizers::Tokenizer::from_file(&file).map_err(|e| format!("tokenizer {}: {e}", file.display()))
}

/// MovieLens-100K in RecBole's atomic files (`ml-100k.inter`, `.item`,
/// `.user`), which `scripts/setup.sh` extracts from PyPI's `recbole==1.2.1`
/// into `datasets/ml-100k/` (git-ignored): `RECFLOW_ML100K_DIR`, else that
/// folder of the project. Unlike the shared samples, the set-up provides
/// it, so callers treat its absence as an error, not a skip.
pub fn ml100k_dir() -> std::path::PathBuf {
    match std::env::var_os("RECFLOW_ML100K_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/ml-100k"),
    }
}

/// Folder of the shared real-data samples: `RECFLOW_DATA_DIR`, else
/// `../shared/data` relative to the project root. `None` (with a notice on
/// stderr) when it does not exist.
pub fn shared_data_dir() -> Option<std::path::PathBuf> {
    let dir = match std::env::var_os("RECFLOW_DATA_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    };
    if dir.is_dir() {
        Some(dir)
    } else if std::env::var_os("RECFLOW_REQUIRE_DATA").is_some() {
        // CI sets this: a missing data folder must fail, not skip.
        panic!("shared review samples not found at {} and RECFLOW_REQUIRE_DATA is set", dir.display());
    } else {
        eprintln!(
            "notice: shared review samples not found at {} (set RECFLOW_DATA_DIR); tests that need them are skipped",
            dir.display()
        );
        None
    }
}
