//! `recflow gc` and `recflow cache verify`.
//!
//! gc keeps (ARCHITECTURE "Store lifetime") every root registered in the
//! store: what the lock files of *every* project using it reference (each
//! run registers its lock, [`crate::cache::roots`]; the lock files under the
//! project gc runs from count too), run records newer than `--keep-days`,
//! keys locked by live runs, work dirs of failed attempts newer than
//! `--keep-days` (they hold checkpoints), and the teacher response cache
//! (`responses/`, removed only with `--responses`). The rest goes. A
//! registered lock file that no longer exists is a stale root and is
//! dropped. Local gc never touches the remote; `gc --remote`
//! ([`gc_remote`]) is the remote's own, explicit gc, by the same rules over
//! the roots pushed there.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::RunError;
use crate::cache::hash::{self, hash_file};
use crate::cache::locks::FileLock;
use crate::cache::store::remove_any;
use crate::cache::Store;
use crate::lock::LockFile;
use object_store::ObjectStoreExt;

#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub records_removed: usize,
    pub objects_removed: usize,
    pub work_dirs_removed: usize,
    pub bytes_freed: u64,
    /// Lock files kept as roots (this project's and registered ones).
    pub roots: usize,
    /// Registered roots whose lock file is gone (dropped).
    pub stale_roots: usize,
}

