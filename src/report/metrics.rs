//! The metrics math of eval, baselines and the report — one module.
//!
//! Every method is scored on the same rows: a [`Scored`] row holds the target
//! `y`, the method's prediction `ŷ` (already replaced by the declared fallback
//! when the answer was invalid — an invalid answer is never counted as zero
//! error, unlike the paper's released code) and whether the answer was valid.
//!
//! * `RMSE = sqrt(1/n Σ (ŷ − y)²)`, `MAE = 1/n Σ |ŷ − y|` over all rows;
//!   `rmse_valid` / `mae_valid` over valid rows only (None when there are none).
//! * `exact` — share of rows whose prediction rounded to the nearest whole
//!   rating equals the target.
//! * [`Confusion`] — true whole rating × predicted whole rating, with an
//!   extra `invalid` column.
//! * [`by_history`] — errors by user-history length bucket.
//! * [`bootstrap_ci95`] — percentile bootstrap (Efron & Tibshirani 1993,
//!   Sec. 13.3) over rows, seeded ChaCha8, so the same rows and seed give the
//!   same interval.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One scored row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// y, the true rating.
    pub target: f64,
    /// ŷ, the prediction actually scored (fallback applied when invalid).
    pub prediction: f64,
    /// The method produced a usable answer (baselines: always true).
    pub valid: bool,
    /// Number of the user's ratings known before the target.
    pub user_history_len: i64,
}

/// Root mean squared error; None for no rows.
pub fn rmse(rows: &[Scored]) -> Option<f64> {
    if rows.is_empty() {
        return None;
    }
    Some((rows.iter().map(|r| (r.prediction - r.target).powi(2)).sum::<f64>() / rows.len() as f64).sqrt())
}

/// Mean absolute error; None for no rows.
pub fn mae(rows: &[Scored]) -> Option<f64> {
    if rows.is_empty() {
        return None;
    }
    Some(rows.iter().map(|r| (r.prediction - r.target).abs()).sum::<f64>() / rows.len() as f64)
}

/// Share of rows whose prediction rounds to the target (half away from zero).
pub fn exact(rows: &[Scored]) -> Option<f64> {
    if rows.is_empty() {
        return None;
    }
    Some(rows.iter().filter(|r| (r.prediction.round() - r.target).abs() < 1e-9).count() as f64 / rows.len() as f64)
}

/// Distinct predicted values among the valid rows (a method that answers one
/// constant rating has 1: it ignores the evidence, whatever its RMSE).
pub fn distinct_predictions(rows: &[Scored]) -> usize {
    let mut v: Vec<u64> = rows.iter().filter(|r| r.valid).map(|r| r.prediction.to_bits()).collect();
    v.sort_unstable();
    v.dedup();
    v.len()
}

/// Pearson correlation of predictions with targets over all rows; `None`
/// when either side is constant (the correlation is undefined there).
pub fn pearson(rows: &[Scored]) -> Option<f64> {
    let n = rows.len() as f64;
    if rows.len() < 2 {
        return None;
    }
    let (mp, mt) = (rows.iter().map(|r| r.prediction).sum::<f64>() / n, rows.iter().map(|r| r.target).sum::<f64>() / n);
    let (mut spt, mut spp, mut stt) = (0.0, 0.0, 0.0);
    for r in rows {
        let (dp, dt) = (r.prediction - mp, r.target - mt);
        spt += dp * dt;
        spp += dp * dp;
        stt += dt * dt;
    }
    (spp > 0.0 && stt > 0.0).then(|| spt / (spp * stt).sqrt())
}

/// Confusion matrix over whole ratings `min..=max`: `counts[t][p]`, with
/// `p == labels.len()` the `invalid` column. Predictions are rounded and
/// clamped into the scale; targets rounded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    /// Whole ratings, e.g. [1, 2, 3, 4, 5].
    pub labels: Vec<i64>,
    /// rows: true rating; columns: predicted rating, then `invalid`.
    pub counts: Vec<Vec<u64>>,
}

pub fn confusion(rows: &[Scored], scale_min: f64, scale_max: f64) -> Confusion {
    let lo = scale_min.ceil() as i64;
    let hi = scale_max.floor().max(scale_min.ceil()) as i64;
    let labels: Vec<i64> = (lo..=hi).collect();
    let k = labels.len();
    let mut counts = vec![vec![0u64; k + 1]; k];
    let idx = |v: f64| ((v.round() as i64).clamp(lo, hi) - lo) as usize;
    for r in rows {
        let t = idx(r.target);
        let p = if r.valid { idx(r.prediction) } else { k };
        counts[t][p] += 1;
    }
    Confusion { labels, counts }
}

/// Errors of one user-history bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// e.g. `0`, `1-2`, `3-5`, `6-10`, `11-20`, `21+`.
    pub bucket: String,
    pub n: usize,
    pub rmse: f64,
    pub mae: f64,
}

/// Upper bounds (inclusive) of the history buckets; the last is open.
const BUCKETS: [(i64, i64); 6] = [(0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, i64::MAX)];

