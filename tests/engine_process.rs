//! Processes: kill -9 of the runner and of a stage's child then resume,
//! no orphans, two concurrent runs on one store, failures and
//! --keep-going, and a custom worker (describe --json, exec-stage, `all:`).
mod engine_common;
use std::time::Duration;

use engine_common::*;

/// `slow` counts to 6 in its work dir (a checkpoint), so a rerun resumes.
/// The background `sleep` is a grandchild: it must die with the runner.
fn slow_pipeline(marker: &str) -> String {
    format!(
        r#"
params:
  v: 1
stages:
  first:
    cmd: "echo x >> .count_first; echo 1 > first.txt"
    outs: [first.txt]
  slow:
    cmd: |
      sleep {marker} &
      echo $$ > "$RECFLOW_WORK_DIR/pid"
      s=$(cat "$RECFLOW_WORK_DIR/step" 2>/dev/null || echo 0)
      echo "start $s v${{params.v}}" >> .starts
      while [ $s -lt 6 ]; do s=$((s+1)); echo $s > "$RECFLOW_WORK_DIR/step"; sleep 0.25; done
      seq 1 6 > slow.txt
    deps: [first.txt]
    outs: [slow.txt]
"#
    )
}

fn step_of(p: &Proj) -> u32 {
    let mut best = 0;
    for e in std::fs::read_dir(p.path("cache/work")).into_iter().flatten().flatten() {
        let s: u32 = std::fs::read_to_string(e.path().join("step")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        best = best.max(s);
    }
    best
}

fn stage_pid(p: &Proj) -> Option<i32> {
    for e in std::fs::read_dir(p.path("cache/work")).into_iter().flatten().flatten() {
        if let Some(pid) = std::fs::read_to_string(e.path().join("pid")).ok().and_then(|s| s.trim().parse().ok()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn kill_runner_then_resume_and_no_orphans() {
    let p = Proj::new();
    let marker = "91.2345";
    p.write("p.yaml", &slow_pipeline(marker));
    let mut child = p.cmd(&["run", "p.yaml", "-q"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || step_of(&p) >= 2), "the slow stage makes progress");
    // SAFETY: signals the runner we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    assert!(
        wait_for(Duration::from_secs(10), || pids_with(marker).is_empty()),
        "no process of the stage (not even a background grandchild) survives the runner"
    );
    assert!(!p.path("slow.txt").exists(), "the killed stage recorded nothing");
    p.ok(&["run", "p.yaml", "-q"]);
    let starts = p.read(".starts");
    let resumed_at: u32 = starts.lines().nth(1).and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(resumed_at >= 2, "the rerun resumed from the work dir checkpoint: {starts}");
    assert_eq!(p.count("first"), 1, "the completed stage was reused");
    assert_eq!(p.read("slow.txt"), "1\n2\n3\n4\n5\n6\n", "final output equals an uninterrupted run's");
    assert!(std::fs::read_dir(p.path("cache/work")).map(|r| r.count()).unwrap_or(0) == 0, "work dir removed after success");

    // Now kill the stage's own process: the stage fails, then resumes.
    let mut child = p.cmd(&["run", "p.yaml", "-q", "--set", "params.v=2"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || step_of(&p) >= 2 && stage_pid(&p).is_some()), "second attempt progresses");
    let pid = stage_pid(&p).unwrap();
    // SAFETY: signals the stage shell our runner started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(1), "a killed stage is a failed stage (exit 1)");
    assert!(wait_for(Duration::from_secs(10), || pids_with(marker).is_empty()), "the killed stage leaves no orphans");
    p.ok(&["run", "p.yaml", "-q", "--set", "params.v=2"]);
    let last = p.read(".starts").lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("start ") && !last.starts_with("start 0"), "resumed after the child was killed: {last}");
    assert_eq!(p.read("slow.txt"), "1\n2\n3\n4\n5\n6\n", "same final output after resume");
}

#[test]
fn two_concurrent_runs_share_one_store() {
    let p = Proj::new();
    p.write(
        "p.yaml",
        r#"
stages:
  a:
    cmd: "echo x >> .count_a; sleep 0.5; echo a > a.txt"
    outs: [a.txt]
  b:
    cmd: "echo x >> .count_b; sleep 0.3; cat a.txt a.txt > b.txt"
    deps: [a.txt]
    outs: [b.txt]
"#,
    );
    let c1 = p.cmd(&["run", "p.yaml", "-q"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let c2 = p.cmd(&["run", "p.yaml", "-q"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let o1 = c1.wait_with_output().unwrap();
    let o2 = c2.wait_with_output().unwrap();
    assert!(o1.status.success() && o2.status.success(), "both concurrent runs succeed: {:?} {:?}", o1, o2);
    assert_eq!((p.count("a"), p.count("b")), (1, 1), "each key is computed once; the other run waits and reuses");
    assert_eq!(p.read("b.txt"), "a\na\n", "outputs are intact");
    p.ok(&["cache", "verify"]);
    p.ok(&["status", "p.yaml", "--check"]);
}

#[test]
fn failure_stops_dependents_and_keep_going_runs_the_rest() {
    let p = Proj::new();
    p.write(
        "p.yaml",
        r#"
stages:
  bad:
    cmd: "echo boom >&2; exit 3"
    outs: [bad.txt]
  after_bad:
    cmd: "cat bad.txt > x.txt"
    deps: [bad.txt]
    outs: [x.txt]
  other:
    cmd: "echo ok > other.txt"
    outs: [other.txt]
"#,
    );
    let o = p.run(&["run", "p.yaml", "--keep-going", "-j", "1"]);
    assert_eq!(o.status.code(), Some(1), "a failed stage gives exit 1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("exit code 3") && err.contains("boom"), "the error shows the exit code and log tail: {err}");
    assert_eq!(p.read("other.txt"), "ok\n", "--keep-going runs independent stages");
    assert!(!p.path("x.txt").exists(), "dependents of a failed stage do not run");
    let o = p.run(&["status", "p.yaml", "--check"]);
    assert_eq!(o.status.code(), Some(1), "failed stages stay stale");
}

#[test]
fn custom_worker_describes_and_runs_stages() {
    let bin = std::path::Path::new(BIN);
    let worker = bin.parent().unwrap().join("examples/custom_worker");
    assert!(
        worker.is_file(),
        "the custom_worker example must be built first (`cargo test` builds examples; with --test run `cargo build --example custom_worker`)"
    );
    let p = Proj::new();
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/custom_worker.yaml"))
        .unwrap()
        .replace("../target/debug/examples/custom_worker", worker.to_str().unwrap());
    p.write("p.yaml", &yaml);
    p.ok(&["run", "p.yaml", "-q"]);
    let joined = std::fs::read_to_string(p.path("runs/custom_worker/joined/joined.txt")).unwrap();
    assert_eq!(joined, "alpha\nbeta\nalpha\nalpha\nalpha\nbeta\nbeta\nbeta\n", "`all:` gathers every matrix expansion in order");
    let described = std::fs::read_dir(p.path("cache/describe")).unwrap().count();
    assert_eq!(described, 1, "describe --json is cached by the worker's hash");
    let lock = p.read("p.lock");
    assert!(lock.contains("\"lines_out\": 6"), "the stage's metrics are summarised in the lock");
    // An operational field stays out of the key; a real one does not.
    let out = p.ok(&["run", "p.yaml", "--set", "stages.scale.with.log_every=7"]);
    assert!(!out.contains(" ran "), "an operational field change reruns nothing: {out}");
    let out = p.ok(&["run", "p.yaml", "--set", "stages.scale.with.factor=5"]);
    // Both expansions now have the same key (factor 5): one runs, the other
    // waits on the key lock and reuses it — which one is a race.
    assert!(out.lines().any(|l| l.starts_with("scale@") && l.contains(" ran ")), "a keyed field reruns: {out}");
    assert!(out.lines().any(|l| l.starts_with("joined") && l.contains(" ran ")), "its consumer reruns: {out}");
    // Structural checks of a described kind.
    p.write("bad.yaml", &yaml.replace("text: ${make.text}", "txet: ${make.text}"));
    let o = p.run(&["run", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(2), "an unknown input of a custom kind is bad input");
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no input `txet`"), "names the input");
}

#[test]
fn ctrl_c_records_nothing_and_keeps_the_work_dir() {
    let p = Proj::new();
    let marker = "92.5432";
    p.write("p.yaml", &slow_pipeline(marker));
    let err = std::fs::File::create(p.path("run.err")).unwrap();
    let mut child = p.cmd(&["run", "p.yaml", "-q"]).stderr(err).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || step_of(&p) >= 1), "the slow stage starts");
    // SAFETY: signals the runner we started (what Ctrl-C delivers).
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "an interrupted run exits 130");
    assert!(p.read("run.err").contains("cancelled by SIGINT (Ctrl-C)"), "the error names the signal: {}", p.read("run.err"));
    assert!(wait_for(Duration::from_secs(10), || pids_with(marker).is_empty()), "Ctrl-C stops the stage's processes");
    assert!(!p.path("slow.txt").exists(), "the interrupted stage recorded no output");
    let lock = p.read("p.lock");
    assert!(lock.contains("\"first\"") && !lock.contains("\"slow\""), "only completed stages are in the lock: {lock}");
    assert!(step_of(&p) >= 1, "the work dir (checkpoint) is kept for resume");
}

#[test]
fn only_from_and_force_select_stages() {
    let p = Proj::new();
    p.write(
        "p.yaml",
        r#"
stages:
  a:
    cmd: "echo x >> .count_a; echo a > a.txt"
    outs: [a.txt]
  b:
    cmd: "echo x >> .count_b; cat a.txt > b.txt"
    deps: [a.txt]
    outs: [b.txt]
  c:
    cmd: "echo x >> .count_c; cat b.txt > c.txt"
    deps: [b.txt]
    outs: [c.txt]
"#,
    );
    let o = p.run(&["run", "p.yaml", "-q", "--only", "b"]);
    assert_eq!(o.status.code(), Some(1), "--only a stage whose upstream was never built fails");
    assert_eq!(p.count("b"), 0, "and does not run it");
    p.ok(&["run", "p.yaml", "-q"]);
    p.ok(&["run", "p.yaml", "-q", "--force", "b"]);
    assert_eq!([p.count("a"), p.count("b"), p.count("c")], [1, 2, 1], "--force reruns one stage; same output keeps c cached");
    p.ok(&["run", "p.yaml", "-q", "--from", "b"]);
    assert_eq!([p.count("a"), p.count("b"), p.count("c")], [1, 3, 2], "--from reruns the stage and its descendants");
    p.ok(&["run", "p.yaml", "-q", "--only", "c", "--force", "c"]);
    assert_eq!([p.count("a"), p.count("b"), p.count("c")], [1, 3, 3], "--only runs just the selection");

    // Downstream of the selection is left alone, built or not: `--only a` on
    // a fresh project succeeds and neither runs nor requires b and c.
    let q = Proj::new();
    q.write("p.yaml", &std::fs::read_to_string(p.path("p.yaml")).unwrap());
    let o = q.run(&["run", "p.yaml", "--only", "a"]);
    assert!(o.status.success(), "--only a needs nothing downstream: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!([q.count("a"), q.count("b"), q.count("c")], [1, 0, 0], "only the selection runs");
    assert!(String::from_utf8_lossy(&o.stdout).contains("not selected"), "the table says why b and c did not run");
}

#[test]
fn stage_defaults_files_and_extends() {
    let bin = std::path::Path::new(BIN);
    let worker = bin.parent().unwrap().join("examples/custom_worker");
    assert!(worker.is_file(), "the custom_worker example must be built first (`cargo build --example custom_worker`)");
    let p = Proj::new();
    p.write("stages/scale_lines.yaml", "factor: 2\nlog_every: 1\n");
    p.write("stages/triple.yaml", "extends: scale_lines.yaml\nfactor: 3\n");
    p.write("text.txt", "z\n");
    let yaml = format!(
        r#"
worker: {}
stages:
  two:
    uses: scale_lines
    inputs: {{text: text.txt}}
  three:
    uses: scale_lines
    extends: stages/triple.yaml
    inputs: {{text: text.txt}}
  own:
    uses: scale_lines
    inputs: {{text: text.txt}}
    with: {{factor: 1}}
"#,
        worker.display()
    );
    p.write("p.yaml", &yaml);
    p.ok(&["run", "p.yaml", "-q"]);
    let out = |s: &str| std::fs::read_to_string(p.path(&format!("runs/p/{s}/scaled.txt"))).unwrap_or_default().lines().count();
    assert_eq!(out("two"), 2, "stages/KIND.yaml defaults apply automatically");
    assert_eq!(out("three"), 3, "`extends:` picks another defaults file, which may extend the kind's");
    assert_eq!(out("own"), 1, "`with:` wins over defaults");
    // A custom kind's config is checked when the runner plans, from the
    // schema in its worker's (cached) `describe --json`: bad input, exit 2,
    // pointing at the field, before any stage runs.
    let records_before = std::fs::read_dir(p.path("cache/records")).unwrap().count();
    p.write("p.yaml", &yaml.replace("with: {factor: 1}", "with: {factor: 0}"));
    for args in [&["run", "p.yaml"][..], &["run", "p.yaml", "--dry-run"][..]] {
        let o = p.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "`{}`: a config outside the kind's schema is bad input: {err}", args.join(" "));
        assert!(err.contains("p.yaml:14:12"), "the error points at the field in `with:`: {err}");
        assert!(err.contains("`factor` must be ≥ 1"), "names the field and the bound: {err}");
    }
    p.write("p.yaml", &yaml.replace("with: {factor: 1}", "with: {factr: 2}"));
    let err = String::from_utf8_lossy(&p.run(&["run", "p.yaml"]).stderr).into_owned();
    assert!(err.contains("unknown field `factr`"), "an unknown field of a custom kind is caught at plan time: {err}");
    assert_eq!(std::fs::read_dir(p.path("cache/records")).unwrap().count(), records_before, "nothing ran or was recorded");
}

#[test]
fn two_pipelines_in_two_projects_share_one_store_via_recflow_cache() {
    let store = tempfile::tempdir().unwrap();
    let counter = store.path().join("runs.count");
    let (p1, p2) = (Proj::new(), Proj::new());
    let yaml = format!(
        "stages:\n  slow:\n    cmd: \"echo x >> {}; sleep 0.5; echo same > out.txt\"\n    outs: [out.txt]\n",
        counter.display()
    );
    p1.write("one.yaml", &yaml);
    p2.write("two.yaml", &yaml);
    let spawn = |p: &Proj, f: &str| {
        p.cmd(&["run", f, "-q"]).env("RECFLOW_CACHE", store.path()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let (c1, c2) = (spawn(&p1, "one.yaml"), spawn(&p2, "two.yaml"));
    let (o1, o2) = (c1.wait_with_output().unwrap(), c2.wait_with_output().unwrap());
    assert!(o1.status.success() && o2.status.success(), "both runs succeed: {o1:?} {o2:?}");
    let n = std::fs::read_to_string(&counter).unwrap_or_default().lines().count();
    assert_eq!(n, 1, "the shared key ran once; the other pipeline waited and reused it");
    assert_eq!((p1.read("out.txt"), p2.read("out.txt")), ("same\n".into(), "same\n".into()), "both workspaces get the output");
    assert!(!p1.path("cache").exists(), "RECFLOW_CACHE moves the store out of the project");
}

/// Objects in the store (each one is written by a commit).
fn object_count(p: &Proj) -> usize {
    store_objects(p.dir.path()).len()
}

/// A stage whose output is a directory of `N_FILES` distinct files, so that
/// committing it (one fsynced object per file, then the manifest, the
/// record and the lock) takes long enough to kill the runner inside it.
/// `v` changes every file's content: each attempt commits new objects.
const N_FILES: usize = 1000;
fn many_files_pipeline(v: u32) -> String {
    format!(
        r#"
stages:
  first:
    cmd: "echo x >> .count_first; echo 1 > first.txt"
    outs: [first.txt]
  many:
    cmd: 'mkdir -p many; i=0; while [ $i -lt {N_FILES} ]; do echo "$i v{v}" > many/f$i.txt; i=$((i+1)); done; echo {v} > many.done'
    deps: [first.txt]
    outs: [many, many.done]
  after:
    cmd: "ls many | wc -l > after.txt; cat many/f7.txt many.done >> after.txt"
    deps: [many, many.done]
    outs: [after.txt]
"#
    )
}

/// Every file under `dir` with its bytes, sorted by relative path.
fn tree_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                v.push((rel, std::fs::read(e.path()).unwrap_or_default()));
            }
        }
    }
    v.sort();
    v
}

#[test]
fn kill_runner_while_it_commits_outputs_then_rerun() {
    // Reference: an uninterrupted run in a project of its own.
    let reference = Proj::new();
    let p = Proj::new();
    // The upstream stage completes first, so every kill below lands in `many`'s commit.
    let full = many_files_pipeline(0);
    p.write("p.yaml", &full[..full.find("  many:").unwrap()]);
    p.ok(&["run", "p.yaml", "-q"]);
    // Kill points, as fractions of the objects this attempt commits: the
    // first object, the middle, the last files (then manifest, record, lock).
    for (v, frac) in [(1u32, 0.0), (2, 0.5), (3, 0.97)] {
        reference.write("p.yaml", &many_files_pipeline(v));
        reference.ok(&["run", "p.yaml", "-q"]);
        p.write("p.yaml", &many_files_pipeline(v));
        let before = object_count(&p);
        let target = before + 1 + (frac * N_FILES as f64) as usize;
        let mut child = p.cmd(&["run", "p.yaml", "-q"]).stderr(std::process::Stdio::null()).spawn().unwrap();
        // Poll tightly: the commit of one attempt takes a fraction of a second to seconds.
        let t0 = std::time::Instant::now();
        while object_count(&p) < target && t0.elapsed() < Duration::from_secs(120) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // SAFETY: signals the runner we started.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        // Whatever the kill interrupted, the store holds only whole objects.
        let o = p.run(&["cache", "verify"]);
        assert!(
            o.status.success(),
            "v{v}: a runner killed while committing leaves no corrupt object: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        p.ok(&["run", "p.yaml", "-q"]);
        assert_eq!(p.count("first"), 1, "v{v}: the completed upstream stage is reused, never rerun");
        assert_eq!(
            tree_bytes(&p.path("many")),
            tree_bytes(&reference.path("many")),
            "v{v}: the directory output equals an uninterrupted run's"
        );
        assert_eq!(p.read("after.txt"), reference.read("after.txt"), "v{v}: the downstream output equals an uninterrupted run's");
        assert_eq!(p.read("many.done"), format!("{v}\n"), "v{v}: the second output of the stage is there");
        let o = p.run(&["cache", "verify"]);
        assert!(o.status.success(), "v{v}: the store is intact after the rerun: {}", String::from_utf8_lossy(&o.stdout));
        p.ok(&["status", "p.yaml", "--check"]);
        let again = p.ok(&["run", "p.yaml"]);
        assert!(!again.contains(" ran "), "v{v}: after the rerun everything is cached: {again}");
    }
}

#[test]
fn stages_receive_the_resolved_store_location() {
    let p = Proj::new();
    p.write(
        "p.yaml",
        "stages:\n  where:\n    cmd: 'printf \"%s\" \"$RECFLOW_CACHE\" > where.txt'\n    outs: [where.txt]\n",
    );
    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(
        p.read("where.txt"),
        p.path("cache").to_string_lossy(),
        "the default store (project root's cache/) is exported as RECFLOW_CACHE"
    );
    let store = tempfile::tempdir().unwrap();
    let o = p.cmd(&["run", "p.yaml", "-q"]).env("RECFLOW_CACHE", store.path()).output().unwrap();
    assert!(o.status.success(), "run with a moved store: {o:?}");
    assert_eq!(p.read("where.txt"), store.path().to_string_lossy(), "a store moved by RECFLOW_CACHE is what stages see");
    // verify re-executes into a scratch store, but stages still see the
    // project's store (the teacher's response cache must be reused, not re-bought).
    let o = p.cmd(&["verify", "p.yaml"]).env("RECFLOW_CACHE", store.path()).output().unwrap();
    assert!(o.status.success(), "verify sees the same RECFLOW_CACHE as the run: {}", String::from_utf8_lossy(&o.stdout));
}

/// A stage that needs time to save on SIGTERM (a training stage writing its
/// cancel checkpoint) gets it: the supervisor waits `RECFLOW_STOP_GRACE_S`
/// (default 30 s) before SIGKILL. A second Ctrl-C kills at once.
#[test]
fn stop_grace_lets_a_stage_save_and_a_second_ctrl_c_kills_at_once() {
    let pipeline = |delay: u32| {
        format!(
            r#"
stages:
  train:
    cmd: |
      trap 'echo term > "$RECFLOW_WORK_DIR/term"; sleep {delay}; echo saved > "$RECFLOW_WORK_DIR/saved"; exit 130' TERM
      echo 1 > "$RECFLOW_WORK_DIR/step"
      while true; do sleep 0.05; done
    outs: [out.txt]
"#
        )
    };
    let work_file = |p: &Proj, name: &str| {
        std::fs::read_dir(p.path("cache/work")).into_iter().flatten().flatten().any(|e| e.path().join(name).exists())
    };
    // 1. One Ctrl-C: the stage's 4 s save (longer than the old 3 s grace) completes.
    let p = Proj::new();
    p.write("p.yaml", &pipeline(4));
    let mut child = p.cmd(&["run", "p.yaml", "-q"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || step_of(&p) >= 1), "the stage starts");
    // SAFETY: signals the runner we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(work_file(&p, "saved"), "the stage finished saving within the grace period");
    // 2. A second Ctrl-C while the stage saves: killed, the 20 s save never completes.
    let p = Proj::new();
    p.write("p.yaml", &pipeline(20));
    let mut child = p.cmd(&["run", "p.yaml", "-q"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || step_of(&p) >= 1), "the stage starts");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(wait_for(Duration::from_secs(20), || work_file(&p, "term")), "the stage got SIGTERM");
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!work_file(&p, "saved"), "the second Ctrl-C killed the stage before its save finished");
}

/// Issue 18: every stage's run record holds its process's CPU seconds (user
/// + system, its waited-for children included) and peak RSS, from the
/// supervisor's `wait4`; `recflow show` prints both per stage. Nothing of
/// it enters the lock (they are timing keys).
#[test]
fn issue18_run_records_hold_cpu_seconds_and_peak_rss() {
    let p = Proj::new();
    // A busy loop of the shell: some CPU time and the shell's resident memory.
    p.write(
        "p.yaml",
        r#"
stages:
  burn:
    cmd: "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo $i > n.txt"
    outs: [n.txt]
"#,
    );
    p.ok(&["run", "p.yaml"]);
    let rec = std::fs::read_dir(p.path("cache/records")).unwrap().next().unwrap().unwrap().path();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    let cpu = v["metrics"]["cpu_s"].as_f64().expect("cpu_s in the run record");
    let rss = v["metrics"]["peak_rss_bytes"].as_u64().expect("peak_rss_bytes in the run record");
    assert!(cpu > 0.05 && cpu < v["wall_s"].as_f64().unwrap() * 2.5 + 1.0, "a busy loop's CPU seconds: {cpu}");
    assert!(rss > 100_000, "the shell's resident memory: {rss}");
    let lock = p.read("p.lock");
    assert!(!lock.contains("cpu_s") && !lock.contains("peak_rss"), "machine measures stay out of the lock: {lock}");
    let shown = p.ok(&["show", "p.yaml", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(s["stages"][0]["cpu_s"].as_f64(), Some(cpu), "show reads them from the run record");
    assert_eq!(s["stages"][0]["peak_rss_bytes"].as_u64(), Some(rss));
}

/// The stage logs of a project's store and their text.
fn stage_logs(p: &Proj) -> Vec<String> {
    std::fs::read_dir(p.path("cache/logs")).into_iter().flatten().flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect()
}

/// Issue 16, part 6: without a terminal (here: pipes) the bars draw nothing,
/// so every `--progress-interval` seconds a running stage's progress (done,
/// rate, ETA) is a plain line on stderr and in its log — there already while
/// the stage runs, as `tail -f` on a compute node would show it.
#[test]
fn progress_without_a_terminal_is_printed_and_logged_while_running() {
    let pipeline = r#"
stages:
  count:
    cmd: |
      i=0
      while [ $i -lt 12 ]; do i=$((i+1)); echo "{\"progress\": {\"done\": $i, \"total\": 12, \"unit\": \"item\"}}"; sleep 0.25; done
      echo done > out.txt
    outs: [out.txt]
"#;
    let p = Proj::new();
    p.write("p.yaml", pipeline);
    let child = p
        .cmd(&["run", "p.yaml", "--progress-interval", "0.5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start recflow");
    let mut child = child;
    let seen_while_running = wait_for(Duration::from_secs(20), || {
        stage_logs(&p).iter().any(|l| l.contains("== recflow: progress ") && l.contains("/12 item (")) && child.try_wait().ok().flatten().is_none()
    });
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "the run succeeds: {}", String::from_utf8_lossy(&out.stderr));
    assert!(seen_while_running, "the stage log shows progress while the stage runs");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("count: ") && l.contains("/12 item (")).collect();
    assert!(lines.len() >= 2, "one line per interval on stderr without a terminal:\n{err}");
    assert!(lines.iter().any(|l| l.contains(" item/s, eta ")), "a line gives rate and ETA once known:\n{err}");
    // --progress-interval 0 turns the lines off (stderr and log alike).
    let q = Proj::new();
    q.write("p.yaml", pipeline);
    let out = q.run(&["run", "p.yaml", "--progress-interval", "0"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("/12 item"), "no progress lines with interval 0");
    assert!(stage_logs(&q).iter().all(|l| !l.contains("== recflow: progress")), "nor in the log");
    let bad = q.run(&["run", "p.yaml", "--progress-interval", "-1"]);
    assert_eq!(bad.status.code(), Some(2), "a negative interval is bad input");
}

/// Start and end times (ns) each stage of `cores_pipeline` wrote.
fn spans(p: &Proj) -> Vec<(u128, u128)> {
    ["a", "b"]
        .iter()
        .map(|s| {
            let t: Vec<u128> = p.read(&format!("{s}.txt")).split_whitespace().filter_map(|x| x.parse().ok()).collect();
            assert_eq!(t.len(), 2, "stage {s} wrote its start and end");
            (t[0], t[1])
        })
        .collect()
}

/// Two independent stages that each sleep a second; `cpus` (when given)
/// asks for more cores than any machine has, so each needs all of them.
fn cores_pipeline(cpus: &str) -> String {
    let mut y = String::from("stages:\n");
    for s in ["a", "b"] {
        y.push_str(&format!("  {s}:\n    cmd: \"t0=$(date +%s%N); sleep 1; echo $t0 $(date +%s%N) > {s}.txt\"\n    outs: [{s}.txt]\n{cpus}"));
    }
    y
}

#[test]
fn stages_that_need_every_core_take_turns_under_jobs_2() {
    // Without a claim the two stages run side by side (the control) …
    let p = Proj::new();
    p.write("p.yaml", &cores_pipeline(""));
    p.ok(&["run", "p.yaml", "-q", "--jobs", "2"]);
    let s = spans(&p);
    assert!(s[0].0 < s[1].1 && s[1].0 < s[0].1, "without `cpus` both stages ran at once: {s:?}");
    // … with `resources.cpus` above the machine's cores each holds every
    // core, so the second starts only once the first has ended.
    let p = Proj::new();
    p.write("p.yaml", &cores_pipeline("    resources: {cpus: 4096}\n"));
    p.ok(&["run", "p.yaml", "-q", "--jobs", "2"]);
    let s = spans(&p);
    assert!(s[0].1 <= s[1].0 || s[1].1 <= s[0].0, "stages that need every core never overlap: {s:?}");
    // The second stage waited about a second for the cores; its run record's
    // wall time is its own second, not the wait as well.
    let v: serde_json::Value = serde_json::from_str(&p.ok(&["show", "p.yaml", "--json"])).unwrap();
    for st in v["stages"].as_array().unwrap() {
        let wall = st["wall_s"].as_f64().unwrap();
        assert!(wall < 1.9, "a stage's recorded wall time leaves out its wait for cores: {st}");
    }
}

#[test]
fn a_run_waiting_on_another_runs_key_stops_at_sigterm() {
    let p = Proj::new();
    let marker = "93.4567";
    p.write("p.yaml", &format!("stages:\n  long:\n    cmd: \"sleep {marker}; echo > long.txt\"\n    outs: [long.txt]\n"));
    let mut holder = p.cmd(&["run", "p.yaml", "-q"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || !pids_with(marker).is_empty()), "the first run starts its stage");
    let err = std::fs::File::create(p.path("waiter.err")).unwrap();
    let mut waiter = p.cmd(&["run", "p.yaml"]).stderr(err).spawn().unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || p.read("waiter.err").contains("waiting")),
        "the second run waits on the key: {}",
        p.read("waiter.err")
    );
    // SAFETY: signals the runner we started (what `kill` or a scheduler delivers).
    unsafe { libc::kill(waiter.id() as i32, libc::SIGTERM) };
    let stopped = wait_for(Duration::from_secs(10), || waiter.try_wait().ok().flatten().is_some());
    // SAFETY: the first run and (if it hangs) the second are ours.
    unsafe {
        libc::kill(holder.id() as i32, libc::SIGKILL);
        libc::kill(waiter.id() as i32, libc::SIGKILL);
    }
    let _ = holder.wait();
    let st = waiter.wait().unwrap();
    assert!(stopped, "a run waiting on another run's key lock ends at SIGTERM, not when the other run finishes");
    assert_eq!(st.code(), Some(130), "a stopped run exits 130: {}", p.read("waiter.err"));
    assert!(p.read("waiter.err").contains("cancelled by SIGTERM"), "the error names the signal: {}", p.read("waiter.err"));
    assert!(wait_for(Duration::from_secs(10), || pids_with(marker).is_empty()), "no stage process survives");
}
