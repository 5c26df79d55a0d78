//! The `eval` stage end to end on a tiny randomly initialised model: invalid
//! answers are scored by the declared fallback (never zero error), and a
//! crashed run resumes from its journal with identical outputs.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use recflow::data::{io, Interaction, Message, Sample};
use recflow::stages::{StageCtx, StageDef};

fn interactions() -> Vec<Interaction> {
    let mut v = Vec::new();
    for u in 0..6 {
        for i in 0..5 {
            v.push(Interaction {
                user_id: format!("u{u}"),
                item_id: format!("i{i}"),
                rating: ((u + i) % 5 + 1) as f32,
                timestamp: 1_000 + (u * 10 + i) as i64,
                review_title: None,
                review_text: None,
            });
        }
    }
    v
}

fn samples() -> Vec<Sample> {
    (0..6)
        .map(|u| Sample {
            sample_id: format!("s{u}"),
            user_id: format!("u{u}"),
            item_id: "i9".into(), // unseen item → the item fallback falls back to the user mean
            timestamp: 5_000,
            messages: vec![
                Message { role: "system".into(), content: "Rate the item from 1 to 5.".into() },
                Message { role: "user".into(), content: format!("User u{u} rated five items. Predict the rating.") },
            ],
            target: 5.0,
            user_history_len: 5,
            item_history_len: 0,
        })
        .collect()
}

fn ctx(root: &Path, name: &str, inputs: BTreeMap<String, Vec<PathBuf>>, outputs: Vec<recflow::stages::OutputSpec>) -> StageCtx {
    StageCtx::for_test(name, &root.join(name), inputs, outputs)
}

#[test]
fn eval_scores_invalid_answers_by_fallback_and_resumes_from_journal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (train, samp) = (root.join("train.parquet"), root.join("test.parquet"));
    io::write_interactions(&train, &interactions()).unwrap();
    io::write_samples(&samp, &samples()).unwrap();

    // A tiny random model whose tokenizer is trained on the prompts.
    let init_cfg: recflow::stages::model_init::Config = serde_json::from_value(serde_json::json!({
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 64, "vocab_size": 300, "max_position_embeddings": 512
    }))
    .unwrap();
    let mut c = ctx(root, "init", BTreeMap::from([("corpus".to_string(), vec![samp.clone()])]), recflow::stages::model_init::ModelInit::outputs(&init_cfg));
    recflow_ml::llm::stages::run_model_init(&init_cfg, &mut c).unwrap();
    let model = c.output("model").unwrap();

    let cfg: recflow::stages::eval::Config = serde_json::from_value(serde_json::json!({
        "max_samples": 4, "max_new_tokens": 6, "device": "cpu", "bootstrap": 50, "batch_size": 2
    }))
    .unwrap();
    let inputs = BTreeMap::from([
        ("model".to_string(), vec![model]),
        ("samples".to_string(), vec![samp]),
        ("train".to_string(), vec![train]),
    ]);
    let outs = recflow::stages::eval::Eval::outputs(&cfg);
    let mut e = ctx(root, "eval", inputs.clone(), outs.clone());
    recflow_ml::eval::run(&cfg, &mut e).unwrap();
    let metrics = std::fs::read(e.output("metrics").unwrap()).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&metrics).unwrap();
    assert_eq!(m["n"], 4, "max_samples limits the scored samples");
    assert_eq!(m["fallback"], "item_mean", "the declared fallback is reported");
    // A 6-token random completion cannot be a valid answer.
    assert_eq!(m["invalid_rate"], 1.0, "random output is invalid and counted");
    assert_eq!(m["reward_mean"], -1.0, "invalid answers earn the paper's −1");
    assert!(m["rmse"].as_f64().unwrap() > 0.0, "invalid answers are never zero error");

    // Crash simulation: keep half the journal plus a torn line, drop the outputs, rerun.
    let journal = e.work_dir.join("eval_journal.jsonl");
    let full = std::fs::read_to_string(&journal).unwrap();
    let half: String = full.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&journal, format!("{half}{{\"sample_id\":\"s")).unwrap();
    std::fs::remove_dir_all(&e.out_dir).unwrap();
    std::fs::create_dir_all(&e.out_dir).unwrap();
    let mut e2 = StageCtx::for_test("eval", &root.join("eval"), inputs, outs);
    recflow_ml::eval::run(&cfg, &mut e2).unwrap();
    assert_eq!(std::fs::read(e2.output("metrics").unwrap()).unwrap(), metrics, "a resumed eval equals an uninterrupted one");
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), full, "the journal is completed, not duplicated");
}
