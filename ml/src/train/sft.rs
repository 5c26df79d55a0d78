//! The `sft` stage's run function (metadata: `recflow::stages::sft`).
//!
//! Loop, in this order per optimizer step (nanoGPT's): learning rate →
//! micro-batches (of `per_device_train_batch_size` rows, or packed by
//! `max_tokens_per_microbatch`; forward + backward, loss on completion tokens only,
//! normalised by the step's completion-token count so accumulation equals
//! one big batch) → clip → AdamW → log → evaluate (val loss + greedy
//! format-valid rate) → checkpoint.
use recflow::stages::sft::Config;
use recflow::stages::{Metrics, StageCtx};

use super::checkpoint::{self, State};
use super::data::{read_examples, Example, Log};
use super::logprobs::{self, RunOpts, SeqBatch};
use super::optim::{clip_grad_norm, zero_grad, AdamW, AdamWConfig, LrSchedule};
use super::rollout::{encode_prompt, load_trainee, sample, write_outputs};
use super::{derive_seed, parse_device, step_indices, Precision, TrainError};

/// Pinned log columns (ARCHITECTURE "Logs").
pub const LOG_COLUMNS: [&str; 5] = ["loss", "lr", "grad_norm", "val_loss", "val_valid_rate"];

/// A tokenized training example.
struct Tok {
    prompt: Vec<i64>,
    completion: Vec<i64>,
}

fn tokenize(tok: &crate::llm::Tokenizer, ex: &Example, max_len: usize) -> Result<Tok, TrainError> {
    let mut prompt = encode_prompt(tok, ex, max_len.saturating_sub(1).max(1))?;
    let text = ex.completion.as_deref().unwrap_or_default();
    let mut completion = tok.encode(text, false).map_err(|e| TrainError::Invalid(e.to_string()))?;
    // The model must learn to stop: the completion ends with the stop token.
    if let Some(&eos) = tok.stop_token_ids().first() {
        completion.push(eos);
    }
    if prompt.len() + completion.len() > max_len {
        let keep = max_len.saturating_sub(prompt.len()).max(1);
        completion.truncate(keep);
        if prompt.len() + completion.len() > max_len {
            prompt = prompt[prompt.len() + completion.len() - max_len..].to_vec();
        }
    }
    Ok(Tok { prompt, completion })
}

/// Held out for validation loss: a stable hash of the sample id below `frac`.
fn is_val(sample_id: &str, frac: f64) -> bool {
    use sha2::Digest;
    let h = sha2::Sha256::digest(sample_id.as_bytes());
    let x = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    (x as f64 / u64::MAX as f64) < frac
}

/// The fields that change results (checkpoint fingerprint).
fn fingerprint(cfg: &Config, seed: u64, device: &str) -> String {
    let mut c = cfg.clone();
    c.save_steps = 0;
    checkpoint::fingerprint(&(c, seed, device))
}

