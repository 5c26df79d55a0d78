//! The exec-stage protocol (ARCHITECTURE "Interfaces (pinned)") and the
//! worker entry point `recflow::worker::main(registry)`.
//!
//! The runner writes an [`ExecSpec`] as JSON into the stage's work dir and
//! starts `WORKER exec-stage SPEC.json`. The worker streams JSON-lines events
//! on stdout (`{"progress": {...}}`, `{"log": {...}}`), writes every declared
//! output into `out_dir`, its flat scalar metrics into `out_dir/metrics.json`,
//! and exits 0 on success. `WORKER describe --json` prints the metadata of
//! every kind it can run (a custom worker's answer is cached by the runner,
//! keyed by the worker binary's hash).
//!
//! Exit codes: 0 success, 1 the stage failed, 2 bad spec or config, 130 cancelled.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::stages::{Registry, StageCtx, StdoutEvents};

/// The resolved stage the runner hands to a worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Stage kind (`uses:`).
    pub kind: String,
    /// Stage instance name (`grpo_seeds@seed=1`).
    pub stage: String,
    /// Resolved `with:` config: defaults applied, `${...}` interpolated,
    /// path-valued fields absolute, `device` resolved.
    pub config: serde_json::Value,
    /// Input name → absolute paths (one for single inputs).
    pub inputs: BTreeMap<String, Vec<PathBuf>>,
    pub out_dir: PathBuf,
    pub work_dir: PathBuf,
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

/// Name of the file with a stage's flat scalar metrics inside its output dir.
pub const METRICS_FILE: &str = "metrics.json";

/// Runs one stage from a spec with the given registry. Used by `main` and by
/// tests that want to run a stage in-process.
pub fn exec(registry: &Registry, spec: &ExecSpec, cancel: Arc<AtomicBool>) -> anyhow::Result<()> {
    let (meta, run) = registry
        .get(&spec.kind)
        .ok_or_else(|| anyhow::anyhow!("this worker has no stage kind `{}`", spec.kind))?;
    let outputs = (meta.outputs)(&spec.config).map_err(|e| anyhow::anyhow!("stage `{}`: {e}", spec.stage))?;
    std::fs::create_dir_all(&spec.out_dir)?;
    std::fs::create_dir_all(&spec.work_dir)?;
    let mut ctx = StageCtx {
        stage: spec.stage.clone(),
        inputs: spec.inputs.clone(),
        outputs: outputs.clone(),
        out_dir: spec.out_dir.clone(),
        work_dir: spec.work_dir.clone(),
        seed: spec.seed,
        device: spec.device.clone(),
        events: Box::new(StdoutEvents),
        cancel,
    };
    let metrics = run(&spec.config, &mut ctx)?;
    // A data-parallel stage's rank other than 0 computes what rank 0 does
    // and writes nothing (`recflow::dist`).
    if crate::dist::is_secondary_rank(&spec.config) {
        return Ok(());
    }
    for o in &outputs {
        let p = spec.out_dir.join(o.file_name());
        if !p.exists() {
            anyhow::bail!("stage `{}` finished without writing its output `{}` ({})", spec.stage, o.name, p.display());
        }
    }
    let metrics_path = spec.out_dir.join(METRICS_FILE);
    // A stage whose own output is named `metrics` (eval, baselines) has
    // already written metrics.json; otherwise write the flat scalar metrics.
    if !outputs.iter().any(|o| o.file_name() == METRICS_FILE) {
        let text = serde_json::to_string_pretty(&metrics)?;
        crate::util::write_atomic(&metrics_path, text.as_bytes())?;
    }
    Ok(())
}

fn read_spec(path: &Path) -> anyhow::Result<ExecSpec> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read stage spec {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("invalid stage spec {}: {e}", path.display()))
}

/// Installs SIGINT/SIGTERM handlers that set `cancel`, and asks the kernel to
/// kill this process when its parent (the runner) dies.
fn install_signal_handling(cancel: &Arc<AtomicBool>) {
    crate::util::die_with_parent();
    crate::util::set_cancel_on_signals(cancel.clone());
}

/// Entry point of a worker binary: `exec-stage SPEC.json` or `describe --json`.
/// Returns the process exit code.
pub fn main(registry: Registry) -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    run_args(&registry, &args)
}

/// [`main`] over explicit arguments (the ML worker dispatches its own
/// subcommands first and hands the rest here).
pub fn run_args(registry: &Registry, args: &[String]) -> i32 {
    match args.first().map(String::as_str) {
        Some("exec-stage") => {
            let Some(path) = args.get(1) else {
                eprintln!("usage: exec-stage SPEC.json");
                return 2;
            };
            let spec = match read_spec(Path::new(path)) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return 2;
                }
            };
            let cancel = Arc::new(AtomicBool::new(false));
            install_signal_handling(&cancel);
            match exec(registry, &spec, cancel.clone()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: stage `{}` ({}) failed: {e:#}", spec.stage, spec.kind);
                    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                        130
                    } else {
                        1
                    }
                }
            }
        }
        Some("describe") => {
            let all: Vec<_> = registry.metas().map(|m| m.describe()).collect();
            println!("{}", serde_json::json!({ "stages": all }));
            0
        }
        _ => {
            eprintln!("usage: exec-stage SPEC.json | describe --json");
            2
        }
    }
}
