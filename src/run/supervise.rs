//! The stage supervisor: `recflow __supervise PARENT_PID -- PROGRAM ARGS…`.
//!
//! Why a supervisor: `PR_SET_PDEATHSIG` only reaches the runner's direct
//! child, but a shell stage forks grandchildren. The supervisor asks for
//! SIGTERM when the runner dies (even by `kill -9`), puts the stage in its
//! own process group, and on that signal — or Ctrl-C, or the stage's exit —
//! kills the whole group. It also holds the stage key's lock descriptor, so
//! the lock is free only once no process of the stage is alive.
//!
//! Resources: it reaps the stage with `wait4`, whose `rusage` covers the
//! stage process and the descendants it waited for, and writes the user +
//! system CPU seconds and the peak resident memory to the file named by
//! `RECFLOW_RUSAGE_OUT` (`{"cpu_s": …, "peak_rss_bytes": …}`); the runner
//! puts them into the run record (never into outputs).
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// Default grace between SIGTERM and SIGKILL for a stopping stage: long
/// enough for a training stage to finish writing its cancel checkpoint of a
/// large model (issue 6); a second stop signal (a second Ctrl-C) kills at once.
const DEFAULT_GRACE_S: f64 = 30.0;

/// The grace period: `RECFLOW_STOP_GRACE_S` (seconds, ≥ 0) or the default.
fn grace() -> Duration {
    std::env::var("RECFLOW_STOP_GRACE_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs_f64(DEFAULT_GRACE_S))
}

fn sigset(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for &g in sigs {
            libc::sigaddset(&mut s, g);
        }
        s
    }
}

/// Reaps `pid` if it has exited (`wait4`, no hang): its exit status and
/// resource usage.
fn reap(pid: i32) -> Option<(std::process::ExitStatus, libc::rusage)> {
    use std::os::unix::process::ExitStatusExt;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; wait4 fills it and the status for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits (without blocking) for our own child `pid`.
    let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    (r == pid).then(|| (std::process::ExitStatus::from_raw(status), ru))
}

/// Writes the stage's CPU seconds and peak RSS where the runner asked.
fn write_rusage(ru: &libc::rusage) {
    let Some(path) = std::env::var_os("RECFLOW_RUSAGE_OUT") else { return };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let v = serde_json::json!({
        "cpu_s": secs(ru.ru_utime) + secs(ru.ru_stime),
        // Linux reports ru_maxrss in KiB.
        "peak_rss_bytes": ru.ru_maxrss as u64 * 1024,
    });
    let _ = std::fs::write(path, v.to_string());
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(9))
}

/// Runs the supervisor; returns the exit code (the stage's, or 130 when stopped).
pub fn main(args: &[String]) -> i32 {
    let (Some(ppid), Some(sep)) = (args.first().and_then(|p| p.parse::<i32>().ok()), args.get(1)) else {
        eprintln!("usage: recflow __supervise PARENT_PID -- PROGRAM ARGS...");
        return 2;
    };
    if sep != "--" || args.len() < 3 {
        eprintln!("usage: recflow __supervise PARENT_PID -- PROGRAM ARGS...");
        return 2;
    }
    let waited = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];
    let set = sigset(&waited);
    // SAFETY: prctl/getppid/sigprocmask take plain integers or our own sigset.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
        if libc::getppid() != ppid {
            // The runner died before we armed the signal.
            return 137;
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut cmd = Command::new(&args[2]);
    cmd.args(&args[3..]).process_group(0);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let empty = sigset(&[]);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot start {}: {e}", args[2]);
            return 127;
        }
    };
    let pgid = child.id() as i32;
    let kill_group = |sig: libc::c_int| {
        // SAFETY: signals our own child's process group.
        unsafe {
            libc::kill(-pgid, sig);
        }
    };
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits for one of the blocked signals in `set`.
        let r = unsafe { libc::sigwait(&set, &mut sig) };
        if r != 0 {
            continue;
        }
        if sig == libc::SIGCHLD {
            if let Some((st, ru)) = reap(pgid) {
                // Stragglers the stage left in the background die with it.
                kill_group(libc::SIGKILL);
                write_rusage(&ru);
                return exit_code(st);
            }
            continue;
        }
        // Stop: polite first, then certain — after the grace period or at
        // a second stop signal, whichever comes first.
        kill_group(libc::SIGTERM);
        let deadline = Instant::now() + grace();
        let mut reaped = false;
        loop {
            if reap(pgid).is_some() {
                reaped = true;
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let wait = left.min(Duration::from_millis(20));
            let ts = libc::timespec { tv_sec: 0, tv_nsec: wait.as_nanos() as libc::c_long };
            // SAFETY: waits up to `ts` for one of the blocked signals in `set`.
            let got = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
            if got == libc::SIGTERM || got == libc::SIGINT || got == libc::SIGHUP {
                break;
            }
        }
        kill_group(libc::SIGKILL);
        if !reaped {
            let _ = child.wait();
        }
        return 130;
    }
}
