//! The teacher stage with `backend: local`: SmolLM2-135M (GGUF converted by
//! the LLM engine) answers through recflow's own generation engine, behind
//! the same rationalization loop and response cache as the API teacher.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use recflow::data::{Interaction, Item, Message, Sample};
use recflow::worker::ExecSpec;
use serde_json::json;

fn gguf() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("notice: {} not found (run scripts/setup.sh); local teacher test skipped", p.display());
        None
    }
}

fn spec(root: &Path, run: &str, inputs: &BTreeMap<String, Vec<PathBuf>>, config: serde_json::Value) -> ExecSpec {
    ExecSpec {
        kind: "teacher".into(),
        stage: "teacher".into(),
        config,
        inputs: inputs.clone(),
        out_dir: root.join(run).join("out"),
        work_dir: root.join(run).join("work"),
        seed: 1,
        device: "cpu".into(),
    }
}

#[test]
fn local_backend_answers_every_sample_and_reuses_cached_answers() {
    let Some(gguf) = gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("smollm2");
    recflow_ml::llm::gguf::convert(&gguf, &model).expect("GGUF converts");

    let samples: Vec<Sample> = (0..3)
        .map(|i| Sample {
            sample_id: format!("s{i}"),
            user_id: "u".into(),
            item_id: format!("i{i}"),
            timestamp: 100 + i,
            messages: vec![Message {
                role: "user".into(),
                content: format!("The user rated jazz albums 5, 4 and 5. Rate album {i} (a jazz album) from 1 to 5."),
            }],
            target: 4.0,
            user_history_len: 3,
            item_history_len: 0,
        })
        .collect();
    let dir = tmp.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    recflow::data::io::write_samples(&dir.join("samples.parquet"), &samples).unwrap();
    let train = vec![Interaction {
        user_id: "u".into(),
        item_id: "x".into(),
        rating: 5.0,
        timestamp: 1,
        review_title: None,
        review_text: None,
    }];
    recflow::data::io::write_interactions(&dir.join("train.parquet"), &train).unwrap();
    recflow::data::io::write_items(&dir.join("items.parquet"), &[Item { item_id: "x".into(), ..Default::default() }])
        .unwrap();
    let inputs: BTreeMap<String, Vec<PathBuf>> =
        ["samples", "train", "items"].iter().map(|n| (n.to_string(), vec![dir.join(format!("{n}.parquet"))])).collect();
    let cache = tmp.path().join("responses");
    let cfg = json!({
        "backend": "local", "model_dir": model, "device": "cpu", "max_tokens": 16,
        "max_rationalize": 1, "concurrency": 4, "sampling_seed": 7, "response_cache": cache,
    });
    let registry = recflow_ml::builtin_registry();
    let s1 = spec(tmp.path(), "a", &inputs, cfg.clone());
    recflow::worker::exec(&registry, &s1, Arc::new(AtomicBool::new(false))).expect("local teacher runs");
    let rows = recflow::data::io::read_coldstart(&s1.out_dir.join("coldstart.parquet")).unwrap();
    assert_eq!(rows.len(), 3, "every sample accounted for");
    assert!(rows.iter().all(|r| r.teacher == "local:smollm2"), "teacher column names the model dir");
    assert!(rows.iter().all(|r| r.completion.as_deref().is_some_and(|c| !c.is_empty())), "the model answered");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s1.out_dir.join("stats.json")).unwrap()).unwrap();
    assert!(stats["tokens_out"].as_u64().unwrap() > 0, "completion tokens are counted");
    let stored = recflow::teacher::cache::ResponseCache::open(&cache).unwrap().len();
    assert!(stored >= 3, "local answers are stored in the response cache ({stored})");

    // A rerun reuses every stored answer: identical outputs, nothing new stored.
    let s2 = spec(tmp.path(), "b", &inputs, cfg);
    recflow::worker::exec(&registry, &s2, Arc::new(AtomicBool::new(false))).unwrap();
    let rows2 = recflow::data::io::read_coldstart(&s2.out_dir.join("coldstart.parquet")).unwrap();
    assert_eq!(rows2, rows, "cached answers reproduce the output");
    assert_eq!(recflow::teacher::cache::ResponseCache::open(&cache).unwrap().len(), stored, "nothing generated twice");
}
