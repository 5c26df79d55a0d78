//! `grpo` — Group Relative Policy Optimization on the rule reward
//! (RecZero / RecOne, arXiv 2510.23077 Sec. 3; GRPO: Shao et al. 2024).
//!
//! Inputs: `model` (HF-layout dir: the base model for RecZero, the `sft`
//! output for RecOne), `samples` (samples Parquet: the training prompts and
//! target ratings), `valid` (samples Parquet: greedy evaluation).
//! Outputs: `model` (merged weights, HF layout), `adapter` (PEFT layout; with
//! full fine-tuning only `adapter_config.json` with `"peft_type": null`),
//! `log` (Parquet, one row per step: step, reward_mean, reward_std,
//! frac_reward_zero_std, valid_fraction, kl, entropy, loss, clip_low,
//! clip_high, completion_len_mean, truncated_fraction, grad_norm, lr,
//! val_rmse, val_reward — the last two null between evaluations — plus
//! `reward_<term>` per reward term, `batch_mae`, `batch_rmse` and
//! `logprob_gap` (mean |sampling − training| log-prob of the sampled tokens)).
//! Wall-clock figures (generation / reference / training seconds, tokens/s,
//! peak memory) go to the stage metrics (run record), never into the log.
//!
//! Key: every field except [`Grpo::OPERATIONAL`] (`save_steps`,
//! `max_tokens_per_microbatch`, `logprob_chunk_tokens`: micro-batching and
//! chunking change memory and speed, not the maths — up to float summation
//! order), plus `device` and `dtype`. Option names follow TRL's `GRPOConfig`
//! (TRL 0.24) so configs carry across.
use serde::{Deserialize, Serialize};

use super::sft::{check_device, check_lora, check_optim, is_all_linear, positive, DType, LrSchedulerType};
use super::{InputSpec, OutputSpec, StageDef};
use crate::answer::{RewardConfig, Scale};

/// How the loss is normalised (TRL 0.24 `loss_type`, same meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then over sequences (GRPO paper).
    Grpo,
    /// Mean over all tokens of the micro-batch.
    Bnpo,
    /// Sum over tokens / (sequences × max_completion_length) (Dr. GRPO).
    DrGrpo,
    /// Sum over tokens / all completion tokens of the step (DAPO).
    Dapo,
}

/// Advantage scaling (TRL 0.24 `scale_rewards`; `none` is Dr. GRPO's choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by each group's standard deviation.
    Group,
    /// Divide by the whole batch's standard deviation.
    Batch,
    /// Only centre on the group mean.
    None,
}

/// Default `kl_warn_threshold` (the report judges logs against it).
pub const DEFAULT_KL_WARN_THRESHOLD: f64 = 1.0;

