//! Executors: where a stage that must run actually runs. The scheduler
//! ([`super::exec`]) decides *what* runs *when* and holds the stage key's
//! lock; an [`Executor`] takes one keyed stage and brings it to a committed
//! run record in the engine's store, or says why it could not.
//!
//! * [`Local`] — a supervised child process on this machine
//!   ([`super::launch`] then [`super::commit`]), today's behaviour.
//! * [`slurm::Slurm`] — one `sbatch` job per stage running `recflow step`
//!   on a compute node; completion is the committed run record plus the
//!   job's state from `squeue`/`scontrol`.
//!
//! ## Adding an executor (the Kubernetes Job plan)
//! A Kubernetes executor fits the same trait without touching the scheduler:
//! * `run`: send the job to the remote as Slurm's remote mode does
//!   ([`crate::run::step::push_job`]: inputs and spec by content), then create a
//!   `batch/v1` Job named `recflow-<key[..52]>` (Kubernetes names are ≤ 63
//!   characters; the full key goes in a label `recflow.key` and an
//!   annotation) whose one container runs `recflow step --spec-id ID
//!   --remote URL` in an image holding both binaries and libtorch;
//!   `resources:` map to container requests/limits (`cpus` → `cpu`, `mem` →
//!   `memory`, `gpus` → `nvidia.com/gpu`), `time` to
//!   `activeDeadlineSeconds`, `backoffLimit: 0` (a retry is the next run's
//!   decision, as with Slurm), credentials from a Secret as environment.
//! * status: watch the Job's `status.conditions` (`Complete`, `Failed` with
//!   reason `DeadlineExceeded` / `BackoffLimitExceeded`) through the API
//!   server; completion = the remote run record plus a finished Job, as here.
//! * `cancel`: delete the Jobs it created (propagation `Foreground`).
//! * adoption: list Jobs by the `recflow.key` label instead of `squeue` names.
//! * checkpoints: unchanged (the step pushes the work dir at each save).
//!
//! The trait's methods are all a new executor implements; the table's job
//! column comes from [`super::engine::Engine::note_job`].
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;

use super::commit::{self, Timing};
use super::engine::{Done, Engine};
use super::launch::now_unix;
use super::RunError;
use crate::cache::key::StageKeyInputs;
use crate::cache::locks::FileLock;
use crate::pipeline::{Pipeline, ResolvedStage};

pub mod slurm;


/// A boxed future, so the trait stays object-safe (`Arc<dyn Executor>`).
pub(crate) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One stage handed to an executor: resolved, keyed, with its key lock held
/// by the scheduler (released when the executor is done with it).
pub(crate) struct StageJob {
    pub stage: ResolvedStage,
    pub key: String,
    pub ki: StageKeyInputs,
    /// Input name → the paths its content ids were read from.
    pub paths: BTreeMap<String, Vec<PathBuf>>,
    pub lock: FileLock,
    /// `--force` or `--from` chose it: computed again even where a record
    /// exists (here, in the remote, or in a node's store).
    pub force: bool,
    /// GPUs of this machine given to the stage (local scheduling only).
    pub gpu_ids: Vec<u32>,
}

/// Where stages run (module doc).
pub(crate) trait Executor: Send + Sync {
    /// `local`, `slurm` (messages and the end-of-run table).
    fn name(&self) -> &'static str;
    /// Whether `resources.gpus` is scheduled against this machine's GPUs
    /// (a cluster scheduler does that itself).
    fn local_gpus(&self) -> bool;
    /// Stages in flight at once when `--jobs` is not given.
    fn default_jobs(&self) -> usize;
    /// Whether the executor's job itself takes the key's remote lease and
    /// pushes the result (then the scheduler only reads through the remote).
    fn job_uses_remote(&self) -> bool {
        false
    }
    /// Runs `job` to a committed run record in `eng.store` and returns it
    /// as [`Done`] (`ran`: true), or the line the run reports on failure.
    fn run<'a>(&'a self, eng: &'a Arc<Engine>, job: StageJob) -> BoxFut<'a, Result<Done, String>>;
    /// Ctrl-C / SIGTERM: stop everything this executor started; the running
    /// `run` futures then end with an error.
    fn cancel(&self, eng: &Engine);
}

/// Which executor, as `--executor` or `[executor] kind` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    #[default]
    Local,
    Slurm,
}

impl ExecutorKind {
    pub const NAMES: &'static str = "local, slurm";

