//! `report` stage: one self-contained HTML report of a pipeline's results.
//!
//! Inputs (all lists, `many`): `metrics` (eval / baselines metrics.json),
//! `logs` (sft / grpo log Parquet), `stats` (teacher stats JSON), and
//! optionally `predictions` (eval / baselines predictions, parallel to
//! `metrics`: entry i belongs to metrics i), from which the paired RMSE
//! differences on the same samples are computed ([`crate::report::paired`]:
//! every method against the best baseline, and the `pairs` the config names);
//! they enter the report and the stage's metrics (`paired`), so the lock,
//! `recflow show` and the README tables carry them.
//! Output: `report` (dir with `index.html`).
//! Config: `title`; the DAG either from `dag` (a mermaid or `a -> b` text
//! file; path-valued, so its content enters the key) or from `dag_edges`
//! (`["ingest -> split", …]`).
//!
//! The HTML is a pure function of the inputs' content and the config (no
//! times, hosts or paths), so reruns and `verify` agree byte for byte.
//! Key: the whole config, the DAG file's content and the inputs' hashes.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use crate::report::html::{render, Log, ReportInputs};
use crate::report::io::Table;
use crate::report::svg::parse_edges;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub title: String,
    /// Optional DAG file (mermaid `a --> b` or plain `a -> b` lines).
    pub dag: Option<PathBuf>,
    /// DAG edges written inline, `"from -> to"`.
    pub dag_edges: Vec<String>,
    /// Method pairs `[A, B]` (method names as in the tables) whose paired
    /// RMSE difference A − B to report besides every method against the
    /// best baseline; needs `predictions`. Out of the key while empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pairs: Vec<[String; 2]>,
}

/// Resamples of the paired bootstrap (as the eval's default `bootstrap`).
pub const PAIRED_RESAMPLES: u32 = 1000;

impl Default for Config {
    fn default() -> Self {
        Config { title: "recflow report".into(), dag: None, dag_edges: Vec::new(), pairs: Vec::new() }
    }
}

pub struct Report;

impl StageDef for Report {
    type Config = Config;
    const KIND: &'static str = "report";
    // Still 1 after the plot and collapse-line changes of issue 13: the HTML
    // looks different, its content means the same; a bump would make every
    // committed lock stale for the look of its plots.
    const VERSION: u32 = 1;
    const PATH_FIELDS: &'static [&'static str] = &["dag"];
    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::many("metrics"), InputSpec::many("logs"), InputSpec::many("stats"), InputSpec::many("predictions")]
    }
    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::dir("report")]
    }
    fn validate(cfg: &Config) -> Result<(), String> {
        for (i, e) in cfg.dag_edges.iter().enumerate() {
            if parse_edges(e).is_empty() {
                return Err(format!("`dag_edges[{i}]` = {e:?} is not an edge; write \"from -> to\""));
            }
        }
        Ok(())
    }
}

fn read_json(path: &std::path::Path, what: &str) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {what} {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{what} {} is not valid JSON: {e}", path.display()))
}

/// Collects the report's inputs from the stage context (also used by tests).
pub fn gather(cfg: &Config, ctx: &StageCtx) -> anyhow::Result<ReportInputs> {
    let mut inp = ReportInputs { title: cfg.title.clone(), ..ReportInputs::default() };
    for p in ctx.input_list("metrics") {
        inp.metrics.push(read_json(p, "metrics file")?);
    }
    for p in ctx.input_list("logs") {
        inp.logs.push(Log::read(&Table::read(p)?));
    }
    for p in ctx.input_list("stats") {
        inp.stats.push(read_json(p, "teacher stats file")?);
    }
    if let Some(d) = &cfg.dag {
        let text = std::fs::read_to_string(d).map_err(|e| anyhow::anyhow!("`dag`: cannot read {}: {e}", d.display()))?;
        inp.dag = parse_edges(&text);
    }
    for e in &cfg.dag_edges {
        inp.dag.extend(parse_edges(e));
    }
    let preds = ctx.input_list("predictions");
    if !preds.is_empty() && preds.len() != inp.metrics.len() {
        anyhow::bail!(
            "stage `{}`: `predictions` lists {} files and `metrics` {}: give one predictions output per metrics output, in the same order",
            ctx.stage,
            preds.len(),
            inp.metrics.len()
        );
    }
    if preds.is_empty() && !cfg.pairs.is_empty() {
        anyhow::bail!("stage `{}`: `pairs` needs the `predictions` input (one per `metrics` entry, same order)", ctx.stage);
    }
    let mut methods = Vec::new();
    for (p, m) in preds.iter().zip(&inp.metrics) {
        methods.extend(crate::report::paired::read(p, m)?);
    }
    if !methods.is_empty() {
        inp.paired = crate::report::paired::compare(&methods, &cfg.pairs, PAIRED_RESAMPLES, ctx.seed)?;
    }
    Ok(inp)
}

