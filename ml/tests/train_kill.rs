//! Exact resume through the real worker process (issue 6, item 4): an `sft`
//! and a `grpo` stage run by `recflow-worker exec-stage` are
//! * killed with SIGKILL after a checkpoint reached the work dir, then rerun
//!   with the same work dir (as the runner's next attempt does);
//! * cancelled with SIGINT (Ctrl-C), which must checkpoint at the next step
//!   boundary and exit 130, then rerun;
//!
//! and each rerun must end with weights and log bit-identical to an
//! uninterrupted run, every attempt under one pinned numerics profile. Tiny toy models, so the whole file takes seconds.
mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WORKER: &str = env!("CARGO_BIN_EXE_recflow-worker");

/// One stage to run: kind, `with:` config and inputs.
struct Job {
    kind: &'static str,
    config: serde_json::Value,
    inputs: Vec<(&'static str, PathBuf)>,
    lora: bool,
}

/// Writes the exec-stage spec of attempt `attempt` under `root`: its own
/// output dir, the work dir shared by every attempt of `root`.
fn spec(root: &Path, attempt: &str, job: &Job) -> PathBuf {
    let dir = root.join(attempt);
    std::fs::create_dir_all(&dir).unwrap();
    let inputs: serde_json::Map<String, serde_json::Value> =
        job.inputs.iter().map(|(k, p)| (k.to_string(), serde_json::json!([p]))).collect();
    let spec = serde_json::json!({
        "kind": job.kind, "stage": job.kind, "config": job.config, "inputs": inputs,
        "out_dir": dir.join("out"), "work_dir": root.join("work"), "seed": 7, "device": "cpu",
    });
    let p = dir.join("spec.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    p
}

/// Every attempt runs under one pinned numerics profile, as the runner sets
/// it (issue 13: bytes identical across runs and resumes under one profile).
const NUMERICS: &str = "aten=avx2,mkl=compatible,threads=2";

fn spawn(spec: &Path, stdout: Stdio) -> Child {
    let mut cmd = Command::new(WORKER);
    recflow::numerics::Request::parse(NUMERICS).expect("profile parses").resolve().apply(&mut cmd);
    cmd.arg("exec-stage")
        .arg(spec)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start recflow-worker")
}

/// Runs an attempt to the end; returns its metrics.json.
fn run_to_end(spec: &Path) -> serde_json::Value {
    let out = spawn(spec, Stdio::null()).wait_with_output().unwrap();
    assert!(out.status.success(), "worker failed: {}", String::from_utf8_lossy(&out.stderr));
    let m = spec.parent().unwrap().join("out/metrics.json");
    serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap()
}

/// Step of the checkpoint in `work` (the committed one), if any.
fn checkpoint_step(work: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(work.join("checkpoint/state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["step"].as_u64()
}

/// Output files that must match bit for bit.
fn outputs(attempt_dir: &Path, lora: bool) -> Vec<(&'static str, Vec<u8>)> {
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let o = attempt_dir.join("out");
    let mut v = vec![("log", read(o.join("log.parquet"))), ("model", read(o.join("model/model.safetensors")))];
    if lora {
        v.push(("adapter", read(o.join("adapter/adapter_model.safetensors"))));
    }
    v
}

fn assert_same(a: &Path, b: &Path, lora: bool, what: &str) {
    for ((n, x), (_, y)) in outputs(a, lora).iter().zip(outputs(b, lora)) {
        assert!(*x == y, "{what}: output `{n}` differs from the uninterrupted run");
    }
}

/// kill -9 once a checkpoint is on disk, rerun, compare with `reference`.
fn killed_and_resumed(root: &Path, job: &Job, reference: &Path, total: u64) {
    let first = spec(root, "a1", job);
    let mut child = spawn(&first, Stdio::null());
    let t0 = Instant::now();
    let work = root.join("work");
    loop {
        if let Some(s) = checkpoint_step(&work) {
            assert!(s < total, "checkpoint at step {s} of {total}");
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{}: worker exited ({st}) before writing a checkpoint", job.kind);
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{}: no checkpoint after 120 s", job.kind);
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL: no handler runs, nothing is flushed
    let st = child.wait().unwrap();
    assert!(!st.success(), "{}: the run finished before the kill landed — make it longer", job.kind);
    assert!(!root.join("a1/out/metrics.json").exists(), "a killed attempt must not have finished");
    let m = run_to_end(&spec(root, "a2", job));
    let from = m["resumed_from_step"].as_u64().unwrap();
    assert!(from > 0 && from < total, "{}: the rerun must continue from the checkpoint, resumed from {from}", job.kind);
    assert_same(reference, &root.join("a2"), job.lora, &format!("{} after kill -9 and rerun", job.kind));
}

/// SIGINT after `after` steps: checkpoint at the next boundary, exit 130; rerun.
fn cancelled_and_resumed(root: &Path, job: &Job, reference: &Path, total: u64, after: u64, boundary: u64) {
    let first = spec(root, "a1", job);
    let mut child = spawn(&first, Stdio::piped());
    let stdout = child.stdout.take().unwrap();
    let mut signalled = false;
    for line in std::io::BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap_or_default();
        if !signalled && v["progress"]["done"].as_u64().is_some_and(|d| d >= after) {
            let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
            assert!(ok.success(), "kill -INT failed");
            signalled = true;
        }
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(signalled, "{}: no progress event reached step {after}", job.kind);
    assert_eq!(out.status.code(), Some(130), "{}: a cancelled stage exits 130: {stderr}", job.kind);
    assert!(stderr.contains("cancelled"), "{}: the error says it was cancelled: {stderr}", job.kind);
    // save_steps is larger than the run, so this checkpoint is the cancel's.
    let s = checkpoint_step(&root.join("work")).expect("cancel must leave a checkpoint");
    assert!(s >= after && s < total, "{}: cancel checkpoint at step {s} (signal after {after} of {total})", job.kind);
    assert_eq!(s % boundary, 0, "{}: checkpoints sit on rollout boundaries (every {boundary} steps)", job.kind);
    let m = run_to_end(&spec(root, "a2", job));
    assert_eq!(m["resumed_from_step"].as_u64(), Some(s), "{}: the rerun continues from the cancel checkpoint", job.kind);
    assert_same(reference, &root.join("a2"), job.lora, &format!("{} after Ctrl-C and rerun", job.kind));
}

/// An uninterrupted reference run, then the job killed (kill -9) with
/// checkpoints every `kill_save_steps`, and cancelled (SIGINT) after step 5
/// with no periodic checkpoint; both resumed runs must match the reference.
/// `save_steps` is operational (not in the checkpoint fingerprint), so all
/// three compute the same thing.
fn kill_and_cancel(dir: &Path, job: impl Fn(u64) -> Job, kill_save_steps: u64, total: u64, boundary: u64) {
    let reference = dir.join("ref");
    run_to_end(&spec(&reference, "a1", &job(1000)));
    killed_and_resumed(&dir.join("kill"), &job(kill_save_steps), &reference.join("a1"), total);
    cancelled_and_resumed(&dir.join("cancel"), &job(1000), &reference.join("a1"), total, 5, boundary);
}

fn with(mut cfg: serde_json::Value, save_steps: u64) -> serde_json::Value {
    cfg["save_steps"] = serde_json::json!(save_steps);
    cfg
}

#[test]
fn sft_resumes_bit_identically_after_kill_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_toy_model(dir.path(), 3);
    let (data, valid) = sft_data(dir.path(), 24, 4);
    let total = 40;
    let cfg = serde_json::json!({"learning_rate": 1e-3, "max_steps": total, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "warmup_steps": 2, "eval_steps": 10, "eval_max_samples": 2,
        "eval_max_new_tokens": 8, "weight_decay": 0.01});
    let job = |save| Job {
        kind: "sft",
        config: with(cfg.clone(), save),
        inputs: vec![("model", base.clone()), ("data", data.clone()), ("valid", valid.clone())],
        lora: false,
    };
    kill_and_cancel(dir.path(), job, 3, total, 1);
}

#[test]
fn grpo_resumes_bit_identically_after_kill_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_toy_model(dir.path(), 4);
    let (samples, valid) = grpo_data(dir.path(), 8, 2);
    let total = 30;
    // LoRA, β > 0 (reference = adapters off), μ = 2: checkpoints only at
    // rollout boundaries, so a cancel after an odd step runs one more.
    let cfg = serde_json::json!({"learning_rate": 1e-3, "max_steps": total, "prompts_per_step": 2,
        "num_generations": 3, "max_completion_length": 6, "max_prompt_length": 32, "use_peft": true,
        "lora_r": 4, "lora_dropout": 0.1, "beta": 0.04, "num_iterations": 2, "loss_type": "grpo",
        "eval_steps": 10, "eval_max_samples": 2});
    let job = |save| Job {
        kind: "grpo",
        config: with(cfg.clone(), save),
        inputs: vec![("model", base.clone()), ("samples", samples.clone()), ("valid", valid.clone())],
        lora: true,
    };
    kill_and_cancel(dir.path(), job, 4, total, 2);
}
