//! `recflow gc` and `recflow cache verify`.
//!
//! gc keeps (ARCHITECTURE "Store lifetime"): what the lock files of the
//! project's pipelines reference, run records newer than `--keep-days`, keys
//! locked by live runs, work dirs of failed attempts newer than
//! `--keep-days` (they hold checkpoints), and the teacher response cache
//! (`responses/`, removed only with `--responses`). The rest goes.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::RunError;
use crate::cache::hash::{self, hash_file};
use crate::cache::locks::FileLock;
use crate::cache::store::remove_any;
use crate::cache::Store;
use crate::lock::LockFile;

#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub records_removed: usize,
    pub objects_removed: usize,
    pub work_dirs_removed: usize,
    pub bytes_freed: u64,
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
    for lf in project_locks(root) {
        if let Ok(l) = LockFile::read(&lf) {
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
