//! The pipeline lock file (`pipelines/NAME.lock`): what was *observed* —
//! per stage its key, the expanded key inputs (input content ids, config,
//! env hashes, versions), output ids and a metrics summary. Written sorted
//! (stable diffs) and atomically after each stage; meant to be committed.
//! Declared state lives in the pipeline YAML ([`crate::pipeline::spec`]).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::key::{sorted, StageKeyInputs};
use crate::cache::store::OutputRecord;

pub const LOCK_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct LockFile {
    pub schema: u32,
    pub pipeline: String,
    /// Params after overrides; env interpolations stay `${env:VAR}`.
    pub params: Value,
    pub stages: BTreeMap<String, LockStage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockStage {
    pub key: String,
    pub key_inputs: StageKeyInputs,
    /// Where each input came from: a path relative to the pipeline, or `STAGE.OUTPUT`.
    pub sources: BTreeMap<String, Vec<String>>,
    pub outputs: BTreeMap<String, OutputRecord>,
    /// The stage's metrics as [`metrics_summary`] keeps them: scalars, lists
    /// of scalars, the baselines' per-method `methods`; no timings. Locks
    /// written before that hold flat scalars only (and timings): they parse
    /// the same.
    #[serde(default)]
    pub metrics: Value,
    /// The numerics profile the outputs were produced under (never part of
    /// the key; absent for shell stages and in locks written before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics: Option<crate::numerics::Profile>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a recflow lock file: {msg}")]
    Parse { path: PathBuf, msg: String },
}

/// How a lock spells a path the user typed (issue 14: `scripts/real_data.sh`
/// once committed an absolute path of the machine that ran it). An absolute
/// path under the project root becomes relative to the pipeline's directory,
/// the base of every path in the pipeline file and in [`LockStage::sources`],
/// so it reads as if written in the pipeline. Anything else stays verbatim:
/// a relative path is portable already, and an absolute path outside the
/// project has no portable spelling (the resolver warns when `--set` gives one).
pub fn spell_path(s: &str, root: &Path, dir: &Path) -> String {
    let p = crate::pipeline::normalize(Path::new(s));
    if !p.is_absolute() || !p.starts_with(root) {
        return s.to_string();
    }
    let (pc, bc): (Vec<_>, Vec<_>) = (p.components().collect(), dir.components().collect());
    let common = pc.iter().zip(&bc).take_while(|(a, b)| a == b).count();
    let mut rel: PathBuf = bc[common..].iter().map(|_| "..").collect();
    rel.extend(&pc[common..]);
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.to_string_lossy().into_owned()
    }
}

/// [`spell_path`] over every string of the params (params are untyped: any
/// absolute path under the project is a machine path, whatever it names).
pub fn spell_params(v: &Value, root: &Path, dir: &Path) -> Value {
    match v {
        Value::String(s) => Value::String(spell_path(s, root, dir)),
        Value::Array(a) => Value::Array(a.iter().map(|x| spell_params(x, root, dir)).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), spell_params(x, root, dir))).collect()),
        other => other.clone(),
    }
}

/// `pipelines/NAME.yaml` → `pipelines/NAME.lock`.
pub fn lock_path(pipeline_file: &Path) -> PathBuf {
    pipeline_file.with_extension("lock")
}

