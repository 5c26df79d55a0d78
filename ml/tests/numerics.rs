//! The numerics profile (issue 13) through the real binaries: a worker whose
//! requested profile was not applied refuses to run (exit 2, naming the
//! field); the runner records the profile in the lock; under one profile a
//! rerun is byte-identical; under another (ATen `default` against the lock's
//! `avx2`, on this very machine) `status` says so and `verify` compares the
//! metrics within its tolerance, saying that it did and why, never a bare
//! byte mismatch.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const WORKER: &str = env!("CARGO_BIN_EXE_recflow-worker");

/// The torch-free runner, built next to the worker by `cargo build --workspace`.
fn runner() -> PathBuf {
    let p = Path::new(WORKER).with_file_name("recflow");
    assert!(p.is_file(), "{} missing: build the workspace first (`cargo build --workspace --all-targets`)", p.display());
    p
}

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The worker with a request and a deliberately different environment.
fn worker_with(request: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(WORKER);
    recflow::numerics::Request::parse(request).unwrap().resolve().apply(&mut c);
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().expect("start recflow-worker")
}

#[test]
fn a_profile_that_was_not_applied_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.json");
    // Never reached: the profile check comes first.
    std::fs::write(&spec, "{}").unwrap();
    let spec = spec.to_str().unwrap();

    // ATen forced to another capability than the request.
    let o = worker_with("aten=avx2,mkl=compatible,threads=1", &[("ATEN_CPU_CAPABILITY", "default")], &["exec-stage", spec]);
    assert_eq!(o.status.code(), Some(2), "an unapplied ATen capability is bad input; {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("was not applied") && err.contains("aten: requested avx2, ATen runs default"), "the message names the field: {err}");

    // Threads forced to another count (MKL_NUM_THREADS wins over
    // OMP_NUM_THREADS in torch's start-up, so both).
    let o = worker_with("aten=native,mkl=off,threads=2", &[("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1")], &["exec-stage", spec]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("threads: requested 2, torch runs 1"), "{}", text(&o));

    // MKL's branch forced away from the request.
    let o = worker_with("mkl=compatible,threads=1", &[("MKL_CBWR", "AUTO")], &["exec-stage", spec]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("mkl: requested compatible, MKL runs branch auto"), "{}", text(&o));

    // MKL's Intel-only AVX2 branch on another vendor runs AUTO: refused, not silently different.
    if recflow::numerics::Cpu::read().vendor != "GenuineIntel" {
        let o = worker_with("mkl=avx2,threads=1", &[], &["exec-stage", spec]);
        assert_eq!(o.status.code(), Some(2), "mkl=avx2 is not in force on a non-Intel CPU; {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("mkl: requested avx2"), "{}", text(&o));
    }

    // Applied: doctor reports the profile in force and succeeds.
    let o = worker_with("aten=default,mkl=compatible,threads=1", &[], &["doctor", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("doctor --json");
    let n = &v["numerics"];
    assert_eq!((n["aten"].as_str(), n["mkl"].as_str(), n["threads"].as_u64()), (Some("default"), Some("compatible"), Some(1)), "{v}");
    assert_eq!(n["requested"], "aten=default,mkl=compatible,threads=1");
    assert!(n["cpu_vendor"].as_str().is_some_and(|s| !s.is_empty()) && n["torch"].as_str().is_some_and(|s| s.starts_with('2')), "{v}");
}

/// A one-stage project (`recflow.toml` makes it its own root and store):
/// a short SFT of the tiny toy model.
fn sft_project(dir: &Path) {
    std::fs::write(dir.join("recflow.toml"), "").unwrap();
    small_toy_model(dir, 3);
    sft_data(dir, 12, 2);
    std::fs::write(
        dir.join("p.yaml"),
        "name: num\nstages:\n  sft:\n    uses: sft\n    seed: 7\n    inputs:\n      model: base\n      data: coldstart.parquet\n      valid: valid.parquet\n    with:\n      device: cpu\n      learning_rate: 0.001\n      max_steps: 4\n      per_device_train_batch_size: 2\n      eval_steps: 4\n      eval_max_samples: 2\n      eval_max_new_tokens: 6\n      save_steps: 2\n",
    )
    .unwrap();
}

fn recflow(dir: &Path, numerics: &str, args: &[&str]) -> Output {
    Command::new(runner())
        .args(args)
        .current_dir(dir)
        .env_remove("RECFLOW_CACHE")
        .env("RECFLOW_WORKER", WORKER)
        .env(recflow::numerics::ENV, numerics)
        .output()
        .expect("start recflow")
}

#[test]
fn verify_compares_bytes_under_the_locks_profile_and_metrics_under_another() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    sft_project(dir);
    let locked = "aten=avx2,mkl=compatible,threads=1";
    let o = recflow(dir, locked, &["run", "p.yaml", "-q"]);
    assert!(o.status.success(), "{}", text(&o));

    // The lock records the profile, outside the key.
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("p.lock")).unwrap()).unwrap();
    let n = &lock["stages"]["sft"]["numerics"];
    assert_eq!((n["aten"].as_str(), n["mkl"].as_str(), n["threads"].as_u64()), (Some("avx2"), Some("compatible"), Some(1)), "{n}");
    assert!(lock["stages"]["sft"]["key_inputs"].get("numerics").is_none(), "the profile never enters the key");

    // Same profile: a rerun is compared byte for byte and matches.
    let o = recflow(dir, locked, &["verify", "p.yaml"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("all outputs match") && !out.contains("note:"), "bytes identical across runs under one profile; {}", text(&o));

    // Another ATen capability on the same machine.
    let other = "aten=default,mkl=compatible,threads=1";
    let o = recflow(dir, other, &["status", "p.yaml", "--check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "a profile difference is not staleness; {}", text(&o));
    assert!(out.contains("sft: up to date") && out.contains("another profile (aten avx2 → default)"), "status shows the profile difference; {}", text(&o));

    let o = recflow(dir, other, &["verify", "p.yaml"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("note: sft:") && out.contains("aten avx2 → default"), "verify names the profile difference; {}", text(&o));
    assert!(
        out.contains("within relative tolerance") || out.contains("byte-identical all the same"),
        "verify says how it compared; {}",
        text(&o)
    );
    assert!(!out.contains("DIFFERS sft.model") && !out.contains("DIFFERS sft.log"), "never a bare byte mismatch; {}", text(&o));
    assert!(o.status.success(), "metrics agree within the tolerance; {}", text(&o));
}
