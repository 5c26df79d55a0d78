//! The Slurm executor: each stage that must run becomes one `sbatch` job
//! running `recflow step` on a compute node ([`crate::run::step`]).
//!
//! * **Submission.** `resources:` become sbatch options ([`resource_args`],
//!   one option per field, documented in docs/executors.md); the job name is
//!   `recflow.<KEY>.<stage>` ([`job_name`]), so the queue itself says which
//!   key a job builds; the job script (given on stdin) only exports the
//!   node's settings and execs the step.
//! * **Moving data.** With a remote store (the default), the runner sends
//!   the job spec and every input to it by content and the job fetches
//!   them: compute nodes need no access to this machine's disk.
//!   With `shared_fs = true` the nodes see the project and its store at the
//!   same paths and the job uses them directly.
//! * **Status** comes from `squeue` (one call per poll for every job in
//!   flight) and `scontrol show job` for the end state; never from
//!   accounting (`sacct`), which many clusters do not run. **Completion** is
//!   the committed run record (pulled from the remote, or read from the
//!   shared store) together with a finished job — never a file appearing on
//!   a shared file system: a job that ended without a record failed, a
//!   record found while the job is still running waits for the job's end.
//! * **Ctrl-C** cancels every job of this run (`scancel`). A runner that
//!   died leaves its jobs queued; the next run finds them by the key in
//!   their names and adopts them instead of submitting again.
//! * A job the scheduler killed (time limit, preemption, node failure) is
//!   a failed attempt; its checkpoints reached the remote at each save, so
//!   the next run resumes from them.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{BoxFut, Executor, StageJob};
use crate::pipeline::resources::{check_partition, check_sbatch_flag, check_time, Resources};
use crate::pipeline::{Pipeline, ResolvedStage};
use crate::remote::Remote;
use crate::run::commit::try_reuse;
use crate::run::engine::{Done, Engine};
use crate::run::launch::shell_quote;
use crate::run::progress::fmt_duration;
use crate::run::step::JobSpec;
use crate::run::RunError;

/// `[executor.slurm]` in `recflow.toml`, as written (docs/executors.md).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// Partition for stages whose `resources:` name none.
    pub partition: Option<String>,
    /// Time limit for stages whose `resources:` give none.
    pub time: Option<String>,
    /// sbatch flags for every job (a stage's `resources.sbatch` follow them).
    #[serde(default)]
    pub sbatch: Vec<String>,
    /// The nodes see this project and its store at the same paths.
    #[serde(default)]
    pub shared_fs: bool,
    /// `recflow` on the compute nodes (default: this binary's path).
    pub recflow: Option<String>,
    /// `recflow-worker` on the compute nodes (default: the runner's worker path).
    pub worker: Option<String>,
    /// The store a job uses on its node (remote mode); expanded by `sh` on the node.
    pub node_store: Option<String>,
    /// sbatch `--output` (Slurm's `%j` patterns).
    pub output: Option<String>,
    /// Seconds between two `squeue` polls.
    pub poll_s: Option<f64>,
}

/// Default node store: private to the user, on the node's local disk.
pub const DEFAULT_NODE_STORE: &str = "${TMPDIR:-/tmp}/recflow-$(id -u)/store";
/// Default sbatch `--output` in remote mode (a node-local path).
pub const DEFAULT_OUTPUT: &str = "/tmp/recflow-slurm-%j.out";
pub const DEFAULT_POLL_S: f64 = 5.0;

/// How a job reaches its inputs and commits its outputs.
#[derive(Clone, Debug)]
pub enum Transfer {
    /// Job specs, inputs, checkpoints and records through the remote store.
    Remote(Remote),
    /// The project and store at the same paths on every node.
    SharedFs,
}

/// Checked settings of the Slurm executor.
#[derive(Clone, Debug)]
pub struct Settings {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub sbatch: Vec<String>,
    pub transfer: Transfer,
    pub recflow: String,
    pub worker: String,
    pub node_store: String,
    pub output: Option<String>,
    pub poll: Duration,
    /// `--progress-interval` of the runner, handed to the step.
    pub progress_interval: Option<Duration>,
}

