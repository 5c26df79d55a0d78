//! The self-contained HTML report (one `index.html`, inline CSS and SVG, no
//! scripts or external assets). Its bytes are a pure function of the inputs:
//! no wall-clock times, host names or input paths (cache paths differ
//! between stores) — inputs are labelled by their content and position.
use serde_json::Value;

use super::io::Table;
use super::svg::{self, esc};
use super::table::{best_baseline, fmt, fmt_ci, group_matrix, improvement, rows_from_metrics, MethodRow};

/// A training log read from Parquet: column name → values (nullable).
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub columns: Vec<(String, Vec<Option<f64>>)>,
}

impl Log {
    /// Reads every numeric column of a log table.
    pub fn read(t: &Table) -> Self {
        let mut columns = Vec::new();
        if let Some(b) = t.batches.first() {
            for f in b.schema().fields() {
                if let Ok(v) = t.f64s_opt(f.name()) {
                    columns.push((f.name().clone(), v));
                }
            }
        }
        Log { columns }
    }

    pub fn col(&self, name: &str) -> Option<&[Option<f64>]> {
        self.columns.iter().find(|c| c.0 == name).map(|c| c.1.as_slice())
    }

    /// `grpo` logs carry `reward_mean`; `sft` logs carry `loss` without it.
    pub fn kind(&self) -> &'static str {
        if self.col("reward_mean").is_some() {
            "grpo"
        } else if self.col("loss").is_some() {
            "sft"
        } else {
            "log"
        }
    }

    /// (step, value) points of a column, skipping nulls.
    pub fn series(&self, name: &str) -> Vec<(f64, f64)> {
        let (Some(steps), Some(v)) = (self.col("step"), self.col(name)) else {
            return Vec::new();
        };
        steps.iter().zip(v).filter_map(|(s, y)| Some(((*s)?, (*y)?))).collect()
    }
}

