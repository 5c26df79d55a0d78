//! The content-addressed store: objects, run records, materialised outputs.
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hash::{self, Manifest};
use super::key::StageKeyInputs;
use super::statcache::StatCache;
use super::{io_err, CacheError};

/// Version of the run record format.
pub const RECORD_SCHEMA: u32 = 1;

/// One output of a run: its content id and where it lives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputRecord {
    /// `sha256:…` or `tree:…`.
    pub id: String,
    /// File name inside `out/KEY/` (built-in) or the path relative to the pipeline dir (shell).
    pub path: String,
}

/// What a completed stage produced. Timings live here, never in outputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub schema: u32,
    pub key: String,
    pub pipeline: String,
    pub stage: String,
    pub key_inputs: StageKeyInputs,
    pub outputs: BTreeMap<String, OutputRecord>,
    pub metrics: Value,
    /// Unix seconds at start.
    pub started: u64,
    pub wall_s: f64,
    /// The numerics profile the worker had in force (None: a shell stage,
    /// or a record written before profiles were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics: Option<crate::numerics::Profile>,
}

#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
}

fn set_readonly(p: &Path) -> std::io::Result<()> {
    let md = std::fs::metadata(p)?;
    let mode = md.permissions().mode();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & !0o222))
}

fn fsync_dir(d: &Path) {
    if let Ok(f) = std::fs::File::open(d) {
        let _ = f.sync_all();
    }
}

/// Hard link, else copy (another file system).
fn link_or_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)?;
    Ok(())
}

impl Store {
    pub fn open(dir: &Path) -> Self {
        Store { dir: dir.to_path_buf() }
    }

