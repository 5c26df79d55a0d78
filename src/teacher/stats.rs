//! The teacher stage's `stats` output (ARCHITECTURE "Logs": n_samples,
//! accepted, rejected, first_try_accuracy, attempts_hist, reasons,
//! tokens_in, tokens_out), summarised from the loop's outcomes.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::rationalize::Outcome;

/// The stats output (pinned keys first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// Token lengths of the accepted traces, what SFT teaches the student to
/// write (issue 18): the completion budgets of GRPO and eval must hold
/// them. Nearest-rank percentiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceLengths {
    pub p50: u64,
    pub p95: u64,
    pub max: u64,
}

impl TraceLengths {
    /// The lengths in `tok` (no special tokens) of `traces`; None when empty.
    pub fn of<'a>(traces: impl Iterator<Item = &'a str>, tok: &tokenizers::Tokenizer) -> Result<Option<Self>, String> {
        let mut n: Vec<u64> = Vec::new();
        for t in traces {
            n.push(tok.encode(t, false).map_err(|e| e.to_string())?.len() as u64);
        }
        Ok(Self::from_counts(n))
    }

    /// From per-trace counts (any unit); None when empty.
    pub fn from_counts(mut n: Vec<u64>) -> Option<Self> {
        if n.is_empty() {
            return None;
        }
        n.sort_unstable();
        let rank = |q: f64| n[((q * n.len() as f64).ceil() as usize).clamp(1, n.len()) - 1];
        Some(TraceLengths { p50: rank(0.5), p95: rank(0.95), max: n[n.len() - 1] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(accepted: bool, attempts: u32, first_try_correct: bool, reason_code: Option<&'static str>) -> Outcome {
        Outcome {
            completion: None,
            reasoning_content: None,
            accepted,
            reason: None,
            reason_code,
            failure_code: None,
            attempts,
            first_try_correct,
            tokens_in: 10,
            tokens_out: 4,
        }
    }

    #[test]
    fn trace_lengths_are_nearest_rank() {
        let l = TraceLengths::from_counts((1..=20).rev().collect()).unwrap();
        assert_eq!((l.p50, l.p95, l.max), (10, 19, 20), "nearest rank over 20 values");
        assert_eq!(TraceLengths::from_counts(vec![7]).unwrap(), TraceLengths { p50: 7, p95: 7, max: 7 });
        assert!(TraceLengths::from_counts(vec![]).is_none());
    }

    #[test]
    fn stats_count_outcomes_attempts_and_reasons() {
        let rows = vec![
            (0, outcome(true, 1, true, None)),
            (1, outcome(true, 2, false, None)),
            (2, outcome(false, 3, false, Some("wrong_rating"))),
            (3, outcome(false, 1, false, Some("request_failed"))),
        ];
        let st = stats_of(&rows, "cf");
        assert_eq!((st.n_samples, st.accepted, st.rejected, st.rationalized), (4, 2, 2, 1), "counts by outcome");
        assert_eq!(st.first_try_accuracy, 0.25, "one of four right on attempt 1");
        assert_eq!(st.attempts_hist.get("1"), Some(&2), "histogram keyed by attempt count: {:?}", st.attempts_hist);
        assert_eq!(st.reasons.get("wrong_rating"), Some(&1), "rejections by reason code: {:?}", st.reasons);
        assert_eq!((st.tokens_in, st.tokens_out), (40, 16), "tokens summed over samples");
        assert_eq!(stats_of(&[], "cf").first_try_accuracy, 0.0, "no samples: no division by zero");
    }
}
