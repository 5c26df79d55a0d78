//! The methods table shared by the HTML report and `recflow show`: rows read
//! from eval / baselines `metrics.json` files, grouping of matrix-expanded
//! stages (`NAME@k=v`) into mean ± 95% interval, and the improvement over
//! the best baseline.
use serde::Serialize;
use serde_json::Value;

/// One method's metrics, from an eval metrics file (one row) or a baselines
/// metrics file (one row per method).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodRow {
    pub stage: String,
    pub method: String,
    pub n: u64,
    pub rmse: Option<f64>,
    pub mae: Option<f64>,
    pub invalid_rate: Option<f64>,
    pub exact: Option<f64>,
    pub rmse_ci95: Option<[f64; 2]>,
    pub mae_ci95: Option<[f64; 2]>,
    pub reward_mean: Option<f64>,
    /// Row of a `baselines` file (used for "improvement over the best baseline").
    pub baseline: bool,
    /// Number of matrix expansions summarised (1 for a plain stage).
    pub runs: usize,
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn ci(v: &Value, k: &str) -> Option<[f64; 2]> {
    let a = v.get(k)?.as_array()?;
    Some([a.first()?.as_f64()?, a.get(1)?.as_f64()?])
}

fn row_of(stage: &str, m: &Value, baseline: bool) -> MethodRow {
    MethodRow {
        stage: m.get("stage").and_then(Value::as_str).unwrap_or(stage).to_string(),
        method: m.get("method").and_then(Value::as_str).unwrap_or("?").to_string(),
        n: m.get("n").and_then(Value::as_u64).unwrap_or(0),
        rmse: f(m, "rmse"),
        mae: f(m, "mae"),
        invalid_rate: f(m, "invalid_rate"),
        exact: f(m, "exact"),
        rmse_ci95: ci(m, "rmse_ci95"),
        mae_ci95: ci(m, "mae_ci95"),
        reward_mean: f(m, "reward_mean"),
        baseline,
        runs: 1,
    }
}

/// Rows of one metrics.json value (eval shape or baselines shape); `stage`
/// is used when the file does not name its stage. Other JSON shapes give no rows.
pub fn rows_from_metrics(stage: &str, v: &Value) -> Vec<MethodRow> {
    let stage = v.get("stage").and_then(Value::as_str).unwrap_or(stage);
    if let Some(ms) = v.get("methods").and_then(Value::as_array) {
        return ms.iter().map(|m| row_of(stage, m, true)).collect();
    }
    if v.get("rmse").is_some() && v.get("method").is_some() {
        return vec![row_of(stage, v, false)];
    }
    Vec::new()
}

/// Two-sided 95% Student-t quantile for `df` degrees of freedom.
pub fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        _ => 1.96,
    }
}

/// Mean and t-based 95% interval `mean ± t · s / sqrt(k)` of k values.
pub fn mean_ci95(xs: &[f64]) -> Option<(f64, [f64; 2])> {
    if xs.is_empty() {
        return None;
    }
    let k = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / k;
    if xs.len() == 1 {
        return Some((mean, [mean, mean]));
    }
    let s = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt();
    let h = t95(xs.len() - 1) * s / k.sqrt();
    Some((mean, [mean - h, mean + h]))
}

/// Stage name without its matrix suffix: `grpo@seed=1` → `grpo`.
pub fn base_stage(stage: &str) -> &str {
    stage.split('@').next().unwrap_or(stage)
}

