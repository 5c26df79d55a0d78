//! Paired comparisons on the same samples (issue 18): for two methods scored
//! on the same rows, the RMSE difference `RMSE(a) − RMSE(b)` with a paired
//! percentile bootstrap 95% interval — each resample draws row indices once
//! and scores both methods on them (Efron & Tibshirani 1993, Sec. 13.3 and
//! the paired design of Sec. 15.2). Two methods' separate intervals overlap
//! far more often than their difference is unsure, since both err on the
//! same hard rows; the paired interval removes that shared part. An
//! interval that excludes 0 says which is better on these samples.
//!
//! The report stage computes, from the `predictions` outputs parallel to its
//! `metrics` inputs: every method against the best baseline (lowest RMSE on
//! these rows), and the pairs its config names (`pairs: [[A, B], …]`, by
//! method name, e.g. RecOne − SFT and RecOne − global mean). They go into
//! the report, its metrics (`paired`, so the lock, `recflow show` and the
//! README tables carry them).
use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::io::Table;

/// One method's predictions by sample id: (target, prediction scored).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodPredictions {
    pub method: String,
    pub baseline: bool,
    pub rows: BTreeMap<String, (f64, f64)>,
}

impl MethodPredictions {
    pub fn rmse(&self) -> f64 {
        let n = self.rows.len().max(1) as f64;
        (self.rows.values().map(|(y, p)| (p - y).powi(2)).sum::<f64>() / n).sqrt()
    }
}

/// The methods of one predictions file: a baselines file (long: a `method`
/// column) holds several; an eval file holds the one its `metrics` names.
pub fn read(path: &Path, metrics: &Value) -> anyhow::Result<Vec<MethodPredictions>> {
    let t = Table::read(path)?;
    let (ids, y, p) = (t.strings("sample_id")?, t.f64s("target")?, t.f64s("prediction")?);
    let mut by: BTreeMap<String, MethodPredictions> = BTreeMap::new();
    let long = t.has_column("method");
    let methods = if long {
        t.strings("method")?
    } else {
        let m = metrics.get("method").and_then(Value::as_str).ok_or_else(|| {
            anyhow::anyhow!("{}: an eval predictions file, but its metrics (same position in `metrics`) name no method", path.display())
        })?;
        vec![m.to_string(); ids.len()]
    };
    for (i, id) in ids.into_iter().enumerate() {
        let e = by.entry(methods[i].clone()).or_insert_with(|| MethodPredictions {
            method: methods[i].clone(),
            baseline: long,
            rows: BTreeMap::new(),
        });
        if e.rows.insert(id.clone(), (y[i], p[i])).is_some() {
            anyhow::bail!("{}: sample `{id}` occurs twice for method `{}`", path.display(), methods[i]);
        }
    }
    Ok(by.into_values().collect())
}

/// `RMSE(a) − RMSE(b)` on the same rows, with its paired bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub method: String,
    pub against: String,
    pub n: usize,
    pub rmse_diff: f64,
    pub rmse_diff_ci95: [f64; 2],
}

/// Paired percentile bootstrap of `RMSE(a) − RMSE(b)` over rows `(y, ŷ_a, ŷ_b)`.
pub fn rmse_diff_ci95(rows: &[(f64, f64, f64)], resamples: u32, seed: u64) -> Option<(f64, [f64; 2])> {
    let n = rows.len();
    if n == 0 || resamples == 0 {
        return None;
    }
    let diff = |pick: &mut dyn FnMut() -> usize| {
        let (mut sa, mut sb) = (0.0f64, 0.0f64);
        for _ in 0..n {
            let (y, a, b) = rows[pick()];
            sa += (a - y).powi(2);
            sb += (b - y).powi(2);
        }
        (sa / n as f64).sqrt() - (sb / n as f64).sqrt()
    };
    let mut i = 0;
    let point = diff(&mut || {
        i += 1;
        i - 1
    });
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut d: Vec<f64> = (0..resamples).map(|_| diff(&mut || rng.random_range(0..n))).collect();
    d.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| d[((q * d.len() as f64).ceil() as usize).clamp(1, d.len()) - 1];
    Some((point, [at(0.025), at(0.975)]))
}

/// Compares `a` with `b` on their common samples, which must be all of each.
pub fn pair(a: &MethodPredictions, b: &MethodPredictions, resamples: u32, seed: u64) -> anyhow::Result<Option<Paired>> {
    if a.rows.len() != b.rows.len() || a.rows.keys().zip(b.rows.keys()).any(|(x, y)| x != y) {
        anyhow::bail!(
            "methods `{}` ({} samples) and `{}` ({} samples) were not scored on the same samples; a paired comparison needs them \
             (give the baselines the eval's `samples`)",
            a.method,
            a.rows.len(),
            b.method,
            b.rows.len()
        );
    }
    let rows: Vec<(f64, f64, f64)> = a.rows.iter().map(|(id, &(y, pa))| (y, pa, b.rows[id].1)).collect();
    Ok(rmse_diff_ci95(&rows, resamples, seed).map(|(d, ci)| Paired {
        method: a.method.clone(),
        against: b.method.clone(),
        n: rows.len(),
        rmse_diff: d,
        rmse_diff_ci95: ci,
    }))
}