impl LockFile {
    /// Reads a lock file; a missing file is an empty lock.
    pub fn read(path: &Path) -> Result<LockFile, LockError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| LockError::Parse { path: path.into(), msg: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LockFile { schema: LOCK_SCHEMA, ..Default::default() }),
            Err(e) => Err(LockError::Io { path: path.into(), source: e }),
        }
    }

    /// Sorted, pretty JSON with a trailing newline.
    pub fn to_text(&self) -> String {
        let v = sorted(&serde_json::to_value(self).unwrap_or(Value::Null));
        let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Writes atomically, only when the content changed (no-op runs touch nothing).
    pub fn write(&self, path: &Path) -> Result<(), LockError> {
        let text = self.to_text();
        if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        crate::util::write_atomic(path, text.as_bytes()).map_err(|e| LockError::Io { path: path.into(), source: e })
    }

    /// Read-modify-write under a store lock (concurrent runs of one
    /// pipeline); registers the lock as a root of the store.
    pub fn update(
        path: &Path,
        store_dir: &Path,
        f: impl FnOnce(&mut LockFile),
    ) -> Result<(), LockError> {
        let lk = store_dir.join("locks").join(format!(
            "lockfile-{}.lock",
            &crate::cache::hash::sha256_hex(path.to_string_lossy().as_bytes())[..16]
        ));
        let _g = crate::cache::locks::FileLock::exclusive(&lk).map_err(|e| LockError::Io { path: lk.clone(), source: e })?;
        // A lock written through this store is one of its roots (gc keeps
        // what it references, whichever project gc runs from).
        crate::cache::roots::register_lock(store_dir, path);
        let mut l = LockFile::read(path)?;
        l.schema = LOCK_SCHEMA;
        f(&mut l);
        l.write(path)
    }
}

/// The lock's summary of a stage's metrics: what a reader of the committed
/// lock needs to rebuild the results tables without the store, and nothing
/// that differs between two runs of the same key.
///
/// * kept: scalars, lists of scalars (`rmse_ci95: [lo, hi]`), and lists of
///   objects reduced the same way (the baselines' `methods`, one object per
///   method);
/// * dropped: nested objects (confusion matrices, histograms: they live in
///   the metrics output) and timing-like fields ([`is_timing_key`]: wall
///   times, throughput, memory peaks, cost), which belong in run records —
///   so rerunning a cached pipeline, or rerunning a stage on another
///   machine, leaves the lock as it was.
pub fn metrics_summary(m: &Value) -> Value {
    fn scalar(v: &Value) -> bool {
        !v.is_object() && !v.is_array()
    }
    fn reduce(o: &serde_json::Map<String, Value>, depth: u32) -> Value {
        let mut out = serde_json::Map::new();
        for (k, v) in o {
            if is_timing_key(k) {
                continue;
            }
            match v {
                Value::Array(a) if a.iter().all(scalar) => {
                    out.insert(k.clone(), v.clone());
                }
                Value::Array(a) if depth == 0 && a.iter().all(Value::is_object) => {
                    let items = a.iter().filter_map(Value::as_object).map(|o| reduce(o, depth + 1)).collect();
                    out.insert(k.clone(), Value::Array(items));
                }
                v if scalar(v) => {
                    out.insert(k.clone(), v.clone());
                }
                _ => {}
            }
        }
        Value::Object(out)
    }
    match m {
        Value::Object(o) => reduce(o, 0),
        _ => Value::Object(Default::default()),
    }
}

