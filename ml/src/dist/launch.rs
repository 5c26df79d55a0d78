//! The ranks of a data-parallel stage on one node, started and watched by
//! the `exec-stage` process that was asked to run the stage (the launcher).
//!
//! The launcher hosts the rendezvous store (a TCPStore on a free port, so no
//! port is guessed), starts `world_size` copies of itself
//! (`recflow-worker exec-stage SPEC`) with `RECFLOW_RANK`,
//! `RECFLOW_LOCAL_RANK`, `RECFLOW_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`
//! and the numerics profile with `threads ÷ world_size` intra-op threads
//! each, passes rank 0's event lines through to the runner and every
//! rank's stderr (prefixed `[rank r]`) into the stage log, and watches them:
//! * a rank that dies (a signal such as SIGKILL or the OOM killer's, or an
//!   exit other than 0) fails the stage at once: the others are killed and
//!   the error names the rank and how it ended — within the launcher's
//!   polling period, never after a collective timeout;
//! * no rank outlives the launcher: each arms `PR_SET_PDEATHSIG` (as every
//!   `exec-stage` does), and the runner's supervisor kills the process group
//!   the ranks share with the launcher;
//! * a stop signal (Ctrl-C, SIGTERM) reaches the ranks too; they agree at
//!   the next step boundary, rank 0 checkpoints, and all exit as cancelled.
//!
//! Outputs: rank 0 writes them (and `metrics.json`) into the stage's output
//! dir; the launcher returns rank 0's metrics.
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use recflow::dist::{Backend, ENV_LOCAL_RANK, ENV_RANK, ENV_WORLD_SIZE};
use recflow::stages::{Metrics, StageCtx};

use super::{Settings, Store};

/// How often the launcher looks at its ranks.
const POLL: Duration = Duration::from_millis(20);
/// Stderr lines kept per rank for the failure message.
const TAIL: usize = 6;

/// Starts the ranks, waits for them, returns rank 0's metrics (module doc).
pub fn run(kind: &str, config: serde_json::Value, s: Settings, backend: Backend, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    let w = s.world_size;
    if backend == Backend::Nccl {
        let n = tch::Cuda::device_count().max(0) as usize;
        if n < w {
            anyhow::bail!(
                "stage `{}`: world_size {w} with NCCL needs {w} GPUs on this node (one per rank), CUDA sees {n}; lower world_size, give the stage `resources: {{gpus: {w}}}`, or use distributed.backend gloo",
                ctx.stage
            );
        }
    }
    let store = Store::server(0, s.timeout)?;
    let spec = recflow::worker::ExecSpec {
        kind: kind.to_string(),
        stage: ctx.stage.clone(),
        config,
        inputs: ctx.inputs.clone(),
        out_dir: ctx.out_dir.clone(),
        work_dir: ctx.work_dir.clone(),
        seed: ctx.seed,
        device: ctx.device.clone(),
    };
    let spec_path = ctx.work_dir.join("ranks.spec.json");
    recflow::util::write_atomic(&spec_path, serde_json::to_string_pretty(&spec)?.as_bytes())?;
    let numerics = recflow::numerics::Request::from_env().map_err(|e| anyhow::anyhow!("{e}"))?.resolve();
    let per_rank = recflow::numerics::Resolved { threads: recflow::dist::rank_threads(numerics.threads, w), ..numerics };
    if numerics.threads < w as u32 {
        ctx.warn(format!("{} threads for {w} ranks: each rank runs 1 intra-op thread, and they share the cores", numerics.threads));
    }
    ctx.log(
        "info",
        format!("{}: {w} ranks over {} (store on port {}), {} intra-op threads each", ctx.stage, backend.name(), store.port(), per_rank.threads),
    );
    let exe = std::env::current_exe()?;
    let tails: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(vec![Vec::new(); w]));
    let mut ranks: Vec<Child> = Vec::with_capacity(w);
    let mut pumps = Vec::new();
    for r in 0..w {
        let mut cmd = Command::new(&exe);
        cmd.arg("exec-stage")
            .arg(&spec_path)
            .env(ENV_RANK, r.to_string())
            .env(ENV_LOCAL_RANK, r.to_string())
            .env(ENV_WORLD_SIZE, w.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", store.port().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        per_rank.apply(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut ranks);
                anyhow::bail!("stage `{}`: cannot start rank {r}: {e}", ctx.stage);
            }
        };
        if let Some(out) = child.stdout.take() {
            // Rank 0's events are the stage's; the others' go to the log.
            pumps.push(std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if r == 0 {
                        let mut o = std::io::stdout().lock();
                        let _ = writeln!(o, "{line}");
                        let _ = o.flush();
                    } else {
                        eprintln!("[rank {r}] {line}");
                    }
                }
            }));
        }
        if let Some(err) = child.stderr.take() {
            let tails = tails.clone();
            pumps.push(std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("[rank {r}] {line}");
                    let mut t = tails.lock().unwrap_or_else(|e| e.into_inner());
                    let v = &mut t[r];
                    if v.len() == TAIL {
                        v.remove(0);
                    }
                    v.push(line);
                }
            }));
        }
        ranks.push(child);
    }
    let outcome = watch(&mut ranks, ctx);
    for p in pumps {
        let _ = p.join();
    }
    drop(store);
    let _ = std::fs::remove_file(&spec_path);
    match outcome {
        Watched::Done => {
            let p = ctx.out_dir.join(recflow::worker::METRICS_FILE);
            let text = std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("rank 0 finished without {}: {e}", p.display()))?;
            Ok(serde_json::from_str(&text)?)
        }
        Watched::Cancelled => anyhow::bail!("{} cancelled: the ranks stopped at a step boundary; rank 0's checkpoint is in the work dir, a rerun continues from it", ctx.stage),
        Watched::Failed(ends) => {
            let tails = tails.lock().unwrap_or_else(|e| e.into_inner());
            let lines: Vec<String> = ends
                .iter()
                .map(|(r, how)| {
                    let last = tails[*r].iter().rev().find(|l| l.contains("error")).or(tails[*r].last());
                    format!("rank {r} of {w} {how}{}", last.map(|l| format!(" ({})", l.trim())).unwrap_or_default())
                })
                .collect();
            anyhow::bail!(
                "{}: {}; the other ranks were stopped. A rerun resumes from the last checkpoint in the work dir",
                ctx.stage,
                lines.join("; then ")
            )
        }
    }
}

