//! k-core filtering: drop users with fewer than `min_user` interactions and
//! items with fewer than `min_item`, repeatedly, until nothing changes (a
//! removal can push another user or item under its threshold, so one pass is
//! not enough; the fixed point is the k-core of the bipartite graph).
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Interaction;

/// What the filter did (also the stage metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterStats {
    pub interactions_before: u64,
    pub interactions_after: u64,
    pub users_before: u64,
    pub users_after: u64,
    pub items_before: u64,
    pub items_after: u64,
    /// Passes until the fixed point.
    pub rounds: u64,
    /// Interactions removed because their user was under `min_user`.
    pub removed_by_user_threshold: u64,
    /// … because their item was under `min_item` (user was fine).
    pub removed_by_item_threshold: u64,
}

fn distinct<'a>(rows: impl Iterator<Item = &'a str>) -> u64 {
    let mut s: Vec<&str> = rows.collect();
    s.sort_unstable();
    s.dedup();
    s.len() as u64
}

/// Iterated k-core; keeps input order.
pub fn kcore(rows: Vec<Interaction>, min_user: usize, min_item: usize) -> (Vec<Interaction>, FilterStats) {
    let mut st = FilterStats {
        interactions_before: rows.len() as u64,
        users_before: distinct(rows.iter().map(|r| r.user_id.as_str())),
        items_before: distinct(rows.iter().map(|r| r.item_id.as_str())),
        ..Default::default()
    };
    let mut rows = rows;
    loop {
        let mut uc: HashMap<&str, usize> = HashMap::new();
        let mut ic: HashMap<&str, usize> = HashMap::new();
        for r in &rows {
            *uc.entry(&r.user_id).or_default() += 1;
            *ic.entry(&r.item_id).or_default() += 1;
        }
        let keep: Vec<bool> = rows
            .iter()
            .map(|r| {
                if uc[r.user_id.as_str()] < min_user {
                    st.removed_by_user_threshold += 1;
                    false
                } else if ic[r.item_id.as_str()] < min_item {
                    st.removed_by_item_threshold += 1;
                    false
                } else {
                    true
                }
            })
            .collect();
        st.rounds += 1;
        if keep.iter().all(|&k| k) {
            break;
        }
        let mut it = keep.into_iter();
        rows.retain(|_| it.next().unwrap_or(true));
    }
    st.interactions_after = rows.len() as u64;
    st.users_after = distinct(rows.iter().map(|r| r.user_id.as_str()));
    st.items_after = distinct(rows.iter().map(|r| r.item_id.as_str()));
    (rows, st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(u: &str, i: &str) -> Interaction {
        Interaction { user_id: u.into(), item_id: i.into(), rating: 3.0, timestamp: 0, review_title: None, review_text: None }
    }

    #[test]
    fn kcore_iterates_to_a_fixed_point() {
        // u1,u2 rate a,b (a 2-core); u3 rates a and c; c has one rating →
        // removing (u3,c) leaves u3 with one rating → (u3,a) goes in round 2.
        let rows = vec![r("u1", "a"), r("u1", "b"), r("u2", "a"), r("u2", "b"), r("u3", "a"), r("u3", "c")];
        let (kept, st) = kcore(rows, 2, 2);
        assert_eq!(kept.len(), 4, "only the u1/u2 × a/b core survives");
        assert!(st.rounds >= 3, "needs more than one pass plus a confirming pass: {st:?}");
        let (again, st2) = kcore(kept.clone(), 2, 2);
        assert_eq!(again, kept, "the result is a fixed point");
        assert_eq!(st2.rounds, 1);
        let (none, st3) = kcore(kept, 3, 3);
        assert!(none.is_empty());
        assert_eq!(st3.removed_by_user_threshold + st3.removed_by_item_threshold, 4, "every removal is attributed");
    }
}
