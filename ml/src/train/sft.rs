//! The `sft` stage's run function (metadata: `recflow::stages::sft`).
//!
//! Per optimizer step, in nanoGPT's order (the loop itself is
//! [`super::trainer`]'s): learning rate → evaluate / checkpoint the weights
//! so far (val loss + greedy format-valid rate) → micro-batches (of
//! `per_device_train_batch_size` rows, or packed by
//! `max_tokens_per_microbatch`; forward + backward, loss on completion
//! tokens only, normalised by the step's completion-token count so
//! accumulation equals one big batch) → clip → AdamW → log.
//!
//! With `world_size` W > 1 ([`crate::dist`]) each step's examples (after
//! length bucketing) are dealt to W shares round-robin, so every share gets
//! a like mix of lengths; share r is rank r's, in micro-batches as above;
//! the loss keeps the step's global token count as its denominator, so the
//! ranks' summed gradients are the one-process gradient of the same batch.
//! Evaluation is shared out too: held-out chunks round-robin, validation
//! prompts in blocks, the results combined in one-process order.
use recflow::stages::sft::Config;
use recflow::stages::{Metrics, StageCtx};

use super::data::{read_examples, Example};
use super::logprobs::{self, RunOpts, SeqBatch};
use super::optim::{zero_grad, AdamWConfig, LrSchedule};
use super::rollout::{encode_prompt, lora_config, sample};
use super::trainer::{share_micro_index, Begin, MidStep, Setup, TrainConfig, Trainer};
use super::{derive_seed, step_indices, TrainError};

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
use recflow::stages::sft::is_held_out as is_val;

impl TrainConfig for Config {
    type Stage = recflow::stages::sft::Sft;
    const CUDA_NOTE: &'static str = "CUDA kernels (atomics in backward) are not bit-deterministic";
    fn seed(&self) -> Option<u64> {
        self.seed
    }
    fn dtype(&self) -> recflow::stages::sft::DType {
        self.dtype
    }
    fn lora(&self) -> Option<crate::llm::LoraConfig> {
        lora_config(self.use_peft, self.lora_r, self.lora_alpha, self.lora_dropout, &self.lora_target_modules)
    }
    fn adamw(&self) -> AdamWConfig {
        AdamWConfig { beta1: self.adam_beta1, beta2: self.adam_beta2, eps: self.adam_epsilon, weight_decay: self.weight_decay }
    }
    fn schedule(&self, total: usize) -> LrSchedule {
        LrSchedule::new(self.learning_rate, self.lr_scheduler_type, self.warmup_steps, self.warmup_ratio, total)
    }
    fn max_grad_norm(&self) -> f64 {
        self.max_grad_norm
    }
    fn eval_steps(&self) -> usize {
        self.eval_steps
    }
    fn save_steps(&self) -> usize {
        self.save_steps
    }
    fn save_minutes(&self) -> Option<f64> {
        self.save_minutes
    }
    fn load_best_model_at_end(&self) -> bool {
        self.load_best_model_at_end
    }
    fn dist(&self) -> crate::dist::Settings {
        crate::dist::Settings {
            world_size: self.world_size,
            backend: self.distributed.backend,
            timeout: std::time::Duration::from_secs(self.ddp_timeout),
        }
    }
}

/// The training rows (split into trained and held out) and the greedy
/// evaluation prompts.
struct Data {
    train: Vec<Tok>,
    held: Vec<Tok>,
    eval_prompts: Vec<Vec<i64>>,
}

impl Data {
    fn read(cfg: &Config, ctx: &StageCtx, tok: &crate::llm::Tokenizer) -> anyhow::Result<Data> {
        let rows = read_examples(ctx.input("data")?, true)?;
        if rows.is_empty() {
            anyhow::bail!("{}: no accepted rows to train on (coldstart `accepted` is false everywhere)", ctx.input("data")?.display());
        }
        let valid = read_examples(ctx.input("valid")?, false)?;
        let mut train = Vec::new();
        let mut held = Vec::new();
        for ex in &rows {
            let t = tokenize(tok, ex, cfg.max_length)?;
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
        let eval_prompts: Vec<Vec<i64>> =
            valid.iter().take(cfg.eval_max_samples).map(|e| encode_prompt(tok, e, cfg.max_length)).collect::<Result<_, _>>()?;
        Ok(Data { train, held, eval_prompts })
    }
}

/// What one optimizer step accumulated over its micro-batches.
struct StepStats {
    /// Σ over micro-batches of the normalised loss (= the step's loss).
    loss: f64,
    micro_batches: usize,
    padded_tokens: usize,
}

pub fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    let setup = match Setup::begin(cfg, ctx)? {
        Begin::Train(s) => s,
        Begin::Launched(m) => return Ok(m),
    };
    let data = Data::read(cfg, ctx, &setup.trainee.tok)?;
    let (per_step, total) = (cfg.examples_per_step(), cfg.planned_steps(data.train.len()));
    ctx.log(
        "info",
        format!(
            "sft: {} train / {} held-out rows, {} steps of {} examples, {} ({:?})",
            data.train.len(),
            data.held.len(),
            total,
            per_step,
            if setup.trainee.lora { "LoRA" } else { "full fine-tuning" },
            setup.prec
        ),
    );
    let mut t = Trainer::start(setup, cfg, ctx, total, &LOG_COLUMNS)?;
    let (mut tokens_seen, mut micro_batches) = (0usize, 0usize);

