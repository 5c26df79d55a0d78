//! `recflow show PIPELINE [--format text|json|markdown] [--diff LOCK_OR_GIT_REV]`:
//! the methods table of a pipeline's last run, read from its lock file and
//! the store.
//!
//! * Rows: one per eval stage and per baseline method, read from each
//!   stage's `metrics` output in the store, or from the lock's summary
//!   (which carries every eval's and every baseline method's metrics and
//!   intervals) when the object is gone; matrix expansions (`eval@seed=1`,
//!   …) are grouped into mean ± 95% t-interval over runs
//!   ([`super::table::group_matrix`]).
//! * `--format markdown` reads the lock alone (never the store), so the
//!   README's tables ([`super::readme`]) are a function of the committed
//!   lock. Locks written before the lock kept per-method metrics lack the
//!   baselines (and intervals): the table shows what is there and says so.
//! * A stage whose metrics record a collapse (GRPO:
//!   [`crate::stages::grpo::collapse_note`]) is marked in every format.
//! * Timings and store state come from the run records (they never enter
//!   outputs): wall time of the run that produced each key, and whether its
//!   outputs are still in the store (a rerun is then a cache hit).
//! * `--json` prints the pinned shape `{"pipeline", "methods": [{method,
//!   stage, n, rmse, mae, invalid_rate, rmse_ci95}]}` (plus `runs`, and
//!   `stages` / `paired` / `diff` objects).
//! * Paired RMSE differences on the same samples (a report stage's
//!   `paired` metrics, [`super::paired`]) follow the methods in every
//!   format; the stages table adds each stage's peak RSS and CPU seconds
//!   from its run record.
//! * `--diff X` compares with another lock: a file path, or a git revision
//!   whose copy of this pipeline's lock is read with `git show REV:PATH`
//!   (like `dvc metrics diff`).
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::table::{fmt, fmt_ci, group_matrix, rows_from_metrics, MethodRow};
use crate::cache::{hash, Store};
use crate::lock::{lock_path, LockFile};
use crate::stages::grpo::collapse_note;

/// What `recflow show` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Terminal tables (methods, stages with timings, teacher cost).
    #[default]
    Text,
    /// The pinned JSON shape.
    Json,
    /// The methods as a Markdown table, from the lock alone (the README's blocks).
    Markdown,
}

/// One stage's run facts.
#[derive(Debug, Clone, PartialEq)]
pub struct StageFacts {
    pub stage: String,
    pub kind: String,
    pub key: String,
    pub wall_s: Option<f64>,
    /// The stage process's peak resident memory and its user + system CPU
    /// seconds (run record; None for records without them).
    pub peak_rss_bytes: Option<u64>,
    pub cpu_s: Option<f64>,
    /// All outputs present in the store (a rerun of this key is a cache hit).
    pub in_store: bool,
    /// Teacher stages: the dataset's cost (every answer used × the
    /// configured prices) and its token counts, from the run record.
    pub teacher: Option<TeacherCost>,
    /// The stage's collapse verdict (lock summary, else run record).
    pub collapse: Option<String>,
}

/// What a teacher stage's answers cost (its `metrics.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherCost {
    pub cost_usd: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub accepted: u64,
    pub n_samples: u64,
}

fn teacher_cost(m: &Value) -> Option<TeacherCost> {
    Some(TeacherCost {
        cost_usd: m.get("cost_usd")?.as_f64()?,
        tokens_in: m.get("tokens_in")?.as_u64()?,
        tokens_out: m.get("tokens_out")?.as_u64()?,
        accepted: m.get("accepted").and_then(Value::as_u64).unwrap_or(0),
        n_samples: m.get("n_samples").and_then(Value::as_u64).unwrap_or(0),
    })
}

/// The paired RMSE differences a report stage of the lock recorded.
pub fn paired_rows(lock: &LockFile) -> Vec<super::paired::Paired> {
    lock.stages
        .values()
        .filter_map(|st| st.metrics.get("paired"))
        .filter_map(|v| serde_json::from_value::<Vec<super::paired::Paired>>(v.clone()).ok())
        .flatten()
        .collect()
}