/// `with:` of a grpo stage.
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

    // --- data parallelism (`recflow::dist`; as in `sft`) -------------------------
    /// Ranks training data-parallel. Each takes `prompts_per_step ÷
    /// world_size` whole prompt groups of every rollout batch (so group
    /// advantages are unchanged); `world_size` must divide `prompts_per_step`.
    #[serde(skip_serializing_if = "crate::dist::is_one")]
    pub world_size: usize,
    #[serde(skip_serializing_if = "crate::dist::Distributed::is_default")]
    pub distributed: crate::dist::Distributed,
    /// Operational.
    #[serde(skip_serializing_if = "crate::dist::is_default_ddp_timeout")]
    pub ddp_timeout: u64,

    // --- rollouts ------------------------------------------------------------
    /// B: prompts per step.
    pub prompts_per_step: usize,
    /// G: completions per prompt (the group).
    pub num_generations: usize,
    /// Prompts longer than this are cut from the left (keeping the question).
    pub max_prompt_length: usize,
    pub max_completion_length: usize,
    /// Sampling temperature; logits are divided by it in training too.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// Optimizer steps (each: B × G rollouts, `num_iterations` updates).
    pub max_steps: usize,

    // --- reward ----------------------------------------------------------------
    /// Rule reward constants (paper defaults: valid → 1 + (1 − |ŷ − y| / 2), else −1).
    pub reward: RewardConfig,
    /// Rating scale of valid answers.
    pub scale: Scale,

    // --- objective (TRL 0.24 names and meanings) -----------------------------
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    /// KL coefficient against the reference (the initial model; with LoRA the
    /// model with adapters off). 0 skips the reference forward entirely.
    pub beta: f64,
    /// Lower clip: ratio ≥ 1 − epsilon.
    pub epsilon: f64,
    /// Upper clip: ratio ≤ 1 + epsilon_high (defaults to `epsilon`; DAPO uses 0.28).
    pub epsilon_high: Option<f64>,
    /// μ: optimizer updates per batch of rollouts (old log-probs recomputed
    /// once before the first update when μ > 1).
    pub num_iterations: usize,
    /// Exclude completions that hit `max_completion_length` from the loss.
    pub mask_truncated_completions: bool,

    // --- optimizer -------------------------------------------------------------
    pub learning_rate: f64,
    pub lr_scheduler_type: LrSchedulerType,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,

    // --- LoRA (PEFT names) -------------------------------------------------------
    pub use_peft: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// `["all-linear"]` (default) or some of `q_proj` … `down_proj` (see `sft`).
    #[serde(skip_serializing_if = "is_all_linear")]
    pub lora_target_modules: Vec<String>,

    // --- memory ----------------------------------------------------------------
    pub gradient_checkpointing: bool,
    /// Compute each prompt once per micro-batch and let its G completions
    /// attend to it, in the forward and the backward pass (the G rows'
    /// gradients sum into it). The same loss up to float summation order
    /// (with LoRA dropout the G rows share the prompt's dropout mask); the
    /// prompt's share of the training FLOPs drops G-fold. Keyed: the bits
    /// of the results differ.
    pub share_prompt_prefix: bool,
    /// With `beta` = 0, rows whose advantage is 0 (every row of a group with
    /// identical rewards) and masked rows add exactly nothing to the
    /// gradient: skip their forward and backward. The update is the same up
    /// to float summation order — their tokens still count in the loss
    /// normalisation and `clip_*` — but `entropy` and `logprob_gap` average
    /// over the rows trained on (null when none was). Keyed.
    pub skip_zero_advantage: bool,
    /// Micro-batches hold at most this many padded tokens — with
    /// `share_prompt_prefix` each prompt counted once — and at least one
    /// sequence. Operational.
    pub max_tokens_per_microbatch: usize,
    /// Positions per chunk when turning hidden states into log-probs, so
    /// `[B, T, vocab]` logits never exist at once. Operational.
    pub logprob_chunk_tokens: usize,

    // --- evaluation, diagnostics, checkpoints ---------------------------------
    /// Greedy evaluation on `valid` every N steps (and after the last); 0 = only at the end.
    pub eval_steps: usize,
    pub eval_max_samples: usize,
    /// Keep the weights with the lowest validation RMSE instead of the last.
    pub load_best_model_at_end: bool,
    /// Warn loudly when the mean KL to the reference exceeds this.
    pub kl_warn_threshold: f64,
    /// Checkpoint into the work dir every N steps (operational).
    pub save_steps: usize,
    /// Also checkpoint once this many minutes passed since the last one (at
    /// the next rollout boundary; operational; default 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_minutes: Option<f64>,
    /// Accept a completion budget below the teacher's longest trace plus
    /// a margin (the runner refuses it otherwise, before SFT starts:
    /// `recflow::run::budget`). Operational; out of the key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_truncation: bool,
}

