//! The `grpo` stage's run function (metadata: `recflow::stages::grpo`).
//!
//! Per rollout batch (every `num_iterations` optimizer steps):
//! B prompts × G completions from the generation engine (temperature τ) →
//! rule rewards (per term) → group advantages → masks (`mask_truncated_completions`)
//! → reference log-probs (β > 0; with LoRA: adapters off, no copy) → old
//! log-probs (μ > 1, recomputed by the training forward as TRL does).
//! Per optimizer step: micro-batches by token budget, chunked log-probs at
//! τ, clipped surrogate + β·KL with TRL 0.24's normalisation (see
//! [`crate::rl::loss`]) → clip → AdamW → log → evaluate → checkpoint.
//!
//! Checkpoints are written only at rollout boundaries, so a resumed run
//! regenerates nothing it had consumed and loses at most the rollouts in
//! flight; every draw derives from `(seed, step)` so the regenerated ones
//! are the same. On cancellation the stage checkpoints at the next rollout
//! boundary (the next step with μ = 1) and exits.
use recflow::stages::grpo::{CollapseWatch, Config};
use recflow::stages::{Metrics, StageCtx};
use tch::{Device, Kind, Tensor};

use super::checkpoint::{self, State};
use super::data::{read_examples, Log};
use super::logprobs::{self, RunOpts, SeqBatch};
use super::optim::{clip_grad_norm, zero_grad, AdamW, AdamWConfig, LrSchedule};
use super::rollout::{encode_prompt, load_trainee, sample, write_outputs, Sampled};
use super::{derive_seed, parse_device, Precision, TrainError};
use crate::llm::Model;
use crate::rl::advantage::group_advantages;
use crate::rl::loss::{sequence_weights, Surrogate};
use crate::rl::reward::RewardFn;

/// Pinned log columns (ARCHITECTURE "Logs"), then our extras.
pub const LOG_COLUMNS: [&str; 18] = [
    "reward_mean",
    "reward_std",
    "frac_reward_zero_std",
    "valid_fraction",
    "kl",
    "entropy",
    "loss",
    "clip_low",
    "clip_high",
    "completion_len_mean",
    "truncated_fraction",
    "grad_norm",
    "lr",
    "val_rmse",
    "val_reward",
    "batch_mae",
    "batch_rmse",
    "logprob_gap",
];

/// One batch of scored rollouts, reused for `num_iterations` steps.
struct Rollouts {
    /// `[B·G]` rows: (prompt ids, completion ids).
    rows: Vec<(Vec<i64>, Vec<i64>)>,
    sampled_lp: Vec<Vec<f32>>,
    adv: Vec<f32>,
    /// Per-row weight w_i (0 for masked truncated rows) of the loss normalisation.
    weight: Vec<f64>,
    /// Per-row loss mask (false: truncated and masked).
    in_loss: Vec<bool>,
    old_lp: Option<Vec<Vec<f32>>>,
    ref_lp: Option<Vec<Vec<f32>>>,
    /// Micro-batches of the rows trained on (all, unless `skip_zero_advantage`
    /// leaves out rows that carry no gradient).
    micro: Vec<Vec<usize>>,
    /// Loss-mask tokens of the rows left out of `micro`: they still count in
    /// the per-token means (`clip_*`, `kl`), as in TRL's.
    skipped_tokens: f64,
    skipped_rows: usize,
    /// G: rows `i` of one group (`i / G`) share their prompt.
    group_size: usize,
    /// Batches compute each group's prompt once (`share_prompt_prefix`).
    share_prefix: bool,
    stats: Vec<(&'static str, Option<f64>)>,
    term_means: Vec<f64>,
}

impl Rollouts {
    /// The rows `mb` as one batch; with `share_prefix` the prompt of each
    /// group among them runs once (when some group has ≥ 2 rows there).
    fn batch(&self, mb: &[usize], pad: i64, device: Device) -> Result<SeqBatch, TrainError> {
        if self.share_prefix {
            // `pack` keeps a group's rows adjacent: a new group starts a new prefix.
            let mut prefixes: Vec<&[i64]> = Vec::new();
            let mut rows: Vec<(usize, &[i64])> = Vec::new();
            let mut last = None;
            for &i in mb {
                if last != Some(i / self.group_size) {
                    prefixes.push(&self.rows[i].0);
                    last = Some(i / self.group_size);
                }
                rows.push((prefixes.len() - 1, &self.rows[i].1));
            }
            if prefixes.len() < rows.len() {
                return SeqBatch::shared(&prefixes, &rows, pad, device);
            }
        }
        let rows: Vec<(&[i64], &[i64])> = mb.iter().map(|&i| (self.rows[i].0.as_slice(), self.rows[i].1.as_slice())).collect();
        SeqBatch::new(&rows, pad, device)
    }

