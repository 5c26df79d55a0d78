//! Issue 13 part 3, "collapse is loud": a GRPO run that collapses says so at
//! the end of `recflow run` (also when cached), in the lock's metrics, and in
//! `recflow show`; and the lock carries no timings, so re-executing the same
//! keys into a fresh store leaves it byte-identical.
//!
//! Drives the real binaries: the `recflow` runner next to this package's
//! `recflow-worker` (build the workspace first: `cargo build --workspace`).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const WORKER: &str = env!("CARGO_BIN_EXE_recflow-worker");

fn runner() -> PathBuf {
    let r = Path::new(WORKER).with_file_name("recflow");
    assert!(r.is_file(), "{} missing: build the workspace first (cargo build --workspace)", r.display());
    r
}

fn recflow(project: &Path, cache: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(runner())
        .args(args)
        .current_dir(project)
        .env("RECFLOW_CACHE", cache)
        .env_remove("RECFLOW_WORKER")
        .output()
        .expect("start recflow");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn issue13_collapsed_grpo_is_reported_by_run_lock_and_show() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("recflow.toml"), "").unwrap();
    // A random-init toy model never writes a valid answer: every reward is
    // −1, every group has zero variance, the valid fraction is 0 — and a
    // learning rate of 1.0 on top. The watch must trip after the warm-up.
    small_toy_model(p, 11);
    grpo_data(p, 4, 1);
    let yaml = format!(
        "name: collapse\nworker: {WORKER}\nstages:\n  grpo:\n    uses: grpo\n    seed: 7\n    inputs:\n      model: base\n      samples: samples.parquet\n      valid: valid.parquet\n    with:\n      device: cpu\n      learning_rate: 1.0\n      max_steps: 6\n      prompts_per_step: 2\n      num_generations: 2\n      max_completion_length: 6\n      max_prompt_length: 32\n      eval_max_samples: 1\n"
    );
    std::fs::write(p.join("collapse.yaml"), yaml).unwrap();
    let cache = p.join("cache-a");

    let (ok, out, err) = recflow(p, &cache, &["run", "collapse.yaml"]);
    assert!(ok, "run succeeds (a collapse is loud, not a failure): {err}\n{out}");
    let row = out.lines().find(|l| l.starts_with("grpo ")).unwrap_or_else(|| panic!("end-of-run table has a grpo row:\n{out}"));
    assert!(row.contains("ran") && row.contains("COLLAPSED at step"), "the end-of-run row says the stage collapsed: {row}");
    assert!(row.contains("valid fraction below 0.2") && row.contains("zero reward variance"), "and why: {row}");
    assert!(err.contains("grpo collapse:"), "the stage's warning reached the terminal as it happened: {err}");

    let lock_text = std::fs::read_to_string(p.join("collapse.lock")).unwrap();
    let lock: serde_json::Value = serde_json::from_str(&lock_text).unwrap();
    let m = &lock["stages"]["grpo"]["metrics"];
    assert_eq!(m["collapse"], true, "the lock's metrics carry the verdict: {m}");
    assert!(m["collapse_step"].as_u64().is_some() && m["collapse_reason"].is_string(), "step and reason recorded: {m}");
    assert!(m["collapse_low_valid_steps"].as_u64().unwrap() >= 3, "{m}");
    for k in ["wall_s", "generation_s", "training_s", "reference_s", "step_s_median", "step_cpu_s_median", "generated_tokens_per_s", "peak_rss_bytes"] {
        assert!(m.get(k).is_none(), "timing field `{k}` stays out of the lock: {m}");
    }
    assert!(m.as_object().unwrap().keys().all(|k| !recflow::lock::is_timing_key(k)), "no timing-like field at all: {m}");

    let (ok, show, err) = recflow(p, &cache, &["show", "collapse.yaml"]);
    assert!(ok, "{err}");
    assert!(show.contains("!! stage `grpo` COLLAPSED"), "show marks the stage: {show}");
    let (_, md, _) = recflow(p, &cache, &["show", "collapse.yaml", "--format", "markdown"]);
    assert!(md.contains("**Stage `grpo` COLLAPSED"), "the markdown table (README) marks it too: {md}");

    // Cached rerun: the warning was printed by the earlier run; the end-of-run row still says so.
    let (ok, out, err) = recflow(p, &cache, &["run", "collapse.yaml"]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.starts_with("grpo ")).unwrap();
    assert!(row.contains("cached") && row.contains("COLLAPSED"), "a cached collapsed stage is still marked: {row}");

    // Re-executed into a fresh store: same keys, same results, other timings → the lock is unchanged.
    let (ok, _, err) = recflow(p, &p.join("cache-b"), &["run", "collapse.yaml"]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(p.join("collapse.lock")).unwrap(), lock_text, "a re-execution does not dirty the lock");
}