    for step in t.steps() {
        let lr = t.lr(step);
        // Evaluate and checkpoint the weights after `step` updates.
        if t.eval_due(step) {
            t.trainee.model.set_training(false);
            let (vl, vv) = evaluate(&t, &data, cfg)?;
            // Best: lowest val loss, else highest valid rate.
            t.record_eval(&[("val_loss", vl), ("val_valid_rate", vv)], vl.or(vv.map(|v| -v)))?;
        }
        t.checkpoint_if_due(ctx, step)?;
        if step == t.total() {
            break;
        }
        t.stop_if_cancelled(ctx, step, false)?;
        t.begin_step();
        let s = train_step(&mut t, &data, cfg, ctx, step, per_step)?;
        micro_batches += s.micro_batches;
        tokens_seen += s.padded_tokens;
        let grad_norm = t.update(ctx, step, s.loss, lr)?;
        let done = t.state.step;
        t.log.push(done as i64, &[("loss", Some(s.loss)), ("lr", Some(lr)), ("grad_norm", Some(grad_norm))])?;
        ctx.progress(done, Some(total as u64), "step");
    }

    let mut m = Metrics::new();
    m.insert("train_rows".into(), serde_json::json!(data.train.len()));
    m.insert("micro_batches".into(), serde_json::json!(micro_batches));
    m.insert("final_loss".into(), serde_json::json!(t.log.rows.last().and_then(|r| r[0])));
    let mut m = t.finish(ctx, "best_val_metric", m)?;
    let wall = m["wall_s"].as_f64().unwrap_or(0.0);
    m.insert("tokens_per_s".into(), serde_json::json!(tokens_seen as f64 / wall.max(1e-9)));
    Ok(m)
}

/// The forward/backward passes of optimizer step `step` (0-based) over its
/// micro-batches: the step's examples, bucketed by length when asked; loss
/// on completion tokens only, normalised by the step's completion tokens so
/// accumulation equals one big batch. With ranks, this process's shares of
/// the examples (module doc); the gradients come back summed over all.
fn train_step(t: &mut Trainer, data: &Data, cfg: &Config, ctx: &mut StageCtx, step: usize, per_step: usize) -> anyhow::Result<StepStats> {
    let train = &data.train;
    let mut idx = step_indices(train.len(), per_step, step, t.seed);
    if cfg.group_by_length {
        idx.sort_by_key(|&i| (train[i].prompt.len() + train[i].completion.len(), i));
    }
    let n_tok: usize = idx.iter().map(|&i| train[i].completion.len()).sum();
    let w = t.dist.world_size;
    let shares: Vec<Vec<usize>> = (0..w).map(|r| idx.iter().skip(r).step_by(w).copied().collect()).collect();
    t.trainee.model.set_training(true);
    zero_grad(&t.trainee.trainable);
    let tr = &*t;
    let per_share = tr.dist.backward_shares(&tr.trainee.trainable, |share| {
        let idx = &shares[share];
        let micro: Vec<Vec<usize>> = match cfg.max_tokens_per_microbatch {
            Some(budget) => {
                let lens: Vec<usize> = idx.iter().map(|&i| train[i].prompt.len() + train[i].completion.len()).collect();
                super::micro_batches(&lens, budget).into_iter().map(|mb| mb.into_iter().map(|k| idx[k]).collect()).collect()
            }
            None => idx.chunks(cfg.per_device_train_batch_size).map(<[usize]>::to_vec).collect(),
        };
        let mut s = StepStats { loss: 0.0, micro_batches: micro.len(), padded_tokens: 0 };
        for (mb, chunk) in micro.iter().enumerate() {
            // Cancelled mid-step: weights and optimizer still hold the state
            // after the previous step (the update comes last).
            if tr.cancel_due(ctx, step) {
                return Err(MidStep.into());
            }
            let rows: Vec<(&[i64], &[i64])> = chunk.iter().map(|&i| (train[i].prompt.as_slice(), train[i].completion.as_slice())).collect();
            let batch = SeqBatch::new(&rows, tr.pad, tr.device)?; // [b, T] padded
            let opts = RunOpts {
                temperature: 1.0,
                chunk: 1024,
                checkpointing: cfg.gradient_checkpointing,
                autocast: tr.prec.autocast,
                dropout_seed: Some(derive_seed(tr.seed, step as u64, share_micro_index(share, mb))),
            };
            // L = −Σ log p(completion token) / (completion tokens in the step).
            let out = logprobs::backward(&tr.trainee.model, &batch, &opts, |lp, _| Ok(-lp.sum(tch::Kind::Float) / n_tok as f64))?;
            s.loss += out.loss;
            s.padded_tokens += batch.padded_tokens();
        }
        Ok(s)
    });
    let per_share = t.shares_done(ctx, step, per_share)?;
    let sum = t.dist.sum_f64(per_share.iter().map(|s| vec![s.loss, s.micro_batches as f64, s.padded_tokens as f64]).collect())?;
    Ok(StepStats { loss: sum[0], micro_batches: sum[1] as usize, padded_tokens: sum[2] as usize })
}