pub fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    let t0 = std::time::Instant::now();
    let seed = cfg.seed.unwrap_or(ctx.seed);
    let device = parse_device(&ctx.device)?;
    let prec = Precision::resolve(cfg.dtype, device, cfg.use_peft);
    let lora = cfg.use_peft.then(|| crate::llm::LoraConfig {
        r: cfg.lora_r as i64,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        target_modules: cfg.lora_target_modules.clone(),
    });
    let trainee = load_trainee(ctx.input("model")?, device, prec, lora, seed)?;

    // --- data ----------------------------------------------------------------
    let rows = read_examples(ctx.input("data")?, true)?;
    if rows.is_empty() {
        anyhow::bail!("{}: no accepted rows to train on (coldstart `accepted` is false everywhere)", ctx.input("data")?.display());
    }
    let valid = read_examples(ctx.input("valid")?, false)?;
    let mut train = Vec::new();
    let mut held = Vec::new();
    for ex in &rows {
        let t = tokenize(&trainee.tok, ex, cfg.max_length)?;
        if rows.len() >= 2 && is_val(&ex.sample_id, cfg.val_fraction) {
            held.push(t);
        } else {
            train.push(t);
        }
    }
    if train.is_empty() {
        // val_fraction took everything (tiny data): train on all, validate on the last.
        train = std::mem::take(&mut held);
    }
    if held.is_empty() && cfg.val_fraction > 0.0 && train.len() >= 2 {
        held.push(train.pop().ok_or_else(|| anyhow::anyhow!("no training rows"))?);
    }
    let eval_prompts: Vec<Vec<i64>> = valid
        .iter()
        .take(cfg.eval_max_samples)
        .map(|e| encode_prompt(&trainee.tok, e, cfg.max_length))
        .collect::<Result<_, _>>()?;
    let per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps;
    let total = cfg
        .max_steps
        .unwrap_or_else(|| ((cfg.num_train_epochs * train.len() as f64) / per_step as f64).ceil().max(1.0) as usize);
    ctx.log(
        "info",
        format!(
            "sft: {} train / {} held-out rows, {} steps of {} examples, {} ({:?})",
            train.len(),
            held.len(),
            total,
            per_step,
            if trainee.lora { "LoRA" } else { "full fine-tuning" },
            prec
        ),
    );

    // --- optimizer, schedule, resume -------------------------------------------
    let sched = LrSchedule::new(cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.warmup_ratio, total);
    let mut opt = AdamW::new(AdamWConfig {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    });
    let fp = fingerprint(cfg, seed, &ctx.device);
    let mut log = Log::new(&LOG_COLUMNS);
    let mut state = State { step: 0, seed, fingerprint: fp.clone(), best_metric_bits: None, best_step: None };
    let mut best: Option<Vec<(String, tch::Tensor)>> = None;
    let mut resumed_from = 0u64;
    if let Some(l) = checkpoint::load(&ctx.work_dir, &fp, device)? {
        checkpoint::copy_into(&trainee.trainable, &l.trainable)?;
        l.restore_optimizer(&mut opt, device)?;
        log = l.log;
        best = l.best;
        state = l.state;
        resumed_from = state.step;
        ctx.log("info", format!("sft: resumed from the checkpoint at step {}", state.step));
    }
    let model = &trainee.model;
    let pad = trainee.tok.pad_token_id().unwrap_or(0);
    let mut tokens_seen = 0usize;
    let mut micro_batches = 0usize;
    let mut step_times: Vec<f64> = Vec::new();
    // Step of the newest checkpoint on disk (a cancel needs no second copy).
    let mut last_saved = state.step;
    let mut mem = super::StepStats::on(device);

    // --- loop --------------------------------------------------------------------
    for step in state.step as usize..total {
        // Cancellation (Ctrl-C / SIGTERM): checkpoint at this step boundary
        // and stop; the rerun continues from exactly here.
        if ctx.is_cancelled() {
            if state.step != last_saved {
                checkpoint::save(&ctx.work_dir, &state, &trainee.trainable, &opt, best.as_deref(), &log)?;
            }
            anyhow::bail!("sft cancelled after step {step}; checkpoint kept in the work dir, a rerun continues from it");
        }
        let lr = sched.lr(step);
        let ts = std::time::Instant::now();
        mem.begin();
        // Micro-batches: the step's examples, bucketed by length when asked.
        let mut idx = step_indices(train.len(), per_step, step, seed);
        if cfg.group_by_length {
            idx.sort_by_key(|&i| (train[i].prompt.len() + train[i].completion.len(), i));
        }
        let n_tok: usize = idx.iter().map(|&i| train[i].completion.len()).sum();
        model.set_training(true);
        zero_grad(&trainee.trainable);
        let mut loss_sum = 0f64;
        let micro: Vec<Vec<usize>> = match cfg.max_tokens_per_microbatch {
            Some(budget) => {
                let lens: Vec<usize> = idx.iter().map(|&i| train[i].prompt.len() + train[i].completion.len()).collect();
                super::micro_batches(&lens, budget).into_iter().map(|mb| mb.into_iter().map(|k| idx[k]).collect()).collect()
            }
            None => idx.chunks(cfg.per_device_train_batch_size).map(<[usize]>::to_vec).collect(),
        };
        micro_batches += micro.len();
        for (mb, chunk) in micro.iter().enumerate() {
            // Cancelled mid-step: weights and optimizer still hold the state
            // after the previous step (the update comes last), so that state
            // is checkpointed now rather than a step later — the runner's
            // grace before SIGKILL is short.
            if ctx.is_cancelled() {
                if state.step != last_saved {
                    checkpoint::save(&ctx.work_dir, &state, &trainee.trainable, &opt, best.as_deref(), &log)?;
                }
                anyhow::bail!("sft cancelled during step {}; checkpoint of step {step} kept in the work dir, a rerun continues from it", step + 1);
            }
            let rows: Vec<(&[i64], &[i64])> =
                chunk.iter().map(|&i| (train[i].prompt.as_slice(), train[i].completion.as_slice())).collect();
            let batch = SeqBatch::new(&rows, pad, device)?;
            let opts = RunOpts {
                temperature: 1.0,
                chunk: 1024,
                checkpointing: cfg.gradient_checkpointing,
                autocast: prec.autocast,
                dropout_seed: Some(derive_seed(seed, step as u64, mb as u64)),
            };
            // L = −Σ log p(completion token) / (completion tokens in the step).
            let out = logprobs::backward(model, &batch, &opts, |lp, _| Ok(-lp.sum(tch::Kind::Float) / n_tok as f64))?;
            loss_sum += out.loss;
            tokens_seen += batch.padded_tokens();
        }
        let grad_norm = clip_grad_norm(&trainee.trainable, cfg.max_grad_norm)?;
        if !loss_sum.is_finite() || !grad_norm.is_finite() {
            ctx.warn(format!("sft step {}: loss {loss_sum} / grad norm {grad_norm} is not finite — skipping the update", step + 1));
        } else {
            opt.step(&trainee.trainable, lr)?;
        }
        state.step = step as u64 + 1;
        step_times.push(ts.elapsed().as_secs_f64());
        mem.end();

        // Evaluation: every eval_steps and after the last step.
        let last = step + 1 == total;
        let (mut val_loss, mut val_valid) = (None, None);
        if last || (cfg.eval_steps > 0 && (step + 1) % cfg.eval_steps == 0) {
            model.set_training(false);
            let (vl, vv) = evaluate(model, &trainee.tok, &held, &eval_prompts, cfg, pad, prec.autocast, seed)?;
            val_loss = vl;
            val_valid = vv;
            // Best: lowest val loss, else highest valid rate.
            let metric = vl.or(vv.map(|v| -v));
            if let Some(m) = metric {
                if state.best_metric().is_none_or(|b| m < b) {
                    state.best_metric_bits = Some(m.to_bits());
                    state.best_step = Some(state.step);
                    best = Some(checkpoint::snapshot(&trainee.trainable));
                }
            }
        }
        log.push(
            state.step as i64,
            &[
                ("loss", Some(loss_sum)),
                ("lr", Some(lr)),
                ("grad_norm", Some(grad_norm)),
                ("val_loss", val_loss),
                ("val_valid_rate", val_valid),
            ],
        )?;
        ctx.progress(state.step, Some(total as u64), "step");
        if !last && state.step.is_multiple_of(cfg.save_steps as u64) {
            checkpoint::save(&ctx.work_dir, &state, &trainee.trainable, &opt, best.as_deref(), &log)?;
            last_saved = state.step;
        }
    }

    // --- outputs -------------------------------------------------------------------
    if cfg.load_best_model_at_end {
        if let Some(b) = &best {
            checkpoint::copy_into(&trainee.trainable, b)?;
        }
    }
    log.write(&ctx.output("log")?)?;
    let (mdir, adir) = (ctx.output("model")?, ctx.output("adapter")?);
    let last_row = log.rows.last().cloned().unwrap_or_default();
    write_outputs(trainee, &mdir, &adir)?;
    let mut m = Metrics::new();
    m.insert("steps".into(), serde_json::json!(total));
    m.insert("resumed_from_step".into(), serde_json::json!(resumed_from));
    m.insert("train_rows".into(), serde_json::json!(train.len()));
    m.insert("micro_batches".into(), serde_json::json!(micro_batches));
    m.insert("final_loss".into(), serde_json::json!(last_row.first().copied().flatten()));
    m.insert("best_step".into(), serde_json::json!(state.best_step));
    m.insert("best_val_metric".into(), serde_json::json!(state.best_metric()));
    m.insert("wall_s".into(), serde_json::json!(t0.elapsed().as_secs_f64()));
    m.insert("tokens_per_s".into(), serde_json::json!(tokens_seen as f64 / t0.elapsed().as_secs_f64().max(1e-9)));
    m.insert("step_s_median".into(), serde_json::json!(super::median(&step_times)));
    m.insert("peak_rss_bytes".into(), serde_json::json!(super::peak_rss_bytes()));
    mem.insert_metrics(&mut m);
    if device.is_cuda() {
        m.insert("note_cuda_determinism".into(), serde_json::json!("CUDA kernels (atomics in backward) are not bit-deterministic"));
    }
    Ok(m)
}