impl Settings {
    /// Checks `[executor.slurm]` (at `file`) against the project; every
    /// error names the field and what to write instead. `remote`: the
    /// project's remote store, if one is configured.
    pub fn resolve(cfg: &SlurmConfig, file: &Path, remote: Option<Remote>, progress_interval: Option<Duration>) -> Result<Settings, String> {
        let field = |k: &str| format!("{} [executor.slurm] {k}", file.display());
        if let Some(p) = &cfg.partition {
            check_partition(p).map_err(|m| format!("{}: {m}", field("partition")))?;
        }
        let time = match &cfg.time {
            Some(t) => Some(check_time(t).map_err(|m| format!("{}: {m}", field("time")))?),
            None => None,
        };
        for f in &cfg.sbatch {
            check_sbatch_flag(f).map_err(|m| format!("{}: {m}", field("sbatch")))?;
        }
        let poll_s = cfg.poll_s.unwrap_or(DEFAULT_POLL_S);
        if !(poll_s.is_finite() && (0.1..=600.0).contains(&poll_s)) {
            return Err(format!("{} = {poll_s}: poll between 0.1 and 600 seconds (default {DEFAULT_POLL_S})", field("poll_s")));
        }
        let transfer = match (cfg.shared_fs, remote) {
            (true, _) => Transfer::SharedFs,
            (false, Some(r)) => Transfer::Remote(r),
            (false, None) => {
                return Err(format!(
                    "the Slurm executor needs a way to move data to the compute nodes: configure a remote store (`[remote] url` in {}, or RECFLOW_REMOTE), or set `shared_fs = true` under [executor.slurm] when every node sees this project and its store at the same paths",
                    file.display()
                ))
            }
        };
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let recflow = cfg.recflow.clone().unwrap_or_else(|| exe.to_string_lossy().into_owned());
        let worker = cfg.worker.clone().unwrap_or_else(|| crate::run::worker_path(None).to_string_lossy().into_owned());
        for (k, v) in [("recflow", &recflow), ("worker", &worker)] {
            if !v.starts_with('/') {
                return Err(format!("{} = \"{v}\": give the absolute path the compute nodes see", field(k)));
            }
        }
        Ok(Settings {
            partition: cfg.partition.clone(),
            time,
            sbatch: cfg.sbatch.clone(),
            transfer,
            recflow,
            worker,
            node_store: cfg.node_store.clone().unwrap_or_else(|| DEFAULT_NODE_STORE.to_string()),
            output: cfg.output.clone(),
            poll: Duration::from_secs_f64(poll_s),
            progress_interval,
        })
    }
}

/// sbatch options for a stage's `resources:`, one per field (docs/executors.md):
/// `partition` → `--partition`, `gpus: N` → `--gres=gpu:N`, `cpus` →
/// `--cpus-per-task`, `mem` → `--mem`, `time` → `--time`, then the
/// project's `sbatch` flags and the stage's own (later ones win in sbatch).
/// The project's `partition` and `time` apply where the stage names none.
pub fn resource_args(r: &Resources, s: &Settings) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(p) = r.partition.as_ref().or(s.partition.as_ref()) {
        a.push(format!("--partition={p}"));
    }
    if r.gpus > 0 {
        // GRES is what every Slurm with GPUs configures; `--gpus` needs
        // cons_tres and counts per job, `--gres` per node (one node here).
        a.push(format!("--gres=gpu:{}", r.gpus));
    }
    if let Some(c) = r.cpus {
        a.push(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &r.mem {
        a.push(format!("--mem={m}"));
    }
    if let Some(t) = r.time.as_ref().or(s.time.as_ref()) {
        a.push(format!("--time={t}"));
    }
    a.extend(s.sbatch.iter().cloned());
    a.extend(r.sbatch.iter().cloned());
    a
}

/// `recflow.<KEY>.<stage>`: the key finds the job again (adoption), the
/// stage name is for people reading `squeue`.
pub fn job_name(key: &str, stage: &str) -> String {
    let safe: String = stage.chars().take(40).map(|c| if c.is_ascii_alphanumeric() || "_-@=.,".contains(c) { c } else { '_' }).collect();
    format!("recflow.{key}.{safe}")
}

/// The stage key a job name carries, if it is one of ours.
pub fn key_of_job(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("recflow.")?;
    let key = rest.get(..64)?;
    (key.chars().all(|c| c.is_ascii_hexdigit()) && (rest.len() == 64 || rest[64..].starts_with('.'))).then_some(key)
}

/// The whole sbatch command line (the script goes on stdin).
pub fn sbatch_args(name: &str, output: &str, chdir: &str, r: &Resources, s: &Settings) -> Vec<String> {
    let mut a = vec!["--parsable".to_string(), format!("--job-name={name}"), format!("--output={output}"), format!("--chdir={chdir}")];
    a.extend(resource_args(r, s));
    a
}

/// The job script: exports (values already quoted for `sh`, or meant to be
/// expanded on the node), then execs the step.
pub fn job_script(stage: &str, key: &str, exports: &[(&str, String)], argv: &[String]) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!("# recflow: stage `{stage}`, key {key}\n"));
    for (k, v) in exports {
        s.push_str(&format!("export {k}={v}\n"));
    }
    s.push_str("exec");
    for a in argv {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s.push('\n');
    s
}

