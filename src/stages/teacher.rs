//! `teacher` — reasoning traces for RecOne's cold start (arXiv 2510.23077).
//!
//! Inputs: `samples` (samples schema: the prompts to answer), `train`
//! (interactions; the `cf` teacher's evidence), `items` (attributes for the
//! `cf` teacher's reasoning).
//! Outputs: `coldstart` (Parquet, coldstart schema: one row per selected
//! sample, accepted or rejected with a reason; `messages` are the original
//! prompt, never the hint) and `stats` (JSON: n_samples, accepted, rejected,
//! first_try_accuracy, attempts_hist, reasons, tokens_in, tokens_out).
//!
//! Key: every field below except the operational ones ([`OPERATIONAL`]:
//! concurrency, timeouts, retries, rate limits, prices, budget, progress
//! interval, response cache location). `api_key_env` enters as the variable
//! *name*; the key itself never does. Answers are reused across keys through
//! the response cache (see [`crate::teacher::cache`]).
//!
//! Backends: `openai` (any Chat Completions server), `cf` (offline,
//! deterministic), `local` (a model directory run by recflow's own
//! generation engine; only in `recflow-worker`, which registers its own run
//! function through [`crate::teacher::run::run_stage`] with a backend factory).
use serde::{Deserialize, Serialize};

use super::{InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use crate::answer::Scale;

/// Which teacher answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Openai,
    Cf,
    Local,
}

fn d_temperature() -> f32 {
    0.6
}
fn d_max_tokens() -> u32 {
    4096
}
fn d_max_rationalize() -> u32 {
    3
}
fn d_concurrency() -> usize {
    8
}
fn d_request_timeout() -> f64 {
    600.0
}
fn d_connect_timeout() -> f64 {
    30.0
}
fn d_max_retries() -> u32 {
    8
}
fn d_max_malformed() -> u32 {
    3
}
fn d_backoff_base() -> f64 {
    1.0
}
fn d_backoff_max() -> f64 {
    60.0
}
fn d_progress() -> f64 {
    2.0
}
fn d_hint() -> String {
    crate::teacher::run::DEFAULT_HINT.to_string()
}

/// What a finished stage does with samples whose request failed after every
/// retry (server errors, malformed bodies, timeouts): they got no answer, so
/// they say nothing about the teacher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRequestFailure {
    /// The stage fails naming how many and why; nothing is committed, every
    /// answer bought stays in the response cache, so a rerun asks only the
    /// failed samples again.
    #[default]
    Fail,
    /// Keep them as rejected rows with reason `request_failed` (a cached
    /// result: a rerun under the same key does not retry them).
    Record,
}

/// `with:` of a teacher stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `openai` | `cf` | `local`.
    pub backend: Backend,
    // --- endpoint (openai) -------------------------------------------------
    /// e.g. `https://api.deepseek.com/v1` (openai backend).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Model name sent to the API (openai), part of the response identity.
    #[serde(default)]
    pub model: Option<String>,
    /// Name of the environment variable holding the API key (never the key).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Model directory for `backend: local` (hashed into the key).
    #[serde(default)]
    pub model_dir: Option<String>,
    /// `backend: local`: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`.
    #[serde(default)]
    pub device: Option<String>,
    /// `backend: local`: `f32`, `bf16`, `f16`; default bf16 on CUDA, f32 on CPU.
    #[serde(default)]
    pub dtype: Option<String>,
    // --- sampling (part of the request identity) --------------------------
    #[serde(default = "d_temperature")]
    pub temperature: f32,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default = "d_max_tokens")]
    pub max_tokens: u32,
    /// Base seed sent to the API (mixed with sample id and attempt).
    #[serde(default)]
    pub sampling_seed: Option<u64>,
    // --- what is asked ------------------------------------------------------
    /// Ask at most this many samples (a seeded subset; raising it keeps the
    /// earlier subset and adds to it).
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// Hinted re-asks after a wrong first answer (total attempts ≤ 1 + this).
    #[serde(default = "d_max_rationalize")]
    pub max_rationalize: u32,
    /// Accept when |rating − target| ≤ tolerance; absent: must match after rounding.
    #[serde(default)]
    pub tolerance: Option<f32>,
    #[serde(default)]
    pub scale: Scale,
    /// Appended to the last user message on hinted attempts; `{rating}` is replaced.
    #[serde(default = "d_hint")]
    pub hint_template: String,
    /// `backend: cf`: `verbose` (full sentences, recent ratings and titles
    /// quoted) or `concise` (the same evidence in about a third of the
    /// tokens, for small students with short completion budgets).
    #[serde(default)]
    pub cf_style: crate::teacher::cf::CfStyle,
    /// `fail` (default) or `record`: see [`OnRequestFailure`]. In the key:
    /// it decides whether a committed output may hold unanswered samples.
    #[serde(default)]
    pub on_request_failure: OnRequestFailure,
    // --- operational (outside the key) --------------------------------------
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
    #[serde(default = "d_request_timeout")]
    pub request_timeout_s: f64,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout_s: f64,
    #[serde(default = "d_max_retries")]
    pub max_retries: u32,
    #[serde(default = "d_max_malformed")]
    pub max_malformed_retries: u32,
    #[serde(default = "d_backoff_base")]
    pub backoff_base_s: f64,
    #[serde(default = "d_backoff_max")]
    pub backoff_max_s: f64,
    #[serde(default)]
    pub requests_per_min: Option<f64>,
    #[serde(default)]
    pub tokens_per_min: Option<f64>,
    /// USD per million prompt tokens.
    #[serde(default)]
    pub price_in_per_mtok: f64,
    /// USD per million completion tokens.
    #[serde(default)]
    pub price_out_per_mtok: f64,
    /// Stop buying once the answers this stage uses — reused from the
    /// response cache or bought now — total this many tokens (in + out).
    #[serde(default)]
    pub budget_tokens: Option<u64>,
    /// Stop buying once those answers cost this much (USD, by the prices
    /// above): the dataset's total cost, not just this run's purchases.
    #[serde(default)]
    pub budget_usd: Option<f64>,
    #[serde(default = "d_progress")]
    pub progress_interval_s: f64,
    /// Response cache directory; default `$RECFLOW_CACHE/responses`, else
    /// `<work_dir>/../../responses` (the store root under the engine's layout).
    #[serde(default)]
    pub response_cache: Option<String>,
}

