//! The rationalization loop (RecOne cold start; rationalization as in STaR,
//! Zelikman et al. 2022). Pure of the stage machinery: it sees a backend, a
//! response cache and a [`LoopConfig`], never a `StageCtx` — the teacher
//! stage's driver ([`crate::stages::teacher`]) reads the inputs, builds the
//! backend, calls [`drive`] and writes the outputs.
//!
//! Per sample: attempt 1 sends the original prompt. The answer is parsed with
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
//! costs nothing; a miss is bought, stored durably, then used. [`drive`]
//! runs sample tasks on tokio (up to 2 × `concurrency` sample tasks, so that
//! one waiting for its fsync does not hold a network slot; the network
//! concurrency itself is bounded inside the backend).
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::cache::ResponseCache;
use super::{Message, Reply, Request, Sampling, TeacherBackend, TeacherError};
use crate::answer::{self, Scale};
use crate::data::Sample;

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
    /// The state of a drive that has bought nothing yet.
    pub fn new(
        backend: Arc<dyn TeacherBackend>,
        cache: Option<Arc<ResponseCache>>,
        cfg: LoopConfig,
        money: Money,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Shared { backend, cache, cfg, money, counters: Counters::default(), cancel, stop: AtomicBool::new(false) }
    }
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


/// The request of `attempt` for sample `s` (row `row`) — the one place
/// that builds it, for the loop and the preview alike.
pub(super) fn request_for(s: &Sample, row: usize, attempt: u32, cfg: &LoopConfig) -> Request {
    Request {
        sample_id: s.sample_id.clone(),
        attempt,
        messages: attempt_messages(&s.messages, attempt, s.target, &cfg.hint_template),
        sampling: cfg.sampling.clone(),
        hint: (attempt >= 2).then_some(s.target),
        row,
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


    /// Answers from a script: `ratings[attempt - 1]`, the same for every sample.
    struct Scripted {
        ratings: Vec<u32>,
    }

    impl TeacherBackend for Scripted {
        fn name(&self) -> String {
            "scripted".into()
        }
        fn endpoint(&self) -> String {
            "scripted".into()
        }
        fn ask<'a>(&'a self, req: &'a Request) -> super::super::AskFuture<'a> {
            let r = self.ratings[req.attempt as usize - 1];
            Box::pin(async move {
                Ok(Reply {
                    content: format!(
                        "<analyze user>u</analyze user><analyze item>i</analyze item><match>m</match><rate>{r}</rate>"
                    ),
                    reasoning_content: None,
                    usage: super::super::Usage { prompt_tokens: 3, completion_tokens: 2 },
                })
            })
        }
    }

    fn loop_config(max_rationalize: u32) -> LoopConfig {
        LoopConfig {
            max_rationalize,
            tolerance: None,
            scale: Scale::default(),
            hint_template: DEFAULT_HINT.to_string(),
            sampling: Sampling { temperature: 0.0, top_p: None, max_tokens: 10, seed: None },
        }
    }

    fn teach(ratings: Vec<u32>, max_rationalize: u32) -> Outcome {
        let sh = Shared::new(
            Arc::new(Scripted { ratings }),
            None,
            loop_config(max_rationalize),
            Money::default(),
            Arc::new(AtomicBool::new(false)),
        );
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(teach_one(&sh, 0, &sample("a", 4.0))).unwrap()
    }

    #[test]
    fn a_wrong_first_answer_is_rationalized_with_the_hint() {
        let o = teach(vec![2, 4], 1);
        assert!(o.accepted && o.reason.is_none(), "the hinted second answer is right: {o:?}");
        assert_eq!(o.attempts, 2, "accepted on the hinted attempt");
        assert!(!o.first_try_correct, "first-try accuracy measures attempt 1 only");
        assert_eq!((o.tokens_in, o.tokens_out), (6, 4), "tokens of both attempts are counted");
    }

    #[test]
    fn a_sample_wrong_on_every_attempt_keeps_the_last_answer_and_reason() {
        let o = teach(vec![2, 1, 5], 2);
        assert!(!o.accepted, "never within tolerance");
        assert_eq!(o.attempts, 3, "1 + max_rationalize attempts");
        assert_eq!(o.reason_code, Some("wrong_rating"));
        assert!(o.completion.as_deref().is_some_and(|c| c.contains("<rate>5</rate>")), "the last answer is kept: {o:?}");
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
