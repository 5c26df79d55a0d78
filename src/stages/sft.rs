//! `sft` — supervised fine-tuning on the teacher's traces (RecOne's cold
//! start, arXiv 2510.23077 Sec. 3.2).
//!
//! Inputs: `model` (HF-layout dir), `data` (coldstart Parquet; only rows with
//! `accepted = true` are trained on; the loss covers the completion tokens
//! only; a deterministic `val_fraction` of them, chosen by a hash of
//! `sample_id`, is held out for the validation loss), `valid` (samples
//! Parquet: prompts for the greedy format-valid rate).
//! Outputs: `model` (merged weights, HF layout), `adapter` (PEFT layout:
//! `adapter_config.json` + `adapter_model.safetensors`; with full fine-tuning
//! it holds only `adapter_config.json` with `"peft_type": null` so the output
//! always exists), `log` (Parquet: step, loss, lr, grad_norm, val_loss,
//! val_valid_rate — the last two null between evaluations).
//!
//! Key: every field except [`Sft::OPERATIONAL`] (checkpoint and logging
//! intervals, which do not change results because resume is exact), plus
//! `device` and `dtype` (USES_DEVICE). Option names follow TRL's `SFTConfig`
//! / transformers' `TrainingArguments` so configs carry across.
use serde::{Deserialize, Serialize};

use super::{InputSpec, OutputSpec, StageDef};

/// Learning-rate schedule after warmup (transformers' `lr_scheduler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Half-cosine from the peak to 0 at the last step.
    Cosine,
    /// Linear decay from the peak to 0 at the last step.
    Linear,
    /// Constant at the peak.
    Constant,
}

/// Numeric type of the trainable computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// float32 on CPU, bfloat16 autocast on CUDA.
    Auto,
    Float32,
    Bfloat16,
}

/// The decoder's linear layers by their HF/PEFT short names, and PEFT's
/// shorthand for all of them. The one list the configs validate against.
pub const LORA_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
pub const ALL_LINEAR: &str = "all-linear";
/// The default stays out of the serialized (key) form, so adding the option
/// left the keys of existing sft/grpo stages where they were; any other
/// value enters the key.
pub(crate) fn is_all_linear(v: &[String]) -> bool {
    v.len() == 1 && v[0] == ALL_LINEAR
}