/// The ID in `sbatch --parsable` output (`ID` or `ID;CLUSTER`).
pub fn parse_sbatch(stdout: &str) -> Option<String> {
    let line = stdout.lines().map(str::trim).find(|l| !l.is_empty())?;
    let id = line.split(';').next()?.trim();
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_digit() || c == '_')).then(|| id.to_string())
}

/// One row of `squeue -o "%i|%j|%T|%r|%N"`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    pub id: String,
    pub name: String,
    pub state: String,
    pub reason: String,
    pub node: String,
}

pub const SQUEUE_FORMAT: &str = "%i|%j|%T|%r|%N";

pub fn parse_squeue(stdout: &str) -> Vec<QueueRow> {
    stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().splitn(5, '|').collect();
            (f.len() == 5 && !f[0].is_empty()).then(|| QueueRow {
                id: f[0].to_string(),
                name: f[1].to_string(),
                state: f[2].to_string(),
                reason: f[3].to_string(),
                node: f[4].to_string(),
            })
        })
        .collect()
}

/// Whether a job state is final (the job will not run again by itself).
pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "PREEMPTED" | "NODE_FAIL" | "BOOT_FAIL" | "DEADLINE" | "OUT_OF_MEMORY" | "SPECIAL_EXIT" | "REVOKED"
    )
}

/// `FIELD=VALUE` of `scontrol show job -o` output.
pub fn scontrol_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.split_whitespace().find_map(|kv| kv.strip_prefix(field).and_then(|r| r.strip_prefix('=')))
}

/// How a job ended, as far as the controller still knows.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEnd {
    /// Final state, or None when the job already left the controller's memory.
    pub state: Option<String>,
    pub reason: String,
    pub exit: Option<String>,
    pub node: String,
}

impl JobEnd {
    /// Why a job without a run record failed, and what the next run does.
    pub fn explain(&self, id: &str) -> String {
        let mut why: Vec<String> = Vec::new();
        if let Some(e) = self.exit.as_deref().filter(|e| *e != "0:0") {
            why.push(format!("exit code {e}"));
        }
        if !self.reason.is_empty() && self.reason != "None" {
            why.push(self.reason.clone());
        }
        let why = if why.is_empty() { String::new() } else { format!(" ({})", why.join(", ")) };
        match self.state.as_deref() {
            None => format!("job {id} left the queue without committing a run record"),
            Some(s @ ("TIMEOUT" | "PREEMPTED" | "NODE_FAIL" | "BOOT_FAIL" | "DEADLINE" | "OUT_OF_MEMORY")) => format!(
                "job {id} was stopped by the scheduler: {s}{why}, before committing a run record; checkpoints saved so far are kept, the next run resumes from them"
            ),
            Some("CANCELLED") => format!("job {id} was cancelled{why} (scancel or an administrator); the next run resumes from its checkpoints"),
            Some(s) => format!("job {id} ended {s}{why} without committing a run record"),
        }
    }
}