/// RMSE and MAE per user-history bucket (empty buckets left out).
pub fn by_history(rows: &[Scored]) -> Vec<Bucket> {
    let mut out = Vec::new();
    for (lo, hi) in BUCKETS {
        let sel: Vec<Scored> = rows.iter().copied().filter(|r| r.user_history_len >= lo && r.user_history_len <= hi).collect();
        if let (Some(rmse), Some(mae)) = (rmse(&sel), mae(&sel)) {
            let bucket = match (lo, hi) {
                (l, h) if l == h => format!("{l}"),
                (l, i64::MAX) => format!("{l}+"),
                (l, h) => format!("{l}-{h}"),
            };
            out.push(Bucket { bucket, n: sel.len(), rmse, mae });
        }
    }
    out
}

/// Percentile-bootstrap 95% intervals of RMSE and MAE: `resamples` draws of
/// n rows with replacement; the 2.5th and 97.5th percentiles (nearest rank on
/// the sorted statistics). None for no rows or no resamples.
pub fn bootstrap_ci95(rows: &[Scored], resamples: u32, seed: u64) -> Option<([f64; 2], [f64; 2])> {
    let n = rows.len();
    if n == 0 || resamples == 0 {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut rmses, mut maes) = (Vec::with_capacity(resamples as usize), Vec::with_capacity(resamples as usize));
    for _ in 0..resamples {
        let (mut se, mut ae) = (0.0f64, 0.0f64);
        for _ in 0..n {
            let r = &rows[rng.random_range(0..n)];
            let e = r.prediction - r.target;
            se += e * e;
            ae += e.abs();
        }
        rmses.push((se / n as f64).sqrt());
        maes.push(ae / n as f64);
    }
    Some((percentile_interval(&mut rmses), percentile_interval(&mut maes)))
}

fn percentile_interval(v: &mut [f64]) -> [f64; 2] {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    [at(0.025), at(0.975)]
}

/// Everything the metrics files report for one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub rmse: Option<f64>,
    pub mae: Option<f64>,
    pub invalid_rate: f64,
    pub rmse_valid: Option<f64>,
    pub mae_valid: Option<f64>,
    pub exact: Option<f64>,
    /// [`distinct_predictions`] and [`pearson`]: does the method read the evidence?
    pub distinct_predictions: usize,
    pub pearson: Option<f64>,
    pub rmse_ci95: Option<[f64; 2]>,
    pub mae_ci95: Option<[f64; 2]>,
    pub confusion: Confusion,
    pub by_history: Vec<Bucket>,
}

/// Settings of [`summarize`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SummaryConfig {
    pub scale_min: f64,
    pub scale_max: f64,
    pub bootstrap_resamples: u32,
    pub seed: u64,
}

pub fn summarize(rows: &[Scored], cfg: &SummaryConfig) -> Summary {
    let valid: Vec<Scored> = rows.iter().copied().filter(|r| r.valid).collect();
    let ci = bootstrap_ci95(rows, cfg.bootstrap_resamples, cfg.seed);
    Summary {
        n: rows.len(),
        rmse: rmse(rows),
        mae: mae(rows),
        invalid_rate: if rows.is_empty() { 0.0 } else { (rows.len() - valid.len()) as f64 / rows.len() as f64 },
        rmse_valid: rmse(&valid),
        mae_valid: mae(&valid),
        exact: exact(rows),
        distinct_predictions: distinct_predictions(rows),
        pearson: pearson(rows),
        rmse_ci95: ci.map(|c| c.0),
        mae_ci95: ci.map(|c| c.1),
        confusion: confusion(rows, cfg.scale_min, cfg.scale_max),
        by_history: by_history(rows),
    }
}

