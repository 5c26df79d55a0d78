//! Launching one stage: its command (the worker's `exec-stage SPEC.json` for
//! built-in kinds, `sh -c` for shell stages), the supervised child process
//! ([`super::supervise`] holds the key lock's descriptor and the process
//! group), the pump of the worker's JSON-line events into the progress bar
//! and the stage log, and the log lines the runner itself writes.
//!
//! Why apart from [`super::commit`]: this half only runs a process and says
//! how it ended; it never writes to the store. What the process left in its
//! scratch dir or the workspace becomes a record only in `commit` (as DVC
//! keeps `stage/run.py` apart from `stage/cache.py`), so verify can rerun a
//! stage through the same launch into a scratch store.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use super::engine::Engine;
use super::progress::StageProgress;
use super::worker_path;
use crate::cache::locks::FileLock;
use crate::cache::store::remove_any;
use crate::pipeline::resolved::{Action, CmdPiece, ResolvedStage};

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

/// Appends one line to a stage log (best effort: a log is never a reason to fail).
fn log_line(log: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "{line}");
    }
}

pub(super) fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A stage process that exited 0: where its built-in outputs wait to be
/// committed, and the numerics profile its worker reported.
pub(crate) struct Launched {
    /// The built-in stage's `out_dir` (unused by shell stages, which write
    /// their declared outputs into the workspace).
    pub scratch_out: PathBuf,
    /// None for shell stages.
    pub numerics: Option<crate::numerics::Profile>,
    /// The stage process's user + system CPU seconds and peak RSS, from the
    /// supervisor's `wait4` (`{"cpu_s", "peak_rss_bytes"}`; None if unknown).
    pub rusage: Option<serde_json::Value>,
}

/// What the supervisor is asked to run.
struct Program {
    program: PathBuf,
    args: Vec<String>,
    /// A spec holding env values, written outside the store; removed after the run.
    spec_tmp: Option<PathBuf>,
}

/// Runs a stage's process under the held key lock and waits for it. Ok only
/// when it exited 0; the error is the line the run reports (exit code, log
/// path and the log's last lines).
pub(crate) async fn launch(
    eng: &Arc<Engine>,
    stage: &ResolvedStage,
    key: &str,
    paths: &BTreeMap<String, Vec<PathBuf>>,
    lock: &FileLock,
    gpu_ids: &[u32],
) -> Result<Launched, String> {
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
    let prog = program(eng, stage, key, paths, &work, &scratch_out)?;
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = supervised(eng, stage, &prog, &work, logf, lock, gpu_ids)?;
    let rusage_file = store.tmp_dir().join(format!("rusage-{}-{}.json", &key[..16], std::process::id()));
    let _ = std::fs::create_dir_all(store.tmp_dir());
    let _ = std::fs::remove_file(&rusage_file);
    cmd.env("RECFLOW_RUSAGE_OUT", &rusage_file);
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start stage process: {e}"))?;
    if let Some(pid) = child.id() {
        eng.children.lock().unwrap_or_else(|e| e.into_inner()).insert(stage.name.clone(), pid);
    }
    let bar = progress_bar(eng, stage);
    let seen = Arc::new(std::sync::Mutex::new(StageProgress::new(t0)));
    let ticker = eng.progress_interval.map(|every| tokio::spawn(progress_lines(eng.clone(), stage.name.clone(), log.clone(), seen.clone(), every)));
    let numerics = pump_events(eng, stage, &mut child, &log, &bar, &seen).await;
    if let Some(t) = ticker {
        t.abort();
    }
    let status = child.wait().await;
    bar.finish_and_clear();
    eng.mp.remove(&bar);
    eng.children.lock().unwrap_or_else(|e| e.into_inner()).remove(&stage.name);
    if let Some(p) = &prog.spec_tmp {
        let _ = std::fs::remove_file(p);
    }
    let rusage = std::fs::read(&rusage_file).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let _ = std::fs::remove_file(&rusage_file);
    let wall = t0.elapsed().as_secs_f64();
    log_line(&log, &format!("== recflow: exit {:?} after {wall:.2}s", status.as_ref().ok().and_then(|s| s.code())));
    if eng.cancel.load(Ordering::SeqCst) {
        return Err("cancelled".into());
    }
    let status = status.map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(failure(&status, &log));
    }
    Ok(Launched { scratch_out, numerics, rusage })
}

/// The program and arguments of a stage: for a built-in kind the worker
/// with a freshly written spec (its scratch `out_dir` emptied first), for a
/// shell stage `sh -c` with its declared outputs removed first.
fn program(
    eng: &Engine,
    stage: &ResolvedStage,
    key: &str,
    paths: &BTreeMap<String, Vec<PathBuf>>,
    work: &Path,
    scratch_out: &Path,
) -> Result<Program, String> {
    match &stage.action {
        Action::Builtin { kind, .. } => {
            remove_any(scratch_out);
            std::fs::create_dir_all(scratch_out).map_err(|e| format!("{}: {e}", scratch_out.display()))?;
            let spec = crate::worker::ExecSpec {
                kind: kind.clone(),
                stage: stage.name.clone(),
                config: stage.config_run.clone(),
                // Path-valued `with:` fields are hashed as inputs `with.FIELD`
                // but reach the stage through its config (absolute paths).
                inputs: paths.iter().filter(|(k, _)| !k.starts_with("with.")).map(|(k, v)| (k.clone(), v.clone())).collect(),
                out_dir: scratch_out.to_path_buf(),
                work_dir: work.to_path_buf(),
                seed: stage.seed,
                device: stage.device.clone().unwrap_or_else(|| "cpu".into()),
            };
            let text = serde_json::to_string_pretty(&spec).map_err(|e| e.to_string())?;
            let mut spec_tmp = None;
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
            Ok(Program { program: w, args: vec!["exec-stage".into(), spec_path.to_string_lossy().into_owned()], spec_tmp })
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
            Ok(Program { program: PathBuf::from("sh"), args: vec!["-c".into(), text], spec_tmp: None })
        }
    }
}

