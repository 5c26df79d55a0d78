//! Safetensors checkpoint IO in HF layout: `model.safetensors`, or shards
//! `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`;
//! [`Model::load`] / [`Model::save`] over them, with the tokenizer and
//! generation-config files that travel with a model dir.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use super::config::ModelConfig;
use super::error::{io_err, read_json, LlmError, Result};
use super::model::Model;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// HF's default `max_shard_size` (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

fn kind_of(dt: Dtype, path: &Path, name: &str) -> Result<Kind> {
    Ok(match dt {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        other => {
            return Err(LlmError::Weights { path: path.into(), msg: format!("tensor `{name}` has unsupported dtype {other:?}") })
        }
    })
}

/// The safetensors files of a model dir (one, or the shards of the index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let v: serde_json::Value = read_json(&index)?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LlmError::Weights {
            path: index.clone(),
            msg: "missing object field `weight_map`".into(),
        })?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(LlmError::Weights {
        path: dir.into(),
        msg: format!("no {SINGLE_FILE} or {INDEX_FILE} (expected an HF model directory; GGUF files go through `model import`)"),
    })
}

/// Reads every tensor of a model dir into CPU tensors (dtype as stored) and
/// hands each to `f(name, tensor)` — a converting consumer keeps peak
/// memory at one copy.
pub fn read_dir_tensors(dir: &Path, mut f: impl FnMut(String, Tensor) -> Result<()>) -> Result<()> {
    for file in weight_files(dir)? {
        let fh = std::fs::File::open(&file).map_err(io_err(&file))?;
        // SAFETY: the file is opened read-only and only read while mapped;
        // a concurrent writer truncating it is outside what we support (the
        // store makes objects read-only once written).
        let mmap = unsafe { memmap2::Mmap::map(&fh) }.map_err(io_err(&file))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| LlmError::Weights { path: file.clone(), msg: format!("not a safetensors file: {e}") })?;
        for (name, view) in st.tensors() {
            let kind = kind_of(view.dtype(), &file, &name)?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            f(name, t)?;
        }
    }
    Ok(())
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_raw(t: &Tensor) -> Result<Raw> {
    let dtype = match t.kind() {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        k => return Err(LlmError::Invalid(format!("cannot save tensor of kind {k:?}"))),
    };
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut data = vec![0u8; n];
    t.f_copy_data_u8(&mut data, t.numel())?;
    Ok(Raw { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data })
}

/// Writes tensors in HF layout into `dir`: one `model.safetensors` when the
/// total fits `max_shard_bytes`, else shards + `model.safetensors.index.json`.
/// Files carry `{"format": "pt"}` metadata, which transformers requires.
pub fn save_tensors(dir: &Path, tensors: &[(String, Tensor)], max_shard_bytes: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let sizes: Vec<u64> = tensors.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).collect();
    let total: u64 = sizes.iter().sum();
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0u64;
    for (i, s) in sizes.iter().enumerate() {
        if cur > 0 && cur + s > max_shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        shards.last_mut().expect("non-empty").push(i);
        cur += s;
    }
    let meta: Option<HashMap<String, String>> = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (si, idx) in shards.iter().enumerate() {
        let fname = if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", si + 1, n) };
        let raws: Vec<(String, Raw)> =
            idx.iter().map(|&i| Ok((tensors[i].0.clone(), to_raw(&tensors[i].1)?))).collect::<Result<_>>()?;
        let views: Vec<(&str, &Raw)> = raws.iter().map(|(k, r)| (k.as_str(), r)).collect();
        let path = dir.join(&fname);
        let bytes = safetensors::tensor::serialize(views, meta.clone())
            .map_err(|e| LlmError::Weights { path: path.clone(), msg: e.to_string() })?;
        recflow::util::write_atomic(&path, &bytes).map_err(io_err(&path))?;
        for &i in idx {
            weight_map.insert(tensors[i].0.clone(), fname.clone());
        }
    }
    let index = dir.join(INDEX_FILE);
    if n > 1 {
        let v = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        recflow::util::write_atomic(&index, text.as_bytes()).map_err(io_err(&index))?;
    }
    Ok(())
}

/// Files besides the weights and config that travel with a model dir.
pub const SIDE_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
];

impl Model {
    /// Loads an HF model directory (`config.json` + safetensors, single or
    /// sharded) onto `device` in `kind` (`Float`, `BFloat16` or `Half`).
    /// Every expected tensor must be present with its HF shape; unknown
    /// tensors are an error (they would mean a different architecture).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Model> {
        let cfg = ModelConfig::load(dir)?;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        read_dir_tensors(dir, |name, t| {
            if name.ends_with("rotary_emb.inv_freq") {
                return Ok(()); // old checkpoints store the RoPE buffer; recomputed here
            }
            let t = if t.kind() == kind { t } else { t.to_kind(kind) };
            map.insert(name, t.to_device(device));
            Ok(())
        })?;
        let mut m = Self::from_tensors(cfg, map, device, kind, dir)?;
        m.source_dir = Some(dir.to_path_buf());
        Ok(m)
    }

    /// Writes `config.json` and the weights (HF layout, the model's dtype,
    /// sharded above 5 GB) into `dir`, and copies the tokenizer and
    /// generation-config files from the directory the model was loaded
    /// from. LoRA adapters are *not* folded in: call [`Model::merge_lora`]
    /// first for a standalone model, or [`Model::save_adapter`].
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with_shard_size(dir, DEFAULT_MAX_SHARD_BYTES)
    }

    /// [`Model::save`] with an explicit shard size.
    pub fn save_with_shard_size(&self, dir: &Path, max_shard_bytes: u64) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut cfg = self.cfg.clone();
        let dt = match self.kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        };
        cfg.extra.insert("torch_dtype".into(), serde_json::Value::String(dt.into()));
        cfg.extra.remove("dtype");
        let cpath = dir.join("config.json");
        recflow::util::write_atomic(&cpath, cfg.to_json_string().as_bytes()).map_err(io_err(&cpath))?;
        save_tensors(dir, &self.named_parameters(), max_shard_bytes)?;
        if let Some(src) = &self.source_dir {
            copy_side_files(src, dir)?;
        }
        Ok(())
    }

}

/// Copies tokenizer / generation-config files that exist in `src` to `dst`.
pub fn copy_side_files(src: &Path, dst: &Path) -> Result<()> {
    if src == dst {
        return Ok(());
    }
    for f in SIDE_FILES {
        let s = src.join(f);
        if s.is_file() {
            std::fs::copy(&s, dst.join(f)).map_err(io_err(&s))?;
        }
    }
    Ok(())
}