    /// Per-row no-grad log-probs of the rollouts under `model` (split back by row).
    fn logprobs(&self, model: &Model, pad: i64, opts: &RunOpts) -> Result<Vec<Vec<f32>>, TrainError> {
        let mut out = vec![Vec::new(); self.rows.len()];
        for mb in &self.micro {
            let batch = self.batch(mb, pad, model.device())?;
            let (lp, _) = logprobs::logprobs(model, &batch, opts)?;
            let lp: Vec<f32> = Vec::<f32>::try_from(lp.to_device(Device::Cpu).to_kind(Kind::Float))?;
            let mut off = 0;
            for (k, &i) in mb.iter().enumerate() {
                out[i] = lp[off..off + batch.counts[k]].to_vec();
                off += batch.counts[k];
            }
        }
        Ok(out)
    }
}

/// Micro-batches of the rollout rows with `keep[i]` (`lens[i]` = (prompt,
/// completion) lengths, G rows per group) of at most `budget` padded tokens each.
///
/// Without prefix sharing: [`super::micro_batches`] over whole rows. With
/// it, whole groups are packed (shortest first) so each prompt runs once,
/// at a cost of prompts × longest prompt + rows × longest completion; a
/// group over the budget on its own is split into runs of its rows.
fn pack(lens: &[(usize, usize)], keep: &[bool], g: usize, budget: usize, share: bool) -> Vec<Vec<usize>> {
    if !share {
        let kept: Vec<usize> = (0..lens.len()).filter(|&i| keep[i]).collect();
        let whole: Vec<usize> = kept.iter().map(|&i| lens[i].0 + lens[i].1).collect();
        return super::micro_batches(&whole, budget).into_iter().map(|mb| mb.into_iter().map(|k| kept[k]).collect()).collect();
    }
    let rows_of = |k: usize| (k * g..((k + 1) * g).min(lens.len())).filter(|&i| keep[i]);
    let n_groups = lens.len().div_ceil(g);
    let cost = |groups: &[usize]| {
        let tp = groups.iter().flat_map(|&k| rows_of(k)).map(|i| lens[i].0).max().unwrap_or(0);
        let tc = groups.iter().flat_map(|&k| rows_of(k)).map(|i| lens[i].1).max().unwrap_or(0);
        let n: usize = groups.iter().map(|&k| rows_of(k).count()).sum();
        groups.len() * tp + n * tc
    };
    let mut order: Vec<usize> = (0..n_groups).filter(|&k| rows_of(k).next().is_some()).collect();
    order.sort_by_key(|&k| (cost(&[k]), k));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let flush = |cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>| {
        if !cur.is_empty() {
            out.push(cur.iter().flat_map(|&k| rows_of(k)).collect());
            cur.clear();
        }
    };
    for k in order {
        if cost(&[k]) > budget {
            flush(&mut cur, &mut out);
            // Runs of this group's rows, shortest completions first, each
            // with its own copy of the prompt.
            let mut rows: Vec<usize> = rows_of(k).collect();
            rows.sort_by_key(|&i| (lens[i].1, i));
            let mut run: Vec<usize> = Vec::new();
            for i in rows {
                let tc = run.iter().chain([&i]).map(|&j| lens[j].1).max().unwrap_or(0);
                if !run.is_empty() && lens[i].0 + (run.len() + 1) * tc > budget {
                    run.sort_unstable();
                    out.push(std::mem::take(&mut run));
                }
                run.push(i);
            }
            run.sort_unstable();
            out.push(run);
            continue;
        }
        cur.push(k);
        if cost(&cur) > budget {
            cur.pop();
            flush(&mut cur, &mut out);
            cur.push(k);
        }
    }
    flush(&mut cur, &mut out);
    out
}

fn fingerprint(cfg: &Config, seed: u64, device: &str) -> String {
    let mut c = cfg.clone();
    for_operational(&mut c);
    checkpoint::fingerprint(&(c, seed, device))
}

fn for_operational(c: &mut Config) {
    c.save_steps = 0;
    c.max_tokens_per_microbatch = 0;
    c.logprob_chunk_tokens = 0;
    c.kl_warn_threshold = 0.0;
}

pub fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    let t0 = std::time::Instant::now();
    let (mut t_gen, mut t_ref, mut t_train) = (0f64, 0f64, 0f64);
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
    // Full fine-tuning with β > 0 needs a frozen copy as the reference;
    // with LoRA the reference is the same weights with adapters off.
    let ref_model = if cfg.beta != 0.0 && !trainee.lora {
        Some(Model::load(ctx.input("model")?, device, prec.load).map_err(|e| anyhow::anyhow!("{e}"))?)
    } else {
        None
    };
    let model = &trainee.model;
    let tok = &trainee.tok;
    let pad = tok.pad_token_id().unwrap_or(0);

