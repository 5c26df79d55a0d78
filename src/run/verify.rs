//! `recflow verify`: re-executes stages into a scratch store and compares
//! their output hashes with the lock. Bytes are compared when the rerun's
//! numerics profile equals the one the lock recorded
//! ([`crate::numerics::Profile::differences`]); when it does not (or the lock
//! predates profiles), a byte difference is expected, so the stage's metrics
//! (and JSON outputs) are compared within a relative tolerance instead
//! ([`crate::numerics::TOLERANCE`], or `--tolerance`), and a note says that it
//! did and why. `--tolerance` also relaxes byte comparison under one profile.
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::commit::Executed;
use super::engine::Engine;
use super::exec::execute;
use super::{key_inputs, Avail, Available, KeyState, RunError};
use crate::cache::hash;
use crate::cache::locks::FileLock;
use crate::cache::store::remove_any;
use crate::cache::Store;
use crate::lock::{lock_path, metrics_summary, LockFile, LockStage};
use crate::numerics::{is_operational_metric, Profile, TOLERANCE};
use crate::pipeline::resolved::Action;
use crate::pipeline::Pipeline;

/// One differing output.
#[derive(Debug, Clone)]
pub struct Difference {
    pub stage: String,
    pub output: String,
    pub locked: String,
    pub got: String,
}

/// What `verify` found: differences (exit 1) and notes on how it compared.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    pub diffs: Vec<Difference>,
    pub notes: Vec<String>,
}

/// Why bytes cannot be expected to match: the profiles differ, or the lock
/// has none. None = compare bytes (same profile, or a shell stage).
fn profile_gap(locked: Option<&Profile>, here: Option<&Profile>) -> Option<String> {
    let here = here?;
    match locked {
        None => Some(format!("the lock records no numerics profile (written before profiles were); here {}", here.summary())),
        Some(l) => {
            let d = l.differences(here);
            (!d.is_empty()).then(|| {
                format!("numerics profile differs from the lock's ({}): lock {}, here {}", d.join(", "), l.summary(), here.summary())
            })
        }
    }
}

/// The result-describing scalars of a metrics object (times, rates and
/// memory left out: [`crate::numerics::is_operational_metric`]).
fn result_metrics(m: &Value) -> BTreeMap<String, Value> {
    match metrics_summary(m) {
        Value::Object(o) => o.into_iter().filter(|(k, _)| !is_operational_metric(k)).collect(),
        _ => BTreeMap::new(),
    }
}

/// |a-b| ≤ tol·max(1, |a|, |b|) for every number, equal elsewhere.
pub fn json_close(a: &Value, b: &Value, tol: f64) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            (x - y).abs() <= tol * 1f64.max(x.abs()).max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_close(p, q, tol)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w, tol)))
        }
        _ => a == b,
    }
}

/// A stored object read as JSON, a top-level object without its time and
/// memory fields (inside a JSON output they are not results); None for a
/// tree or bytes that are not JSON.
fn json_object(st: &Store, id: &str) -> Option<Value> {
    if hash::is_tree(id) {
        return None;
    }
    let v: Value = serde_json::from_slice(&std::fs::read(st.object_path(hash::hex_of(id))).ok()?).ok()?;
    Some(match v {
        Value::Object(o) => Value::Object(o.into_iter().filter(|(k, _)| !is_operational_metric(k)).collect()),
        v => v,
    })
}

/// Compares one stage's rerun (its outputs in the `scratch` store) with its
/// lock `entry` (objects in the `real` store): bytes under the lock's
/// profile, JSON outputs and metrics within the tolerance under another.
/// Adds what differs, and a note saying how it compared, to `found`.
fn compare(real: &Store, scratch: &Store, stage: &str, entry: &LockStage, rerun: &Executed, tolerance: Option<f64>, found: &mut Verified) {
    let (outs, metrics, prof) = rerun;
    let gap = profile_gap(entry.numerics.as_ref(), prof.as_ref());
    // Under another profile: numbers within the declared tolerance.
    let tolerance = if gap.is_some() { Some(tolerance.unwrap_or(TOLERANCE)) } else { tolerance };
    let mut byte_diffs = Vec::new();
    for (name, o) in &entry.outputs {
        let got = outs.get(name).map(|x| x.id.clone()).unwrap_or_else(|| "(missing)".into());
        if got == o.id {
            continue;
        }
        byte_diffs.push(name.clone());
        if gap.is_some() && got != "(missing)" && json_object(real, &o.id).is_none() {
            // Not JSON (weights, Parquet): under another profile its
            // bytes are expected to differ; the metrics speak for it.
            continue;
        }
        // Tolerance: compare JSON numbers between the locked object (if here) and the new one.
        let close = tolerance.is_some_and(|tol| {
            match (json_object(real, &o.id), json_object(scratch, &got)) {
                (Some(x), Some(y)) => json_close(&x, &y, tol),
                _ => false,
            }
        });
        if !close {
            found.diffs.push(Difference { stage: stage.to_string(), output: name.clone(), locked: o.id.clone(), got });
        }
    }
    if let (Some(why), Some(tol)) = (&gap, tolerance) {
        if byte_diffs.is_empty() {
            found.notes.push(format!("{}: {why}; its outputs are byte-identical all the same", stage));
        } else {
            let (a, b) = (result_metrics(&entry.metrics), result_metrics(metrics));
            let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in names {
                let (x, y) = (a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null));
                if !json_close(x, y, tol) {
                    found.diffs.push(Difference {
                        stage: stage.to_string(),
                        output: format!("metrics.{k}"),
                        locked: x.to_string(),
                        got: y.to_string(),
                    });
                }
            }
            found.notes.push(format!(
                "{}: {why}; so its metrics (and JSON outputs) were compared within relative tolerance {tol} instead of bytes (outputs differing in bytes: {})",
                stage,
                byte_diffs.join(", ")
            ));
        }
    }
}

