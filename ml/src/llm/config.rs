//! HF `config.json` of the Llama and Qwen2/Qwen2.5 families.
//!
//! Field names are exactly Hugging Face's (`LlamaConfig`, `Qwen2Config` in
//! transformers 4.57). Every field that changes the computation is either
//! implemented or rejected with a message naming it: a config that loads
//! here runs the same network transformers would build from it. Fields that
//! do not change inference (`initializer_range`, `use_cache`, ...) are kept
//! verbatim in [`ModelConfig::extra`] and written back on save.
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{read_json, LlmError, Result};

/// Architecture family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `llama` (also SmolLM2, TinyLlama, Llama 2/3 without rope scaling).
    Llama,
    /// `qwen2` (Qwen2, Qwen2.5): q/k/v projections carry a bias.
    Qwen2,
}

/// `eos_token_id` is an int or a list of ints in HF configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_eps() -> f64 {
    1e-6
}

/// A decoder's `config.json`. Construct with [`ModelConfig::load`] or
/// [`ModelConfig::from_json`] (both validate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// `llama` or `qwen2`.
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Defaults to `num_attention_heads` (no GQA), as in HF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// Only `silu` (SwiGLU MLP) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// The context length: longer sequences are refused.
    pub max_position_embeddings: i64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base θ (Su et al. 2021), HF rotate-half layout.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Only `null` (or `{"rope_type": "default"}`) is supported.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama only: bias on q/k/v/o projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama only: bias on gate/up/down projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Llama only; must be 1 (tensor-parallel emulation changes numerics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretraining_tp: Option<i64>,
    /// Qwen2 only; sliding-window attention is not implemented, must be false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    /// Every other field, kept verbatim (written back on save).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Fields that change the network but are not implemented: refused so a
/// model never silently computes something else than transformers would.
const UNSUPPORTED: &[&str] = &[
    "partial_rotary_factor",
    "quantization_config",
    "logit_scale",
    "logits_scaling",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "residual_multiplier",
    "embedding_multiplier",
    "attention_multiplier",
    "use_qk_norm",
    "qk_norm",
    "no_rope_layers",
    "moe_intermediate_size",
    "num_experts",
];

impl ModelConfig {
    /// Reads and validates `DIR/config.json` (or a config file path).
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let v: serde_json::Value = read_json(&file)?;
        Self::from_json(v, &file)
    }

    /// Parses and validates a config value; `origin` names it in errors.
    pub fn from_json(v: serde_json::Value, origin: &Path) -> Result<Self> {
        let cfg: ModelConfig = serde_json::from_value(v).map_err(|e| LlmError::Config {
            path: origin.into(),
            msg: format!("{e} (expected an HF Llama/Qwen2 config.json)"),
        })?;
        cfg.validate().map_err(|msg| LlmError::Config { path: origin.into(), msg })?;
        Ok(cfg)
    }

    /// Semantic checks; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let fam = self.family()?;
        let pos = |name: &str, v: i64| if v > 0 { Ok(()) } else { Err(format!("`{name}` must be > 0, got {v}")) };
        pos("vocab_size", self.vocab_size)?;
        pos("hidden_size", self.hidden_size)?;
        pos("intermediate_size", self.intermediate_size)?;
        pos("num_hidden_layers", self.num_hidden_layers)?;
        pos("num_attention_heads", self.num_attention_heads)?;
        pos("num_key_value_heads", self.num_kv_heads())?;
        pos("max_position_embeddings", self.max_position_embeddings)?;
        pos("head_dim", self.head_dim())?;
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "`hidden_size` {} is not divisible by `num_attention_heads` {} (set `head_dim`)",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!("`head_dim` {} must be even for RoPE", self.head_dim()));
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return Err(format!(
                "`num_attention_heads` {} must be a multiple of `num_key_value_heads` {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!("`hidden_act` = {:?} is not supported (only \"silu\")", self.hidden_act));
        }
        if !(self.rms_norm_eps > 0.0) {
            return Err(format!("`rms_norm_eps` must be > 0, got {}", self.rms_norm_eps));
        }
        if !(self.rope_theta > 0.0) {
            return Err(format!("`rope_theta` must be > 0, got {}", self.rope_theta));
        }
        match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => {}
            Some(v) if v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()) == Some("default") => {}
            Some(v) => return Err(format!("`rope_scaling` = {v} is not supported (only null / default RoPE)")),
        }
        if let Some(tp) = self.pretraining_tp {
            if tp != 1 {
                return Err(format!("`pretraining_tp` = {tp} is not supported (only 1)"));
            }
        }
        if self.use_sliding_window == Some(true) {
            return Err("`use_sliding_window` = true is not supported (sliding-window attention)".into());
        }
        if fam == Family::Qwen2 && (self.attention_bias.is_some() || self.mlp_bias.is_some()) {
            return Err("`attention_bias`/`mlp_bias` are Llama fields; Qwen2 always has q/k/v bias".into());
        }
        if let Some(k) = UNSUPPORTED.iter().find(|k| self.extra.get(**k).is_some_and(|v| !v.is_null())) {
            return Err(format!("`{k}` is set but not supported by this engine (Llama/Qwen2 decoder only)"));
        }
        if let Some(lt) = self.extra.get("layer_types").and_then(|v| v.as_array()) {
            if lt.iter().any(|t| t.as_str() != Some("full_attention")) {
                return Err("`layer_types` other than \"full_attention\" are not supported".into());
            }
        }
        Ok(())
    }

    pub fn family(&self) -> std::result::Result<Family, String> {
        match self.model_type.as_str() {
            "llama" => Ok(Family::Llama),
            "qwen2" => Ok(Family::Qwen2),
            other => Err(format!("`model_type` = {other:?} is not supported (llama, qwen2)")),
        }
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(if self.num_attention_heads > 0 { self.hidden_size / self.num_attention_heads } else { 0 })
    }

    /// (q/k/v bias, o bias, mlp bias) implied by family and flags.
    pub fn biases(&self) -> (bool, bool, bool) {
        match self.family() {
            Ok(Family::Qwen2) => (true, false, false),
            _ => {
                let a = self.attention_bias.unwrap_or(false);
                (a, a, self.mlp_bias.unwrap_or(false))
            }
        }
    }

    /// EOS ids from this config (the tokenizer adds generation_config's).
    pub fn eos_ids(&self) -> Vec<i64> {
        self.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default()
    }

    /// Number of parameters (weights and biases).
    pub fn num_parameters(&self) -> i64 {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.num_attention_heads * self.head_dim(), self.num_kv_heads() * self.head_dim());
        let (qkvb, ob, mb) = self.biases();
        let attn = h * q + 2 * h * kv + q * h + if qkvb { q + 2 * kv } else { 0 } + if ob { h } else { 0 };
        let mlp = 3 * h * i + if mb { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        v * h + self.num_hidden_layers * layer + h + if self.tie_word_embeddings { 0 } else { v * h }
    }

    /// Pretty JSON as written to `config.json`.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}


