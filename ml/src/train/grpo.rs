//! The `grpo` stage's run function (metadata: `recflow::stages::grpo`).
//!
//! [`run`] reads top to bottom in nanoGPT's order, per optimizer step:
//! learning rate → evaluate / checkpoint the weights so far
//! ([`Grpo::evaluate`], [`super::trainer`]) → rollouts, every `num_iterations`
//! steps ([`Grpo::rollout`]: B prompts × G completions at temperature τ →
//! rule rewards per term → group advantages → masks
//! (`mask_truncated_completions`) → reference log-probs (β > 0; with LoRA:
//! adapters off, no copy) → old log-probs (μ > 1, recomputed by the training
//! forward as TRL does)) → micro-steps ([`Grpo::train_step`]: micro-batches by
//! token budget, chunked log-probs at τ, clipped surrogate + β·KL with TRL
//! 0.24's normalisation, see [`crate::rl::loss`]) → clip → AdamW → log.
//!
//! With `world_size` W > 1 ([`crate::dist`]) each rollout batch's B prompts
//! are cut into W blocks of B/W whole groups: rank r generates its block's
//! G completions per prompt, the rollouts are all-gathered, and every rank
//! scores the whole batch as one process would (rewards, group advantages,
//! `loss_type` weights over the global token count, batch statistics); then
//! each trains on its own groups' rows only, and the summed gradient is the
//! one-process gradient of the batch. Greedy evaluation is shared out in
//! blocks of prompts, combined in prompt order.
//!
//! Checkpoints are written only at rollout boundaries, so a resumed run
//! regenerates nothing it had consumed and loses at most the rollouts in
//! flight; every draw derives from `(seed, step)` so the regenerated ones
//! are the same. On cancellation the stage checkpoints at the next rollout
//! boundary (the next step with μ = 1) and exits.
use recflow::stages::grpo::{CollapseWatch, Config};
use recflow::stages::{Metrics, StageCtx};
use tch::{Device, Kind, Tensor};

