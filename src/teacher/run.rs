//! The rationalization loop and the teacher stage's driver.
//!
//! Per sample (RecOne cold start; rationalization as in STaR, Zelikman et
//! al. 2022): attempt 1 sends the original prompt. The answer is parsed with
//! [`crate::answer::parse`]; it is accepted when it is well formed, does not
//! leak the hint ([`super::leak`]) and its rating is within `tolerance` of the
//! target (default: equal after rounding). Otherwise the sample is asked
//! again with the hint (the true rating, appended to the last user message
//! with an instruction not to mention it — one message, because some servers,
//! e.g. deepseek-reasoner, reject two consecutive user messages), up to
//! `max_rationalize` more times. The record keeps the original prompt, the
//! accepted completion, the attempt count and, when rejected, the last reason.
//!
//! Every answer passes through the response cache before it is used: a hit
//! costs nothing; a miss is bought, stored durably, then used. The driver
//! runs sample tasks on tokio (up to 2 × `concurrency` sample tasks, so that
//! one waiting for its fsync does not hold a network slot; the network
//! concurrency itself is bounded inside the backend).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::cache::ResponseCache;
use super::io::{self, ColdRow, Sample};
use super::{Message, Reply, Request, Sampling, TeacherBackend, TeacherError};
use crate::answer::{self, Scale};
use crate::stages::teacher::{Backend, Config};
use crate::stages::{Metrics, StageCtx};

/// Default hint, appended to the last user message on hinted attempts.
pub const DEFAULT_HINT: &str = "\n\n(For this attempt only: the user's rating of this item was {rating}. Write your \
analysis so that it reaches this rating from the evidence above, in the same format, and do not mention this note, \
that you were told the rating, or any \"actual\" or \"true\" rating.)";

/// What the loop needs besides the backend.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub max_rationalize: u32,
    pub tolerance: Option<f32>,
    pub scale: Scale,
    pub hint_template: String,
    pub sampling: Sampling,
}

impl LoopConfig {
    pub fn from_config(c: &Config) -> Self {
        LoopConfig {
            max_rationalize: c.max_rationalize,
            tolerance: c.tolerance,
            scale: c.scale,
            hint_template: c.hint_template.clone(),
            sampling: Sampling { temperature: c.temperature, top_p: c.top_p, max_tokens: c.max_tokens, seed: c.sampling_seed },
        }
    }
}

/// Whether a predicted rating counts as correct.
pub fn within_tolerance(pred: f32, target: f32, tol: Option<f32>) -> bool {
    match tol {
        None => pred.round() == target.round(),
        Some(t) => (pred - target).abs() <= t + 1e-6,
    }
}

/// The prompt of attempt `attempt` (≥ 2 carries the hint).
pub fn attempt_messages(original: &[Message], attempt: u32, target: f32, template: &str) -> Vec<Message> {
    let mut m = original.to_vec();
    if attempt >= 2 {
        let r = if target.fract() == 0.0 { format!("{}", target as i64) } else { format!("{target}") };
        let hint = template.replace("{rating}", &r);
        match m.iter_mut().rev().find(|x| x.role == "user") {
            Some(last) => last.content.push_str(&hint),
            None => m.push(Message { role: "user".into(), content: hint.trim_start().to_string() }),
        }
    }
    m
}

/// Verdict on one answer: `Ok(rating)` or `Err((code, detail))`.
pub fn judge(content: &str, target: f32, cfg: &LoopConfig) -> Result<f32, (&'static str, String)> {
    let a = answer::parse(content, cfg.scale).map_err(|e| (format_code(&e), format!("{e}")))?;
    if let Some(leak) = super::leak::find_leak(content) {
        return Err(("hint_leak", leak.to_string()));
    }
    if !within_tolerance(a.rating, target, cfg.tolerance) {
        return Err(("wrong_rating", format!("rated {} but the target is {}", a.rating, target)));
    }
    Ok(a.rating)
}

fn format_code(e: &answer::Invalid) -> &'static str {
    match e.code() {
        "missing_tag" => "format_missing_tag",
        "repeated_tag" => "format_repeated_tag",
        "tag_order" => "format_tag_order",
        "empty_block" => "format_empty_block",
        "rating_not_a_number" => "format_rating_not_a_number",
        "rating_out_of_scale" => "format_rating_out_of_scale",
        _ => "format_invalid",
    }
}