    /// Parses a name; the error lists the accepted ones.
    pub fn parse(s: &str) -> Result<ExecutorKind, String> {
        match s.trim() {
            "local" => Ok(ExecutorKind::Local),
            "slurm" => Ok(ExecutorKind::Slurm),
            other => Err(format!("unknown executor `{other}` (known: {}; a Kubernetes executor is planned, see docs/executors.md)", Self::NAMES)),
        }
    }
}

/// `[executor]` in `recflow.toml`, as written.
///
/// ```toml
/// [executor]
/// kind = "slurm"              # or "local" (the default); `--executor` overrides
///
/// [executor.slurm]            # slurm::SlurmConfig (docs/executors.md)
/// partition = "gpu"
/// sbatch = ["--account=lab"]
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    pub kind: Option<String>,
    #[serde(default)]
    pub slurm: slurm::SlurmConfig,
}

/// The executor a project runs with: `--executor` over `[executor] kind`,
/// else local. Reads `recflow.toml` once; errors are bad input naming the
/// flag or the field.
pub fn kind_of(root: &std::path::Path, flag: Option<&str>) -> Result<(ExecutorKind, ExecutorConfig), RunError> {
    let cfg = crate::config::ProjectConfig::load(root).map_err(|e| RunError::BadInput(e.to_string()))?;
    let ecfg = cfg.executor.unwrap_or_default();
    let kind = match (flag, &ecfg.kind) {
        (Some(f), _) => ExecutorKind::parse(f).map_err(|m| RunError::BadInput(format!("--executor: {m}")))?,
        (None, Some(k)) => ExecutorKind::parse(k)
            .map_err(|m| RunError::BadInput(format!("{} [executor] kind: {m}", crate::config::config_path(root).display())))?,
        (None, None) => ExecutorKind::Local,
    };
    Ok((kind, ecfg))
}

/// The executor of a run, checked against the pipeline before anything
/// runs (Slurm: a way to move data, its commands, the partitions named).
pub fn choose(
    p: &Pipeline,
    kind: ExecutorKind,
    cfg: &ExecutorConfig,
    progress_interval: Option<std::time::Duration>,
) -> Result<super::exec::ExecutorChoice, RunError> {
    match kind {
        ExecutorKind::Local => Ok(super::exec::ExecutorChoice::Local),
        ExecutorKind::Slurm => {
            let toml = crate::config::config_path(&p.root);
            let remote = match crate::remote::RemoteSpec::from_project(&p.root)? {
                Some(spec) => Some(crate::remote::Remote::open(&spec)?),
                None => None,
            };
            let s = slurm::Settings::resolve(&cfg.slurm, &toml, remote, progress_interval).map_err(RunError::BadInput)?;
            slurm::preflight(p, &s, &toml)?;
            Ok(super::exec::ExecutorChoice::Slurm(Box::new(s)))
        }
    }
}

/// Child processes on this machine: [`super::launch`] then [`super::commit`].
pub(crate) struct Local;

impl Executor for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn local_gpus(&self) -> bool {
        true
    }

    fn default_jobs(&self) -> usize {
        2
    }

    fn run<'a>(&'a self, eng: &'a Arc<Engine>, job: StageJob) -> BoxFut<'a, Result<Done, String>> {
        Box::pin(async move {
            let _cores = super::exec::hold_cores(eng, &job.stage).await?;
            let started = now_unix();
            let t0 = Instant::now();
            let executed = super::exec::execute(eng, &job.stage, &job.key, &job.paths, &job.lock, &job.gpu_ids).await?;
            commit::record(eng, &job.stage, job.key, job.ki, executed, Timing { started, wall_s: t0.elapsed().as_secs_f64() }, job.lock)
        })
    }

    fn cancel(&self, eng: &Engine) {
        // Stages still waiting for cores give up rather than start.
        eng.cores.close();
        for pid in eng.children.lock().unwrap_or_else(|e| e.into_inner()).values() {
            // SAFETY: signals our own supervisor child; it stops its stage's group.
            unsafe {
                libc::kill(*pid as i32, libc::SIGTERM);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_executor_names_the_known_ones() {
        assert_eq!(ExecutorKind::parse("slurm"), Ok(ExecutorKind::Slurm));
        assert_eq!(ExecutorKind::parse(" local "), Ok(ExecutorKind::Local));
        let e = ExecutorKind::parse("k8s").unwrap_err();
        assert!(e.contains("`k8s`") && e.contains("local, slurm"), "{e}");
    }
}
