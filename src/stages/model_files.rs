//! Torch-free checks that a model input is readable, so `recflow run
//! --dry-run` can reject a wrong base model before hours of upstream stages
//! run (the worker loads the weights for real when the stage runs).
//!
//! * An HF model directory needs a `config.json` object naming its
//!   `model_type`, and weights: `model.safetensors`, or the shards listed in
//!   `model.safetensors.index.json` — each with a readable safetensors header.
//! * A GGUF file (`model_import`'s `source`) needs the `GGUF` magic, a
//!   supported version (2 or 3) and a header that fits in the file.
//!
//! Which inputs hold models is stage metadata: [`super::StageDef::MODEL_INPUTS`].
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a model input may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelForm {
    /// An HF-layout directory (config.json + safetensors).
    HfDir,
    /// An HF-layout directory or a GGUF file (`model_import`).
    HfDirOrGguf,
}

/// Single-file weights and the shard index of an HF model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// A safetensors header above this is not a real file (the format caps it at 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Checks that `path` is a model of the given form. The message says what
/// is wrong and what is expected; the caller adds file:line:col.
pub fn check(path: &Path, form: ModelForm) -> Result<(), String> {
    if path.is_dir() {
        return check_hf_dir(path);
    }
    match form {
        ModelForm::HfDirOrGguf => check_gguf(path),
        ModelForm::HfDir if has_gguf_magic(path) => Err(format!(
            "{} is a GGUF file; this input takes an HF model directory: convert it with a `model_import` stage (or `recflow model import`)",
            path.display()
        )),
        ModelForm::HfDir => Err(format!("{} is not a directory (expected an HF model directory: config.json + model.safetensors)", path.display())),
    }
}

/// An HF model directory: config.json with `model_type`, weights with readable headers.
pub fn check_hf_dir(dir: &Path) -> Result<(), String> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| format!("{}: cannot read: {e} (an HF model directory needs config.json)", cfg_path.display()))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", cfg_path.display()))?;
    if cfg.get("model_type").and_then(|t| t.as_str()).is_none() {
        return Err(format!("{}: no string field `model_type` (is this a model's config.json?)", cfg_path.display()));
    }
    let index = dir.join(INDEX_FILE);
    let files: Vec<String> = if index.exists() {
        let v: serde_json::Value = std::fs::read(&index)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| format!("{}: cannot read it as JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format!("{}: missing object field `weight_map`", index.display()))?;
        let mut f: Vec<String> = map.values().filter_map(|x| x.as_str().map(String::from)).collect();
        f.sort();
        f.dedup();
        if f.is_empty() {
            return Err(format!("{}: `weight_map` lists no files", index.display()));
        }
        f
    } else if dir.join(SINGLE_FILE).exists() {
        vec![SINGLE_FILE.to_string()]
    } else {
        return Err(format!(
            "{}: no {SINGLE_FILE} or {INDEX_FILE} (an HF model directory needs safetensors weights; GGUF files go through `model_import`)",
            dir.display()
        ));
    };
    for f in files {
        check_safetensors(&dir.join(f))?;
    }
    Ok(())
}

/// A safetensors file: u64 little-endian header length, then that much JSON.
fn check_safetensors(p: &Path) -> Result<(), String> {
    let mut f = std::fs::File::open(p).map_err(|e| format!("{}: cannot open weights: {e}", p.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| format!("{}: too short for a safetensors file", p.display()))?;
    let n = u64::from_le_bytes(n);
    if n == 0 || n > MAX_HEADER || 8 + n > len {
        return Err(format!("{}: not a safetensors file (header length {n} does not fit the file of {len} bytes)", p.display()));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).map_err(|e| format!("{}: cannot read the safetensors header: {e}", p.display()))?;
    match serde_json::from_slice::<serde_json::Value>(&h) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        _ => Err(format!("{}: not a safetensors file (its header is not a JSON object)", p.display())),
    }
}

fn has_gguf_magic(p: &Path) -> bool {
    let mut m = [0u8; 4];
    std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut m)).is_ok() && &m == b"GGUF"
}

/// A GGUF file: magic, version 2–3, tensor and metadata counts that fit.
pub fn check_gguf(p: &Path) -> Result<(), String> {
    let mut f = std::fs::File::open(p).map_err(|e| format!("{}: cannot open: {e}", p.display()))?;
    let mut h = [0u8; 24];
    f.read_exact(&mut h).map_err(|_| format!("{}: too short for a GGUF file or an HF model directory", p.display()))?;
    if &h[..4] != b"GGUF" {
        return Err(format!("{}: neither a GGUF file (magic `GGUF`) nor an HF model directory", p.display()));
    }
    let version = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if !(2..=3).contains(&version) {
        return Err(format!("{}: GGUF version {version} is not supported (2, 3)", p.display()));
    }
    let n_tensors = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    let n_kv = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    // Each tensor info takes ≥ 28 bytes and each metadata entry ≥ 13.
    if n_tensors == 0 || n_tensors.saturating_mul(28).saturating_add(n_kv.saturating_mul(13)) > len {
        return Err(format!("{}: GGUF header claims {n_tensors} tensors and {n_kv} metadata entries, which do not fit the file (truncated?)", p.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors_bytes() -> Vec<u8> {
        let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend_from_slice(&[0, 0, 128, 63]);
        b
    }

    #[test]
    fn hf_dir_needs_config_and_readable_weights() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path();
        assert!(check(m, ModelForm::HfDir).unwrap_err().contains("config.json"), "a dir without config.json is rejected");
        std::fs::write(m.join("config.json"), r#"{"model_type":"qwen2"}"#).unwrap();
        assert!(check(m, ModelForm::HfDir).unwrap_err().contains("no model.safetensors"), "weights are required");
        std::fs::write(m.join(SINGLE_FILE), b"\x05\0\0\0\0\0\0\0{}").unwrap();
        assert!(check(m, ModelForm::HfDir).unwrap_err().contains("not a safetensors file"), "a truncated weights file is rejected");
        std::fs::write(m.join(SINGLE_FILE), safetensors_bytes()).unwrap();
        assert_eq!(check(m, ModelForm::HfDir), Ok(()), "config + safetensors is a model");
        std::fs::write(m.join(INDEX_FILE), r#"{"weight_map":{"w":"model-00001-of-00002.safetensors"}}"#).unwrap();
        assert!(check(m, ModelForm::HfDir).unwrap_err().contains("model-00001-of-00002"), "every shard of the index must be readable");
    }

    #[test]
    fn gguf_magic_version_and_counts_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.gguf");
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend(std::iter::repeat_n(0u8, 64));
        std::fs::write(&p, &b).unwrap();
        assert_eq!(check(&p, ModelForm::HfDirOrGguf), Ok(()), "a well-formed GGUF header is accepted");
        assert!(check(&p, ModelForm::HfDir).unwrap_err().contains("model_import"), "a GGUF where an HF dir is needed says how to convert");
        let mut bad = b.clone();
        bad[4] = 9;
        std::fs::write(&p, &bad).unwrap();
        assert!(check(&p, ModelForm::HfDirOrGguf).unwrap_err().contains("version 9"), "unsupported versions are named");
        std::fs::write(&p, b"not a model at all, just text").unwrap();
        assert!(check(&p, ModelForm::HfDirOrGguf).unwrap_err().contains("neither a GGUF"), "other files are rejected");
        let mut huge = b[..24].to_vec();
        huge[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
        std::fs::write(&p, &huge).unwrap();
        assert!(check(&p, ModelForm::HfDirOrGguf).unwrap_err().contains("truncated"), "a header that cannot fit is rejected");
    }
}
