//! Per-key file locks with `flock(2)`.
//!
//! The kernel releases a flock when the last descriptor of its open file
//! goes away, i.e. when the holder dies — a dead holder's lock is recovered
//! by construction, and a live holder is never displaced. The runner hands
//! the descriptor to the stage's supervisor too, so the lock stays held
//! until the stage's whole process group is gone (no two live writers).
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A held exclusive lock; released on drop.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    pub path: PathBuf,
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)
}

impl FileLock {
    /// Blocks until the lock is ours.
    pub fn exclusive(path: &Path) -> std::io::Result<Self> {
        let file = open(path)?;
        flock(&file, libc::LOCK_EX)?;
        Ok(FileLock { file, path: path.to_path_buf() })
    }

    /// Waits until the lock is ours, or `Ok(None)` once `stop()` says so:
    /// a blocking `flock` cannot be interrupted, and a run told to stop
    /// (Ctrl-C, SIGTERM) while another run holds the lock must still end.
    /// Polls every 100 ms.
    pub fn exclusive_unless(path: &Path, stop: impl Fn() -> bool) -> std::io::Result<Option<Self>> {
        loop {
            if let Some(l) = Self::try_exclusive(path)? {
                return Ok(Some(l));
            }
            if stop() {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// `Ok(None)` when a live process holds it.
    pub fn try_exclusive(path: &Path) -> std::io::Result<Option<Self>> {
        let file = open(path)?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { file, path: path.to_path_buf() })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the holder's pid into the lock file (shown to waiting runs).
    pub fn note_holder(&mut self) {
        let _ = self.file.set_len(0);
        let _ = writeln!(self.file, "{}", std::process::id());
    }

    /// The pid last noted in a lock file.
    pub fn holder_of(path: &Path) -> Option<u32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_release() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.lock");
        let a = FileLock::exclusive(&p).unwrap();
        assert!(FileLock::try_exclusive(&p).unwrap().is_none(), "a live holder is never displaced");
        drop(a);
        assert!(FileLock::try_exclusive(&p).unwrap().is_some(), "released lock is free again");
    }
}
