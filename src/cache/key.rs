//! The stage key: sha256 over the canonical JSON of [`StageKeyInputs`]
//! (Turborepo's lesson: one struct, grouped fields, a schema version,
//! canonical bytes, and the expanded inputs kept so `explain` can diff them).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bump when the key encoding changes meaning: every key moves.
pub const KEY_SCHEMA: u32 = 1;

/// Everything that determines a stage's outputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageKeyInputs {
    pub schema: u32,
    /// Built-in kind, or `shell`.
    pub kind: String,
    /// The kind's implementation version (0 for shell stages).
    pub version: u32,
    /// Resolved config minus operational and path fields, env symbolic;
    /// for shell stages `{cmd, outs}`.
    pub config: Value,
    /// Input name → content ids (`sha256:…` / `tree:…`).
    pub inputs: BTreeMap<String, Vec<String>>,
    /// Interpolated env var → sha256 of its value (never the value).
    pub env: BTreeMap<String, String>,
    /// Resolved device, for kinds whose outputs depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub seed: u64,
    /// Intra-op threads of each rank of a data-parallel stage
    /// (`world_size` > 1; [`crate::dist::rank_threads`]): the ranks' results
    /// are not bit-identical across world sizes and thread counts, so both
    /// enter the key (`world_size` through the config). Absent otherwise,
    /// so the keys of every other stage stay as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_threads: Option<u32>,
}

/// Key inputs that cannot be encoded. Never hashed as something else: a key
/// standing for `null` would make every such stage share one record.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode the stage's key inputs: {0}")]
pub struct KeyError(#[from] serde_json::Error);

impl StageKeyInputs {
    /// The key: sha256 (hex) of the canonical encoding.
    pub fn key(&self) -> Result<String, KeyError> {
        hash_canonical(self)
    }
}

/// The one hashing helper: sha256 (hex) of the canonical JSON of `v`.
pub fn hash_canonical<T: Serialize>(v: &T) -> Result<String, KeyError> {
    let v = serde_json::to_value(v)?;
    Ok(super::hash::sha256_hex(canonical_json(&v).as_bytes()))
}

/// JSON with object keys sorted at every level and no whitespace.
pub fn canonical_json(v: &Value) -> String {
    let mut s = String::new();
    write_canonical(v, &mut s);
    s
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&m[*k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A JSON value with every object's keys sorted (for files written sorted).
pub fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&m[k]))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// Flattens JSON to dotted paths → compact JSON text (leaves and empty containers).
pub fn flatten(v: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn go(v: &Value, p: String, out: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    go(x, if p.is_empty() { k.clone() } else { format!("{p}.{k}") }, out);
                }
            }
            other => {
                out.insert(p, canonical_json(other));
            }
        }
    }
    go(v, String::new(), &mut out);
    out
}

/// One field that differs between two key inputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDiff {
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// Field-by-field difference of two key inputs (for `explain` and `status`).
pub fn diff(old: &StageKeyInputs, new: &StageKeyInputs) -> Vec<FieldDiff> {
    let a = flatten(&serde_json::to_value(old).unwrap_or(Value::Null));
    let b = flatten(&serde_json::to_value(new).unwrap_or(Value::Null));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| FieldDiff { field: k.clone(), old: a.get(k).cloned(), new: b.get(k).cloned() })
        .collect()
}

/// Words for a key field, for people: "param/config field", "input", "env var", ….
pub fn describe_field(field: &str) -> String {
    let (head, rest) = field.split_once('.').unwrap_or((field, ""));
    match head {
        "version" => "implementation version of the stage kind".to_string(),
        "kind" => "stage kind".to_string(),
        "schema" => "key schema version (recflow upgrade)".to_string(),
        "config" if rest == "cmd" => "shell command".to_string(),
        "config" => format!("config field `{rest}`"),
        "inputs" => format!("content of input `{rest}`"),
        "env" => format!("value of env var `{rest}` (hash)"),
        "device" => "device".to_string(),
        "seed" => "seed".to_string(),
        "rank_threads" => "intra-op threads per rank (numerics threads ÷ world_size)".to_string(),
        _ => field.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> StageKeyInputs {
        StageKeyInputs {
            schema: KEY_SCHEMA,
            kind: "shell".into(),
            version: 0,
            config: serde_json::json!({"cmd": "echo hi > a", "outs": [{"name": "a", "path": "a"}]}),
            inputs: BTreeMap::from([("x".to_string(), vec!["sha256:00".to_string()])]),
            env: BTreeMap::new(),
            device: None,
            seed: 0,
            rank_threads: None,
        }
    }

    #[test]
    fn key_moves_with_each_field_and_not_with_map_order() {
        let k0 = base().key().unwrap();
        let mut b = base();
        b.config = serde_json::json!({"outs": [{"path": "a", "name": "a"}], "cmd": "echo hi > a"});
        assert_eq!(b.key().unwrap(), k0, "object key order must not change the key");
        let mut c = base();
        c.inputs.insert("x".into(), vec!["sha256:01".into()]);
        assert_ne!(c.key().unwrap(), k0, "input content enters the key");
        let mut d = base();
        d.env.insert("V".into(), "h".into());
        assert_ne!(d.key().unwrap(), k0, "env hashes enter the key");
        let mut e = base();
        e.version = 1;
        assert_ne!(e.key().unwrap(), k0, "implementation version enters the key");
        assert_eq!(diff(&base(), &e)[0].field, "version", "diff names the field");
    }

    #[test]
    fn unencodable_inputs_are_an_error_not_the_key_of_null() {
        // JSON object keys must be strings: a map keyed by pairs cannot be encoded.
        let bad: BTreeMap<(u8, u8), u8> = BTreeMap::from([((1, 2), 3)]);
        assert!(hash_canonical(&bad).is_err(), "an encoding failure is reported");
        assert_ne!(
            hash_canonical(&Value::Null).unwrap(),
            base().key().unwrap(),
            "sanity: real inputs do not hash like null"
        );
        assert_eq!(
            base().key().unwrap(),
            super::super::hash::sha256_hex(canonical_json(&serde_json::to_value(base()).unwrap()).as_bytes()),
            "the key is the sha256 of the canonical JSON (unchanged encoding: existing keys stay valid)"
        );
    }
}