/// Runs a Slurm client command; Err says which command failed and why.
async fn slurm_cmd(program: &str, args: &[String], stdin: Option<&str>) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
    cmd.stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes()).await.map_err(|e| format!("`{program}`: writing the job script: {e}"))?;
        drop(w);
    }
    let out = child.wait_with_output().await.map_err(|e| format!("`{program}`: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(format!("`{program} {}` failed: {}", args.join(" "), if err.is_empty() { format!("exit {:?}", out.status.code()) } else { err }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Blocking form for checks before the run and for Ctrl-C.
fn slurm_cmd_blocking(program: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks, before anything runs, that this machine can use Slurm and that
/// every partition the pipeline names exists: bad input (exit 2) otherwise,
/// naming the stage's line or the `recflow.toml` field.
pub fn preflight(p: &Pipeline, s: &Settings, toml: &Path) -> Result<(), RunError> {
    for b in ["sbatch", "squeue", "scontrol", "scancel"] {
        match std::process::Command::new(b).arg("--version").stdin(std::process::Stdio::null()).output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RunError::BadInput(format!(
                    "executor slurm: `{b}` cannot be run here (not on PATH): run recflow on the cluster's login node, or install Slurm's client commands (Debian: slurm-client); or use --executor local"
                )))
            }
            Err(e) => return Err(RunError::BadInput(format!("executor slurm: cannot run `{b}`: {e}"))),
            Ok(o) if !o.status.success() => {
                let err = String::from_utf8_lossy(&o.stderr);
                let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                return Err(RunError::BadInput(format!(
                    "executor slurm: `{b} --version` fails ({last}): Slurm's configuration is not found here; set SLURM_CONF to the cluster's slurm.conf, or run on a login node"
                )));
            }
            Ok(_) => {}
        }
    }
    slurm_cmd_blocking("squeue", &["--me", "-h", "-o", "%i"]).map_err(|e| {
        RunError::BadInput(format!("executor slurm: the Slurm controller does not answer (`squeue --me`: {e}); check SLURM_CONF and that munge runs"))
    })?;
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    if let Some(part) = &s.partition {
        wanted.insert(part.clone(), format!("{} [executor.slurm] partition", toml.display()));
    }
    for st in &p.stages {
        if let Some(part) = &st.resources.partition {
            wanted.entry(part.clone()).or_insert_with(|| format!("{}: stage `{}`: resources.partition", st.loc, st.base));
        }
    }
    for (parts, where_) in wanted {
        for part in parts.split(',') {
            if slurm_cmd_blocking("scontrol", &["show", "partition", part, "-o"]).is_err() {
                return Err(RunError::BadInput(format!("{where_}: no partition `{part}` on this cluster (`sinfo -s` lists them)")));
            }
        }
    }
    Ok(())
}

/// The Slurm executor (module doc).
pub(crate) struct Slurm {
    s: Settings,
    /// Stage key → job id of each job of this run still in flight (Ctrl-C cancels them).
    jobs: Mutex<BTreeMap<String, String>>,
    /// Our jobs already queued when this run began: key → id (adopted, not resubmitted).
    queued: tokio::sync::OnceCell<BTreeMap<String, String>>,
    /// The last `squeue` answer for the jobs in flight.
    states: tokio::sync::Mutex<(Option<Instant>, BTreeMap<String, QueueRow>)>,
}

impl Slurm {
    pub fn new(s: Settings) -> Slurm {
        Slurm { s, jobs: Mutex::new(BTreeMap::new()), queued: tokio::sync::OnceCell::new(), states: tokio::sync::Mutex::new((None, BTreeMap::new())) }
    }

    /// The id of a job of ours that builds `key` and is still queued or running.
    async fn queued_job(&self, key: &str) -> Result<Option<String>, String> {
        let q = self
            .queued
            .get_or_try_init(|| async {
                let out = slurm_cmd("squeue", &["--me".into(), "-h".into(), "-o".into(), SQUEUE_FORMAT.into()], None).await?;
                let mut m = BTreeMap::new();
                for r in parse_squeue(&out) {
                    if let Some(k) = key_of_job(&r.name) {
                        if !is_terminal(&r.state) {
                            m.insert(k.to_string(), r.id.clone());
                        }
                    }
                }
                Ok::<_, String>(m)
            })
            .await?;
        Ok(q.get(key).cloned())
    }