/// `−0.052 [−0.080, −0.021]`, with the verdict when the interval excludes 0.
fn paired_text(p: &super::paired::Paired) -> String {
    let [lo, hi] = p.rmse_diff_ci95;
    let verdict = if hi < 0.0 {
        " (lower)"
    } else if lo > 0.0 {
        " (higher)"
    } else {
        ""
    };
    format!("{:+.3} [{lo:+.3}, {hi:+.3}]{verdict}", p.rmse_diff)
}

/// Method rows of a lock (metrics outputs read from the store when one is
/// given and holds them; else the lock's summary).
pub fn method_rows(lock: &LockFile, store: Option<&Store>) -> Vec<MethodRow> {
    let mut rows = Vec::new();
    for (name, st) in &lock.stages {
        let from_store = store.and_then(|store| st.outputs.get("metrics").and_then(|o| {
            if hash::is_tree(&o.id) {
                return None;
            }
            let bytes = std::fs::read(store.object_path(hash::hex_of(&o.id))).ok()?;
            serde_json::from_slice::<Value>(&bytes).ok()
        }));
        let v = from_store.unwrap_or_else(|| st.metrics.clone());
        let mut r = rows_from_metrics(name, &v);
        // The lock's stage name is authoritative (a metrics file may predate a rename).
        for row in &mut r {
            row.stage = name.clone();
        }
        rows.extend(r);
    }
    rows
}

pub fn stage_facts(lock: &LockFile, store: &Store) -> Vec<StageFacts> {
    lock.stages
        .iter()
        .map(|(name, st)| {
            let rec = store.read_record(&st.key);
            let in_store = rec.is_some()
                && st.outputs.values().all(|o| {
                    if hash::is_tree(&o.id) {
                        store.manifest(&o.id).is_ok()
                    } else {
                        store.object_path(hash::hex_of(&o.id)).exists()
                    }
                });
            let teacher = (st.key_inputs.kind == "teacher")
                .then(|| rec.as_ref().and_then(|r| teacher_cost(&r.metrics)).or_else(|| teacher_cost(&st.metrics)))
                .flatten();
            let collapse = collapse_note(&st.metrics).or_else(|| rec.as_ref().and_then(|r| collapse_note(&r.metrics)));
            StageFacts {
                stage: name.clone(),
                kind: st.key_inputs.kind.clone(),
                key: st.key.clone(),
                wall_s: rec.as_ref().map(|r| r.wall_s),
                peak_rss_bytes: rec.as_ref().and_then(|r| r.metrics.get("peak_rss_bytes")).and_then(Value::as_u64),
                cpu_s: rec.as_ref().and_then(|r| r.metrics.get("cpu_s")).and_then(Value::as_f64),
                in_store,
                teacher,
                collapse,
            }
        })
        .collect()
}

/// One metric compared between two locks.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffRow {
    pub stage: String,
    pub method: String,
    pub metric: &'static str,
    pub old: Option<f64>,
    pub new: Option<f64>,
}

