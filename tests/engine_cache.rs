//! Caching semantics of the engine, driven through the real binary with
//! shell stages: the change matrix, early cutoff, renames, corruption,
//! status without data, verify, secrets, matrix names.
mod engine_common;
use engine_common::*;

/// in.txt → a → b → c, and a → d. `tag` changes a's command but not its
/// output; `k` only feeds b.
const CHAIN: &str = r#"
name: chain
params:
  tag: t1
  k: 1
stages:
  a:
    cmd: "echo x >> .count_a; cat in.txt > a.txt # ${params.tag}"
    deps: [in.txt]
    outs: [a.txt]
  b:
    cmd: "echo x >> .count_b; cat a.txt > b.txt; echo ${params.k} >> b.txt"
    deps: [a.txt]
    outs: {out: b.txt}
  c:
    cmd: "echo x >> .count_c; wc -l < ${b.out} > c.txt"
    outs: [c.txt]
  d:
    cmd: "echo x >> .count_d; cat a.txt a.txt > d.txt"
    deps: [a.txt]
    outs: [d.txt]
"#;

fn counts(p: &Proj) -> [usize; 4] {
    [p.count("a"), p.count("b"), p.count("c"), p.count("d")]
}

#[test]
fn change_matrix() {
    let p = Proj::new();
    p.write("in.txt", "hello\n");
    p.write("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(counts(&p), [1, 1, 1, 1], "first run runs every stage once");
    assert_eq!(p.read("c.txt").trim(), "2", "c sees b's output through ${{b.out}}");

    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(counts(&p), [1, 1, 1, 1], "a no-op rerun runs nothing");

    // Touch without changing content: the stat cache rehashes, the key stays.
    std::thread::sleep(std::time::Duration::from_millis(20));
    p.write("in.txt", "hello\n");
    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(counts(&p), [1, 1, 1, 1], "rewriting a file with the same content reruns nothing");

    // A param only b uses: b reruns, c (b's output changed) too; a and d not.
    p.ok(&["run", "p.yaml", "-q", "--set", "params.k=2"]);
    assert_eq!(counts(&p), [1, 2, 2, 1], "a param reruns only its dependents");

    // Upstream reruns with identical output: downstream cached (early cutoff).
    p.ok(&["run", "p.yaml", "-q", "--set", "params.k=2", "--set", "params.tag=t2"]);
    assert_eq!(counts(&p), [2, 2, 2, 1], "a reran with the same output: b, c, d stay cached");

    // Changing upstream content reruns everything downstream.
    p.write("in.txt", "hello\nworld\n");
    p.ok(&["run", "p.yaml", "-q", "--set", "params.k=2", "--set", "params.tag=t2"]);
    assert_eq!(counts(&p), [3, 3, 3, 2], "changed input content reruns its dependents");
    assert_eq!(p.read("c.txt").trim(), "3", "downstream sees the new content");

    // Going back to an earlier configuration is served from the store.
    p.write("in.txt", "hello\n");
    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(counts(&p), [3, 3, 3, 2], "a configuration seen before is reused from the store");
    assert_eq!(p.read("b.txt"), "hello\n1\n", "outputs restored into the workspace from the store");
}

#[test]
fn explain_names_the_changed_field_and_renames_are_reused() {
    let p = Proj::new();
    p.write("in.txt", "hello\n");
    p.write("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml", "-q"]);
    let out = p.ok(&["explain", "p.yaml", "b", "--set", "params.k=5"]);
    assert!(out.contains("shell command") && out.contains("echo 5"), "explain shows the changed command: {out}");
    let out = p.ok(&["explain", "p.yaml", "a"]);
    assert!(out.contains("up to date"), "unchanged stage is explained as up to date: {out}");
    p.write("in.txt", "other\n");
    let out = p.ok(&["explain", "p.yaml", "a"]);
    assert!(out.contains("content of input `in.txt`"), "explain names the changed input: {out}");
    p.write("in.txt", "hello\n");

    // Rename d → d2: same key, so status says so and run reuses it.
    p.write("p.yaml", &CHAIN.replace("  d:\n", "  d2:\n"));
    let st = p.run(&["status", "p.yaml"]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("same key as former stage `d`"), "a rename is explained: {text}");
    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(p.count("d"), 1, "a renamed stage reuses its outputs");
    let lock = p.read("p.lock");
    assert!(lock.contains("\"d2\"") && !lock.contains("\"d\":"), "the lock follows the rename after a complete run");
}