/// Validation loss (mean NLL per completion token of the held-out rows) and
/// greedy format-valid rate on the validation prompts. With ranks, each
/// computes its shares (held-out chunks round-robin, prompts in blocks) and
/// the per-chunk sums are added in chunk order, as one process adds them.
fn evaluate(t: &Trainer, data: &Data, cfg: &Config) -> Result<(Option<f64>, Option<f64>), TrainError> {
    let (model, tok, pad, autocast, dist) = (&t.trainee.model, &t.trainee.tok, t.pad, t.prec.autocast, &t.dist);
    let (held, prompts) = (&data.held, &data.eval_prompts);
    let w = dist.world_size;
    let device = model.device();
    let chunks: Vec<&[Tok]> = held.chunks(cfg.per_device_train_batch_size).collect();
    let mut mine = Vec::new();
    for share in dist.shares() {
        // Per chunk: (index, Σ log p, tokens scored).
        let mut v = Vec::new();
        for (c, chunk) in chunks.iter().enumerate().filter(|(c, _)| c % w == share) {
            let rows: Vec<(&[i64], &[i64])> = chunk.iter().map(|t| (t.prompt.as_slice(), t.completion.as_slice())).collect();
            let batch = SeqBatch::new(&rows, pad, device)?;
            let opts = RunOpts { temperature: 1.0, chunk: 1024, checkpointing: false, autocast, dropout_seed: None };
            let (lp, _) = logprobs::logprobs(model, &batch, &opts)?;
            v.extend([c as f64, lp.sum(tch::Kind::Double).double_value(&[]), batch.num_scored() as f64]);
        }
        let ids: Vec<u64> = crate::dist::block(prompts.len(), w, share).map(|i| i as u64).collect();
        let ok = if ids.is_empty() {
            0
        } else {
            let mine: Vec<Vec<i64>> = ids.iter().map(|&i| prompts[i as usize].clone()).collect();
            let out = sample(model, tok, &mine, &ids, 1, cfg.eval_max_new_tokens, 0.0, 1.0, 0, t.seed, autocast)?;
            out.iter().filter(|g| recflow::answer::parse(&g[0].text, Default::default()).is_ok()).count()
        };
        v.push(ok as f64);
        mine.push(v);
    }
    let all = dist.gather_f64(mine)?;
    let mut per_chunk: Vec<(usize, f64, usize)> = Vec::with_capacity(chunks.len());
    let mut ok = 0usize;
    for v in &all {
        let (sums, tail) = v.split_at(v.len() - 1);
        ok += tail[0] as usize;
        per_chunk.extend(sums.chunks_exact(3).map(|x| (x[0] as usize, x[1], x[2] as usize)));
    }
    per_chunk.sort_by_key(|x| x.0);
    let mut nll = 0f64;
    let mut n = 0usize;
    for (_, lp, k) in per_chunk {
        nll -= lp;
        n += k;
    }
    let val_loss = (n > 0).then(|| nll / n as f64);
    let valid = (!prompts.is_empty()).then(|| ok as f64 / prompts.len() as f64);
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
