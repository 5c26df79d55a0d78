//! The `--dry-run` preview of a teacher stage: how many requests a run would
//! buy, their estimated tokens and cost, and what the response cache already
//! settles — computed by replaying cached answers through the same loop
//! ([`super::rationalize`]: parse, leak filter, tolerance), before anything
//! is bought. Pure: reads the cache, changes nothing. The stage side
//! ([`crate::stages::teacher::preview`]) builds the [`PreviewConfig`] from
//! the stage config and finds the samples and the cache.
use serde::Serialize;

use super::cache::ResponseCache;
use super::rationalize::{attempt_messages, judge, request_for, select_rows, LoopConfig, Money};
use super::Message;
use crate::data::Sample;

/// What the preview needs of a teacher stage's config.
#[derive(Debug, Clone)]
pub struct PreviewConfig {
    /// The loop as the run would drive it (attempts, hint, `max_tokens`).
    pub loop_cfg: LoopConfig,
    /// Ask at most this many samples (the run's seeded subset).
    pub max_samples: Option<usize>,
    /// Response-cache endpoint whose answers may be replayed; `None` when
    /// the backend's answers are not cached (`cf`) or its endpoint is not
    /// known without loading it (`local`: a hash of the model's files).
    pub endpoint: Option<String>,
    /// Whether answers cost money: offline backends (`cf`, `local`) do not.
    pub paid: bool,
    /// Prices (the budget plays no part in a preview).
    pub money: Money,
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
/// Prefer [`preview_with_cache`] when the seed and store are known.
pub fn preview(cfg: &PreviewConfig, samples: &[Sample]) -> Preview {
    let n_all = samples.len();
    let n = cfg.max_samples.map_or(n_all, |k| k.min(n_all));
    let all_in: u64 = samples.iter().map(|s| estimate_tokens(&s.messages)).sum();
    let est_in = if n_all == 0 { 0 } else { (all_in as f64 * n as f64 / n_all as f64).round() as u64 };
    let attempts = 1 + cfg.loop_cfg.max_rationalize as u64;
    let hint_tokens = (cfg.loop_cfg.hint_template.len() / 4 + 1) as u64;
    let in_max = est_in * attempts + hint_tokens * n as u64 * (attempts - 1);
    finish_preview(cfg, n, n as u64, n as u64 * attempts, est_in, in_max, PreviewCache::default())
}

/// Exact preview (what the stage's `--dry-run` preview calls): the seeded
/// subset the run would select (`seed` = the stage seed), with every answer
/// already in `cache` replayed through the rationalization loop, so
/// `requests_*` and the estimates count only what would be bought.
pub fn preview_with_cache(cfg: &PreviewConfig, samples: &[Sample], seed: u64, cache: Option<&ResponseCache>) -> Preview {
    let rows = select_rows(samples, cfg.max_samples, seed);
    let lc = &cfg.loop_cfg;
    let last = 1 + lc.max_rationalize;
    let (mut req_min, mut req_max, mut est_in, mut in_max) = (0u64, 0u64, 0u64, 0u64);
    let mut pc = PreviewCache::default();
    for &row in &rows {
        let s = &samples[row];
        // Replay the loop over cached answers: the first attempt without a
        // cached answer is where buying would start.
        let mut next = Some(1);
        if let (Some(c), Some(ep)) = (cache, &cfg.endpoint) {
            for attempt in 1..=last {
                let req = request_for(s, row, attempt, lc);
                let Some(reply) = c.get(&req.identity(ep)) else { break };
                pc.answers += 1;
                pc.tokens_in += reply.usage.prompt_tokens;
                pc.tokens_out += reply.usage.completion_tokens;
                next = if judge(&reply.content, s.target, lc).is_ok() || attempt == last { None } else { Some(attempt + 1) };
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

#[derive(Default)]
struct PreviewCache {
    settled: usize,
    answers: u64,
    tokens_in: u64,
    tokens_out: u64,
}

fn finish_preview(cfg: &PreviewConfig, n: usize, req_min: u64, req_max: u64, est_in: u64, in_max: u64, pc: PreviewCache) -> Preview {
    let paid = cfg.paid;
    let cost = |i, o| if paid { cfg.money.cost(i, o) } else { 0.0 };
    let max_tokens = cfg.loop_cfg.sampling.max_tokens as u64;
    let out_first = req_min * max_tokens;
    Preview {
        n_samples: n,
        requests_min: req_min,
        requests_max: req_max,
        est_tokens_in: est_in,
        est_tokens_out_max: out_first,
        est_cost_first_usd: cost(est_in, out_first),
        est_cost_max_usd: cost(in_max, req_max * max_tokens),
        paid,
        settled_from_cache: pc.settled,
        cached_answers: pc.answers,
        cached_tokens: pc.tokens_in + pc.tokens_out,
        cached_cost_usd: cost(pc.tokens_in, pc.tokens_out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Scale;
    use crate::teacher::rationalize::DEFAULT_HINT;
    use crate::teacher::{Reply, Sampling, Usage};

    fn sample(id: &str, target: f32) -> Sample {
        Sample {
            sample_id: id.into(),
            user_id: "u".into(),
            item_id: "i".into(),
            timestamp: 0,
            messages: vec![
                Message { role: "system".into(), content: "sys".into() },
                Message { role: "user".into(), content: format!("rate {id}") },
            ],
            target,
            user_history_len: 0,
            item_history_len: 0,
        }
    }

    /// An openai-like teacher: paid, answers cached under endpoint `ep`.
    fn paid(ep: &str) -> PreviewConfig {
        PreviewConfig {
            loop_cfg: LoopConfig {
                max_rationalize: 2,
                tolerance: None,
                scale: Scale::default(),
                hint_template: DEFAULT_HINT.to_string(),
                sampling: Sampling { temperature: 0.6, top_p: None, max_tokens: 100, seed: None },
            },
            max_samples: None,
            endpoint: Some(ep.to_string()),
            paid: true,
            money: Money { price_in_per_mtok: 1.0, price_out_per_mtok: 1.0, ..Default::default() },
        }
    }

    #[test]
    fn preview_replays_cached_answers_and_counts_only_what_would_be_bought() {
        let ep = crate::teacher::openai::endpoint("m");
        let cfg = paid(&ep);
        let samples = vec![sample("a", 4.0), sample("b", 4.0), sample("c", 4.0), sample("d", 4.0)];
        let answer = |r: u32| Reply {
            content: format!("<analyze user>u</analyze user><analyze item>i</analyze item><match>m</match><rate>{r}</rate>"),
            reasoning_content: None,
            usage: Usage { prompt_tokens: 10, completion_tokens: 5 },
        };
        let dir = tempfile::tempdir().unwrap();
        let cache = ResponseCache::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            // a: wrong, then right with the hint → settled. b: right → settled.
            // d: wrong once → attempts 2 and 3 remain. c: nothing cached.
            for (row, attempt, rating) in [(0, 1, 2), (0, 2, 4), (1, 1, 4), (3, 1, 1)] {
                let id = request_for(&samples[row], row, attempt, &cfg.loop_cfg).identity(&ep);
                cache.put(&id, &answer(rating)).await.unwrap();
            }
        });
        let p = preview_with_cache(&cfg, &samples, 0, Some(&cache));
        assert_eq!((p.n_samples, p.settled_from_cache, p.cached_answers), (4, 2, 4), "a and b are settled by the cache");
        assert_eq!(p.requests_min, 2, "c's first and d's second attempt");
        assert_eq!(p.requests_max, 3 + 2, "c may use all 3 attempts, d the 2 left");
        assert_eq!(p.cached_tokens, 4 * 15);
        assert!((p.cached_cost_usd - 60e-6).abs() < 1e-12, "cached answers are priced: they count toward the budget");
        let hinted = estimate_tokens(&attempt_messages(&samples[3].messages, 2, 4.0, DEFAULT_HINT));
        assert_eq!(p.est_tokens_in, estimate_tokens(&samples[2].messages) + hinted, "d's next request carries the hint");
        let fresh = preview_with_cache(&cfg, &samples, 0, None);
        assert_eq!((fresh.requests_min, fresh.requests_max, fresh.settled_from_cache), (4, 12, 0), "no cache: all bought");
        assert_eq!(fresh.requests_min, preview(&cfg, &samples).requests_min, "the seedless preview agrees on counts");
        let other = preview_with_cache(&paid("openai:other"), &samples, 0, Some(&cache));
        assert_eq!(other.cached_answers, 0, "answers of another endpoint are not replayed");
    }

    #[test]
    fn offline_backends_cost_nothing() {
        let cfg = PreviewConfig { paid: false, endpoint: None, ..paid("x") };
        let p = preview(&cfg, &[sample("a", 4.0), sample("b", 3.0)]);
        assert_eq!((p.requests_min, p.requests_max), (2, 6), "requests are still counted");
        assert!(!p.paid && p.est_cost_first_usd == 0.0 && p.est_cost_max_usd == 0.0, "but priced at zero: {p:?}");
    }
}