/// Fields that do not change results.
pub const OPERATIONAL: &[&str] = &[
    "concurrency",
    "request_timeout_s",
    "connect_timeout_s",
    "max_retries",
    "max_malformed_retries",
    "backoff_base_s",
    "backoff_max_s",
    "requests_per_min",
    "tokens_per_min",
    "price_in_per_mtok",
    "price_out_per_mtok",
    "budget_tokens",
    "budget_usd",
    "progress_interval_s",
    "response_cache",
];

/// The teacher stage kind.
pub struct Teacher;

impl StageDef for Teacher {
    type Config = Config;
    const KIND: &'static str = "teacher";
    /// 2: samples without an answer fail the stage by default
    /// (`on_request_failure`) instead of landing in a cached output.
    const VERSION: u32 = 2;
    const OPERATIONAL: &'static [&'static str] = OPERATIONAL;
    const PATH_FIELDS: &'static [&'static str] = &["model_dir"];
    const MODEL_INPUTS: &'static [(&'static str, super::model_files::ModelForm)] =
        &[("with.model_dir", super::model_files::ModelForm::HfDir)];

    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("samples"), InputSpec::one("train"), InputSpec::one("items")]
    }

    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::file("coldstart", "parquet"), OutputSpec::file("stats", "json")]
    }

    fn validate(c: &Config) -> Result<(), String> {
        match c.backend {
            Backend::Openai => {
                if c.base_url.as_deref().is_none_or(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
                    return Err("backend: openai needs `base_url` (http:// or https://, e.g. https://api.deepseek.com/v1)".into());
                }
                if c.model.as_deref().is_none_or(str::is_empty) {
                    return Err("backend: openai needs `model` (the model name the server expects)".into());
                }
            }
            Backend::Local => {
                if c.model_dir.is_none() {
                    return Err("backend: local needs `model_dir` (a model directory, e.g. ${model_import.model})".into());
                }
            }
            Backend::Cf => {}
        }
        if c.backend != Backend::Cf && c.cf_style != crate::teacher::cf::CfStyle::default() {
            return Err("`cf_style` applies to backend: cf only".into());
        }
        if c.backend != Backend::Local && (c.device.is_some() || c.dtype.is_some()) {
            return Err("`device` and `dtype` apply to backend: local only".into());
        }
        if let Some(d) = &c.dtype {
            if !["f32", "float32", "bf16", "bfloat16", "f16", "float16"].contains(&d.as_str()) {
                return Err(format!("`dtype` must be f32, bf16 or f16, got `{d}`"));
            }
        }
        if let Some(v) = &c.api_key_env {
            if v.is_empty() || !v.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                return Err(format!(
                    "`api_key_env` must be the NAME of an environment variable (letters, digits, _), got {} characters that are not; never put the key itself in the pipeline",
                    v.len()
                ));
            }
        }
        if !(c.temperature >= 0.0 && c.temperature <= 2.0) {
            return Err(format!("`temperature` must be in [0, 2], got {}", c.temperature));
        }
        if c.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err("`top_p` must be in (0, 1]".into());
        }
        if c.max_tokens == 0 {
            return Err("`max_tokens` must be at least 1".into());
        }
        if c.max_samples == Some(0) {
            return Err("`max_samples` must be at least 1 (omit it to use all samples)".into());
        }
        if c.tolerance.is_some_and(|t| t.is_nan() || t < 0.0) {
            return Err("`tolerance` must be ≥ 0 (omit it for: must match after rounding)".into());
        }
        if c.scale.min.partial_cmp(&c.scale.max) != Some(std::cmp::Ordering::Less) {
            return Err("`scale.min` must be below `scale.max`".into());
        }
        if !c.hint_template.contains("{rating}") {
            return Err("`hint_template` must contain {rating}".into());
        }
        if c.concurrency == 0 || c.concurrency > 4096 {
            return Err("`concurrency` must be in 1..=4096".into());
        }
        for (name, v) in [
            ("request_timeout_s", c.request_timeout_s),
            ("connect_timeout_s", c.connect_timeout_s),
            ("backoff_max_s", c.backoff_max_s),
            ("progress_interval_s", c.progress_interval_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("`{name}` must be a positive number of seconds"));
            }
        }
        if !(c.backoff_base_s.is_finite() && c.backoff_base_s >= 0.0) {
            return Err("`backoff_base_s` must be ≥ 0".into());
        }
        for (name, v) in [("requests_per_min", c.requests_per_min), ("tokens_per_min", c.tokens_per_min), ("budget_usd", c.budget_usd)] {
            if v.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
                return Err(format!("`{name}` must be positive"));
            }
        }
        for (name, v) in [("price_in_per_mtok", c.price_in_per_mtok), ("price_out_per_mtok", c.price_out_per_mtok)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("`{name}` must be ≥ 0"));
            }
        }
        Ok(())
    }
}

impl Stage for Teacher {
    fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        crate::teacher::run::run_stage(cfg, ctx, &crate::teacher::run::default_backend)
    }
}