    // --- data ----------------------------------------------------------------
    let samples = read_examples(ctx.input("samples")?, false)?;
    if samples.is_empty() {
        anyhow::bail!("{}: no samples to train on", ctx.input("samples")?.display());
    }
    let prompts: Vec<Vec<i64>> =
        samples.iter().map(|e| encode_prompt(tok, e, cfg.max_prompt_length)).collect::<Result<_, _>>()?;
    let valid: Vec<_> = read_examples(ctx.input("valid")?, false)?.into_iter().take(cfg.eval_max_samples).collect();
    let valid_prompts: Vec<Vec<i64>> =
        valid.iter().map(|e| encode_prompt(tok, e, cfg.max_prompt_length)).collect::<Result<_, _>>()?;
    let reward_fn = RewardFn::paper(&cfg.reward, cfg.scale);
    let term_cols: Vec<String> = reward_fn.names().iter().map(|n| format!("reward_{n}")).collect();
    let mut columns: Vec<&str> = LOG_COLUMNS.to_vec();
    columns.extend(term_cols.iter().map(String::as_str));

    // --- optimizer, schedule, resume -------------------------------------------
    let total = cfg.max_steps;
    let mu = cfg.num_iterations;
    let sched = LrSchedule::new(cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.warmup_ratio, total);
    let mut opt = AdamW::new(AdamWConfig {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    });
    let surrogate = Surrogate { epsilon_low: cfg.epsilon, epsilon_high: cfg.epsilon_high(), beta: cfg.beta };
    let fp = fingerprint(cfg, seed, &ctx.device);
    let mut log = Log::new(&columns);
    let mut state = State { step: 0, seed, fingerprint: fp.clone(), best_metric_bits: None, best_step: None };
    let mut best: Option<Vec<(String, Tensor)>> = None;
    let mut resumed_from = 0u64;
    if let Some(l) = checkpoint::load(&ctx.work_dir, &fp, device)? {
        checkpoint::copy_into(&trainee.trainable, &l.trainable)?;
        l.restore_optimizer(&mut opt, device)?;
        log = l.log;
        best = l.best;
        state = l.state;
        resumed_from = state.step;
        ctx.log("info", format!("grpo: resumed from the checkpoint at step {}", state.step));
    }
    ctx.log(
        "info",
        format!(
            "grpo: {} prompts, B = {} × G = {}, {} steps, μ = {mu}, loss_type {:?}, β = {}, {}",
            samples.len(),
            cfg.prompts_per_step,
            cfg.num_generations,
            total,
            cfg.loss_type,
            cfg.beta,
            if trainee.lora { "LoRA" } else { "full fine-tuning" }
        ),
    );
    let nograd_opts = RunOpts {
        temperature: cfg.temperature,
        chunk: cfg.logprob_chunk_tokens,
        checkpointing: false,
        autocast: prec.autocast,
        dropout_seed: None,
    };
    let mut ro: Option<Rollouts> = None;
    let mut tokens_generated = 0usize;
    let (mut rows_total, mut rows_skipped) = (0usize, 0usize);
    let mut nonfinite_steps = 0usize;
    let mut step_times: Vec<f64> = Vec::new();
    // Step of the newest checkpoint on disk (a cancel needs no second copy).
    let mut last_saved = state.step;
    let mut mem = super::StepStats::on(device);
    // Collapse (valid fraction, zero-variance groups, KL): watched per step
    // and warned once per condition; a resumed run replays its restored log
    // first, so its verdict equals an uninterrupted run's.
    let mut watch = CollapseWatch::new(total, (cfg.beta != 0.0).then_some(cfg.kl_warn_threshold));
    for (i, &s) in log.steps.iter().enumerate() {
        let at = |c: &str| log.columns.iter().position(|x| x == c).and_then(|j| log.rows[i][j]).unwrap_or(f64::NAN);
        watch.observe(s as u64, at("valid_fraction"), at("frac_reward_zero_std"), at("kl"));
    }

