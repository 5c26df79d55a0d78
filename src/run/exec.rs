//! The executor: a tokio scheduler over ready stages (`--jobs`, `resources:
//! {gpus}`), each stage either reused from the store or run as a supervised
//! child process (`recflow-worker exec-stage SPEC.json` for built-in kinds,
//! `sh -c` for shell stages), with per-stage logs, progress bars from the
//! worker's JSON-line events, per-key locks shared by concurrent runs,
//! persistent work dirs for resume, and Ctrl-C handling.
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use super::plan::{self, Mode, Selection};
use super::{key_inputs, sources, worker_path, Avail, Available, KeyState, RunError};
use crate::cache::key::StageKeyInputs;
use crate::cache::locks::FileLock;
use crate::cache::store::{remove_any, OutputRecord, RunRecord, RECORD_SCHEMA};
use crate::cache::{StatCache, Store};
use crate::lock::{lock_path, metrics_summary, LockFile, LockStage};
use crate::pipeline::resolved::{Action, CmdPiece, ResolvedStage};
use crate::pipeline::Pipeline;

/// Flags of `recflow run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub jobs: usize,
    pub sel: Selection,
    pub keep_going: bool,
    /// Total GPUs to schedule (default: `/dev/nvidiaN` count).
    pub gpus: Option<u32>,
    /// No progress bars or table (tests, `--log-format json`).
    pub quiet: bool,
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
        let mut s = format!("{:<w$}  {:<7}  {:>8}\n", "stage", "status", "wall");
        for r in &self.rows {
            let (st, extra) = match &r.outcome {
                Outcome::Cached => ("cached", String::new()),
                Outcome::Ran => ("ran", String::new()),
                Outcome::Failed(m) => ("FAILED", format!("  {m}")),
                Outcome::Skipped(m) => ("skipped", format!("  {m}")),
                Outcome::NotSelected => ("-", "  not selected".to_string()),
            };
            let note = r.note.as_ref().map(|n| format!("  {n}")).unwrap_or_default();
            s.push_str(&format!("{:<w$}  {:<7}  {:>7.2}s{extra}{note}\n", r.stage, st, r.wall_s));
        }
        s
    }

    pub fn failed(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| matches!(r.outcome, Outcome::Failed(_) | Outcome::Skipped(_))).collect()
    }
}

/// Shared state of one run.
pub(crate) struct Engine {
    pub p: Pipeline,
    pub store: Store,
    pub sc: Mutex<StatCache>,
    pub cancel: AtomicBool,
    /// Stage → supervisor pid of running children.
    pub children: Mutex<BTreeMap<String, u32>>,
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
}