/// LoRA settings (PEFT's `LoraConfig` names). Here, beside the model's
/// config, rather than in `lora.rs`: the model records the adapters it
/// carries, and `lora.rs` builds on the model, so the setting must sit below both.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub r: i64,
    /// α: the update is scaled by α/r.
    pub alpha: f64,
    /// Dropout on the adapter's input during training.
    pub dropout: f64,
    /// Module names to adapt (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`); `["all-linear"]` = all seven.
    pub target_modules: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "initializer_range": 0.02
        })
    }

    #[test]
    fn parses_defaults_and_keeps_extra_fields() {
        let c = ModelConfig::from_json(base(), Path::new("c.json")).unwrap();
        assert_eq!(c.head_dim(), 8, "head_dim defaults to hidden/heads");
        assert_eq!(c.rope_theta, 10000.0, "HF default rope_theta");
        assert!(c.extra.contains_key("initializer_range"), "irrelevant fields are preserved for save");
        let back: serde_json::Value = serde_json::from_str(&c.to_json_string()).unwrap();
        assert_eq!(back["initializer_range"], 0.02, "extra fields round-trip");
    }

    #[test]
    fn rejects_unsupported_fields_by_name() {
        for (k, v) in [
            ("rope_scaling", serde_json::json!({"rope_type": "llama3", "factor": 8.0})),
            ("hidden_act", serde_json::json!("gelu")),
            ("use_sliding_window", serde_json::json!(true)),
            ("partial_rotary_factor", serde_json::json!(0.5)),
            ("model_type", serde_json::json!("mistral")),
            ("num_key_value_heads", serde_json::json!(3)),
        ] {
            let mut j = base();
            j[k] = v;
            let e = ModelConfig::from_json(j, Path::new("c.json")).unwrap_err().to_string();
            assert!(e.contains(k), "error for {k} must name the field: {e}");
        }
    }
}
