//! `teacher` — reasoning traces for RecOne's cold start (arXiv 2510.23077).
//!
//! Inputs: `samples` (samples schema: the prompts to answer), `train`
//! (interactions; the `cf` teacher's evidence), `items` (attributes for the
//! `cf` teacher's reasoning), optional `tokenizer` (the student's
//! tokenizer.json or model dir: the accepted traces' token lengths enter
//! the metrics as `trace_tokens_p50/p95/max`, which the runner checks the
//! completion budgets downstream against before SFT starts).
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
//! function through [`run_stage`] with a backend factory).
//!
//! This file is the stage's I/O: it reads the inputs, builds the backend and
//! the response cache, reports progress, and writes the outputs; the
//! rationalization loop itself is [`crate::teacher::rationalize`], the
//! `--dry-run` estimate [`crate::teacher::preview`], the stats
//! [`crate::teacher::stats`].
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{EventSink, InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use crate::answer::Scale;
use crate::data::{ColdRow, Sample};
use crate::teacher::cache::ResponseCache;
use crate::teacher::preview::{Preview, PreviewConfig};
use crate::teacher::rationalize::{drive, failure_report, select_rows, LoopConfig, Money, Outcome, Shared, Stopped};
use crate::teacher::stats::{stats_of, Stats};
use crate::teacher::{Sampling, TeacherBackend};

/// Which teacher answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Openai,
    Cf,
    Local,
}

