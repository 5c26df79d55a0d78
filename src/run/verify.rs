//! `recflow verify`: re-executes stages into a scratch store and compares
//! their output hashes with the lock. Bit-identity is promised on the same
//! machine type; elsewhere `--tolerance` compares the numbers of JSON
//! outputs (metrics) within a tolerance instead of their bytes.
use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::exec::{execute, Engine};
use super::{key_inputs, Avail, Available, KeyState, RunError};
use crate::cache::hash;
use crate::cache::locks::FileLock;
use crate::cache::store::remove_any;
use crate::cache::Store;
use crate::lock::{lock_path, LockFile};
use crate::pipeline::resolve::Action;
use crate::pipeline::Pipeline;

/// One differing output.
#[derive(Debug, Clone)]
pub struct Difference {
    pub stage: String,
    pub output: String,
    pub locked: String,
    pub got: String,
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

/// Verifies `stages` (all when empty). Returns the differences.
pub fn verify(p: Pipeline, stages: &[String], tolerance: Option<f64>) -> Result<Vec<Difference>, RunError> {
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
    let mut diffs = Vec::new();
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
            let key = ki.key();
            if key != entry.key {
                return Err(RunError::Failed(format!(
                    "stage `{}` is stale against the lock (see `recflow explain`): run it before verifying",
                    s.name
                )));
            }
            let lk = FileLock::exclusive(&eng.store.lock_path(&key)).map_err(|e| RunError::Failed(e.to_string()))?;
            let res = rt.block_on(execute(&eng, s, &key, &paths, &lk, &[]));
            drop(lk);
            let (outs, _) = res.map_err(|m| RunError::Failed(format!("stage `{}` failed during verify: {m}", s.name)))?;
            for (name, o) in &entry.outputs {
                let got = outs.get(name).map(|x| x.id.clone()).unwrap_or_else(|| "(missing)".into());
                if got == o.id {
                    continue;
                }
                // Tolerance: compare JSON numbers between the locked object (if here) and the new one.
                let close = tolerance.is_some_and(|tol| {
                    let read = |st: &Store, id: &str| -> Option<Value> {
                        if hash::is_tree(id) {
                            return None;
                        }
                        serde_json::from_slice(&std::fs::read(st.object_path(hash::hex_of(id))).ok()?).ok()
                    };
                    match (read(&real, &o.id), read(&eng.store, &got)) {
                        (Some(x), Some(y)) => json_close(&x, &y, tol),
                        _ => false,
                    }
                });
                if !close {
                    diffs.push(Difference { stage: s.name.clone(), output: name.clone(), locked: o.id.clone(), got });
                }
            }
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
    Ok(diffs)
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
}