/// Outcome of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub completion: Option<String>,
    pub reasoning_content: Option<String>,
    pub accepted: bool,
    /// `code: detail` when rejected.
    pub reason: Option<String>,
    pub reason_code: Option<&'static str>,
    pub attempts: u32,
    /// Attempt 1 was well formed and within tolerance.
    pub first_try_correct: bool,
    pub tokens_in: u64,
    pub tokens_out: u64,
}

/// Running counters (progress, budget, logs). Not part of outputs.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub cache_hits: AtomicU64,
    pub bought_in: AtomicU64,
    pub bought_out: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
}

/// Prices and budget (operational).
#[derive(Debug, Clone, Copy, Default)]
pub struct Money {
    pub price_in_per_mtok: f64,
    pub price_out_per_mtok: f64,
    pub budget_tokens: Option<u64>,
    pub budget_usd: Option<f64>,
}

impl Money {
    pub fn cost(&self, tokens_in: u64, tokens_out: u64) -> f64 {
        (tokens_in as f64 * self.price_in_per_mtok + tokens_out as f64 * self.price_out_per_mtok) / 1e6
    }
}

/// Shared state of one drive.
pub struct Shared {
    pub backend: Arc<dyn TeacherBackend>,
    pub cache: Option<Arc<ResponseCache>>,
    pub cfg: LoopConfig,
    pub money: Money,
    pub counters: Counters,
    pub cancel: Arc<AtomicBool>,
    /// Set once the budget is reached: no new purchases.
    pub stop: AtomicBool,
}

impl Shared {
    fn budget_left(&self) -> Result<(), TeacherError> {
        let i = self.counters.bought_in.load(Ordering::Relaxed);
        let o = self.counters.bought_out.load(Ordering::Relaxed);
        if let Some(b) = self.money.budget_tokens {
            if i + o >= b {
                return Err(TeacherError::Budget(format!("{} tokens bought, budget_tokens = {b}", i + o)));
            }
        }
        if let Some(b) = self.money.budget_usd {
            let c = self.money.cost(i, o);
            if c >= b {
                return Err(TeacherError::Budget(format!("${c:.4} spent, budget_usd = {b}")));
            }
        }
        Ok(())
    }