    pub fn object_path(&self, hex: &str) -> PathBuf {
        let a = hex.get(..2).unwrap_or("00");
        self.dir.join("objects").join(a).join(hex)
    }
    pub fn record_path(&self, key: &str) -> PathBuf {
        self.dir.join("records").join(format!("{key}.json"))
    }
    pub fn out_dir(&self, key: &str) -> PathBuf {
        self.dir.join("out").join(key)
    }
    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.dir.join("work").join(key)
    }
    pub fn log_path(&self, key: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{key}.log"))
    }
    pub fn lock_path(&self, key: &str) -> PathBuf {
        self.dir.join("locks").join(format!("{key}.lock"))
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn tmp_name(&self, tag: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tmp_dir().join(format!("{tag}.{}.{n}", std::process::id()))
    }

    /// A fresh path in the store's tmp dir (created), for a file that will
    /// become an object ([`Store::adopt_object`]) or be removed.
    pub fn tmp_path(&self, tag: &str) -> Result<PathBuf, CacheError> {
        std::fs::create_dir_all(self.tmp_dir()).map_err(io_err(&self.tmp_dir()))?;
        Ok(self.tmp_name(tag))
    }

    /// Makes a complete file in the tmp dir the object `hex`: fsync,
    /// read-only, rename into place (replacing a corrupt one), fsync of the
    /// directory. The caller has checked that its bytes hash to `hex`.
    pub fn adopt_object(&self, hex: &str, tmp: &Path) -> Result<PathBuf, CacheError> {
        let obj = self.object_path(hex);
        let parent = obj.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(io_err(tmp))?;
        set_readonly(tmp).map_err(io_err(tmp))?;
        std::fs::rename(tmp, &obj).map_err(io_err(&obj))?;
        fsync_dir(&parent);
        Ok(obj)
    }

    /// Puts one file into the objects. `consume`: the source may be moved
    /// (rename on the same file system) and is then replaced by a hard link
    /// to the read-only object, so the path still shows the content.
    fn put_file(&self, sc: &mut StatCache, src: &Path, consume: bool) -> Result<String, CacheError> {
        let hex = sc.hash_file(src).map_err(io_err(src))?;
        let obj = self.object_path(&hex);
        let healthy = obj.exists() && sc.hash_file(&obj).map(|h| h == hex).unwrap_or(false);
        if !healthy {
            let tmp = self.tmp_path("obj")?;
            let moved = consume && std::fs::rename(src, &tmp).is_ok();
            if !moved {
                std::fs::copy(src, &tmp).map_err(io_err(src))?;
            }
            // A corrupt old object is replaced (rename over it).
            self.adopt_object(&hex, &tmp)?;
            sc.record(&obj, &hex);
            if moved {
                link_or_copy(&obj, src).map_err(io_err(src))?;
                sc.record(src, &hex);
            }
        }
        Ok(hex)
    }

    /// Puts a file or directory into the store; returns its content id.
    pub fn put(&self, sc: &mut StatCache, src: &Path, consume: bool) -> Result<String, CacheError> {
        let md = std::fs::metadata(src).map_err(io_err(src))?;
        if !md.is_dir() {
            return Ok(format!("sha256:{}", self.put_file(sc, src, consume)?));
        }
        let mut m = Manifest::default();
        for (rel, p) in hash::walk_files(src).map_err(io_err(src))? {
            let fmd = std::fs::metadata(&p).map_err(io_err(&p))?;
            let h = self.put_file(sc, &p, consume)?;
            m.entries.push(hash::Entry { path: rel, hash: h, size: fmd.len(), exec: fmd.permissions().mode() & 0o111 != 0 });
        }
        let bytes = m.bytes();
        let id = m.id();
        let hex = hash::hex_of(&id);
        if !self.object_path(hex).exists() {
            self.write_object_bytes(hex, &bytes)?;
        }
        Ok(id)
    }

    fn write_object_bytes(&self, hex: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let tmp = self.tmp_path("obj")?;
        std::fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes)).map_err(io_err(&tmp))?;
        self.adopt_object(hex, &tmp)?;
        Ok(())
    }

    /// The manifest of a tree id.
    pub fn manifest(&self, id: &str) -> Result<Manifest, CacheError> {
        let p = self.object_path(hash::hex_of(id));
        let b = std::fs::read(&p).map_err(|_| CacheError::Missing(id.to_string()))?;
        let m: Manifest = serde_json::from_slice(&b).map_err(|_| CacheError::Corrupt { id: id.into(), actual: "unparsable manifest".into() })?;
        if m.id() != id {
            return Err(CacheError::Corrupt { id: id.into(), actual: m.id() });
        }
        Ok(m)
    }

    /// Checks (through the stat cache) that an object and, for trees, all
    /// its files are present and intact. A corrupt object is never used.
    pub fn check(&self, sc: &mut StatCache, id: &str) -> Result<(), CacheError> {
        let files: Vec<String> = if hash::is_tree(id) {
            self.manifest(id)?.entries.into_iter().map(|e| e.hash).collect()
        } else {
            vec![hash::hex_of(id).to_string()]
        };
        for hex in files {
            let p = self.object_path(&hex);
            if !p.exists() {
                return Err(CacheError::Missing(hex));
            }
            let actual = sc.hash_file(&p).map_err(io_err(&p))?;
            if actual != hex {
                sc.forget(&p);
                return Err(CacheError::Corrupt { id: hex, actual });
            }
        }
        Ok(())
    }

    /// Removes a corrupt object so the next write replaces it.
    pub fn evict_object(&self, hex: &str) {
        let _ = std::fs::remove_file(self.object_path(hex));
    }

    /// Hard-links (or copies) an object to `dest`, replacing what is there.
    pub fn materialize(&self, id: &str, dest: &Path) -> Result<(), CacheError> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        remove_any(dest);
        if hash::is_tree(id) {
            let m = self.manifest(id)?;
            std::fs::create_dir_all(dest).map_err(io_err(dest))?;
            for e in &m.entries {
                let to = dest.join(&e.path);
                if let Some(p) = to.parent() {
                    std::fs::create_dir_all(p).map_err(io_err(p))?;
                }
                let from = self.object_path(&e.hash);
                link_or_copy(&from, &to).map_err(io_err(&from))?;
            }
        } else {
            let from = self.object_path(hash::hex_of(id));
            link_or_copy(&from, dest).map_err(io_err(&from))?;
        }
        Ok(())
    }

    /// Materialises every output of a key under `out/KEY/` (atomically: temp dir + rename).
    pub fn materialize_outputs(&self, key: &str, outs: &BTreeMap<String, OutputRecord>) -> Result<PathBuf, CacheError> {
        let dst = self.out_dir(key);
        if dst.is_dir() {
            return Ok(dst);
        }
        let tmp = self.tmp_name("out");
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        for o in outs.values() {
            self.materialize(&o.id, &tmp.join(&o.path))?;
        }
        let parent = dst.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        if std::fs::rename(&tmp, &dst).is_err() {
            // Another run materialised it first: same content.
            remove_any(&tmp);
        }
        Ok(dst)
    }

    pub fn read_record(&self, key: &str) -> Option<RunRecord> {
        let b = std::fs::read(self.record_path(key)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub fn write_record(&self, r: &RunRecord) -> Result<(), CacheError> {
        let p = self.record_path(&r.key);
        let v = super::key::sorted(&serde_json::to_value(r).unwrap_or(Value::Null));
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        crate::util::write_atomic(&p, text.as_bytes()).map_err(io_err(&p))
    }

    /// Forgets a key's record and its materialised outputs (corruption found).
    pub fn drop_key(&self, key: &str) {
        let _ = std::fs::remove_file(self.record_path(key));
        remove_any(&self.out_dir(key));
    }

    /// Every object hex in the store.
    pub fn all_objects(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("objects")) {
            for d in rd.flatten() {
                if let Ok(rd2) = std::fs::read_dir(d.path()) {
                    v.extend(rd2.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
                }
            }
        }
        v.sort();
        v
    }

    /// Every key with a run record.
    pub fn all_records(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join("records"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".json").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Removes a file, symlink or directory tree (read-only files included).
pub fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => {
            // Directories of materialised outputs may be read-only: open them up first.
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    remove_any(&e.path());
                }
            }
            let _ = std::fs::remove_dir(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_dir_then_materialize_roundtrips_and_objects_are_readonly() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("cache"));
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a.txt"), b"A").unwrap();
        std::fs::write(src.join("sub/b.txt"), b"B").unwrap();
        let mut sc = StatCache::ephemeral();
        let id = store.put(&mut sc, &src, false).unwrap();
        assert!(hash::is_tree(&id), "a directory becomes a tree id");
        let obj = store.object_path(&hash::sha256_hex(b"A"));
        assert!(std::fs::metadata(&obj).unwrap().permissions().readonly(), "objects are read-only once written");
        let dst = d.path().join("dst");
        store.materialize(&id, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("sub/b.txt")).unwrap(), b"B", "tree materialises its files");
        assert!(store.check(&mut sc, &id).is_ok(), "intact tree checks out");
    }
}