/// `recflow __supervise PID -- PROGRAM ARGS…` with the stage's environment:
/// stdout piped (the worker's events), stderr into the stage log, and the
/// key lock's descriptor inherited so the supervisor holds the lock too.
fn supervised(
    eng: &Engine,
    stage: &ResolvedStage,
    prog: &Program,
    work: &Path,
    logf: std::fs::File,
    lock: &FileLock,
    gpu_ids: &[u32],
) -> Result<tokio::process::Command, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("__supervise")
        .arg(std::process::id().to_string())
        .arg("--")
        .arg(&prog.program)
        .args(&prog.args)
        .current_dir(&eng.p.dir)
        .env("RECFLOW_WORK_DIR", work)
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
    Ok(cmd)
}

/// The stage's spinner/progress bar (hidden without a terminal).
pub(crate) fn progress_bar(eng: &Engine, stage: &ResolvedStage) -> ProgressBar {
    let bar = eng.mp.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{prefix:.bold} {spinner} [{bar:30}] {pos}/{len} {msg} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .progress_chars("=> "),
    );
    bar.set_prefix(stage.name.clone());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Every `every`: the stage's progress as one plain line appended to its
/// log and, when no bar is drawn (no terminal), printed too
/// ([`super::progress`]). Runs until the launcher aborts it.
async fn progress_lines(eng: Arc<Engine>, name: String, log: PathBuf, prog: Arc<std::sync::Mutex<StageProgress>>, every: std::time::Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let line = prog.lock().unwrap_or_else(|e| e.into_inner()).line(Instant::now());
        log_line(&log, &format!("== recflow: progress {line}"));
        if eng.mp.is_hidden() && !eng.quiet {
            eprintln!("{name}: {line}");
        }
    }
}

/// Reads the child's stdout to its end: `progress` events drive the bar
/// and the plain progress lines, `checkpoint` events wake whoever syncs the
/// work dir ([`Engine::checkpoints`]), `numerics` and `log` events (and any
/// other line) go to the stage log, warnings and errors also to the
/// terminal. Returns the reported profile.
async fn pump_events(
    eng: &Engine,
    stage: &ResolvedStage,
    child: &mut tokio::process::Child,
    log: &Path,
    bar: &ProgressBar,
    prog: &std::sync::Mutex<StageProgress>,
) -> Option<crate::numerics::Profile> {
    let mut numerics: Option<crate::numerics::Profile> = None;
    if let Some(out) = child.stdout.take() {
        let mut lines = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.get("progress").is_some() => {
                    let p = &v["progress"];
                    let total = p.get("total").and_then(|t| t.as_u64());
                    let done = p.get("done").and_then(|d| d.as_u64()).unwrap_or(0);
                    let unit = p.get("unit").and_then(|u| u.as_str()).unwrap_or("");
                    if let Some(t) = total {
                        bar.set_length(t);
                    }
                    bar.set_position(done);
                    bar.set_message(unit.to_string());
                    prog.lock().unwrap_or_else(|e| e.into_inner()).update(Instant::now(), done, total, unit);
                }
                Ok(v) if v.get("checkpoint").is_some() => {
                    log_line(log, &format!("== recflow: checkpoint saved {}", v["checkpoint"]));
                    if let Some(n) = &eng.checkpoints {
                        n.notify_one();
                    }
                }
                Ok(v) if v.get("numerics").is_some() => {
                    numerics = serde_json::from_value(v["numerics"].clone()).ok();
                    log_line(log, &format!("== recflow: numerics {}", numerics.as_ref().map(|p| p.summary()).unwrap_or_else(|| line.clone())));
                }
                Ok(v) if v.get("log").is_some() => {
                    let level = v["log"].get("level").and_then(|l| l.as_str()).unwrap_or("info").to_string();
                    let msg = v["log"].get("msg").and_then(|l| l.as_str()).unwrap_or("").to_string();
                    log_line(log, &format!("[{level}] {msg}"));
                    if level == "warn" || level == "error" {
                        eng.note(&format!("{}: {level}: {msg}", stage.name));
                    }
                }
                _ => log_line(log, &line),
            }
        }
    }
    numerics
}

/// A failed stage's line: its exit code, its log, and the log's last lines.
fn failure(status: &std::process::ExitStatus, log: &Path) -> String {
    format!("exit code {}{}", status.code().map(|c| c.to_string()).unwrap_or_else(|| "signal".into()), log_tail(log))
}

/// `; log PATH` and the log's last five lines of the stage's own (not the
/// runner's `== recflow` lines), indented under the message.
pub(crate) fn log_tail(log: &Path) -> String {
    let tail = std::fs::read_to_string(log).unwrap_or_default();
    let last: Vec<&str> = tail.lines().rev().filter(|l| !l.starts_with("== recflow")).take(5).collect();
    let last: Vec<&str> = last.into_iter().rev().collect();
    format!("; log {}{}", log.display(), if last.is_empty() { String::new() } else { format!("\n    {}", last.join("\n    ")) })
}