use super::data::{read_examples, Example, Log};
use super::logprobs::{self, RunOpts, SeqBatch};
use super::optim::{zero_grad, AdamWConfig, LrSchedule};
use super::rollout::{encode_prompt, lora_config, sample, Sampled};
use super::trainer::{share_micro_index, Begin, MidStep, Setup, TrainConfig, Trainer};
use super::{derive_seed, TrainError};
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
    /// Per share of this process (share, its micro-batches): micro-batches
    /// of the share's rows trained on (all, unless `skip_zero_advantage`
    /// leaves out rows that carry no gradient).
    micro: Vec<(usize, Vec<Vec<usize>>)>,
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
        for mb in self.micro.iter().flat_map(|(_, m)| m) {
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

impl TrainConfig for Config {
    type Stage = recflow::stages::grpo::Grpo;
    const CUDA_NOTE: &'static str = "CUDA kernels (atomics in backward, sampling on GPU) are not bit-deterministic";
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
    /// Rollouts are not checkpointed: only the first of the μ steps that
    /// share a rollout batch is a boundary.
    fn boundary(&self) -> usize {
        self.num_iterations
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

/// Wall-clock and volume totals of a run, for the run record.
#[derive(Default)]
struct Totals {
    generation_s: f64,
    reference_s: f64,
    training_s: f64,
    tokens_generated: usize,
    rows: usize,
    /// Rows whose forward/backward `skip_zero_advantage` saved.
    rows_skipped: usize,
}

/// What one optimizer step accumulated over its micro-batches: the sums
/// behind the log's per-step means.
#[derive(Default)]
struct StepStats {
    /// Σ over micro-batches of the normalised loss (= the step's loss).
    loss: f64,
    /// Σ m_it · KL_it over loss-mask tokens.
    kl: f64,
    /// Σ m_it · H_it over the tokens trained on.
    entropy: f64,
    /// Loss-mask tokens whose ratio was clipped below / above.
    clip_low: f64,
    clip_high: f64,
    /// Loss-mask tokens, the skipped rows' included (as in TRL's means).
    n_mask: f64,
    /// Σ |sampling − training| log-prob of the sampled tokens, and their count.
    gap: f64,
    gap_n: usize,
}

impl StepStats {
    /// The sums as a vector (reduced over shares by [`crate::dist::Dist::sum_f64`]).
    fn to_vec(&self) -> Vec<f64> {
        vec![self.loss, self.kl, self.entropy, self.clip_low, self.clip_high, self.n_mask, self.gap, self.gap_n as f64]
    }

    fn from_vec(v: &[f64]) -> StepStats {
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        StepStats {
            loss: at(0),
            kl: at(1),
            entropy: at(2),
            clip_low: at(3),
            clip_high: at(4),
            n_mask: at(5),
            gap: at(6),
            gap_n: at(7) as usize,
        }
    }

    /// Mean KL to the reference per loss-mask token.
    fn kl_mean(&self) -> f64 {
        self.kl / self.n_mask.max(1.0)
    }

    /// The step's log row, less the evaluation columns.
    fn row<'a>(&self, r: &'a Rollouts, term_cols: &'a [String], grad_norm: f64, lr: f64) -> Vec<(&'a str, Option<f64>)> {
        let denom = self.n_mask.max(1.0);
        let mut row: Vec<(&str, Option<f64>)> = r.stats.clone();
        row.extend([
            ("kl", Some(self.kl_mean())),
            // Over the tokens trained on: the skipped rows' are not in `entropy`.
            ("entropy", (self.n_mask > r.skipped_tokens).then(|| self.entropy / (self.n_mask - r.skipped_tokens))),
            ("loss", Some(self.loss)),
            ("clip_low", Some(self.clip_low / denom)),
            ("clip_high", Some(self.clip_high / denom)),
            ("grad_norm", Some(grad_norm)),
            ("lr", Some(lr)),
            ("logprob_gap", (self.gap_n > 0).then(|| self.gap / self.gap_n as f64)),
        ]);
        for (c, v) in term_cols.iter().zip(&r.term_means) {
            row.push((c.as_str(), Some(*v)));
        }
        row
    }
}

/// Greedy answers on the validation prompts.
struct Eval {
    /// RMSE and MAE over the valid answers (None when none is valid).
    rmse: Option<f64>,
    mae: Option<f64>,
    reward: Option<f64>,
    invalid: Option<f64>,
}

/// A grpo run's data, reward and reference model.
struct Grpo<'a> {
    cfg: &'a Config,
    samples: Vec<Example>,
    prompts: Vec<Vec<i64>>,
    valid: Vec<Example>,
    valid_prompts: Vec<Vec<i64>>,
    reward_fn: RewardFn,
    /// `reward_<term>` log columns.
    term_cols: Vec<String>,
    /// Full fine-tuning with β > 0: a frozen copy of the start; with LoRA
    /// the reference is the same weights with adapters off.
    ref_model: Option<Model>,
    surrogate: Surrogate,
    /// Log-probs without gradient (reference, old policy).
    nograd: RunOpts,
    totals: Totals,
}

pub fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
    let setup = match Setup::begin(cfg, ctx)? {
        Begin::Train(s) => s,
        Begin::Launched(m) => return Ok(m),
    };
    let mut g = Grpo::new(cfg, ctx, &setup)?;
    let mut columns: Vec<&str> = LOG_COLUMNS.to_vec();
    columns.extend(g.term_cols.iter().map(String::as_str));
    let mut t = Trainer::start(setup, cfg, ctx, cfg.max_steps, &columns)?;
    ctx.log(
        "info",
        format!(
            "grpo: {} prompts, B = {} × G = {}, {} steps, μ = {}, loss_type {:?}, β = {}, {}",
            g.samples.len(),
            cfg.prompts_per_step,
            cfg.num_generations,
            cfg.max_steps,
            cfg.num_iterations,
            cfg.loss_type,
            cfg.beta,
            if t.trainee.lora { "LoRA" } else { "full fine-tuning" }
        ),
    );
    let mut watch = collapse_watch(cfg, &t.log);
    let mut ro: Option<Rollouts> = None;

    for step in t.steps() {
        let lr = t.lr(step);
        // Evaluate and checkpoint the weights after `step` updates.
        if t.eval_due(step) {
            let e = g.evaluate(&t)?;
            ctx.log("info", format!("grpo step {step}: val rmse {:?} mae {:?} invalid {:?} reward {:?}", e.rmse, e.mae, e.invalid, e.reward));
            t.record_eval(&[("val_rmse", e.rmse), ("val_reward", e.reward)], e.rmse)?;
        }
        t.checkpoint_if_due(ctx, step)?;
        if step == t.total() {
            break;
        }
        t.stop_if_cancelled(ctx, step, false)?;
        t.begin_step();
        // Rollouts: B prompts × G completions, scored, once per μ steps.
        if step % cfg.num_iterations == 0 || ro.is_none() {
            ro = Some(g.rollout(&t, step, ctx)?);
        }
        let r = ro.as_ref().ok_or_else(|| anyhow::anyhow!("no rollouts"))?;
        // Micro-steps, clip, AdamW.
        let tt = std::time::Instant::now();
        let s = g.train_step(&mut t, r, step, ctx)?;
        let grad_norm = t.update(ctx, step, s.loss, lr)?;
        g.totals.training_s += tt.elapsed().as_secs_f64();
        // Log.
        let (done, kl) = (t.state.step, s.kl_mean());
        if cfg.beta != 0.0 && kl > cfg.kl_warn_threshold {
            ctx.warn(format!(
                "grpo step {done}: KL to the reference is {kl:.3} (> kl_warn_threshold {}) — the policy is drifting fast; lower learning_rate or raise beta",
                cfg.kl_warn_threshold
            ));
        }
        t.log.push(done as i64, &s.row(r, &g.term_cols, grad_norm, lr))?;
        let stat = |c: &str| r.stats.iter().find(|x| x.0 == c).and_then(|x| x.1).unwrap_or(f64::NAN);
        if let Some(w) = watch.observe(done, stat("valid_fraction"), stat("frac_reward_zero_std"), kl) {
            ctx.warn(format!("{w} — the run goes on; lower learning_rate, or check the reward and the SFT start"));
        }
        ctx.progress(done, Some(cfg.max_steps as u64), "step");
    }

    drop(ro);
    let m = g.metrics(&t, &watch);
    if let Some(n) = recflow::stages::grpo::truncation_note(&serde_json::Value::Object(m.clone().into_iter().collect())) {
        ctx.warn(format!("grpo: {n}"));
    }
    Ok(t.finish(ctx, "best_val_rmse", m)?)
}

