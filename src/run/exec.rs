//! The scheduler of `recflow run`: a tokio loop over ready stages
//! (`--jobs`, `resources: {gpus}`) that reuses each stage from the store or
//! runs it, takes the per-key locks shared by concurrent runs, handles
//! Ctrl-C / SIGTERM, and prints the end-of-run table; also `run --dry-run`.
//!
//! What one stage's run does is split in two, so each half can be read (and
//! changed) alone: [`super::launch`] starts the supervised child process and
//! pumps its events (it never writes the store), [`super::commit`] turns
//! what it left into objects, a run record and the lock entry (and reuses a
//! committed record). This file only decides what runs when, and composes
//! the two ([`execute`], [`stage_task`]).
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;


use super::commit::{self, commit_lock, try_reuse, Executed};
use super::engine::{Done, Engine};
use super::executor::{Executor, Local, StageJob};
use super::launch;
use super::plan::{self, Mode, Selection};
use super::remote;
use super::{key_inputs, worker_path, Avail, Available, KeyState, RunError};
use crate::cache::locks::FileLock;
use crate::cache::{StatCache, Store};
use crate::lock::{lock_path, LockFile};
use crate::pipeline::resolved::{Action, ResolvedStage};
use crate::pipeline::Pipeline;

/// Flags of `recflow run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stages in flight at once (None: the executor's default).
    pub jobs: Option<usize>,
    pub sel: Selection,
    pub keep_going: bool,
    /// Total GPUs to schedule (default: `/dev/nvidiaN` count).
    pub gpus: Option<u32>,
    /// No progress bars or table (tests, `--log-format json`).
    pub quiet: bool,
    /// Seconds between plain progress lines ([`super::progress`]); None: none.
    pub progress_interval: Option<std::time::Duration>,
    /// Where stages run (`--executor`, `[executor] kind`).
    pub executor: ExecutorChoice,
}

/// The executor a run uses, with its settings.
#[derive(Debug, Clone, Default)]
pub enum ExecutorChoice {
    #[default]
    Local,
    /// One `sbatch` job per stage ([`super::executor::slurm`]).
    Slurm(Box<super::executor::slurm::Settings>),
}

/// How one stage ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Cached,
    Ran,
    Failed(String),
    Skipped(String),
    /// Outside `--only` / `--from` and not needed by the selection.
    NotSelected,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub stage: String,
    pub outcome: Outcome,
    pub wall_s: f64,
    /// The cluster job that ran (or was running) the stage.
    pub job: Option<String>,
    /// A verdict the stage recorded in its metrics that the end of the run
    /// must repeat (GRPO collapse: [`crate::stages::grpo::collapse_note`]);
    /// also for cached stages, whose warnings were printed by an earlier run.
    pub note: Option<String>,
}

/// The end-of-run table.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub rows: Vec<Row>,
    pub hashed_bytes: u64,
}

impl Summary {
    pub fn table(&self) -> String {
        let w = self.rows.iter().map(|r| r.stage.len()).max().unwrap_or(5).max(5);
        // A job column only when a cluster ran something.
        let jw = self.rows.iter().filter_map(|r| r.job.as_ref().map(|j| j.len())).max().map(|n| n.max(3));
        let job_cell = |j: Option<&str>| jw.map(|jw| format!("  {:<jw$}", j.unwrap_or("-"))).unwrap_or_default();
        let mut s = format!("{:<w$}  {:<7}  {:>8}{}", "stage", "status", "wall", job_cell(Some("job"))).trim_end().to_string() + "\n";
        for r in &self.rows {
            let (st, extra) = match &r.outcome {
                Outcome::Cached => ("cached", String::new()),
                Outcome::Ran => ("ran", String::new()),
                Outcome::Failed(m) => ("FAILED", format!("  {m}")),
                Outcome::Skipped(m) => ("skipped", format!("  {m}")),
                Outcome::NotSelected => ("-", "  not selected".to_string()),
            };
            let note = r.note.as_ref().map(|n| format!("  {n}")).unwrap_or_default();
            let line = format!("{:<w$}  {:<7}  {:>7.2}s{}{extra}{note}", r.stage, st, r.wall_s, job_cell(r.job.as_deref()));
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }

    pub fn failed(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| matches!(r.outcome, Outcome::Failed(_) | Outcome::Skipped(_))).collect()
    }
}

