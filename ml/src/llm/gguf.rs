//! GGUF (llama.cpp's file format, v2/v3) → HF model directory.
//!
//! Supports the `llama` architecture with tensors in F32, F16, BF16, Q8_0,
//! Q4_0 and Q4_1 (dequantized to f32 with ggml's formulas:
//! Q4_0 `x = d·(q − 8)`, Q4_1 `x = d·q + m`, Q8_0 `x = d·q`, blocks of 32).
//! llama.cpp's converter permutes the rows of `attn_q`/`attn_k` (interleaved
//! RoPE pairs); [`unpermute`] undoes it so HF's rotate-half RoPE applies.
//! The GPT-2-style BPE vocabulary and merges become `tokenizer.json`, the
//! chat template and special tokens `tokenizer_config.json`, the metadata
//! `config.json` and `generation_config.json`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use tch::{Kind, Tensor};

use super::error::{io_err, LlmError, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U(u64),
    I(i64),
    F(f64),
    Bool(bool),
    Str(String),
    Arr(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U(u) => Some(*u),
            Value::I(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F(f) => Some(*f),
            Value::U(u) => Some(*u as f64),
            Value::I(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_arr(&self) -> Option<&[Value]> {
        match self {
            Value::Arr(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// A parsed GGUF file (memory-mapped).
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    mmap: memmap2::Mmap,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> LlmError {
        LlmError::Gguf { path: self.path.into(), msg: format!("at byte {}: {}", self.pos, msg.into()) }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos.checked_add(n).is_none_or(|e| e > self.b.len()) {
            return Err(self.err(format!("truncated file (wanted {n} more bytes)")));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U(self.take(1)?[0] as u64),
            1 => Value::I(self.take(1)?[0] as i8 as i64),
            2 => Value::U(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64),
            3 => Value::I(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => Value::U(self.u32()? as u64),
            5 => Value::I(self.u32()? as i32 as i64),
            6 => Value::F(f32::from_le_bytes(self.take(4)?.try_into().expect("4")) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let et = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.b.len() {
                    return Err(self.err(format!("array length {n} exceeds the file size")));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et)?);
                }
                Value::Arr(v)
            }
            10 => Value::U(self.u64()?),
            11 => Value::I(self.u64()? as i64),
            12 => Value::F(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

/// ggml type → (name, elements per block, bytes per block).
fn type_info(t: u32) -> Option<(&'static str, usize, usize)> {
    Some(match t {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        8 => ("Q8_0", 32, 34),
        30 => ("BF16", 1, 2),
        _ => return None,
    })
}

impl GgufFile {
    /// Parses the header of `path` (tensor data stays mapped, read lazily).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let f = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: read-only mapping of a file we only read; see weights.rs.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(io_err(path))?;
        let mut c = Cursor { b: &mmap, pos: 0, path };
        if c.take(4)? != b"GGUF" {
            return Err(LlmError::Gguf { path: path.into(), msg: "not a GGUF file (bad magic)".into() });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("GGUF version {version} not supported (2, 3)")));
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let k = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty)?;
            meta.insert(k, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 20));
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd > 4 {
                return Err(c.err(format!("tensor `{name}` has {nd} dims")));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32()?;
            let offset = c.u64()?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let align = meta.get("general.alignment").and_then(|v| v.as_u64()).unwrap_or(32) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        Ok(GgufFile { path: path.into(), version, meta, tensors, data_start, mmap })
    }

    fn err(&self, msg: impl Into<String>) -> LlmError {
        LlmError::Gguf { path: self.path.clone(), msg: msg.into() }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    fn req_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(|v| v.as_u64()).ok_or_else(|| self.err(format!("missing integer metadata `{key}`")))
    }

    /// Dequantizes tensor `info` to f32 with torch shape (reversed ggml dims).
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Tensor> {
        let (tname, blk, bbytes) = type_info(info.ggml_type).ok_or_else(|| {
            self.err(format!(
                "tensor `{}` has ggml type {}, not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1); re-quantize or convert the file",
                info.name, info.ggml_type
            ))
        })?;
        let n: u64 = info.dims.iter().product();
        let n = n as usize;
        if n % blk != 0 || (info.dims.first().copied().unwrap_or(0) as usize) % blk != 0 {
            return Err(self.err(format!("tensor `{}` ({tname}): row length not a multiple of {blk}", info.name)));
        }
        let nbytes = n / blk * bbytes;
        let start = self.data_start + info.offset as usize;
        let bytes = self
            .mmap
            .get(start..start + nbytes)
            .ok_or_else(|| self.err(format!("tensor `{}` data lies beyond the end of the file", info.name)))?;
        let mut out = vec![0f32; n];
        dequantize(info.ggml_type, bytes, &mut out);
        let shape: Vec<i64> = info.dims.iter().rev().map(|&d| d as i64).collect();
        Ok(Tensor::from_slice(&out).view(shape.as_slice()))
    }
}

/// ggml's block dequantization into `out` (f32 arithmetic as ggml and gguf-py).
fn dequantize(ty: u32, b: &[u8], out: &mut [f32]) {
    let h = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        0 => out.iter_mut().enumerate().for_each(|(i, o)| *o = f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4"))),
        1 => out.iter_mut().enumerate().for_each(|(i, o)| *o = h(2 * i)),
        30 => out.iter_mut().enumerate().for_each(|(i, o)| *o = bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()),
        2 => {
            for (k, y) in out.chunks_mut(32).enumerate() {
                let o = k * 18;
                let d = h(o);
                for j in 0..16 {
                    let q = b[o + 2 + j];
                    y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        3 => {
            for (k, y) in out.chunks_mut(32).enumerate() {
                let o = k * 20;
                let (d, m) = (h(o), h(o + 2));
                for j in 0..16 {
                    let q = b[o + 4 + j];
                    y[j] = (q & 0x0F) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        8 => {
            for (k, y) in out.chunks_mut(32).enumerate() {
                let o = k * 34;
                let d = h(o);
                for j in 0..32 {
                    y[j] = (b[o + 2 + j] as i8) as f32 * d;
                }
            }
        }
        _ => unreachable!("type checked by type_info"),
    }
}

/// Undoes llama.cpp's `permute(w, n_head)`: rows of each head were
/// reordered from [first half | second half] to interleaved pairs.
/// `w: [n_head · head_dim, cols]`.
pub fn unpermute(w: &Tensor, n_head: i64) -> Tensor {
    let sz = w.size();
    let dim = sz[0] / n_head / 2;
    w.view([n_head, dim, 2, sz[1]]).transpose(1, 2).reshape(sz.as_slice())
}

/// Pre-tokenizer regexes by `tokenizer.ggml.pre` (as llama.cpp's llama-vocab.cpp).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn pre_tokenizer(pre: &str) -> Option<serde_json::Value> {
    use serde_json::json;
    let bl = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => bl(true),
        // SmolLM / StarCoder: digits split individually, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bl(true)]}),
        "llama-bpe" | "llama3" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), bl(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), bl(false)]}),
        _ => return None,
    })
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and
/// `generation_config.json` from the GGUF tokenizer metadata.
fn write_tokenizer(g: &GgufFile, out: &Path, ctx_len: u64) -> Result<()> {
    use serde_json::json;
    let model = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or("");
    if model != "gpt2" {
        return Err(g.err(format!(
            "tokenizer.ggml.model = {model:?}: only byte-level BPE (\"gpt2\") vocabularies are converted"
        )));
    }
    let pre_name = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
    let pre = pre_tokenizer(pre_name).ok_or_else(|| {
        g.err(format!("tokenizer.ggml.pre = {pre_name:?} not supported (default, gpt2, smollm, llama-bpe, qwen2)"))
    })?;
    let tokens: Vec<&str> = g
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_arr())
        .ok_or_else(|| g.err("missing `tokenizer.ggml.tokens`"))?
        .iter()
        .map(|t| t.as_str().ok_or_else(|| g.err("non-string token")))
        .collect::<Result<_>>()?;
    let types: Vec<i64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_arr())
        .map(|a| a.iter().map(|t| t.as_f64().unwrap_or(1.0) as i64).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let merges: Vec<&str> = g
        .get("tokenizer.ggml.merges")
        .and_then(|v| v.as_arr())
        .ok_or_else(|| g.err("missing `tokenizer.ggml.merges`"))?
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    // Control (3) tokens are special added tokens; user-defined (4) are added, not special.
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": t != 3, "special": t == 3})
        })
        .collect();
    let id_of = |key: &str| g.get(key).and_then(|v| v.as_u64()).filter(|&i| (i as usize) < tokens.len());
    let bos = id_of("tokenizer.ggml.bos_token_id");
    let eos = id_of("tokenizer.ggml.eos_token_id");
    let unk = id_of("tokenizer.ggml.unknown_token_id");
    let pad = id_of("tokenizer.ggml.padding_token_id");
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
    let post = match (add_bos, bos) {
        (true, Some(b)) => {
            let bt = tokens[b as usize];
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {bt: {"id": bt, "ids": [b], "tokens": [bt]}}})
        }
        _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
    };
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    write_json(&out.join("tokenizer.json"), &tj)?;
    let tok = |i: Option<u64>| i.map(|i| json!(tokens[i as usize])).unwrap_or(serde_json::Value::Null);
    let mut tc = serde_json::Map::new();
    tc.insert("add_bos_token".into(), json!(add_bos));
    tc.insert("add_prefix_space".into(), json!(false));
    tc.insert("bos_token".into(), tok(bos));
    tc.insert("eos_token".into(), tok(eos));
    tc.insert("unk_token".into(), tok(unk));
    tc.insert("pad_token".into(), tok(pad));
    tc.insert("clean_up_tokenization_spaces".into(), json!(false));
    tc.insert("model_max_length".into(), json!(ctx_len));
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        tc.insert("chat_template".into(), json!(t));
    }
    write_json(&out.join("tokenizer_config.json"), &serde_json::Value::Object(tc))?;
    let mut gc = serde_json::Map::new();
    if let Some(b) = bos {
        gc.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = eos {
        gc.insert("eos_token_id".into(), json!(e));
    }
    if let Some(p) = pad {
        gc.insert("pad_token_id".into(), json!(p));
    }
    write_json(&out.join("generation_config.json"), &serde_json::Value::Object(gc))?;
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    recflow::util::write_atomic(path, text.as_bytes()).map_err(io_err(path))
}

/// An f32 read from GGUF metadata, printed as its shortest decimal (so
/// `1e-5` stays `1e-5`, not `9.999999747378752e-06`).
fn f32_clean(v: f64) -> f64 {
    format!("{}", v as f32).parse().unwrap_or(v)
}

/// Converts a llama-architecture GGUF file into an HF model directory
/// `out` (f32 weights: dequantized values are kept exactly).
pub fn convert(src: &Path, out: &Path) -> Result<()> {
    use serde_json::json;
    let g = GgufFile::open(src)?;
    let arch = g.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("");
    if arch != "llama" {
        return Err(g.err(format!("general.architecture = {arch:?}: only \"llama\" GGUF files are converted")));
    }
    let n_layer = g.req_u64("llama.block_count")? as i64;
    let hidden = g.req_u64("llama.embedding_length")? as i64;
    let ffn = g.req_u64("llama.feed_forward_length")? as i64;
    let n_head = g.req_u64("llama.attention.head_count")? as i64;
    let n_kv = g.get("llama.attention.head_count_kv").and_then(|v| v.as_u64()).map(|v| v as i64).unwrap_or(n_head);
    let ctx = g.req_u64("llama.context_length")?;
    let theta = g.get("llama.rope.freq_base").and_then(|v| v.as_f64()).map(f32_clean).unwrap_or(10000.0);
    let eps = g
        .get("llama.attention.layer_norm_rms_epsilon")
        .and_then(|v| v.as_f64())
        .map(f32_clean)
        .ok_or_else(|| g.err("missing `llama.attention.layer_norm_rms_epsilon`"))?;
    if g.get("llama.rope.scaling.type").and_then(|v| v.as_str()).is_some_and(|t| t != "none") {
        return Err(g.err("RoPE scaling (llama.rope.scaling.type) is not supported"));
    }
    let head_dim = g.get("llama.rope.dimension_count").and_then(|v| v.as_u64()).map(|v| v as i64).unwrap_or(hidden / n_head);
    let n_vocab = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_arr()).map(|a| a.len() as i64);
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    // ---- weights ----
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for info in &g.tensors {
        let hf = match hf_name(&info.name) {
            Some(n) => n,
            None if info.name == "rope_freqs.weight" => continue,
            None => return Err(g.err(format!("unexpected tensor `{}` for a llama model", info.name))),
        };
        let mut t = g.tensor_f32(info)?;
        if info.name.ends_with("attn_q.weight") {
            t = unpermute(&t, n_head);
        } else if info.name.ends_with("attn_k.weight") {
            t = unpermute(&t, n_kv);
        }
        named.push((hf, t.to_kind(Kind::Float).contiguous()));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let vocab = named
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .map(|(_, t)| t.size()[0])
        .or(n_vocab)
        .ok_or_else(|| g.err("missing tensor `token_embd.weight`"))?;
    super::weights::save_tensors(out, &named, super::weights::DEFAULT_MAX_SHARD_BYTES)?;
    // ---- config ----
    let id = |k: &str| g.get(k).and_then(|v| v.as_u64());
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "hidden_act": "silu", "max_position_embeddings": ctx, "rms_norm_eps": eps, "rope_theta": theta,
        "rope_scaling": null, "tie_word_embeddings": tied, "attention_bias": false, "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if head_dim != hidden / n_head {
        cfg["head_dim"] = json!(head_dim);
    }
    for (k, key) in [("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"), ("pad_token_id", "tokenizer.ggml.padding_token_id")] {
        if let Some(v) = id(key) {
            cfg[k] = json!(v);
        }
    }
    // Validate what we are about to write with the same checks as loading.
    super::config::ModelConfig::from_json(cfg.clone(), &out.join("config.json"))?;
    write_json(&out.join("config.json"), &cfg)?;
    write_tokenizer(&g, out, ctx)?;
    Ok(())
}