/// Serde's `skip_serializing_if` for offsets that stay out of the key at 0.
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}
fn is_true(x: &bool) -> bool {
    *x
}
fn d_true() -> bool {
    true
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
    crate::teacher::rationalize::DEFAULT_HINT.to_string()
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
///
/// Per-field defaults (the `d_*` functions above), not one container-level
/// `#[serde(default)]` table as in the other stages: `backend` has no
/// default and must stay required, and a container default would fill
/// every missing field, `backend` included, from `Config::default()`.
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
    /// `backend: cf`: the estimate the trace writes and rounds: `bias`
    /// (default; the shrunk user/item bias predictor), `mean_of_averages`
    /// (the mean of the two averages the prompt shows) or `user_mean` (the
    /// user's average alone). Left out of the key
    /// when default, so keys of pipelines that never set it do not move.
    #[serde(default, skip_serializing_if = "crate::teacher::cf::CfEstimate::is_default")]
    pub cf_estimate: crate::teacher::cf::CfEstimate,
    /// `backend: cf`: stars added to the estimate before it is rounded to
    /// the teacher's rating (default 0; −0.3 = a strict rater). A teacher
    /// miscalibrated by a known amount, for checking that GRPO corrects what
    /// SFT inherits (the quickstart; docs/teacher.md). Left out of the key
    /// while 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cf_rating_offset: f64,
    /// `backend: cf`: σ (stars) of the teacher's rating noise, drawn per
    /// sample from its id (default 0): a teacher whose rating varies around
    /// its estimate as an LLM's does when sampled at a temperature. Left out
    /// of the key while 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cf_rating_noise: f64,
    /// `backend: cf`, `cf_style: concise`: end `<match>` with the estimate
    /// ("Estimate 3.6."; default) or leave it out, so the rating is the
    /// trace's one decision. Left out of the key while true.
    #[serde(default = "d_true", skip_serializing_if = "is_true")]
    pub cf_show_estimate: bool,
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
        // `tokenizer`: the student's tokenizer (tokenizer.json or a model dir,
        // e.g. `${base.model}`), in which the traces' lengths are recorded.
        vec![InputSpec::one("samples"), InputSpec::one("train"), InputSpec::one("items"), InputSpec::optional("tokenizer")]
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
        if c.backend != Backend::Cf && !c.cf_estimate.is_default() {
            return Err("`cf_estimate` applies to backend: cf only".into());
        }
        if c.backend != Backend::Cf && (c.cf_rating_offset != 0.0 || c.cf_rating_noise != 0.0) {
            return Err("`cf_rating_offset` and `cf_rating_noise` apply to backend: cf only".into());
        }
        let span = (c.scale.max - c.scale.min) as f64;
        if !c.cf_rating_offset.is_finite() || c.cf_rating_offset.abs() > span {
            return Err(format!("`cf_rating_offset` must be a number of stars within ±{span} (the scale's span), got {}", c.cf_rating_offset));
        }
        if !c.cf_show_estimate && (c.backend != Backend::Cf || c.cf_style != crate::teacher::cf::CfStyle::Concise) {
            return Err("`cf_show_estimate: false` applies to backend: cf with cf_style: concise only".into());
        }
        if !c.cf_rating_noise.is_finite() || !(0.0..=span).contains(&c.cf_rating_noise) {
            return Err(format!("`cf_rating_noise` must be a σ in stars within 0..={span} (the scale's span), got {}", c.cf_rating_noise));
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

impl Config {
    /// What the rationalization loop needs of this config.
    pub fn loop_config(&self) -> LoopConfig {
        LoopConfig {
            max_rationalize: self.max_rationalize,
            tolerance: self.tolerance,
            scale: self.scale,
            hint_template: self.hint_template.clone(),
            sampling: Sampling { temperature: self.temperature, top_p: self.top_p, max_tokens: self.max_tokens, seed: self.sampling_seed },
        }
    }

    /// Prices and budget.
    pub fn money(&self) -> Money {
        Money {
            price_in_per_mtok: self.price_in_per_mtok,
            price_out_per_mtok: self.price_out_per_mtok,
            budget_tokens: self.budget_tokens,
            budget_usd: self.budget_usd,
        }
    }

    /// What the `--dry-run` preview needs of this config.
    pub fn preview_config(&self) -> PreviewConfig {
        PreviewConfig {
            loop_cfg: self.loop_config(),
            max_samples: self.max_samples,
            endpoint: match self.backend {
                Backend::Openai => Some(crate::teacher::openai::endpoint(self.model.as_deref().unwrap_or_default())),
                // cf answers are not cached; a local model's endpoint hashes its
                // files, known only to recflow-ml: preview it without the cache.
                Backend::Cf | Backend::Local => None,
            },
            paid: self.backend == Backend::Openai,
            money: self.money(),
        }
    }
}

impl Stage for Teacher {
    fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        run_stage(cfg, ctx, &default_backend)
    }
}

/// What a backend factory gets.
pub struct BackendInputs {
    pub samples: Arc<Vec<Sample>>,
    pub train: PathBuf,
    pub items: PathBuf,
}

/// Builds the backend for a config. `recflow-ml` passes one that also
/// handles `backend: local` and defers the rest to [`default_backend`].
pub type BackendFactory = dyn Fn(&Config, &BackendInputs) -> anyhow::Result<Arc<dyn TeacherBackend>>;

/// The teacher stage's run, with a backend factory (see [`BackendFactory`]).
pub fn run_stage(cfg: &Config, ctx: &mut StageCtx, factory: &BackendFactory) -> anyhow::Result<Metrics> {
    let t_start = Instant::now();
    // 1. Inputs and the seeded subset.
    let samples = read_samples(ctx)?;
    let rows = select_rows(&samples, cfg.max_samples, ctx.seed);
    let inputs = BackendInputs {
        samples: samples.clone(),
        train: ctx.input("train")?.to_path_buf(),
        items: ctx.input("items")?.to_path_buf(),
    };

    // 2. Backend and response cache.
    let backend = factory(cfg, &inputs).with_context(|| format!("stage `{}`: cannot start the teacher", ctx.stage))?;
    let cache = if backend.cacheable() { Some(open_cache(cfg, ctx)?) } else { None };
    let teacher_name = backend.name();
    let sh = Arc::new(Shared::new(backend, cache.clone(), cfg.loop_config(), cfg.money(), ctx.cancel.clone()));

    // 3. Drive the loop, reporting progress (done / failed / rate / cost).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()).min(8))
        .build()
        .context("cannot start the async runtime")?;
    let events = &mut ctx.events;
    let mut on_progress = |sh: &Shared, total: u64, elapsed: Duration| emit_progress(events.as_mut(), sh, total, elapsed);
    let interval = Duration::from_secs_f64(cfg.progress_interval_s);
    let t_drive = Instant::now();
    let (results, stopped) =
        rt.block_on(drive(sh.clone(), samples.clone(), rows.clone(), cfg.concurrency, interval, &mut on_progress));
    let t_drove = Instant::now();
    if let Some(c) = &cache {
        c.close();
        let (a, f) = (c.stats.appended.load(Ordering::Relaxed), c.stats.fsyncs.load(Ordering::Relaxed));
        ctx.log("info", format!("response cache journal: {a} answers written with {f} fsyncs"));
    }
    let summary = summary(&sh, results.len(), rows.len());
    ctx.log("info", summary.clone());
    check_finished(cfg, &ctx.stage, stopped, &results, &samples, &summary)?;

    // 4. Outputs: rows in table order, stats.
    let outcomes: Vec<(usize, Outcome)> = results.into_iter().collect();
    let stats = write_outputs(ctx, &samples, &outcomes, &teacher_name)?;
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    ctx.log(
        "info",
        format!(
            "timing: setup {:.1} ms, requests {:.1} ms, outputs {:.1} ms",
            ms(t_start, t_drive),
            ms(t_drive, t_drove),
            ms(t_drove, Instant::now())
        ),
    );
    let mut m = metrics_of(&stats, &cfg.money());
    trace_length_metrics(ctx, &outcomes, &mut m)?;
    Ok(m)
}

/// Lengths of the accepted traces (issue 18): characters always, tokens in
/// the `tokenizer` input's vocabulary when the stage has one. The runner
/// checks the completion budgets downstream against `trace_tokens_max`
/// before SFT starts (`recflow::run::budget`).
fn trace_length_metrics(ctx: &mut StageCtx, outcomes: &[(usize, Outcome)], m: &mut Metrics) -> anyhow::Result<()> {
    use crate::teacher::stats::TraceLengths;
    let traces: Vec<&str> = outcomes.iter().filter(|(_, o)| o.accepted).filter_map(|(_, o)| o.completion.as_deref()).collect();
    let mut put = |unit: &str, l: Option<TraceLengths>| {
        if let Some(l) = l {
            for (q, v) in [("p50", l.p50), ("p95", l.p95), ("max", l.max)] {
                m.insert(format!("trace_{unit}_{q}"), v.into());
            }
        }
    };
    put("chars", TraceLengths::from_counts(traces.iter().map(|t| t.chars().count() as u64).collect()));
    if let Some(tp) = ctx.input_opt("tokenizer") {
        let tok = crate::util::load_tokenizer(tp).map_err(anyhow::Error::msg)?;
        let l = TraceLengths::of(traces.iter().copied(), &tok).map_err(anyhow::Error::msg)?;
        if let Some(l) = l {
            ctx.log("info", format!("accepted traces: {} tokens p50, {} p95, {} max", l.p50, l.p95, l.max));
        }
        put("tokens", l);
    }
    Ok(())
}

/// The `samples` input: not empty, every `sample_id` once.
fn read_samples(ctx: &StageCtx) -> anyhow::Result<Arc<Vec<Sample>>> {
    let samples_path = ctx.input("samples")?.to_path_buf();
    let samples = crate::data::io::read_samples(&samples_path)?;
    if samples.is_empty() {
        anyhow::bail!("stage `{}`: input `samples` ({}) has no rows", ctx.stage, samples_path.display());
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = samples.iter().find(|s| !seen.insert(s.sample_id.as_str())) {
        anyhow::bail!("stage `{}`: sample_id `{}` occurs twice in {}", ctx.stage, dup.sample_id, samples_path.display());
    }
    Ok(Arc::new(samples))
}

fn open_cache(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Arc<ResponseCache>> {
    let dir = response_cache_dir(cfg, &ctx.work_dir);
    let c = ResponseCache::open(&dir)?;
    ctx.log("info", format!("response cache {}: {} answers stored", dir.display(), c.len()));
    Ok(Arc::new(c))
}

fn emit_progress(events: &mut dyn EventSink, sh: &Shared, total: u64, elapsed: Duration) {
    let c = &sh.counters;
    let done = c.done.load(Ordering::Relaxed);
    let (bi, bo) = (c.bought_in.load(Ordering::Relaxed), c.bought_out.load(Ordering::Relaxed));
    let (ui, uo) = (c.used_in.load(Ordering::Relaxed), c.used_out.load(Ordering::Relaxed));
    events.emit(serde_json::json!({"progress": {
        "done": done, "total": total, "unit": "samples",
        "failed": c.failed.load(Ordering::Relaxed),
        "rate": done as f64 / elapsed.as_secs_f64().max(1e-9),
        "requests": c.requests.load(Ordering::Relaxed),
        "cache_hits": c.cache_hits.load(Ordering::Relaxed),
        "tokens_bought": bi + bo,
        "cost": sh.money.cost(bi, bo),
        "tokens_used": ui + uo,
        "cost_total": sh.money.cost(ui, uo),
    }}));
}

/// One line on what a drive bought and reused.
fn summary(sh: &Shared, done: usize, selected: usize) -> String {
    let c = &sh.counters;
    let (bi, bo) = (c.bought_in.load(Ordering::Relaxed), c.bought_out.load(Ordering::Relaxed));
    let (ui, uo) = (c.used_in.load(Ordering::Relaxed), c.used_out.load(Ordering::Relaxed));
    format!(
        "{done} of {selected} samples done; {} requests bought ({} tokens, ${:.4}), {} answers from the response cache; \
         answers used in total: {} tokens, ${:.4}",
        c.requests.load(Ordering::Relaxed),
        bi + bo,
        sh.money.cost(bi, bo),
        c.cache_hits.load(Ordering::Relaxed),
        ui + uo,
        sh.money.cost(ui, uo),
    )
}

/// Fails the stage when the drive stopped early, or when samples got no
/// answer and `on_request_failure: fail`; nothing is committed then.
fn check_finished(
    cfg: &Config,
    stage: &str,
    stopped: Option<Stopped>,
    results: &BTreeMap<usize, Outcome>,
    samples: &[Sample],
    summary: &str,
) -> anyhow::Result<()> {
    match stopped {
        None => {}
        Some(Stopped::Budget(m)) => anyhow::bail!(
            "stage `{stage}`: {m}; stopped cleanly ({summary}). Every answer bought is kept in the response cache: \
             raise or remove the budget and rerun to continue without paying twice"
        ),
        Some(Stopped::Fatal(m)) => anyhow::bail!("stage `{stage}`: {m} ({summary})"),
        Some(Stopped::Cancelled) => anyhow::bail!("stage `{stage}`: cancelled ({summary}); answers bought are kept"),
    }
    if cfg.on_request_failure == OnRequestFailure::Fail {
        if let Some(msg) = failure_report(results, samples) {
            anyhow::bail!(
                "stage `{stage}`: {msg}. Nothing is committed ({summary}); every answer bought is kept in the response cache, \
                 so a rerun asks only these samples again. To commit them as rejected rows instead, set \
                 `on_request_failure: record`"
            );
        }
    }
    Ok(())
}

/// Writes `coldstart` (one row per selected sample, in table order) and `stats`.
fn write_outputs(ctx: &StageCtx, samples: &[Sample], outcomes: &[(usize, Outcome)], teacher: &str) -> anyhow::Result<Stats> {
    let cold: Vec<ColdRow> = outcomes
        .iter()
        .map(|(row, o)| ColdRow {
            sample: samples[*row].clone(),
            completion: o.completion.clone(),
            accepted: o.accepted,
            reason: o.reason.clone(),
            attempts: o.attempts as i32,
            teacher: teacher.to_string(),
            reasoning_content: o.reasoning_content.clone(),
        })
        .collect();
    crate::data::io::write_coldstart(&ctx.output("coldstart")?, &cold)?;
    let stats = stats_of(outcomes, teacher);
    // A plain write: the output dir is scratch, and committing it to the
    // store syncs every file (an fsync here would be paid twice).
    let stats_path = ctx.output("stats")?;
    std::fs::write(&stats_path, serde_json::to_string_pretty(&stats)?)
        .with_context(|| format!("cannot write {}", stats_path.display()))?;
    Ok(stats)
}

fn metrics_of(stats: &Stats, money: &Money) -> Metrics {
    let mut m = Metrics::new();
    m.insert("n_samples".into(), stats.n_samples.into());
    m.insert("accepted".into(), stats.accepted.into());
    m.insert("rejected".into(), stats.rejected.into());
    m.insert("first_try_accuracy".into(), stats.first_try_accuracy.into());
    m.insert("tokens_in".into(), stats.tokens_in.into());
    m.insert("tokens_out".into(), stats.tokens_out.into());
    m.insert("cost_usd".into(), money.cost(stats.tokens_in, stats.tokens_out).into());
    m
}

/// The torch-free backends: `openai` and `cf`. `local` needs the generation
/// engine, so only `recflow-worker` (recflow-ml) can run it.
pub fn default_backend(cfg: &Config, inp: &BackendInputs) -> anyhow::Result<Arc<dyn TeacherBackend>> {
    use crate::teacher::{cf, openai};
    match cfg.backend {
        Backend::Openai => {
            let c = openai::ClientConfig {
                base_url: cfg.base_url.clone().unwrap_or_default(),
                model: cfg.model.clone().unwrap_or_default(),
                api_key_env: cfg.api_key_env.clone(),
                concurrency: cfg.concurrency,
                request_timeout: Duration::from_secs_f64(cfg.request_timeout_s),
                connect_timeout: Duration::from_secs_f64(cfg.connect_timeout_s),
                max_retries: cfg.max_retries,
                max_malformed_retries: cfg.max_malformed_retries,
                backoff_base: Duration::from_secs_f64(cfg.backoff_base_s),
                backoff_max: Duration::from_secs_f64(cfg.backoff_max_s),
                requests_per_min: cfg.requests_per_min,
                tokens_per_min: cfg.tokens_per_min,
            };
            Ok(Arc::new(openai::OpenAi::new(c)?))
        }
        Backend::Cf => {
            let train = crate::data::io::read_interactions(&inp.train)?;
            let items = crate::data::io::read_items(&inp.items)?;
            Ok(Arc::new(cf::CfTeacher::new(inp.samples.clone(), train, items, cfg.scale).with_style(cfg.cf_style).with_estimate(cfg.cf_estimate).with_rating_offset(cfg.cf_rating_offset).with_rating_noise(cfg.cf_rating_noise).with_show_estimate(cfg.cf_show_estimate)))
        }
        Backend::Local => anyhow::bail!(
            "backend: local runs a model with recflow's generation engine, which lives in recflow-worker \
             (crate recflow-ml); this worker is torch-free. Run the pipeline with the standard recflow-worker, \
             or use backend: openai against a local server (vLLM, llama.cpp, Ollama)"
        ),
    }
}

/// Where the response cache lives: `response_cache`, else
/// `$RECFLOW_CACHE/responses`, else `<work_dir>/../../responses` (the store
/// root under the engine's `<store>/<area>/<key>` work-dir layout).
pub fn response_cache_dir(cfg: &Config, work_dir: &Path) -> PathBuf {
    if let Some(p) = &cfg.response_cache {
        return PathBuf::from(p);
    }
    if let Some(c) = std::env::var_os("RECFLOW_CACHE").filter(|c| !c.is_empty()) {
        return PathBuf::from(c).join("responses");
    }
    match work_dir.parent().and_then(Path::parent) {
        Some(root) if !root.as_os_str().is_empty() => root.join("responses"),
        _ => work_dir.join("responses"),
    }
}

/// `--dry-run` preview without a seed or a response cache (what preflight
/// shows before the run): see [`crate::teacher::preview::preview`].
pub fn preview(cfg: &Config, samples: &[Sample]) -> Preview {
    crate::teacher::preview::preview(&cfg.preview_config(), samples)
}

/// The exact preview from paths: reads the `samples` table and opens the
/// response cache where the stage would ([`response_cache_dir`] of
/// `work_dir`, the stage's work dir `<store>/work/<key>`) without creating
/// anything; see [`crate::teacher::preview::preview_with_cache`].
pub fn preview_stage(cfg: &Config, samples: &Path, seed: u64, work_dir: &Path) -> anyhow::Result<Preview> {
    let table = crate::data::io::read_samples(samples)?;
    let cache = match cfg.backend {
        Backend::Openai => Some(ResponseCache::load(&response_cache_dir(cfg, work_dir))?),
        Backend::Cf | Backend::Local => None,
    };
    Ok(crate::teacher::preview::preview_with_cache(&cfg.preview_config(), &table, seed, cache.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: serde_json::Value) -> Config {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn preview_config_replays_and_prices_only_openai_answers() {
        let o = cfg(serde_json::json!({"backend": "openai", "base_url": "http://x/v1", "model": "m", "price_in_per_mtok": 2.0}));
        let pc = o.preview_config();
        assert_eq!(pc.endpoint.as_deref(), Some(crate::teacher::openai::endpoint("m").as_str()), "the run's cache endpoint");
        assert!(pc.paid && pc.money.price_in_per_mtok == 2.0, "openai answers are priced");
        let c = cfg(serde_json::json!({"backend": "cf"})).preview_config();
        assert!(c.endpoint.is_none() && !c.paid, "cf answers are neither cached nor paid");
    }

    #[test]
    fn loop_config_carries_the_sampling_and_the_hint() {
        let c = cfg(serde_json::json!({"backend": "cf", "temperature": 0.3, "max_tokens": 77, "sampling_seed": 5, "max_rationalize": 1}));
        let lc = c.loop_config();
        assert_eq!((lc.sampling.temperature, lc.sampling.max_tokens, lc.sampling.seed), (0.3, 77, Some(5)), "sampling from the config");
        assert_eq!(lc.max_rationalize, 1);
        assert_eq!(lc.hint_template, crate::teacher::rationalize::DEFAULT_HINT, "default hint");
    }

    /// Keys hash the serialized config: a minimal `with:` (only the required
    /// `backend`) and a typical one must serialize to exactly these strings
    /// (fields, order, values, and the default `cf_estimate` left out).
    #[test]
    fn defaults_resolve_to_the_keyed_values() {
        let ser = |v: serde_json::Value| serde_json::to_string(&cfg(v)).unwrap();
        assert_eq!(
            ser(serde_json::json!({"backend": "cf"})),
            r#"{"backend":"cf","base_url":null,"model":null,"api_key_env":null,"model_dir":null,"device":null,"dtype":null,"temperature":0.6,"top_p":null,"max_tokens":4096,"sampling_seed":null,"max_samples":null,"max_rationalize":3,"tolerance":null,"scale":{"min":1.0,"max":5.0},"hint_template":"\n\n(For this attempt only: the user's rating of this item was {rating}. Write your analysis so that it reaches this rating from the evidence above, in the same format, and do not mention this note, that you were told the rating, or any \"actual\" or \"true\" rating.)","cf_style":"verbose","on_request_failure":"fail","concurrency":8,"request_timeout_s":600.0,"connect_timeout_s":30.0,"max_retries":8,"max_malformed_retries":3,"backoff_base_s":1.0,"backoff_max_s":60.0,"requests_per_min":null,"tokens_per_min":null,"price_in_per_mtok":0.0,"price_out_per_mtok":0.0,"budget_tokens":null,"budget_usd":null,"progress_interval_s":2.0,"response_cache":null}"#
        );
        let typical = serde_json::json!({
            "backend": "cf", "cf_style": "concise", "cf_estimate": "mean_of_averages", "max_rationalize": 1, "tolerance": 1
        });
        assert_eq!(
            ser(typical),
            r#"{"backend":"cf","base_url":null,"model":null,"api_key_env":null,"model_dir":null,"device":null,"dtype":null,"temperature":0.6,"top_p":null,"max_tokens":4096,"sampling_seed":null,"max_samples":null,"max_rationalize":1,"tolerance":1.0,"scale":{"min":1.0,"max":5.0},"hint_template":"\n\n(For this attempt only: the user's rating of this item was {rating}. Write your analysis so that it reaches this rating from the evidence above, in the same format, and do not mention this note, that you were told the rating, or any \"actual\" or \"true\" rating.)","cf_style":"concise","cf_estimate":"mean_of_averages","on_request_failure":"fail","concurrency":8,"request_timeout_s":600.0,"connect_timeout_s":30.0,"max_retries":8,"max_malformed_retries":3,"backoff_base_s":1.0,"backoff_max_s":60.0,"requests_per_min":null,"tokens_per_min":null,"price_in_per_mtok":0.0,"price_out_per_mtok":0.0,"budget_tokens":null,"budget_usd":null,"progress_interval_s":2.0,"response_cache":null}"#
        );
    }

    /// `backend` has no default: a `with:` without it is refused by name,
    /// not filled in.
    #[test]
    fn backend_stays_required() {
        let e = serde_json::from_value::<Config>(serde_json::json!({"cf_style": "concise"})).unwrap_err();
        assert_eq!(e.to_string(), "missing field `backend`");
    }
}
