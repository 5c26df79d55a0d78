//! Stage-kind metadata the resolver checks stages against: the built-in
//! kinds' [`crate::stages::StageMeta`], plus whatever a custom worker says
//! about its kinds in `describe --json`.
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::stages::model_files::ModelForm;
use crate::stages::{InputSpec, OutputSpec};

/// Parses + validates a `with:` value (the kind's config type).
pub type CheckFn = fn(&Value) -> Result<Value, String>;
/// Outputs of a kind for a checked config.
pub type OutputsFn = fn(&Value) -> Result<Vec<OutputSpec>, String>;


/// Runner-side metadata of a stage kind (built-in, or described by a custom worker).
#[derive(Clone)]
pub struct KindInfo {
    pub kind: String,
    pub version: u32,
    pub operational: Vec<String>,
    pub path_fields: Vec<String>,
    pub uses_device: bool,
    /// Inputs holding models (checked readable by `--dry-run`).
    pub model_inputs: BTreeMap<String, ModelForm>,
    pub inputs: Vec<InputSpec>,
    pub check: Option<CheckFn>,
    pub outputs_fn: Option<OutputsFn>,
    /// Outputs from `describe --json` (custom kinds).
    pub outputs: Vec<OutputSpec>,
    /// Config schema from `describe --json` (custom kinds; checked at plan time).
    pub config_schema: Option<Value>,
}

impl KindInfo {
    fn from_meta(m: &crate::stages::StageMeta) -> Self {
        KindInfo {
            kind: m.kind.to_string(),
            version: m.version,
            operational: m.operational.iter().map(|s| s.to_string()).collect(),
            path_fields: m.path_fields.iter().map(|s| s.to_string()).collect(),
            uses_device: m.uses_device,
            model_inputs: m.model_inputs.iter().map(|(n, f)| (n.to_string(), *f)).collect(),
            inputs: m.inputs.clone(),
            check: Some(m.check),
            outputs_fn: Some(m.outputs),
            outputs: vec![],
            config_schema: None,
        }
    }

    /// Parses one entry of a worker's `describe --json` answer.
    pub fn from_described(v: &Value) -> Result<Self, String> {
        let s = |k: &str| -> Result<Vec<String>, String> {
            Ok(match v.get(k) {
                None | Some(Value::Null) => vec![],
                Some(x) => serde_json::from_value(x.clone()).map_err(|e| format!("`{k}`: {e}"))?,
            })
        };
        Ok(KindInfo {
            kind: v.get("kind").and_then(|k| k.as_str()).ok_or("entry without `kind`")?.to_string(),
            version: v.get("version").and_then(|k| k.as_u64()).ok_or("entry without `version`")? as u32,
            operational: s("operational")?,
            path_fields: s("path_fields")?,
            uses_device: v.get("uses_device").and_then(|k| k.as_bool()).unwrap_or(false),
            model_inputs: match v.get("model_inputs") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(x) => serde_json::from_value(x.clone()).map_err(|e| format!("`model_inputs`: {e}"))?,
            },
            inputs: serde_json::from_value(v.get("inputs").cloned().unwrap_or(Value::Array(vec![])))
                .map_err(|e| format!("`inputs`: {e}"))?,
            check: None,
            outputs_fn: None,
            outputs: serde_json::from_value(v.get("outputs").cloned().unwrap_or(Value::Array(vec![])))
                .map_err(|e| format!("`outputs`: {e}"))?,
            config_schema: v.get("config_schema").filter(|s| !s.is_null()).cloned(),
        })
    }

    pub(super) fn outputs_for(&self, cfg: &Value) -> Result<Vec<OutputSpec>, String> {
        match self.outputs_fn {
            Some(f) => f(cfg),
            None => Ok(self.outputs.clone()),
        }
    }
}

/// Metadata of every kind a pipeline can use: built-ins, plus those of its custom worker.
pub fn kinds_for(worker: Option<&Path>, store_dir: &Path) -> Result<BTreeMap<String, KindInfo>, String> {
    let mut m: BTreeMap<String, KindInfo> =
        crate::stages::meta::builtin().iter().map(|x| (x.kind.to_string(), KindInfo::from_meta(x))).collect();
    if let Some(w) = worker {
        for k in describe_worker(w, store_dir)? {
            m.entry(k.kind.clone()).or_insert(k);
        }
    }
    Ok(m)
}

/// `WORKER describe --json`, cached in the store keyed by the binary's sha256.
pub fn describe_worker(worker: &Path, store_dir: &Path) -> Result<Vec<KindInfo>, String> {
    let hash = crate::cache::hash::hash_file(worker).map_err(|e| format!("cannot read worker {}: {e}", worker.display()))?;
    let cache_file = store_dir.join("describe").join(format!("{hash}.json"));
    let text = match std::fs::read_to_string(&cache_file) {
        Ok(t) => t,
        Err(_) => {
            let out = std::process::Command::new(worker)
                .args(["describe", "--json"])
                .output()
                .map_err(|e| format!("cannot start worker {}: {e}", worker.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "worker {} `describe --json` failed: {}",
                    worker.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let t = String::from_utf8_lossy(&out.stdout).into_owned();
            // A cache, so a failed write only costs a later re-ask.
            let _ = crate::util::write_atomic(&cache_file, t.as_bytes());
            t
        }
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("worker {} describe: invalid JSON: {e}", worker.display()))?;
    let stages = v.get("stages").and_then(|s| s.as_array()).ok_or("describe answer lacks `stages`")?;
    stages.iter().map(KindInfo::from_described).collect()
}
