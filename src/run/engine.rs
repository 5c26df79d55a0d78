//! The state one run shares across its stages ([`Engine`]: the pipeline,
//! the store, the stat cache, cancellation, the running children, progress
//! output, the numerics profile) and what a finished stage hands on
//! ([`Done`]). Its own file below the scheduler (`exec`), the launcher
//! (`launch`) and the committer (`commit`), which all read it, so none of
//! them imports another for it.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressDrawTarget};
use serde_json::Value;

use super::Avail;
use crate::cache::key::StageKeyInputs;
use crate::cache::store::OutputRecord;
use crate::cache::{StatCache, Store};
use crate::pipeline::Pipeline;

/// Shared state of one run.
pub(crate) struct Engine {
    pub p: Pipeline,
    pub store: Store,
    pub sc: Mutex<StatCache>,
    pub cancel: AtomicBool,
    /// Stage → supervisor pid of running children.
    pub children: Mutex<BTreeMap<String, u32>>,
    /// Stage → the cluster job that runs (or ran) it, for the end-of-run table.
    pub jobs: Mutex<BTreeMap<String, String>>,
    pub mp: MultiProgress,
    pub quiet: bool,
    /// Verify: outputs go to a scratch store, shell outputs are copied, not moved.
    pub scratch: bool,
    /// Update the lock file after each stage.
    pub write_lock: bool,
    /// The project's store, exported to every stage as `RECFLOW_CACHE` (the
    /// teacher's response cache lives there). Verify's scratch store differs:
    /// re-execution reuses bought answers instead of paying for them again.
    pub home: PathBuf,
    /// The numerics profile set in every stage's environment (checked and
    /// reported back by the worker).
    pub numerics: crate::numerics::Resolved,
    /// How often a running stage's progress becomes a plain line (its log,
    /// and stderr without a terminal); None: never ([`super::progress`]).
    pub progress_interval: Option<std::time::Duration>,
    /// Woken at each `{"checkpoint": …}` event of a stage: the job step on
    /// a compute node pushes the work dir to the remote then (None: nobody
    /// listens, as in a local run).
    pub checkpoints: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The project's remote store, if one is configured (read-through,
    /// leases, write-through: [`super::remote`]). None under verify.
    pub remote: Option<super::remote::RemoteLink>,
    /// A problem that ends the whole run as bad input (exit 2): an unusable
    /// remote found by the first stage that needed it.
    pub fatal: Mutex<Option<String>>,
    /// This machine's cores as permits ([`Engine::cores_total`] of them): a
    /// stage holds [`super::exec::cpu_claim`] of them while its process runs,
    /// so two stages that each use every core never share them (`--jobs`
    /// counts stages, not cores). Closed by Ctrl-C, which ends the waits.
    pub cores: tokio::sync::Semaphore,
    pub cores_total: u32,
}

impl Engine {
    pub fn new(p: Pipeline, store: Store, quiet: bool) -> Self {
        let sc = StatCache::load(&store.dir);
        let mp = MultiProgress::new();
        let home = store.dir.clone();
        if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            mp.set_draw_target(ProgressDrawTarget::hidden());
        }
        let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        Engine {
            p,
            store,
            sc: Mutex::new(sc),
            cancel: AtomicBool::new(false),
            children: Mutex::new(BTreeMap::new()),
            jobs: Mutex::new(BTreeMap::new()),
            mp,
            quiet,
            scratch: false,
            write_lock: true,
            home,
            // main validates RECFLOW_NUMERICS before any engine exists.
            numerics: crate::numerics::Request::from_env().unwrap_or(crate::numerics::Request::DEFAULT).resolve(),
            progress_interval: Some(std::time::Duration::from_secs_f64(super::progress::DEFAULT_INTERVAL_S)),
            checkpoints: None,
            remote: None,
            fatal: Mutex::new(None),
            cores: tokio::sync::Semaphore::new(cores as usize),
            cores_total: cores,
        }
    }

    /// Records the first run-ending problem (see [`Engine::fatal`]).
    pub(super) fn set_fatal(&self, msg: &str) {
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(msg.to_string());
        }
    }

    pub(crate) fn sc(&self) -> std::sync::MutexGuard<'_, StatCache> {
        self.sc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers the cluster job of a stage (shown in the end-of-run table).
    pub(crate) fn note_job(&self, stage: &str, job: &str) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(stage.to_string(), job.to_string());
    }

    pub(crate) fn job_of(&self, stage: &str) -> Option<String> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(stage).cloned()
    }

    pub(crate) fn note(&self, msg: &str) {
        if !self.quiet {
            // Without a terminal the bars are hidden and so is their
            // `println`: warnings must still reach a CI log.
            if self.mp.is_hidden() {
                eprintln!("{msg}");
            } else {
                let _ = self.mp.println(msg);
            }
        }
        tracing::info!("{msg}");
    }
}

/// A stage that is done (ran or reused).
#[derive(Debug, Clone)]
pub(crate) struct Done {
    pub key: String,
    pub ki: StageKeyInputs,
    pub outputs: BTreeMap<String, OutputRecord>,
    pub avail: BTreeMap<String, Avail>,
    pub metrics: Value,
    pub ran: bool,
    /// The profile the worker reported (None for shell stages).
    pub numerics: Option<crate::numerics::Profile>,
}

