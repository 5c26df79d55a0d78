//! Leak-free evidence index over interactions (ARCHITECTURE, ML path:
//! prompts are built "only from interactions strictly earlier in time than
//! the target, from any split").
//!
//! For a target (user u, item i, time t) the index returns, using only
//! interactions with `timestamp < t` (strictly — same-day ties are excluded
//! too, since Amazon times are day-level and their true order is unknown):
//! * u's earlier interactions (any item, any split), the last `max_user` of
//!   them in [`time_order`](super::time_order), and the mean rating over all
//!   of them;
//! * i's earlier ratings by *other* users, the last `max_item` of them, and
//!   the mean over all of them;
//! * the global mean before t ([`HistoryIndex::global_mean_before`]).
//!
//! The target's own rating can never appear: it has timestamp t, not < t.
//! Used by the `prompts` stage and by the `cf` teacher.
//!
//! ```
//! use recflow::data::{history::HistoryIndex, Interaction};
//! let r = |u: &str, i: &str, rating: f32, t: i64| Interaction {
//!     user_id: u.into(), item_id: i.into(), rating, timestamp: t, review_title: None, review_text: None };
//! let idx = HistoryIndex::new(vec![r("u", "a", 4.0, 1), r("v", "b", 2.0, 1), r("u", "b", 5.0, 2)]);
//! let ev = idx.evidence("u", "b", 2, 10, 10);
//! assert_eq!(ev.user_count, 1);          // only (u, a) is earlier
//! assert_eq!(ev.item_mean, Some(2.0));   // v's rating of b; never u's target 5.0
//! ```
use std::collections::HashMap;
use std::path::Path;

use super::{io, time_order, Interaction};

/// One user's or item's interactions in time order with prefix sums.
#[derive(Debug, Default)]
struct Seq {
    /// Row indices, sorted by `time_order`.
    rows: Vec<u32>,
    /// Timestamps of those rows (for the `< t` cut).
    ts: Vec<i64>,
    /// prefix[k] = sum of the first k ratings.
    prefix: Vec<f64>,
}

impl Seq {
    /// Number of entries strictly earlier than `t`.
    fn before(&self, t: i64) -> usize {
        self.ts.partition_point(|&x| x < t)
    }
}

/// Evidence for one target, all strictly earlier than its timestamp.
#[derive(Debug, Clone)]
pub struct Evidence<'a> {
    /// The user's last `max_user` earlier interactions, oldest first.
    pub user_history: Vec<&'a Interaction>,
    /// All earlier interactions of the user (≥ `user_history.len()`).
    pub user_count: usize,
    /// Mean rating over all `user_count` earlier interactions.
    pub user_mean: Option<f64>,
    /// The item's last `max_item` earlier ratings by other users, oldest first.
    pub item_history: Vec<&'a Interaction>,
    /// All earlier ratings of the item by other users.
    pub item_count: usize,
    /// Mean over all `item_count` of them.
    pub item_mean: Option<f64>,
}

/// The index; build once per interaction table, query per target.
#[derive(Debug)]
pub struct HistoryIndex {
    rows: Vec<Interaction>,
    by_user: HashMap<String, Seq>,
    by_item: HashMap<String, Seq>,
    /// All timestamps sorted, with rating prefix sums (global mean before t).
    global_ts: Vec<i64>,
    global_prefix: Vec<f64>,
}

fn build_seq(rows: &[Interaction], mut idx: Vec<u32>) -> Seq {
    idx.sort_by(|&a, &b| time_order(&rows[a as usize], &rows[b as usize]));
    let ts = idx.iter().map(|&i| rows[i as usize].timestamp).collect();
    let mut prefix = Vec::with_capacity(idx.len() + 1);
    let mut s = 0.0;
    prefix.push(0.0);
    for &i in &idx {
        s += rows[i as usize].rating as f64;
        prefix.push(s);
    }
    Seq { rows: idx, ts, prefix }
}

impl HistoryIndex {
    pub fn new(rows: Vec<Interaction>) -> Self {
        let mut u: HashMap<String, Vec<u32>> = HashMap::new();
        let mut it: HashMap<String, Vec<u32>> = HashMap::new();
        for (k, r) in rows.iter().enumerate() {
            u.entry(r.user_id.clone()).or_default().push(k as u32);
            it.entry(r.item_id.clone()).or_default().push(k as u32);
        }
        let by_user = u.into_iter().map(|(k, v)| (k, build_seq(&rows, v))).collect();
        let by_item = it.into_iter().map(|(k, v)| (k, build_seq(&rows, v))).collect();
        let mut g: Vec<(i64, f32)> = rows.iter().map(|r| (r.timestamp, r.rating)).collect();
        g.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut global_prefix = vec![0.0];
        let mut s = 0.0;
        for &(_, r) in &g {
            s += r as f64;
            global_prefix.push(s);
        }
        HistoryIndex { rows, by_user, by_item, global_ts: g.into_iter().map(|x| x.0).collect(), global_prefix }
    }