/// Every method against the best baseline, then the named `pairs`
/// (duplicates once). A name in `pairs` that no method has is an error
/// naming the methods there are.
pub fn compare(methods: &[MethodPredictions], pairs: &[[String; 2]], resamples: u32, seed: u64) -> anyhow::Result<Vec<Paired>> {
    let mut out: Vec<Paired> = Vec::new();
    let best = methods.iter().filter(|m| m.baseline).min_by(|a, b| a.rmse().total_cmp(&b.rmse()));
    let mut todo: Vec<(&MethodPredictions, &MethodPredictions)> = Vec::new();
    if let Some(best) = best {
        todo.extend(methods.iter().filter(|m| m.method != best.method).map(|m| (m, best)));
    }
    let find = |name: &str| {
        methods.iter().find(|m| m.method == name).ok_or_else(|| {
            anyhow::anyhow!(
                "report `pairs`: no method `{name}` among the predictions ({})",
                methods.iter().map(|m| format!("`{}`", m.method)).collect::<Vec<_>>().join(", ")
            )
        })
    };
    for [a, b] in pairs {
        todo.push((find(a)?, find(b)?));
    }
    for (a, b) in todo {
        if out.iter().any(|p| p.method == a.method && p.against == b.method) {
            continue;
        }
        out.extend(pair(a, b, resamples, seed)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, baseline: bool, preds: &[(f64, f64)]) -> MethodPredictions {
        MethodPredictions {
            method: name.into(),
            baseline,
            rows: preds.iter().enumerate().map(|(i, &r)| (format!("s{i:03}"), r)).collect(),
        }
    }

    #[test]
    fn identical_methods_differ_by_exactly_zero() {
        let rows: Vec<(f64, f64, f64)> = (0..50).map(|i| (3.0, 3.0 + (i % 3) as f64, 3.0 + (i % 3) as f64)).collect();
        let (d, ci) = rmse_diff_ci95(&rows, 200, 1).unwrap();
        assert_eq!((d, ci), (0.0, [0.0, 0.0]), "a method against itself: no difference on any resample");
    }

    #[test]
    fn a_consistently_better_method_excludes_zero_and_pairing_tightens() {
        // a is off by 0.5 everywhere, b by 1.0 on the same rows: every
        // resample gives exactly RMSE 0.5 − 1.0.
        let rows: Vec<(f64, f64, f64)> = (0..40).map(|i| (4.0, 4.5 - (i % 2) as f64, 5.0 - 2.0 * (i % 2) as f64)).collect();
        let (d, ci) = rmse_diff_ci95(&rows, 500, 3).unwrap();
        assert!((d + 0.5).abs() < 1e-12, "point difference {d}");
        assert!(ci[1] < 0.0 && (ci[0] + 0.5).abs() < 1e-9, "the interval is the constant difference: {ci:?}");
    }

    #[test]
    fn compare_uses_the_best_baseline_and_named_pairs() {
        let truth = [(1.0, 1.0), (5.0, 5.0), (3.0, 3.0), (4.0, 4.0)];
        let gm = m("global_mean", true, &truth.map(|(y, _)| (y, 3.25)));
        let bias = m("bias", true, &truth.map(|(y, _)| (y, y + 0.1)));
        let sft = m("sft", false, &truth.map(|(y, _)| (y, y + 1.0)));
        let grpo = m("grpo", false, &truth.map(|(y, _)| (y, y + 0.5)));
        let ps = compare(&[gm, bias, sft, grpo], &[["grpo".into(), "sft".into()], ["grpo".into(), "global_mean".into()]], 100, 7).unwrap();
        let names: Vec<(&str, &str)> = ps.iter().map(|p| (p.method.as_str(), p.against.as_str())).collect();
        assert_eq!(
            names,
            [("global_mean", "bias"), ("sft", "bias"), ("grpo", "bias"), ("grpo", "sft"), ("grpo", "global_mean")],
            "every method against the best baseline (bias), then the named pairs"
        );
        assert!((ps[3].rmse_diff + 0.5).abs() < 1e-12, "grpo − sft = 0.5 − 1.0");
        let err = compare(&[m("a", false, &truth), m("b", false, &truth[..3])], &[["a".into(), "b".into()]], 10, 0).unwrap_err();
        assert!(err.to_string().contains("not scored on the same samples"), "{err}");
        let err = compare(&[m("a", false, &truth)], &[["a".into(), "zz".into()]], 10, 0).unwrap_err();
        assert!(err.to_string().contains("no method `zz`") && err.to_string().contains("`a`"), "{err}");
    }
}