impl Stage for Report {
    fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        let inp = gather(cfg, ctx)?;
        let html = render(&inp);
        let dir = ctx.output("report")?;
        std::fs::create_dir_all(&dir)?;
        crate::util::write_atomic(&dir.join("index.html"), html.as_bytes())?;
        ctx.log("info", format!("report: {}", dir.join("index.html").display()));
        let mut m = Metrics::new();
        m.insert("methods".into(), serde_json::json!(inp.metrics.len()));
        m.insert("logs".into(), serde_json::json!(inp.logs.len()));
        if !inp.paired.is_empty() {
            m.insert("paired".into(), serde_json::to_value(&inp.paired)?);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::io::{eval_writer_properties, write_batch_atomic};
    use crate::report::io::arc;
    use arrow::array::{Float64Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::collections::BTreeMap;

    fn fixture(root: &std::path::Path) -> BTreeMap<String, Vec<PathBuf>> {
        let b = root.join("b.json");
        std::fs::write(&b, r#"{"stage":"baselines","methods":[{"method":"bias","n":3,"rmse":1.0,"mae":0.8,"invalid_rate":0.0,"rmse_ci95":[0.9,1.1]}]}"#).unwrap();
        let e = root.join("e.json");
        std::fs::write(&e, r#"{"stage":"eval","method":"grpo","n":3,"rmse":0.9,"mae":0.7,"invalid_rate":0.1,"confusion":{"labels":[1,2],"counts":[[1,0,0],[0,1,1]]},"by_history":[{"bucket":"0","n":3,"rmse":0.9,"mae":0.7}]}"#).unwrap();
        let s = root.join("s.json");
        std::fs::write(&s, r#"{"n_samples":10,"accepted":8,"rejected":2,"reasons":{"missing_tag":2}}"#).unwrap();
        let log = root.join("grpo.parquet");
        let schema = std::sync::Arc::new(Schema::new(vec![
            Field::new("step", DataType::Int64, false),
            Field::new("reward_mean", DataType::Float64, false),
            Field::new("val_rmse", DataType::Float64, true),
        ]));
        write_batch_atomic(&log, schema, vec![arc(Int64Array::from(vec![0, 1, 2])), arc(Float64Array::from(vec![1.0, 1.2, 1.3])), arc(Float64Array::from(vec![Some(1.1), None, Some(1.0)]))], eval_writer_properties()).unwrap();
        BTreeMap::from([
            ("metrics".to_string(), vec![b, e]),
            ("stats".to_string(), vec![s]),
            ("logs".to_string(), vec![log]),
        ])
    }

    #[test]
    fn report_is_byte_identical_across_runs_and_shows_everything() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = fixture(dir.path());
        let cfg = Config { dag_edges: vec!["split -> eval".into(), "eval -> report".into()], ..Config::default() };
        let mut out = Vec::new();
        for run in 0..2 {
            let root = dir.path().join(format!("run{run}"));
            let mut ctx = StageCtx::for_test("report", &root, inputs.clone(), Report::outputs(&cfg));
            Report::run(&cfg, &mut ctx).unwrap();
            out.push(std::fs::read(ctx.output("report").unwrap().join("index.html")).unwrap());
        }
        assert_eq!(out[0], out[1], "same inputs → byte-identical index.html");
        let html = String::from_utf8(out[0].clone()).unwrap();
        assert!(html.contains("+10.0%"), "GRPO's 0.9 vs the best baseline's 1.0 shows as a 10% improvement");
        assert!(html.contains("acceptance rate</th><td>0.800"), "teacher acceptance = 8/10");
        assert!(html.contains("validation RMSE") && html.contains("<polyline"), "GRPO curves are drawn");
        assert!(html.contains("Confusion matrix: eval / grpo"), "eval confusion matrix shown");
        assert!(html.contains(">report</text>"), "DAG nodes drawn");
        assert!(!html.contains(&dir.path().display().to_string()), "no input paths leak into the report");
        assert!(!html.contains("<script"), "self-contained, no scripts");
    }

    /// Issue 18: with `predictions` parallel to `metrics`, the report pairs
    /// every method with the best baseline and the named pairs, on the same
    /// samples, into its HTML and metrics; a list of another length is an error.
    #[test]
    fn paired_differences_from_predictions() {
        use arrow::array::StringArray;
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = fixture(dir.path());
        let ids = || arc(StringArray::from(vec!["a", "b", "c", "d"]));
        let y = || arc(Float64Array::from(vec![1.0, 2.0, 4.0, 5.0]));
        let long = dir.path().join("bp.parquet");
        let schema = std::sync::Arc::new(Schema::new(vec![
            Field::new("sample_id", DataType::Utf8, false),
            Field::new("target", DataType::Float64, false),
            Field::new("method", DataType::Utf8, false),
            Field::new("prediction", DataType::Float64, false),
        ]));
        let ids8 = arc(StringArray::from(vec!["a", "b", "c", "d", "a", "b", "c", "d"]));
        let y8 = arc(Float64Array::from(vec![1.0, 2.0, 4.0, 5.0, 1.0, 2.0, 4.0, 5.0]));
        let m8 = arc(StringArray::from(vec!["bias", "bias", "bias", "bias", "global_mean", "global_mean", "global_mean", "global_mean"]));
        let p8 = arc(Float64Array::from(vec![1.5, 2.5, 3.5, 4.5, 3.0, 3.0, 3.0, 3.0]));
        write_batch_atomic(&long, schema, vec![ids8, y8, m8, p8], eval_writer_properties()).unwrap();
        let ev = dir.path().join("ep.parquet");
        let schema = std::sync::Arc::new(Schema::new(vec![
            Field::new("sample_id", DataType::Utf8, false),
            Field::new("target", DataType::Float64, false),
            Field::new("prediction", DataType::Float64, false),
        ]));
        write_batch_atomic(&ev, schema, vec![ids(), y(), arc(Float64Array::from(vec![1.0, 2.0, 4.0, 4.0]))], eval_writer_properties()).unwrap();
        inputs.insert("predictions".into(), vec![long, ev]);
        let cfg = Config { pairs: vec![["grpo".into(), "global_mean".into()]], ..Config::default() };
        let mut ctx = StageCtx::for_test("report", &dir.path().join("r"), inputs.clone(), Report::outputs(&cfg));
        let m = Report::run(&cfg, &mut ctx).unwrap();
        let p = m["paired"].as_array().unwrap();
        let pairs: Vec<(&str, &str)> = p.iter().map(|x| (x["method"].as_str().unwrap(), x["against"].as_str().unwrap())).collect();
        assert_eq!(pairs, [("global_mean", "bias"), ("grpo", "bias"), ("grpo", "global_mean")], "best baseline (bias, RMSE 0.5), then the named pair");
        assert!((p[1]["rmse_diff"].as_f64().unwrap() - (0.5 - 0.5)).abs() < 1e-12, "grpo RMSE sqrt(1/4) = 0.5 = bias's");
        let html = std::fs::read_to_string(ctx.output("report").unwrap().join("index.html")).unwrap();
        assert!(html.contains("Paired differences on the same samples"), "the report shows them");
        inputs.get_mut("predictions").unwrap().pop();
        let mut ctx = StageCtx::for_test("report", &dir.path().join("r2"), inputs, Report::outputs(&cfg));
        let err = Report::run(&cfg, &mut ctx).unwrap_err().to_string();
        assert!(err.contains("`predictions` lists 1 files and `metrics` 2"), "{err}");
    }

    #[test]
    fn bad_dag_edge_is_rejected_with_field_name() {
        let cfg = Config { dag_edges: vec!["lonely".into()], ..Config::default() };
        assert!(Report::validate(&cfg).unwrap_err().contains("dag_edges[0]"));
    }
}