    /// Answer of one request: from the cache, or bought and stored first.
    async fn answer(&self, req: &Request) -> Result<Reply, TeacherError> {
        let cache = self.cache.as_ref().filter(|_| self.backend.cacheable());
        let id = req.identity(&self.backend.endpoint());
        if let Some(r) = cache.and_then(|c| c.get(&id)) {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(r);
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(TeacherError::Cancelled);
        }
        if self.stop.load(Ordering::Relaxed) {
            return Err(TeacherError::Budget("stopped after the budget was reached".into()));
        }
        if let Err(e) = self.budget_left() {
            self.stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let reply = self.backend.ask(req).await?;
        if let Some(c) = cache {
            c.put(&id, &reply).await.map_err(|e| TeacherError::Fatal(format!("{e}")))?;
        }
        self.counters.bought_in.fetch_add(reply.usage.prompt_tokens, Ordering::Relaxed);
        self.counters.bought_out.fetch_add(reply.usage.completion_tokens, Ordering::Relaxed);
        Ok(reply)
    }
}

/// The rationalization loop for one sample. Budget, cancellation and fatal
/// errors propagate; request failures after retries become a rejected outcome.
pub async fn teach_one(sh: &Shared, row: usize, s: &Sample) -> Result<Outcome, TeacherError> {
    let mut out = Outcome {
        completion: None,
        reasoning_content: None,
        accepted: false,
        reason: None,
        reason_code: None,
        attempts: 0,
        first_try_correct: false,
        tokens_in: 0,
        tokens_out: 0,
    };
    for attempt in 1..=1 + sh.cfg.max_rationalize {
        let req = Request {
            sample_id: s.sample_id.clone(),
            attempt,
            messages: attempt_messages(&s.messages, attempt, s.target, &sh.cfg.hint_template),
            sampling: sh.cfg.sampling.clone(),
            hint: (attempt >= 2).then_some(s.target),
            row,
        };
        out.attempts = attempt;
        let reply = match sh.answer(&req).await {
            Ok(r) => r,
            Err(TeacherError::Failed { code, message, .. }) => {
                // No try count in the record: it varies with transient faults.
                out.reason_code = Some("request_failed");
                out.reason = Some(format!("request_failed: {code}: {message}"));
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        out.tokens_in += reply.usage.prompt_tokens;
        out.tokens_out += reply.usage.completion_tokens;
        let verdict = judge(&reply.content, s.target, &sh.cfg);
        if attempt == 1 {
            // First-try accuracy measures the teacher, not the leak filter.
            out.first_try_correct = answer::parse(&reply.content, sh.cfg.scale)
                .is_ok_and(|a| within_tolerance(a.rating, s.target, sh.cfg.tolerance));
        }
        match verdict {
            Ok(_) => {
                out.accepted = true;
                out.reason = None;
                out.reason_code = None;
                out.completion = Some(reply.content);
                out.reasoning_content = reply.reasoning_content;
                return Ok(out);
            }
            Err((code, detail)) => {
                out.reason_code = Some(code);
                out.reason = Some(format!("{code}: {detail}"));
                // Keep the last answer of a rejected sample for inspection.
                out.completion = Some(reply.content);
                out.reasoning_content = reply.reasoning_content;
            }
        }
    }
    Ok(out)
}

/// Why a drive stopped early.
#[derive(Debug)]
pub enum Stopped {
    Budget(String),
    Fatal(String),
    Cancelled,
}

/// Runs the loop over `rows` of `samples`; `on_progress` is called at most
/// every `interval` and once at the end.
pub async fn drive(
    sh: Arc<Shared>,
    samples: Arc<Vec<Sample>>,
    rows: Vec<usize>,
    concurrency: usize,
    interval: Duration,
    on_progress: &mut dyn FnMut(&Shared, u64, Duration),
) -> (BTreeMap<usize, Outcome>, Option<Stopped>) {
    let total = rows.len() as u64;
    let started = Instant::now();
    let mut results = BTreeMap::new();
    let mut stopped: Option<Stopped> = None;
    let mut pending = rows.into_iter();
    let mut set = tokio::task::JoinSet::new();
    let max_tasks = concurrency.max(1) * 2;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        while stopped.is_none() && set.len() < max_tasks && !sh.cancel.load(Ordering::Relaxed) {
            let Some(row) = pending.next() else { break };
            let (sh2, samples2) = (sh.clone(), samples.clone());
            set.spawn(async move { (row, teach_one(&sh2, row, &samples2[row]).await) });
        }
        if set.is_empty() {
            break;
        }
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                match joined {
                    Ok((row, Ok(o))) => {
                        sh.counters.done.fetch_add(1, Ordering::Relaxed);
                        if o.reason_code == Some("request_failed") {
                            sh.counters.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        results.insert(row, o);
                    }
                    Ok((_, Err(TeacherError::Budget(m)))) => {
                        sh.stop.store(true, Ordering::Relaxed);
                        stopped.get_or_insert(Stopped::Budget(m));
                    }
                    Ok((_, Err(TeacherError::Cancelled))) => {
                        stopped.get_or_insert(Stopped::Cancelled);
                    }
                    Ok((_, Err(e))) => {
                        // Fatal: stop buying, let in-flight answers land in the cache.
                        sh.stop.store(true, Ordering::Relaxed);
                        stopped = Some(Stopped::Fatal(e.to_string()));
                    }
                    Err(join) => {
                        sh.stop.store(true, Ordering::Relaxed);
                        stopped = Some(Stopped::Fatal(format!("teacher task panicked: {join}")));
                    }
                }
            }
            _ = tick.tick() => on_progress(&sh, total, started.elapsed()),
        }
        if sh.cancel.load(Ordering::Relaxed) && stopped.is_none() {
            stopped = Some(Stopped::Cancelled);
        }
    }
    on_progress(&sh, total, started.elapsed());
    (results, stopped)
}

/// The seeded subset of at most `k` rows: rows ranked by sha256(seed, sample
/// id), the first `k` kept, returned in table order. Raising `k` keeps every
/// earlier row (so only new samples are asked).
pub fn select_rows(samples: &[Sample], k: Option<usize>, seed: u64) -> Vec<usize> {
    let n = samples.len();
    match k {
        Some(k) if k < n => {
            let mut ranked: Vec<(Vec<u8>, usize)> = samples
                .iter()
                .enumerate()
                .map(|(i, s)| (Sha256::digest(format!("{seed}\0{}", s.sample_id).as_bytes()).to_vec(), i))
                .collect();
            ranked.sort();
            let mut rows: Vec<usize> = ranked.into_iter().take(k).map(|(_, i)| i).collect();
            rows.sort_unstable();
            rows
        }
        _ => (0..n).collect(),
    }
}

/// `--dry-run` preview: what a run would ask, before anything is bought.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    pub n_samples: usize,
    /// Requests if every first answer is accepted.
    pub requests_min: u64,
    /// Requests if every sample uses all attempts.
    pub requests_max: u64,
    /// Estimated prompt tokens of the first attempts (chars / 4 + 4 per message).
    pub est_tokens_in: u64,
    /// Upper bound of completion tokens of the first attempts (`max_tokens` each).
    pub est_tokens_out_max: u64,
    /// Cost of the first attempts at the configured prices, with
    /// completions at `max_tokens` (an upper bound of the no-retry case).
    pub est_cost_first_usd: f64,
    /// Cost if every sample used all attempts at `max_tokens`.
    pub est_cost_max_usd: f64,
    /// Offline backends (`cf`, `local`) cost nothing.
    pub paid: bool,
}