#[test]
fn corrupted_object_is_detected_and_rebuilt() {
    let p = Proj::new();
    p.write("in.txt", "hello\n");
    p.write("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml", "-q"]);
    // Corrupt the object behind d.txt (through the store, as a disk error would).
    let sha = {
        let lock: serde_json::Value = serde_json::from_str(&p.read("p.lock")).unwrap();
        lock["stages"]["d"]["outputs"]["d.txt"]["id"].as_str().unwrap().trim_start_matches("sha256:").to_string()
    };
    let obj = p.path(&format!("cache/objects/{}/{}", &sha[..2], sha));
    assert!(obj.exists(), "d.txt's object is in the store");
    let _ = std::fs::remove_file(&obj);
    std::fs::write(&obj, "garbage").unwrap();
    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(p.count("d"), 2, "a corrupt output object makes its stage run again");
    assert_eq!(p.read("d.txt"), "hello\nhello\n", "the rebuilt output is correct");
    assert_eq!(std::fs::read_to_string(&obj).unwrap(), "hello\nhello\n", "the object is healthy again");

    // cache verify finds corruption by rehashing everything.
    let sha_c = {
        let lock: serde_json::Value = serde_json::from_str(&p.read("p.lock")).unwrap();
        lock["stages"]["c"]["outputs"]["c.txt"]["id"].as_str().unwrap().trim_start_matches("sha256:").to_string()
    };
    let objc = p.path(&format!("cache/objects/{}/{}", &sha_c[..2], sha_c));
    let _ = std::fs::remove_file(&objc);
    std::fs::write(&objc, "bad").unwrap();
    let o = p.run(&["cache", "verify"]);
    assert_eq!(o.status.code(), Some(1), "cache verify exits 1 on corruption");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&sha_c), "cache verify names the corrupt object");
    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(p.count("c"), 2, "the stage whose object was removed runs again");
    p.ok(&["cache", "verify"]);
}

#[test]
fn status_check_works_without_data_and_catches_changes() {
    let p = Proj::new();
    p.write("in.txt", "hello\n");
    p.write("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml", "-q"]);
    p.ok(&["status", "p.yaml", "--check"]);
    // A CI checkout without the data (and without the store).
    for f in ["in.txt", "a.txt", "b.txt", "c.txt", "d.txt"] {
        let _ = std::fs::remove_file(p.path(f));
    }
    std::fs::remove_dir_all(p.path("cache")).unwrap();
    let o = p.run(&["status", "p.yaml", "--check"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "without data, recorded hashes are trusted: {text}");
    assert!(text.contains("trusted recorded hashes"), "status says it trusted the lock: {text}");
    let o = p.run(&["status", "p.yaml", "--check", "--set", "params.k=9"]);
    assert_eq!(o.status.code(), Some(1), "a changed param makes --check fail");
    let js = p.run(&["status", "p.yaml", "--json", "--set", "params.k=9"]);
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).expect("status --json is JSON");
    let stale: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["up_to_date"] == false)
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stale, vec!["b", "c"], "only the param's dependents are stale");
}

#[test]
fn verify_catches_a_nondeterministic_stage_and_tolerance_accepts_close_numbers() {
    let p = Proj::new();
    p.write(
        "p.yaml",
        r#"
stages:
  det:
    cmd: "echo stable > det.txt"
    outs: [det.txt]
  nondet:
    cmd: "cat /proc/sys/kernel/random/uuid > nondet.txt"
    outs: [nondet.txt]
  metric:
    cmd: |
      s=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
      awk -v s=$s 'BEGIN{printf "{\"rmse\": %.12f}", 1 + (s + 1) * 1e-12}' > metrics.json
    outs: [metrics.json]
"#,
    );
    p.ok(&["run", "p.yaml", "-q"]);
    let before = p.read("nondet.txt");
    p.ok(&["verify", "p.yaml", "--stage", "det"]);
    let o = p.run(&["verify", "p.yaml", "--stage", "nondet", "--stage", "det"]);
    assert_eq!(o.status.code(), Some(1), "verify exits 1 when an output differs");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("nondet.nondet.txt") && !out.contains("det.det.txt"), "verify names exactly the differing output: {out}");
    assert_eq!(p.read("nondet.txt"), before, "verify leaves the workspace outputs as locked");
    p.ok(&["status", "p.yaml", "--check"]);
    let o = p.run(&["verify", "p.yaml", "--stage", "metric"]);
    assert_eq!(o.status.code(), Some(1), "bit-level verify sees the metric's last digits change");
    p.ok(&["verify", "p.yaml", "--stage", "metric", "--tolerance", "1e-6"]);
}

