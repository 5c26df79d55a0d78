//! Committing a stage to the store, and reusing what was committed: a
//! finished stage's outputs become objects (`put`), its `out/KEY` view and
//! run record are written, its work dir goes, and then the lock file and the
//! `runs/` view name it; a later run with the same key reuses that record
//! after checking every object.
//!
//! Why apart from [`super::launch`]: this is the only half that writes to
//! the store or the lock, and the order of its steps is the crash-safety
//! argument (objects before the record, the record before the work dir is
//! removed and the key lock released, the lock file last), so it reads in
//! one place, as DVC keeps `stage/cache.py` apart from `stage/run.py`.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

use super::engine::{Done, Engine};
use super::launch::Launched;
use super::{sources, Avail, RunError};
use crate::cache::key::StageKeyInputs;
use crate::cache::locks::FileLock;
use crate::cache::store::{remove_any, OutputRecord, RunRecord, RECORD_SCHEMA};
use crate::lock::{lock_path, metrics_summary, LockFile, LockStage};
use crate::pipeline::resolved::{Action, ResolvedStage};

/// What one execution of a stage produced: output records, metrics, and the
/// numerics profile its worker reported.
pub(crate) type Executed = (BTreeMap<String, OutputRecord>, Value, Option<crate::numerics::Profile>);

/// Paths at which a stage's recorded outputs can be read.
pub(super) fn avail_of(eng: &Engine, stage: &ResolvedStage, key: &str, outs: &BTreeMap<String, OutputRecord>) -> BTreeMap<String, Avail> {
    outs.iter()
        .map(|(n, o)| {
            let path = match &stage.action {
                Action::Builtin { .. } => eng.store.out_dir(key).join(&o.path),
                Action::Shell { .. } => eng.p.dir.join(&o.path),
            };
            (n.clone(), Avail { id: o.id.clone(), path })
        })
        .collect()
}

/// Reuses a record when every output is present and intact; repairs the
/// views (out/KEY, shell outputs in the workspace). A corrupt object is a
/// warning and a miss, never used (DVC's lesson).
pub(crate) fn try_reuse(eng: &Engine, stage: &ResolvedStage, key: &str) -> Option<Done> {
    let rec = eng.store.read_record(key)?;
    let mut sc = eng.sc();
    let names: BTreeSet<String> = stage.output_names().into_iter().collect();
    if rec.outputs.keys().cloned().collect::<BTreeSet<_>>() != names {
        return None;
    }
    for (name, o) in &rec.outputs {
        let workspace = match &stage.action {
            Action::Shell { .. } => Some(eng.p.dir.join(&o.path)),
            Action::Builtin { .. } => None,
        };
        // Fast path: the workspace copy is unchanged (stat cache) and the object is there.
        if let Some(w) = &workspace {
            if sc.content_id(w).map(|x| x.0).ok().as_deref() == Some(o.id.as_str()) && eng.store.check(&mut sc, &o.id).is_ok() {
                continue;
            }
        }
        match eng.store.check(&mut sc, &o.id) {
            Ok(()) => {}
            Err(e) => {
                eng.note(&format!("warning: stage `{}`: output `{name}`: {e}; the stage will run again", stage.name));
                if let crate::cache::CacheError::Corrupt { id, .. } = &e {
                    eng.store.evict_object(id);
                }
                eng.store.drop_key(key);
                return None;
            }
        }
        if let Some(w) = &workspace {
            if eng.store.materialize(&o.id, w).is_err() {
                return None;
            }
            if let Ok((id, _)) = sc.content_id(w) {
                if id != o.id {
                    return None;
                }
            }
        }
    }
    drop(sc);
    if matches!(stage.action, Action::Builtin { .. }) {
        let od = eng.store.out_dir(key);
        // A view damaged by hand is rebuilt from the (checked) objects.
        let intact = rec.outputs.values().all(|o| od.join(&o.path).exists());
        if !intact {
            remove_any(&od);
        }
        eng.store.materialize_outputs(key, &rec.outputs).ok()?;
    }
    let avail = avail_of(eng, stage, key, &rec.outputs);
    Some(Done {
        key: key.to_string(),
        ki: rec.key_inputs,
        outputs: rec.outputs,
        avail,
        metrics: rec.metrics,
        ran: false,
        numerics: rec.numerics,
    })
}