    /// The queue's view of job `id`, asking `squeue` at most once per poll
    /// for every job in flight. None: the controller no longer knows it.
    async fn state_of(&self, id: &str) -> Result<Option<QueueRow>, String> {
        let mut st = self.states.lock().await;
        let fresh = st.0.is_some_and(|t| t.elapsed() < self.s.poll / 2) && st.1.contains_key(id);
        if !fresh {
            let mut ids: Vec<String> = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
            if !ids.iter().any(|i| i == id) {
                ids.push(id.to_string());
            }
            let args = vec!["-h".into(), "--states=all".into(), "-j".into(), ids.join(","), "-o".into(), SQUEUE_FORMAT.into()];
            let rows = match slurm_cmd("squeue", &args, None).await {
                Ok(out) => parse_squeue(&out),
                // Every id unknown to the controller (they left its memory).
                Err(e) if e.contains("Invalid job id") => vec![],
                Err(e) => return Err(e),
            };
            st.1 = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
            st.0 = Some(Instant::now());
        }
        Ok(st.1.get(id).cloned())
    }

    /// Waits until job `id` is final or gone; prints its state every
    /// progress interval without a terminal (spinner message with one).
    async fn wait(&self, eng: &Arc<Engine>, stage: &ResolvedStage, id: &str) -> Result<JobEnd, String> {
        let bar = crate::run::launch::progress_bar(eng, stage);
        let t0 = Instant::now();
        let mut last_line = Instant::now();
        let mut cancelled_at: Option<Instant> = None;
        let mut last: Option<QueueRow> = None;
        let end = loop {
            let row = self.state_of(id).await?;
            match &row {
                Some(r) if is_terminal(&r.state) => break Some(r.clone()),
                None => break last.clone().filter(|r| is_terminal(&r.state)),
                Some(r) => {
                    let on = if r.node.is_empty() || r.state == "PENDING" { String::new() } else { format!(" on {}", r.node) };
                    let why = if r.state == "PENDING" && !r.reason.is_empty() && r.reason != "None" { format!(" ({})", r.reason) } else { String::new() };
                    let msg = format!("job {id} {}{why}{on}, {}", r.state, fmt_duration(t0.elapsed()));
                    bar.set_message(msg.clone());
                    if let Some(every) = self.s.progress_interval {
                        if last_line.elapsed() >= every {
                            last_line = Instant::now();
                            if eng.mp.is_hidden() && !eng.quiet {
                                eprintln!("{}: {msg}", stage.name);
                            }
                        }
                    }
                }
            }
            last = row.or(last);
            if eng.cancel.load(Ordering::SeqCst) {
                // scancel was sent; give the job its grace to stop, then stop waiting.
                let at = *cancelled_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_secs(60) {
                    break None;
                }
            }
            tokio::time::sleep(self.s.poll).await;
        };
        bar.finish_and_clear();
        eng.mp.remove(&bar);
        let mut je = JobEnd { state: end.as_ref().map(|r| r.state.clone()), reason: end.as_ref().map(|r| r.reason.clone()).unwrap_or_default(), exit: None, node: end.map(|r| r.node).unwrap_or_default() };
        if je.state.is_some() {
            if let Ok(text) = slurm_cmd("scontrol", &["show".into(), "job".into(), "-o".into(), id.into()], None).await {
                je.exit = scontrol_field(&text, "ExitCode").map(str::to_string);
            }
        }
        Ok(je)
    }

