//! Train / valid / test splits of an interaction table.
//!
//! * `leave_last` (default): per user, in [`time_order`] (timestamp, then
//!   item_id: the pinned stable tie-break — Amazon times are day-level and
//!   401 of the 406 Fashion users end on a tie), the last interaction is
//!   test, the one before it valid (when `valid` is on), the rest train.
//!   Users with fewer than `min_user_interactions` go wholly to train.
//! * `chronological`: all interactions in time order (timestamp, item_id,
//!   user_id), cut at the cumulative `ratios`.
//! * `random`: a seeded shuffle of that order, cut at `ratios`.
//!
//! Each split is written sorted by (user_id, time order), so outputs do not
//! depend on input order.
use std::collections::{BTreeMap, HashMap, HashSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{format_rating, time_order, Interaction};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    LeaveLast,
    Chronological,
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitOptions {
    pub strategy: Strategy,
    pub valid: bool,
    pub min_user_interactions: usize,
    pub ratios: [f64; 3],
    pub seed: u64,
}

#[derive(Debug, Default)]
pub struct Splits {
    pub train: Vec<Interaction>,
    pub valid: Vec<Interaction>,
    pub test: Vec<Interaction>,
    /// leave_last: users whose held-out interaction has the same timestamp as
    /// the one before it (the tie-break decided).
    pub tie_users: u64,
}

pub fn split(mut rows: Vec<Interaction>, o: &SplitOptions) -> Splits {
    let mut s = Splits::default();
    match o.strategy {
        Strategy::LeaveLast => {
            let mut by_user: BTreeMap<String, Vec<Interaction>> = BTreeMap::new();
            for r in rows {
                by_user.entry(r.user_id.clone()).or_default().push(r);
            }
            for (_, mut v) in by_user {
                v.sort_by(time_order);
                let hold = if o.valid { 2 } else { 1 };
                if v.len() < o.min_user_interactions.max(hold + 1) {
                    s.train.extend(v);
                    continue;
                }
                let n = v.len();
                if v[n - 1].timestamp == v[n - 2].timestamp {
                    s.tie_users += 1;
                }
                let test = v.pop().expect("n ≥ 2");
                if o.valid {
                    s.valid.push(v.pop().expect("n ≥ 3"));
                }
                s.test.push(test);
                s.train.extend(v);
            }
        }
        Strategy::Chronological | Strategy::Random => {
            rows.sort_by(time_order);
            if o.strategy == Strategy::Random {
                rows.shuffle(&mut ChaCha8Rng::seed_from_u64(o.seed));
            }
            let n = rows.len();
            let total: f64 = o.ratios.iter().sum();
            let n_train = ((o.ratios[0] / total) * n as f64).round() as usize;
            let n_valid = (((o.ratios[0] + o.ratios[1]) / total) * n as f64).round() as usize - n_train;
            let rest = rows.split_off(n_train.min(n));
            s.train = rows;
            let mut rest = rest;
            let test = rest.split_off(n_valid.min(rest.len()));
            s.valid = rest;
            s.test = test;
        }
    }
    let key = |a: &Interaction, b: &Interaction| a.user_id.cmp(&b.user_id).then_with(|| time_order(a, b));
    s.train.sort_by(key);
    s.valid.sort_by(key);
    s.test.sort_by(key);
    s
}

/// Flat statistics of one split (`{name}_interactions`, `_users`, `_items`,
/// `_density`, `_mean_rating`, `_rating_{r}`).
pub fn stats(name: &str, rows: &[Interaction]) -> BTreeMap<String, serde_json::Value> {
    let users: HashSet<&str> = rows.iter().map(|r| r.user_id.as_str()).collect();
    let items: HashSet<&str> = rows.iter().map(|r| r.item_id.as_str()).collect();
    let mut hist: HashMap<i64, u64> = HashMap::new();
    for r in rows {
        *hist.entry((r.rating as f64 * 2.0).round() as i64).or_default() += 1;
    }
    let n = rows.len();
    let mut m = BTreeMap::new();
    m.insert(format!("{name}_interactions"), n.into());
    m.insert(format!("{name}_users"), users.len().into());
    m.insert(format!("{name}_items"), items.len().into());
    let density = if n == 0 { 0.0 } else { n as f64 / (users.len() as f64 * items.len() as f64) };
    m.insert(format!("{name}_density"), density.into());
    let mean = if n == 0 { 0.0 } else { rows.iter().map(|r| r.rating as f64).sum::<f64>() / n as f64 };
    m.insert(format!("{name}_mean_rating"), mean.into());
    for (k, v) in hist {
        m.insert(format!("{name}_rating_{}", format_rating(k as f32 / 2.0)), v.into());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(u: &str, i: &str, t: i64) -> Interaction {
        Interaction { user_id: u.into(), item_id: i.into(), rating: 4.0, timestamp: t, review_title: None, review_text: None }
    }

    fn opts(strategy: Strategy) -> SplitOptions {
        SplitOptions { strategy, valid: true, min_user_interactions: 3, ratios: [0.8, 0.1, 0.1], seed: 7 }
    }

    #[test]
    fn leave_last_breaks_ties_by_item_id_whatever_the_input_order() {
        let rows = vec![r("u", "b", 5), r("u", "c", 5), r("u", "a", 1), r("u", "z", 5), r("v", "x", 1)];
        let mut rev = rows.clone();
        rev.reverse();
        let a = split(rows, &opts(Strategy::LeaveLast));
        let b = split(rev, &opts(Strategy::LeaveLast));
        assert_eq!(a.test[0].item_id, "z", "tie at t=5: the largest item_id is last");
        assert_eq!(a.valid[0].item_id, "c");
        assert_eq!((a.test.clone(), a.train.clone()), (b.test, b.train), "input order does not matter");
        assert_eq!(a.tie_users, 1);
        assert!(a.train.iter().any(|x| x.user_id == "v"), "users under min_user_interactions stay in train");
    }

    #[test]
    fn random_is_seeded_and_chronological_respects_time() {
        let rows: Vec<_> = (0..100).map(|k| r(&format!("u{}", k % 7), &format!("i{k}"), k as i64)).collect();
        let a = split(rows.clone(), &opts(Strategy::Random));
        let b = split(rows.clone(), &opts(Strategy::Random));
        let c = split(rows.clone(), &SplitOptions { seed: 8, ..opts(Strategy::Random) });
        assert_eq!(a.test, b.test, "same seed, same split");
        assert_ne!(a.test, c.test, "another seed, another split");
        assert_eq!((a.train.len(), a.valid.len(), a.test.len()), (80, 10, 10));
        let ch = split(rows, &opts(Strategy::Chronological));
        let max_train = ch.train.iter().map(|x| x.timestamp).max().unwrap();
        assert!(ch.test.iter().all(|x| x.timestamp > max_train), "chronological: test after train");
    }
}
