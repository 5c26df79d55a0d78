//! Tiny random-init Llama models with a character-level tokenizer, for the
//! proof-of-learning tests and benchmarks: real HF-layout directories
//! (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`) that `Model::load` / `Tokenizer::load` read like
//! any other model.
//!
//! The tokenizer is a BPE without merges over printable ASCII (so one token
//! per character), plus the answer grammar's eight tags as single added
//! tokens (`<analyze user>` … `</rate>`), the assistant marker `<|a|>` and
//! the end-of-sequence token `<|eos|>` (id 0). The chat template is the
//! concatenation of the message contents followed by `<|a|>`.
use std::path::Path;

use tch::{Kind, Tensor};

use super::TrainError;

/// Shape of a toy model.
#[derive(Debug, Clone, Copy)]
pub struct ToySpec {
    pub hidden: i64,
    pub layers: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub intermediate: i64,
    pub seed: i64,
}

impl Default for ToySpec {
    fn default() -> Self {
        ToySpec { hidden: 64, layers: 2, heads: 4, kv_heads: 2, intermediate: 128, seed: 0 }
    }
}

/// The vocabulary: specials, tags, then ASCII 32..=126 and `\n`.
fn vocab() -> Vec<String> {
    let mut v: Vec<String> = vec!["<|eos|>".into(), "<|unk|>".into(), "<|a|>".into()];
    for (_, open, close) in recflow::answer::TAGS {
        v.push(open.into());
        v.push(close.into());
    }
    v.push("\n".into());
    for c in 32u8..=126 {
        v.push((c as char).to_string());
    }
    v
}

/// Writes a toy model directory.
pub fn write_toy_model(dir: &Path, spec: ToySpec) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    let voc = vocab();
    let v = (voc.len() as i64 + 7) / 8 * 8;
    let write = |name: &str, val: serde_json::Value| -> Result<(), TrainError> {
        let p = dir.join(name);
        let text = serde_json::to_string_pretty(&val).map_err(|e| TrainError::Invalid(e.to_string()))?;
        recflow::util::write_atomic(&p, text.as_bytes()).map_err(TrainError::io(&p))
    };
    write(
        "config.json",
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": v, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads, "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0,
        }),
    )?;
    let added: Vec<serde_json::Value> = voc
        .iter()
        .enumerate()
        .take(11)
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": i < 2})
        })
        .collect();
    let vmap: serde_json::Map<String, serde_json::Value> =
        voc.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect();
    write(
        "tokenizer.json",
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<|unk|>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false, "vocab": vmap, "merges": []},
        }),
    )?;
    write(
        "tokenizer_config.json",
        serde_json::json!({
            "eos_token": "<|eos|>", "pad_token": "<|eos|>", "unk_token": "<|unk|>",
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|a|>{% endif %}",
        }),
    )?;
    // Weights: N(0, 0.02) like HF's `initializer_range`, norms at 1.
    super::with_torch_seed(spec.seed as u64, || write_toy_weights(dir, spec, v))
}

fn write_toy_weights(dir: &Path, spec: ToySpec, v: i64) -> Result<(), TrainError> {
    let hd = spec.hidden / spec.heads;
    let n = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * 0.02;
    let mut t: Vec<(String, Tensor)> = vec![("model.embed_tokens.weight".into(), n(&[v, spec.hidden]))];
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let h = spec.hidden;
        t.push((format!("{p}.self_attn.q_proj.weight"), n(&[spec.heads * hd, h])));
        t.push((format!("{p}.self_attn.k_proj.weight"), n(&[spec.kv_heads * hd, h])));
        t.push((format!("{p}.self_attn.v_proj.weight"), n(&[spec.kv_heads * hd, h])));
        t.push((format!("{p}.self_attn.o_proj.weight"), n(&[h, spec.heads * hd])));
        t.push((format!("{p}.mlp.gate_proj.weight"), n(&[spec.intermediate, h])));
        t.push((format!("{p}.mlp.up_proj.weight"), n(&[spec.intermediate, h])));
        t.push((format!("{p}.mlp.down_proj.weight"), n(&[h, spec.intermediate])));
        t.push((format!("{p}.input_layernorm.weight"), Tensor::ones([h], (Kind::Float, tch::Device::Cpu))));
        t.push((format!("{p}.post_attention_layernorm.weight"), Tensor::ones([h], (Kind::Float, tch::Device::Cpu))));
    }
    t.push(("model.norm.weight".into(), Tensor::ones([spec.hidden], (Kind::Float, tch::Device::Cpu))));
    let p = dir.join("model.safetensors");
    Tensor::write_safetensors(&t, &p).map_err(|e| TrainError::io_tch(&p, e))
}