/// The defaults, one table: a field the `with:` (or `stages/grpo.yaml`)
/// leaves out takes its value here.
impl Default for Config {
    fn default() -> Self {
        // The device, optimizer, LoRA and cadence defaults are SFT's: one
        // home, so the two trainers cannot drift apart.
        let sft = super::sft::Config::default();
        Config {
            device: sft.device,
            dtype: sft.dtype,
            seed: None,
            world_size: sft.world_size,
            distributed: sft.distributed,
            ddp_timeout: sft.ddp_timeout,
            prompts_per_step: 4,
            num_generations: 8,
            max_prompt_length: 1024,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_steps: 100,
            reward: RewardConfig::default(),
            scale: Scale::default(),
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            num_iterations: 1,
            mask_truncated_completions: false,
            learning_rate: 1e-6,
            lr_scheduler_type: LrSchedulerType::Constant,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: sft.adam_beta1,
            adam_beta2: sft.adam_beta2,
            adam_epsilon: sft.adam_epsilon,
            max_grad_norm: sft.max_grad_norm,
            use_peft: false,
            lora_r: sft.lora_r,
            lora_alpha: sft.lora_alpha,
            lora_dropout: 0.0,
            lora_target_modules: sft.lora_target_modules,
            gradient_checkpointing: false,
            share_prompt_prefix: true,
            skip_zero_advantage: true,
            max_tokens_per_microbatch: 8192,
            logprob_chunk_tokens: 1024,
            eval_steps: sft.eval_steps,
            eval_max_samples: 64,
            load_best_model_at_end: true,
            kl_warn_threshold: DEFAULT_KL_WARN_THRESHOLD,
            save_steps: sft.save_steps,
            save_minutes: sft.save_minutes,
            allow_truncation: false,
        }
    }
}

impl Config {
    /// Upper clip range (`epsilon_high`, defaulting to `epsilon` as in TRL).
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

/// Stage metadata of `grpo` (run function: `recflow_ml::train::grpo::run`).
pub struct Grpo;

impl StageDef for Grpo {
    type Config = Config;
    const KIND: &'static str = "grpo";
    // 3: shared prompt prefixes, zero-advantage rows skipped, hand-written
    // lm_head backward (float summation order).
    const VERSION: u32 = 3;
    const OPERATIONAL: &'static [&'static str] =
        &["save_steps", "save_minutes", "max_tokens_per_microbatch", "logprob_chunk_tokens", "kl_warn_threshold", "allow_truncation", "ddp_timeout"];
    const USES_DEVICE: bool = true;

    const MODEL_INPUTS: &'static [(&'static str, super::model_files::ModelForm)] = &[("model", super::model_files::ModelForm::HfDir)];
    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("model"), InputSpec::one("samples"), InputSpec::one("valid")]
    }

    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::dir("model"), OutputSpec::dir("adapter"), OutputSpec::file("log", "parquet")]
    }

    // `!(x > 0.0)` on purpose: NaN must fail validation too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate(c: &Config) -> Result<(), String> {
        check_device(&c.device)?;
        positive("prompts_per_step", c.prompts_per_step)?;
        crate::dist::check(c.world_size, c.prompts_per_step, "prompts_per_step", &c.distributed, &c.device, c.ddp_timeout)?;
        if c.num_generations < 2 {
            return Err(format!(
                "num_generations must be ≥ 2 (group advantages need at least two completions), got {}",
                c.num_generations
            ));
        }
        positive("max_prompt_length", c.max_prompt_length)?;
        positive("max_completion_length", c.max_completion_length)?;
        positive("max_steps", c.max_steps)?;
        positive("num_iterations", c.num_iterations)?;
        positive("max_tokens_per_microbatch", c.max_tokens_per_microbatch)?;
        positive("logprob_chunk_tokens", c.logprob_chunk_tokens)?;
        positive("save_steps", c.save_steps)?;
        super::sft::check_save_minutes(c.save_minutes)?;
        if !(c.temperature > 0.0 && c.temperature.is_finite()) {
            return Err(format!("temperature must be > 0, got {}", c.temperature));
        }
        if !(c.top_p > 0.0 && c.top_p <= 1.0) {
            return Err(format!("top_p must be within (0, 1], got {}", c.top_p));
        }
        if !(c.beta >= 0.0 && c.beta.is_finite()) {
            return Err(format!("beta must be ≥ 0, got {}", c.beta));
        }
        if !(c.epsilon > 0.0 && c.epsilon < 1.0) {
            return Err(format!("epsilon must be within (0, 1), got {}", c.epsilon));
        }
        if !(c.epsilon_high() > 0.0 && c.epsilon_high().is_finite()) {
            return Err(format!("epsilon_high must be > 0, got {}", c.epsilon_high()));
        }
        if !(c.reward.error_scale > 0.0) {
            return Err(format!("reward.error_scale must be > 0, got {}", c.reward.error_scale));
        }
        if !(c.scale.min < c.scale.max) {
            return Err(format!("scale.min must be < scale.max, got {} ≥ {}", c.scale.min, c.scale.max));
        }
        check_optim(c.learning_rate, c.warmup_ratio, c.weight_decay, c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.max_grad_norm)?;
        check_lora(c.use_peft, c.lora_r, c.lora_alpha, c.lora_dropout, &c.lora_target_modules)?;
        Ok(())
    }
}