/// Lock files under the project root (skipping the store, build and VCS dirs).
pub fn project_locks(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                if depth < 4 && !name.starts_with('.') && !["cache", "target", "runs", "node_modules"].contains(&name.as_str()) {
                    stack.push((p, depth + 1));
                }
            } else if name.ends_with(".lock") && name != "Cargo.lock" {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn older_than(p: &Path, keep: Duration) -> bool {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() > keep)
        .unwrap_or(true)
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Removes what nothing keeps.
pub fn gc(root: &Path, store: &Store, keep_days: f64, responses: bool, dry: bool) -> Result<GcReport, RunError> {
    let keep = Duration::from_secs_f64(keep_days.max(0.0) * 86400.0);
    let mut rep = GcReport::default();
    // Keys kept: referenced by lock files, recent, or locked by a live run.
    let mut keys: BTreeSet<String> = BTreeSet::new();
    let mut ids: BTreeSet<String> = BTreeSet::new();
    let mut locks: BTreeSet<PathBuf> = project_locks(root).into_iter().collect();
    for (entry, lock) in crate::cache::roots::registered_locks(&store.dir) {
        if lock.is_file() {
            locks.insert(lock);
        } else {
            rep.stale_roots += 1;
            if !dry {
                let _ = std::fs::remove_file(entry);
            }
        }
    }
    rep.roots = locks.len();
    for lf in &locks {
        if let Ok(l) = LockFile::read(lf) {
            for st in l.stages.values() {
                keys.insert(st.key.clone());
                ids.extend(st.outputs.values().map(|o| o.id.clone()));
            }
        }
    }
    let live = |key: &str| -> bool {
        let lp = store.lock_path(key);
        lp.exists() && matches!(FileLock::try_exclusive(&lp), Ok(None))
    };
    for key in store.all_records() {
        let rp = store.record_path(&key);
        if keys.contains(&key) || !older_than(&rp, keep) || live(&key) {
            keys.insert(key.clone());
            if let Some(r) = store.read_record(&key) {
                ids.extend(r.outputs.values().map(|o| o.id.clone()));
            }
            continue;
        }
        rep.records_removed += 1;
        if !dry {
            let _ = std::fs::remove_file(&rp);
            remove_any(&store.out_dir(&key));
            let _ = std::fs::remove_file(store.log_path(&key));
        }
    }
    // Objects reachable from kept outputs (trees: the manifest and its files).
    let mut reachable: BTreeSet<String> = BTreeSet::new();
    for id in &ids {
        reachable.insert(hash::hex_of(id).to_string());
        if hash::is_tree(id) {
            if let Ok(m) = store.manifest(id) {
                reachable.extend(m.entries.into_iter().map(|e| e.hash));
            }
        }
    }
    for hex in store.all_objects() {
        if reachable.contains(&hex) {
            continue;
        }
        let p = store.object_path(&hex);
        rep.objects_removed += 1;
        rep.bytes_freed += size_of(&p);
        if !dry {
            let _ = std::fs::remove_file(&p);
        }
    }
    // Work dirs of failed attempts: kept while recent or locked.
    if let Ok(rd) = std::fs::read_dir(store.dir.join("work")) {
        for e in rd.flatten() {
            let key = e.file_name().to_string_lossy().into_owned();
            if !older_than(&e.path(), keep) || live(&key) {
                continue;
            }
            rep.work_dirs_removed += 1;
            if !dry {
                remove_any(&e.path());
            }
        }
    }
    // Materialised outputs of removed keys, stale temp files.
    if !dry {
        if let Ok(rd) = std::fs::read_dir(store.dir.join("out")) {
            for e in rd.flatten() {
                if !keys.contains(&e.file_name().to_string_lossy().into_owned()) {
                    remove_any(&e.path());
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(store.tmp_dir()) {
            for e in rd.flatten() {
                if older_than(&e.path(), Duration::from_secs(86400)) {
                    remove_any(&e.path());
                }
            }
        }
        if responses {
            remove_any(&store.dir.join("responses"));
        }
    }
    Ok(rep)
}

/// What `gc --remote` found and (unless dry) removed.
#[derive(Debug, Default, Clone)]
pub struct RemoteGcReport {
    /// Lock files pushed to the remote (its roots).
    pub roots: usize,
    /// Keys held by a live lease.
    pub leased: usize,
    pub records_removed: usize,
    pub objects_removed: usize,
    pub work_removed: usize,
    pub leases_removed: usize,
    pub bytes_freed: u64,
}

/// `gc --remote`: the remote's own gc, explicit and never implied by a local
/// one. Keeps the keys of every lock pushed as a root (`roots/locks/`), keys
/// under a live lease, run records and work dir pointers newer than
/// `keep_days`, and the objects they reach; an unreferenced object is
/// removed only once it is older than `keep_days` too, since a push in
/// flight uploads objects before its record. The rest goes.
pub fn gc_remote(remote: &crate::remote::Remote, keep_days: f64, dry: bool) -> Result<RemoteGcReport, RunError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(remote.gc(keep_days, dry)).map_err(RunError::Remote)
}

impl crate::remote::Remote {
    async fn gc(&self, keep_days: f64, dry: bool) -> Result<RemoteGcReport, crate::remote::RemoteError> {
        self.check().await?;
        let keep_ms = (keep_days.max(0.0) * 86_400_000.0) as i64;
        let now_ms = crate::remote::now_ms() as i64;
        let young = |m: &object_store::ObjectMeta| now_ms - m.last_modified.timestamp_millis() < keep_ms;
        let stem = |m: &object_store::ObjectMeta, ext: &str| -> Option<String> {
            m.location.filename().and_then(|f| f.strip_suffix(ext)).map(str::to_string)
        };
        let mut rep = RemoteGcReport::default();
        let mut keys: BTreeSet<String> = BTreeSet::new();
        let mut ids: BTreeSet<String> = BTreeSet::new();
        // Roots: pushed lock files.
        for m in self.list("roots/locks").await? {
            let Some((b, _)) = self.get_small(&m.location, "reading a root").await? else { continue };
            let Ok(l) = serde_json::from_slice::<LockFile>(&b) else { continue };
            rep.roots += 1;
            for st in l.stages.values() {
                keys.insert(st.key.clone());
                ids.extend(st.outputs.values().map(|o| o.id.clone()));
            }
        }
        // Live leases keep their keys; dead ones go (once old).
        let mut dead_leases = Vec::new();
        for m in self.list("leases").await? {
            let Some(key) = stem(&m, ".json") else { continue };
            let body = self.get_small(&m.location, "reading a lease").await?.and_then(|(b, _)| serde_json::from_slice::<crate::remote::lease::LeaseBody>(&b).ok());
            let live = body.is_some_and(|b| !b.released && b.expires_unix_ms.saturating_add(b.ttl_ms) as i64 > now_ms);
            if live {
                rep.leased += 1;
                keys.insert(key);
            } else if !young(&m) {
                dead_leases.push(m.location.clone());
            }
        }
        // Records: kept when rooted, leased or young; their outputs kept.
        let mut drop: Vec<object_store::path::Path> = Vec::new();
        for m in self.list("records").await? {
            let Some(key) = stem(&m, ".json") else { continue };
            if keys.contains(&key) || young(&m) {
                if let Some(Ok(r)) = self.read_record(&key).await? {
                    ids.extend(r.outputs.values().map(|o| o.id.clone()));
                }
                continue;
            }
            rep.records_removed += 1;
            drop.push(m.location.clone());
        }
        // Work dir pointers: kept when leased or young; their trees kept.
        for m in self.list("work").await? {
            let Some(key) = stem(&m, ".json") else { continue };
            if keys.contains(&key) || young(&m) {
                if let Some((b, _)) = self.get_small(&m.location, "reading a work dir pointer").await? {
                    if let Some(t) = serde_json::from_slice::<serde_json::Value>(&b).ok().and_then(|v| v.get("tree").and_then(|t| t.as_str()).map(str::to_string)) {
                        ids.insert(t);
                    }
                }
                continue;
            }
            rep.work_removed += 1;
            drop.push(m.location.clone());
        }
        // Objects reachable from what is kept (trees: manifest and files).
        let mut reachable: BTreeSet<String> = BTreeSet::new();
        for id in &ids {
            let hex = hash::hex_of(id).to_string();
            if hash::is_tree(id) {
                if let Some((b, _)) = self.get_small(&self.object_loc(&hex), "reading a manifest").await? {
                    if let Ok(m) = serde_json::from_slice::<hash::Manifest>(&b) {
                        reachable.extend(m.entries.into_iter().map(|e| e.hash));
                    }
                }
            }
            reachable.insert(hex);
        }
        for m in self.list("objects").await? {
            let Some(hex) = m.location.filename().map(str::to_string) else { continue };
            if reachable.contains(&hex) || young(&m) {
                continue;
            }
            rep.objects_removed += 1;
            rep.bytes_freed += m.size;
            drop.push(m.location.clone());
        }
        rep.leases_removed = dead_leases.len();
        if !dry {
            // Records and pointers first, then objects: a reader never finds
            // a record whose objects are already gone.
            let objects: Vec<object_store::path::Path> = drop.iter().filter(|p| self.rel(p).is_some_and(|r| r.starts_with("objects/"))).cloned().collect();
            let first: Vec<object_store::path::Path> = drop.into_iter().filter(|p| !objects.contains(p)).collect();
            self.delete_all(first).await?;
            self.delete_all(objects.into_iter().chain(dead_leases).collect()).await?;
        }
        Ok(rep)
    }

    /// Deletes every path, `jobs` at a time (an absent one is no error).
    async fn delete_all(&self, paths: Vec<object_store::path::Path>) -> Result<(), crate::remote::RemoteError> {
        use futures::StreamExt;
        let store = self.store().clone();
        let results: Vec<Result<(), object_store::Error>> = futures::stream::iter(paths)
            .map(|p| {
                let store = store.clone();
                async move {
                    match store.delete(&p).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
            })
            .buffer_unordered(self.spec().jobs)
            .collect()
            .await;
        match results.into_iter().find_map(|r| r.err()) {
            Some(e) => Err(self.classify(e, "removing an object")),
            None => Ok(()),
        }
    }
}

/// `cache verify`: rehashes every object; corrupt ones are removed together
/// with the records that use them (those stages rerun). Returns the corrupt ids.
pub fn cache_verify(store: &Store) -> Result<Vec<String>, RunError> {
    let mut bad = Vec::new();
    for hex in store.all_objects() {
        let p = store.object_path(&hex);
        match hash_file(&p) {
            Ok(h) if h == hex => {}
            _ => bad.push(hex),
        }
    }
    if bad.is_empty() {
        return Ok(bad);
    }
    let badset: BTreeSet<&String> = bad.iter().collect();
    for key in store.all_records() {
        let Some(r) = store.read_record(&key) else { continue };
        let uses_bad = r.outputs.values().any(|o| {
            let hex = hash::hex_of(&o.id).to_string();
            badset.contains(&hex)
                || (hash::is_tree(&o.id)
                    && store.manifest(&o.id).map(|m| m.entries.iter().any(|e| badset.contains(&e.hash))).unwrap_or(true))
        });
        if uses_bad {
            store.drop_key(&key);
        }
    }
    for hex in &bad {
        store.evict_object(hex);
    }
    Ok(bad)
}