/// Collapse (valid fraction, zero-variance groups, KL), watched per step and
/// warned once per condition; a resumed run replays its restored `log`
/// first, so its verdict equals an uninterrupted run's.
fn collapse_watch(cfg: &Config, log: &Log) -> CollapseWatch {
    let mut watch = CollapseWatch::new(cfg.max_steps, (cfg.beta != 0.0).then_some(cfg.kl_warn_threshold));
    for (i, &s) in log.steps.iter().enumerate() {
        let at = |c: &str| log.columns.iter().position(|x| x == c).and_then(|j| log.rows[i][j]).unwrap_or(f64::NAN);
        watch.observe(s as u64, at("valid_fraction"), at("frac_reward_zero_std"), at("kl"));
    }
    watch
}

impl<'a> Grpo<'a> {
    /// The training and validation prompts, the reward, and the reference model.
    fn new(cfg: &'a Config, ctx: &StageCtx, setup: &Setup) -> anyhow::Result<Self> {
        // Full fine-tuning with β > 0 needs a frozen copy as the reference.
        let ref_model = if cfg.beta != 0.0 && !setup.trainee.lora {
            Some(Model::load(ctx.input("model")?, setup.device, setup.prec.load).map_err(|e| anyhow::anyhow!("{e}"))?)
        } else {
            None
        };
        let tok = &setup.trainee.tok;
        let samples = read_examples(ctx.input("samples")?, false)?;
        if samples.is_empty() {
            anyhow::bail!("{}: no samples to train on", ctx.input("samples")?.display());
        }
        let prompts: Vec<Vec<i64>> = samples.iter().map(|e| encode_prompt(tok, e, cfg.max_prompt_length)).collect::<Result<_, _>>()?;
        let valid: Vec<_> = read_examples(ctx.input("valid")?, false)?.into_iter().take(cfg.eval_max_samples).collect();
        let valid_prompts: Vec<Vec<i64>> = valid.iter().map(|e| encode_prompt(tok, e, cfg.max_prompt_length)).collect::<Result<_, _>>()?;
        let reward_fn = RewardFn::paper(&cfg.reward, cfg.scale);
        let term_cols = reward_fn.names().iter().map(|n| format!("reward_{n}")).collect();
        Ok(Grpo {
            cfg,
            samples,
            prompts,
            valid,
            valid_prompts,
            reward_fn,
            term_cols,
            ref_model,
            surrogate: Surrogate { epsilon_low: cfg.epsilon, epsilon_high: cfg.epsilon_high(), beta: cfg.beta },
            nograd: RunOpts {
                temperature: cfg.temperature,
                chunk: cfg.logprob_chunk_tokens,
                checkpointing: false,
                autocast: setup.prec.autocast,
                dropout_seed: None,
            },
            totals: Totals::default(),
        })
    }