/// Launches a stage's process under the held key lock ([`launch`]) and, on
/// success, ingests its outputs into `eng.store` ([`commit::ingest`]);
/// returns their records, the metrics and the worker's numerics profile.
/// Writes no run record: verify compares this against the lock instead.
pub(crate) async fn execute(
    eng: &Arc<Engine>,
    stage: &ResolvedStage,
    key: &str,
    paths: &BTreeMap<String, Vec<PathBuf>>,
    lock: &FileLock,
    gpu_ids: &[u32],
) -> Result<Executed, String> {
    let launched = launch::launch(eng, stage, key, paths, lock, gpu_ids).await?;
    commit::ingest(eng, stage, key, launched)
}

/// Waits for the cores `stage` holds while it runs ([`cpu_claim`]); they
/// return when the permit drops. Taken before a stage's clock starts, so a
/// run record's wall time is the stage's own, not its wait.
pub(crate) async fn hold_cores<'a>(eng: &'a Engine, stage: &ResolvedStage) -> Result<Option<tokio::sync::SemaphorePermit<'a>>, String> {
    let want = cpu_claim(stage, eng.numerics.threads).min(eng.cores_total);
    if want == 0 {
        return Ok(None);
    }
    eng.cores.acquire_many(want).await.map(Some).map_err(|_| "cancelled while waiting for this machine's cores".to_string())
}

/// The cores of this machine a stage's process holds while it runs:
/// `resources.cpus` when given; else, for a model stage on the CPU, the
/// numerics profile's `threads` (torch runs that many intra-op threads,
/// every core by default); else none (data stages, shell commands and
/// teachers behind an API are light, or say `cpus` themselves). An eval
/// beside GRPO on 2 cores under `--jobs 2` ran 5–10× slower than alone, not
/// 2×: OpenMP threads that spin at barriers lose most of their time slices
/// to each other (issue 18's ML-100K run; the quickstart's `eval_sft`).
pub(crate) fn cpu_claim(stage: &ResolvedStage, threads: u32) -> u32 {
    if let Some(c) = stage.resources.cpus {
        return c;
    }
    match (&stage.action, stage.device.as_deref()) {
        (Action::Builtin { uses_device: true, .. }, Some("cpu")) => threads,
        _ => 0,
    }
}