    /// Index over the union of several interaction tables (e.g. train, valid, test).
    pub fn from_parquet(paths: &[&Path]) -> Result<Self, io::IoError> {
        let mut rows = Vec::new();
        for p in paths {
            rows.extend(io::read_interactions(p)?);
        }
        Ok(Self::new(rows))
    }

    pub fn rows(&self) -> &[Interaction] {
        &self.rows
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The user's interactions strictly before `t`, in time order.
    pub fn user_before(&self, user: &str, t: i64) -> Vec<&Interaction> {
        match self.by_user.get(user) {
            Some(s) => s.rows[..s.before(t)].iter().map(|&i| &self.rows[i as usize]).collect(),
            None => Vec::new(),
        }
    }

    /// Mean of all ratings strictly before `t` (None when there are none).
    pub fn global_mean_before(&self, t: i64) -> Option<f64> {
        let k = self.global_ts.partition_point(|&x| x < t);
        (k > 0).then(|| self.global_prefix[k] / k as f64)
    }

    /// Evidence for target (user, item, t); see the module doc for the rule.
    pub fn evidence(&self, user: &str, item: &str, t: i64, max_user: usize, max_item: usize) -> Evidence<'_> {
        let mut ev = Evidence {
            user_history: Vec::new(),
            user_count: 0,
            user_mean: None,
            item_history: Vec::new(),
            item_count: 0,
            item_mean: None,
        };
        // The user's own earlier ratings of this very item (a re-rating);
        // excluded from the item side, which is "by others".
        let (mut own_n, mut own_sum) = (0usize, 0.0f64);
        if let Some(s) = self.by_user.get(user) {
            let k = s.before(t);
            ev.user_count = k;
            if k > 0 {
                ev.user_mean = Some(s.prefix[k] / k as f64);
            }
            ev.user_history = s.rows[k.saturating_sub(max_user)..k].iter().map(|&i| &self.rows[i as usize]).collect();
            for &i in &s.rows[..k] {
                let r = &self.rows[i as usize];
                if r.item_id == item {
                    own_n += 1;
                    own_sum += r.rating as f64;
                }
            }
        }
        if let Some(s) = self.by_item.get(item) {
            let k = s.before(t);
            ev.item_count = k - own_n;
            if ev.item_count > 0 {
                ev.item_mean = Some((s.prefix[k] - own_sum) / ev.item_count as f64);
            }
            let mut hist: Vec<&Interaction> = s.rows[..k]
                .iter()
                .rev()
                .map(|&i| &self.rows[i as usize])
                .filter(|r| r.user_id != user)
                .take(max_item)
                .collect();
            hist.reverse();
            ev.item_history = hist;
        }
        ev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(u: &str, i: &str, rating: f32, t: i64) -> Interaction {
        Interaction { user_id: u.into(), item_id: i.into(), rating, timestamp: t, review_title: None, review_text: None }
    }

    #[test]
    fn only_strictly_earlier_evidence_is_returned() {
        let idx = HistoryIndex::new(vec![
            r("u", "a", 1.0, 10),
            r("u", "b", 2.0, 20),
            r("u", "c", 3.0, 30), // same time as the target: excluded
            r("u", "t", 5.0, 30), // the target
            r("u", "d", 4.0, 40), // later: excluded
            r("v", "t", 2.0, 5),
            r("w", "t", 4.0, 29),
            r("x", "t", 1.0, 30), // same time: excluded
        ]);
        let ev = idx.evidence("u", "t", 30, 10, 10);
        assert_eq!(ev.user_count, 2, "only interactions before t=30 count");
        assert_eq!(ev.user_mean, Some(1.5), "user mean over earlier ratings only");
        assert_eq!(ev.user_history.iter().map(|x| x.item_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(ev.item_count, 2, "item evidence: v and w, not x (tie) nor u");
        assert_eq!(ev.item_mean, Some(3.0));
        assert!(ev.item_history.iter().all(|x| x.timestamp < 30), "no same-time or later evidence");
        let ev = idx.evidence("u", "t", 30, 1, 1);
        assert_eq!(ev.user_history[0].item_id, "b", "max_user keeps the most recent entries");
        assert_eq!(ev.item_history[0].user_id, "w", "max_item keeps the most recent entries");
        assert_eq!(ev.user_count, 2, "counts and means stay over all earlier entries");
        assert_eq!(idx.global_mean_before(11), Some(1.5), "global mean over ratings before t");
        assert_eq!(idx.global_mean_before(5), None);
    }

    #[test]
    fn own_earlier_rating_of_the_item_is_not_item_evidence() {
        let idx = HistoryIndex::new(vec![r("u", "t", 1.0, 1), r("v", "t", 3.0, 2), r("u", "t", 5.0, 3)]);
        let ev = idx.evidence("u", "t", 3, 10, 10);
        assert_eq!(ev.item_count, 1, "the item side holds other users only");
        assert_eq!(ev.item_mean, Some(3.0));
        assert_eq!(ev.user_count, 1, "the user's own earlier rating is user history");
    }
}