    /// The committed record of `key` after its job ended: pulled from the
    /// remote, or read from the shared store (a shared file system may show
    /// a new file late: looked for up to 30 s before concluding none).
    async fn collect(&self, eng: &Arc<Engine>, stage: &ResolvedStage, key: &str) -> Result<Option<Done>, String> {
        match &self.s.transfer {
            Transfer::Remote(r) => {
                if !fetch_remote(r, eng, key).await? {
                    return Ok(None);
                }
            }
            Transfer::SharedFs => {
                let t0 = Instant::now();
                while eng.store.read_record(key).is_none() && t0.elapsed() < Duration::from_secs(30) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let (e2, st2, k2) = (eng.clone(), stage.clone(), key.to_string());
        tokio::task::spawn_blocking(move || try_reuse(&e2, &st2, &k2)).await.map_err(|e| e.to_string())
    }

    /// Submits the job of a stage; returns its id.
    async fn submit(&self, eng: &Arc<Engine>, job: &StageJob) -> Result<String, String> {
        let stage = &job.stage;
        let spec = JobSpec::build(eng, job, matches!(self.s.transfer, Transfer::SharedFs))?;
        let interval = self.s.progress_interval.map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut exports: Vec<(&str, String)> = vec![("RECFLOW_WORKER", shell_quote(&self.s.worker)), ("RECFLOW_NUMERICS", shell_quote(&eng.numerics.to_string()))];
        let mut argv = vec![self.s.recflow.clone(), "step".into(), "--progress-interval".into(), interval.to_string()];
        let (output, chdir) = match &self.s.transfer {
            Transfer::Remote(remote) => {
                let spec_id = crate::run::step::push_job(remote, eng, &spec).await?;
                // Expanded by the node's shell: `$(id -u)`, `${TMPDIR:-/tmp}`.
                exports.push(("RECFLOW_CACHE", format!("\"{}\"", self.s.node_store.replace('"', "\\\""))));
                argv.extend(crate::run::step::remote_args(remote));
                argv.extend(["--spec-id".to_string(), spec_id]);
                (self.s.output.clone().unwrap_or_else(|| DEFAULT_OUTPUT.to_string()), "/tmp".to_string())
            }
            Transfer::SharedFs => {
                let path = crate::run::step::write_shared_spec(eng, &spec)?;
                exports.push(("RECFLOW_CACHE", shell_quote(&eng.store.dir.to_string_lossy())));
                argv.extend(["--spec".to_string(), path.to_string_lossy().into_owned()]);
                let out = self.s.output.clone().unwrap_or_else(|| eng.store.dir.join("logs").join(format!("{}.slurm-%j.out", job.key)).to_string_lossy().into_owned());
                (out, eng.p.dir.to_string_lossy().into_owned())
            }
        };
        let name = job_name(&job.key, &stage.name);
        let script = job_script(&stage.name, &job.key, &exports, &argv);
        let args = sbatch_args(&name, &output, &chdir, &stage.resources, &self.s);
        let out = slurm_cmd("sbatch", &args, Some(&script)).await?;
        parse_sbatch(&out).ok_or_else(|| format!("sbatch printed no job id: {out:?}"))
    }
}

/// Pulls `key`'s record and outputs from the remote when it has them;
/// false when it has none. An entry that cannot be trusted is an error.
async fn fetch_remote(r: &Remote, eng: &Engine, key: &str) -> Result<bool, String> {
    use crate::remote::{Progress, PullOutcome};
    match r.pull_key(&eng.store, key, &Progress::hidden()).await.map_err(|e| e.to_string())? {
        PullOutcome::Pulled { .. } => Ok(true),
        PullOutcome::Missing => Ok(false),
        PullOutcome::Unusable(why) => Err(format!("the remote's entry of key {} cannot be used: {why}", &key[..12])),
    }
}

impl Executor for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn local_gpus(&self) -> bool {
        false
    }

    fn default_jobs(&self) -> usize {
        // Slurm queues what does not fit; the runner only bounds its polling.
        64
    }

    fn job_uses_remote(&self) -> bool {
        // `recflow step` takes the lease on the node and pushes the record.
        matches!(self.s.transfer, Transfer::Remote(_))
    }

    fn run<'a>(&'a self, eng: &'a Arc<Engine>, job: StageJob) -> BoxFut<'a, Result<Done, String>> {
        Box::pin(async move {
            // No look at the remote here: the scheduler has just read
            // through it under the key lock (and not at all for a forced
            // stage, which must be computed again on the node).
            let id = match self.queued_job(&job.key).await? {
                Some(id) => {
                    eng.note(&format!("{}: adopting job {id} (queued by an earlier run for key {})", job.stage.name, &job.key[..12]));
                    id
                }
                None => self.submit(eng, &job).await?,
            };
            eng.note_job(&job.stage.name, &id);
            self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(job.key.clone(), id.clone());
            let StageJob { stage, key, lock, .. } = job;
            // With a shared file system the job takes the key's lock itself.
            let lock = match self.s.transfer {
                Transfer::SharedFs => {
                    drop(lock);
                    None
                }
                Transfer::Remote(_) => Some(lock),
            };
            let end = self.wait(eng, &stage, &id).await;
            self.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            let end = end?;
            if eng.cancel.load(Ordering::SeqCst) {
                return Err(format!("cancelled (job {id} was cancelled)"));
            }
            let done = self.collect(eng, &stage, &key).await?;
            drop(lock);
            match done {
                Some(mut d) => {
                    d.ran = true;
                    Ok(d)
                }
                None => {
                    let mut msg = end.explain(&id);
                    match &self.s.transfer {
                        Transfer::SharedFs => msg.push_str(&crate::run::launch::log_tail(&eng.store.log_path(&key))),
                        Transfer::Remote(_) => {
                            let node = if end.node.is_empty() { "its node".to_string() } else { format!("node {}", end.node) };
                            let store = self.s.node_store.replace("${SLURM_JOB_ID}", &id).replace("$SLURM_JOB_ID", &id);
                            let output = self.s.output.as_deref().unwrap_or(DEFAULT_OUTPUT).replace("%j", &id);
                            msg.push_str(&format!("; the stage log is on {node} at {store}/logs/{key}.log, Slurm's output at {output}"));
                            // Readable here when the output path is on a shared file system.
                            if let Ok(text) = std::fs::read_to_string(&output) {
                                let last: Vec<&str> = text.lines().rev().filter(|l| !l.trim().is_empty()).take(5).collect();
                                for l in last.into_iter().rev() {
                                    msg.push_str("\n    ");
                                    msg.push_str(l);
                                }
                            }
                        }
                    }
                    Err(msg)
                }
            }
        })
    }

    fn cancel(&self, eng: &Engine) {
        let ids: Vec<String> = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        if ids.is_empty() {
            return;
        }
        let args: Vec<&str> = ids.iter().map(String::as_str).collect();
        match slurm_cmd_blocking("scancel", &args) {
            Ok(_) => eng.note(&format!("cancelled Slurm jobs {}", ids.join(", "))),
            Err(e) => eng.note(&format!("warning: `scancel {}` failed: {e}", ids.join(" "))),
        }
    }
}

/// The paths a job spec refers to, for the shared file system mode.
pub fn shared_spec_path(store_dir: &Path, key: &str) -> PathBuf {
    store_dir.join("jobs").join(format!("{key}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            partition: Some("cpu".into()),
            time: Some("1:00:00".into()),
            sbatch: vec!["--account=lab".into()],
            transfer: Transfer::SharedFs,
            recflow: "/opt/recflow".into(),
            worker: "/opt/recflow-worker".into(),
            node_store: DEFAULT_NODE_STORE.into(),
            output: None,
            poll: Duration::from_secs(5),
            progress_interval: None,
        }
    }

    #[test]
    fn each_resource_becomes_one_sbatch_option() {
        let r = Resources {
            gpus: 2,
            cpus: Some(8),
            mem: Some("32G".into()),
            time: Some("2-00:00:00".into()),
            partition: Some("gpu".into()),
            sbatch: vec!["--qos=high".into()],
        };
        assert_eq!(
            resource_args(&r, &settings()),
            vec!["--partition=gpu", "--gres=gpu:2", "--cpus-per-task=8", "--mem=32G", "--time=2-00:00:00", "--account=lab", "--qos=high"],
            "the stage's partition and time win over the project's; project flags first, the stage's last (sbatch keeps the last)"
        );
        assert_eq!(
            resource_args(&Resources::default(), &settings()),
            vec!["--partition=cpu", "--time=1:00:00", "--account=lab"],
            "no resources: the project's defaults only; no GPU option for gpus: 0"
        );
        let mut bare = settings();
        bare.partition = None;
        bare.time = None;
        bare.sbatch.clear();
        assert!(resource_args(&Resources::default(), &bare).is_empty(), "nothing asked, nothing passed: the cluster's defaults apply");
    }

    #[test]
    fn sbatch_line_carries_the_key_in_the_job_name() {
        let key = "ab".repeat(32);
        let name = job_name(&key, "train@seed=1 x");
        assert_eq!(name, format!("recflow.{key}.train@seed=1_x"));
        assert_eq!(key_of_job(&name), Some(key.as_str()), "the key is found again in the name");
        assert_eq!(key_of_job("recflow.abc.x"), None);
        assert_eq!(key_of_job("other-job"), None);
        let a = sbatch_args(&name, "/tmp/o-%j.out", "/tmp", &Resources { gpus: 1, ..Default::default() }, &settings());
        assert_eq!(&a[..4], &["--parsable".to_string(), format!("--job-name={name}"), "--output=/tmp/o-%j.out".into(), "--chdir=/tmp".into()]);
        assert!(a.contains(&"--gres=gpu:1".to_string()));
    }

    #[test]
    fn script_quotes_arguments_and_keeps_node_expansions() {
        let s = job_script("a", "k", &[("RECFLOW_CACHE", "\"${TMPDIR:-/tmp}/x\"".into())], &["/opt/recflow".into(), "step".into(), "--remote".into(), "s3://b/p q".into()]);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("export RECFLOW_CACHE=\"${TMPDIR:-/tmp}/x\"\n"), "{s}");
        assert!(s.ends_with("exec /opt/recflow step --remote 's3://b/p q'\n"), "{s}");
    }