/// Groups rows of matrix expansions of one stage (same base name and method)
/// into one row: metric means, and as intervals the t-interval across the
/// expansions (seed-to-seed variation). Single rows pass through unchanged.
/// Order: first appearance.
pub fn group_matrix(rows: &[MethodRow]) -> Vec<MethodRow> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rows {
        let k = (base_stage(&r.stage).to_string(), r.method.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(stage, method)| {
            let g: Vec<&MethodRow> = rows.iter().filter(|r| base_stage(&r.stage) == stage && r.method == method).collect();
            if g.len() == 1 {
                return g[0].clone();
            }
            let col = |sel: fn(&MethodRow) -> Option<f64>| -> Vec<f64> { g.iter().filter_map(|r| sel(r)).collect() };
            let mean = |xs: Vec<f64>| mean_ci95(&xs).map(|m| m.0);
            let rmse = mean_ci95(&col(|r| r.rmse));
            let mae = mean_ci95(&col(|r| r.mae));
            MethodRow {
                stage: format!("{stage}@*"),
                method,
                n: g.iter().map(|r| r.n).max().unwrap_or(0),
                rmse: rmse.map(|m| m.0),
                mae: mae.map(|m| m.0),
                invalid_rate: mean(col(|r| r.invalid_rate)),
                exact: mean(col(|r| r.exact)),
                rmse_ci95: rmse.map(|m| m.1),
                mae_ci95: mae.map(|m| m.1),
                reward_mean: mean(col(|r| r.reward_mean)),
                baseline: g[0].baseline,
                runs: g.len(),
            }
        })
        .collect()
}

/// Lowest RMSE and lowest MAE among baseline rows.
pub fn best_baseline(rows: &[MethodRow]) -> (Option<f64>, Option<f64>) {
    let min = |sel: fn(&MethodRow) -> Option<f64>| {
        rows.iter().filter(|r| r.baseline).filter_map(sel).min_by(|a, b| a.total_cmp(b))
    };
    (min(|r| r.rmse), min(|r| r.mae))
}

/// Relative improvement in % (positive = lower error than the reference).
pub fn improvement(value: Option<f64>, reference: Option<f64>) -> Option<f64> {
    match (value, reference) {
        (Some(v), Some(r)) if r > 0.0 => Some((r - v) / r * 100.0),
        _ => None,
    }
}

/// Number formatting used everywhere (stable across runs).
pub fn fmt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".to_string(),
    }
}

pub fn fmt_ci(v: Option<[f64; 2]>) -> String {
    match v {
        Some([a, b]) => format!("[{a:.4}, {b:.4}]"),
        None => "–".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_both_shapes_and_groups_matrix() {
        let b = json!({"stage": "baselines", "methods": [
            {"method": "global_mean", "n": 10, "rmse": 1.2, "mae": 1.0, "invalid_rate": 0.0},
            {"method": "bias", "n": 10, "rmse": 1.0, "mae": 0.8, "invalid_rate": 0.0}]});
        let e1 = json!({"stage": "eval@seed=1", "method": "grpo", "n": 10, "rmse": 0.9, "mae": 0.7, "invalid_rate": 0.1, "rmse_ci95": [0.8, 1.0]});
        let e2 = json!({"stage": "eval@seed=2", "method": "grpo", "n": 10, "rmse": 1.1, "mae": 0.9, "invalid_rate": 0.0});
        let mut rows = rows_from_metrics("x", &b);
        rows.extend(rows_from_metrics("x", &e1));
        rows.extend(rows_from_metrics("x", &e2));
        assert_eq!(rows.len(), 4, "one row per baseline method and per eval file");
        let g = group_matrix(&rows);
        assert_eq!(g.len(), 3, "two expansions of eval collapse into one row");
        let e = &g[2];
        assert_eq!((e.stage.as_str(), e.runs), ("eval@*", 2));
        assert!((e.rmse.unwrap() - 1.0).abs() < 1e-12, "mean of 0.9 and 1.1");
        // s = sqrt(0.02), t(1) = 12.706, half-width = 12.706 · s / sqrt 2 = 1.2706.
        let ci = e.rmse_ci95.unwrap();
        assert!((ci[1] - 1.0 - 1.2706).abs() < 1e-9, "t-interval over seeds: {ci:?}");
        assert_eq!(best_baseline(&g), (Some(1.0), Some(0.8)), "best baseline is the bias row");
        assert!((improvement(Some(0.9), Some(1.0)).unwrap() - 10.0).abs() < 1e-9, "0.9 vs 1.0 is 10% better");
    }
}
