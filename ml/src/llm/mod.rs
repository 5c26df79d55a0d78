//! # The LLM engine
//!
//! Everything SFT, GRPO, eval and the local teacher do with a language model.
//!
//! * [`Model`] — one decoder for Llama and Qwen2/Qwen2.5 from an HF directory
//!   (`config.json` + safetensors), HF parameter names, f32/bf16/f16, CPU/CUDA,
//!   LoRA on every linear layer ([`Model::add_lora`], [`lora`]), load and save
//!   in the same layout ([`weights`]).
//!   Full forward [`Model::forward`] or layer-wise ([`Model::embed`],
//!   [`Model::layer_ctx`], [`Model::layers`], [`Model::final_hidden`], [`Model::lm_head`]).
//! * [`KvCache`] — preallocated key/value cache, rows selectable.
//! * [`Tokenizer`] — `tokenizer.json`, the model's chat template, stop ids.
//! * [`generate`] — batched sampling with shared prefill per group, per-token
//!   log-probs, deterministic per (seed, request id, sample, step).
//! * [`gguf`] — llama-architecture GGUF → HF directory.
//! * [`ModelConfig`] — HF `config.json`, validated.
//!
//! ```no_run
//! use recflow_ml::llm::{Model, Tokenizer, ChatMessage, generate::{generate, GenConfig, GenRequest}};
//! # fn main() -> Result<(), recflow_ml::llm::LlmError> {
//! let dir = std::path::Path::new("models/smollm2");
//! let model = Model::load(dir, tch::Device::Cpu, tch::Kind::Float)?;
//! let tok = Tokenizer::load(dir)?;
//! let text = tok.apply_chat_template(&[ChatMessage::new("user", "Hi")], true)?;
//! let req = GenRequest::new(tok.encode(&text, false)?, 4, 0);
//! let cfg = GenConfig { stop_ids: tok.stop_token_ids(), pad_id: tok.pad_token_id().unwrap_or(0), ..Default::default() };
//! let out = generate(&model, &[req], &cfg)?; // out[0][j]: token_ids, logprobs, finish
//! println!("{}", tok.decode(&out[0][0].token_ids, true)?);
//! # Ok(()) }
//! ```
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod import;
pub mod cli;
pub mod linear;
pub mod lora;
pub mod stages;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use error::{LlmError, Result};
pub use linear::Linear;
pub use config::LoraConfig;
pub use model::{position_ids_from_mask, DecoderLayer, KvCache, LayerCtx, Model};
pub use tokenizer::{ChatMessage, Tokenizer};

/// Parses a dtype name: `f32`/`float32`, `bf16`/`bfloat16`, `f16`/`float16`.
pub fn parse_kind(s: &str) -> Result<tch::Kind> {
    match s {
        "f32" | "float32" | "float" => Ok(tch::Kind::Float),
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        "f16" | "float16" | "half" => Ok(tch::Kind::Half),
        o => Err(LlmError::Invalid(format!("unknown dtype `{o}` (f32, bf16, f16)"))),
    }
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N` (`auto` = CUDA when available).
pub fn parse_device(s: &str) -> Result<tch::Device> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(tch::Device::Cuda(0))
            } else {
                Err(LlmError::Invalid("device `cuda` requested but libtorch sees no CUDA device (run `recflow-worker doctor`)".into()))
            }
        }
        o => match o.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if (n as i64) < tch::Cuda::device_count() => Ok(tch::Device::Cuda(n)),
            Some(n) => Err(LlmError::Invalid(format!("device `cuda:{n}` not present ({} CUDA devices)", tch::Cuda::device_count()))),
            None => Err(LlmError::Invalid(format!("unknown device `{o}` (cpu, cuda, cuda:N, auto)"))),
        },
    }
}