#[test]
fn env_values_never_reach_lock_or_store() {
    let p = Proj::new();
    let secret = "sekrit-VALUE-93c1f0";
    p.write(
        "p.yaml",
        r#"
stages:
  uses_env:
    cmd: "printf '%s' '${env:RF_TEST_SECRET}' | wc -c > n.txt"
    outs: [n.txt]
"#,
    );
    let o = p.cmd(&["run", "p.yaml", "-q"]).env("RF_TEST_SECRET", secret).output().unwrap();
    assert!(o.status.success(), "run with the env var set: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(p.read("n.txt").trim(), secret.len().to_string(), "the command saw the value");
    let leaks = files_containing(&p.all_files(), secret);
    assert!(leaks.is_empty(), "the env value appears in no file of the project or store: {leaks:?}");
    assert!(p.read("p.lock").contains("RF_TEST_SECRET"), "the lock names the variable (with a hash)");
    let o = p.cmd(&["status", "p.yaml", "--check"]).env("RF_TEST_SECRET", "other").output().unwrap();
    assert_eq!(o.status.code(), Some(1), "a changed env value makes the stage stale");
    assert!(String::from_utf8_lossy(&o.stdout).contains("env var `RF_TEST_SECRET`"), "status names the env var");
}

#[test]
fn matrix_expands_with_stable_names_and_propagates() {
    let p = Proj::new();
    p.write(
        "p.yaml",
        r#"
stages:
  train:
    matrix:
      seed: [2, 1]
      lr: ["1e-3", "a/b"]
    cmd: "echo ${matrix.seed}-${matrix.lr} > model_${matrix.seed}_${matrix.lr}.txt"
    outs: {model: "model_${matrix.seed}_${matrix.lr}.txt"}
    seed: ${matrix.seed}
  eval:
    cmd: "cat ${train.model} > eval_${matrix.seed}_${matrix.lr}.txt; echo $RECFLOW_SEED >> eval_${matrix.seed}_${matrix.lr}.txt"
    outs: ["eval_${matrix.seed}_${matrix.lr}.txt"]
"#,
    );
    let dag = p.ok(&["dag", "p.yaml"]);
    let names: Vec<&str> = dag.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        names,
        vec![
            "train@lr=1e-3,seed=2",
            "train@lr=1e-3,seed=1",
            "train@lr=a_b,seed=2",
            "train@lr=a_b,seed=1",
            "eval@lr=1e-3,seed=2",
            "eval@lr=1e-3,seed=1",
            "eval@lr=a_b,seed=2",
            "eval@lr=a_b,seed=1",
        ],
        "keys sorted, values in declared order, values made file-name safe, downstream expanded the same way"
    );
    assert!(dag.contains("eval@lr=a_b,seed=1 (shell) <- train@lr=a_b,seed=1.model"), "each expansion reads its own upstream: {dag}");
    p.ok(&["run", "p.yaml", "-q"]);
    assert_eq!(p.read("eval_1_a/b.txt"), "1-a/b\n0\n", "eval got train's matching output; RECFLOW_SEED set");
    let dot = p.ok(&["dag", "p.yaml", "--format", "dot"]);
    assert!(dot.starts_with("digraph"), "dot output");
    let mm = p.ok(&["dag", "p.yaml", "--format", "mermaid"]);
    assert!(mm.starts_with("flowchart LR"), "mermaid output");
}