/// Estimated prompt tokens of a message list (≈ 4 characters per token).
pub fn estimate_tokens(messages: &[Message]) -> u64 {
    messages.iter().map(|m| m.content.len() as u64 / 4 + 4).sum()
}

/// Pure preview of a teacher run (the engine's `--dry-run` calls it). With
/// `max_samples` below the table size, token estimates scale the table's
/// mean by the selected count (the subset itself depends on the seed).
pub fn preview(cfg: &Config, samples: &[Sample]) -> Preview {
    let n_all = samples.len();
    let n = cfg.max_samples.map_or(n_all, |k| k.min(n_all));
    let all_in: u64 = samples.iter().map(|s| estimate_tokens(&s.messages)).sum();
    let est_in = if n_all == 0 { 0 } else { (all_in as f64 * n as f64 / n_all as f64).round() as u64 };
    let hint_tokens = (cfg.hint_template.len() / 4 + 1) as u64;
    let attempts = 1 + cfg.max_rationalize as u64;
    let out_first = n as u64 * cfg.max_tokens as u64;
    let paid = cfg.backend == Backend::Openai;
    let money = Money { price_in_per_mtok: cfg.price_in_per_mtok, price_out_per_mtok: cfg.price_out_per_mtok, ..Default::default() };
    let cost_first = if paid { money.cost(est_in, out_first) } else { 0.0 };
    let in_max = est_in * attempts + hint_tokens * n as u64 * (attempts - 1);
    let cost_max = if paid { money.cost(in_max, out_first * attempts) } else { 0.0 };
    Preview {
        n_samples: n,
        requests_min: n as u64,
        requests_max: n as u64 * attempts,
        est_tokens_in: est_in,
        est_tokens_out_max: out_first,
        est_cost_first_usd: cost_first,
        est_cost_max_usd: cost_max,
        paid,
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

/// The torch-free backends: `openai` and `cf`. `local` needs the generation
/// engine, so only `recflow-worker` (recflow-ml) can run it.
pub fn default_backend(cfg: &Config, inp: &BackendInputs) -> anyhow::Result<Arc<dyn TeacherBackend>> {
    match cfg.backend {
        Backend::Openai => {
            let c = super::openai::ClientConfig {
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
            Ok(Arc::new(super::openai::OpenAi::new(c)?))
        }
        Backend::Cf => {
            let train = crate::data::io::read_interactions(&inp.train)?;
            let items = crate::data::io::read_items(&inp.items)?;
            Ok(Arc::new(super::cf::CfTeacher::new(inp.samples.clone(), train, items, cfg.scale).with_style(cfg.cf_style)))
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

/// The stats output (pinned keys first).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Stats {
    pub n_samples: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub first_try_accuracy: f64,
    pub attempts_hist: BTreeMap<String, u64>,
    pub reasons: BTreeMap<String, u64>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub teacher: String,
    /// Accepted after at least one hinted attempt.
    pub rationalized: u64,
}

/// Stats of a finished run.
pub fn stats_of(rows: &[(usize, Outcome)], teacher: &str) -> Stats {
    let n = rows.len() as u64;
    let mut st = Stats {
        n_samples: n,
        accepted: 0,
        rejected: 0,
        first_try_accuracy: 0.0,
        attempts_hist: BTreeMap::new(),
        reasons: BTreeMap::new(),
        tokens_in: 0,
        tokens_out: 0,
        teacher: teacher.to_string(),
        rationalized: 0,
    };
    let mut first = 0u64;
    for (_, o) in rows {
        if o.accepted {
            st.accepted += 1;
            if o.attempts > 1 {
                st.rationalized += 1;
            }
        } else {
            st.rejected += 1;
            *st.reasons.entry(o.reason_code.unwrap_or("unknown").to_string()).or_default() += 1;
        }
        first += o.first_try_correct as u64;
        *st.attempts_hist.entry(o.attempts.to_string()).or_default() += 1;
        st.tokens_in += o.tokens_in;
        st.tokens_out += o.tokens_out;
    }
    st.first_try_accuracy = if n == 0 { 0.0 } else { first as f64 / n as f64 };
    st
}

/// The teacher stage's run, with a backend factory (see [`BackendFactory`]).
pub fn run_stage(cfg: &Config, ctx: &mut StageCtx, factory: &BackendFactory) -> anyhow::Result<Metrics> {
    // 1. Inputs and the seeded subset.
    let samples_path = ctx.input("samples")?.to_path_buf();
    let samples = Arc::new(crate::data::io::read_samples(&samples_path)?);
    if samples.is_empty() {
        anyhow::bail!("stage `{}`: input `samples` ({}) has no rows", ctx.stage, samples_path.display());
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = samples.iter().find(|s| !seen.insert(s.sample_id.as_str())) {
        anyhow::bail!("stage `{}`: sample_id `{}` occurs twice in {}", ctx.stage, dup.sample_id, samples_path.display());
    }
    let rows = select_rows(&samples, cfg.max_samples, ctx.seed);
    let inputs = BackendInputs {
        samples: samples.clone(),
        train: ctx.input("train")?.to_path_buf(),
        items: ctx.input("items")?.to_path_buf(),
    };

    // 2. Backend and response cache.
    let backend = factory(cfg, &inputs).with_context(|| format!("stage `{}`: cannot start the teacher", ctx.stage))?;
    let cache = if backend.cacheable() {
        let dir = response_cache_dir(cfg, &ctx.work_dir);
        let c = ResponseCache::open(&dir)?;
        ctx.log("info", format!("response cache {}: {} answers stored", dir.display(), c.len()));
        Some(Arc::new(c))
    } else {
        None
    };
    let teacher_name = backend.name();
    let money = Money {
        price_in_per_mtok: cfg.price_in_per_mtok,
        price_out_per_mtok: cfg.price_out_per_mtok,
        budget_tokens: cfg.budget_tokens,
        budget_usd: cfg.budget_usd,
    };
    let sh = Arc::new(Shared {
        backend,
        cache: cache.clone(),
        cfg: LoopConfig::from_config(cfg),
        money,
        counters: Counters::default(),
        cancel: ctx.cancel.clone(),
        stop: AtomicBool::new(false),
    });

    // 3. Drive the loop, reporting progress (done / failed / rate / cost).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()).min(8))
        .build()
        .context("cannot start the async runtime")?;
    let events = &mut ctx.events;
    let mut on_progress = |sh: &Shared, total: u64, elapsed: Duration| {
        let c = &sh.counters;
        let done = c.done.load(Ordering::Relaxed);
        let (bi, bo) = (c.bought_in.load(Ordering::Relaxed), c.bought_out.load(Ordering::Relaxed));
        events.emit(serde_json::json!({"progress": {
            "done": done, "total": total, "unit": "samples",
            "failed": c.failed.load(Ordering::Relaxed),
            "rate": done as f64 / elapsed.as_secs_f64().max(1e-9),
            "requests": c.requests.load(Ordering::Relaxed),
            "cache_hits": c.cache_hits.load(Ordering::Relaxed),
            "tokens_bought": bi + bo,
            "cost": sh.money.cost(bi, bo),
        }}));
    };
    let interval = Duration::from_secs_f64(cfg.progress_interval_s);
    let (results, stopped) =
        rt.block_on(drive(sh.clone(), samples.clone(), rows.clone(), cfg.concurrency, interval, &mut on_progress));
    if let Some(c) = &cache {
        c.close();
        let (a, f) = (c.stats.appended.load(Ordering::Relaxed), c.stats.fsyncs.load(Ordering::Relaxed));
        ctx.log("info", format!("response cache journal: {a} answers written with {f} fsyncs"));
    }
    let c = &sh.counters;
    let (bi, bo) = (c.bought_in.load(Ordering::Relaxed), c.bought_out.load(Ordering::Relaxed));
    let summary = format!(
        "{} of {} samples done; {} requests bought ({} tokens, ${:.4}), {} answers from the response cache",
        results.len(),
        rows.len(),
        c.requests.load(Ordering::Relaxed),
        bi + bo,
        sh.money.cost(bi, bo),
        c.cache_hits.load(Ordering::Relaxed)
    );
    ctx.log("info", summary.clone());
    match stopped {
        None => {}
        Some(Stopped::Budget(m)) => anyhow::bail!(
            "stage `{}`: {m}; stopped cleanly ({summary}). Every answer bought is kept in the response cache: \
             raise or remove the budget and rerun to continue without paying twice",
            ctx.stage
        ),
        Some(Stopped::Fatal(m)) => anyhow::bail!("stage `{}`: {m} ({summary})", ctx.stage),
        Some(Stopped::Cancelled) => anyhow::bail!("stage `{}`: cancelled ({summary}); answers bought are kept", ctx.stage),
    }

    // 4. Outputs: rows in table order, stats.
    let outcomes: Vec<(usize, Outcome)> = results.into_iter().collect();
    let cold: Vec<ColdRow> = outcomes
        .iter()
        .map(|(row, o)| ColdRow {
            sample: samples[*row].clone(),
            completion: o.completion.clone(),
            accepted: o.accepted,
            reason: o.reason.clone(),
            attempts: o.attempts as i32,
            teacher: teacher_name.clone(),
            reasoning_content: o.reasoning_content.clone(),
        })
        .collect();
    io::write_coldstart(&ctx.output("coldstart")?, &cold)?;
    let stats = stats_of(&outcomes, &teacher_name);
    crate::util::write_atomic(&ctx.output("stats")?, serde_json::to_string_pretty(&stats)?.as_bytes())?;

    let mut m = Metrics::new();
    m.insert("n_samples".into(), stats.n_samples.into());
    m.insert("accepted".into(), stats.accepted.into());
    m.insert("rejected".into(), stats.rejected.into());
    m.insert("first_try_accuracy".into(), stats.first_try_accuracy.into());
    m.insert("tokens_in".into(), stats.tokens_in.into());
    m.insert("tokens_out".into(), stats.tokens_out.into());
    m.insert("cost_usd".into(), money.cost(stats.tokens_in, stats.tokens_out).into());
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(c: &str) -> Vec<Message> {
        vec![Message { role: "system".into(), content: "sys".into() }, Message { role: "user".into(), content: c.into() }]
    }

    #[test]
    fn hint_goes_into_the_last_user_message_only_on_retries() {
        let m = msg("rate it");
        assert_eq!(attempt_messages(&m, 1, 4.0, DEFAULT_HINT), m, "attempt 1 is the original prompt");
        let h = attempt_messages(&m, 2, 4.0, DEFAULT_HINT);
        assert_eq!(h.len(), 2, "no extra message (servers reject consecutive user turns)");
        assert!(h[1].content.starts_with("rate it") && h[1].content.contains("was 4."), "{}", h[1].content);
    }

    #[test]
    fn tolerance_default_is_match_after_rounding() {
        assert!(within_tolerance(4.4, 4.0, None));
        assert!(!within_tolerance(4.6, 4.0, None));
        assert!(within_tolerance(4.5, 4.0, Some(0.5)));
        assert!(!within_tolerance(3.0, 4.0, Some(0.5)));
    }

    #[test]
    fn selection_grows_monotonically() {
        let samples: Vec<Sample> = (0..50)
            .map(|i| Sample {
                sample_id: format!("s{i}"),
                user_id: "u".into(),
                item_id: "i".into(),
                timestamp: 0,
                messages: vec![],
                target: 3.0,
                user_history_len: 0,
                item_history_len: 0,
            })
            .collect();
        let a = select_rows(&samples, Some(10), 7);
        let b = select_rows(&samples, Some(20), 7);
        assert_eq!(a.len(), 10);
        assert!(a.iter().all(|r| b.contains(r)), "raising max_samples must keep the earlier subset");
        assert_ne!(a, select_rows(&samples, Some(10), 8), "the subset depends on the seed");
    }
}