/// Everything the report shows.
#[derive(Debug, Clone, Default)]
pub struct ReportInputs {
    pub title: String,
    /// Parsed metrics.json files, in input order.
    pub metrics: Vec<Value>,
    pub logs: Vec<Log>,
    /// Teacher `stats` JSON files.
    pub stats: Vec<Value>,
    /// DAG edges (from a DAG file or the config's list).
    pub dag: Vec<(String, String)>,
    /// Paired RMSE differences on the same samples ([`super::paired`]).
    pub paired: Vec<super::paired::Paired>,
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}\
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f3f6fa}td.l,th.l{text-align:left}.good{color:#11703a}.bad{color:#a31515}\
.note{color:#555;font-size:0.9em}figure{display:inline-block;margin:0.5em}";

fn row_cells(r: &MethodRow, best: (Option<f64>, Option<f64>)) -> String {
    let imp = |v: Option<f64>, b: Option<f64>| match improvement(v, b) {
        Some(p) if !r.baseline => {
            let class = if p > 0.0 { "good" } else { "bad" };
            format!("<td class=\"{class}\">{p:+.1}%</td>")
        }
        _ => "<td>–</td>".to_string(),
    };
    format!(
        "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{}{}<td>{}</td></tr>",
        esc(&r.stage),
        esc(&r.method),
        r.n,
        r.runs,
        fmt(r.rmse, 4),
        fmt_ci(r.rmse_ci95),
        fmt(r.mae, 4),
        fmt_ci(r.mae_ci95),
        fmt(r.invalid_rate, 3),
        imp(r.rmse, best.0),
        imp(r.mae, best.1),
        fmt(r.exact, 3),
    )
}

fn methods_section(metrics: &[Value]) -> String {
    let rows: Vec<MethodRow> = metrics.iter().flat_map(|m| rows_from_metrics("?", m)).collect();
    let grouped = group_matrix(&rows);
    let best = best_baseline(&grouped);
    let mut s = String::from("<h2>Methods</h2>");
    if grouped.is_empty() {
        s.push_str("<p class=\"note\">No eval or baselines metrics were given.</p>");
        return s;
    }
    s.push_str("<table><tr><th class=\"l\">stage</th><th class=\"l\">method</th><th>n</th><th>runs</th><th>RMSE</th><th>RMSE 95% CI</th><th>MAE</th><th>MAE 95% CI</th><th>invalid rate</th><th>Δ RMSE vs best baseline</th><th>Δ MAE vs best baseline</th><th>exact</th></tr>");
    for r in &grouped {
        s.push_str(&row_cells(r, best));
    }
    s.push_str("</table><p class=\"note\">Every method is scored on the same rows. Invalid answers are scored by the eval stage's declared fallback (never as zero error) and counted in the invalid rate. Intervals: bootstrap 95% over rows for single runs; t-interval over runs for matrix-expanded stages (runs &gt; 1). Δ: improvement over the best baseline (positive = lower error). Baselines use only the training ratings (no text).</p>");
    s
}

/// Paired RMSE differences (empty when the report got no predictions).
fn paired_section(paired: &[super::paired::Paired]) -> String {
    if paired.is_empty() {
        return String::new();
    }
    let mut s = String::from("<h2>Paired differences on the same samples</h2><table><tr><th class=\"l\">method</th><th class=\"l\">against</th><th>n</th><th>RMSE difference</th><th>95% CI</th><th class=\"l\">verdict</th></tr>");
    for p in paired {
        let [lo, hi] = p.rmse_diff_ci95;
        let (class, verdict) = if hi < 0.0 {
            ("good", "lower RMSE")
        } else if lo > 0.0 {
            ("bad", "higher RMSE")
        } else {
            ("", "not separated")
        };
        s.push_str(&format!(
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{:+.4}</td><td>[{lo:+.4}, {hi:+.4}]</td><td class=\"l {class}\">{verdict}</td></tr>",
            esc(&p.method),
            esc(&p.against),
            p.n,
            p.rmse_diff
        ));
    }
    s.push_str("</table><p class=\"note\">RMSE(method) − RMSE(against) on the same samples; paired percentile bootstrap (1,000 resamples of the rows, both methods scored on each). An interval that excludes 0 separates the two.</p>");
    s
}

fn confusion_section(metrics: &[Value]) -> String {
    let mut s = String::new();
    for m in metrics {
        let Some(c) = m.get("confusion") else { continue };
        if m.get("methods").is_some() {
            continue; // baselines: continuous predictions, their confusion adds little
        }
        let (Some(labels), Some(counts)) = (c.get("labels").and_then(Value::as_array), c.get("counts").and_then(Value::as_array)) else {
            continue;
        };
        let name = format!("{} / {}", m.get("stage").and_then(Value::as_str).unwrap_or("?"), m.get("method").and_then(Value::as_str).unwrap_or("?"));
        let max = counts.iter().flat_map(|r| r.as_array().into_iter().flatten()).filter_map(Value::as_u64).max().unwrap_or(1).max(1);
        s.push_str(&format!("<h3>Confusion matrix: {}</h3><table><tr><th class=\"l\">true \\ predicted</th>", esc(&name)));
        for l in labels {
            s.push_str(&format!("<th>{l}</th>"));
        }
        s.push_str("<th>invalid</th></tr>");
        for (l, row) in labels.iter().zip(counts) {
            s.push_str(&format!("<tr><th class=\"l\">{l}</th>"));
            for v in row.as_array().into_iter().flatten() {
                let v = v.as_u64().unwrap_or(0);
                let a = (v as f64 / max as f64 * 0.8 * 100.0).round() / 100.0;
                s.push_str(&format!("<td style=\"background:rgba(31,119,180,{a})\">{v}</td>"));
            }
            s.push_str("</tr>");
        }
        s.push_str("</table>");
        if let Some(b) = m.get("by_history").and_then(Value::as_array) {
            s.push_str("<table><tr><th class=\"l\">user history</th><th>n</th><th>RMSE</th><th>MAE</th></tr>");
            for x in b {
                s.push_str(&format!(
                    "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(x.get("bucket").and_then(Value::as_str).unwrap_or("?")),
                    x.get("n").and_then(Value::as_u64).unwrap_or(0),
                    fmt(x.get("rmse").and_then(Value::as_f64), 4),
                    fmt(x.get("mae").and_then(Value::as_f64), 4)
                ));
            }
            s.push_str("</table>");
        }
    }
    if s.is_empty() {
        s
    } else {
        format!("<h2>Errors in detail</h2>{s}")
    }
}

fn curves_section(logs: &[Log]) -> String {
    let mut s = String::new();
    let fig = |title: &str, series: Vec<(String, Vec<(f64, f64)>)>| format!("<figure>{}</figure>", svg::line_chart(title, "step", &series));
    let mut k_grpo = 0;
    let mut k_sft = 0;
    for log in logs {
        match log.kind() {
            "grpo" => {
                k_grpo += 1;
                s.push_str(&format!("<h3>GRPO run {k_grpo}</h3>"));
                if let Some(c) = grpo_collapse(log) {
                    s.push_str(&format!("<p class=\"bad\"><strong>{}</strong> (valid fraction, zero-variance groups and KL, per step, are in the log; the runner and <code>recflow show</code> say the same)</p>", esc(&c)));
                }
                s.push_str(&fig("reward (mean)", vec![("reward_mean".into(), log.series("reward_mean")), ("val_reward".into(), log.series("val_reward"))]));
                s.push_str(&fig("validation RMSE", vec![("val_rmse".into(), log.series("val_rmse"))]));
                s.push_str(&fig("KL to reference", vec![("kl".into(), log.series("kl"))]));
                s.push_str(&fig("completion length (tokens)", vec![("completion_len_mean".into(), log.series("completion_len_mean"))]));
            }
            "sft" => {
                k_sft += 1;
                s.push_str(&format!("<h3>SFT run {k_sft}</h3>"));
                s.push_str(&fig("SFT loss", vec![("loss".into(), log.series("loss")), ("val_loss".into(), log.series("val_loss"))]));
            }
            _ => {}
        }
    }
    if s.is_empty() {
        s
    } else {
        format!("<h2>Training curves</h2>{s}")
    }
}

/// The collapse verdict of a GRPO log, replayed through the stage's own
/// watch ([`crate::stages::grpo::CollapseWatch`]). The report does not see
/// the stage's `kl_warn_threshold` (operational, out of every key), so KL
/// is judged against its default; with β = 0 the logged KL is 0.
fn grpo_collapse(log: &Log) -> Option<String> {
    use crate::stages::grpo::{collapse_note, CollapseWatch, DEFAULT_KL_WARN_THRESHOLD};
    let steps = log.col("step")?;
    let col = |c: &str| log.col(c).map(|v| v.to_vec()).unwrap_or_else(|| vec![None; steps.len()]);
    let (vf, zs, kl) = (col("valid_fraction"), col("frac_reward_zero_std"), col("kl"));
    let mut w = CollapseWatch::new(steps.len(), Some(DEFAULT_KL_WARN_THRESHOLD));
    for (i, s) in steps.iter().enumerate() {
        let s = (*s)? as u64;
        // A log without a column cannot show that condition (never NaN → "collapsed").
        w.observe(s, vf[i].unwrap_or(1.0), zs[i].unwrap_or(0.0), kl[i].unwrap_or(0.0));
    }
    let m: serde_json::Map<String, Value> = w.metrics().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    collapse_note(&Value::Object(m))
}

fn stats_section(stats: &[Value]) -> String {
    let mut s = String::new();
    for (k, st) in stats.iter().enumerate() {
        let Some(obj) = st.as_object() else { continue };
        s.push_str(&format!("<h3>Teacher {}</h3><table>", k + 1));
        let n = st.get("n_samples").and_then(Value::as_f64);
        let acc = st.get("accepted").and_then(Value::as_f64);
        if let (Some(n), Some(a)) = (n, acc) {
            if n > 0.0 {
                s.push_str(&format!("<tr><th class=\"l\">acceptance rate</th><td>{:.3}</td></tr>", a / n));
            }
        }
        for (key, v) in obj {
            let shown = match v {
                Value::Object(_) | Value::Array(_) => serde_json::to_string(v).unwrap_or_default(),
                Value::Number(x) => x.as_f64().map(|f| if f.fract() == 0.0 { format!("{f:.0}") } else { format!("{f:.4}") }).unwrap_or_default(),
                other => other.to_string(),
            };
            s.push_str(&format!("<tr><th class=\"l\">{}</th><td class=\"l\">{}</td></tr>", esc(key), esc(&shown)));
        }
        s.push_str("</table>");
    }
    if s.is_empty() {
        s
    } else {
        format!("<h2>Teacher acceptance</h2>{s}")
    }
}

/// Renders `index.html`.
pub fn render(inp: &ReportInputs) -> String {
    let mut h = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{CSS}</style></head><body><h1>{}</h1>",
        esc(&inp.title),
        esc(&inp.title)
    );
    h.push_str(&methods_section(&inp.metrics));
    h.push_str(&paired_section(&inp.paired));
    h.push_str(&curves_section(&inp.logs));
    h.push_str(&confusion_section(&inp.metrics));
    h.push_str(&stats_section(&inp.stats));
    if !inp.dag.is_empty() {
        h.push_str("<h2>Pipeline</h2>");
        h.push_str(&svg::dag(&inp.dag));
    }
    h.push_str("<p class=\"note\">Generated by recflow. Timings and cache hits: <code>recflow show PIPELINE</code>.</p></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpo_log(valid: f64) -> Log {
        let n = 10;
        let col = |v: f64| (0..n).map(|_| Some(v)).collect::<Vec<_>>();
        Log {
            columns: vec![
                ("step".into(), (1..=n).map(|s| Some(s as f64)).collect()),
                ("reward_mean".into(), col(-1.0)),
                ("valid_fraction".into(), col(valid)),
                ("frac_reward_zero_std".into(), col(0.5)),
                ("kl".into(), col(0.0)),
            ],
        }
    }

    #[test]
    fn grpo_panel_says_when_the_run_collapsed() {
        let html = render(&ReportInputs { logs: vec![grpo_log(0.0)], ..Default::default() });
        assert!(html.contains("COLLAPSED at step 4: valid fraction below 0.2"), "10 steps: warm-up 1, then steps 2-4 trip");
        let html = render(&ReportInputs { logs: vec![grpo_log(0.9)], ..Default::default() });
        assert!(!html.contains("COLLAPSED"), "a healthy run has no collapse line");
    }
}