/// Reuse or run one stage (the body of a scheduler task).
async fn stage_task(
    eng: Arc<Engine>,
    exe: Arc<dyn Executor>,
    idx: usize,
    mode: Mode,
    avail: Available,
    gpu_ids: Vec<u32>,
) -> Result<Done, String> {
    let stage = eng.p.stages[idx].clone();
    let e2 = eng.clone();
    let st2 = stage.clone();
    // Hashing is blocking work.
    let ks = tokio::task::spawn_blocking(move || {
        let mut sc = e2.sc();
        key_inputs(&st2, &avail, &mut sc, None)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let (ki, paths) = match ks {
        KeyState::Known { ki, paths, .. } => (ki, paths),
        KeyState::Unknown(why) => return Err(why),
    };
    let key = ki.key().map_err(|e| e.to_string())?;
    if mode != Mode::Force {
        let (e2, st2, k2) = (eng.clone(), stage.clone(), key.clone());
        if let Some(d) = tokio::task::spawn_blocking(move || try_reuse(&e2, &st2, &k2)).await.map_err(|e| e.to_string())? {
            return Ok(d);
        }
    }
    if mode == Mode::ReuseOnly && eng.remote.is_none() {
        return Err("not built yet and outside the selection (run it, or drop --only/--from)".into());
    }
    // Per-key lock: a concurrent run building the same key makes us wait, then reuse.
    let lp = eng.store.lock_path(&key);
    let (e2, st2, k2) = (eng.clone(), stage.name.clone(), key.clone());
    let lock = tokio::task::spawn_blocking(move || -> std::io::Result<Option<FileLock>> {
        if let Some(mut l) = FileLock::try_exclusive(&lp)? {
            l.note_holder();
            return Ok(Some(l));
        }
        let holder = FileLock::holder_of(&lp).map(|p| format!(" (pid {p})")).unwrap_or_default();
        e2.note(&format!("{st2}: another run{holder} is building key {}; waiting", &k2[..12]));
        let mut l = FileLock::exclusive_unless(&lp, || e2.cancel.load(Ordering::SeqCst))?;
        if let Some(l) = l.as_mut() {
            l.note_holder();
        }
        Ok(l)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot take the key lock: {e}"))?
    .ok_or_else(|| "cancelled while another run held the key".to_string())?;
    if mode != Mode::Force {
        let (e2, st2, k2) = (eng.clone(), stage.clone(), key.clone());
        if let Some(d) = tokio::task::spawn_blocking(move || try_reuse(&e2, &st2, &k2)).await.map_err(|e| e.to_string())? {
            return Ok(d);
        }
    }
    // Missing here: the remote's turn (read-through, then its lease) — unless
    // the executor's job takes the lease and pushes itself (Slurm through the
    // remote), where the runner only reads through.
    let keeper = match &eng.remote {
        None => None,
        Some(link) if exe.job_uses_remote() => match remote::read_through(&eng, link, &stage, &key, mode).await? {
            Some(d) => return Ok(d),
            None => None,
        },
        Some(link) => match remote::before_run(&eng, link, &stage, &key, mode).await? {
            remote::Before::Reused(d) => return Ok(d),
            remote::Before::Run(k) => Some(k),
        },
    };
    let (name, key2) = (stage.name.clone(), key.clone());
    let run = exe.run(&eng, StageJob { stage: stage.clone(), key, ki, paths, lock, force: mode == Mode::Force, gpu_ids });
    let done = match &keeper {
        None => run.await?,
        Some(k) => {
            tokio::pin!(run);
            tokio::select! {
                r = &mut run => r?,
                why = k.lost() => {
                    // A holder that lost its lease stops: another runner may own the key now.
                    remote::stop_stage(&eng, &name);
                    let _ = run.await;
                    return Err(format!("lost the remote lease on key {} ({why}); the stage was stopped, its work dir is kept", &key2[..12]));
                }
            }
        }
    };
    if let (Some(link), Some(k)) = (&eng.remote, keeper) {
        remote::after_commit(&eng, link, &stage, &key2, k).await;
    }
    Ok(done)
}

/// Runs (or reuses) the pipeline's stages as planned.
pub fn run(p: Pipeline, opts: &RunOptions) -> Result<Summary, RunError> {
    let store = Store::open(&crate::cache::store_dir(&p.root));
    // Settings only: no request is made until a key is missing locally.
    let remote = crate::remote::RemoteSpec::from_project(&p.root)?;
    let mut eng = Engine::new(p, store, opts.quiet);
    eng.progress_interval = opts.progress_interval;
    eng.remote = remote.map(remote::RemoteLink::new);
    let exe: Arc<dyn Executor> = match &opts.executor {
        ExecutorChoice::Local => Arc::new(Local),
        ExecutorChoice::Slurm(s) => Arc::new(super::executor::slurm::Slurm::new((**s).clone())),
    };
    run_with(Arc::new(eng), exe, opts)
}

pub(crate) fn run_with(eng: Arc<Engine>, exe: Arc<dyn Executor>, opts: &RunOptions) -> Result<Summary, RunError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start the async runtime: {e}")))?;
    let res = rt.block_on(schedule(eng.clone(), exe, opts));
    eng.sc().save();
    res
}

/// The pipeline's stages as the planner sees them (names and edges).
fn nodes(p: &Pipeline) -> Vec<plan::Node> {
    p.stages.iter().map(|s| plan::Node { name: s.name.clone(), base: s.base.clone(), deps: s.deps.clone() }).collect()
}

async fn schedule(eng: Arc<Engine>, exe: Arc<dyn Executor>, opts: &RunOptions) -> Result<Summary, RunError> {
    let plan = plan::plan(&nodes(&eng.p), &opts.sel).map_err(RunError::BadInput)?;
    let modes: BTreeMap<String, Mode> = plan.stages.into_iter().collect();
    let jobs = opts.jobs.unwrap_or_else(|| exe.default_jobs()).max(1);
    // A cluster scheduler places GPUs itself; locally we count this machine's.
    let local_gpus = exe.local_gpus();
    let total_gpus = if local_gpus { opts.gpus.unwrap_or_else(crate::pipeline::gpu_count) } else { 0 };
    let mut free_gpus: BTreeSet<u32> = (0..total_gpus).collect();
    let mut done: BTreeMap<String, Done> = BTreeMap::new();
    let mut ended: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut walls: BTreeMap<String, f64> = BTreeMap::new();
    let mut notes: BTreeMap<String, String> = BTreeMap::new();
    let mut started: BTreeMap<String, (Instant, Vec<u32>)> = BTreeMap::new();
    let mut set: tokio::task::JoinSet<(usize, Result<Done, String>)> = tokio::task::JoinSet::new();
    let mut stop_launching = false;
    // Completion budgets shorter than the teacher's traces (run::budget):
    // nothing downstream of that teacher starts; the run ends as bad input.
    let mut refused: Vec<String> = Vec::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    // The first signal that stopped the run, named in its error.
    let mut stopped_by: Option<&'static str> = None;
    let n = eng.p.stages.len();
    loop {
        // Launch every ready stage that fits.
        if !stop_launching {
            for i in 0..n {
                let s = &eng.p.stages[i];
                if started.contains_key(&s.name) || ended.contains_key(&s.name) {
                    continue;
                }
                if modes.get(&s.name) == Some(&Mode::Skip) {
                    ended.insert(s.name.clone(), Outcome::NotSelected);
                    continue;
                }
                if let Some(bad) = s.deps.iter().find(|d| matches!(ended.get(*d), Some(Outcome::Failed(_) | Outcome::Skipped(_)))) {
                    ended.insert(s.name.clone(), Outcome::Skipped(format!("upstream `{bad}` did not complete")));
                    continue;
                }
                if !s.deps.iter().all(|d| done.contains_key(d)) {
                    continue;
                }
                if set.len() >= jobs {
                    break;
                }
                let want = if local_gpus { s.resources.gpus.min(total_gpus) } else { 0 };
                if (free_gpus.len() as u32) < want {
                    continue;
                }
                let ids: Vec<u32> = free_gpus.iter().take(want as usize).copied().collect();
                for g in &ids {
                    free_gpus.remove(g);
                }
                let avail: Available =
                    s.deps.iter().filter_map(|d| done.get(d).map(|x| (d.clone(), x.avail.clone()))).collect();
                let mode = modes.get(&s.name).copied().unwrap_or(Mode::Consider);
                started.insert(s.name.clone(), (Instant::now(), ids.clone()));
                let (e2, x2) = (eng.clone(), exe.clone());
                set.spawn(async move { (i, stage_task(e2, x2, i, mode, avail, ids).await) });
            }
        }
        if set.is_empty() {
            break;
        }
        let joined = tokio::select! {
            j = set.join_next() => j,
            _ = tokio::signal::ctrl_c() => { stopped_by.get_or_insert("SIGINT (Ctrl-C)"); cancel(&eng, exe.as_ref()); None }
            _ = async { match sigterm.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending::<()>().await } } => { stopped_by.get_or_insert("SIGTERM"); cancel(&eng, exe.as_ref()); None }
        };
        let Some(joined) = joined else {
            if eng.cancel.load(Ordering::SeqCst) {
                stop_launching = true;
            }
            continue;
        };
        if eng.fatal.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            stop_launching = true;
        }
        let (i, res) = joined.map_err(|e| RunError::Failed(format!("stage task crashed: {e}")))?;
        let s = eng.p.stages[i].clone();
        let (t0, ids) = started.remove(&s.name).unwrap_or((Instant::now(), vec![]));
        free_gpus.extend(ids);
        walls.insert(s.name.clone(), t0.elapsed().as_secs_f64());
        match res {
            Ok(d) => {
                let e2 = eng.clone();
                let (s2, d2) = (s.clone(), d.clone());
                tokio::task::spawn_blocking(move || commit_lock(&e2, &s2, &d2))
                    .await
                    .map_err(|e| RunError::Failed(e.to_string()))??;
                if d.ran {
                    eng.note(&format!("ran {} ({:.2}s)", s.name, walls[&s.name]));
                }
                let n: Vec<String> =
                    [crate::stages::grpo::collapse_note(&d.metrics), crate::stages::grpo::truncation_note(&d.metrics)].into_iter().flatten().collect();
                if !n.is_empty() {
                    notes.insert(s.name.clone(), n.join("; "));
                }
                let budgets = super::budget::check_metrics(&eng.p, &s, &d.metrics);
                for w in &budgets.warnings {
                    eng.note(&format!("warning: {w}"));
                }
                if !budgets.errors.is_empty() {
                    refused.extend(budgets.errors);
                    stop_launching = true;
                }
                ended.insert(s.name.clone(), if d.ran { Outcome::Ran } else { Outcome::Cached });
                done.insert(s.name.clone(), d);
            }
            Err(msg) => {
                let fatal = eng.fatal.lock().unwrap_or_else(|e| e.into_inner()).is_some();
                if !eng.cancel.load(Ordering::SeqCst) && !fatal {
                    eng.note(&format!("stage `{}` failed: {msg}", s.name));
                }
                ended.insert(s.name.clone(), Outcome::Failed(msg));
                if !opts.keep_going {
                    stop_launching = true;
                }
            }
        }
    }
    if eng.cancel.load(Ordering::SeqCst) {
        return Err(RunError::Cancelled(stopped_by.unwrap_or("a signal")));
    }
    if let Some(msg) = eng.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        return Err(RunError::BadInput(msg));
    }
    if !refused.is_empty() {
        return Err(RunError::BadInput(format!(
            "refused before SFT: {}\n(the stages that completed are recorded; a rerun reuses them)",
            refused.join("\n")
        )));
    }
    let summary = finish(&eng, opts, &ended, &walls, &notes)?;
    if let Some(link) = &eng.remote {
        remote::push_lock_root(&eng, link).await;
    }
    Ok(summary)
}

