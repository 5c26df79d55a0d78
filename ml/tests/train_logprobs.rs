//! The memory-saving paths compute the same thing as the plain one:
//! chunked log-probs equal `log_softmax` of the full forward, gradient
//! checkpointing / chunking leave every gradient unchanged, and a batch
//! whose rows share prompts (computed once) gives the same log-probs and
//! gradients as the rows written out whole.
use recflow_ml::llm::Model;
use recflow_ml::train::logprobs::{backward, logprobs, RunOpts, SeqBatch};
use recflow_ml::train::toy::{write_toy_model, ToySpec};
use tch::{Device, Kind, Tensor};

fn opts(chunk: usize, checkpointing: bool) -> RunOpts {
    RunOpts { temperature: 0.7, chunk, checkpointing, autocast: false, dropout_seed: Some(5) }
}

#[test]
fn chunked_logprobs_match_the_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    write_toy_model(dir.path(), ToySpec::default()).unwrap();
    let m = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let rows: Vec<(Vec<i64>, Vec<i64>)> = vec![(vec![20, 21, 22], vec![30, 31]), (vec![40], vec![41, 42, 43, 44])];
    let r: Vec<(&[i64], &[i64])> = rows.iter().map(|(p, c)| (p.as_slice(), c.as_slice())).collect();
    let b = SeqBatch::new(&r, 0, Device::Cpu).unwrap();
    let (lp, ent) = logprobs(&m, &b, &opts(3, false)).unwrap();
    // Reference: full logits of each row alone, temperature 0.7.
    let mut want = Vec::new();
    for (p, c) in &rows {
        let ids: Vec<i64> = p.iter().chain(c).copied().collect();
        let t = ids.len() as i64;
        let x = Tensor::from_slice(&ids).view([1, t]);
        let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
        let logits = tch::no_grad(|| m.forward(&x, &pos, None, None).unwrap()) / 0.7; // [1, T, V]
        let ls = logits.log_softmax(-1, Kind::Float);
        for (j, &tok) in c.iter().enumerate() {
            want.push(ls.double_value(&[0, (p.len() - 1 + j) as i64, tok]));
        }
    }
    let got: Vec<f64> = Vec::<f64>::try_from(lp.to_kind(Kind::Double)).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "chunked {g} vs full {w}");
    }
    assert!(Vec::<f32>::try_from(ent).unwrap().iter().all(|&e| e > 0.0), "entropies are positive");
}

fn grads(checkpointing: bool, chunk: usize, lora: bool) -> Vec<Tensor> {
    let rows: Vec<(Vec<i64>, Vec<i64>)> = vec![(vec![20, 21, 22], vec![30, 31, 32]), (vec![40, 50], vec![41, 42])];
    let r: Vec<(&[i64], &[i64])> = rows.iter().map(|(p, c)| (p.as_slice(), c.as_slice())).collect();
    let w = [0.5f32, -1.0, 2.0, 1.5, -0.25];
    grads_of(|| SeqBatch::new(&r, 0, Device::Cpu).unwrap(), &w, checkpointing, chunk, lora.then_some(0.2)).1
}

/// Log-probs and gradients of `Σ w_t · logp_t` over `batch()` under the toy
/// model (full fine-tuning, or LoRA with this dropout).
fn grads_of(
    batch: impl Fn() -> SeqBatch,
    w: &[f32],
    checkpointing: bool,
    chunk: usize,
    lora_dropout: Option<f64>,
) -> (Tensor, Vec<Tensor>) {
    let lora = lora_dropout.is_some();
    let dir = tempfile::tempdir().unwrap();
    write_toy_model(dir.path(), ToySpec::default()).unwrap();
    let mut m = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let params = if lora {
        // Seeded under the process-wide RNG lock: the other test of this
        // binary draws from torch's global generator at the same time.
        recflow_ml::train::with_torch_seed(1, || {
            m.add_lora(&recflow_ml::llm::LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: lora_dropout.unwrap_or(0.0),
                target_modules: vec!["all-linear".into()],
            })
                .unwrap();
            // Non-zero B so the adapters carry gradient into A as well.
            for (_, t) in m.lora_parameters() {
                tch::no_grad(|| {
                    let _ = t.shallow_clone().normal_(0.0, 0.05);
                });
            }
        });
        m.set_training(true);
        m.lora_parameters()
    } else {
        let p = m.named_parameters();
        for (_, t) in &p {
            let _ = t.set_requires_grad(true);
        }
        p
    };
    let b = batch();
    let w = Tensor::from_slice(w);
    let out = backward(&m, &b, &opts(chunk, checkpointing), |lp, range| {
        Ok((lp * w.narrow(0, range.start as i64, range.len() as i64)).sum(Kind::Float))
    })
    .unwrap();
    (out.logp, params.iter().map(|(_, t)| t.grad().copy()).collect())
}

fn assert_close(a: &[Tensor], b: &[Tensor], what: &str) {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(b) {
        assert!(a.defined() && b.defined(), "{what}: every trainable tensor gets a gradient");
        let d = (a - b).abs().max().double_value(&[]);
        let s = a.abs().max().double_value(&[]).max(1e-12);
        assert!(d / s < 1e-4, "{what}: differs by {d} (scale {s})");
    }
}

