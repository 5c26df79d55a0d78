//! The LoRA lifecycle of a [`Model`] (Hu et al. 2021, PEFT's names):
//! add adapters to the targeted linear layers, switch them off (the frozen
//! base is GRPO's reference model) or into training mode (dropout), list
//! them for the optimizer, save them in PEFT layout, fold them into the base
//! weights. The per-layer maths (`W x + (α/r)·B A dropout(x)`) is
//! [`super::linear::Linear`]'s.
use std::path::Path;
use std::sync::atomic::Ordering;

use recflow::stages::sft::{ALL_LINEAR, LORA_MODULES};
use tch::Tensor;

use super::config::LoraConfig;
use super::error::{io_err, LlmError, Result};
use super::model::Model;
use super::weights;

impl Model {
    /// Adds a LoRA adapter to every targeted linear layer of every block
    /// (draws `A` from tch's global generator: seed it with
    /// `train::with_torch_seed` around this call).
    pub fn add_lora(&mut self, cfg: &LoraConfig) -> Result<()> {
        if cfg.r <= 0 {
            return Err(LlmError::Invalid(format!("LoRA r must be > 0, got {}", cfg.r)));
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(LlmError::Invalid(format!("LoRA dropout must be in [0, 1), got {}", cfg.dropout)));
        }
        let targets: Vec<&str> = if cfg.target_modules.iter().any(|t| t == ALL_LINEAR) {
            LORA_MODULES.to_vec()
        } else {
            for t in &cfg.target_modules {
                if !LORA_MODULES.contains(&t.as_str()) {
                    return Err(LlmError::Invalid(format!(
                        "LoRA target module `{t}` unknown (one of {LORA_MODULES:?} or \"{ALL_LINEAR}\")"
                    )));
                }
            }
            cfg.target_modules.iter().map(String::as_str).collect()
        };
        for l in &mut self.layers {
            for (name, lin) in l.linears_mut() {
                let short = name.rsplit('.').next().unwrap_or(name);
                if targets.contains(&short) {
                    lin.add_lora(cfg.r, cfg.alpha, cfg.dropout);
                }
            }
        }
        self.lora = Some(cfg.clone());
        Ok(())
    }

    /// Adapters on (policy) or off (the frozen base = reference model).
    pub fn set_lora_enabled(&self, on: bool) {
        self.switch.enabled.store(on, Ordering::Relaxed);
    }
    pub fn lora_enabled(&self) -> bool {
        self.switch.enabled()
    }
    /// Training mode: LoRA dropout active.
    pub fn set_training(&self, on: bool) {
        self.switch.training.store(on, Ordering::Relaxed);
    }
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Adapter tensors with PEFT names
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`),
    /// sharing storage with the model (f32, `requires_grad`).
    pub fn lora_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for l in &self.layers {
            for (name, lin) in l.linears() {
                if let Some(lo) = &lin.lora {
                    let p = format!("base_model.model.model.layers.{}.{name}", l.index);
                    v.push((format!("{p}.lora_A.weight"), lo.a.shallow_clone()));
                    v.push((format!("{p}.lora_B.weight"), lo.b.shallow_clone()));
                }
            }
        }
        v
    }

    /// Folds every adapter into its base weight and removes it.
    pub fn merge_lora(&mut self) {
        for l in &mut self.layers {
            for (_, lin) in l.linears_mut() {
                lin.merge_lora();
            }
        }
        self.lora = None;
    }

    /// Writes the adapters in PEFT layout: `adapter_model.safetensors` +
    /// `adapter_config.json` (loadable by `peft.PeftModel.from_pretrained`).
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = self.lora.as_ref().ok_or_else(|| LlmError::Invalid("model has no LoRA adapters to save".into()))?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tensors: Vec<(String, Tensor)> = self.lora_parameters();
        weights::save_tensors(dir, &tensors, u64::MAX)?;
        std::fs::rename(dir.join(weights::SINGLE_FILE), dir.join("adapter_model.safetensors")).map_err(io_err(dir))?;
        let targets: Vec<String> = if cfg.target_modules.iter().any(|t| t == ALL_LINEAR) {
            LORA_MODULES.iter().map(|s| s.to_string()).collect()
        } else {
            cfg.target_modules.clone()
        };
        let ac = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": false, "inference_mode": true, "use_rslora": false, "use_dora": false,
            "base_model_name_or_path": self.source_dir.as_ref().map(|p| p.display().to_string()),
        });
        let p = dir.join("adapter_config.json");
        recflow::util::write_atomic(&p, serde_json::to_string_pretty(&ac).unwrap_or_default().as_bytes()).map_err(io_err(&p))?;
        Ok(())
    }
}