    /// The rollout batch of step `step`: B prompts (the `step / μ`-th batch
    /// of the data order) × G completions at temperature τ, scored; then the
    /// reference log-probs (β > 0) and the old policy's (μ > 1).
    fn rollout(&mut self, t: &Trainer, step: usize, ctx: &mut StageCtx) -> Result<Rollouts, TrainError> {
        let cfg = self.cfg;
        let (model, r_idx) = (&t.trainee.model, (step / cfg.num_iterations) as u64);
        let tg = std::time::Instant::now();
        let idx = super::step_indices(self.samples.len(), cfg.prompts_per_step, step / cfg.num_iterations, t.seed);
        let batch_prompts: Vec<Vec<i64>> = idx.iter().map(|&i| self.prompts[i].clone()).collect();
        let req_ids: Vec<u64> = (0..idx.len() as u64).map(|b| r_idx * cfg.prompts_per_step as u64 + b).collect();
        let generate = |rows: std::ops::Range<usize>| {
            sample(
                model,
                &t.trainee.tok,
                &batch_prompts[rows.clone()],
                &req_ids[rows],
                cfg.num_generations,
                cfg.max_completion_length,
                cfg.temperature,
                cfg.top_p,
                cfg.top_k,
                derive_seed(t.seed, 0x5a3, r_idx),
                t.prec.autocast,
            )
        };
        let w = t.dist.world_size;
        let out = if w == 1 {
            generate(0..idx.len())?
        } else {
            // This process's blocks of B/W prompts, then everyone's.
            let per = idx.len() / w;
            let mine: Vec<Vec<u8>> = t.dist.shares().map(|s| generate(s * per..(s + 1) * per).map(|o| encode_groups(&o))).collect::<Result<_, _>>()?;
            let mut all = Vec::with_capacity(idx.len());
            for b in t.dist.gather_bytes(mine)? {
                all.extend(decode_groups(b)?);
            }
            all
        };
        self.totals.generation_s += tg.elapsed().as_secs_f64();
        let mut r = score(cfg, &self.reward_fn, &self.samples, &idx, &batch_prompts, out, &t.dist, ctx)?;
        self.totals.tokens_generated += r.rows.iter().map(|x| x.1.len()).sum::<usize>();
        self.totals.rows += r.rows.len();
        self.totals.rows_skipped += r.skipped_rows;
        let tr = std::time::Instant::now();
        model.set_training(false);
        if cfg.beta != 0.0 {
            r.ref_lp = Some(match &self.ref_model {
                Some(m) => r.logprobs(m, t.pad, &self.nograd)?,
                None => {
                    model.set_lora_enabled(false);
                    let lp = r.logprobs(model, t.pad, &self.nograd);
                    model.set_lora_enabled(true);
                    lp?
                }
            });
        }
        if cfg.num_iterations > 1 {
            r.old_lp = Some(r.logprobs(model, t.pad, &self.nograd)?);
        }
        self.totals.reference_s += tr.elapsed().as_secs_f64();
        Ok(r)
    }