impl Summary {
    /// The pinned per-method metrics object (ARCHITECTURE "metrics.json"):
    /// `stage, method, n, rmse, mae, invalid_rate, rmse_valid, mae_valid,
    /// exact, fallback, rmse_ci95, mae_ci95`, then `confusion` and
    /// `by_history`. Callers add their own fields (eval: `reward_mean`).
    pub fn to_json(&self, stage: &str, method: &str, fallback: &str) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let mut m = serde_json::Map::new();
        m.insert("stage".into(), json!(stage));
        m.insert("method".into(), json!(method));
        m.insert("n".into(), json!(self.n));
        m.insert("rmse".into(), json!(self.rmse));
        m.insert("mae".into(), json!(self.mae));
        m.insert("invalid_rate".into(), json!(self.invalid_rate));
        m.insert("rmse_valid".into(), json!(self.rmse_valid));
        m.insert("mae_valid".into(), json!(self.mae_valid));
        m.insert("exact".into(), json!(self.exact));
        m.insert("distinct_predictions".into(), json!(self.distinct_predictions));
        m.insert("pearson".into(), json!(self.pearson));
        m.insert("fallback".into(), json!(fallback));
        m.insert("rmse_ci95".into(), json!(self.rmse_ci95));
        m.insert("mae_ci95".into(), json!(self.mae_ci95));
        m.insert("confusion".into(), json!(self.confusion));
        m.insert("by_history".into(), json!(self.by_history));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: f64, p: f64, valid: bool, h: i64) -> Scored {
        Scored { target: t, prediction: p, valid, user_history_len: h }
    }

    #[test]
    fn hand_computed_rmse_mae_exact() {
        // errors: +1, −2, 0, +0.4 → SE 1+4+0+0.16 = 5.16, AE 1+2+0+0.4 = 3.4.
        let rows = [row(4.0, 5.0, true, 0), row(3.0, 1.0, true, 1), row(5.0, 5.0, true, 3), row(2.0, 2.4, false, 30)];
        assert!((rmse(&rows).unwrap() - (5.16f64 / 4.0).sqrt()).abs() < 1e-12, "RMSE = sqrt(5.16/4)");
        assert!((mae(&rows).unwrap() - 0.85).abs() < 1e-12, "MAE = 3.4/4");
        // rounded predictions 5,1,5,2 vs 4,3,5,2 → 2 of 4 exact.
        assert_eq!(exact(&rows), Some(0.5), "exact counts rounded hits");
        assert_eq!(rmse(&[]), None, "no rows → no RMSE, not NaN");
        let s = summarize(&rows, &SummaryConfig { scale_min: 1.0, scale_max: 5.0, bootstrap_resamples: 50, seed: 1 });
        assert_eq!(s.invalid_rate, 0.25, "one of four invalid");
        assert!((s.rmse_valid.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12, "valid-only RMSE excludes the invalid row");
        assert!((s.mae_valid.unwrap() - 1.0).abs() < 1e-12, "valid-only MAE = 3/3");
        assert_eq!(s.distinct_predictions, 2, "valid predictions 5, 1, 5: two distinct values");
    }

    #[test]
    fn pearson_hand_computed_and_undefined_for_constants() {
        // p = t → 1; p = −t → −1; constant p → undefined, not NaN.
        let up = [row(1.0, 1.0, true, 0), row(3.0, 3.0, true, 0), row(5.0, 5.0, true, 0)];
        let down = [row(1.0, 5.0, true, 0), row(3.0, 3.0, true, 0), row(5.0, 1.0, true, 0)];
        let flat = [row(1.0, 4.0, true, 0), row(3.0, 4.0, true, 0), row(5.0, 4.0, true, 0)];
        assert!((pearson(&up).unwrap() - 1.0).abs() < 1e-12, "identical series correlate at 1");
        assert!((pearson(&down).unwrap() + 1.0).abs() < 1e-12, "mirrored series correlate at −1");
        assert_eq!(pearson(&flat), None, "a constant prediction has no correlation");
        assert_eq!(distinct_predictions(&flat), 1, "one constant rating");
    }

    #[test]
    fn confusion_has_invalid_column_and_clamps() {
        let rows = [row(4.0, 5.0, true, 0), row(4.0, 4.2, true, 0), row(1.0, 0.2, true, 0), row(2.0, 3.0, false, 0)];
        let c = confusion(&rows, 1.0, 5.0);
        assert_eq!(c.labels, vec![1, 2, 3, 4, 5]);
        assert_eq!(c.counts[3][4], 1, "4 → 5");
        assert_eq!(c.counts[3][3], 1, "4 → 4.2 rounds to 4");
        assert_eq!(c.counts[0][0], 1, "0.2 clamps into the scale");
        assert_eq!(c.counts[1][5], 1, "invalid answers land in the invalid column");
        assert_eq!(c.counts.iter().flatten().sum::<u64>(), 4, "every row counted once");
    }

    #[test]
    fn history_buckets() {
        let rows = [row(4.0, 5.0, true, 0), row(4.0, 4.0, true, 2), row(4.0, 2.0, true, 1), row(4.0, 3.0, true, 25)];
        let b = by_history(&rows);
        let names: Vec<&str> = b.iter().map(|x| x.bucket.as_str()).collect();
        assert_eq!(names, ["0", "1-2", "21+"], "empty buckets are left out");
        assert_eq!(b[1].n, 2);
        assert!((b[1].rmse - 2.0f64.sqrt()).abs() < 1e-12, "bucket 1-2: errors 0 and 2 → sqrt(2)");
    }

    #[test]
    fn bootstrap_is_deterministic_and_brackets_the_estimate() {
        let rows: Vec<Scored> = (0..200).map(|i| row((i % 5 + 1) as f64, ((i * 7) % 5 + 1) as f64, true, 0)).collect();
        let a = bootstrap_ci95(&rows, 500, 42).unwrap();
        let b = bootstrap_ci95(&rows, 500, 42).unwrap();
        assert_eq!(a, b, "same rows and seed → identical interval");
        assert_ne!(a, bootstrap_ci95(&rows, 500, 43).unwrap(), "the seed reaches the resampling");
        let (r, m) = (rmse(&rows).unwrap(), mae(&rows).unwrap());
        assert!(a.0[0] < r && r < a.0[1], "RMSE {r} inside its interval {:?}", a.0);
        assert!(a.1[0] < m && m < a.1[1], "MAE {m} inside its interval {:?}", a.1);
        assert_eq!(bootstrap_ci95(&[], 10, 0), None, "no rows → no interval");
    }
}
