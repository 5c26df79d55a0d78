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
    let mut child = p.cmd(&["run", "p.yaml", "-q"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(20), || step_of(&p) >= 1), "the slow stage starts");
    // SAFETY: signals the runner we started (what Ctrl-C delivers).
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "an interrupted run exits 130");
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
    p.write("p.yaml", &yaml.replace("with: {factor: 1}", "with: {factor: 0}"));
    let o = p.run(&["run", "p.yaml"]);
    // A custom kind's config is checked by its worker (the runner only has
    // its described structure): the stage fails and shows the kind's message.
    assert_eq!(o.status.code(), Some(1), "a config the custom kind rejects fails the stage");
    assert!(String::from_utf8_lossy(&o.stderr).contains("`factor` must be between 1 and 1000"), "the kind's own message is shown");
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