pub fn diff_rows(old: &[MethodRow], new: &[MethodRow]) -> Vec<DiffRow> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in new.iter().chain(old) {
        let k = (r.stage.clone(), r.method.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut out = Vec::new();
    for (stage, method) in keys {
        let find = |rows: &[MethodRow]| rows.iter().find(|r| r.stage == stage && r.method == method).cloned();
        let (o, n) = (find(old), find(new));
        for (metric, sel) in [("rmse", (|r: &MethodRow| r.rmse) as fn(&MethodRow) -> Option<f64>), ("mae", |r| r.mae), ("invalid_rate", |r| r.invalid_rate)] {
            let (ov, nv) = (o.as_ref().and_then(sel), n.as_ref().and_then(sel));
            if ov != nv {
                out.push(DiffRow { stage: stage.clone(), method: method.clone(), metric, old: ov, new: nv });
            }
        }
    }
    out
}

/// The pinned `--json` object.
pub fn to_json(pipeline: &str, rows: &[MethodRow], facts: &[StageFacts], paired: &[super::paired::Paired], diff: Option<&[DiffRow]>) -> Value {
    let methods: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "method": r.method, "stage": r.stage, "n": r.n, "rmse": r.rmse, "mae": r.mae,
                "invalid_rate": r.invalid_rate, "rmse_ci95": r.rmse_ci95, "runs": r.runs,
            })
        })
        .collect();
    let stages: Vec<Value> = facts
        .iter()
        .map(|f| {
            let mut v = json!({"stage": f.stage, "kind": f.kind, "key": f.key, "wall_s": f.wall_s, "cpu_s": f.cpu_s,
                "peak_rss_bytes": f.peak_rss_bytes, "in_store": f.in_store, "collapse": f.collapse});
            if let Some(t) = &f.teacher {
                v["cost_usd"] = json!(t.cost_usd);
                v["tokens_in"] = json!(t.tokens_in);
                v["tokens_out"] = json!(t.tokens_out);
            }
            v
        })
        .collect();
    let mut v = json!({"pipeline": pipeline, "methods": methods, "stages": stages});
    if !paired.is_empty() {
        v["paired"] = serde_json::to_value(paired).unwrap_or_default();
    }
    if let Some(d) = diff {
        v["diff"] = Value::Array(
            d.iter()
                .map(|x| json!({"stage": x.stage, "method": x.method, "metric": x.metric, "old": x.old, "new": x.new,
                    "change": match (x.old, x.new) { (Some(a), Some(b)) => json!(b - a), _ => Value::Null }}))
                .collect(),
        );
    }
    v
}

/// The terminal table.
pub fn to_text(pipeline: &str, rows: &[MethodRow], facts: &[StageFacts], paired: &[super::paired::Paired], diff: Option<&[DiffRow]>) -> String {
    let mut s = format!("pipeline {pipeline}\n\n");
    for f in facts {
        if let Some(c) = &f.collapse {
            s.push_str(&format!("!! stage `{}` {c}\n\n", f.stage));
        }
    }
    let header = ["stage", "method", "n", "runs", "RMSE", "RMSE 95% CI", "MAE", "invalid"];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        table.push(vec![
            r.stage.clone(),
            r.method.clone(),
            r.n.to_string(),
            r.runs.to_string(),
            fmt(r.rmse, 4),
            fmt_ci(r.rmse_ci95),
            fmt(r.mae, 4),
            fmt(r.invalid_rate, 3),
        ]);
    }
    if rows.is_empty() {
        s.push_str("no eval or baselines metrics in the lock yet\n");
    } else {
        s.push_str(&columns(&table));
    }
    if !paired.is_empty() {
        s.push_str("\npaired RMSE differences on the same samples (method − against, bootstrap 95% CI):\n");
        let mut t: Vec<Vec<String>> = vec![vec!["method".into(), "against".into(), "n".into(), "RMSE difference [95% CI]".into()]];
        for p in paired {
            t.push(vec![p.method.clone(), p.against.clone(), p.n.to_string(), paired_text(p)]);
        }
        s.push_str(&columns(&t));
    }
    s.push_str("\nstages (timings and memory from run records):\n");
    let mut t2: Vec<Vec<String>> = vec![vec!["stage".into(), "kind".into(), "wall".into(), "cpu".into(), "peak RSS".into(), "cache".into(), "note".into()]];
    for f in facts {
        t2.push(vec![
            f.stage.clone(),
            f.kind.clone(),
            f.wall_s.map_or("–".into(), |w| format!("{w:.1}s")),
            f.cpu_s.map_or("–".into(), |w| format!("{w:.1}s")),
            f.peak_rss_bytes.map_or("–".into(), |b| format!("{:.2} GB", b as f64 / 1e9)),
            if f.in_store { "hit on rerun".into() } else { "missing (reruns)".into() },
            if f.collapse.is_some() { "COLLAPSED".into() } else { String::new() },
        ]);
    }
    s.push_str(&columns(&t2));
    let teachers: Vec<&StageFacts> = facts.iter().filter(|f| f.teacher.is_some()).collect();
    if !teachers.is_empty() {
        s.push_str("\nteacher cost (every answer used, from the response cache or bought, × the configured prices):\n");
        let mut t = vec![vec!["stage".into(), "samples".into(), "accepted".into(), "tokens in".into(), "tokens out".into(), "cost".into()]];
        for f in teachers {
            if let Some(c) = &f.teacher {
                t.push(vec![
                    f.stage.clone(),
                    c.n_samples.to_string(),
                    c.accepted.to_string(),
                    c.tokens_in.to_string(),
                    c.tokens_out.to_string(),
                    format!("${:.4}", c.cost_usd),
                ]);
            }
        }
        s.push_str(&columns(&t));
    }
    if let Some(d) = diff {
        s.push_str("\ndiff (old → new):\n");
        if d.is_empty() {
            s.push_str("no metric changed\n");
        }
        let mut t3: Vec<Vec<String>> = vec![vec!["stage".into(), "method".into(), "metric".into(), "old".into(), "new".into(), "change".into()]];
        for x in d {
            let change = match (x.old, x.new) {
                (Some(a), Some(b)) => format!("{:+.4}", b - a),
                _ => "–".into(),
            };
            t3.push(vec![x.stage.clone(), x.method.clone(), x.metric.into(), fmt(x.old, 4), fmt(x.new, 4), change]);
        }
        if !d.is_empty() {
            s.push_str(&columns(&t3));
        }
    }
    s
}

