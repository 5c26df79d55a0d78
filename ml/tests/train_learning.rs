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
