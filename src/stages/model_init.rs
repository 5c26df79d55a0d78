//! `model_init` — a small randomly initialised decoder (Llama or Qwen2
//! architecture) with a byte-level BPE tokenizer trained on a corpus, in HF
//! layout: for tests, the quickstart and CPU-sized experiments.
//!
//! Input: `corpus` — a Parquet table (e.g. `prompts` samples or teacher
//! coldstart): every string column and every `messages[].content` is
//! tokenizer training text.
//! Output: `model` — HF directory: `config.json`, `model.safetensors`,
//! `tokenizer.json` (byte-level BPE with `<|endoftext|>`, `<|im_start|>`,
//! `<|im_end|>` as ids 0, 1, 2, and by default the answer grammar's tags as
//! single tokens after the merges), `tokenizer_config.json` (ChatML template),
//! `generation_config.json` (eos = `<|im_end|>`).
//!
//! Key: every config field and the corpus content; the stage seed. Weights
//! are drawn N(0, initializer_range²) from a ChaCha stream of the seed
//! (independent of libtorch's generator), biases 0, norms 1 — HF's
//! `_init_weights`. Runs on CPU: the device does not change the outputs.
use serde::{Deserialize, Serialize};

use super::{InputSpec, OutputSpec, StageDef};

/// `with:` of a `model_init` stage (HF `config.json` names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `llama` or `qwen2` (Qwen2 adds q/k/v biases).
    pub architecture: String,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub intermediate_size: i64,
    /// Target BPE vocabulary size (the 3 special tokens and 256 bytes included);
    /// a small corpus may yield fewer tokens (`config.json` gets the real size).
    pub vocab_size: usize,
    /// BPE merges need at least this many occurrences.
    pub min_frequency: u64,
    pub max_position_embeddings: i64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    pub rms_norm_eps: f64,
    /// Stored weight dtype: `float32` or `bfloat16`.
    pub dtype: String,
    /// The answer grammar's eight tags (`<analyze user>` … `</rate>`) become
    /// single tokens of the vocabulary (added, not special: they decode as
    /// text). A model trained from scratch then learns the format as eight
    /// symbols instead of ~40 byte-pieces.
    pub answer_tokens: bool,
    /// Every one-decimal number `0.0` … `9.9` becomes a single token of the
    /// vocabulary (added, not special). The byte-level BPE otherwise splits
    /// `3.5` into ` 3`, `.`, `5`, so a model trained from scratch must learn
    /// digit arithmetic before it can compare two averages; as one symbol
    /// each, a value's embedding can carry its size directly. The token
    /// matches anywhere in the text (`13.5` becomes `1` + `3.5`), so it suits
    /// prompts whose decimals are ratings on a one-digit scale. Left out of
    /// the key while false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub decimal_tokens: bool,
}

/// The tokens [`Config::decimal_tokens`] adds: `0.0`, `0.1`, … `9.9`.
pub fn decimal_tokens() -> Vec<String> {
    (0..100).map(|t| format!("{}.{}", t / 10, t % 10)).collect()
}

/// The defaults, one table: a field the `with:` (or `stages/model_init.yaml`)
/// leaves out takes its value here.
impl Default for Config {
    fn default() -> Self {
        Config {
            architecture: "qwen2".into(),
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 128,
            vocab_size: 512,
            min_frequency: 2,
            max_position_embeddings: 4096,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            dtype: "float32".into(),
            answer_tokens: true,
            decimal_tokens: false,
        }
    }
}

pub struct ModelInit;

impl StageDef for ModelInit {
    type Config = Config;
    const KIND: &'static str = "model_init";
    const VERSION: u32 = 1;
    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("corpus")]
    }
    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::dir("model")]
    }
    fn validate(c: &Config) -> Result<(), String> {
        if c.architecture != "llama" && c.architecture != "qwen2" {
            return Err(format!("`architecture` must be \"llama\" or \"qwen2\", got {:?}", c.architecture));
        }
        for (k, v) in [
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("intermediate_size", c.intermediate_size),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            if v <= 0 {
                return Err(format!("`{k}` must be > 0, got {v}"));
            }
        }
        if c.hidden_size % c.num_attention_heads != 0 || (c.hidden_size / c.num_attention_heads) % 2 != 0 {
            return Err(format!(
                "`hidden_size` {} must be a multiple of `num_attention_heads` {} with an even head size",
                c.hidden_size, c.num_attention_heads
            ));
        }
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            return Err("`num_attention_heads` must be a multiple of `num_key_value_heads`".into());
        }
        if c.vocab_size < 259 + 1 {
            return Err(format!("`vocab_size` must be ≥ 260 (256 bytes + 3 specials + merges), got {}", c.vocab_size));
        }
        if !(c.initializer_range > 0.0) || !(c.rope_theta > 0.0) || !(c.rms_norm_eps > 0.0) {
            return Err("`initializer_range`, `rope_theta` and `rms_norm_eps` must be > 0".into());
        }
        if c.dtype != "float32" && c.dtype != "bfloat16" {
            return Err(format!("`dtype` must be \"float32\" or \"bfloat16\", got {:?}", c.dtype));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_fields_are_named() {
        let c: Config = serde_json::from_value(serde_json::json!({})).unwrap();
        assert!(ModelInit::validate(&c).is_ok(), "defaults are valid");
        let c: Config = serde_json::from_value(serde_json::json!({"num_key_value_heads": 3})).unwrap();
        assert!(ModelInit::validate(&c).unwrap_err().contains("num_key_value_heads"));
        assert!(serde_json::from_value::<Config>(serde_json::json!({"hiden_size": 3})).is_err(), "unknown fields rejected");
    }

    /// Keys hash the resolved config: the container default must resolve an
    /// empty `with:` to exactly the values the per-field defaults gave (and
    /// one set field must leave the others at their defaults).
    #[test]
    fn defaults_resolve_to_the_keyed_values() {
        let c: Config = serde_json::from_value(serde_json::json!({"hidden_size": 128})).unwrap();
        let expected = serde_json::json!({
            "architecture": "qwen2", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512, "min_frequency": 2,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "initializer_range": 0.02, "rms_norm_eps": 1e-6, "dtype": "float32", "answer_tokens": true
        });
        assert_eq!(serde_json::to_value(&c).unwrap(), expected);
    }
}