/// The end of a run that was not cancelled: a complete run drops the lock
/// entries of stages that left the pipeline; then the end-of-run table.
fn finish(
    eng: &Engine,
    opts: &RunOptions,
    ended: &BTreeMap<String, Outcome>,
    walls: &BTreeMap<String, f64>,
    notes: &BTreeMap<String, String>,
) -> Result<Summary, RunError> {
    let n = eng.p.stages.len();
    let complete = ended.values().all(|o| matches!(o, Outcome::Cached | Outcome::Ran)) && ended.len() == n;
    if complete && eng.write_lock && opts.sel.only.is_empty() && opts.sel.from.is_empty() {
        let names: BTreeSet<String> = eng.p.stages.iter().map(|s| s.name.clone()).collect();
        LockFile::update(&lock_path(&eng.p.file), &eng.store.dir, |l| l.stages.retain(|k, _| names.contains(k)))?;
    }
    let rows = eng
        .p
        .stages
        .iter()
        .map(|s| Row {
            stage: s.name.clone(),
            outcome: ended.get(&s.name).cloned().unwrap_or(Outcome::Skipped("not started (an earlier stage failed)".into())),
            wall_s: walls.get(&s.name).copied().unwrap_or(0.0),
            job: eng.job_of(&s.name),
            note: notes.get(&s.name).cloned(),
        })
        .collect();
    let hashed_bytes = eng.sc().hashed_bytes;
    Ok(Summary { rows, hashed_bytes })
}

