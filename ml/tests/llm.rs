//! LLM engine correctness: parity with HF transformers on tiny random
//! Llama/Qwen2 models, KV-cache and batching invariants, LoRA, checkpoint
//! round trips. Reference data comes from ml/tests/py/make_tiny.py run with
//! the project venv's python (RECFLOW_PYTHON, set in .cargo/config.toml).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use recflow_ml::llm::generate::{generate, token_logprobs, FinishReason, GenConfig, GenRequest};
use recflow_ml::llm::{LoraConfig, Model};
use tch::{Device, Kind, Tensor};

pub fn python() -> PathBuf {
    std::env::var_os("RECFLOW_PYTHON")
        .map(PathBuf::from)
        .or_else(|| option_env!("RECFLOW_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python3"))
}

/// Runs make_tiny.py once per test process; returns its output dir.
fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/make_tiny.py");
        let out = std::process::Command::new(python()).arg(&script).arg(d.path()).output().expect("run python");
        assert!(
            out.status.success(),
            "make_tiny.py failed (is transformers installed in the venv? scripts/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    })
    .path()
}

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(tiny_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn case(name: &str) -> PathBuf {
    tiny_dir().join(name)
}

fn load(dir: &Path) -> Model {
    Model::load(dir, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("load {}: {e}", dir.display()))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn logprobs_match_transformers_on_tiny_llama_and_qwen2() {
    let cases = cases();
    assert_eq!(cases.len(), 6, "all six reference configs were generated");
    for dir in cases {
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let model = load(&dir);
        for (b, row) in r["input_ids"].as_array().unwrap().iter().enumerate() {
            let ids: Vec<i64> = row.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            let want: Vec<f64> = r["logprobs"][b].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let got = token_logprobs(&model, &ids).unwrap();
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-4, "{}: row {b} logprobs differ from transformers by {worst}", dir.display());
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_recompute() {
    let _g = tch::no_grad_guard();
    for name in ["qwen2_untied_gqa3", "llama_untied_gqa3_headdim"] {
        let model = load(&case(name));
        let t = 14;
        let ids = Tensor::arange_start(5, 5 + t, (Kind::Int64, Device::Cpu)).view([1, t]);
        let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
        let full = model.forward(&ids, &pos, None, None).unwrap(); // [1, T, V]
        let mut cache = recflow_ml::llm::KvCache::new(&model, 1, t);
        // Prefill 6, then a 3-token chunk (causal mask with past), then single steps.
        let mut got = vec![model.forward(&ids.narrow(1, 0, 6), &pos.narrow(1, 0, 6), None, Some(&mut cache)).unwrap()];
        got.push(model.forward(&ids.narrow(1, 6, 3), &pos.narrow(1, 6, 3), None, Some(&mut cache)).unwrap());
        for i in 9..t {
            got.push(model.forward(&ids.narrow(1, i, 1), &pos.narrow(1, i, 1), None, Some(&mut cache)).unwrap());
        }
        let inc = Tensor::cat(&got, 1);
        let d = max_diff(&full, &inc);
        assert!(d < 1e-4, "{name}: cached decoding differs from full recompute by {d}");
    }
}

#[test]
fn left_padded_row_equals_the_prompt_alone() {
    let model = load(&case("llama_untied_gqa2"));
    let short: Vec<i64> = vec![5, 9, 13, 4];
    let long: Vec<i64> = (10..21).collect();
    let cfg = GenConfig { max_new_tokens: 6, temperature: 0.0, pad_id: 0, ..Default::default() };
    let alone = generate(&model, &[GenRequest::new(short.clone(), 1, 3)], &cfg).unwrap();
    let batch = generate(&model, &[GenRequest::new(long, 1, 9), GenRequest::new(short, 1, 3)], &cfg).unwrap();
    assert_eq!(alone[0][0].token_ids, batch[1][0].token_ids, "padding must not change the short prompt's greedy tokens");
    for (a, b) in alone[0][0].logprobs.iter().zip(&batch[1][0].logprobs) {
        assert!((a - b).abs() < 1e-4, "padding changed a logprob: {a} vs {b}");
    }
    // Same for sampled decoding (randomness tied to (seed, id, sample, step)).
    let cfg = GenConfig { max_new_tokens: 8, temperature: 1.0, seed: 11, ..cfg };
    let a = generate(&model, &[GenRequest::new(vec![5, 9, 13, 4], 2, 3)], &cfg).unwrap();
    let b = generate(&model, &[GenRequest::new((30..50).collect(), 3, 8), GenRequest::new(vec![5, 9, 13, 4], 2, 3)], &cfg).unwrap();
    assert_eq!(a[0][0].token_ids, b[1][0].token_ids, "batch composition must not change a sample");
    assert_eq!(a[0][1].token_ids, b[1][1].token_ids, "batch composition must not change a sample");
}

#[test]
fn shared_prefill_group_equals_separate_runs() {
    let model = load(&case("qwen2_tied_gqa2"));
    let prompt: Vec<i64> = vec![3, 14, 15, 92, 65, 35];
    let cfg = GenConfig { max_new_tokens: 10, temperature: 0.9, top_p: 0.95, top_k: 40, seed: 5, stop_ids: vec![2], ..Default::default() };
    let group = generate(&model, &[GenRequest::new(prompt.clone(), 4, 77)], &cfg).unwrap();
    assert_eq!(group[0].len(), 4);
    for j in 0..4 {
        let alone = generate(&model, &[GenRequest { prompt_ids: prompt.clone(), num_samples: 1, id: 77, sample_offset: j }], &cfg).unwrap();
        assert_eq!(group[0][j].token_ids, alone[0][0].token_ids, "sample {j} of a group equals its separate run");
        for (a, b) in group[0][j].logprobs.iter().zip(&alone[0][0].logprobs) {
            assert!((a - b).abs() < 1e-4, "sample {j}: logprob {a} vs {b}");
        }
    }
    let distinct: std::collections::BTreeSet<_> = group[0].iter().map(|o| o.token_ids.clone()).collect();
    assert!(distinct.len() > 1, "samples of one group differ (independent randomness)");
}

#[test]
fn generation_logprobs_match_a_rescoring_pass_and_limits_hold() {
    let model = load(&case("llama_tied_gqa1"));
    let prompt: Vec<i64> = vec![7, 8, 9, 10, 11];
    let cfg = GenConfig { max_new_tokens: 12, min_new_tokens: 12, temperature: 1.0, seed: 3, stop_ids: vec![2, 5, 6, 7], ..Default::default() };
    let out = generate(&model, &[GenRequest::new(prompt.clone(), 3, 1)], &cfg).unwrap();
    for o in &out[0] {
        assert_eq!(o.token_ids.len(), 12, "min_new_tokens = max_new_tokens forces the length");
        assert_eq!(o.finish, FinishReason::Length);
        assert!(!o.token_ids[..11].iter().any(|t| cfg.stop_ids.contains(t)), "stop ids are blocked before min_new_tokens");
        let mut full = prompt.clone();
        full.extend(&o.token_ids);
        let lp = token_logprobs(&model, &full).unwrap();
        for (k, g) in o.logprobs.iter().enumerate() {
            let want = lp[prompt.len() - 1 + k];
            assert!((g - want).abs() < 1e-4, "generated logprob {g} equals rescored {want} at step {k}");
        }
    }
    // A stop id ends the sample (and is its last token).
    let cfg = GenConfig { max_new_tokens: 40, temperature: 0.0, stop_ids: (0..97).collect(), ..Default::default() };
    let out = generate(&model, &[GenRequest::new(prompt, 1, 1)], &cfg).unwrap();
    assert_eq!(out[0][0].finish, FinishReason::Stop);
    assert_eq!(out[0][0].token_ids.len(), 1, "every id stops: one token");
}

#[test]
fn lora_starts_neutral_switches_off_and_merges() {
    let _g = tch::no_grad_guard();
    let mut model = load(&case("qwen2_untied_gqa3"));
    let ids = Tensor::from_slice(&[4i64, 8, 15, 16, 23, 42]).view([1, 6]);
    let pos = Tensor::arange(6, (Kind::Int64, Device::Cpu)).view([1, 6]);
    let base = model.forward(&ids, &pos, None, None).unwrap();
    tch::manual_seed(0);
    model
        .add_lora(&LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["all-linear".into()] })
        .unwrap();
    let params = model.lora_parameters();
    assert_eq!(params.len(), 2 * 7 * 2, "A and B for 7 linears × 2 layers");
    assert_eq!(params[0].0, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "PEFT naming");
    let fresh = model.forward(&ids, &pos, None, None).unwrap();
    assert!(max_diff(&base, &fresh) < 1e-6, "B = 0: a fresh adapter changes nothing");
    for (n, t) in &params {
        if n.ends_with("lora_B.weight") {
            let mut t = t.shallow_clone();
            let _ = t.uniform_(-0.3, 0.3);
        }
    }
    let adapted = model.forward(&ids, &pos, None, None).unwrap();
    assert!(max_diff(&base, &adapted) > 1e-3, "a trained adapter changes the output");
    model.set_lora_enabled(false);
    let off = model.forward(&ids, &pos, None, None).unwrap();
    assert!(max_diff(&base, &off) < 1e-6, "adapters off = the reference model");
    model.set_lora_enabled(true);
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path()).unwrap();
    assert!(dir.path().join("adapter_model.safetensors").is_file() && dir.path().join("adapter_config.json").is_file());
    model.merge_lora();
    assert!(model.lora_parameters().is_empty());
    let merged = model.forward(&ids, &pos, None, None).unwrap();
    assert!(max_diff(&adapted, &merged) < 1e-4, "merged weights reproduce the adapted model");
}

#[test]
fn save_and_reload_round_trip_single_and_sharded() {
    let _g = tch::no_grad_guard();
    let model = load(&case("llama_untied_gqa3_headdim"));
    let ids = Tensor::from_slice(&[4i64, 8, 15, 16]).view([1, 4]);
    let pos = Tensor::arange(4, (Kind::Int64, Device::Cpu)).view([1, 4]);
    let want = model.forward(&ids, &pos, None, None).unwrap();
    let d1 = tempfile::tempdir().unwrap();
    model.save(d1.path()).unwrap();
    assert!(d1.path().join("model.safetensors").is_file(), "small models save as one file");
    assert!(d1.path().join("generation_config.json").is_file(), "side files travel with the model");
    let d2 = tempfile::tempdir().unwrap();
    model.save_with_shard_size(d2.path(), 20_000).unwrap();
    assert!(d2.path().join("model.safetensors.index.json").is_file(), "a small shard size writes an index");
    for d in [d1.path(), d2.path()] {
        let m = load(d);
        assert!(max_diff(&want, &m.forward(&ids, &pos, None, None).unwrap()) == 0.0, "reload is bit-exact");
    }
    let bf = Model::load(d1.path(), Device::Cpu, Kind::BFloat16).unwrap();
    let got = bf.forward(&ids, &pos, None, None).unwrap().to_kind(Kind::Float);
    assert!(max_diff(&want, &got) < 0.1, "bf16 forward runs and stays close");
}

#[test]
fn context_length_and_bad_weights_fail_clearly() {
    let model = load(&case("qwen2_tied_gqa2"));
    let ids = Tensor::zeros([1, 300], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(300, (Kind::Int64, Device::Cpu)).view([1, 300]);
    let e = model.forward(&ids, &pos, None, None).unwrap_err().to_string();
    assert!(e.contains("context length 256"), "too-long input names the limit: {e}");
    let d = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(case("qwen2_tied_gqa2").join(f), d.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = 65.into();
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = Model::load(d.path(), Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(e.contains("gate_proj.weight") && e.contains("shape"), "a shape mismatch names the tensor: {e}");
}

/// The SmolLM2-135M-Instruct GGUF imported once per test process, plus
/// transformers' reference on the same file.
fn smollm() -> &'static (tempfile::TempDir, serde_json::Value) {
    static S: OnceLock<(tempfile::TempDir, serde_json::Value)> = OnceLock::new();
    S.get_or_init(|| {
        let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(gguf.is_file(), "{} missing: run scripts/setup.sh", gguf.display());
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("model");
        let s = recflow_ml::llm::import::import_model(&gguf, &out).expect("import GGUF");
        assert_eq!(s.num_parameters, 134_515_008, "SmolLM2-135M parameter count");
        let refj = d.path().join("ref.json");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/smollm_ref.py");
        let o = std::process::Command::new(python()).arg(&script).arg(&gguf).arg(&out).arg(&refj).output().unwrap();
        assert!(o.status.success(), "smollm_ref.py failed: {}", String::from_utf8_lossy(&o.stderr));
        let v = serde_json::from_str(&std::fs::read_to_string(refj).unwrap()).unwrap();
        (d, v)
    })
}

#[test]
fn smollm2_gguf_import_matches_transformers() {
    let (d, r) = smollm();
    let dir = d.path().join("model");
    let tok = recflow_ml::llm::Tokenizer::load(&dir).unwrap();
    let model = load(&dir);
    for t in r["texts"].as_array().unwrap() {
        let want_ids: Vec<i64> = t["ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        let ids = tok.encode(t["text"].as_str().unwrap(), true).unwrap();
        assert_eq!(ids, want_ids, "encode(text, true) equals HF tokenizer(text)");
        let lp = token_logprobs(&model, &ids).unwrap();
        let worst = lp
            .iter()
            .zip(t["logprobs"].as_array().unwrap())
            .map(|(g, w)| (*g as f64 - w.as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 2e-4, "logprobs equal transformers' on the same dequantized GGUF (worst {worst})");
    }
    // Greedy continuation.
    let ids = tok.encode("The capital of France is", true).unwrap();
    let cfg = GenConfig { max_new_tokens: 6, temperature: 0.0, stop_ids: tok.stop_token_ids(), ..Default::default() };
    let out = generate(&model, &[GenRequest::new(ids, 1, 0)], &cfg).unwrap();
    let want: Vec<i64> = r["greedy_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(out[0][0].token_ids, want, "greedy tokens equal transformers' generate");
    let text = tok.decode(&out[0][0].token_ids, true).unwrap();
    assert!(text.starts_with(" Paris"), "greedy continuation starts with \" Paris\": {text:?}");
    // Chat template.
    for c in r["chats"].as_array().unwrap() {
        let msgs: Vec<recflow_ml::llm::ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let got = tok.apply_chat_template(&msgs, c["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(got, c["text"].as_str().unwrap(), "chat template renders exactly like transformers");
    }
    assert_eq!(tok.stop_token_ids(), vec![2], "<|im_end|> (id 2) ends generation");
}

fn worker(args: &[&str]) -> (i32, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_recflow-worker")).args(args).output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn worker_model_commands_and_doctor() {
    let (d, r) = smollm();
    let dir = d.path().join("model");
    let dir_s = dir.to_str().unwrap();
    let (code, out, err) = worker(&["model", "score", "--model", dir_s, "--text", "The capital of France is", "--json"]);
    assert_eq!(code, 0, "score succeeds: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tokens"], r["texts"][0]["ids"], "--text encodes as HF's tokenizer(text)");
    assert!(v["logprobs"][0].is_null(), "the first token has no logprob");
    let (code, out, err) = worker(&[
        "model", "generate", "--model", dir_s, "--prompt", "What is the capital of France?", "--chat",
        "--max-new-tokens", "4", "--min-new-tokens", "4", "--temperature", "0.7", "--seed", "1", "--num-samples", "2", "--json",
    ]);
    assert_eq!(code, 0, "generate succeeds: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let samples = v["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    assert!(samples.iter().all(|s| s["token_ids"].as_array().unwrap().len() == 4), "forced token count");
    let (code, _, err) = worker(&["model", "score", "--model", dir_s, "--token-ids", "1,99999999", "--json"]);
    assert_eq!(code, 2, "an out-of-vocabulary id is bad input");
    assert!(err.contains("99999999"), "the error names the id: {err}");
    let (code, out, err) = worker(&["doctor", "--json"]);
    assert_eq!(code, 0, "doctor succeeds: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["libtorch_version"].as_str().unwrap().starts_with("2.11"), "libtorch 2.11 found: {out}");
    assert!(v["threads"].as_i64().unwrap() >= 1);
}

fn run_stage(kind: &str, with: serde_json::Value, inputs: &[(&str, &Path)], seed: u64, root: &Path) -> PathBuf {
    let reg = recflow_ml::builtin_registry();
    let (meta, _) = reg.get(kind).expect("kind registered");
    let config = (meta.check)(&with).expect("config checks");
    let spec = recflow::worker::ExecSpec {
        kind: kind.into(),
        stage: kind.into(),
        config,
        inputs: inputs.iter().map(|(n, p)| (n.to_string(), vec![p.to_path_buf()])).collect(),
        out_dir: root.join("out"),
        work_dir: root.join("work"),
        seed,
        device: "cpu".into(),
    };
    recflow::worker::exec(&reg, &spec, Default::default()).unwrap_or_else(|e| panic!("{kind} failed: {e:#}"));
    root.join("out")
}

#[test]
fn model_init_and_import_stages() {
    use arrow::array::{RecordBatch, StringArray};
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("corpus.parquet");
    let texts: Vec<String> = (0..200)
        .map(|i| format!("User {i} rated the album {} stars. <analyze user>likes jazz</analyze user> <rate>{}</rate>", i % 5 + 1, i % 5 + 1))
        .collect();
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new("text", arrow::datatypes::DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![std::sync::Arc::new(StringArray::from(texts))]).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&corpus).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let with = serde_json::json!({"vocab_size": 300, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48});
    let a = run_stage("model_init", with.clone(), &[("corpus", &corpus)], 7, &d.path().join("a"));
    let b = run_stage("model_init", with.clone(), &[("corpus", &corpus)], 7, &d.path().join("b"));
    for f in ["model/model.safetensors", "model/tokenizer.json", "model/config.json", "model/tokenizer_config.json"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f} is a pure function of config, corpus and seed");
    }
    let c = run_stage("model_init", with, &[("corpus", &corpus)], 8, &d.path().join("c"));
    assert_ne!(std::fs::read(a.join("model/model.safetensors")).unwrap(), std::fs::read(c.join("model/model.safetensors")).unwrap(), "another seed, other weights");
    let dir = a.join("model");
    let model = load(&dir);
    let tok = recflow_ml::llm::Tokenizer::load(&dir).unwrap();
    assert_eq!(model.config().vocab_size as usize, tok.vocab_size(), "config vocab = tokenizer vocab");
    let ids = tok.encode("User 3 rated the album", false).unwrap();
    assert!(ids.len() < "User 3 rated the album".len(), "BPE learned merges from the corpus");
    assert_eq!(tok.decode(&ids, false).unwrap(), "User 3 rated the album", "byte-level BPE round-trips text");
    let chat = tok.apply_chat_template(&[recflow_ml::llm::ChatMessage::new("user", "hi")], true).unwrap();
    assert_eq!(chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "ChatML template");
    assert_eq!(tok.stop_token_ids(), vec![2], "<|im_end|> stops generation");
    let out = generate(&model, &[GenRequest::new(tok.encode(&chat, false).unwrap(), 2, 0)], &GenConfig { max_new_tokens: 5, ..Default::default() }).unwrap();
    assert_eq!(out[0].len(), 2, "the random model samples");
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["vocab_size"].as_i64().unwrap(), model.config().vocab_size);
    // model_import of an HF dir: validated and copied.
    let imp = run_stage("model_import", serde_json::json!({"source": dir.to_str().unwrap()}), &[], 0, &d.path().join("imp"));
    let again = load(&imp.join("model"));
    assert_eq!(again.config(), model.config(), "imported config equals the source's");
    // A bad source fails with its path in the message.
    let reg = recflow_ml::builtin_registry();
    let spec = recflow::worker::ExecSpec {
        kind: "model_import".into(), stage: "imp".into(), config: serde_json::json!({"source": "/nonexistent/x.gguf"}),
        inputs: Default::default(), out_dir: d.path().join("bad/out"), work_dir: d.path().join("bad/work"), seed: 0, device: "cpu".into(),
    };
    let e = format!("{:#}", recflow::worker::exec(&reg, &spec, Default::default()).unwrap_err());
    assert!(e.contains("/nonexistent/x.gguf"), "error names the source: {e}");
}

/// `decimal_tokens`: each one-decimal number is one token (its size in one
/// embedding), integers and other text keep the BPE's pieces, and the text
/// round-trips; without the option `3.5` stays several byte-level pieces.
#[test]
fn model_init_decimal_tokens_make_each_one_decimal_number_one_token() {
    use arrow::array::{RecordBatch, StringArray};
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("corpus.parquet");
    let texts: Vec<String> = (0..200).map(|i| format!("User: {} ratings, average {}.{}. Estimate {}.{}.", i % 20, 1 + i % 5, i % 10, 2 + i % 3, (i * 7) % 10)).collect();
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new("text", arrow::datatypes::DataType::Utf8, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![std::sync::Arc::new(StringArray::from(texts))]).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&corpus).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let base = serde_json::json!({"vocab_size": 300, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48});
    let mut with = base.clone();
    with["decimal_tokens"] = true.into();
    let on = recflow_ml::llm::Tokenizer::load(&run_stage("model_init", with, &[("corpus", &corpus)], 7, &d.path().join("on")).join("model")).unwrap();
    let off = recflow_ml::llm::Tokenizer::load(&run_stage("model_init", base, &[("corpus", &corpus)], 7, &d.path().join("off")).join("model")).unwrap();
    let text = "User: 14 ratings, average 3.5. Estimate 4.0.";
    let ids = on.encode(text, false).unwrap();
    assert_eq!(on.decode(&ids, false).unwrap(), text, "round-trips");
    for v in ["3.5", "4.0", "0.0", "9.9"] {
        let one = on.encode(v, false).unwrap();
        assert_eq!(one.len(), 1, "{v} is one token");
        assert!(ids.contains(&one[0]) || !text.contains(v), "{v} inside a sentence is the same single token");
    }
    assert!(off.encode("3.5", false).unwrap().len() > 1, "without the option the BPE splits the number");
    assert!(on.vocab_size() >= off.vocab_size() + 100, "100 tokens added");
}
