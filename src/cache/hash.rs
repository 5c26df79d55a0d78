//! Content hashing: sha256 of files (memory-mapped windows for large ones;
//! `sha2` picks its SHA-NI code at run time when the CPU has it) and of
//! directories as sorted manifests.
//!
//! Content ids are strings: `sha256:HEX` for a file, `tree:HEX` for a
//! directory, HEX being the sha256 of its canonical manifest.
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Files at least this large are hashed from memory maps, smaller ones read.
const MMAP_MIN: u64 = 1 << 20;
/// Bytes mapped (and pre-faulted) at a time: bounds the address space a
/// huge file takes and keeps the pre-faulted window inside the page cache.
const MMAP_WINDOW: u64 = 64 << 20;

/// sha256 (hex) of a file's bytes.
///
/// Measured on the 2-core build machine (SHA-NI, see docs/engine.md): the
/// `sha2` SHA-NI path costs ~0.13 s of CPU per 200 MB, at or below
/// `openssl dgst -sha256`; a copy through a `read` buffer adds 10–20% system
/// time, and page faults of a lazily mapped file another ~10%, so large files
/// are hashed from pre-faulted (`MAP_POPULATE`) windows of the page cache.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let len = f.metadata()?.len();
    if len >= MMAP_MIN && hash_mapped(&f, len, &mut h).is_ok() {
        return Ok(hex::encode(h.finalize()));
    }
    // Not mappable (a pipe, procfs, …) or small: 1 MiB reads.
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Feeds `len` bytes of `f` to `h` window by window. An error leaves `h`
/// unusable; the caller starts over with reads.
fn hash_mapped(f: &std::fs::File, len: u64, h: &mut Sha256) -> std::io::Result<()> {
    let mut off = 0u64;
    while off < len {
        let n = MMAP_WINDOW.min(len - off) as usize;
        // SAFETY: a read-only map, dropped at the end of this iteration. A
        // file truncated by another process while we read would raise
        // SIGBUS; store objects are read-only and inputs are not expected to
        // change under a running stage (the stat cache re-stats them after
        // hashing and drops the entry when they did).
        let map = unsafe { memmap2::MmapOptions::new().offset(off).len(n).populate().map(f)? };
        h.update(&map[..]);
        off += n as u64;
    }
    Ok(())
}

/// One file of a directory manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// `/`-separated path relative to the directory.
    pub path: String,
    /// sha256 hex of the file.
    pub hash: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exec: bool,
}

/// A directory's content: its files sorted by path (empty dirs are not kept).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Manifest {
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Canonical bytes (sorted entries, compact JSON) whose sha256 names the tree.
    pub fn bytes(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.entries.sort();
        serde_json::to_vec(&m).unwrap_or_default()
    }

    pub fn id(&self) -> String {
        format!("tree:{}", sha256_hex(&self.bytes()))
    }
}

/// Files under `dir` (recursively, following no symlinked dirs), sorted.
pub fn walk_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, d)) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            let ft = e.file_type()?;
            // Symlinked directories (e.g. model folders assembled from a
            // download cache) count as the directories they point to.
            let is_dir = ft.is_dir() || (ft.is_symlink() && std::fs::metadata(e.path()).map(|m| m.is_dir()).unwrap_or(false));
            if is_dir {
                stack.push((rel, e.path()));
            } else {
                out.push((rel, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Kind of a content id.
pub fn is_tree(id: &str) -> bool {
    id.starts_with("tree:")
}

/// The hex part of a content id.
pub fn hex_of(id: &str) -> &str {
    id.split_once(':').map(|x| x.1).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hash_matches_known_vector() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            hash_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256(\"abc\") from FIPS 180-2"
        );
    }

    #[test]
    fn mapped_windows_hash_like_one_read() {
        // Larger than MMAP_MIN and not a multiple of the window, so the
        // windowed path and its last partial window are exercised.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big");
        let bytes: Vec<u8> = (0..(MMAP_WINDOW + 12_345) as usize).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(hash_file(&p).unwrap(), sha256_hex(&bytes), "windowed mmap hashing equals hashing the bytes at once");
    }

    #[test]
    fn walk_follows_symlinked_dirs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("real")).unwrap();
        std::fs::write(d.path().join("real/w.bin"), b"w").unwrap();
        std::fs::create_dir_all(d.path().join("model")).unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("model/sub")).unwrap();
        let files: Vec<String> = walk_files(&d.path().join("model")).unwrap().into_iter().map(|x| x.0).collect();
        assert_eq!(files, vec!["sub/w.bin".to_string()], "a symlinked directory is walked like a directory");
    }

    #[test]
    fn manifest_id_ignores_entry_order() {
        let e = |p: &str| Entry { path: p.into(), hash: "00".into(), size: 1, exec: false };
        let a = Manifest { entries: vec![e("a"), e("b")] };
        let b = Manifest { entries: vec![e("b"), e("a")] };
        assert_eq!(a.id(), b.id(), "a directory's id is order-independent");
    }
}
