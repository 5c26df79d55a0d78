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
use crate::stages::teacher::{Backend, Config, OnRequestFailure};
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
    /// For `request_failed`: the transport code of the last failure
    /// (`server_error`, `malformed_json`, `timeout`, …).
    pub failure_code: Option<&'static str>,
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
    /// Tokens of answers bought by this run.
    pub bought_in: AtomicU64,
    pub bought_out: AtomicU64,
    /// Tokens of every answer used so far: bought now or reused from the
    /// response cache. The budget counts these (the dataset's total cost).
    pub used_in: AtomicU64,
    pub used_out: AtomicU64,
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
    /// The budget caps the dataset's total cost: the tokens of every answer
    /// used so far, whether reused from the response cache or bought now
    /// (so rerunning after a stop with the same budget buys nothing more).
    fn budget_left(&self) -> Result<(), TeacherError> {
        let c = &self.counters;
        let (i, o) = (c.used_in.load(Ordering::Relaxed), c.used_out.load(Ordering::Relaxed));
        let bought = c.bought_in.load(Ordering::Relaxed) + c.bought_out.load(Ordering::Relaxed);
        let whose = || format!("{bought} of them bought by this run, the rest reused from the response cache");
        if let Some(b) = self.money.budget_tokens {
            if i + o >= b {
                return Err(TeacherError::Budget(format!(
                    "the answers used so far total {} tokens ({}), budget_tokens = {b}",
                    i + o,
                    whose()
                )));
            }
        }
        if let Some(b) = self.money.budget_usd {
            let cost = self.money.cost(i, o);
            if cost >= b {
                return Err(TeacherError::Budget(format!(
                    "the answers used so far cost ${cost:.4} ({} tokens, {}), budget_usd = {b}",
                    i + o,
                    whose()
                )));
            }
        }
        Ok(())
    }

    fn count_used(&self, r: &Reply) {
        self.counters.used_in.fetch_add(r.usage.prompt_tokens, Ordering::Relaxed);
        self.counters.used_out.fetch_add(r.usage.completion_tokens, Ordering::Relaxed);
    }

    /// Answer of one request: from the cache, or bought and stored first.
    async fn answer(&self, req: &Request) -> Result<Reply, TeacherError> {
        let cache = self.cache.as_ref().filter(|_| self.backend.cacheable());
        let id = req.identity(&self.backend.endpoint());
        if let Some(r) = cache.and_then(|c| c.get(&id)) {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            self.count_used(&r);
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
        self.count_used(&reply);
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
        failure_code: None,
        attempts: 0,
        first_try_correct: false,
        tokens_in: 0,
        tokens_out: 0,
    };
    for attempt in 1..=1 + sh.cfg.max_rationalize {
        let req = request_for(s, row, attempt, &sh.cfg);
        out.attempts = attempt;
        let reply = match sh.answer(&req).await {
            Ok(r) => r,
            Err(TeacherError::Failed { code, message, .. }) => {
                // No try count in the record: it varies with transient faults.
                out.reason_code = Some("request_failed");
                out.failure_code = Some(code);
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
/// Request and token counts are of *new* requests: answers already in the
/// response cache are replayed through the same loop (parse, leak filter,
/// tolerance) and cost nothing more.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    pub n_samples: usize,
    /// New requests if every sample's next answer is accepted.
    pub requests_min: u64,
    /// New requests if every sample uses all its remaining attempts.
    pub requests_max: u64,
    /// Estimated prompt tokens of the `requests_min` requests (chars / 4 + 4 per message).
    pub est_tokens_in: u64,
    /// Upper bound of their completion tokens (`max_tokens` each).
    pub est_tokens_out_max: u64,
    /// Cost of those requests at the configured prices, completions at
    /// `max_tokens` (an upper bound of the no-further-retry case).
    pub est_cost_first_usd: f64,
    /// Cost if every sample used all remaining attempts at `max_tokens`.
    pub est_cost_max_usd: f64,
    /// Offline backends (`cf`, `local`) cost nothing.
    pub paid: bool,
    /// Samples the response cache already settles (accepted, or rejected
    /// after every attempt): no request at all.
    pub settled_from_cache: usize,
    /// Answers of the selected samples found in the response cache.
    pub cached_answers: u64,
    /// Their tokens (in + out) and cost at the configured prices: already
    /// paid, and counted by `budget_tokens` / `budget_usd` (the dataset's total).
    pub cached_tokens: u64,
    pub cached_cost_usd: f64,
}

/// Estimated prompt tokens of a message list (≈ 4 characters per token).
pub fn estimate_tokens(messages: &[Message]) -> u64 {
    messages.iter().map(|m| m.content.len() as u64 / 4 + 4).sum()
}

/// Preview without a seed or a response cache: the count of selected
/// samples is exact, token estimates scale the table's mean by it (the
/// subset itself depends on the stage seed), and nothing counts as cached.
/// Prefer [`preview_stage`] when the seed and store are known.
pub fn preview(cfg: &Config, samples: &[Sample]) -> Preview {
    let n_all = samples.len();
    let n = cfg.max_samples.map_or(n_all, |k| k.min(n_all));
    let all_in: u64 = samples.iter().map(|s| estimate_tokens(&s.messages)).sum();
    let est_in = if n_all == 0 { 0 } else { (all_in as f64 * n as f64 / n_all as f64).round() as u64 };
    let attempts = 1 + cfg.max_rationalize as u64;
    let hint_tokens = (cfg.hint_template.len() / 4 + 1) as u64;
    let in_max = est_in * attempts + hint_tokens * n as u64 * (attempts - 1);
    finish_preview(cfg, n, n as u64, n as u64 * attempts, est_in, in_max, PreviewCache::default())
}

/// Exact preview of a teacher stage (what the runner's `--dry-run` calls):
/// the seeded subset the run would select (`seed` = the stage seed), with
/// every answer already in `cache` replayed through the rationalization
/// loop, so `requests_*` and the estimates count only what would be bought.
/// Pure: reads the cache, changes nothing.
pub fn preview_with_cache(cfg: &Config, samples: &[Sample], seed: u64, cache: Option<&ResponseCache>) -> Preview {
    let rows = select_rows(samples, cfg.max_samples, seed);
    let endpoint = match cfg.backend {
        Backend::Openai => Some(super::openai::endpoint(cfg.model.as_deref().unwrap_or_default())),
        // cf answers are not cached; a local model's endpoint hashes its
        // files, known only to recflow-ml: preview it without the cache.
        Backend::Cf | Backend::Local => None,
    };
    let lc = LoopConfig::from_config(cfg);
    let last = 1 + cfg.max_rationalize;
    let (mut req_min, mut req_max, mut est_in, mut in_max) = (0u64, 0u64, 0u64, 0u64);
    let mut pc = PreviewCache::default();
    for &row in &rows {
        let s = &samples[row];
        // Replay the loop over cached answers: the first attempt without a
        // cached answer is where buying would start.
        let mut next = Some(1);
        if let (Some(c), Some(ep)) = (cache, &endpoint) {
            for attempt in 1..=last {
                let req = request_for(s, row, attempt, &lc);
                let Some(reply) = c.get(&req.identity(ep)) else { break };
                pc.answers += 1;
                pc.tokens_in += reply.usage.prompt_tokens;
                pc.tokens_out += reply.usage.completion_tokens;
                next = if judge(&reply.content, s.target, &lc).is_ok() || attempt == last { None } else { Some(attempt + 1) };
                if next.is_none() {
                    break;
                }
            }
        }
        let Some(first) = next else {
            pc.settled += 1;
            continue;
        };
        req_min += 1;
        req_max += (last - first + 1) as u64;
        est_in += estimate_tokens(&attempt_messages(&s.messages, first, s.target, &lc.hint_template));
        for a in first..=last {
            in_max += estimate_tokens(&attempt_messages(&s.messages, a, s.target, &lc.hint_template));
        }
    }
    finish_preview(cfg, rows.len(), req_min, req_max, est_in, in_max, pc)
}

/// [`preview_with_cache`] from paths, for the runner: reads the `samples`
/// table and opens the response cache where the stage would
/// ([`response_cache_dir`] of `work_dir`, the stage's work dir
/// `<store>/work/<key>`) without creating anything.
pub fn preview_stage(cfg: &Config, samples: &Path, seed: u64, work_dir: &Path) -> anyhow::Result<Preview> {
    let table = crate::data::io::read_samples(samples)?;
    let cache = match cfg.backend {
        Backend::Openai => Some(ResponseCache::load(&response_cache_dir(cfg, work_dir))?),
        Backend::Cf | Backend::Local => None,
    };
    Ok(preview_with_cache(cfg, &table, seed, cache.as_ref()))
}

#[derive(Default)]
struct PreviewCache {
    settled: usize,
    answers: u64,
    tokens_in: u64,
    tokens_out: u64,
}

fn finish_preview(cfg: &Config, n: usize, req_min: u64, req_max: u64, est_in: u64, in_max: u64, pc: PreviewCache) -> Preview {
    let paid = cfg.backend == Backend::Openai;
    let money = Money { price_in_per_mtok: cfg.price_in_per_mtok, price_out_per_mtok: cfg.price_out_per_mtok, ..Default::default() };
    let cost = |i, o| if paid { money.cost(i, o) } else { 0.0 };
    let out_first = req_min * cfg.max_tokens as u64;
    Preview {
        n_samples: n,
        requests_min: req_min,
        requests_max: req_max,
        est_tokens_in: est_in,
        est_tokens_out_max: out_first,
        est_cost_first_usd: cost(est_in, out_first),
        est_cost_max_usd: cost(in_max, req_max * cfg.max_tokens as u64),
        paid,
        settled_from_cache: pc.settled,
        cached_answers: pc.answers,
        cached_tokens: pc.tokens_in + pc.tokens_out,
        cached_cost_usd: cost(pc.tokens_in, pc.tokens_out),
    }
}

/// The request of `attempt` for sample `s` (row `row`) — the one place
/// that builds it, for the loop and the preview alike.
fn request_for(s: &Sample, row: usize, attempt: u32, cfg: &LoopConfig) -> Request {
    Request {
        sample_id: s.sample_id.clone(),
        attempt,
        messages: attempt_messages(&s.messages, attempt, s.target, &cfg.hint_template),
        sampling: cfg.sampling.clone(),
        hint: (attempt >= 2).then_some(s.target),
        row,
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

/// `None` when every selected sample got its answers; otherwise how many
/// did not, by failure code, with one example.
pub fn failure_report(results: &BTreeMap<usize, Outcome>, samples: &[Sample]) -> Option<String> {
    let failed: Vec<(&usize, &Outcome)> = results.iter().filter(|(_, o)| o.reason_code == Some("request_failed")).collect();
    let (row, first) = failed.first()?;
    let mut by_code: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, o) in &failed {
        *by_code.entry(o.failure_code.unwrap_or("unknown")).or_default() += 1;
    }
    let codes = by_code.iter().map(|(c, n)| format!("{c}: {n}")).collect::<Vec<_>>().join(", ");
    Some(format!(
        "{} of {} samples got no answer after all retries ({codes}); e.g. sample `{}` (attempt {}): {}",
        failed.len(),
        results.len(),
        samples[**row].sample_id,
        first.attempts,
        first.reason.as_deref().unwrap_or("request_failed")
    ))
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
    let t_start = Instant::now();
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
    };
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
    let c = &sh.counters;
    let (bi, bo) = (c.bought_in.load(Ordering::Relaxed), c.bought_out.load(Ordering::Relaxed));
    let (ui, uo) = (c.used_in.load(Ordering::Relaxed), c.used_out.load(Ordering::Relaxed));
    let summary = format!(
        "{} of {} samples done; {} requests bought ({} tokens, ${:.4}), {} answers from the response cache; \
         answers used in total: {} tokens, ${:.4}",
        results.len(),
        rows.len(),
        c.requests.load(Ordering::Relaxed),
        bi + bo,
        sh.money.cost(bi, bo),
        c.cache_hits.load(Ordering::Relaxed),
        ui + uo,
        sh.money.cost(ui, uo),
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
    if cfg.on_request_failure == OnRequestFailure::Fail {
        if let Some(msg) = failure_report(&results, &samples) {
            anyhow::bail!(
                "stage `{}`: {msg}. Nothing is committed ({summary}); every answer bought is kept in the response cache, \
                 so a rerun asks only these samples again. To commit them as rejected rows instead, set \
                 `on_request_failure: record`",
                ctx.stage
            );
        }
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
    // A plain write: the output dir is scratch, and committing it to the
    // store syncs every file (an fsync here would be paid twice).
    let stats_path = ctx.output("stats")?;
    std::fs::write(&stats_path, serde_json::to_string_pretty(&stats)?)
        .with_context(|| format!("cannot write {}", stats_path.display()))?;
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

    fn sample(id: &str, target: f32) -> Sample {
        Sample {
            sample_id: id.into(),
            user_id: "u".into(),
            item_id: "i".into(),
            timestamp: 0,
            messages: msg(&format!("rate {id}")),
            target,
            user_history_len: 0,
            item_history_len: 0,
        }
    }

    #[test]
    fn preview_replays_cached_answers_and_counts_only_what_would_be_bought() {
        let cfg: Config = serde_json::from_value(serde_json::json!({
            "backend": "openai", "base_url": "http://x/v1", "model": "m", "max_rationalize": 2,
            "max_tokens": 100, "price_in_per_mtok": 1.0, "price_out_per_mtok": 1.0
        }))
        .unwrap();
        let samples = vec![sample("a", 4.0), sample("b", 4.0), sample("c", 4.0), sample("d", 4.0)];
        let lc = LoopConfig::from_config(&cfg);
        let answer = |r: u32| Reply {
            content: format!("<analyze user>u</analyze user><analyze item>i</analyze item><match>m</match><rate>{r}</rate>"),
            reasoning_content: None,
            usage: crate::teacher::Usage { prompt_tokens: 10, completion_tokens: 5 },
        };
        let dir = tempfile::tempdir().unwrap();
        let cache = ResponseCache::open(dir.path()).unwrap();
        let ep = crate::teacher::openai::endpoint("m");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            // a: wrong, then right with the hint → settled. b: right → settled.
            // d: wrong once → attempts 2 and 3 remain. c: nothing cached.
            for (row, attempt, rating) in [(0, 1, 2), (0, 2, 4), (1, 1, 4), (3, 1, 1)] {
                let id = request_for(&samples[row], row, attempt, &lc).identity(&ep);
                cache.put(&id, &answer(rating)).await.unwrap();
            }
        });
        let p = preview_with_cache(&cfg, &samples, 0, Some(&cache));
        assert_eq!((p.n_samples, p.settled_from_cache, p.cached_answers), (4, 2, 4), "a and b are settled by the cache");
        assert_eq!(p.requests_min, 2, "c's first and d's second attempt");
        assert_eq!(p.requests_max, 3 + 2, "c may use all 3 attempts, d the 2 left");
        assert_eq!(p.cached_tokens, 4 * 15);
        assert!((p.cached_cost_usd - 60e-6).abs() < 1e-12, "cached answers are priced: they count toward the budget");
        let hinted = estimate_tokens(&attempt_messages(&samples[3].messages, 2, 4.0, &cfg.hint_template));
        assert_eq!(p.est_tokens_in, estimate_tokens(&samples[2].messages) + hinted, "d's next request carries the hint");
        let fresh = preview_with_cache(&cfg, &samples, 0, None);
        assert_eq!((fresh.requests_min, fresh.requests_max, fresh.settled_from_cache), (4, 12, 0), "no cache: all bought");
        assert_eq!(fresh.requests_min, preview(&cfg, &samples).requests_min, "the seedless preview agrees on counts");
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
