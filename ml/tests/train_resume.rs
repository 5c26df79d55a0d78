//! Exact resume and determinism on CPU (issue 6, items 4 and 5): a run that
//! continues from a checkpoint in its work dir ends bit-identical to an
//! uninterrupted one, and two runs with one seed are bit-identical.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use recflow::stages::grpo::Grpo;
use recflow::stages::sft::Sft;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn bytes(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Output files that must match bit for bit.
fn outputs(root: &Path, lora: bool) -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("log".to_string(), bytes(root.join("out/log.parquet"))),
        ("model".to_string(), bytes(root.join("out/model/model.safetensors"))),
    ];
    if lora {
        v.push(("adapter".into(), bytes(root.join("out/adapter/adapter_model.safetensors"))));
    }
    v
}

fn assert_same(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)], what: &str) {
    for ((n, x), (_, y)) in a.iter().zip(b) {
        assert!(x == y, "{what}: output `{n}` differs");
    }
}

/// Runs A (fresh), B (continues from A's last checkpoint), C (fresh again).
fn check<D: recflow::stages::StageDef>(
    dir: &Path,
    inputs: &[(&str, &Path)],
    cfg: serde_json::Value,
    run: fn(&D::Config, &mut recflow::stages::StageCtx) -> anyhow::Result<recflow::stages::Metrics>,
    lora: bool,
    resume_step: u64,
) {
    let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
    run_stage::<D>(&a, inputs, cfg.clone(), run);
    // A leaves its last periodic checkpoint in its work dir, as a killed run would.
    copy_dir(&a.join("work"), &b.join("work"));
    let mb = run_stage::<D>(&b, inputs, cfg.clone(), run);
    assert_eq!(mb["resumed_from_step"], serde_json::json!(resume_step), "B must continue from the checkpoint");
    assert_same(&outputs(&a, lora), &outputs(&b, lora), "resumed run vs uninterrupted run");
    run_stage::<D>(&c, inputs, cfg, run);
    assert_same(&outputs(&a, lora), &outputs(&c, lora), "two runs with the same seed");
}

#[test]
fn sft_resume_is_bit_identical_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_toy_model(dir.path(), 3);
    let (data, valid) = sft_data(dir.path(), 24, 4);
    // Full fine-tuning, accumulation, checkpointing, cosine warmup, evals.
    let cfg = serde_json::json!({"learning_rate": 1e-3, "max_steps": 6, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "gradient_checkpointing": true, "warmup_steps": 2,
        "eval_steps": 3, "eval_max_samples": 2, "eval_max_new_tokens": 8, "save_steps": 2, "weight_decay": 0.01});
    check::<Sft>(dir.path(), &[("model", &base), ("data", &data), ("valid", &valid)], cfg, recflow_ml::train::sft::run, false, 4);
}

/// Wall-time checkpoints (issue 18): with `save_steps` beyond the run,
/// `save_minutes` alone puts a checkpoint at every step (the clock is past
/// a nanosecond-scale interval each time); a rerun resumes from the last
/// one and ends bit-identical. Without it (default 10 minutes) this short
/// run leaves none.
#[test]
fn issue18_wall_time_checkpoints_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_toy_model(dir.path(), 3);
    let (data, valid) = sft_data(dir.path(), 16, 4);
    let inputs: [(&str, &Path); 3] = [("model", &base), ("data", &data), ("valid", &valid)];
    let mut cfg = serde_json::json!({"learning_rate": 1e-3, "max_steps": 4, "per_device_train_batch_size": 2,
        "eval_steps": 0, "eval_max_samples": 2, "eval_max_new_tokens": 8, "save_steps": 1000, "save_minutes": 1e-9});
    check::<Sft>(&dir.path().join("timed"), &inputs, cfg.clone(), recflow_ml::train::sft::run, false, 3);
    cfg.as_object_mut().unwrap().remove("save_minutes");
    let plain = dir.path().join("plain");
    run_stage::<Sft>(&plain, &inputs, cfg, recflow_ml::train::sft::run);
    assert!(!plain.join("work/checkpoint").exists(), "no step or time interval was reached: no checkpoint");
}