/// `with:` of an sft stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    // --- placement ---------------------------------------------------------
    /// `auto` | `cpu` | `cuda` | `cuda:N` (the runner resolves `auto`).
    pub device: String,
    /// `auto` (f32 on CPU, bf16 autocast on CUDA) | `float32` | `bfloat16`.
    pub dtype: DType,
    /// Overrides the pipeline seed for this stage (e.g. `${matrix.seed}`).
    pub seed: Option<u64>,

    // --- data parallelism (`recflow::dist`) ------------------------------------
    /// Ranks training data-parallel, one process each (one per GPU, or CPU
    /// processes with Gloo). The global batch stays
    /// `per_device_train_batch_size × gradient_accumulation_steps` and is
    /// split across the ranks, so `world_size` must divide it; the update
    /// equals one process's on that batch. 1 (default) = this process
    /// alone. Keyed when > 1, with the per-rank thread count.
    #[serde(skip_serializing_if = "crate::dist::is_one")]
    pub world_size: usize,
    /// `{backend: auto | gloo | nccl | serial}`: the collectives (keyed when set).
    #[serde(skip_serializing_if = "crate::dist::Distributed::is_default")]
    pub distributed: crate::dist::Distributed,
    /// Seconds a collective waits for the other ranks before the stage fails
    /// (transformers' `ddp_timeout`). Operational.
    #[serde(skip_serializing_if = "crate::dist::is_default_ddp_timeout")]
    pub ddp_timeout: u64,

    // --- data --------------------------------------------------------------
    /// Prompt + completion tokens kept per example (longer ones are cut from the end).
    pub max_length: usize,
    /// Examples per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches summed into one optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Length bucketing: each optimizer step's micro-batches are built from
    /// examples of similar length, so padding is small (transformers' name).
    pub group_by_length: bool,
    /// Passes over the accepted rows; ignored when `max_steps` is set.
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides `num_train_epochs`.
    pub max_steps: Option<usize>,

    // --- optimizer (AdamW, decoupled weight decay) --------------------------
    pub learning_rate: f64,
    pub lr_scheduler_type: LrSchedulerType,
    /// Fraction of steps of linear warmup (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Global L2 gradient-norm clip; 0 disables.
    pub max_grad_norm: f64,

    // --- LoRA (PEFT names) ---------------------------------------------------
    /// LoRA on all linear layers of the decoder; false = full fine-tuning.
    pub use_peft: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Linear layers that get adapters: `["all-linear"]` (default) or a list
    /// of `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj` (TRL's `lora_target_modules`, PEFT's `target_modules`).
    #[serde(skip_serializing_if = "is_all_linear")]
    pub lora_target_modules: Vec<String>,

    // --- memory -------------------------------------------------------------
    /// Recompute each decoder layer's forward in the backward pass.
    pub gradient_checkpointing: bool,
    /// Split each optimizer step's `per_device_train_batch_size ×
    /// gradient_accumulation_steps` examples into micro-batches of at most
    /// this many padded (prompt + completion) tokens, shortest first, instead
    /// of `per_device_train_batch_size` rows each: bounds activation memory
    /// when lengths vary. Keyed (unlike grpo's, which is operational), since
    /// the LoRA dropout masks are drawn per micro-batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens_per_microbatch: Option<usize>,

    // --- evaluation and checkpoints ------------------------------------------
    /// Validation loss and greedy format-valid rate every N optimizer steps
    /// (and after the last); 0 = only at the end.
    pub eval_steps: usize,
    /// Fraction of accepted coldstart rows held out for the validation loss
    /// (by a hash of `sample_id`, so stable across runs; at least one row
    /// when there are two or more).
    pub val_fraction: f64,
    /// Validation prompts used for the greedy format-valid rate (first N rows).
    pub eval_max_samples: usize,
    /// Generation budget of the greedy validation answers.
    pub eval_max_new_tokens: usize,
    /// Keep the weights of the best evaluation (lowest val_loss) as the
    /// output instead of the last step's.
    pub load_best_model_at_end: bool,
    /// Checkpoint into the work dir every N optimizer steps (operational).
    pub save_steps: usize,
    /// Also checkpoint once this many minutes passed since the last one (at
    /// the next step), so a slow CPU step never loses more (operational).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_minutes: Option<f64>,
    /// Accept a completion budget below the teacher's longest trace plus
    /// a margin (the runner refuses it otherwise, before SFT starts:
    /// `recflow::run::budget`). Operational; out of the key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_truncation: bool,
}

/// The defaults, one table: a field the `with:` (or `stages/sft.yaml`)
/// leaves out takes its value here.
impl Default for Config {
    fn default() -> Self {
        Config {
            device: "auto".into(),
            dtype: DType::Auto,
            seed: None,
            world_size: 1,
            distributed: crate::dist::Distributed::default(),
            ddp_timeout: crate::dist::DEFAULT_DDP_TIMEOUT_S,
            max_length: 1024,
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 1,
            group_by_length: true,
            num_train_epochs: 1.0,
            max_steps: None,
            learning_rate: 2e-5,
            lr_scheduler_type: LrSchedulerType::Cosine,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            lora_target_modules: vec![ALL_LINEAR.into()],
            gradient_checkpointing: false,
            max_tokens_per_microbatch: None,
            eval_steps: 50,
            val_fraction: 0.05,
            eval_max_samples: 64,
            eval_max_new_tokens: 256,
            load_best_model_at_end: true,
            save_steps: 50,
            save_minutes: None,
            allow_truncation: false,
        }
    }
}

impl Config {
    /// Examples per optimizer step.
    pub fn examples_per_step(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps
    }

    /// Optimizer steps over `train_rows` trained rows: `max_steps`, else
    /// `num_train_epochs` passes (at least one step).
    pub fn planned_steps(&self, train_rows: usize) -> usize {
        self.max_steps
            .unwrap_or_else(|| ((self.num_train_epochs * train_rows as f64) / self.examples_per_step() as f64).ceil().max(1.0) as usize)
    }
}

/// Whether an accepted coldstart row is held out for the validation loss:
/// the first 8 bytes of sha256(`sample_id`) as a fraction of 2⁶⁴ below
/// `frac`, so the split is stable across runs (the sft stage and
/// `run --dry-run`'s plan use this one function).
pub fn is_held_out(sample_id: &str, frac: f64) -> bool {
    use sha2::Digest;
    let h = sha2::Sha256::digest(sample_id.as_bytes());
    let x = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    (x as f64 / u64::MAX as f64) < frac
}

