//! Shared by sft and grpo: loading the model for training, encoding
//! prompts, generating completions, and writing the `model` / `adapter`
//! outputs.
use std::path::Path;

use tch::Device;

use super::data::Example;
use super::{Precision, TrainError};
use crate::llm::generate::{generate, FinishReason, GenConfig, GenRequest};
use crate::llm::{ChatMessage, LoraConfig, Model, Tokenizer};

fn llm(e: crate::llm::LlmError) -> TrainError {
    TrainError::Invalid(e.to_string())
}

/// A model prepared for training and its trainable tensors.
pub struct Trainee {
    pub model: Model,
    pub tok: Tokenizer,
    /// Name → tensor (sharing storage with the model), requires grad.
    pub trainable: Vec<(String, tch::Tensor)>,
    pub lora: bool,
}

/// Loads `dir`; with `lora` adds adapters on its target linear layers (A
/// drawn from torch's generator seeded with `seed`), else makes every weight
/// trainable.
pub fn load_trainee(
    dir: &Path,
    device: Device,
    prec: Precision,
    lora: Option<LoraConfig>,
    seed: u64,
) -> Result<Trainee, TrainError> {
    let mut model = Model::load(dir, device, prec.load).map_err(llm)?;
    let tok = Tokenizer::load(dir).map_err(llm)?;
    let lora_on = lora.is_some();
    let trainable = match lora {
        Some(cfg) => {
            super::with_torch_seed(super::derive_seed(seed, 0x10ea, 0), || model.add_lora(&cfg)).map_err(llm)?;
            model.lora_parameters()
        }
        None => {
            let p = model.named_parameters();
            for (_, t) in &p {
                let _ = t.set_requires_grad(true);
            }
            p
        }
    };
    Ok(Trainee { model, tok, trainable, lora: lora_on })
}

/// The LoRA adapters of the PEFT-named config fields both stages carry
/// (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`,
/// `lora_target_modules`); None for full fine-tuning.
pub fn lora_config(use_peft: bool, r: usize, alpha: f64, dropout: f64, targets: &[String]) -> Option<LoraConfig> {
    use_peft.then(|| LoraConfig { r: r as i64, alpha, dropout, target_modules: targets.to_vec() })
}

/// Prompt token ids of an example: its chat template with the generation
/// prompt, encoded without extra special tokens; cut from the left to
/// `max_len` (the end holds the question and the assistant marker).
pub fn encode_prompt(tok: &Tokenizer, ex: &Example, max_len: usize) -> Result<Vec<i64>, TrainError> {
    let msgs: Vec<ChatMessage> = ex.messages.iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
    let text = tok.apply_chat_template(&msgs, true).map_err(llm)?;
    let ids = tok.encode(&text, false).map_err(llm)?;
    if ids.is_empty() {
        return Err(TrainError::Invalid(format!("sample {:?}: the prompt encodes to no tokens", ex.sample_id)));
    }
    Ok(if ids.len() > max_len { ids[ids.len() - max_len..].to_vec() } else { ids })
}

/// One sampled completion.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub ids: Vec<i64>,
    pub logprobs: Vec<f32>,
    pub text: String,
    /// Hit the length limit without a stop token.
    pub truncated: bool,
}

/// Generates `g` completions for each prompt (`ids[b]`, stable request id
/// `req_ids[b]`), at `temperature` (0 = greedy).
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[Vec<i64>],
    req_ids: &[u64],
    g: usize,
    max_new: usize,
    temperature: f64,
    top_p: f64,
    top_k: usize,
    seed: u64,
    autocast: bool,
) -> Result<Vec<Vec<Sampled>>, TrainError> {
    let cfg = GenConfig {
        max_new_tokens: max_new,
        min_new_tokens: 0,
        temperature,
        top_p,
        top_k: top_k as i64,
        stop_ids: tok.stop_token_ids(),
        pad_id: tok.pad_token_id().unwrap_or(0),
        seed,
        max_batch_rows: 64,
    };
    let reqs: Vec<GenRequest> = prompts
        .iter()
        .zip(req_ids)
        .map(|(p, &id)| GenRequest { prompt_ids: p.clone(), num_samples: g, id, sample_offset: 0 })
        .collect();
    let was = model.lora_enabled();
    model.set_training(false);
    let out = tch::no_grad(|| tch::autocast(autocast, || generate(model, &reqs, &cfg))).map_err(llm)?;
    model.set_lora_enabled(was);
    let stops = tok.stop_token_ids();
    out.into_iter()
        .map(|grp| {
            grp.into_iter()
                .map(|o| {
                    let body: Vec<i64> = o.token_ids.iter().copied().filter(|t| !stops.contains(t)).collect();
                    Ok(Sampled {
                        text: tok.decode(&body, true).map_err(llm)?,
                        truncated: o.finish == FinishReason::Length,
                        ids: o.token_ids,
                        logprobs: o.logprobs,
                    })
                })
                .collect()
        })
        .collect()
}

/// Writes the `adapter` output (PEFT layout, or a config with
/// `"peft_type": null` after full fine-tuning) and the merged `model`.
pub fn write_outputs(mut t: Trainee, model_dir: &Path, adapter_dir: &Path) -> Result<(), TrainError> {
    if t.lora {
        t.model.save_adapter(adapter_dir).map_err(llm)?;
        t.model.merge_lora();
    } else {
        std::fs::create_dir_all(adapter_dir).map_err(TrainError::io(adapter_dir))?;
        let p = adapter_dir.join("adapter_config.json");
        let text = serde_json::json!({"peft_type": null, "note": "full fine-tuning: the merged model is the `model` output"});
        recflow::util::write_atomic(&p, text.to_string().as_bytes()).map_err(TrainError::io(&p))?;
    }
    for (_, p) in &t.trainable {
        let _ = p.set_requires_grad(false);
    }
    t.model.save(model_dir).map_err(llm)
}