    /// Forward + backward of step `step` over the rollouts' micro-batches:
    /// per token the clipped surrogate + β·KL ([`Surrogate::per_token`]),
    /// weighted by w_i (`loss_type`'s normalisation, [`sequence_weights`]).
    /// Gradients accumulate in the trainable tensors; the update is the
    /// caller's.
    fn train_step(&self, t: &mut Trainer, r: &Rollouts, step: usize, ctx: &mut StageCtx) -> anyhow::Result<StepStats> {
        let cfg = self.cfg;
        let device = t.device;
        t.trainee.model.set_training(true);
        zero_grad(&t.trainee.trainable);
        if !t.dist.is_ranks() && r.micro.iter().all(|(_, m)| m.is_empty()) {
            // Nothing to back-propagate: the gradient is exactly 0, and the
            // update still runs on it (AdamW's moments move, as in TRL).
            // (Ranks give every gradient a value before the all-reduce.)
            super::optim::ensure_grads(&t.trainee.trainable)?;
        }
        let tr = &*t;
        let per_share = tr.dist.backward_shares(&tr.trainee.trainable, |share| {
            let micro = r.micro.iter().find(|m| m.0 == share).map(|m| m.1.as_slice()).unwrap_or_default();
            let mut s = StepStats::default();
            for (mb_i, mb) in micro.iter().enumerate() {
                // Cancelled on the first step of a rollout batch, before the
                // update: weights and optimizer still hold the boundary's state.
                if tr.cancel_due(ctx, step) {
                    return Err(MidStep.into());
                }
                let batch = r.batch(mb, tr.pad, device)?; // b rows of mb, M = Σ completion tokens scored
                // Per-token inputs in the batch's token order.
                let cat = |f: &dyn Fn(usize) -> Vec<f32>| -> Tensor {
                    let v: Vec<f32> = mb.iter().flat_map(|&i| f(i)).collect();
                    Tensor::from_slice(&v).to_device(device)
                };
                let n_of = |i: usize| r.rows[i].1.len();
                let adv = cat(&|i| vec![r.adv[i]; n_of(i)]); // [M] A_i
                let w = cat(&|i| vec![r.weight[i] as f32; n_of(i)]); // [M] w_i
                let m = cat(&|i| vec![if r.in_loss[i] { 1.0 } else { 0.0 }; n_of(i)]); // [M] m_it
                let old = r.old_lp.as_ref().map(|o| cat(&|i| o[i].clone())); // [M] log π_old
                let refl = r.ref_lp.as_ref().map(|o| cat(&|i| o[i].clone())); // [M] log π_ref
                let opts = RunOpts {
                    temperature: cfg.temperature,
                    chunk: cfg.logprob_chunk_tokens,
                    checkpointing: cfg.gradient_checkpointing,
                    autocast: tr.prec.autocast,
                    dropout_seed: Some(derive_seed(tr.seed, step as u64, share_micro_index(share, mb_i))),
                };
                let out = logprobs::backward(&tr.trainee.model, &batch, &opts, |lp, range| {
                    // lp: [L] log π_θ of the chunk's tokens `range` of the M.
                    let (st, len) = (range.start as i64, range.len() as i64);
                    let old_c = match &old {
                        Some(o) => o.narrow(0, st, len), // [L]
                        None => lp.detach(),             // μ = 1: π_old = π_θ (ratio 1, gradient = policy gradient)
                    };
                    let ref_c = refl.as_ref().map(|x| x.narrow(0, st, len)); // [L]
                    let terms = self.surrogate.per_token(lp, &old_c, ref_c.as_ref(), &adv.narrow(0, st, len))?; // each [L]
                    let mc = m.narrow(0, st, len); // [L]
                    s.kl += (&terms.kl * &mc).sum(Kind::Double).double_value(&[]);
                    s.clip_low += (terms.low_clipped.to_kind(Kind::Float) * &mc).sum(Kind::Double).double_value(&[]);
                    s.clip_high += (terms.high_clipped.to_kind(Kind::Float) * &mc).sum(Kind::Double).double_value(&[]);
                    s.n_mask += mc.sum(Kind::Double).double_value(&[]);
                    // Σ w_i m_it ℓ_it (weights already 0 for masked rows): [] scalar.
                    Ok((terms.loss * w.narrow(0, st, len)).sum(Kind::Float))
                })?;
                s.loss += out.loss;
                s.entropy += (&out.entropy * &m).sum(Kind::Double).double_value(&[]); // out.entropy: [M]
                if step % cfg.num_iterations == 0 {
                    // Sampling-vs-training gap of the sampled tokens' log-probs.
                    let sl = cat(&|i| r.sampled_lp[i].clone()); // [M]
                    s.gap += (&out.logp - sl).abs().sum(Kind::Double).double_value(&[]); // out.logp: [M]
                    s.gap_n += batch.num_scored();
                }
            }
            Ok(s)
        });
        let per_share = t.shares_done(ctx, step, per_share)?;
        // Σ over shares in share order, then the skipped rows' tokens (which
        // count in the per-token means: exact integers, so order-free).
        let v = t.dist.sum_f64(per_share.iter().map(StepStats::to_vec).collect())?;
        let mut s = StepStats::from_vec(&v);
        s.n_mask += r.skipped_tokens;
        Ok(s)
    }