/// Stage metadata of `sft` (run function: `recflow_ml::train::sft::run`).
pub struct Sft;

impl StageDef for Sft {
    type Config = Config;
    const KIND: &'static str = "sft";
    // 3: hand-written lm_head backward and logsumexp log-probs (float order).
    const VERSION: u32 = 3;
    const OPERATIONAL: &'static [&'static str] = &["save_steps", "save_minutes", "allow_truncation", "ddp_timeout"];
    const USES_DEVICE: bool = true;

    const MODEL_INPUTS: &'static [(&'static str, super::model_files::ModelForm)] = &[("model", super::model_files::ModelForm::HfDir)];
    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("model"), InputSpec::one("data"), InputSpec::one("valid")]
    }

    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::dir("model"), OutputSpec::dir("adapter"), OutputSpec::file("log", "parquet")]
    }

    // `!(x > 0.0)` on purpose: NaN must fail validation too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate(c: &Config) -> Result<(), String> {
        check_device(&c.device)?;
        positive("max_length", c.max_length)?;
        positive("per_device_train_batch_size", c.per_device_train_batch_size)?;
        positive("gradient_accumulation_steps", c.gradient_accumulation_steps)?;
        crate::dist::check(
            c.world_size,
            c.per_device_train_batch_size * c.gradient_accumulation_steps,
            "the batch per_device_train_batch_size × gradient_accumulation_steps",
            &c.distributed,
            &c.device,
            c.ddp_timeout,
        )?;
        if let Some(0) = c.max_steps {
            return Err("max_steps must be ≥ 1 (or left out to use num_train_epochs)".into());
        }
        if c.max_steps.is_none() && !(c.num_train_epochs > 0.0 && c.num_train_epochs.is_finite()) {
            return Err(format!("num_train_epochs must be > 0, got {}", c.num_train_epochs));
        }
        check_optim(c.learning_rate, c.warmup_ratio, c.weight_decay, c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.max_grad_norm)?;
        check_lora(c.use_peft, c.lora_r, c.lora_alpha, c.lora_dropout, &c.lora_target_modules)?;
        positive("save_steps", c.save_steps)?;
        check_save_minutes(c.save_minutes)?;
        if let Some(b) = c.max_tokens_per_microbatch {
            positive("max_tokens_per_microbatch", b)?;
        }
        if !(0.0..0.5).contains(&c.val_fraction) {
            return Err(format!("val_fraction must be within [0, 0.5), got {}", c.val_fraction));
        }
        Ok(())
    }
}

/// Minutes between wall-time checkpoints when unset.
pub const DEFAULT_SAVE_MINUTES: f64 = 10.0;

#[allow(clippy::neg_cmp_op_on_partial_ord)] // NaN must fail too
pub(crate) fn check_save_minutes(m: Option<f64>) -> Result<(), String> {
    match m {
        Some(x) if !(x > 0.0 && x.is_finite()) => Err(format!("save_minutes must be > 0, got {x}")),
        _ => Ok(()),
    }
}

pub(crate) fn positive(field: &str, v: usize) -> Result<(), String> {
    if v == 0 {
        Err(format!("{field} must be ≥ 1"))
    } else {
        Ok(())
    }
}

pub(crate) fn check_device(d: &str) -> Result<(), String> {
    let ok = matches!(d, "auto" | "cpu" | "cuda")
        || d.strip_prefix("cuda:").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(format!("device must be auto, cpu, cuda or cuda:N, got {d:?}"))
    }
}

#[allow(clippy::neg_cmp_op_on_partial_ord)] // NaN must fail too
pub(crate) fn check_optim(lr: f64, warmup_ratio: f64, wd: f64, b1: f64, b2: f64, eps: f64, clip: f64) -> Result<(), String> {
    if !(lr > 0.0 && lr.is_finite()) {
        return Err(format!("learning_rate must be > 0, got {lr}"));
    }
    if !(0.0..=1.0).contains(&warmup_ratio) {
        return Err(format!("warmup_ratio must be within [0, 1], got {warmup_ratio}"));
    }
    if !(wd >= 0.0 && wd.is_finite()) {
        return Err(format!("weight_decay must be ≥ 0, got {wd}"));
    }
    for (name, b) in [("adam_beta1", b1), ("adam_beta2", b2)] {
        if !(0.0..1.0).contains(&b) {
            return Err(format!("{name} must be within [0, 1), got {b}"));
        }
    }
    if !(eps > 0.0) {
        return Err(format!("adam_epsilon must be > 0, got {eps}"));
    }
    if !(clip >= 0.0 && clip.is_finite()) {
        return Err(format!("max_grad_norm must be ≥ 0 (0 disables clipping), got {clip}"));
    }
    Ok(())
}