/// A checkpoint records the CPU numerics profile it was written under; a
/// rerun under another profile is refused, naming the difference and the
/// profile to rerun with (issue 13: one output, one profile), and under
/// the same profile it resumes.
#[test]
fn a_checkpoint_of_another_numerics_profile_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_toy_model(dir.path(), 3);
    let (data, valid) = sft_data(dir.path(), 16, 4);
    let inputs: [(&str, &Path); 3] = [("model", &base), ("data", &data), ("valid", &valid)];
    let cfg = serde_json::json!({"learning_rate": 1e-3, "max_steps": 4, "per_device_train_batch_size": 2,
        "eval_steps": 0, "eval_max_samples": 2, "eval_max_new_tokens": 8, "save_steps": 2});
    let a = dir.path().join("a");
    run_stage::<Sft>(&a, &inputs, cfg.clone(), recflow_ml::train::sft::run);
    let state_path = a.join("work/checkpoint/state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&bytes(state_path.clone())).unwrap();
    let here = state["numerics"].clone();
    assert!(here["aten"].is_string() && here["threads"].as_u64().unwrap() >= 1, "the checkpoint records the profile: {state}");

    // The same checkpoint as if written under ATen's `default` capability.
    let other = dir.path().join("other");
    copy_dir(&a.join("work"), &other.join("work"));
    state["numerics"]["aten"] = "default".into();
    state["numerics"]["requested"] = "aten=default,mkl=compatible,threads=1".into();
    std::fs::write(other.join("work/checkpoint/state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    let e = try_run_stage::<Sft>(&other, &inputs, cfg.clone(), recflow_ml::train::sft::run)
        .expect_err("a checkpoint of another profile must not be resumed");
    let msg = format!("{e:#}");
    assert!(msg.contains("numerics profile") && msg.contains("aten default →"), "{msg}");
    assert!(msg.contains("--numerics aten=default,mkl=compatible,threads=1"), "names the profile to rerun with: {msg}");
    assert!(!other.join("out/model/model.safetensors").exists(), "nothing written: {msg}");

    // Under the profile it was written with, the same checkpoint resumes.
    let same = dir.path().join("same");
    copy_dir(&a.join("work"), &same.join("work"));
    let m = run_stage::<Sft>(&same, &inputs, cfg, recflow_ml::train::sft::run);
    assert_eq!(m["resumed_from_step"], serde_json::json!(2));
}

#[test]
fn grpo_resume_is_bit_identical_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_toy_model(dir.path(), 4);
    let (samples, valid) = grpo_data(dir.path(), 8, 2);
    // LoRA with dropout (reference = adapters off, β > 0), μ = 2 (old log-probs
    // recomputed), gradient checkpointing, truncation masking, tiny token budget.
    let cfg = serde_json::json!({"learning_rate": 1e-3, "max_steps": 6, "prompts_per_step": 2, "num_generations": 3,
        "max_completion_length": 6, "max_prompt_length": 32, "use_peft": true, "lora_r": 4, "lora_dropout": 0.1,
        "beta": 0.04, "num_iterations": 2, "gradient_checkpointing": true, "mask_truncated_completions": true,
        "loss_type": "grpo", "max_tokens_per_microbatch": 40, "logprob_chunk_tokens": 5, "eval_steps": 3,
        "eval_max_samples": 2, "save_steps": 2});
    check::<Grpo>(dir.path(), &[("model", &base), ("samples", &samples), ("valid", &valid)], cfg, recflow_ml::train::grpo::run, true, 4);
}

/// `lora_target_modules` (not resume, but the same tiny harness): only the
/// named layers get adapters, and the PEFT `adapter_config.json` says which,
/// so Python tools load the adapter onto the right modules.
#[test]
fn lora_target_modules_reach_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_toy_model(dir.path(), 5);
    let (data, valid) = sft_data(dir.path(), 4, 1);
    let cfg = serde_json::json!({"max_steps": 1, "per_device_train_batch_size": 2, "use_peft": true, "lora_r": 2,
        "lora_target_modules": ["v_proj", "q_proj"], "eval_max_samples": 0, "val_fraction": 0.0});
    let root = dir.path().join("run");
    run_stage::<Sft>(&root, &[("model", &base), ("data", &data), ("valid", &valid)], cfg, recflow_ml::train::sft::run);
    let ac: serde_json::Value = serde_json::from_slice(&bytes(root.join("out/adapter/adapter_config.json"))).unwrap();
    assert_eq!(ac["target_modules"], serde_json::json!(["v_proj", "q_proj"]), "adapter_config.json lists the configured modules");
    let names: Vec<String> = tch::Tensor::read_safetensors(root.join("out/adapter/adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), 2 * 2 * 2, "2 layers × 2 modules × (A, B)");
    assert!(
        names.iter().all(|n| n.contains(".self_attn.q_proj.") || n.contains(".self_attn.v_proj.")),
        "only q_proj and v_proj carry adapters: {names:?}"
    );
}

/// `max_tokens_per_microbatch` only changes how a step's examples are split:
/// the loss is normalised by the step's completion tokens, so a step packed
/// into several small micro-batches gives the same losses and weights (up to
/// float summation order) as one micro-batch of all its rows.
#[test]
fn sft_token_budget_micro_batches_match_one_big_batch() {
    let dir = tempfile::tempdir().unwrap();
    let base = small_toy_model(dir.path(), 6);
    let (data, valid) = sft_data(dir.path(), 16, 1);
    let inputs = [("model", base.as_path()), ("data", data.as_path()), ("valid", valid.as_path())];
    let cfg = |budget: Option<usize>| {
        let mut c = serde_json::json!({"learning_rate": 1e-3, "max_steps": 3, "per_device_train_batch_size": 8,
            "eval_max_samples": 0, "val_fraction": 0.0, "lr_scheduler_type": "constant"});
        if let Some(b) = budget {
            c["max_tokens_per_microbatch"] = serde_json::json!(b);
        }
        c
    };
    let (one, packed) = (dir.path().join("one"), dir.path().join("packed"));
    let m1 = run_stage::<Sft>(&one, &inputs, cfg(None), recflow_ml::train::sft::run);
    // A 100-token budget holds only a few toy rows: several micro-batches per step.
    let m2 = run_stage::<Sft>(&packed, &inputs, cfg(Some(100)), recflow_ml::train::sft::run);
    assert_eq!(m1["micro_batches"], serde_json::json!(3), "one micro-batch per step without a budget");
    let n = m2["micro_batches"].as_u64().unwrap();
    assert!(n >= 9, "the budget must split each step into several micro-batches, got {n} over 3 steps");
    let (l1, l2) = (log_column(&one.join("out/log.parquet"), "loss"), log_column(&packed.join("out/log.parquet"), "loss"));
    for (a, b) in l1.iter().zip(&l2) {
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "step losses differ: {a} vs {b}");
    }
    let w = |root: &Path| -> std::collections::BTreeMap<String, tch::Tensor> {
        tch::Tensor::read_safetensors(root.join("out/model/model.safetensors")).unwrap().into_iter().collect()
    };
    let (w1, w2) = (w(&one), w(&packed));
    assert_eq!(w1.len(), w2.len());
    for (name, a) in &w1 {
        let d = (a - &w2[name]).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{name}: weights differ by {d}");
    }
}