#[test]
fn shared_prompt_prefixes_give_the_same_logprobs_and_gradients() {
    // Two prompts of different lengths (so the shared batch pads them), G
    // completions each, one of a single token; rows out of prompt order.
    let prompts: [&[i64]; 2] = [&[20, 21, 22], &[40, 50]];
    let rows: Vec<(usize, Vec<i64>)> =
        vec![(0, vec![30, 31, 32]), (0, vec![33]), (1, vec![41, 42]), (0, vec![34, 35]), (1, vec![43, 44, 45, 46])];
    let w: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) / 4.0).collect();
    let whole: Vec<(&[i64], &[i64])> = rows.iter().map(|(k, c)| (prompts[*k], c.as_slice())).collect();
    let shared: Vec<(usize, &[i64])> = rows.iter().map(|(k, c)| (*k, c.as_slice())).collect();
    let plain = || SeqBatch::new(&whole, 0, Device::Cpu).unwrap();
    let sh = || SeqBatch::shared(&prompts, &shared, 0, Device::Cpu).unwrap();
    assert!(sh().padded_tokens() < plain().padded_tokens(), "the prompts run once");
    for lora in [None, Some(0.0)] {
        let (lp0, g0) = grads_of(plain, &w, false, 1000, lora);
        for (ckpt, chunk) in [(false, 1000), (true, 1000), (true, 5)] {
            let (lp, g) = grads_of(sh, &w, ckpt, chunk, lora);
            let what = format!("shared prefix, lora={lora:?} checkpointing={ckpt} chunk={chunk}");
            assert_close(&[lp0.shallow_clone()], &[lp], &format!("{what}: log-probs"));
            assert_close(&g0, &g, &what);
        }
    }
    // The no-grad path agrees too.
    let dir = tempfile::tempdir().unwrap();
    write_toy_model(dir.path(), ToySpec::default()).unwrap();
    let m = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let (a, ea) = logprobs(&m, &plain(), &opts(4, false)).unwrap();
    let (b, eb) = logprobs(&m, &sh(), &opts(4, false)).unwrap();
    assert_close(&[a, ea], &[b, eb], "no-grad log-probs and entropies");
    // Malformed shared batches are errors, not panics.
    assert!(SeqBatch::shared(&prompts, &[(2, &[1][..])], 0, Device::Cpu).is_err(), "prefix index out of range");
    assert!(SeqBatch::shared(&[&[][..]], &[(0, &[1][..])], 0, Device::Cpu).is_err(), "empty prefix");
}

#[test]
fn checkpointing_and_chunking_leave_gradients_unchanged() {
    for lora in [false, true] {
        let plain = grads(false, 1000, lora);
        for (ckpt, chunk) in [(true, 1000), (false, 2), (true, 1)] {
            let g = grads(ckpt, chunk, lora);
            assert_close(&plain, &g, &format!("lora={lora} checkpointing={ckpt} chunk={chunk}"));
        }
    }
}

/// `backward`'s hand-written head gradient (log-softmax, temperature,
/// `lm_head`) against plain autograd through the full forward, for a tied
/// head (the embedding gets both gradients) and an untied one.
#[test]
fn hand_written_head_backward_matches_autograd() {
    for tied in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        write_toy_model(dir.path(), ToySpec::default()).unwrap();
        if !tied {
            let cfg_path = dir.path().join("config.json");
            let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
            cfg["tie_word_embeddings"] = serde_json::json!(false);
            std::fs::write(&cfg_path, cfg.to_string()).unwrap();
            let wpath = dir.path().join("model.safetensors");
            let mut t = Tensor::read_safetensors(&wpath).unwrap();
            let emb = t.iter().find(|(n, _)| n == "model.embed_tokens.weight").unwrap().1.shallow_clone();
            t.push(("lm_head.weight".into(), recflow_ml::train::with_torch_seed(3, || emb.randn_like() * 0.02)));
            Tensor::write_safetensors(&t, &wpath).unwrap();
        }
        let rows: Vec<(Vec<i64>, Vec<i64>)> = vec![(vec![20, 21, 22], vec![30, 31, 32]), (vec![40, 50], vec![41, 42])];
        let w = [0.5f32, -1.0, 2.0, 1.5, -0.25];
        let load = || {
            let m = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
            let p = m.named_parameters();
            assert_eq!(p.iter().any(|(n, _)| n == "lm_head.weight"), !tied);
            for (_, t) in &p {
                let _ = t.set_requires_grad(true);
            }
            (m, p)
        };
        // Reference: autograd through the full logits of each row alone.
        let (m, params) = load();
        let mut k = 0;
        for (p, c) in &rows {
            let ids: Vec<i64> = p.iter().chain(c).copied().collect();
            let t = ids.len() as i64;
            let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
            let ls = (m.forward(&Tensor::from_slice(&ids).view([1, t]), &pos, None, None).unwrap() / 0.7).log_softmax(-1, Kind::Float);
            let mut terms = Vec::new();
            for (j, &tok) in c.iter().enumerate() {
                terms.push(ls.get(0).get((p.len() - 1 + j) as i64).get(tok) * w[k] as f64);
                k += 1;
            }
            Tensor::stack(&terms, 0).sum(Kind::Float).backward();
        }
        let want: Vec<Tensor> = params.iter().map(|(_, t)| t.grad().copy()).collect();
        // backward(): chunks of 2 so the head runs several times.
        let (m, params) = load();
        let r: Vec<(&[i64], &[i64])> = rows.iter().map(|(p, c)| (p.as_slice(), c.as_slice())).collect();
        let b = SeqBatch::new(&r, 0, Device::Cpu).unwrap();
        let wt = Tensor::from_slice(&w);
        backward(&m, &b, &opts(2, false), |lp, range| Ok((lp * wt.narrow(0, range.start as i64, range.len() as i64)).sum(Kind::Float))).unwrap();
        let got: Vec<Tensor> = params.iter().map(|(_, t)| t.grad().copy()).collect();
        assert_close(&want, &got, &format!("tied {tied}: hand-written head vs autograd"));
    }
}