impl Engine {
    pub fn new(p: Pipeline, store: Store, quiet: bool) -> Self {
        let sc = StatCache::load(&store.dir);
        let mp = MultiProgress::new();
        let home = store.dir.clone();
        if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            mp.set_draw_target(ProgressDrawTarget::hidden());
        }
        Engine {
            p,
            store,
            sc: Mutex::new(sc),
            cancel: AtomicBool::new(false),
            children: Mutex::new(BTreeMap::new()),
            mp,
            quiet,
            scratch: false,
            write_lock: true,
            home,
            // main validates RECFLOW_NUMERICS before any engine exists.
            numerics: crate::numerics::Request::from_env().unwrap_or(crate::numerics::Request::DEFAULT).resolve(),
        }
    }

    fn sc(&self) -> std::sync::MutexGuard<'_, StatCache> {
        self.sc.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, msg: &str) {
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

/// Paths at which a stage's recorded outputs can be read.
fn avail_of(eng: &Engine, stage: &ResolvedStage, key: &str, outs: &BTreeMap<String, OutputRecord>) -> BTreeMap<String, Avail> {
    outs.iter()
        .map(|(n, o)| {
            let path = match &stage.action {
                Action::Builtin { .. } => eng.store.out_dir(key).join(&o.path),
                Action::Shell { .. } => eng.p.dir.join(&o.path),
            };
            (n.clone(), Avail { id: o.id.clone(), path })
        })
        .collect()
}

/// Reuses a record when every output is present and intact; repairs the
/// views (out/KEY, shell outputs in the workspace). A corrupt object is a
/// warning and a miss, never used (DVC's lesson).
pub(crate) fn try_reuse(eng: &Engine, stage: &ResolvedStage, key: &str) -> Option<Done> {
    let rec = eng.store.read_record(key)?;
    let mut sc = eng.sc();
    let names: BTreeSet<String> = stage.output_names().into_iter().collect();
    if rec.outputs.keys().cloned().collect::<BTreeSet<_>>() != names {
        return None;
    }
    for (name, o) in &rec.outputs {
        let workspace = match &stage.action {
            Action::Shell { .. } => Some(eng.p.dir.join(&o.path)),
            Action::Builtin { .. } => None,
        };
        // Fast path: the workspace copy is unchanged (stat cache) and the object is there.
        if let Some(w) = &workspace {
            if sc.content_id(w).map(|x| x.0).ok().as_deref() == Some(o.id.as_str()) && eng.store.check(&mut sc, &o.id).is_ok() {
                continue;
            }
        }
        match eng.store.check(&mut sc, &o.id) {
            Ok(()) => {}
            Err(e) => {
                eng.note(&format!("warning: stage `{}`: output `{name}`: {e}; the stage will run again", stage.name));
                if let crate::cache::CacheError::Corrupt { id, .. } = &e {
                    eng.store.evict_object(id);
                }
                eng.store.drop_key(key);
                return None;
            }
        }
        if let Some(w) = &workspace {
            if eng.store.materialize(&o.id, w).is_err() {
                return None;
            }
            if let Ok((id, _)) = sc.content_id(w) {
                if id != o.id {
                    return None;
                }
            }
        }
    }
    drop(sc);
    if matches!(stage.action, Action::Builtin { .. }) {
        let od = eng.store.out_dir(key);
        // A view damaged by hand is rebuilt from the (checked) objects.
        let intact = rec.outputs.values().all(|o| od.join(&o.path).exists());
        if !intact {
            remove_any(&od);
        }
        eng.store.materialize_outputs(key, &rec.outputs).ok()?;
    }
    let avail = avail_of(eng, stage, key, &rec.outputs);
    Some(Done {
        key: key.to_string(),
        ki: rec.key_inputs,
        outputs: rec.outputs,
        avail,
        metrics: rec.metrics,
        ran: false,
        numerics: rec.numerics,
    })
}

/// Single-quotes a string for `sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The command a shell stage runs: outputs as paths, env values in place.
fn render_cmd(stage: &ResolvedStage, pieces: &[CmdPiece], paths: &BTreeMap<String, Vec<PathBuf>>, dir: &Path) -> String {
    pieces
        .iter()
        .map(|p| match p {
            CmdPiece::Lit(l) => l.clone(),
            CmdPiece::Output { text, .. } => {
                let path = paths.get(text).and_then(|v| v.first()).cloned().unwrap_or_default();
                let shown = path.strip_prefix(dir).map(Path::to_path_buf).unwrap_or(path);
                shell_quote(&shown.to_string_lossy())
            }
            CmdPiece::Env(v) => stage.env_values.get(v).cloned().unwrap_or_default(),
        })
        .collect()
}

fn log_line(log: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "{line}");
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What one execution of a stage produced: output records, metrics, and the
/// numerics profile its worker reported.
pub(crate) type Executed = (BTreeMap<String, OutputRecord>, Value, Option<crate::numerics::Profile>);

/// Runs a stage's process under the held key lock; on success ingests its
/// outputs into `eng.store` and returns their records, the metrics and the
/// worker's numerics profile.
pub(crate) async fn execute(
    eng: &Arc<Engine>,
    stage: &ResolvedStage,
    key: &str,
    paths: &BTreeMap<String, Vec<PathBuf>>,
    lock: &FileLock,
    gpu_ids: &[u32],
) -> Result<Executed, String> {
    let store = &eng.store;
    let work = store.work_dir(key);
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create work dir {}: {e}", work.display()))?;
    let log = store.log_path(key);
    if let Some(d) = log.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let resumed = std::fs::read_dir(&work).map(|mut r| r.next().is_some()).unwrap_or(false);
    log_line(&log, &format!("== recflow: stage `{}` key {key} attempt at unix {}{}", stage.name, now_unix(), if resumed { " (resuming: work dir kept)" } else { "" }));
    let scratch_out = store.tmp_dir().join(format!("run-{}-{}", &key[..16], std::process::id()));
    let mut spec_tmp: Option<PathBuf> = None;
    let (program, args): (PathBuf, Vec<String>) = match &stage.action {
        Action::Builtin { kind, .. } => {
            remove_any(&scratch_out);
            std::fs::create_dir_all(&scratch_out).map_err(|e| format!("{}: {e}", scratch_out.display()))?;
            let spec = crate::worker::ExecSpec {
                kind: kind.clone(),
                stage: stage.name.clone(),
                config: stage.config_run.clone(),
                // Path-valued `with:` fields are hashed as inputs `with.FIELD`
                // but reach the stage through its config (absolute paths).
                inputs: paths.iter().filter(|(k, _)| !k.starts_with("with.")).map(|(k, v)| (k.clone(), v.clone())).collect(),
                out_dir: scratch_out.clone(),
                work_dir: work.clone(),
                seed: stage.seed,
                device: stage.device.clone().unwrap_or_else(|| "cpu".into()),
            };
            let text = serde_json::to_string_pretty(&spec).map_err(|e| e.to_string())?;
            // A spec holding env values never touches the store: private temp file, removed after.
            let spec_path = if stage.env_values.is_empty() {
                work.join("spec.json")
            } else {
                let p = std::env::temp_dir().join(format!("recflow-spec-{}-{}.json", std::process::id(), &key[..16]));
                spec_tmp = Some(p.clone());
                p
            };
            {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .mode(0o600)
                    .open(&spec_path)
                    .map_err(|e| format!("{}: {e}", spec_path.display()))?;
                f.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
            }
            let w = worker_path(eng.p.worker.as_deref());
            if !w.is_file() {
                return Err(format!(
                    "worker binary {} not found (build it with `cargo build -p recflow-ml --bin recflow-worker`, or set RECFLOW_WORKER)",
                    w.display()
                ));
            }
            (w, vec!["exec-stage".into(), spec_path.to_string_lossy().into_owned()])
        }
        Action::Shell { cmd, outs } => {
            // Declared outputs are removed first (they may be read-only links into the store).
            for o in outs {
                remove_any(&o.abs);
                if let Some(d) = o.abs.parent() {
                    let _ = std::fs::create_dir_all(d);
                }
            }
            let text = render_cmd(stage, cmd, paths, &eng.p.dir);
            (PathBuf::from("sh"), vec!["-c".into(), text])
        }
    };
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("__supervise")
        .arg(std::process::id().to_string())
        .arg("--")
        .arg(&program)
        .args(&args)
        .current_dir(&eng.p.dir)
        .env("RECFLOW_WORK_DIR", &work)
        .env("RECFLOW_SEED", stage.seed.to_string())
        .env("RECFLOW_STAGE", &stage.name)
        // Always the resolved location, so a stage never guesses it from
        // the work dir's position (a store moved by RECFLOW_CACHE, verify).
        .env("RECFLOW_CACHE", &eng.home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(logf));
    // The numerics profile: pinned fields set, fields left to the library removed.
    for (k, v) in eng.numerics.env() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    if !gpu_ids.is_empty() {
        let ids: Vec<String> = gpu_ids.iter().map(|g| g.to_string()).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    let fd = lock.raw_fd();
    // SAFETY: between fork and exec we only clear FD_CLOEXEC on the lock's
    // descriptor (async-signal-safe fcntl), so the supervisor holds the lock too.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start stage process: {e}"))?;
    if let Some(pid) = child.id() {
        eng.children.lock().unwrap_or_else(|e| e.into_inner()).insert(stage.name.clone(), pid);
    }
    let bar = eng.mp.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{prefix:.bold} {spinner} [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .progress_chars("=> "),
    );
    bar.set_prefix(stage.name.clone());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut numerics: Option<crate::numerics::Profile> = None;
    if let Some(out) = child.stdout.take() {
        let mut lines = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.get("progress").is_some() => {
                    let p = &v["progress"];
                    if let Some(t) = p.get("total").and_then(|t| t.as_u64()) {
                        bar.set_length(t);
                    }
                    bar.set_position(p.get("done").and_then(|d| d.as_u64()).unwrap_or(0));
                    bar.set_message(p.get("unit").and_then(|u| u.as_str()).unwrap_or("").to_string());
                }
                Ok(v) if v.get("numerics").is_some() => {
                    numerics = serde_json::from_value(v["numerics"].clone()).ok();
                    log_line(&log, &format!("== recflow: numerics {}", numerics.as_ref().map(|p| p.summary()).unwrap_or_else(|| line.clone())));
                }
                Ok(v) if v.get("log").is_some() => {
                    let level = v["log"].get("level").and_then(|l| l.as_str()).unwrap_or("info").to_string();
                    let msg = v["log"].get("msg").and_then(|l| l.as_str()).unwrap_or("").to_string();
                    log_line(&log, &format!("[{level}] {msg}"));
                    if level == "warn" || level == "error" {
                        eng.note(&format!("{}: {level}: {msg}", stage.name));
                    }
                }
                _ => log_line(&log, &line),
            }
        }
    }
    let status = child.wait().await;
    bar.finish_and_clear();
    eng.mp.remove(&bar);
    eng.children.lock().unwrap_or_else(|e| e.into_inner()).remove(&stage.name);
    if let Some(p) = &spec_tmp {
        let _ = std::fs::remove_file(p);
    }
    let wall = t0.elapsed().as_secs_f64();
    log_line(&log, &format!("== recflow: exit {:?} after {wall:.2}s", status.as_ref().ok().and_then(|s| s.code())));
    if eng.cancel.load(Ordering::SeqCst) {
        return Err("cancelled".into());
    }
    let status = status.map_err(|e| e.to_string())?;
    if !status.success() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let last: Vec<&str> = tail.lines().rev().filter(|l| !l.starts_with("== recflow")).take(5).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        return Err(format!(
            "exit code {}; log {}{}",
            status.code().map(|c| c.to_string()).unwrap_or_else(|| "signal".into()),
            log.display(),
            if last.is_empty() { String::new() } else { format!("\n    {}", last.join("\n    ")) }
        ));
    }
    // Ingest outputs.
    let mut outs = BTreeMap::new();
    let mut metrics = Value::Object(Default::default());
    let mut sc = eng.sc();
    match &stage.action {
        Action::Builtin { outputs, .. } => {
            let mpath = scratch_out.join(crate::worker::METRICS_FILE);
            if let Ok(b) = std::fs::read(&mpath) {
                metrics = serde_json::from_slice(&b).unwrap_or(metrics);
            }
            if !outputs.iter().any(|o| o.file_name() == crate::worker::METRICS_FILE) {
                let _ = std::fs::remove_file(&mpath);
            }
            for o in outputs {
                let p = scratch_out.join(o.file_name());
                if !p.exists() {
                    return Err(format!("finished without writing output `{}`", o.name));
                }
                let id = store.put(&mut sc, &p, true).map_err(|e| e.to_string())?;
                outs.insert(o.name.clone(), OutputRecord { id, path: o.file_name() });
            }
            // The scratch dir now holds links to the objects: it becomes out/KEY.
            let od = store.out_dir(key);
            remove_any(&od);
            if let Some(d) = od.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            if std::fs::rename(&scratch_out, &od).is_err() {
                remove_any(&scratch_out);
                store.materialize_outputs(key, &outs).map_err(|e| e.to_string())?;
            }
        }
        Action::Shell { outs: souts, .. } => {
            for o in souts {
                if !o.abs.exists() {
                    return Err(format!("finished without writing output `{}` ({})", o.name, o.rel));
                }
                let id = store.put(&mut sc, &o.abs, !eng.scratch).map_err(|e| e.to_string())?;
                outs.insert(o.name.clone(), OutputRecord { id, path: o.rel.clone() });
            }
        }
    }
    Ok((outs, metrics, numerics))
}

