//! Proof of learning on CPU with tiny models (issue 6, item 6).
mod common;

use common::*;
use recflow::stages::grpo::Grpo;
use recflow::stages::sft::Sft;
use recflow_ml::train::toy::{write_toy_model, ToySpec};

#[test]
fn sft_teaches_the_answer_format_to_a_random_model() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_toy_model(&base, ToySpec::default()).unwrap();
    // Traces rate exactly the target written in the prompt (a `cf`-like teacher).
    let train = examples(64, 0, Some(&|_, t| t));
    let held_out = examples(16, 1000, None);
    let data = write(dir.path(), "coldstart.parquet", &train, true);
    let valid = write(dir.path(), "valid.parquet", &held_out, false);
    let before = valid_rate(&base, &held_out, 48);
    assert!(before <= 0.1, "a random-init model must almost never produce the format (got {before})");
    let root = dir.path().join("sft");
    run_stage::<Sft>(
        &root,
        &[("model", &base), ("data", &data), ("valid", &valid)],
        serde_json::json!({"learning_rate": 3e-3, "max_steps": 80, "per_device_train_batch_size": 8,
            "lr_scheduler_type": "constant", "warmup_steps": 5, "eval_steps": 40, "eval_max_samples": 16,
            "eval_max_new_tokens": 48, "val_fraction": 0.1, "max_grad_norm": 1.0}),
        recflow_ml::train::sft::run,
    );
    let after = valid_rate(&root.join("out/model"), &held_out, 48);
    assert!(after >= 0.9, "SFT must raise the held-out valid-answer rate to ≥ 90% (before {before}, after {after})");
    let vv = log_column(&root.join("out/log.parquet"), "val_valid_rate");
    assert_eq!(vv.len(), 80, "one log row per optimizer step");
    assert!(vv[39].is_some() && vv[0].is_none(), "val_valid_rate only at evaluation steps");
    assert!(root.join("out/adapter/adapter_config.json").is_file(), "adapter output always exists");
}

#[test]
fn grpo_raises_reward_on_the_toy_rating_task() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_toy_model(&base, ToySpec { seed: 1, ..ToySpec::default() }).unwrap();
    // Cold start: the format, with ratings unrelated to the prompt's target.
    let cold = examples(64, 0, Some(&|i, _| 1 + (i as u32 * 7) % 5));
    let data = write(dir.path(), "coldstart.parquet", &cold, true);
    let samples = write(dir.path(), "samples.parquet", &examples(64, 2000, None), false);
    let valid = write(dir.path(), "valid.parquet", &examples(16, 3000, None), false);
    let sft = dir.path().join("sft");
    run_stage::<Sft>(
        &sft,
        &[("model", &base), ("data", &data), ("valid", &valid)],
        serde_json::json!({"learning_rate": 3e-3, "max_steps": 60, "per_device_train_batch_size": 8,
            "lr_scheduler_type": "constant", "eval_steps": 0, "eval_max_samples": 4, "eval_max_new_tokens": 48}),
        recflow_ml::train::sft::run,
    );
    let start = sft.join("out/model");
    let root = dir.path().join("grpo");
    let metrics = run_stage::<Grpo>(
        &root,
        &[("model", &start), ("samples", &samples), ("valid", &valid)],
        serde_json::json!({"learning_rate": 5e-4, "max_steps": 30, "prompts_per_step": 8, "num_generations": 8,
            "max_completion_length": 48, "max_prompt_length": 64, "eval_steps": 15, "eval_max_samples": 16,
            "load_best_model_at_end": false}),
        recflow_ml::train::grpo::run,
    );
    let log = root.join("out/log.parquet");
    let reward: Vec<f64> = log_column(&log, "reward_mean").into_iter().map(|v| v.unwrap()).collect();
    let zero_std: Vec<f64> = log_column(&log, "frac_reward_zero_std").into_iter().map(|v| v.unwrap()).collect();
    let first = reward[..5].iter().sum::<f64>() / 5.0;
    let last = reward[reward.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!("reward per step: {reward:?}\nmetrics: {metrics:?}");
    assert!(zero_std.iter().all(|&z| z < 1.0), "some group must carry signal every step: {zero_std:?}");
    assert!(last > first + 0.1, "GRPO must raise the mean reward (first 5 steps {first:.3}, last 5 {last:.3})");
    // Weights actually changed.
    let a = tch::Tensor::read_safetensors(start.join("model.safetensors")).unwrap();
    let b = tch::Tensor::read_safetensors(root.join("out/model/model.safetensors")).unwrap();
    let changed = a.iter().zip(&b).filter(|((_, x), (_, y))| !x.equal(y)).count();
    assert!(changed > 0, "GRPO must change the weights");
    for col in ["reward_format", "reward_accuracy", "batch_mae", "batch_rmse", "logprob_gap", "val_rmse"] {
        assert!(log_column(&log, col).iter().any(|v| v.is_some()), "log column {col} must be filled");
    }
    shortcuts_leave_the_update_unchanged(dir.path(), &start, &samples, &valid);
}

/// `share_prompt_prefix` and `skip_zero_advantage` change how much is
/// computed, not the update: from the SFT'd model, a few steps with every
/// combination give the same weights and the same logged losses and
/// statistics (up to float summation order), while skipping really skips.
fn shortcuts_leave_the_update_unchanged(dir: &std::path::Path, start: &std::path::Path, samples: &std::path::Path, valid: &std::path::Path) {
    let run = |share: bool, skip: bool| {
        let root = dir.join(format!("shortcuts_{share}_{skip}"));
        let m = run_stage::<Grpo>(
            &root,
            &[("model", start), ("samples", samples), ("valid", valid)],
            serde_json::json!({"learning_rate": 5e-4, "max_steps": 4, "prompts_per_step": 4, "num_generations": 4,
                "temperature": 0.5, "max_completion_length": 48, "max_prompt_length": 64, "eval_steps": 0,
                "eval_max_samples": 4, "loss_type": "dapo", "share_prompt_prefix": share, "skip_zero_advantage": skip}),
            recflow_ml::train::grpo::run,
        );
        (root, m)
    };
    let (plain, m_plain) = run(false, false);
    assert_eq!(m_plain["skipped_rows_fraction"], serde_json::json!(0.0));
    let weights = |root: &std::path::Path| -> std::collections::BTreeMap<String, tch::Tensor> {
        tch::Tensor::read_safetensors(root.join("out/model/model.safetensors")).unwrap().into_iter().collect()
    };
    let w0 = weights(&plain);
    for (share, skip) in [(true, false), (false, true), (true, true)] {
        let (root, m) = run(share, skip);
        let what = format!("share_prompt_prefix {share}, skip_zero_advantage {skip}");
        let skipped = m["skipped_rows_fraction"].as_f64().unwrap();
        if skip {
            assert!(skipped > 0.0 && skipped < 1.0, "{what}: the toy run must have some zero-variance groups, skipped {skipped}");
        }
        for (name, a) in weights(&root) {
            let d = (&a - &w0[&name]).abs().max().double_value(&[]);
            assert!(d < 1e-5, "{what}: {name} differs by {d}");
        }
        for col in ["loss", "grad_norm", "reward_mean", "frac_reward_zero_std", "clip_low", "clip_high", "kl"] {
            let (a, b) = (log_column(&plain.join("out/log.parquet"), col), log_column(&root.join("out/log.parquet"), col));
            for (x, y) in a.iter().zip(&b) {
                let (x, y) = (x.unwrap(), y.unwrap());
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{what}: {col} {x} vs {y}");
            }
        }
    }
}
