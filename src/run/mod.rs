//! Running pipelines: a pure [`plan`] of what to consider, the tokio
//! scheduler [`exec`], which runs each stage in two halves — [`launch`] (the
//! supervised child process, [`supervise`], and its events and log) and
//! [`commit`] (outputs → store → run record → lock, and reuse of a record) —
//! [`remote`] (read-through, leases and write-through of the remote store),
//! [`sync`] (`recflow push` / `pull`), [`status`] / explain against the lock,
//! [`verify`] into a scratch store, [`gc`]; [`budget`] checks completion
//! budgets against the teacher's traces before SFT starts.
//!
//! Shared here: how a stage's key inputs are computed from the resolved
//! stage, the outputs of its upstream stages and the stat cache.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cache::key::{StageKeyInputs, KEY_SCHEMA};
use crate::cache::{CacheError, StatCache};
use crate::lock::{LockError, LockStage};
use crate::pipeline::resolved::{Action, InputRef, ResolvedStage};
use crate::pipeline::PipelineError;

pub mod budget;
pub mod commit;
pub mod engine;
pub mod exec;
pub mod executor;
pub mod gc;
pub mod launch;
pub mod plan;
pub mod preflight;
pub mod progress;
pub mod remote;
pub mod status;
pub mod step;
pub mod supervise;
pub mod sync;
pub mod verify;

/// Errors of running and checking; [`RunError::exit_code`] is the CLI's code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Bad input found while running (missing file, unknown stage name in a flag).
    #[error("{0}")]
    BadInput(String),
    /// A stage failed, or a check found a difference.
    #[error("{0}")]
    Failed(String),
    /// Stopped by a signal, named (`SIGINT (Ctrl-C)`, `SIGTERM`).
    #[error("cancelled by {0}: nothing was recorded for the interrupted stages; their work dirs are kept for resume")]
    Cancelled(&'static str),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Key(#[from] crate::cache::key::KeyError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RunError {
    /// 2 = bad input, 1 = a stage failed or a check differs, 130 = cancelled.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Pipeline(_) | RunError::BadInput(_) | RunError::Lock(LockError::Parse { .. }) => 2,
            RunError::Remote(e) if e.is_bad_input() => 2,
            RunError::Cancelled(_) => 130,
            _ => 1,
        }
    }
}

/// An available output of an upstream stage: content id and a path to read it at.
#[derive(Debug, Clone, PartialEq)]
pub struct Avail {
    pub id: String,
    pub path: PathBuf,
}

/// Stage → output name → where it is.
pub type Available = BTreeMap<String, BTreeMap<String, Avail>>;

/// The key inputs of a stage, or why they cannot be known yet.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // built once per stage, moved, never stored in bulk
pub enum KeyState {
    Known {
        ki: StageKeyInputs,
        /// Input name → paths handed to the stage.
        paths: BTreeMap<String, Vec<PathBuf>>,
        /// Inputs absent here whose recorded ids (lock) were trusted.
        trusted: Vec<String>,
    },
    /// An upstream output is not available (its stage has not run).
    Unknown(String),
}

/// Computes a stage's key inputs. `trust`: the stage's lock entry, whose
/// recorded input ids stand in for absent files (status without the data).
pub fn key_inputs(
    stage: &ResolvedStage,
    avail: &Available,
    sc: &mut StatCache,
    trust: Option<&LockStage>,
) -> Result<KeyState, RunError> {
    let mut inputs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut paths: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut trusted = Vec::new();
    for (name, refs) in &stage.inputs {
        let mut ids = Vec::new();
        let mut ps = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            match r {
                InputRef::Path { abs, shown } => match sc.content_id(abs) {
                    Ok((id, _)) => {
                        ids.push(id);
                        ps.push(abs.clone());
                    }
                    Err(e) => {
                        let rec = trust.and_then(|t| t.key_inputs.inputs.get(name)).and_then(|v| v.get(i));
                        match rec {
                            Some(id) => {
                                ids.push(id.clone());
                                ps.push(abs.clone());
                                trusted.push(shown.clone());
                            }
                            None => {
                                return Err(RunError::BadInput(format!(
                                    "{}: stage `{}`: input `{shown}` ({}) cannot be read: {e}",
                                    stage.loc,
                                    stage.name,
                                    abs.display()
                                )))
                            }
                        }
                    }
                },
                InputRef::Output { stage: up, output } => match avail.get(up).and_then(|m| m.get(output)) {
                    Some(a) => {
                        ids.push(a.id.clone());
                        ps.push(a.path.clone());
                    }
                    None => return Ok(KeyState::Unknown(format!("upstream `{up}` has no `{output}` yet"))),
                },
            }
        }
        inputs.insert(name.clone(), ids);
        paths.insert(name.clone(), ps);
    }
    let (kind, version, uses_device) = match &stage.action {
        Action::Builtin { kind, version, uses_device, .. } => (kind.clone(), *version, *uses_device),
        Action::Shell { .. } => ("shell".to_string(), 0, false),
    };
    let ki = StageKeyInputs {
        schema: KEY_SCHEMA,
        kind,
        version,
        config: stage.config_key.clone(),
        inputs,
        env: stage.env_hashes.clone(),
        device: if uses_device { stage.device.clone() } else { None },
        seed: stage.seed,
        rank_threads: rank_threads(&stage.config_key),
    };
    Ok(KeyState::Known { ki, paths, trusted })
}

/// The per-rank thread count of a data-parallel stage (`world_size` > 1 in
/// its config), from the numerics profile this runner sets; None otherwise.
fn rank_threads(config: &serde_json::Value) -> Option<u32> {
    let w = config.get("world_size").and_then(serde_json::Value::as_u64).filter(|&w| w > 1)?;
    let threads = crate::numerics::Request::from_env().unwrap_or(crate::numerics::Request::DEFAULT).resolve().threads;
    Some(crate::dist::rank_threads(threads, w as usize))
}

/// Where a stage's input came from, for the lock (`path` or `STAGE.OUTPUT`).
pub fn sources(stage: &ResolvedStage, root: &Path, dir: &Path) -> BTreeMap<String, Vec<String>> {
    stage
        .inputs
        .iter()
        .map(|(k, refs)| {
            let v = refs
                .iter()
                .map(|r| match r {
                    InputRef::Path { shown, .. } => crate::lock::spell_path(shown, root, dir),
                    InputRef::Output { stage, output } => format!("{stage}.{output}"),
                })
                .collect();
            (k.clone(), v)
        })
        .collect()
}

/// Path of the worker binary for built-in kinds: the pipeline's `worker:`,
/// else `RECFLOW_WORKER`, else `recflow-worker` next to this executable.
pub fn worker_path(pipeline_worker: Option<&Path>) -> PathBuf {
    if let Some(w) = pipeline_worker {
        return w.to_path_buf();
    }
    if let Some(w) = std::env::var_os("RECFLOW_WORKER").filter(|w| !w.is_empty()) {
        return PathBuf::from(w);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let here = dir.join("recflow-worker");
    // Test binaries live in target/*/deps: the worker is one level up.
    if !here.exists() && dir.ends_with("deps") {
        if let Some(up) = dir.parent() {
            return up.join("recflow-worker");
        }
    }
    here
}