/// Reuse or run one stage (the body of a scheduler task).
async fn stage_task(
    eng: Arc<Engine>,
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
    if mode == Mode::ReuseOnly {
        return Err("not built yet and outside the selection (run it, or drop --only/--from)".into());
    }
    // Per-key lock: a concurrent run building the same key makes us wait, then reuse.
    let lp = eng.store.lock_path(&key);
    let (e2, st2, k2) = (eng.clone(), stage.name.clone(), key.clone());
    let lock = tokio::task::spawn_blocking(move || -> std::io::Result<FileLock> {
        if let Some(mut l) = FileLock::try_exclusive(&lp)? {
            l.note_holder();
            return Ok(l);
        }
        let holder = FileLock::holder_of(&lp).map(|p| format!(" (pid {p})")).unwrap_or_default();
        e2.note(&format!("{st2}: another run{holder} is building key {}; waiting", &k2[..12]));
        let mut l = FileLock::exclusive(&lp)?;
        l.note_holder();
        Ok(l)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot take the key lock: {e}"))?;
    if mode != Mode::Force {
        let (e2, st2, k2) = (eng.clone(), stage.clone(), key.clone());
        if let Some(d) = tokio::task::spawn_blocking(move || try_reuse(&e2, &st2, &k2)).await.map_err(|e| e.to_string())? {
            return Ok(d);
        }
    }
    let started = now_unix();
    let t0 = Instant::now();
    let (outputs, metrics, numerics) = execute(&eng, &stage, &key, &paths, &lock, &gpu_ids).await?;
    let rec = RunRecord {
        schema: RECORD_SCHEMA,
        key: key.clone(),
        pipeline: eng.p.name.clone(),
        stage: stage.name.clone(),
        key_inputs: ki.clone(),
        outputs: outputs.clone(),
        metrics: metrics.clone(),
        started,
        wall_s: t0.elapsed().as_secs_f64(),
        numerics: numerics.clone(),
    };
    eng.store.write_record(&rec).map_err(|e| e.to_string())?;
    // Committed: the work dir (checkpoints of this key) is no longer needed.
    remove_any(&eng.store.work_dir(&key));
    drop(lock);
    let avail = avail_of(&eng, &stage, &key, &outputs);
    Ok(Done { key, ki, outputs, avail, metrics, ran: true, numerics })
}

/// Records a finished stage in the lock file and the `runs/` view.
fn commit_lock(eng: &Engine, stage: &ResolvedStage, d: &Done) -> Result<(), RunError> {
    if matches!(stage.action, Action::Builtin { .. }) {
        // runs/<pipeline>/<stage> → cache/out/KEY (read-only files; replacing the link is atomic).
        let view = eng.p.root.join("runs").join(&eng.p.name).join(&stage.name);
        if let Some(parent) = view.parent() {
            let _ = std::fs::create_dir_all(parent);
            let tmp = parent.join(format!(".{}.tmp{}", stage.name, std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            if std::os::unix::fs::symlink(eng.store.out_dir(&d.key), &tmp).is_ok() {
                if std::fs::symlink_metadata(&view).map(|m| m.is_dir()).unwrap_or(false) {
                    remove_any(&view);
                }
                let _ = std::fs::rename(&tmp, &view);
            }
        }
    }
    if !eng.write_lock {
        return Ok(());
    }
    let entry = LockStage {
        key: d.key.clone(),
        key_inputs: d.ki.clone(),
        sources: sources(stage, &eng.p.root, &eng.p.dir),
        outputs: d.outputs.clone(),
        metrics: metrics_summary(&d.metrics),
        numerics: d.numerics.clone(),
    };
    let (name, params) = (eng.p.name.clone(), crate::lock::spell_params(&eng.p.params, &eng.p.root, &eng.p.dir));
    LockFile::update(&lock_path(&eng.p.file), &eng.store.dir, |l| {
        l.pipeline = name;
        l.params = params;
        l.stages.insert(stage.name.clone(), entry);
        // Entries written before the summary dropped timings lose them on
        // the next write (idempotent for current ones).
        for st in l.stages.values_mut() {
            st.metrics = metrics_summary(&st.metrics);
        }
    })?;
    Ok(())
}

/// Runs (or reuses) the pipeline's stages as planned.
pub fn run(p: Pipeline, opts: &RunOptions) -> Result<Summary, RunError> {
    let store = Store::open(&crate::cache::store_dir(&p.root));
    let eng = Arc::new(Engine::new(p, store, opts.quiet));
    run_with(eng, opts)
}

pub(crate) fn run_with(eng: Arc<Engine>, opts: &RunOptions) -> Result<Summary, RunError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start the async runtime: {e}")))?;
    let res = rt.block_on(schedule(eng.clone(), opts));
    eng.sc().save();
    res
}

async fn schedule(eng: Arc<Engine>, opts: &RunOptions) -> Result<Summary, RunError> {
    let nodes: Vec<plan::Node> =
        eng.p.stages.iter().map(|s| plan::Node { name: s.name.clone(), base: s.base.clone(), deps: s.deps.clone() }).collect();
    let plan = plan::plan(&nodes, &opts.sel).map_err(RunError::BadInput)?;
    let modes: BTreeMap<String, Mode> = plan.stages.into_iter().collect();
    let jobs = opts.jobs.max(1);
    let total_gpus = opts.gpus.unwrap_or_else(crate::pipeline::gpu_count);
    let mut free_gpus: BTreeSet<u32> = (0..total_gpus).collect();
    let mut done: BTreeMap<String, Done> = BTreeMap::new();
    let mut ended: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut walls: BTreeMap<String, f64> = BTreeMap::new();
    let mut notes: BTreeMap<String, String> = BTreeMap::new();
    let mut started: BTreeMap<String, (Instant, Vec<u32>)> = BTreeMap::new();
    let mut set: tokio::task::JoinSet<(usize, Result<Done, String>)> = tokio::task::JoinSet::new();
    let mut stop_launching = false;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
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
                let want = s.gpus.min(total_gpus);
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
                let e2 = eng.clone();
                set.spawn(async move { (i, stage_task(e2, i, mode, avail, ids).await) });
            }
        }
        if set.is_empty() {
            break;
        }
        let joined = tokio::select! {
            j = set.join_next() => j,
            _ = tokio::signal::ctrl_c() => { cancel(&eng); None }
            _ = async { match sigterm.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending::<()>().await } } => { cancel(&eng); None }
        };
        let Some(joined) = joined else {
            if eng.cancel.load(Ordering::SeqCst) {
                stop_launching = true;
            }
            continue;
        };
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
                if let Some(n) = crate::stages::grpo::collapse_note(&d.metrics) {
                    notes.insert(s.name.clone(), n);
                }
                ended.insert(s.name.clone(), if d.ran { Outcome::Ran } else { Outcome::Cached });
                done.insert(s.name.clone(), d);
            }
            Err(msg) => {
                if !eng.cancel.load(Ordering::SeqCst) {
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
        return Err(RunError::Cancelled);
    }
    // A complete run drops lock entries of stages that left the pipeline.
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
            note: notes.get(&s.name).cloned(),
        })
        .collect();
    let hashed_bytes = eng.sc().hashed_bytes;
    Ok(Summary { rows, hashed_bytes })
}

/// Ctrl-C / SIGTERM: stop every running stage; nothing of theirs is recorded.
fn cancel(eng: &Engine) {
    eng.cancel.store(true, Ordering::SeqCst);
    eng.note("interrupted: stopping running stages (their work dirs are kept; a second Ctrl-C kills them at once)");
    for pid in eng.children.lock().unwrap_or_else(|e| e.into_inner()).values() {
        // SAFETY: signals our own supervisor child; it stops its stage's group.
        unsafe {
            libc::kill(*pid as i32, libc::SIGTERM);
        }
    }
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
    let nodes: Vec<plan::Node> =
        p.stages.iter().map(|s| plan::Node { name: s.name.clone(), base: s.base.clone(), deps: s.deps.clone() }).collect();
    let plan = plan::plan(&nodes, sel).map_err(RunError::BadInput)?;
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
        let f = super::preflight::check_stage(p, s, &avail, will_run, allow_missing);
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