/// Verifies `stages` (all when empty). Returns the differences and notes.
pub fn verify(p: Pipeline, stages: &[String], tolerance: Option<f64>) -> Result<Verified, RunError> {
    let lock = LockFile::read(&lock_path(&p.file))?;
    let real = Store::open(&crate::cache::store_dir(&p.root));
    let chosen: Vec<String> = if stages.is_empty() {
        p.stages.iter().map(|s| s.name.clone()).collect()
    } else {
        let mut v = Vec::new();
        for s in stages {
            let m = p.select(s);
            if m.is_empty() {
                return Err(RunError::BadInput(format!("no stage `{s}` in {}", p.file.display())));
            }
            v.extend(m.into_iter().map(|x| x.name.clone()));
        }
        v
    };
    let scratch_dir = real.dir.join("tmp").join(format!("verify-{}", std::process::id()));
    let mut eng = Engine::new(p.clone(), Store::open(&scratch_dir), true);
    eng.scratch = true;
    eng.write_lock = false;
    eng.home = real.dir.clone();
    let eng = Arc::new(eng);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start the async runtime: {e}")))?;
    // Upstream outputs come from the real store, as recorded in the lock.
    let mut avail: Available = BTreeMap::new();
    let mut found = Verified::default();
    let mut sc = crate::cache::StatCache::load(&real.dir);
    for s in &p.stages {
        let Some(entry) = lock.stages.get(&s.name) else {
            if chosen.contains(&s.name) {
                return Err(RunError::Failed(format!("stage `{}` is not in the lock file: run the pipeline first", s.name)));
            }
            continue;
        };
        let a: BTreeMap<String, Avail> = entry
            .outputs
            .iter()
            .map(|(n, o)| {
                let path = match &s.action {
                    Action::Builtin { .. } => real.out_dir(&entry.key).join(&o.path),
                    Action::Shell { .. } => p.dir.join(&o.path),
                };
                (n.clone(), Avail { id: o.id.clone(), path })
            })
            .collect();
        if chosen.contains(&s.name) {
            let (ki, paths) = match key_inputs(s, &avail, &mut sc, None)? {
                KeyState::Known { ki, paths, .. } => (ki, paths),
                KeyState::Unknown(why) => return Err(RunError::Failed(format!("stage `{}`: {why}", s.name))),
            };
            let key = ki.key()?;
            if key != entry.key {
                return Err(RunError::Failed(format!(
                    "stage `{}` is stale against the lock (see `recflow explain`): run it before verifying",
                    s.name
                )));
            }
            let lk = FileLock::exclusive(&eng.store.lock_path(&key)).map_err(|e| RunError::Failed(e.to_string()))?;
            let res = rt.block_on(execute(&eng, s, &key, &paths, &lk, &[]));
            drop(lk);
            let rerun = res.map_err(|m| RunError::Failed(format!("stage `{}` failed during verify: {m}", s.name)))?;
            compare(&real, &eng.store, &s.name, entry, &rerun, tolerance, &mut found);
            // Shell stages wrote into the workspace: put the locked outputs back.
            if let Action::Shell { outs: souts, .. } = &s.action {
                for so in souts {
                    if let Some(o) = entry.outputs.get(&so.name) {
                        if real.check(&mut sc, &o.id).is_ok() {
                            let _ = real.materialize(&o.id, &so.abs);
                        }
                    }
                }
            }
        }
        avail.insert(s.name.clone(), a);
    }
    sc.save();
    remove_any(&scratch_dir);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_compares_numbers_only() {
        let a = serde_json::json!({"rmse": 1.0, "method": "x", "n": 10});
        let b = serde_json::json!({"rmse": 1.0000001, "method": "x", "n": 10});
        assert!(json_close(&a, &b, 1e-6), "numbers within tolerance are equal");
        assert!(!json_close(&a, &b, 1e-9), "outside tolerance they differ");
        let c = serde_json::json!({"rmse": 1.0, "method": "y", "n": 10});
        assert!(!json_close(&a, &c, 1.0), "strings must match exactly");
    }

    #[test]
    fn profile_gap_says_why_bytes_may_differ() {
        let p = Profile { aten: "avx2".into(), mkl: "compatible".into(), threads: 2, ..Default::default() };
        assert_eq!(profile_gap(Some(&p), Some(&p)), None, "same profile: bytes are compared");
        assert_eq!(profile_gap(Some(&p), None), None, "a shell stage reports no profile: bytes are compared");
        let q = Profile { aten: "default".into(), ..p.clone() };
        let why = profile_gap(Some(&p), Some(&q)).expect("another ATen capability is a gap");
        assert!(why.contains("aten avx2 → default"), "{why}");
        assert!(profile_gap(None, Some(&p)).expect("old lock").contains("no numerics profile"));
        let m = serde_json::json!({"final_loss": 0.5, "step_s_median": 0.2, "wall_s": 3.0, "nested": {"x": 1}});
        assert_eq!(result_metrics(&m).keys().collect::<Vec<_>>(), vec!["final_loss"], "times and nested values are left out");
    }
}