/// Ingests a launched stage's outputs into `eng.store`: a built-in stage's
/// scratch dir (its metrics read, its files put, the dir itself becoming
/// out/KEY), a shell stage's declared workspace outputs (moved into the
/// store, copied under verify). Returns their records and the metrics.
pub(crate) fn ingest(eng: &Engine, stage: &ResolvedStage, key: &str, launched: Launched) -> Result<Executed, String> {
    let store = &eng.store;
    let scratch_out = launched.scratch_out;
    let mut outs = BTreeMap::new();
    let mut metrics = Value::Object(Default::default());
    let mut sc = eng.sc();
    match &stage.action {
        Action::Builtin { outputs, .. } => {
            let mpath = scratch_out.join(crate::worker::METRICS_FILE);
            if let Ok(b) = std::fs::read(&mpath) {
                metrics = serde_json::from_slice(&b).unwrap_or(metrics);
            }
            if !outputs.iter().any(|o| o.file_name() == crate::worker::METRICS_FILE) {
                let _ = std::fs::remove_file(&mpath);
            }
            for o in outputs {
                let p = scratch_out.join(o.file_name());
                if !p.exists() {
                    return Err(format!("finished without writing output `{}`", o.name));
                }
                let id = store.put(&mut sc, &p, true).map_err(|e| e.to_string())?;
                outs.insert(o.name.clone(), OutputRecord { id, path: o.file_name() });
            }
            // The scratch dir now holds links to the objects: it becomes out/KEY.
            let od = store.out_dir(key);
            remove_any(&od);
            if let Some(d) = od.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            if std::fs::rename(&scratch_out, &od).is_err() {
                remove_any(&scratch_out);
                store.materialize_outputs(key, &outs).map_err(|e| e.to_string())?;
            }
        }
        Action::Shell { outs: souts, .. } => {
            for o in souts {
                if !o.abs.exists() {
                    return Err(format!("finished without writing output `{}` ({})", o.name, o.rel));
                }
                let id = store.put(&mut sc, &o.abs, !eng.scratch).map_err(|e| e.to_string())?;
                outs.insert(o.name.clone(), OutputRecord { id, path: o.rel.clone() });
            }
        }
    }
    // The process's CPU time and peak memory (run record only: both are
    // timing keys, kept out of the lock); a stage's own peak measure wins.
    if let (Some(m), Some(Value::Object(ru))) = (metrics.as_object_mut(), launched.rusage) {
        for (k, v) in ru {
            m.entry(k).or_insert(v);
        }
    }
    Ok((outs, metrics, launched.numerics))
}

/// When and how long a stage ran, for its run record.
pub(crate) struct Timing {
    /// Unix seconds at the start.
    pub started: u64,
    pub wall_s: f64,
}

/// Writes the run record of an executed stage, then removes its work dir
/// and releases the key lock (in that order: a crash before the record
/// leaves the work dir for resume; a waiting run sees the record once the
/// lock is free).
pub(crate) fn record(
    eng: &Engine,
    stage: &ResolvedStage,
    key: String,
    ki: StageKeyInputs,
    executed: Executed,
    timing: Timing,
    lock: FileLock,
) -> Result<Done, String> {
    let (outputs, metrics, numerics) = executed;
    let rec = RunRecord {
        schema: RECORD_SCHEMA,
        key: key.clone(),
        pipeline: eng.p.name.clone(),
        stage: stage.name.clone(),
        key_inputs: ki.clone(),
        outputs: outputs.clone(),
        metrics: metrics.clone(),
        started: timing.started,
        wall_s: timing.wall_s,
        numerics: numerics.clone(),
    };
    eng.store.write_record(&rec).map_err(|e| e.to_string())?;
    // Committed: the work dir (checkpoints of this key) is no longer needed.
    remove_any(&eng.store.work_dir(&key));
    drop(lock);
    let avail = avail_of(eng, stage, &key, &outputs);
    Ok(Done { key, ki, outputs, avail, metrics, ran: true, numerics })
}

/// Records a finished stage in the lock file and the `runs/` view.
pub(super) fn commit_lock(eng: &Engine, stage: &ResolvedStage, d: &Done) -> Result<(), RunError> {
    if matches!(stage.action, Action::Builtin { .. }) {
        runs_view(eng, stage, d);
    }
    if !eng.write_lock {
        return Ok(());
    }
    let entry = LockStage {
        key: d.key.clone(),
        key_inputs: d.ki.clone(),
        sources: sources(stage, &eng.p.root, &eng.p.dir),
        outputs: d.outputs.clone(),
        metrics: metrics_summary(&d.metrics),
        numerics: d.numerics.clone(),
    };
    let (name, params) = (eng.p.name.clone(), crate::lock::spell_params(&eng.p.params, &eng.p.root, &eng.p.dir));
    LockFile::update(&lock_path(&eng.p.file), &eng.store.dir, |l| {
        l.pipeline = name;
        l.params = params;
        l.stages.insert(stage.name.clone(), entry);
        // Entries written before the summary dropped timings lose them on
        // the next write (idempotent for current ones).
        for st in l.stages.values_mut() {
            st.metrics = metrics_summary(&st.metrics);
        }
    })?;
    Ok(())
}

/// runs/<pipeline>/<stage> → cache/out/KEY (read-only files; replacing the
/// link is atomic). Best effort: the view is a convenience, the lock is the record.
fn runs_view(eng: &Engine, stage: &ResolvedStage, d: &Done) {
    let view: PathBuf = eng.p.root.join("runs").join(&eng.p.name).join(&stage.name);
    if let Some(parent) = view.parent() {
        let _ = std::fs::create_dir_all(parent);
        let tmp = parent.join(format!(".{}.tmp{}", stage.name, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        if std::os::unix::fs::symlink(eng.store.out_dir(&d.key), &tmp).is_ok() {
            if std::fs::symlink_metadata(&view).map(|m| m.is_dir()).unwrap_or(false) {
                remove_any(&view);
            }
            let _ = std::fs::rename(&tmp, &view);
        }
    }
}