// --- collapse ------------------------------------------------------------------

/// Valid-answer fraction below which a step counts toward collapse.
pub const COLLAPSE_VALID_FRACTION: f64 = 0.2;
/// Consecutive steps (after the first 10%) a condition must hold.
pub const COLLAPSE_STEPS: usize = 3;

/// Watches a GRPO run's per-step statistics for collapse, after the first
/// 10% of steps (`ceil(steps / 10)`, the same warm-up the reward deciles
/// use): the sampled valid-answer fraction below
/// [`COLLAPSE_VALID_FRACTION`], or every group with zero reward variance
/// (`frac_reward_zero_std = 1`: all advantages 0), for
/// [`COLLAPSE_STEPS`] consecutive steps; or the KL to the reference above
/// `kl_warn_threshold` (β > 0 only) at any step.
///
/// The verdict enters the stage's metrics ([`Self::metrics`]: flat scalars,
/// so the lock carries them) and [`collapse_note`] turns it into the line
/// the runner's end-of-run table, `recflow show` and the report print. The
/// threshold is operational (out of the key): a cached stage keeps the
/// verdict of the threshold it ran with.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapseWatch {
    warmup: u64,
    kl_threshold: Option<f64>,
    low_valid_run: usize,
    zero_std_run: usize,
    /// Longest runs after the warm-up, and KL steps over the threshold.
    pub low_valid_steps: usize,
    pub zero_std_steps: usize,
    pub kl_steps: usize,
    /// (first step it tripped, condition, what), in trip order.
    tripped: Vec<(u64, u8, String)>,
}

impl CollapseWatch {
    /// `kl_threshold`: `Some(kl_warn_threshold)` when β > 0 (else KL is not computed).
    pub fn new(total_steps: usize, kl_threshold: Option<f64>) -> Self {
        CollapseWatch {
            warmup: total_steps.div_ceil(10) as u64,
            kl_threshold,
            low_valid_run: 0,
            zero_std_run: 0,
            low_valid_steps: 0,
            zero_std_steps: 0,
            kl_steps: 0,
            tripped: Vec::new(),
        }
    }

