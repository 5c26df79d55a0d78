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
    /// Flat scalar metrics of the stage.
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

    /// Read-modify-write under a store lock (concurrent runs of one pipeline).
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
        let mut l = LockFile::read(path)?;
        l.schema = LOCK_SCHEMA;
        f(&mut l);
        l.write(path)
    }
}

/// Keeps the flat scalars of a metrics object (the lock's summary).
pub fn metrics_summary(m: &Value) -> Value {
    match m {
        Value::Object(o) => Value::Object(
            o.iter().filter(|(_, v)| !v.is_object() && !v.is_array()).map(|(k, v)| (k.clone(), v.clone())).collect(),
        ),
        _ => Value::Object(Default::default()),
    }
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
}