    // --- loop --------------------------------------------------------------------
    for step in state.step as usize..total {
        // Cancellation (Ctrl-C / SIGTERM): checkpoint at the next rollout
        // boundary and stop, so the rerun continues from exactly here. A
        // boundary, because rollouts are not checkpointed: with μ > 1 the
        // steps up to it still train on the batch in hand (at most μ − 1).
        if ctx.is_cancelled() && step % mu == 0 {
            if state.step != last_saved {
                checkpoint::save(&ctx.work_dir, &state, &trainee.trainable, &opt, best.as_deref(), &log)?;
            }
            anyhow::bail!("grpo cancelled after step {step}; checkpoint kept in the work dir, a rerun continues from it");
        }
        let lr = sched.lr(step);
        let iter = step % mu;
        let ts = std::time::Instant::now();
        mem.begin();

        // Rollouts: B prompts × G completions, scored.
        if iter == 0 || ro.is_none() {
            let r_idx = (step / mu) as u64;
            let tg = std::time::Instant::now();
            let idx = super::step_indices(samples.len(), cfg.prompts_per_step, step / mu, seed);
            let batch_prompts: Vec<Vec<i64>> = idx.iter().map(|&i| prompts[i].clone()).collect();
            let req_ids: Vec<u64> = (0..idx.len() as u64).map(|b| r_idx * cfg.prompts_per_step as u64 + b).collect();
            let out = sample(
                model,
                tok,
                &batch_prompts,
                &req_ids,
                cfg.num_generations,
                cfg.max_completion_length,
                cfg.temperature,
                cfg.top_p,
                cfg.top_k,
                derive_seed(seed, 0x5a3, r_idx),
                prec.autocast,
            )?;
            t_gen += tg.elapsed().as_secs_f64();
            let r = score(cfg, &reward_fn, &samples, &idx, &batch_prompts, out, ctx)?;
            tokens_generated += r.rows.iter().map(|x| x.1.len()).sum::<usize>();
            rows_total += r.rows.len();
            rows_skipped += r.skipped_rows;
            let mut r = r;
            let tr = std::time::Instant::now();
            model.set_training(false);
            if cfg.beta != 0.0 {
                r.ref_lp = Some(match &ref_model {
                    Some(m) => r.logprobs(m, pad, &nograd_opts)?,
                    None => {
                        model.set_lora_enabled(false);
                        let lp = r.logprobs(model, pad, &nograd_opts);
                        model.set_lora_enabled(true);
                        lp?
                    }
                });
            }
            if mu > 1 {
                r.old_lp = Some(r.logprobs(model, pad, &nograd_opts)?);
            }
            t_ref += tr.elapsed().as_secs_f64();
            ro = Some(r);
        }
        let r = ro.as_ref().ok_or_else(|| anyhow::anyhow!("no rollouts"))?;

        // Optimizer step over micro-batches.
        let tt = std::time::Instant::now();
        model.set_training(true);
        zero_grad(&trainee.trainable);
        let (mut loss_sum, mut kl_sum, mut ent_sum, mut low, mut high) = (0f64, 0f64, 0f64, 0f64, 0f64);
        let mut n_mask = r.skipped_tokens;
        if r.micro.is_empty() {
            // Nothing to back-propagate: the gradient is exactly 0, and the
            // update still runs on it (AdamW's moments move, as in TRL).
            super::optim::ensure_grads(&trainee.trainable)?;
        }
        let (mut gap_sum, mut gap_n) = (0f64, 0usize);
        for (mb_i, mb) in r.micro.iter().enumerate() {
            // Cancelled on the first step of a rollout batch, before the
            // update: weights and optimizer still hold the rollout boundary's
            // state, so it is checkpointed now instead of after the step.
            if ctx.is_cancelled() && iter == 0 {
                if state.step != last_saved {
                    checkpoint::save(&ctx.work_dir, &state, &trainee.trainable, &opt, best.as_deref(), &log)?;
                }
                anyhow::bail!("grpo cancelled during step {}; checkpoint of step {step} kept in the work dir, a rerun continues from it", step + 1);
            }
            let batch = r.batch(mb, pad, device)?;
            // Per-token inputs in the batch's token order, [M].
            let cat = |f: &dyn Fn(usize) -> Vec<f32>| -> Tensor {
                let v: Vec<f32> = mb.iter().flat_map(|&i| f(i)).collect();
                Tensor::from_slice(&v).to_device(device)
            };
            let n_of = |i: usize| r.rows[i].1.len();
            let adv = cat(&|i| vec![r.adv[i]; n_of(i)]);
            let w = cat(&|i| vec![r.weight[i] as f32; n_of(i)]);
            let m = cat(&|i| vec![if r.in_loss[i] { 1.0 } else { 0.0 }; n_of(i)]);
            let old = r.old_lp.as_ref().map(|o| cat(&|i| o[i].clone()));
            let refl = r.ref_lp.as_ref().map(|o| cat(&|i| o[i].clone()));
            let opts = RunOpts {
                temperature: cfg.temperature,
                chunk: cfg.logprob_chunk_tokens,
                checkpointing: cfg.gradient_checkpointing,
                autocast: prec.autocast,
                dropout_seed: Some(derive_seed(seed, step as u64, mb_i as u64)),
            };
            let out = logprobs::backward(model, &batch, &opts, |lp, range| {
                let (s, len) = (range.start as i64, range.len() as i64);
                let old_c = match &old {
                    Some(o) => o.narrow(0, s, len),
                    None => lp.detach(), // μ = 1: π_old = π_θ (ratio 1, gradient = policy gradient)
                };
                let ref_c = refl.as_ref().map(|t| t.narrow(0, s, len));
                let terms = surrogate.per_token(lp, &old_c, ref_c.as_ref(), &adv.narrow(0, s, len))?;
                let mc = m.narrow(0, s, len);
                kl_sum += (&terms.kl * &mc).sum(Kind::Double).double_value(&[]);
                low += (terms.low_clipped.to_kind(Kind::Float) * &mc).sum(Kind::Double).double_value(&[]);
                high += (terms.high_clipped.to_kind(Kind::Float) * &mc).sum(Kind::Double).double_value(&[]);
                n_mask += mc.sum(Kind::Double).double_value(&[]);
                // Σ w_i m_it ℓ_it (weights already 0 for masked rows).
                Ok((terms.loss * w.narrow(0, s, len)).sum(Kind::Float))
            })?;
            loss_sum += out.loss;
            ent_sum += (&out.entropy * &m).sum(Kind::Double).double_value(&[]);
            if iter == 0 {
                // Sampling-vs-training gap of the sampled tokens' log-probs.
                let sl = cat(&|i| r.sampled_lp[i].clone());
                gap_sum += (&out.logp - sl).abs().sum(Kind::Double).double_value(&[]);
                gap_n += batch.num_scored();
            }
        }
        let grad_norm = clip_grad_norm(&trainee.trainable, cfg.max_grad_norm)?;
        if !loss_sum.is_finite() || !grad_norm.is_finite() {
            nonfinite_steps += 1;
            ctx.warn(format!(
                "grpo step {}: loss {loss_sum} / grad norm {grad_norm} is NaN or infinite — update skipped",
                step + 1
            ));
        } else {
            opt.step(&trainee.trainable, lr)?;
        }
        t_train += tt.elapsed().as_secs_f64();
        step_times.push(ts.elapsed().as_secs_f64());
        mem.end();
        state.step = step as u64 + 1;
        let denom = n_mask.max(1.0);
        let kl = kl_sum / denom;
        if cfg.beta != 0.0 && kl > cfg.kl_warn_threshold {
            ctx.warn(format!(
                "grpo step {}: KL to the reference is {kl:.3} (> kl_warn_threshold {}) — the policy is drifting fast; lower learning_rate or raise beta",
                step + 1,
                cfg.kl_warn_threshold
            ));
        }

        // Evaluation.
        let last = step + 1 == total;
        let (mut val_rmse, mut val_reward) = (None, None);
        if last || (cfg.eval_steps > 0 && (step + 1) % cfg.eval_steps == 0) {
            let (rmse, rew, mae, invalid) = evaluate(model, tok, &reward_fn, &valid, &valid_prompts, cfg, seed, prec.autocast)?;
            val_rmse = rmse;
            val_reward = rew;
            ctx.log(
                "info",
                format!("grpo step {}: val rmse {rmse:?} mae {mae:?} invalid {invalid:?} reward {rew:?}", step + 1),
            );
            if let Some(m) = rmse {
                if state.best_metric().is_none_or(|b| m < b) {
                    state.best_metric_bits = Some(m.to_bits());
                    state.best_step = Some(state.step);
                    best = Some(checkpoint::snapshot(&trainee.trainable));
                }
            }
        }
        let mut row: Vec<(&str, Option<f64>)> = r.stats.clone();
        row.extend([
            ("kl", Some(kl)),
            // Over the tokens trained on: the skipped rows' are not in `ent_sum`.
            ("entropy", (n_mask > r.skipped_tokens).then(|| ent_sum / (n_mask - r.skipped_tokens))),
            ("loss", Some(loss_sum)),
            ("clip_low", Some(low / denom)),
            ("clip_high", Some(high / denom)),
            ("grad_norm", Some(grad_norm)),
            ("lr", Some(lr)),
            ("val_rmse", val_rmse),
            ("val_reward", val_reward),
            ("logprob_gap", (gap_n > 0).then(|| gap_sum / gap_n as f64)),
        ]);
        for (c, v) in term_cols.iter().zip(&r.term_means) {
            row.push((c.as_str(), Some(*v)));
        }
        log.push(state.step as i64, &row)?;
        let stat = |c: &str| r.stats.iter().find(|x| x.0 == c).and_then(|x| x.1).unwrap_or(f64::NAN);
        if let Some(w) = watch.observe(state.step, stat("valid_fraction"), stat("frac_reward_zero_std"), kl) {
            ctx.warn(format!("{w} — the run goes on; lower learning_rate, or check the reward and the SFT start"));
        }
        ctx.progress(state.step, Some(total as u64), "step");
        // Checkpoint at rollout boundaries once `save_steps` more steps are done.
        let s1 = step + 1;
        if !last && s1 % mu == 0 && s1 / cfg.save_steps != (s1 - mu) / cfg.save_steps {
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
    drop(ro);
    write_outputs(trainee, &mdir, &adir)?;
    let wall = t0.elapsed().as_secs_f64();
    let mut m = Metrics::new();
    m.insert("steps".into(), serde_json::json!(total));
    m.insert("resumed_from_step".into(), serde_json::json!(resumed_from));
    m.insert("best_step".into(), serde_json::json!(state.best_step));
    m.insert("best_val_rmse".into(), serde_json::json!(state.best_metric()));
    m.insert("nonfinite_steps".into(), serde_json::json!(nonfinite_steps));
    // The learning trend, from the log (deterministic: no timings): mean
    // sampled reward over the first and the last 10% of steps (at least one
    // step each), and the mean fraction of zero-variance groups.
    let rewards = log.column("reward_mean");
    let k = rewards.len().div_ceil(10).max(1);
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    m.insert("reward_first_decile".into(), serde_json::json!(mean(&rewards[..k.min(rewards.len())])));
    m.insert("reward_last_decile".into(), serde_json::json!(mean(&rewards[rewards.len().saturating_sub(k)..])));
    m.insert("frac_reward_zero_std_mean".into(), serde_json::json!(mean(&log.column("frac_reward_zero_std"))));
    // Lowest sampled valid fraction once the first 10% of steps are past:
    // a policy that collapses into invalid answers shows here, not in the means.
    let valid = log.column("valid_fraction");
    let after = &valid[k.min(valid.len())..];
    m.insert("valid_fraction_min_after_first_decile".into(), serde_json::json!(after.iter().copied().reduce(f64::min)));
    for (name, v) in watch.metrics() {
        m.insert(name.into(), v);
    }
    m.insert("wall_s".into(), serde_json::json!(wall));
    m.insert("generation_s".into(), serde_json::json!(t_gen));
    m.insert("reference_s".into(), serde_json::json!(t_ref));
    m.insert("training_s".into(), serde_json::json!(t_train));
    m.insert("generated_tokens_per_s".into(), serde_json::json!(tokens_generated as f64 / t_gen.max(1e-9)));
    // Rollout rows whose forward/backward `skip_zero_advantage` saved.
    m.insert("skipped_rows_fraction".into(), serde_json::json!(rows_skipped as f64 / rows_total.max(1) as f64));
    m.insert("step_s_median".into(), serde_json::json!(super::median(&step_times)));
    m.insert("peak_rss_bytes".into(), serde_json::json!(super::peak_rss_bytes()));
    mem.insert_metrics(&mut m);
    if device.is_cuda() {
        m.insert("note_cuda_determinism".into(), serde_json::json!("CUDA kernels (atomics in backward, sampling on GPU) are not bit-deterministic"));
    }
    Ok(m)
}

/// Rewards, advantages, masks, weights, micro-batches and batch statistics
/// of one rollout batch; loud warnings when it carries no learning signal.
fn score(
    cfg: &Config,
    reward_fn: &RewardFn,
    samples: &[super::data::Example],
    idx: &[usize],
    prompts: &[Vec<i64>],
    out: Vec<Vec<Sampled>>,
    ctx: &mut StageCtx,
) -> Result<Rollouts, TrainError> {
    let g = cfg.num_generations;
    let n_terms = reward_fn.names().len();
    let mut rows = Vec::new();
    let mut sampled_lp = Vec::new();
    let mut rewards = Vec::new();
    let mut term_sums = vec![0f64; n_terms];
    let mut truncated = Vec::new();
    let (mut n_valid, mut abs_err, mut sq_err) = (0usize, 0f64, 0f64);
    for (b, group) in out.into_iter().enumerate() {
        let target = samples[idx[b]].target;
        for s in group {
            let sc = reward_fn.score(&s.text, target, s.truncated);
            for (k, v) in sc.terms.iter().enumerate() {
                term_sums[k] += *v as f64;
            }
            if let Some(y) = sc.rating {
                n_valid += 1;
                abs_err += (y - target).abs() as f64;
                sq_err += ((y - target) as f64).powi(2);
            }
            rewards.push(sc.total);
            truncated.push(s.truncated);
            // The engine always returns ≥ 1 token with one log-prob each; anything
            // else would silently misalign the loss, so it is an error.
            if s.ids.is_empty() || s.logprobs.len() != s.ids.len() {
                return Err(TrainError::Invalid(format!(
                    "generation returned {} tokens with {} log-probs for prompt {b}",
                    s.ids.len(),
                    s.logprobs.len()
                )));
            }
            rows.push((prompts[b].clone(), s.ids));
            sampled_lp.push(s.logprobs);
        }
    }
    let n = rows.len();
    let a = group_advantages(&rewards, g, cfg.scale_rewards)?;
    let in_loss: Vec<bool> = truncated.iter().map(|&t| !(cfg.mask_truncated_completions && t)).collect();
    let masked_len: Vec<usize> = rows.iter().zip(&in_loss).map(|(r, &k)| if k { r.1.len() } else { 0 }).collect();
    let num_items: usize = rows.iter().map(|r| r.1.len()).sum();
    let weight = sequence_weights(cfg.loss_type, &masked_len, num_items, cfg.max_completion_length);
    // With β = 0 a row's gradient is A_i · w_i · ∇(its log-probs): 0 when
    // its advantage or its weight is.
    let skip = cfg.skip_zero_advantage && cfg.beta == 0.0;
    let trains: Vec<bool> = (0..n).map(|i| !skip || (a.adv[i] != 0.0 && weight[i] != 0.0)).collect();
    let skipped_tokens: usize = (0..n).filter(|&i| !trains[i]).map(|i| masked_len[i]).sum();
    let lens: Vec<(usize, usize)> = rows.iter().map(|r| (r.0.len(), r.1.len())).collect();
    let micro = pack(&lens, &trains, g, cfg.max_tokens_per_microbatch, cfg.share_prompt_prefix);
    let trunc_frac = truncated.iter().filter(|&&t| t).count() as f64 / n as f64;
    if a.frac_zero_std >= 1.0 {
        ctx.warn(format!(
            "grpo: every one of the {} groups has identical rewards (frac_reward_zero_std = 1): all advantages are 0 and this step teaches nothing — raise temperature or num_generations, or check the reward",
            idx.len()
        ));
    }
    if trunc_frac >= 0.9 {
        ctx.warn(format!(
            "grpo: {:.0}% of completions hit max_completion_length = {} — answers are cut before <rate>; raise max_completion_length",
            trunc_frac * 100.0,
            cfg.max_completion_length
        ));
    }
    if rewards.iter().any(|r| !r.is_finite()) {
        ctx.warn("grpo: a reward is NaN or infinite — check custom reward terms");
    }
    let stats = vec![
        ("reward_mean", Some(a.reward_mean as f64)),
        ("reward_std", Some(a.reward_std as f64)),
        ("frac_reward_zero_std", Some(a.frac_zero_std as f64)),
        ("valid_fraction", Some(n_valid as f64 / n as f64)),
        ("completion_len_mean", Some(num_items as f64 / n as f64)),
        ("truncated_fraction", Some(trunc_frac)),
        ("batch_mae", (n_valid > 0).then(|| abs_err / n_valid as f64)),
        ("batch_rmse", (n_valid > 0).then(|| (sq_err / n_valid as f64).sqrt())),
    ];
    Ok(Rollouts {
        rows,
        sampled_lp,
        adv: a.adv,
        weight,
        in_loss,
        old_lp: None,
        ref_lp: None,
        micro,
        skipped_tokens: skipped_tokens as f64,
        skipped_rows: trains.iter().filter(|&&t| !t).count(),
        group_size: g,
        share_prefix: cfg.share_prompt_prefix,
        stats,
        term_means: term_sums.iter().map(|s| s / n as f64).collect(),
    })
}

/// Greedy answers on the validation prompts: (RMSE, mean reward, MAE,
/// invalid rate). RMSE/MAE over valid answers (None when none is valid).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn evaluate(
    model: &Model,
    tok: &crate::llm::Tokenizer,
    reward_fn: &RewardFn,
    valid: &[super::data::Example],
    prompts: &[Vec<i64>],
    cfg: &Config,
    seed: u64,
    autocast: bool,
) -> Result<(Option<f64>, Option<f64>, Option<f64>, Option<f64>), TrainError> {
    if prompts.is_empty() {
        return Ok((None, None, None, None));
    }
    let ids: Vec<u64> = (0..prompts.len() as u64).collect();
    let out = sample(model, tok, prompts, &ids, 1, cfg.max_completion_length, 0.0, 1.0, 0, seed, autocast)?;
    let (mut n, mut se, mut ae, mut rew) = (0usize, 0f64, 0f64, 0f64);
    for (e, g) in valid.iter().zip(&out) {
        let s = reward_fn.score(&g[0].text, e.target, g[0].truncated);
        rew += s.total as f64;
        if let Some(y) = s.rating {
            n += 1;
            se += ((y - e.target) as f64).powi(2);
            ae += (y - e.target).abs() as f64;
        }
    }
    let k = prompts.len() as f64;
    Ok((
        (n > 0).then(|| (se / n as f64).sqrt()),
        Some(rew / k),
        (n > 0).then(|| ae / n as f64),
        Some(1.0 - n as f64 / k),
    ))
}

#[cfg(test)]
mod tests {
    use super::pack;