/// Validation loss (mean NLL per completion token of the held-out rows) and
/// greedy format-valid rate on the validation prompts.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    model: &crate::llm::Model,
    tok: &crate::llm::Tokenizer,
    held: &[Tok],
    prompts: &[Vec<i64>],
    cfg: &Config,
    pad: i64,
    autocast: bool,
    seed: u64,
) -> Result<(Option<f64>, Option<f64>), TrainError> {
    let device = model.device();
    let mut nll = 0f64;
    let mut n = 0usize;
    for chunk in held.chunks(cfg.per_device_train_batch_size) {
        let rows: Vec<(&[i64], &[i64])> = chunk.iter().map(|t| (t.prompt.as_slice(), t.completion.as_slice())).collect();
        let batch = SeqBatch::new(&rows, pad, device)?;
        let opts = RunOpts { temperature: 1.0, chunk: 1024, checkpointing: false, autocast, dropout_seed: None };
        let (lp, _) = logprobs::logprobs(model, &batch, &opts)?;
        nll -= lp.sum(tch::Kind::Double).double_value(&[]);
        n += batch.num_scored();
    }
    let val_loss = (n > 0).then(|| nll / n as f64);
    let valid = if prompts.is_empty() {
        None
    } else {
        let ids: Vec<u64> = (0..prompts.len() as u64).collect();
        let out = sample(model, tok, prompts, &ids, 1, cfg.eval_max_new_tokens, 0.0, 1.0, 0, seed, autocast)?;
        let ok = out.iter().filter(|g| recflow::answer::parse(&g[0].text, Default::default()).is_ok()).count();
        Some(ok as f64 / prompts.len() as f64)
    };
    Ok((val_loss, valid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_indices_walk_epochs_without_gaps() {
        // 5 examples, 3 per step: steps 0 and 1 cover epoch 0 once, plus one of epoch 1.
        let a = step_indices(5, 3, 0, 9);
        let b = step_indices(5, 3, 1, 9);
        let mut first: Vec<usize> = a.iter().chain(&b[..2]).copied().collect();
        first.sort();
        assert_eq!(first, vec![0, 1, 2, 3, 4], "an epoch visits every example once");
        assert_eq!(step_indices(5, 3, 1, 9), b, "indices are a pure function of (seed, step)");
    }

    #[test]
    fn held_out_split_is_stable() {
        let n = (0..1000).filter(|i| is_val(&format!("s{i}"), 0.1)).count();
        assert!((50..150).contains(&n), "about 10% held out, got {n}");
        assert_eq!(is_val("s1", 0.1), is_val("s1", 0.1));
    }
}