pub(crate) fn check_lora(use_peft: bool, r: usize, alpha: f64, dropout: f64, targets: &[String]) -> Result<(), String> {
    // Target names are checked even with use_peft off: a typo must not wait
    // until someone turns LoRA on.
    if targets.is_empty() {
        return Err(format!("lora_target_modules must not be empty (use [\"{ALL_LINEAR}\"] for every linear layer)"));
    }
    for (i, t) in targets.iter().enumerate() {
        if t == ALL_LINEAR {
            if targets.len() > 1 {
                return Err(format!("lora_target_modules: \"{ALL_LINEAR}\" already names every linear layer; list it alone"));
            }
        } else if !LORA_MODULES.contains(&t.as_str()) {
            return Err(format!(
                "lora_target_modules[{i}]: unknown module {t:?}; use \"{ALL_LINEAR}\" or some of {}",
                LORA_MODULES.join(", ")
            ));
        } else if targets[..i].contains(t) {
            return Err(format!("lora_target_modules: {t:?} is listed twice"));
        }
    }
    if !use_peft {
        return Ok(());
    }
    positive("lora_r", r)?;
    if !(alpha > 0.0 && alpha.is_finite()) {
        return Err(format!("lora_alpha must be > 0, got {alpha}"));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(format!("lora_dropout must be within [0, 1), got {dropout}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_and_unknown_fields_are_rejected() {
        let c: Config = serde_json::from_value(serde_json::json!({})).expect("all fields have defaults");
        assert_eq!(c.learning_rate, 2e-5, "TRL's SFT default learning rate");
        assert!(Sft::validate(&c).is_ok(), "defaults must validate");
        let e = serde_json::from_value::<Config>(serde_json::json!({"learning_rat": 1e-4})).unwrap_err();
        assert!(e.to_string().contains("learning_rat"), "a typo must be named: {e}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c: Config = serde_json::from_value(serde_json::json!({})).unwrap();
        c.use_peft = true;
        c.lora_dropout = 1.5;
        assert!(Sft::validate(&c).unwrap_err().contains("lora_dropout"));
        c.lora_dropout = 0.0;
        c.device = "gpu".into();
        assert!(Sft::validate(&c).unwrap_err().contains("device"));
        c.device = "cuda:1".into();
        c.max_steps = Some(0);
        assert!(Sft::validate(&c).unwrap_err().contains("max_steps"));
    }

    #[test]
    fn lora_target_modules_are_validated_and_keyed() {
        let check = |v: serde_json::Value| crate::stages::check_config::<Sft>(&v);
        let dflt = check(serde_json::json!({})).unwrap();
        assert_eq!(
            check(serde_json::json!({"lora_target_modules": ["all-linear"]})).unwrap(),
            dflt,
            "the default must not move the canonical (key) form of existing stages"
        );
        assert!(dflt.get("lora_target_modules").is_none(), "default stays out of the key form");
        let qv = check(serde_json::json!({"lora_target_modules": ["q_proj", "v_proj"]})).unwrap();
        assert_ne!(qv, dflt, "a non-default target list must enter the key");
        assert_eq!(qv["lora_target_modules"], serde_json::json!(["q_proj", "v_proj"]));
        let e = check(serde_json::json!({"use_peft": true, "lora_target_modules": ["q_prj"]})).unwrap_err();
        assert!(e.contains("lora_target_modules[0]") && e.contains("q_prj") && e.contains("q_proj"), "names field, value and choices: {e}");
        let e = check(serde_json::json!({"lora_target_modules": []})).unwrap_err();
        assert!(e.contains("must not be empty"), "{e}");
        let e = check(serde_json::json!({"lora_target_modules": ["q_proj", "q_proj"]})).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = check(serde_json::json!({"lora_target_modules": ["all-linear", "q_proj"]})).unwrap_err();
        assert!(e.contains("alone"), "{e}");
    }

    /// Data parallelism left at its defaults must not move the canonical
    /// (key) form of existing stages; set, it enters it (ddp_timeout is
    /// operational, removed from the key by the runner).
    #[test]
    fn data_parallel_fields_enter_the_key_form_only_when_set() {
        let check = |v: serde_json::Value| crate::stages::check_config::<Sft>(&v);
        let dflt = check(serde_json::json!({})).unwrap();
        let explicit = check(serde_json::json!({"world_size": 1, "distributed": {"backend": "auto"}, "ddp_timeout": 600})).unwrap();
        assert_eq!(explicit, dflt, "defaults written out serialize like an empty with:");
        let two = check(serde_json::json!({"world_size": 2, "distributed": {"backend": "gloo"}})).unwrap();
        assert_eq!((&two["world_size"], &two["distributed"]["backend"]), (&serde_json::json!(2), &serde_json::json!("gloo")));
        let t = check(serde_json::json!({"ddp_timeout": 30})).unwrap();
        assert_eq!(t["ddp_timeout"], 30, "a set timeout reaches the worker");
        assert!(Sft::OPERATIONAL.contains(&"ddp_timeout"), "and stays out of the key");
        let e = check(serde_json::json!({"world_size": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})).unwrap_err();
        assert!(e.contains("world_size 3") && e.contains("= 4"), "{e}");
        let e = check(serde_json::json!({"world_size": 2, "device": "cpu", "distributed": {"backend": "nccl"}})).unwrap_err();
        assert!(e.contains("nccl"), "{e}");
        assert!(check(serde_json::json!({"distributed": {"backend": "mpi"}})).is_err(), "unknown backends are refused");
    }

    /// Keys hash the serialized config: an empty `with:` and a typical one
    /// must serialize to exactly these strings (fields, order, values, and
    /// the defaults that `skip_serializing_if` leaves out), whichever way
    /// the defaults are written.
    #[test]
    fn defaults_resolve_to_the_keyed_values() {
        let ser = |v: serde_json::Value| serde_json::to_string(&serde_json::from_value::<Config>(v).unwrap()).unwrap();
        assert_eq!(
            ser(serde_json::json!({})),
            r#"{"device":"auto","dtype":"auto","seed":null,"max_length":1024,"per_device_train_batch_size":4,"gradient_accumulation_steps":1,"group_by_length":true,"num_train_epochs":1.0,"max_steps":null,"learning_rate":0.00002,"lr_scheduler_type":"cosine","warmup_ratio":0.0,"warmup_steps":0,"weight_decay":0.0,"adam_beta1":0.9,"adam_beta2":0.999,"adam_epsilon":1e-8,"max_grad_norm":1.0,"use_peft":false,"lora_r":16,"lora_alpha":32.0,"lora_dropout":0.0,"gradient_checkpointing":false,"eval_steps":50,"val_fraction":0.05,"eval_max_samples":64,"eval_max_new_tokens":256,"load_best_model_at_end":true,"save_steps":50}"#
        );
        let typical = serde_json::json!({
            "max_steps": 500, "per_device_train_batch_size": 16, "learning_rate": 3.0e-3, "lr_scheduler_type": "constant",
            "warmup_steps": 20, "warmup_ratio": 0, "eval_steps": 100, "max_length": 512, "use_peft": true,
            "lora_target_modules": ["q_proj", "v_proj"], "max_tokens_per_microbatch": 4096, "device": "cpu", "dtype": "float32", "seed": 7
        });
        assert_eq!(
            ser(typical),
            r#"{"device":"cpu","dtype":"float32","seed":7,"max_length":512,"per_device_train_batch_size":16,"gradient_accumulation_steps":1,"group_by_length":true,"num_train_epochs":1.0,"max_steps":500,"learning_rate":0.003,"lr_scheduler_type":"constant","warmup_ratio":0.0,"warmup_steps":20,"weight_decay":0.0,"adam_beta1":0.9,"adam_beta2":0.999,"adam_epsilon":1e-8,"max_grad_norm":1.0,"use_peft":true,"lora_r":16,"lora_alpha":32.0,"lora_dropout":0.0,"lora_target_modules":["q_proj","v_proj"],"gradient_checkpointing":false,"max_tokens_per_microbatch":4096,"eval_steps":100,"val_fraction":0.05,"eval_max_samples":64,"eval_max_new_tokens":256,"load_best_model_at_end":true,"save_steps":50}"#
        );
    }
}