/// Metric names that measure the machine rather than the result: a `_`-word
/// `s` or `ms` (`wall_s`, `step_s_median`, `tokens_per_s`), memory peaks
/// (`rss`, CUDA `allocated` / `reserved` bytes) and `cost`. They stay in run
/// records (`recflow show` reads them there) and out of the lock.
pub fn is_timing_key(k: &str) -> bool {
    let words: Vec<&str> = k.split('_').collect();
    let has = |w: &str| words.contains(&w);
    has("s") || has("ms") || has("rss") || has("cost") || (has("cuda") && (has("allocated") || has("reserved")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_text_is_sorted_and_roundtrips() {
        let mut l = LockFile { schema: LOCK_SCHEMA, pipeline: "p".into(), params: serde_json::json!({"z": 1, "a": 2}), ..Default::default() };
        l.stages.insert(
            "s".into(),
            LockStage {
                key: "k".into(),
                key_inputs: StageKeyInputs {
                    schema: 1,
                    kind: "shell".into(),
                    version: 0,
                    config: Value::Null,
                    inputs: Default::default(),
                    env: Default::default(),
                    device: None,
                    seed: 0,
                },
                sources: Default::default(),
                outputs: Default::default(),
                metrics: Value::Null,
                numerics: None,
            },
        );
        let t = l.to_text();
        assert!(t.find("\"a\"").unwrap() < t.find("\"z\"").unwrap(), "params written sorted for stable diffs");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        l.write(&p).unwrap();
        assert_eq!(LockFile::read(&p).unwrap().stages, l.stages, "lock roundtrips");
    }

    #[test]
    fn issue14_lock_paths_are_relative_to_the_pipeline_when_under_the_project() {
        let (root, dir) = (Path::new("/p"), Path::new("/p/pipelines"));
        assert_eq!(spell_path("/p/data/x.gz", root, dir), "../data/x.gz", "under the root: relative to the pipeline dir");
        assert_eq!(spell_path("/p/pipelines/a/../b.txt", root, dir), "b.txt", "normalised first");
        assert_eq!(spell_path("/p/pipelines", root, dir), ".", "the pipeline dir itself");
        assert_eq!(spell_path("/elsewhere/x.gz", root, dir), "/elsewhere/x.gz", "outside the project: kept absolute");
        assert_eq!(spell_path("../data/x.gz", root, dir), "../data/x.gz", "relative: verbatim");
        assert_eq!(spell_path("lr=0.1", root, dir), "lr=0.1", "not a path: verbatim");
        let v = serde_json::json!({"a": {"b": ["/p/m.gguf", 3]}, "s": "/p/pipelines/t.md"});
        assert_eq!(
            spell_params(&v, root, dir),
            serde_json::json!({"a": {"b": ["../m.gguf", 3]}, "s": "t.md"}),
            "every string at every depth"
        );
    }

    #[test]
    fn every_shipped_lock_has_its_pipeline() {
        // A lock without its pipeline (once pipelines/qs_probe.lock) pins its
        // objects against `gc` forever and is never rewritten.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "lock") {
                let yaml = p.with_extension("yaml");
                assert!(yaml.is_file(), "{} has no pipeline {} beside it", p.display(), yaml.display());
                assert_eq!(lock_path(&yaml), p, "the lock is the one its pipeline writes");
                n += 1;
            }
        }
        assert!(n > 0, "pipelines/ ships locks (the test would pass vacuously otherwise)");
    }

    #[test]
    fn summary_keeps_results_and_drops_timings() {
        let m = serde_json::json!({
            "stage": "baselines", "wall_s": 3.2, "step_s_median": 0.5, "step_cpu_s_median": 1.0,
            "tokens_per_s": 10.0, "generated_tokens_per_s": 9.0, "peak_rss_bytes": 1, "step_peak_rss_bytes_max": 2,
            "step_peak_cuda_allocated_bytes_max": 3, "cost_usd": 0.1, "n_samples": 4, "test_samples": 5,
            "samples_per_prompt": 4, "confusion": {"labels": [1, 2]},
            "rmse_ci95": [0.9, 1.1],
            "methods": [{"method": "bias", "rmse": 1.0, "rmse_ci95": [0.9, 1.1], "wall_s": 1.0, "confusion": {}}]
        });
        let s = metrics_summary(&m);
        for k in ["wall_s", "step_s_median", "step_cpu_s_median", "tokens_per_s", "generated_tokens_per_s", "peak_rss_bytes", "step_peak_rss_bytes_max", "step_peak_cuda_allocated_bytes_max", "cost_usd", "confusion"] {
            assert!(s.get(k).is_none(), "`{k}` stays out of the lock (timing, memory, cost or nested object)");
        }
        for k in ["stage", "n_samples", "test_samples", "samples_per_prompt"] {
            assert!(s.get(k).is_some(), "`{k}` is a result and stays in the lock");
        }
        assert_eq!(s["rmse_ci95"], serde_json::json!([0.9, 1.1]), "intervals kept: show builds its table from the lock");
        assert_eq!(
            s["methods"],
            serde_json::json!([{"method": "bias", "rmse": 1.0, "rmse_ci95": [0.9, 1.1]}]),
            "every baseline method kept, reduced the same way"
        );
    }
}