/// GGUF tensor name → HF name (llama).
fn hf_name(n: &str) -> Option<String> {
    let fixed = match n {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = n.strip_prefix("blk.")?;
    let (l, part) = rest.split_once('.')?;
    let l: usize = l.parse().ok()?;
    let sub = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{l}.{sub}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_and_q4_0_dequantize_with_ggml_nibble_order() {
        // One Q4_1 block: d = 0.5, m = -1, byte j = (hi << 4) | lo with lo = j, hi = 15 - j.
        let mut b = vec![];
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        let mut out = [0f32; 32];
        dequantize(3, &b, &mut out);
        assert_eq!(out[0], -1.0, "low nibble of byte 0 is element 0: 0·d + m");
        assert_eq!(out[15], 6.5, "low nibble of byte 15 is element 15: 15·0.5 − 1");
        assert_eq!(out[16], 6.5, "high nibble of byte 0 is element 16");
        let mut b0 = vec![];
        b0.extend(f16::from_f32(2.0).to_le_bytes());
        b0.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        dequantize(2, &b0, &mut out);
        assert_eq!(out[0], -16.0, "Q4_0 subtracts 8: (0 − 8)·2");
        assert_eq!(out[31], -16.0, "high nibble of byte 15 = 0");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, dim/n_head/2, cols).swapaxes(1, 2).reshape(w.shape)
        let w = Tensor::arange(8 * 3, (Kind::Float, tch::Device::Cpu)).view([8, 3]);
        let permuted = w.view([2, 2, 2, 3]).transpose(1, 2).reshape([8, 3]);
        let back = unpermute(&permuted, 2);
        assert!(back.equal(&w), "unpermute(permute(w)) == w");
    }

    #[test]
    fn maps_llama_tensor_names_to_hf() {
        assert_eq!(hf_name("blk.12.attn_output.weight").as_deref(), Some("model.layers.12.self_attn.o_proj.weight"));
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.0.attn_bogus.weight"), None, "unknown names are refused, not guessed");
    }
}