#[test]
fn defaults_files_params_file_and_dry_run() {
    let p = Proj::new();
    p.write("in.txt", "x\n");
    p.write("vals.yaml", "k: 7\n");
    p.write(
        "p.yaml",
        r#"
params:
  k: 1
stages:
  a:
    cmd: "echo ${params.k} > a.txt"
    deps: [in.txt]
    outs: [a.txt]
"#,
    );
    let plan = p.ok(&["run", "p.yaml", "--dry-run"]);
    assert!(plan.contains("a: will run (never run)"), "dry-run prints the plan: {plan}");
    assert!(!p.path("a.txt").exists() && !p.path("cache/records").exists(), "dry-run runs nothing and records nothing");
    p.ok(&["run", "p.yaml", "-q", "--params", "vals.yaml"]);
    assert_eq!(p.read("a.txt"), "7\n", "--params FILE overrides params");
    let plan = p.ok(&["run", "p.yaml", "--dry-run", "--params", "vals.yaml"]);
    assert!(plan.contains("a: cached"), "dry-run sees the cached stage: {plan}");
    let out = p.ok(&["gc", "--keep-days", "0"]);
    assert!(out.contains("removed 0 run records"), "gc keeps what the lock references: {out}");
}

#[test]
fn gc_removes_what_no_lock_references() {
    let p = Proj::new();
    p.write("in.txt", "hello\n");
    p.write("p.yaml", CHAIN);
    p.ok(&["run", "p.yaml", "-q"]);
    p.ok(&["run", "p.yaml", "-q", "--set", "params.k=2"]);
    let out = p.ok(&["gc", "--keep-days", "30"]);
    assert!(out.contains("removed 0 run records"), "recent records are kept: {out}");
    p.write("cache/responses/r.json", "{}");
    let out = p.ok(&["gc", "--keep-days", "0"]);
    assert!(out.contains("removed 2 run records"), "records of b and c for k=1 are no longer referenced: {out}");
    assert!(p.path("cache/responses/r.json").exists(), "the teacher response cache survives gc");
    p.ok(&["status", "p.yaml", "--check", "--set", "params.k=2"]);
    p.ok(&["run", "p.yaml", "-q", "--set", "params.k=2"]);
    assert_eq!(counts(&p), [1, 2, 2, 1], "what the lock references is still reused after gc");
    p.ok(&["cache", "verify"]);
    p.ok(&["gc", "--keep-days", "0", "--responses"]);
    assert!(!p.path("cache/responses").exists(), "--responses removes the response cache");
}

/// Issue 14: a lock recorded `--set` paths verbatim, so a script passing an
/// absolute path committed a path of the machine that ran it.
#[test]
fn issue14_set_paths_under_the_project_are_locked_relative_to_the_pipeline() {
    let p = Proj::new();
    p.write("data/in.txt", "hello\n");
    p.write(
        "pipelines/p.yaml",
        "params: {f: ../data/in.txt}\nstages:\n  a:\n    cmd: \"cat ${params.f} > o.txt\"\n    deps: [\"${params.f}\"]\n    outs: [o.txt]\n",
    );
    let abs = p.path("data/in.txt");
    p.ok(&["run", "pipelines/p.yaml", "-q", "--set", &format!("params.f={}", abs.display())]);
    let lock = p.read("pipelines/p.lock");
    assert!(lock.contains("\"f\": \"../data/in.txt\""), "params spell it relative to the pipeline: {lock}");
    let l: serde_json::Value = serde_json::from_str(&lock).unwrap();
    let machine = p.dir.path().display().to_string();
    // (The shell command itself, params interpolated, is key input: it stays as run.)
    for part in [&l["params"], &l["stages"]["a"]["sources"]] {
        assert!(!part.to_string().contains(&machine), "no machine path in params or sources: {part}");
    }
    assert_eq!(l["stages"]["a"]["sources"]["${params.f}"][0], "../data/in.txt", "sources spell it the same way: {lock}");

    // Outside the project no spelling is portable: kept as given, with a warning.
    let other = tempfile::tempdir().unwrap();
    let out = other.path().join("in.txt");
    std::fs::write(&out, "bye\n").unwrap();
    let o = p.run(&["run", "pipelines/p.yaml", "-q", "--set", &format!("params.f={}", out.display())]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "an outside path still runs: {err}");
    assert!(err.contains("outside the project"), "the run warns that the lock will hold it absolute: {err}");
    assert!(p.read("pipelines/p.lock").contains(&out.display().to_string()), "kept verbatim outside the project");
}