    /// Feeds step `step` (1-based); returns a warning the first time a
    /// condition trips.
    pub fn observe(&mut self, step: u64, valid_fraction: f64, frac_zero_std: f64, kl: f64) -> Option<String> {
        if step <= self.warmup {
            return None;
        }
        let run = |r: &mut usize, hit: bool| {
            *r = if hit { *r + 1 } else { 0 };
            *r
        };
        let lv = run(&mut self.low_valid_run, !(valid_fraction >= COLLAPSE_VALID_FRACTION));
        let zs = run(&mut self.zero_std_run, frac_zero_std >= 1.0);
        self.low_valid_steps = self.low_valid_steps.max(lv);
        self.zero_std_steps = self.zero_std_steps.max(zs);
        let kl_hit = self.kl_threshold.is_some_and(|t| !(kl <= t));
        self.kl_steps += kl_hit as usize;
        // (condition index, message): each condition trips once.
        let mut new = Vec::new();
        if lv >= COLLAPSE_STEPS {
            new.push((0, format!("valid fraction below {COLLAPSE_VALID_FRACTION} for {COLLAPSE_STEPS} consecutive steps (to step {step})")));
        }
        if zs >= COLLAPSE_STEPS {
            new.push((1, format!("every group with zero reward variance for {COLLAPSE_STEPS} consecutive steps (to step {step})")));
        }
        if kl_hit {
            new.push((2, format!("KL {kl:.3} above kl_warn_threshold {} at step {step}", self.kl_threshold.unwrap_or(f64::NAN))));
        }
        new.retain(|(c, _)| !self.tripped.iter().any(|t| t.1 == *c));
        if new.is_empty() {
            return None;
        }
        let msg = new.iter().map(|n| n.1.as_str()).collect::<Vec<_>>().join("; ");
        self.tripped.extend(new.into_iter().map(|(c, w)| (step, c, w)));
        Some(format!("grpo collapse: {msg}"))
    }

    pub fn collapsed(&self) -> bool {
        !self.tripped.is_empty()
    }

    /// `collapse` (bool), `collapse_step` (first trip, or null),
    /// `collapse_reason` (or null), `collapse_low_valid_steps`,
    /// `collapse_zero_std_steps` (longest runs after the warm-up),
    /// `collapse_kl_steps`.
    pub fn metrics(&self) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        let reason = (!self.tripped.is_empty()).then(|| self.tripped.iter().map(|t| t.2.as_str()).collect::<Vec<_>>().join("; "));
        vec![
            ("collapse", json!(self.collapsed())),
            ("collapse_step", json!(self.tripped.first().map(|t| t.0))),
            ("collapse_reason", json!(reason)),
            ("collapse_low_valid_steps", json!(self.low_valid_steps)),
            ("collapse_zero_std_steps", json!(self.zero_std_steps)),
            ("collapse_kl_steps", json!(self.kl_steps)),
        ]
    }
}

/// The collapse line of a stage's metrics (a run record's, a metrics file's
/// or the lock's summary): `Some("collapsed at step 4: …")` when
/// `collapse` is true; None for every other stage and for runs recorded
/// before the check existed.
pub fn collapse_note(metrics: &serde_json::Value) -> Option<String> {
    if metrics.get("collapse").and_then(serde_json::Value::as_bool) != Some(true) {
        return None;
    }
    let step = metrics.get("collapse_step").and_then(serde_json::Value::as_u64).map(|s| format!(" at step {s}")).unwrap_or_default();
    let why = metrics.get("collapse_reason").and_then(serde_json::Value::as_str).unwrap_or("see the stage log");
    Some(format!("COLLAPSED{step}: {why}"))
}