enum Watched {
    Done,
    Cancelled,
    /// (rank, how it ended), the first failure first.
    Failed(Vec<(usize, String)>),
}

/// Waits until every rank exited 0, or one failed (then kills the rest).
fn watch(ranks: &mut [Child], ctx: &StageCtx) -> Watched {
    use std::os::unix::process::ExitStatusExt;
    let mut exited: Vec<Option<std::process::ExitStatus>> = vec![None; ranks.len()];
    let mut failed: Vec<(usize, String)> = Vec::new();
    let mut forwarded = false;
    loop {
        for (r, c) in ranks.iter_mut().enumerate() {
            if exited[r].is_some() {
                continue;
            }
            if let Ok(Some(st)) = c.try_wait() {
                exited[r] = Some(st);
                if !st.success() {
                    let how = match (st.code(), st.signal()) {
                        (_, Some(sig)) => format!("(pid {}) was killed by signal {sig} ({})", c.id(), signal_name(sig)),
                        (Some(130), _) if ctx.is_cancelled() => continue,
                        (Some(code), _) => format!("(pid {}) exited with code {code}", c.id()),
                        _ => format!("(pid {}) ended: {st}", c.id()),
                    };
                    failed.push((r, how));
                }
            }
        }
        if !failed.is_empty() {
            // A signal death first: the others then fail on their collectives.
            failed.sort_by_key(|(_, how)| !how.contains("signal"));
            stop(ranks);
            return Watched::Failed(failed);
        }
        if exited.iter().all(Option::is_some) {
            return if ctx.is_cancelled() { Watched::Cancelled } else { Watched::Done };
        }
        if ctx.is_cancelled() && !forwarded {
            // Usually the whole process group got the signal; say it again
            // to be sure (the ranks' handlers only set a flag).
            for c in ranks.iter() {
                // SAFETY: signals our own child process.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
            forwarded = true;
        }
        std::thread::sleep(super::launch::POLL);
    }
}

/// Kills (SIGKILL) and reaps every rank still running.
fn stop(ranks: &mut [Child]) {
    for c in ranks.iter_mut() {
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL; the OOM killer sends this too",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}
