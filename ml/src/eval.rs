//! The `eval` stage's run function (metadata: `recflow::stages::eval`):
//! generate an answer for every (selected) test sample with the model under
//! evaluation, journal each sample's completions in the work dir, then score
//! them with the torch-free core `recflow::report::evaluate` (shared answer
//! grammar, declared fallback, bootstrap intervals).
//!
//! Steps: 1. read samples and train (fallback means); select `max_samples`
//! with the stage seed → 2. open the journal (resume: skip samples already
//! generated) → 3. load model + tokenizer, generate pending samples in
//! batches (greedy: τ = 0; sample: τ, top_p, `num_samples` per prompt,
//! deterministic per (seed, sample id)) → 4. score, write `metrics` and
//! `predictions`.
use std::collections::HashMap;

use recflow::report::evaluate::{metrics_json, score_one, select, write_predictions, FallbackMeans, Journal, ScoreConfig};
use recflow::report::io::{read_interactions, SampleRow};
use recflow::stages::eval::{Config, Decoding};
use recflow::stages::{Metrics, StageCtx};
use sha2::{Digest, Sha256};

use crate::llm::generate::{generate, GenConfig, GenRequest};
use crate::llm::{parse_device, parse_kind, ChatMessage, Model, Tokenizer};

/// Request id of a sample: the first 8 bytes of sha256(sample_id), so a
/// sampled answer depends only on (seed, sample id), not on batch position
/// or on how many samples a resumed run had left.
fn request_id(sample_id: &str) -> u64 {
    let h = Sha256::digest(sample_id.as_bytes());
    u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

pub fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    // 1. Samples, fallback means, selection.
    let samples_path = ctx.input("samples")?.to_path_buf();
    let samples = recflow::data::io::read_samples(&samples_path)?;
    if samples.is_empty() {
        anyhow::bail!("stage `{}`: the samples input {} is empty", ctx.stage, samples_path.display());
    }
    let means = FallbackMeans::from_ratings(&read_interactions(ctx.input("train")?)?)?;
    let messages: HashMap<String, Vec<ChatMessage>> = samples
        .iter()
        .map(|s| (s.sample_id.clone(), s.messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect()))
        .collect();
    let rows: Vec<SampleRow> = samples
        .iter()
        .map(|s| SampleRow {
            sample_id: s.sample_id.clone(),
            user_id: s.user_id.clone(),
            item_id: s.item_id.clone(),
            target: s.target as f64,
            user_history_len: s.user_history_len as i64,
        })
        .collect();
    let rows = select(rows, cfg.max_samples, ctx.seed);

    // 2. Journal: what a crashed attempt already generated.
    let (mut journal, mut done) = Journal::open(&ctx.work_dir.join("eval_journal.jsonl"))?;
    let pending: Vec<&SampleRow> = rows.iter().filter(|r| !done.contains_key(&r.sample_id)).collect();
    if !done.is_empty() {
        ctx.log("info", format!("resuming: {} of {} samples already generated", rows.len() - pending.len(), rows.len()));
    }

    // 3. Generate what is missing.
    if !pending.is_empty() {
        let model_dir = ctx.input("model")?.to_path_buf();
        let device = parse_device(&ctx.device)?;
        let model = Model::load(&model_dir, device, parse_kind(&cfg.dtype)?)?;
        let tok = Tokenizer::load(&model_dir)?;
        let greedy = cfg.decoding == Decoding::Greedy;
        let gen = GenConfig {
            max_new_tokens: cfg.max_new_tokens,
            temperature: if greedy { 0.0 } else { cfg.temperature as f64 },
            top_p: if greedy { 1.0 } else { cfg.top_p as f64 },
            stop_ids: tok.stop_token_ids(),
            pad_id: tok.pad_token_id().unwrap_or(0),
            seed: ctx.seed,
            ..GenConfig::default()
        };
        let n = if greedy { 1 } else { cfg.num_samples as usize };
        let _no_grad = tch::no_grad_guard();
        let total = rows.len() as u64;
        let mut finished = (rows.len() - pending.len()) as u64;
        let mut since_progress = 0usize;
        for chunk in pending.chunks(cfg.batch_size) {
            if ctx.is_cancelled() {
                anyhow::bail!("stage `{}` cancelled after {finished} of {total} samples (journal kept; rerun resumes)", ctx.stage);
            }
            let mut reqs = Vec::with_capacity(chunk.len());
            for r in chunk {
                let msgs = messages.get(&r.sample_id).ok_or_else(|| anyhow::anyhow!("sample {} lost its messages", r.sample_id))?;
                let text = tok.apply_chat_template(msgs, true)?;
                reqs.push(GenRequest::new(tok.encode(&text, false)?, n, request_id(&r.sample_id)));
            }
            let outs = generate(&model, &reqs, &gen)?;
            for (r, out) in chunk.iter().zip(outs) {
                let texts = out.iter().map(|o| tok.decode(&o.token_ids, true)).collect::<Result<Vec<_>, _>>()?;
                journal.append(&r.sample_id, &texts)?;
                done.insert(r.sample_id.clone(), texts);
                finished += 1;
                since_progress += 1;
            }
            if since_progress >= cfg.progress_every {
                since_progress = 0;
                ctx.progress(finished, Some(total), "samples");
            }
        }
        ctx.progress(finished, Some(total), "samples");
    }

    // 4. Score and write outputs.
    let score_cfg = ScoreConfig {
        stage: ctx.stage.clone(),
        method: cfg.method.clone().unwrap_or_else(|| ctx.stage.clone()),
        fallback: cfg.fallback,
        scale: cfg.scale(),
        reward: cfg.reward,
        bootstrap: cfg.bootstrap,
        seed: ctx.seed,
    };
    let preds: Vec<_> = rows
        .iter()
        .map(|r| score_one(r, done.get(&r.sample_id).map(Vec::as_slice).unwrap_or(&[]), &means, &score_cfg))
        .collect();
    let metrics = metrics_json(&preds, &score_cfg);
    recflow::util::write_atomic(&ctx.output("metrics")?, serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    write_predictions(&ctx.output("predictions")?, &preds)?;
    let mut flat = Metrics::new();
    for k in ["n", "rmse", "mae", "invalid_rate", "rmse_valid", "mae_valid", "exact", "reward_mean", "distinct_predictions", "pearson"] {
        flat.insert(k.into(), metrics[k].clone());
    }
    ctx.log(
        "info",
        format!(
            "{}: RMSE {} MAE {} invalid {:.3} over {} samples",
            score_cfg.method,
            metrics["rmse"],
            metrics["mae"],
            metrics["invalid_rate"].as_f64().unwrap_or(f64::NAN),
            preds.len()
        ),
    );
    Ok(flat)
}