fn columns(t: &[Vec<String>]) -> String {
    let k = t.iter().map(|r| r.len()).max().unwrap_or(0);
    let w: Vec<usize> = (0..k).map(|c| t.iter().filter_map(|r| r.get(c)).map(|x| x.chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for r in t {
        let line: Vec<String> = r.iter().enumerate().map(|(c, x)| format!("{x:<width$}", width = w[c])).collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

/// Reads the lock to compare with: an existing file, else `git show REV:PATH`
/// of this pipeline's lock.
fn other_lock(spec: &str, lock_file: &Path) -> anyhow::Result<LockFile> {
    let p = PathBuf::from(spec);
    if p.is_file() {
        return Ok(LockFile::read(&p)?);
    }
    let dir = lock_file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = lock_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // `REV:./NAME` is resolved relative to the current directory by git.
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .arg("show")
        .arg(format!("{spec}:./{name}"))
        .output()
        .map_err(|e| anyhow::anyhow!("--diff {spec}: not a file, and git could not run: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "--diff {spec}: not a lock file, and not a git revision holding {}: {}",
            lock_file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).map_err(|e| anyhow::anyhow!("--diff {spec}: {} at that revision is not a lock file: {e}", name))
}

/// A method's name for people: the baselines' method ids spelled out; eval
/// methods are named by their pipeline (`method:`), shown as they are.
pub fn method_label(r: &MethodRow) -> String {
    let base = match (r.baseline, r.method.as_str()) {
        (true, "global_mean") => "global mean".to_string(),
        (true, "bias") => "user/item bias".to_string(),
        (true, "mf") => "matrix factorisation".to_string(),
        (true, "item_mean") => "item mean".to_string(),
        (true, "user_mean") => "user mean".to_string(),
        _ => r.method.clone(),
    };
    if r.runs > 1 {
        format!("{base} (mean of {} runs)", r.runs)
    } else {
        base
    }
}

/// The methods of a lock as a Markdown table, from the lock alone: one row
/// per eval stage and baseline method, the synthetic data's best
/// achievable RMSE when the ingest recorded it, and a line per collapsed
/// stage or missing piece. A pure function of the lock (the README's
/// generated blocks).
pub fn to_markdown(lock: &LockFile) -> String {
    let rows = group_matrix(&method_rows(lock, None));
    let f3 = |v: Option<f64>| match v {
        Some(x) if x.is_finite() => format!("{x:.3}"),
        _ => String::new(),
    };
    let mut s = String::from("| method | n | RMSE [95% CI] | MAE | invalid | exact |\n|---|---|---|---|---|---|\n");
    for r in &rows {
        let ci = r.rmse_ci95.map(|[a, b]| format!(" [{a:.3}, {b:.3}]")).unwrap_or_default();
        s.push_str(&format!(
            "| {} | {} | {}{ci} | {} | {} | {} |\n",
            method_label(r).replace('|', "\\|"),
            r.n,
            f3(r.rmse),
            f3(r.mae),
            f3(r.invalid_rate),
            f3(r.exact)
        ));
    }
    let best = lock.stages.values().find_map(|st| st.metrics.get("synthetic_best_rmse").and_then(Value::as_f64));
    if let Some(b) = best {
        s.push_str(&format!("| best achievable (Bayes predictor of the synthetic model) | all | {b:.3} | | | |\n"));
    }
    let paired = paired_rows(lock);
    if !paired.is_empty() {
        let label = |m: &str| {
            let r = rows.iter().find(|r| r.method == m);
            r.map(method_label).unwrap_or_else(|| m.to_string()).replace('|', "\\|")
        };
        s.push_str("\n| paired on the same samples | n | RMSE difference [95% CI] |\n|---|---|---|\n");
        for p in &paired {
            s.push_str(&format!("| {} − {} | {} | {} |\n", label(&p.method), label(&p.against), p.n, paired_text(p)));
        }
    }
    let mut notes = Vec::new();
    for (name, st) in &lock.stages {
        if st.key_inputs.kind == "baselines" && rows_from_metrics(name, &st.metrics).is_empty() {
            notes.push(format!(
                "Stage `{name}` (baselines): this lock predates per-method metrics in locks; rerun the pipeline to list them here."
            ));
        }
        if let Some(c) = collapse_note(&st.metrics) {
            notes.push(format!("**Stage `{name}` {c}**"));
        }
    }
    if rows.iter().any(|r| r.rmse_ci95.is_none() && r.runs == 1) {
        notes.push("Rows without an interval come from a lock written before locks kept intervals.".into());
    }
    if rows.iter().any(|r| r.runs > 1) {
        notes.push("Rows over several runs: mean, with the t-interval over runs.".into());
    }
    if !notes.is_empty() {
        s.push('\n');
        s.push_str(&notes.join("\n"));
        s.push('\n');
    }
    s
}

/// The `recflow show` entry point; returns the exit code (0; errors are
/// bad input → the caller maps them to 2).
pub fn show(pipeline_path: &Path, format: Format, diff: Option<&str>) -> anyhow::Result<i32> {
    let text = render(pipeline_path, format, diff)?;
    print!("{text}");
    Ok(0)
}

/// A pipeline file or its lock file → the lock's path.
fn lock_of(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "lock") {
        path.to_path_buf()
    } else {
        lock_path(path)
    }
}

/// What [`show`] prints.
pub fn render(pipeline_path: &Path, format: Format, diff: Option<&str>) -> anyhow::Result<String> {
    render_in(pipeline_path, format, diff, None)
}

/// [`render`] reading metrics from `store` (None: the pipeline project's
/// store, which `RECFLOW_CACHE` overrides; tests name theirs, so a
/// developer's `RECFLOW_CACHE` does not send them to another store).
fn render_in(pipeline_path: &Path, format: Format, diff: Option<&str>, store: Option<&Path>) -> anyhow::Result<String> {
    let lp = lock_of(pipeline_path);
    if !lp.is_file() {
        anyhow::bail!("{} has no lock file ({}): run the pipeline first (`recflow run {}`)", pipeline_path.display(), lp.display(), pipeline_path.display());
    }
    let lock = LockFile::read(&lp)?;
    if format == Format::Markdown {
        return Ok(to_markdown(&lock));
    }
    let dir = pipeline_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let store = Store::open(&store.map(Path::to_path_buf).unwrap_or_else(|| crate::cache::store_dir(&crate::pipeline::project_root(&dir))));
    let name = if lock.pipeline.is_empty() {
        pipeline_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    } else {
        lock.pipeline.clone()
    };
    let rows = group_matrix(&method_rows(&lock, Some(&store)));
    let facts = stage_facts(&lock, &store);
    let d = match diff {
        Some(spec) => {
            let old = other_lock(spec, &lp)?;
            Some(diff_rows(&group_matrix(&method_rows(&old, Some(&store))), &rows))
        }
        None => None,
    };
    Ok(if format == Format::Json {
        let mut s = serde_json::to_string_pretty(&to_json(&name, &rows, &facts, &paired_rows(&lock), d.as_deref()))?;
        s.push('\n');
        s
    } else {
        to_text(&name, &rows, &facts, &paired_rows(&lock), d.as_deref())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::OutputRecord;
    use crate::lock::LockStage;

    fn put_object(store: &Store, bytes: &[u8]) -> String {
        let hex = hash::sha256_hex(bytes);
        let p = store.object_path(&hex);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        format!("sha256:{hex}")
    }

    fn stage(store: &Store, kind: &str, metrics: &str) -> LockStage {
        let id = put_object(store, metrics.as_bytes());
        let mut key_inputs: crate::cache::StageKeyInputs = serde_json::from_value(json!({
            "schema": 1, "kind": kind, "version": 1, "config": {}, "inputs": {}, "env": {}, "device": null, "seed": 0
        }))
        .unwrap();
        key_inputs.kind = kind.into();
        LockStage {
            key: format!("k-{kind}-{}", &id[7..15]),
            key_inputs,
            sources: Default::default(),
            outputs: [("metrics".to_string(), OutputRecord { id, path: "metrics.json".into() })].into(),
            metrics: json!({}),
            numerics: None,
        }
    }

    #[test]
    fn json_has_pinned_shape_and_groups_seeds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        let store = Store::open(&dir.path().join("cache"));
        let mut lock = LockFile { schema: 1, pipeline: "quick".into(), ..Default::default() };
        lock.stages.insert(
            "baselines".into(),
            stage(&store, "baselines", r#"{"stage":"baselines","methods":[{"method":"bias","n":5,"rmse":1.0,"mae":0.8,"invalid_rate":0.0,"rmse_ci95":[0.9,1.1]}]}"#),
        );
        for (s, r) in [("eval@seed=1", 0.9), ("eval@seed=2", 1.1)] {
            lock.stages.insert(s.into(), stage(&store, "eval", &format!(r#"{{"stage":"{s}","method":"grpo","n":5,"rmse":{r},"mae":0.7,"invalid_rate":0.0}}"#)));
        }
        let pipe = dir.path().join("quick.yaml");
        std::fs::write(&pipe, "name: quick\n").unwrap();
        lock.write(&lock_path(&pipe)).unwrap();
        let v: Value = serde_json::from_str(&render_in(&pipe, Format::Json, None, Some(&store.dir)).unwrap()).unwrap();
        assert_eq!(v["pipeline"], "quick", "pinned: pipeline name");
        let m = v["methods"].as_array().expect("pinned: methods array");
        assert_eq!(m.len(), 2, "one baseline row + one grouped eval row");
        for f in ["method", "stage", "n", "rmse", "mae", "invalid_rate", "rmse_ci95"] {
            assert!(m[0].get(f).is_some() && m[1].get(f).is_some(), "pinned field `{f}` in every row");
        }
        assert_eq!(m[0]["rmse_ci95"], json!([0.9, 1.1]), "baseline interval read from the store object");
        assert_eq!(m[1]["stage"], "eval@*", "matrix expansions summarised");
        assert_eq!(m[1]["runs"], 2);
        assert!((m[1]["rmse"].as_f64().unwrap() - 1.0).abs() < 1e-12, "mean over seeds");

        // --diff against a lock file where the baseline was worse.
        let mut old = lock.clone();
        old.stages.insert(
            "baselines".into(),
            stage(&store, "baselines", r#"{"stage":"baselines","methods":[{"method":"bias","n":5,"rmse":1.2,"mae":0.8,"invalid_rate":0.0}]}"#),
        );
        let old_path = dir.path().join("old.lock");
        old.write(&old_path).unwrap();
        let v: Value = serde_json::from_str(&render_in(&pipe, Format::Json, Some(old_path.to_str().unwrap()), Some(&store.dir)).unwrap()).unwrap();
        let d = v["diff"].as_array().unwrap();
        assert_eq!(d.len(), 1, "only the changed metric is listed: {d:?}");
        assert!((d[0]["change"].as_f64().unwrap() + 0.2).abs() < 1e-12, "1.2 → 1.0 is −0.2");
        let text = render_in(&pipe, Format::Text, None, Some(&store.dir)).unwrap();
        assert!(text.contains("eval@*") && text.contains("bias"), "terminal table lists the methods");
        assert!(render(&dir.path().join("nope.yaml"), Format::Text, None).unwrap_err().to_string().contains("run the pipeline first"));
    }

    /// Issue 18: a report's paired differences travel in the lock, and
    /// every format prints them (the markdown table from the lock alone).
    #[test]
    fn paired_differences_are_shown_from_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        let store = Store::open(&dir.path().join("cache"));
        let mut lock = LockFile { schema: 1, pipeline: "ml".into(), ..Default::default() };
        let base = r#"{"stage":"baselines","methods":[{"method":"global_mean","n":4,"rmse":1.2,"mae":1.0,"invalid_rate":0.0}]}"#;
        let mut b = stage(&store, "baselines", base);
        b.metrics = crate::lock::metrics_summary(&serde_json::from_str(base).unwrap());
        lock.stages.insert("baselines".into(), b);
        let mut rep = stage(&store, "report", "{}");
        rep.metrics = crate::lock::metrics_summary(&json!({"methods": 2, "paired": [
            {"method": "grpo", "against": "global_mean", "n": 4, "rmse_diff": -0.1, "rmse_diff_ci95": [-0.2, -0.05]},
            {"method": "grpo", "against": "sft", "n": 4, "rmse_diff": -0.01, "rmse_diff_ci95": [-0.03, 0.02]}]}));
        lock.stages.insert("report".into(), rep);
        let pipe = dir.path().join("ml.yaml");
        std::fs::write(&pipe, "name: ml\n").unwrap();
        lock.write(&lock_path(&pipe)).unwrap();
        let md = render_in(&pipe, Format::Markdown, None, Some(&store.dir)).unwrap();
        assert!(md.contains("| paired on the same samples | n | RMSE difference [95% CI] |"), "{md}");
        assert!(md.contains("| grpo − global mean | 4 | -0.100 [-0.200, -0.050] (lower) |"), "baseline ids spelled out, verdict when 0 is excluded: {md}");
        assert!(md.contains("| grpo − sft | 4 | -0.010 [-0.030, +0.020] |"), "no verdict when the interval holds 0: {md}");
        let v: Value = serde_json::from_str(&render_in(&pipe, Format::Json, None, Some(&store.dir)).unwrap()).unwrap();
        assert_eq!(v["paired"][0]["rmse_diff_ci95"], json!([-0.2, -0.05]), "--json carries them");
        assert!(render_in(&pipe, Format::Text, None, Some(&store.dir)).unwrap().contains("paired RMSE differences"), "and the terminal table");
    }
}