    /// Greedy answers on the validation prompts, scored by the reward. With
    /// ranks each answers a block of the prompts; the per-prompt results are
    /// then summed in prompt order, as one process sums them.
    fn evaluate(&self, t: &Trainer) -> Result<Eval, TrainError> {
        let prompts = &self.valid_prompts;
        if prompts.is_empty() {
            return Ok(Eval { rmse: None, mae: None, reward: None, invalid: None });
        }
        let (model, tok, w) = (&t.trainee.model, &t.trainee.tok, t.dist.world_size);
        // Per prompt of this process: (total reward, 1 if a rating parsed, the rating).
        let mut mine = Vec::new();
        for share in t.dist.shares() {
            let ids: Vec<u64> = crate::dist::block(prompts.len(), w, share).map(|i| i as u64).collect();
            let mut v = Vec::with_capacity(3 * ids.len());
            if !ids.is_empty() {
                let block: Vec<Vec<i64>> = ids.iter().map(|&i| prompts[i as usize].clone()).collect();
                let out = sample(model, tok, &block, &ids, 1, self.cfg.max_completion_length, 0.0, 1.0, 0, t.seed, t.prec.autocast)?;
                for (&i, g) in ids.iter().zip(&out) {
                    let s = self.reward_fn.score(&g[0].text, self.valid[i as usize].target, g[0].truncated);
                    v.extend([s.total as f64, s.rating.is_some() as u8 as f64, s.rating.unwrap_or(0.0) as f64]);
                }
            }
            mine.push(v);
        }
        let per_prompt: Vec<f64> = t.dist.gather_f64(mine)?.concat();
        let (mut n, mut se, mut ae, mut rew) = (0usize, 0f64, 0f64, 0f64);
        for (e, r) in self.valid.iter().zip(per_prompt.chunks_exact(3)) {
            rew += r[0];
            if r[1] != 0.0 {
                let y = r[2] as f32;
                n += 1;
                se += ((y - e.target) as f64).powi(2);
                ae += (y - e.target).abs() as f64;
            }
        }
        let k = prompts.len() as f64;
        Ok(Eval {
            rmse: (n > 0).then(|| (se / n as f64).sqrt()),
            mae: (n > 0).then(|| ae / n as f64),
            reward: Some(rew / k),
            invalid: Some(1.0 - n as f64 / k),
        })
    }