/// The end-of-run line for a GRPO run most of whose sampled completions hit
/// `max_completion_length` (metrics `truncated_majority`,
/// `truncated_fraction_mean`): such answers lose `<rate>`, so their reward
/// is the invalid one and the groups carry little signal.
pub fn truncation_note(metrics: &serde_json::Value) -> Option<String> {
    if metrics.get("truncated_majority").and_then(serde_json::Value::as_bool) != Some(true) {
        return None;
    }
    let frac = metrics.get("truncated_fraction_mean").and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
    let max = metrics.get("max_completion_length").and_then(serde_json::Value::as_u64).map(|m| format!(" = {m}")).unwrap_or_default();
    Some(format!(
        "MOST COMPLETIONS TRUNCATED: {:.0}% of sampled completions hit max_completion_length{max} (cut before <rate>: invalid reward); raise it",
        frac * 100.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_note_only_for_a_majority() {
        let m = serde_json::json!({"truncated_majority": true, "truncated_fraction_mean": 0.8, "max_completion_length": 128});
        let n = truncation_note(&m).unwrap();
        assert!(n.contains("80%") && n.contains("max_completion_length = 128"), "{n}");
        assert!(truncation_note(&serde_json::json!({"truncated_majority": false, "truncated_fraction_mean": 0.3})).is_none());
        assert!(truncation_note(&serde_json::json!({})).is_none(), "older runs without the metric say nothing");
    }

    #[test]
    fn trl_defaults_and_names() {
        let c: Config = serde_json::from_value(serde_json::json!({})).expect("all fields have defaults");
        assert_eq!(c.loss_type, LossType::Dapo, "TRL 0.24's default loss_type");
        assert_eq!(c.scale_rewards, ScaleRewards::Group, "TRL 0.24's default scale_rewards");
        assert_eq!(c.epsilon_high(), 0.2, "epsilon_high defaults to epsilon as in TRL");
        assert!(Grpo::validate(&c).is_ok());
        let c: Config = serde_json::from_value(serde_json::json!({"loss_type": "dr_grpo", "scale_rewards": "none"}))
            .expect("TRL spellings parse");
        assert_eq!((c.loss_type, c.scale_rewards), (LossType::DrGrpo, ScaleRewards::None));
    }

    #[test]
    fn validation_names_the_field() {
        let mut c: Config = serde_json::from_value(serde_json::json!({})).unwrap();
        c.num_generations = 1;
        assert!(Grpo::validate(&c).unwrap_err().contains("num_generations"));
        c.num_generations = 4;
        c.temperature = 0.0;
        assert!(Grpo::validate(&c).unwrap_err().contains("temperature"));
        c.temperature = 1.0;
        c.reward.error_scale = 0.0;
        assert!(Grpo::validate(&c).unwrap_err().contains("error_scale"));
        c.reward.error_scale = 2.0;
        c.lora_target_modules = vec!["qkv".into()];
        assert!(Grpo::validate(&c).unwrap_err().contains("lora_target_modules"), "grpo validates LoRA targets too");
    }

    #[test]
    fn world_size_must_divide_prompts_per_step() {
        let check = |v: serde_json::Value| crate::stages::check_config::<Grpo>(&v);
        assert!(check(serde_json::json!({"world_size": 2, "prompts_per_step": 4})).is_ok());
        let e = check(serde_json::json!({"world_size": 3, "prompts_per_step": 4})).unwrap_err();
        assert!(e.contains("world_size 3") && e.contains("prompts_per_step = 4"), "{e}");
    }

    #[test]
    fn collapse_watch_trips_after_warmup_and_for_three_steps() {
        use super::{collapse_note, CollapseWatch};
        // 20 steps: the first 2 are warm-up.
        let mut w = CollapseWatch::new(20, None);
        assert!(w.observe(1, 0.0, 1.0, 0.0).is_none() && w.observe(2, 0.0, 1.0, 0.0).is_none(), "warm-up steps never count");
        assert!(w.observe(3, 0.1, 0.5, 0.0).is_none() && w.observe(4, 0.1, 0.5, 0.0).is_none());
        assert!(w.observe(5, 0.5, 0.5, 0.0).is_none(), "a valid step breaks the run");
        assert!(w.observe(6, 0.1, 0.5, 0.0).is_none() && w.observe(7, 0.1, 0.5, 0.0).is_none());
        let msg = w.observe(8, 0.1, 0.5, 5.0).expect("3 consecutive low-valid steps trip");
        assert!(msg.contains("valid fraction"), "{msg}");
        assert!(w.observe(9, 0.1, 0.5, 0.0).is_none(), "a tripped condition warns once");
        assert_eq!(w.kl_steps, 0, "KL is not watched without β");
        let m: serde_json::Map<String, serde_json::Value> = w.metrics().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let m = serde_json::Value::Object(m);
        assert_eq!(m["collapse"], true);
        assert_eq!(m["collapse_step"], 8);
        assert_eq!(m["collapse_low_valid_steps"], 4);
        assert!(collapse_note(&m).unwrap().starts_with("COLLAPSED at step 8: valid fraction"));

        let mut w = CollapseWatch::new(10, Some(1.0));
        for s in 1..=10 {
            w.observe(s, 0.9, if s >= 5 { 1.0 } else { 0.0 }, if s == 3 { 2.0 } else { 0.1 });
        }
        assert_eq!((w.zero_std_steps, w.kl_steps), (6, 1), "zero-variance run 5..10, one KL step");
        assert!(w.metrics()[2].1.as_str().unwrap().contains("KL 2.000"), "both reasons listed");
        let quiet = CollapseWatch::new(10, Some(1.0));
        let m: serde_json::Map<String, serde_json::Value> = quiet.metrics().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(collapse_note(&serde_json::Value::Object(m)), None, "a healthy run has no note");
        assert_eq!(collapse_note(&serde_json::json!({"steps": 3})), None, "runs recorded before the check have no note");
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
            r#"{"device":"auto","dtype":"auto","seed":null,"prompts_per_step":4,"num_generations":8,"max_prompt_length":1024,"max_completion_length":512,"temperature":1.0,"top_p":1.0,"top_k":0,"max_steps":100,"reward":{"format_reward":1.0,"invalid_reward":-1.0,"accuracy_weight":1.0,"error_scale":2.0},"scale":{"min":1.0,"max":5.0},"loss_type":"dapo","scale_rewards":"group","beta":0.0,"epsilon":0.2,"epsilon_high":null,"num_iterations":1,"mask_truncated_completions":false,"learning_rate":1e-6,"lr_scheduler_type":"constant","warmup_ratio":0.0,"warmup_steps":0,"weight_decay":0.0,"adam_beta1":0.9,"adam_beta2":0.999,"adam_epsilon":1e-8,"max_grad_norm":1.0,"use_peft":false,"lora_r":16,"lora_alpha":32.0,"lora_dropout":0.0,"gradient_checkpointing":false,"share_prompt_prefix":true,"skip_zero_advantage":true,"max_tokens_per_microbatch":8192,"logprob_chunk_tokens":1024,"eval_steps":50,"eval_max_samples":64,"load_best_model_at_end":true,"kl_warn_threshold":1.0,"save_steps":50}"#
        );
        let typical = serde_json::json!({
            "num_generations": 8, "prompts_per_step": 8, "max_steps": 150, "learning_rate": 3.0e-4, "lr_scheduler_type": "constant",
            "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.01, "temperature": 1.0, "max_prompt_length": 256,
            "max_completion_length": 128, "eval_steps": 50, "load_best_model_at_end": false, "use_peft": true,
            "lora_target_modules": ["q_proj", "v_proj"], "reward": {"error_scale": 4.0}, "scale": {"min": 1, "max": 10},
            "device": "cpu", "dtype": "float32"
        });
        assert_eq!(
            ser(typical),
            r#"{"device":"cpu","dtype":"float32","seed":null,"prompts_per_step":8,"num_generations":8,"max_prompt_length":256,"max_completion_length":128,"temperature":1.0,"top_p":1.0,"top_k":0,"max_steps":150,"reward":{"format_reward":1.0,"invalid_reward":-1.0,"accuracy_weight":1.0,"error_scale":4.0},"scale":{"min":1.0,"max":10.0},"loss_type":"dapo","scale_rewards":"group","beta":0.01,"epsilon":0.2,"epsilon_high":0.28,"num_iterations":1,"mask_truncated_completions":false,"learning_rate":0.0003,"lr_scheduler_type":"constant","warmup_ratio":0.0,"warmup_steps":0,"weight_decay":0.0,"adam_beta1":0.9,"adam_beta2":0.999,"adam_epsilon":1e-8,"max_grad_norm":1.0,"use_peft":true,"lora_r":16,"lora_alpha":32.0,"lora_dropout":0.0,"lora_target_modules":["q_proj","v_proj"],"gradient_checkpointing":false,"share_prompt_prefix":true,"skip_zero_advantage":true,"max_tokens_per_microbatch":8192,"logprob_chunk_tokens":1024,"eval_steps":50,"eval_max_samples":64,"load_best_model_at_end":false,"kl_warn_threshold":1.0,"save_steps":50}"#
        );
    }
}