/// Ctrl-C / SIGTERM: stop every running stage (the executor's way: signal
/// the local supervisors, cancel the cluster jobs); nothing of theirs is recorded.
fn cancel(eng: &Engine, exe: &dyn Executor) {
    eng.cancel.store(true, Ordering::SeqCst);
    eng.note(&format!(
        "interrupted: stopping running stages ({} executor; their work dirs are kept; a second Ctrl-C kills them at once)",
        exe.name()
    ));
    exe.cancel(eng);
}

/// `run --dry-run`: what would run and why, touching nothing but the stat
/// cache. Validates what a run would need ([`super::preflight`]): models
/// readable, API keys set, the teacher's cost preview. Every bad input found
/// is reported at once; with `allow_missing` absent external inputs and keys
/// are warnings. Returns the plan text and the bad-input errors (the CLI
/// prints both and exits 2 when there are errors).
pub fn dry_run(p: &Pipeline, sel: &Selection, allow_missing: bool) -> Result<(String, Vec<String>), RunError> {
    let store = Store::open(&crate::cache::store_dir(&p.root));
    let lock = LockFile::read(&lock_path(&p.file))?;
    let plan = plan::plan(&nodes(p), sel).map_err(RunError::BadInput)?;
    let mut sc = StatCache::load(&store.dir);
    let mut avail: Available = BTreeMap::new();
    let mut out = String::new();
    let mut errors: Vec<String> = Vec::new();
    let worker_needed = p.stages.iter().any(|s| matches!(s.action, Action::Builtin { .. }));
    for w in &p.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    if worker_needed {
        let w = worker_path(p.worker.as_deref());
        if !w.is_file() {
            out.push_str(&format!("warning: worker binary {} not found; built-in stages cannot run\n", w.display()));
        }
    }
    for (s, (_, mode)) in p.stages.iter().zip(plan.stages.iter()) {
        let mut will_run = true;
        let mut recorded: Option<serde_json::Value> = None;
        let line = match key_inputs(s, &avail, &mut sc, None) {
            Err(e) => {
                if !allow_missing {
                    errors.push(e.to_string());
                }
                format!("{}: would fail: {e}", s.name)
            }
            Ok(KeyState::Unknown(why)) => format!("{}: will run ({why})", s.name),
            Ok(KeyState::Known { ki, .. }) => {
                let key = ki.key()?;
                let rec = store.read_record(&key);
                match (rec, mode) {
                    (_, Mode::Force) => format!("{}: will run (forced)", s.name),
                    (Some(r), _) => {
                        will_run = false;
                        recorded = Some(r.metrics.clone());
                        let a = r
                            .outputs
                            .iter()
                            .map(|(n, o)| {
                                let path = match &s.action {
                                    Action::Builtin { .. } => store.out_dir(&key).join(&o.path),
                                    Action::Shell { .. } => p.dir.join(&o.path),
                                };
                                (n.clone(), Avail { id: o.id.clone(), path })
                            })
                            .collect();
                        avail.insert(s.name.clone(), a);
                        format!("{}: cached (key {})", s.name, &key[..12])
                    }
                    (None, Mode::ReuseOnly) => format!("{}: NOT BUILT and outside the selection", s.name),
                    (None, Mode::Skip) => {
                        will_run = false;
                        format!("{}: not selected", s.name)
                    }
                    (None, _) => {
                        let why = match lock.stages.get(&s.name) {
                            None => "never run".to_string(),
                            Some(l) => {
                                let d = crate::cache::key::diff(&l.key_inputs, &ki);
                                if d.is_empty() {
                                    "outputs not in this store".to_string()
                                } else {
                                    d.iter().map(|f| crate::cache::key::describe_field(&f.field)).collect::<Vec<_>>().join(", ") + " changed"
                                }
                            }
                        };
                        format!("{}: will run ({why})", s.name)
                    }
                }
            }
        };
        out.push_str(&line);
        out.push('\n');
        let mut f = super::preflight::check_stage(p, s, &avail, will_run, allow_missing);
        super::preflight::budgets(p, s, recorded.as_ref(), &mut f);
        f.notes.extend(super::preflight::plan_lines(p, s, &avail));
        for n in &f.notes {
            out.push_str(n);
            out.push('\n');
        }
        for w in &f.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        errors.extend(f.errors);
    }
    sc.save();
    Ok((out, errors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{load_in_tempdir, Options};

    #[test]
    fn model_stages_on_the_cpu_claim_the_profiles_threads_and_others_what_they_ask() {
        let eval = |dev: &str| format!("{{uses: eval, inputs: {{model: m, samples: test.parquet, train: train.parquet}}, with: {{device: {dev}}}}}");
        let yaml = format!(
            "stages:\n  data: {{uses: ingest, with: {{format: synthetic}}}}\n  on_cpu: {}\n  on_gpu: {}\n  shell: {{cmd: \"true\"}}\n  asks: {{cmd: \"true\", resources: {{cpus: 3}}}}\n",
            eval("cpu"),
            eval("cuda")
        );
        let (_d, p) = load_in_tempdir(&yaml, &[], &Options { allow_missing: true, ..Options::default() });
        let p = p.expect("resolves");
        let claim = |name: &str| cpu_claim(p.stages.iter().find(|s| s.name == name).expect("stage"), 2);
        assert_eq!(claim("on_cpu"), 2, "a model stage on the CPU holds the profile's threads");
        assert_eq!(claim("on_gpu"), 0, "on a GPU it holds no cores");
        assert_eq!((claim("data"), claim("shell")), (0, 0), "data stages and shell commands are light");
        assert_eq!(claim("asks"), 3, "`resources.cpus` is what a stage holds");
    }
}