    /// The stage's own metrics: the learning trend from the log
    /// (deterministic: no timings), the collapse verdict, then timings.
    fn metrics(&self, t: &Trainer, watch: &CollapseWatch) -> Metrics {
        let (log, tot) = (&t.log, &self.totals);
        let mut m = Metrics::new();
        m.insert("nonfinite_steps".into(), serde_json::json!(t.nonfinite_steps()));
        // Mean sampled reward over the first and the last 10% of steps (at
        // least one step each), and the mean fraction of zero-variance groups.
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
        // Most completions cut at max_completion_length (issue 18): the
        // end-of-run table says so (recflow::stages::grpo::truncation_note).
        let trunc = mean(&log.column("truncated_fraction"));
        m.insert("truncated_fraction_mean".into(), serde_json::json!(trunc));
        m.insert("truncated_majority".into(), serde_json::json!(trunc.is_some_and(|x| x > 0.5)));
        m.insert("max_completion_length".into(), serde_json::json!(self.cfg.max_completion_length));
        for (name, v) in watch.metrics() {
            m.insert(name.into(), v);
        }
        m.insert("generation_s".into(), serde_json::json!(tot.generation_s));
        m.insert("reference_s".into(), serde_json::json!(tot.reference_s));
        m.insert("training_s".into(), serde_json::json!(tot.training_s));
        m.insert("generated_tokens_per_s".into(), serde_json::json!(tot.tokens_generated as f64 / tot.generation_s.max(1e-9)));
        m.insert("skipped_rows_fraction".into(), serde_json::json!(tot.rows_skipped as f64 / tot.rows.max(1) as f64));
        m
    }
}

/// Rewards, advantages, masks, weights, micro-batches and batch statistics
/// of one rollout batch; loud warnings when it carries no learning signal.
fn score(
    cfg: &Config,
    reward_fn: &RewardFn,
    samples: &[Example],
    idx: &[usize],
    prompts: &[Vec<i64>],
    out: Vec<Vec<Sampled>>,
    dist: &crate::dist::Dist,
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
    // Each share of this process packs its own groups' rows: prompts
    // `share·B/W ..` of the batch (all of them with one process).
    let per_share = idx.len() / dist.world_size;
    let micro = dist
        .shares()
        .map(|sh| {
            let keep: Vec<bool> = (0..n).map(|i| trains[i] && (i / g) / per_share == sh).collect();
            (sh, pack(&lens, &keep, g, cfg.max_tokens_per_microbatch, cfg.share_prompt_prefix))
        })
        .collect();
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

/// A share's rollouts for the other ranks: per prompt, its G samples.
fn encode_groups(out: &[Vec<Sampled>]) -> Vec<u8> {
    let mut w = crate::dist::Wire::default();
    w.put_u64(out.len() as u64);
    for grp in out {
        w.put_u64(grp.len() as u64);
        for s in grp {
            w.put_i64s(&s.ids);
            w.put_f32s(&s.logprobs);
            w.put_str(&s.text);
            w.put_u64(s.truncated as u64);
        }
    }
    w.buf
}

fn decode_groups(b: Vec<u8>) -> Result<Vec<Vec<Sampled>>, TrainError> {
    let mut r = crate::dist::Wire::reader(b);
    let n = r.u64()? as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let k = r.u64()? as usize;
        let mut grp = Vec::with_capacity(k);
        for _ in 0..k {
            grp.push(Sampled { ids: r.i64s()?, logprobs: r.f32s()?, text: r.str()?, truncated: r.u64()? != 0 });
        }
        out.push(grp);
    }
    Ok(out)
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