    #[test]
    fn packing_keeps_groups_whole_within_the_budget() {
        // 3 groups of G = 2: (prompt, completion) lengths.
        let lens = [(10, 5), (10, 7), (4, 2), (4, 3), (8, 20), (8, 1)];
        let cost = |mb: &[usize]| {
            let mut groups: Vec<usize> = mb.iter().map(|i| i / 2).collect();
            groups.dedup();
            groups.len() * mb.iter().map(|&i| lens[i].0).max().unwrap() + mb.len() * mb.iter().map(|&i| lens[i].1).max().unwrap()
        };
        for budget in [1, 20, 30, 60, 1000] {
            let mb = pack(&lens, &[true; 6], 2, budget, true);
            let mut all: Vec<usize> = mb.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..6).collect::<Vec<_>>(), "budget {budget}: every row exactly once");
            for b in &mb {
                assert!(b.len() == 1 || cost(b) <= budget, "budget {budget}: {b:?} costs {}", cost(b));
                let mut g: Vec<usize> = b.iter().map(|i| i / 2).collect();
                g.dedup();
                let (n, mut u) = (g.len(), g.clone());
                u.sort_unstable();
                u.dedup();
                assert_eq!(n, u.len(), "budget {budget}: rows of a group are adjacent in {b:?}");
            }
        }
        // Room for all: one micro-batch costing 3 prompts × 10 + 6 rows × 20 = 150.
        assert_eq!(pack(&lens, &[true; 6], 2, 150, true).len(), 1);
        assert_eq!(pack(&lens, &[true; 6], 2, 1000, true)[0].len(), 6);
        // A group over the budget alone is split into runs of its rows.
        assert_eq!(pack(&lens, &[true; 6], 2, 25, true).iter().filter(|b| b.iter().all(|i| i / 2 == 2)).count(), 2);
        // Left-out rows are in no batch; a group with none left is dropped.
        let keep = [true, false, false, false, true, true];
        for share in [true, false] {
            let mut all: Vec<usize> = pack(&lens, &keep, 2, 1000, share).into_iter().flatten().collect();
            all.sort_unstable();
            assert_eq!(all, [0, 4, 5], "share {share}");
        }
        assert!(pack(&lens, &[false; 6], 2, 1000, true).is_empty());
        // Without sharing: whole rows, as `micro_batches` packs them.
        assert_eq!(pack(&lens, &[true; 6], 2, 1000, false), super::super::micro_batches(&[15, 17, 6, 7, 28, 9], 1000));
    }
}
