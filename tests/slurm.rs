//! The Slurm executor on a real single-node cluster (issue 16): Debian's
//! munge, slurmctld and slurmd, started for each test by
//! scripts/slurm_cluster.sh without systemd (own munged, daemons on
//! 127.0.0.1, accounting off) and stopped when the test ends, pass or fail.
//! The runner talks to it through the real `sbatch`/`squeue`/`scontrol`/
//! `scancel`; jobs move data through a `file://` remote store and use a
//! fresh store of their own on the "node" (one per job), so nothing a job
//! reads comes from the runner's store.
//!
//! Without root or the packages the cluster tests say so and pass; under
//! `RECFLOW_REQUIRE_SLURM=1` (CI) they fail instead. The bad-input tests at
//! the end need no cluster.
mod engine_common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use engine_common::*;

/// A running test cluster; stopped (jobs cancelled, daemons ended) on drop.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/slurm_cluster.sh");

impl Cluster {
    /// Starts one, or says why it cannot (None) — a failure under RECFLOW_REQUIRE_SLURM=1.
    fn start() -> Option<Cluster> {
        let require = std::env::var("RECFLOW_REQUIRE_SLURM").as_deref() == Ok("1");
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("bash").arg(SCRIPT).arg("start").arg(dir.path()).output().expect("run slurm_cluster.sh");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.code() == Some(3) {
            assert!(!require, "RECFLOW_REQUIRE_SLURM=1 but no Slurm test cluster can run here: {err}");
            eprintln!("SKIPPED (no Slurm test cluster here): {err}scripts/setup_slurm.sh installs the packages when run as root");
            return None;
        }
        assert!(out.status.success(), "the test cluster starts: {err}");
        Some(Cluster { conf: dir.path().join("slurm.conf"), dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A Slurm client command against this cluster; its stdout.
    fn client(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program).args(args).env("SLURM_CONF", &self.conf).output().expect("run a Slurm client");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ID STATE NAME` of every job the controller knows (finished ones too).
    fn jobs(&self) -> Vec<(String, String, String)> {
        self.client("squeue", &["-h", "--states=all", "-o", "%i %T %j"])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
            })
            .collect()
    }

    fn running(&self) -> Vec<String> {
        self.jobs().into_iter().filter(|j| j.1 == "RUNNING").map(|j| j.0).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(SCRIPT).arg("stop").arg(self.dir.path()).output();
    }
}

/// A project whose stages go to the cluster through a `file://` remote;
/// each job gets a fresh node store under the cluster's dir.
fn slurm_project(c: &Cluster, pipeline: &str) -> Proj {
    let p = Proj::new();
    std::fs::create_dir_all(p.path("remote")).unwrap();
    p.write(
        "recflow.toml",
        &format!(
            "[remote]\nurl = \"file://{remote}\"\n\n[executor]\nkind = \"slurm\"\n\n[executor.slurm]\npoll_s = 0.2\nnode_store = \"{c}/node-$SLURM_JOB_ID\"\noutput = \"{c}/slurm-%j.out\"\n",
            remote = p.path("remote").display(),
            c = c.dir.path().display()
        ),
    );
    p.write("p.yaml", pipeline);
    p
}

fn run_cmd(p: &Proj, c: &Cluster, args: &[&str]) -> Command {
    let mut cmd = p.cmd(args);
    cmd.env("SLURM_CONF", &c.conf).env_remove("RECFLOW_REMOTE");
    cmd
}

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Stage → output name → content id, from a project's lock file.
fn lock_outputs(p: &Proj) -> Vec<(String, String, String)> {
    let l = recflow::lock::LockFile::read(&p.path("p.lock")).expect("lock file");
    let mut v = Vec::new();
    for (s, st) in &l.stages {
        for (o, r) in &st.outputs {
            v.push((s.clone(), o.clone(), r.id.clone()));
        }
    }
    v
}

/// Shell stages with a matrix and a stage over all its expansions, plus a
/// built-in torch stage (`model_init`, a 1-layer decoder) fed by `ingest`.
const MATRIX_AND_TORCH: &str = r#"
stages:
  gen:
    cmd: "seq 1 5 > nums.txt"
    outs: [nums.txt]
  scale:
    matrix:
      k: [1, 2, 3]
    cmd: "awk '{print $1 * ${matrix.k}}' nums.txt > scaled_${matrix.k}.txt"
    deps: [nums.txt]
    outs: ["scaled_${matrix.k}.txt"]
  total:
    cmd: "cat scaled_1.txt scaled_2.txt scaled_3.txt | awk '{s += $1} END {print s}' > total.txt"
    deps: [scaled_1.txt, scaled_2.txt, scaled_3.txt]
    outs: [total.txt]
  data:
    uses: ingest
    with:
      format: synthetic
      synthetic: {users: 12, items: 8, ratings_per_user: 4, seed: 3}
  tiny:
    uses: model_init
    seed: 5
    inputs:
      corpus: ${data.interactions}
    with:
      architecture: llama
      hidden_size: 16
      num_hidden_layers: 1
      num_attention_heads: 2
      num_key_value_heads: 2
      intermediate_size: 32
      vocab_size: 300
      max_position_embeddings: 64
"#;

#[test]
fn matrix_and_torch_stage_through_slurm_equal_a_local_run() {
    let Some(c) = Cluster::start() else { return };
    // The reference: the same pipeline run by local child processes.
    let local = Proj::new();
    local.write("p.yaml", MATRIX_AND_TORCH);
    local.ok(&["run", "p.yaml", "-q"]);

    let p = slurm_project(&c, MATRIX_AND_TORCH);
    let out = run_cmd(&p, &c, &["run", "p.yaml", "--progress-interval", "1"]).output().unwrap();
    assert!(out.status.success(), "the run through Slurm succeeds\n{}", text(&out));
    assert_eq!(lock_outputs(&p), lock_outputs(&local), "every output of every stage is byte-identical to the local run's");
    assert_eq!(p.read("total.txt").trim(), "90", "the shell outputs are in the workspace, as after a local run");

    // The table names the job of each stage, and those are the jobs Slurm ran.
    let table = String::from_utf8_lossy(&out.stdout);
    let jobs = c.jobs();
    assert_eq!(jobs.len(), 7, "one job per stage: {jobs:?}");
    for (id, state, name) in &jobs {
        assert_eq!(state, "COMPLETED", "{name}");
        let stage = name.rsplit('.').next().unwrap();
        let row = table.lines().find(|l| l.starts_with(&format!("{stage} "))).unwrap_or_else(|| panic!("no row for {stage} in\n{table}"));
        assert!(row.contains(" ran ") && row.split_whitespace().any(|w| w == id), "the row of `{stage}` shows job {id}: {row}");
    }
    // Each job committed in a store of its own: it read nothing of the runner's.
    for (id, _, _) in &jobs {
        let node = c.path(&format!("node-{id}"));
        let records = std::fs::read_dir(node.join("records")).map(|r| r.count()).unwrap_or(0);
        assert!(records >= 1, "job {id} committed its key in its own node store {}", node.display());
    }
    // A rerun reuses everything and submits nothing.
    let again = run_cmd(&p, &c, &["run", "p.yaml"]).output().unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(c.jobs().len(), 7, "a no-op rerun submits no job");
    assert!(!String::from_utf8_lossy(&again.stdout).contains(" ran "), "all cached:\n{}", text(&again));

    // `--force` computes the stage again on a node although the remote holds
    // its record (the node neither skips it nor the runner reuses the record).
    let forced = run_cmd(&p, &c, &["run", "p.yaml", "--force", "total"]).output().unwrap();
    assert!(forced.status.success(), "{}", text(&forced));
    let jobs = c.jobs();
    assert_eq!(jobs.len(), 8, "one new job, the forced stage's: {jobs:?}");
    let id = jobs.iter().map(|j| j.0.parse::<u64>().unwrap()).max().unwrap().to_string();
    let table = String::from_utf8_lossy(&forced.stdout);
    let row = table.lines().find(|l| l.starts_with("total ")).unwrap_or_default();
    assert!(row.contains(" ran ") && row.split_whitespace().any(|w| w == id), "the forced stage ran as job {id}: {row}");
    let records = std::fs::read_dir(c.path(&format!("node-{id}")).join("records")).map(|r| r.count()).unwrap_or(0);
    assert_eq!(records, 1, "the forced job computed and committed the key in its node store");
    assert_eq!(lock_outputs(&p), lock_outputs(&local), "the same bytes again");
}

/// Counts to 30 in its work dir, reporting a checkpoint after each step; its
/// output says where this attempt started.
const COUNTER: &str = r#"
stages:
  slow:
    cmd: |
      s=$(cat "$RECFLOW_WORK_DIR/step" 2>/dev/null || echo 0)
      first=$s
      while [ $s -lt 30 ]; do s=$((s+1)); echo $s > "$RECFLOW_WORK_DIR/step"; echo '{"checkpoint": {}}'; sleep 0.2; done
      echo "started at $first" > slow.txt
    outs: [slow.txt]
"#;

/// The highest `step` any job's node store holds.
fn node_step(c: &Cluster) -> u32 {
    let mut best = 0;
    for n in std::fs::read_dir(c.dir.path()).into_iter().flatten().flatten() {
        for w in std::fs::read_dir(n.path().join("work")).into_iter().flatten().flatten() {
            let s = std::fs::read_to_string(w.path().join("step")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            best = best.max(s);
        }
    }
    best
}

#[test]
fn scancel_then_rerun_resumes_from_the_remote_checkpoint_on_a_fresh_node_store() {
    let Some(c) = Cluster::start() else { return };
    let p = slurm_project(&c, COUNTER);
    let runner = run_cmd(&p, &c, &["run", "p.yaml", "-q"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(60), || node_step(&c) >= 5), "the job runs and counts");
    let running = c.running();
    assert_eq!(running.len(), 1, "one job: {:?}", c.jobs());
    let first = running[0].clone();
    c.client("scancel", &[&first]);
    let out = runner.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a cancelled job is a failed stage\n{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("job {first}")) && err.contains("cancelled"), "the failure names the job and why:\n{err}");
    let reached = node_step(&c);

    let out = run_cmd(&p, &c, &["run", "p.yaml"]).output().unwrap();
    assert!(out.status.success(), "the rerun succeeds\n{}", text(&out));
    let started: u32 = p.read("slow.txt").trim().strip_prefix("started at ").and_then(|s| s.parse().ok()).expect("slow.txt");
    assert!(started >= 5 && started <= reached, "the second attempt resumed from the checkpoint the first pushed (started at {started}, first reached {reached})");
    let second: Vec<String> = c.jobs().into_iter().map(|j| j.0).filter(|id| *id != first).collect();
    assert_eq!(second.len(), 1, "the rerun submitted one new job");
    let log = std::fs::read_to_string(c.path(&format!("slurm-{}.out", second[0]))).unwrap_or_default();
    assert!(log.contains("resuming key"), "the new job (fresh node store) pulled the work dir from the remote:\n{log}");
    assert!(!c.path(&format!("node-{first}/records")).exists() || std::fs::read_dir(c.path(&format!("node-{first}/records"))).unwrap().count() == 0,
        "the cancelled job committed nothing");
}

/// Two jobs that would run for a minute.
const LONG: &str = r#"
stages:
  wait:
    matrix:
      k: [1, 2]
    cmd: "sleep 60; echo ${matrix.k} > w_${matrix.k}.txt"
    outs: ["w_${matrix.k}.txt"]
"#;

#[test]
fn ctrl_c_of_the_runner_cancels_its_jobs() {
    let Some(c) = Cluster::start() else { return };
    let p = slurm_project(&c, LONG);
    let runner = run_cmd(&p, &c, &["run", "p.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(60), || c.running().len() == 2), "both jobs run: {:?}", c.jobs());
    // SAFETY: signals the runner this test started.
    unsafe { libc::kill(runner.id() as i32, libc::SIGINT) };
    let out = runner.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "Ctrl-C ends the run as interrupted\n{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled Slurm jobs"), "{}", text(&out));
    let jobs = c.jobs();
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j.1 == "CANCELLED"), "every job of the run was cancelled: {jobs:?}");
    assert!(lock_outputs(&p).is_empty(), "nothing was recorded");
}

#[test]
fn a_killed_runner_is_followed_by_one_that_adopts_its_job() {
    let Some(c) = Cluster::start() else { return };
    let pipeline = "stages:\n  nap:\n    cmd: \"sleep 6; echo ok > nap.txt\"\n    outs: [nap.txt]\n";
    let p = slurm_project(&c, pipeline);
    let mut runner = run_cmd(&p, &c, &["run", "p.yaml", "-q"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    assert!(wait_for(Duration::from_secs(60), || c.running().len() == 1), "the job runs: {:?}", c.jobs());
    let id = c.running()[0].clone();
    runner.kill().unwrap();
    runner.wait().unwrap();
    assert_eq!(c.running(), vec![id.clone()], "the job outlives its runner");
    let out = run_cmd(&p, &c, &["run", "p.yaml"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("adopting job {id}")), "the new runner adopts the job\n{}", text(&out));
    let jobs = c.jobs();
    assert_eq!(jobs.len(), 1, "nothing was submitted again: {jobs:?}");
    let row = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with("nap ")).map(str::to_string).unwrap_or_default();
    assert!(row.split_whitespace().any(|w| w == id), "the table shows the adopted job: {row}");
    assert_eq!(p.read("nap.txt"), "ok\n");
}

#[test]
fn shared_file_system_mode_and_an_unknown_partition() {
    let Some(c) = Cluster::start() else { return };
    let p = Proj::new();
    p.write(
        "recflow.toml",
        &format!("[executor]\nkind = \"slurm\"\n\n[executor.slurm]\nshared_fs = true\npoll_s = 0.2\noutput = \"{}/slurm-%j.out\"\n", c.dir.path().display()),
    );
    p.write("in.txt", "a\n");
    p.write(
        "p.yaml",
        &format!(
            "stages:\n  one:\n    cmd: \"tr a b < in.txt > one.txt; echo ran >> {ran}\"\n    deps: [in.txt]\n    outs: [one.txt]\n  two:\n    cmd: \"cat one.txt one.txt > two.txt\"\n    deps: [one.txt]\n    outs: [two.txt]\n",
            ran = c.path("ran.log").display()
        ),
    );
    let out = run_cmd(&p, &c, &["run", "p.yaml"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(p.read("two.txt"), "b\nb\n");
    assert_eq!(c.jobs().len(), 2, "one job per stage");
    // `--force` runs the command again on the node although the shared store has the key.
    let out = run_cmd(&p, &c, &["run", "p.yaml", "--force", "one"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(c.jobs().len(), 3, "one new job, the forced stage's");
    assert_eq!(std::fs::read_to_string(c.path("ran.log")).unwrap(), "ran\nran\n", "the forced job ran the command");
    // A partition the cluster does not have: bad input before anything runs.
    p.write("p.yaml", "stages:\n  one:\n    cmd: \"echo > x.txt\"\n    outs: [x.txt]\n    resources:\n      partition: nosuch\n");
    let out = run_cmd(&p, &c, &["run", "p.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.yaml:2:3") && err.contains("resources.partition") && err.contains("nosuch") && err.contains("sinfo"), "{err}");
    assert_eq!(c.jobs().len(), 3, "nothing was submitted");
}

/// Bad input needs no cluster: each gets exit 2 and a message naming the
/// field and the fix, before anything runs.
#[test]
fn bad_executor_settings_are_bad_input() {
    let p = Proj::new();
    p.write("p.yaml", "stages:\n  a:\n    cmd: \"echo > a.txt\"\n    outs: [a.txt]\n");
    let bad = |p: &Proj, args: &[&str], want: &[&str]| {
        let out = p.cmd(args).env_remove("RECFLOW_REMOTE").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: exit 2\n{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        for w in want {
            assert!(err.contains(w), "{args:?}: the error says `{w}`:\n{err}");
        }
        assert!(!p.path("a.txt").exists(), "nothing ran");
    };
    bad(&p, &["run", "p.yaml", "--executor", "k8s"], &["unknown executor `k8s`", "local, slurm"]);
    p.write("recflow.toml", "[executor]\nkind = \"pbs\"\n");
    bad(&p, &["run", "p.yaml"], &["recflow.toml [executor] kind", "`pbs`", "local, slurm"]);
    p.write("recflow.toml", "[executor]\nkind = \"slurm\"\n");
    bad(&p, &["run", "p.yaml"], &["remote", "shared_fs = true"]);
    p.write("recflow.toml", "[executor.slurm]\nshared_fs = true\ntime = \"2 hours\"\n");
    bad(&p, &["run", "p.yaml", "--executor", "slurm"], &["recflow.toml [executor.slurm] time", "4:00:00"]);
    p.write("recflow.toml", "[executor.slurm]\nshared_fs = true\nsbatch = [\"--job-name=x\"]\n");
    bad(&p, &["run", "p.yaml", "--executor", "slurm"], &["[executor.slurm] sbatch", "set by recflow"]);
    p.write("recflow.toml", "[executor.slurm]\nshared_fs = true\n");
    let mut cmd = p.cmd(&["run", "p.yaml", "--executor", "slurm"]);
    let out = cmd.env("PATH", "/nonexistent").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`sbatch` cannot be run here (not on PATH)"), "{}", text(&out));
    p.write("p.yaml", "stages:\n  a:\n    cmd: \"echo > a.txt\"\n    outs: [a.txt]\n    resources: {mem: 16GB}\n");
    bad(&p, &["run", "p.yaml"], &["p.yaml:5:", "`resources.mem`", "16G"]);
    let _ = Path::new("");
}
