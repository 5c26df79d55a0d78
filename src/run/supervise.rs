//! The stage supervisor: `recflow __supervise PARENT_PID -- PROGRAM ARGS…`.
//!
//! Why a supervisor: `PR_SET_PDEATHSIG` only reaches the runner's direct
//! child, but a shell stage forks grandchildren. The supervisor asks for
//! SIGTERM when the runner dies (even by `kill -9`), puts the stage in its
//! own process group, and on that signal — or Ctrl-C, or the stage's exit —
//! kills the whole group. It also holds the stage key's lock descriptor, so
//! the lock is free only once no process of the stage is alive.
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
            if let Ok(Some(st)) = child.try_wait() {
                // Stragglers the stage left in the background die with it.
                kill_group(libc::SIGKILL);
                return exit_code(st);
            }
            continue;
        }
        // Stop: polite first, then certain — after the grace period or at
        // a second stop signal, whichever comes first.
        kill_group(libc::SIGTERM);
        let deadline = Instant::now() + grace();
        loop {
            if let Ok(Some(_)) = child.try_wait() {
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
        let _ = child.wait();
        return 130;
    }
}