    #[test]
    fn parses_slurm_outputs() {
        assert_eq!(parse_sbatch("1234\n").as_deref(), Some("1234"));
        assert_eq!(parse_sbatch("1234;cluster\n").as_deref(), Some("1234"));
        assert_eq!(parse_sbatch("sbatch: error\n"), None);
        let rows = parse_squeue("12|recflow.x.a|RUNNING|None|node1\n13|j|PENDING|Resources|\n");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1], QueueRow { id: "13".into(), name: "j".into(), state: "PENDING".into(), reason: "Resources".into(), node: "".into() });
        assert!(is_terminal("TIMEOUT") && is_terminal("COMPLETED") && !is_terminal("COMPLETING") && !is_terminal("PENDING"));
        let sc = "JobId=12 JobName=x JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15 RunTime=00:01:00";
        assert_eq!(scontrol_field(sc, "ExitCode"), Some("0:15"));
        assert_eq!(scontrol_field(sc, "JobState"), Some("TIMEOUT"));
    }

    #[test]
    fn a_scheduler_kill_says_the_next_run_resumes() {
        let e = JobEnd { state: Some("TIMEOUT".into()), reason: "TimeLimit".into(), exit: Some("0:15".into()), node: "n1".into() };
        let m = e.explain("77");
        assert_eq!(
            m,
            "job 77 was stopped by the scheduler: TIMEOUT (exit code 0:15, TimeLimit), before committing a run record; checkpoints saved so far are kept, the next run resumes from them"
        );
        let f = JobEnd { state: Some("FAILED".into()), reason: "NonZeroExitCode".into(), exit: Some("1:0".into()), node: "n1".into() };
        assert_eq!(f.explain("8"), "job 8 ended FAILED (exit code 1:0, NonZeroExitCode) without committing a run record");
        let g = JobEnd { state: None, reason: String::new(), exit: None, node: String::new() };
        assert!(g.explain("5").contains("left the queue"));
    }

    #[test]
    fn settings_errors_name_the_field() {
        let f = Path::new("/p/recflow.toml");
        let e = Settings::resolve(&SlurmConfig::default(), f, None, None).unwrap_err();
        assert!(e.contains("remote") && e.contains("shared_fs = true"), "no way to move data: says both fixes: {e}");
        let bad = SlurmConfig { shared_fs: true, time: Some("4h".into()), ..Default::default() };
        let e = Settings::resolve(&bad, f, None, None).unwrap_err();
        assert!(e.starts_with("/p/recflow.toml [executor.slurm] time"), "{e}");
        let bad = SlurmConfig { shared_fs: true, sbatch: vec!["--job-name=x".into()], ..Default::default() };
        assert!(Settings::resolve(&bad, f, None, None).unwrap_err().contains("[executor.slurm] sbatch"));
        let bad = SlurmConfig { shared_fs: true, recflow: Some("recflow".into()), ..Default::default() };
        assert!(Settings::resolve(&bad, f, None, None).unwrap_err().contains("absolute path"));
    }
}
