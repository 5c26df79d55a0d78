//! The training core shared by `sft` and `grpo`: what both stages do around
//! their own forward/backward.
//!
//! * [`TrainConfig`] — the settings both stage configs carry under the same
//!   flat YAML names (placement, LoRA, AdamW, schedule, clipping, evaluation
//!   and checkpoint intervals), read through one trait;
//! * [`fingerprint`] — the checkpoint fingerprint: the config minus its
//!   stage's `OPERATIONAL` fields, plus seed and device;
//! * [`Setup`] — the model loaded for training ([`Setup::load`]);
//! * [`Trainer`] — optimizer, schedule, resume, the checkpoint and
//!   cancellation policy, best-weights tracking, per-step resource figures,
//!   and [`Trainer::finish`], which writes the outputs and the common metrics.
//!
//! A stage's loop reads, per optimizer step `s` (nanoGPT's order):
//! `lr(s)` → evaluate / checkpoint the weights after `s` updates (the top of
//! the loop, as nanoGPT does; values go into row `s` of the log) → stop if
//! cancelled → micro-steps → [`Trainer::update`] (clip → AdamW) → log row
//! `s + 1`. Evaluating at the top of the next iteration sees exactly the
//! weights an evaluation right after the update would; the checkpoint comes
//! after it, so a checkpoint always holds the evaluated log row.
//!
//! Checkpoints (and cancellation) happen only at *boundaries*: every step
//! for `sft`, the first step of each rollout batch for `grpo`
//! ([`TrainConfig::boundary`]), since rollouts in flight are not saved.
//!
//! Data parallelism ([`crate::dist`]): [`Setup::begin`] decides whether this
//! process trains alone, as one of `world_size` ranks, or launches the
//! ranks; the stages compute their shares of each step through
//! [`Trainer::dist`] (which sums the gradients), and the trainer makes rank
//! 0 alone write checkpoints and outputs, all ranks resume from the same
//! checkpoint, and a stop is decided by all ranks together.
use std::time::Instant;

use recflow::stages::sft::DType;
use recflow::stages::{Metrics, StageCtx, StageDef};
use serde::Serialize;
use tch::{Device, Tensor};

use super::checkpoint::{self, State};
use crate::dist::{Dist, Settings, Start};
use super::data::Log;
use super::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use super::rollout::{load_trainee, write_outputs, Trainee};
use super::{Precision, StepMeter};
use crate::llm::LoraConfig;

/// The training settings `sft` and `grpo` share, over each config's own
/// (flat, TRL-named) fields.
pub trait TrainConfig: Serialize + Default {
    /// The stage metadata: `KIND` for messages, `OPERATIONAL` for the fingerprint.
    type Stage: StageDef<Config = Self>;
    /// Metric note on CUDA runs: what makes their bits vary.
    const CUDA_NOTE: &'static str;
    /// Overrides the pipeline seed.
    fn seed(&self) -> Option<u64>;
    fn dtype(&self) -> DType;
    /// LoRA adapters to add, None for full fine-tuning.
    fn lora(&self) -> Option<LoraConfig>;
    fn adamw(&self) -> AdamWConfig;
    /// The learning-rate schedule over `total` optimizer steps.
    fn schedule(&self, total: usize) -> LrSchedule;
    /// Global gradient-norm clip (0 disables).
    fn max_grad_norm(&self) -> f64;
    /// Evaluate every N steps (and after the last); 0 = only at the end.
    fn eval_steps(&self) -> usize;
    /// Checkpoint once N more steps are done (at the next boundary).
    fn save_steps(&self) -> usize;
    /// Also checkpoint once this many minutes passed since the last
    /// checkpoint (or the start), at the next boundary; None = the default
    /// ([`recflow::stages::sft::DEFAULT_SAVE_MINUTES`]).
    fn save_minutes(&self) -> Option<f64>;
    /// Steps between boundaries, where nothing in flight is lost by a
    /// checkpoint (grpo: `num_iterations`, the steps sharing one rollout batch).
    fn boundary(&self) -> usize {
        1
    }
    fn load_best_model_at_end(&self) -> bool;
    /// `world_size`, `distributed.backend`, `ddp_timeout`.
    fn dist(&self) -> Settings;
}

/// The CPU numerics profile of this process for a checkpoint (None on CUDA,
/// where ATen's CPU capability and MKL's branch do not decide the bytes).
fn cpu_profile(device: Device, world: usize) -> Option<recflow::numerics::Profile> {
    if device != Device::Cpu {
        return None;
    }
    // The request as the worker got it (none for a worker started by hand).
    let req = std::env::var_os(recflow::numerics::ENV).and_then(|_| recflow::numerics::Request::from_env().ok()).map(|r| r.resolve());
    let mut p = crate::numerics::observe(req.as_ref());
    p.world_size = (world > 1).then_some(world as u32);
    Some(p)
}

/// sha256 of (config minus `C::Stage::OPERATIONAL`, seed, device): a
/// checkpoint written under another fingerprint is refused.
///
/// An operational field is set to the zero of its JSON type rather than
/// removed: that is what the stages wrote by hand before this function
/// existed, so a checkpoint of an interrupted run stays usable. A field the
/// default config leaves out of its serialized form (an option added later
/// and skipped while unset, e.g. `ddp_timeout`, `save_minutes`) is removed
/// instead, so setting it moves nothing either.
pub fn fingerprint<C: TrainConfig + Default>(cfg: &C, seed: u64, device: &str) -> anyhow::Result<String> {
    use serde_json::Value;
    let mut v = serde_json::to_value(cfg)?;
    let dflt = serde_json::to_value(C::default())?;
    for path in C::Stage::OPERATIONAL {
        if !path.contains('.') && dflt.get(path).is_none() {
            if let Some(o) = v.as_object_mut() {
                // Keeps the other keys in order (serde_json preserves order here).
                o.shift_remove(*path);
            }
            continue;
        }
        let mut at = Some(&mut v);
        for part in path.split('.') {
            at = at.and_then(|x| x.get_mut(part));
        }
        if let Some(x) = at {
            *x = match x {
                Value::Number(n) if n.is_f64() => Value::from(0.0),
                Value::Number(_) => Value::from(0),
                Value::Bool(_) => Value::Bool(false),
                Value::String(_) => Value::String(String::new()),
                Value::Array(_) => Value::Array(Vec::new()),
                Value::Object(_) => Value::Object(Default::default()),
                Value::Null => Value::Null,
            };
        }
    }
    Ok(checkpoint::fingerprint(&(v, seed, device)))
}

/// A cancellation a stage's micro-batch loop noticed ([`Trainer::cancel_due`]):
/// the stage then calls [`Trainer::stop_if_cancelled`] with `during`.
#[derive(Debug, thiserror::Error)]
#[error("cancelled between micro-batches")]
pub struct MidStep;

/// The dropout-stream index of micro-batch `mb` of share `share` of a step
/// ([`crate::dist`]): `mb` for share 0, so one process draws what it always drew.
pub fn share_micro_index(share: usize, mb: usize) -> u64 {
    ((share as u64) << 20) | mb as u64
}

/// The model loaded for training, before the data decides the step count.
pub struct Setup {
    pub trainee: Trainee,
    pub device: Device,
    pub prec: Precision,
    /// The stage's seed (its `seed:`, else the pipeline's).
    pub seed: u64,
    /// This process's part in data parallelism.
    pub dist: Dist,
    t0: Instant,
}

/// What [`Setup::begin`] found to do.
pub enum Begin {
    /// Train in this process.
    Train(Setup),
    /// This process launched the ranks, which finished: rank 0's metrics.
    Launched(Metrics),
}

impl Setup {
    /// The start of a training stage: decides this process's part in data
    /// parallelism ([`crate::dist::start`]: alone, one rank, the serial
    /// emulation, or the launcher of the ranks) and, unless it launched the
    /// ranks, loads the `model` input for training on its device:
    /// precision from `dtype`, LoRA adapters (drawn from the seed) or every
    /// weight trainable.
    pub fn begin<C: TrainConfig>(cfg: &C, ctx: &mut StageCtx) -> anyhow::Result<Begin> {
        let t0 = Instant::now();
        let dist = match crate::dist::start(C::Stage::KIND, serde_json::to_value(cfg)?, cfg.dist(), ctx)? {
            Start::Launched(m) => return Ok(Begin::Launched(m)),
            Start::Train(d) => d,
        };
        let seed = cfg.seed().unwrap_or(ctx.seed);
        let device = dist.device;
        let lora = cfg.lora();
        let prec = Precision::resolve(cfg.dtype(), device, lora.is_some());
        let trainee = load_trainee(ctx.input("model")?, device, prec, lora, seed)?;
        Ok(Begin::Train(Setup { trainee, device, prec, seed, dist, t0 }))
    }

    /// The tokenizer's padding id (0 when it has none).
    pub fn pad(&self) -> i64 {
        self.trainee.tok.pad_token_id().unwrap_or(0)
    }
}

/// Optimizer, schedule and checkpointed state of one training run.
pub struct Trainer {
    pub trainee: Trainee,
    pub device: Device,
    pub prec: Precision,
    pub seed: u64,
    pub pad: i64,
    /// Steps done, best metric: what a checkpoint restores.
    pub state: State,
    pub log: Log,
    /// This process's shares of each step and the reductions over them.
    pub dist: Dist,
    kind: &'static str,
    cuda_note: &'static str,
    total: usize,
    sched: LrSchedule,
    opt: AdamW,
    max_grad_norm: f64,
    eval_steps: usize,
    save_steps: usize,
    save_every: std::time::Duration,
    /// When the newest checkpoint was written (or training started).
    saved_at: Instant,
    boundary: usize,
    load_best: bool,
    best: Option<Vec<(String, Tensor)>>,
    resumed_from: u64,
    /// Step of the newest checkpoint on disk (a cancel needs no second copy).
    last_saved: u64,
    nonfinite_steps: usize,
    meter: StepMeter,
    step_times: Vec<f64>,
    step_t0: Instant,
    t0: Instant,
}

impl Trainer {
    /// AdamW and the schedule over `total` steps, a log with `columns`,
    /// resumed from the work dir's checkpoint when one of this
    /// configuration exists.
    pub fn start<C: TrainConfig + Default>(s: Setup, cfg: &C, ctx: &mut StageCtx, total: usize, columns: &[&str]) -> anyhow::Result<Trainer> {
        let kind = C::Stage::KIND;
        let fp = fingerprint(cfg, s.seed, &ctx.device)?;
        let pad = s.pad();
        let world = s.dist.world_size;
        let mut t = Trainer {
            pad,
            state: State {
                step: 0,
                seed: s.seed,
                fingerprint: fp.clone(),
                best_metric_bits: None,
                best_step: None,
                world_size: (world > 1).then_some(world as u64),
                numerics: cpu_profile(s.device, world),
            },
            log: Log::new(columns),
            kind,
            cuda_note: C::CUDA_NOTE,
            total,
            sched: cfg.schedule(total),
            opt: AdamW::new(cfg.adamw()),
            max_grad_norm: cfg.max_grad_norm(),
            eval_steps: cfg.eval_steps(),
            save_steps: cfg.save_steps(),
            save_every: std::time::Duration::from_secs_f64(60.0 * cfg.save_minutes().unwrap_or(recflow::stages::sft::DEFAULT_SAVE_MINUTES)),
            saved_at: Instant::now(),
            boundary: cfg.boundary(),
            load_best: cfg.load_best_model_at_end(),
            best: None,
            resumed_from: 0,
            last_saved: 0,
            nonfinite_steps: 0,
            meter: StepMeter::on(s.device),
            step_times: Vec::new(),
            step_t0: Instant::now(),
            t0: s.t0,
            trainee: s.trainee,
            device: s.device,
            prec: s.prec,
            seed: s.seed,
            dist: s.dist,
        };
        if let Some(l) = checkpoint::load(&ctx.work_dir, &fp, t.device, world)? {
            checkpoint::copy_into(&t.trainee.trainable, &l.trainable)?;
            if let (Some(was), Some(here)) = (&l.state.numerics, &t.state.numerics) {
                let d = was.differences(here);
                if !d.is_empty() {
                    let how = if was.requested.is_empty() {
                        "rerun under that profile".to_string()
                    } else {
                        format!("rerun with `--numerics {}` (or RECFLOW_NUMERICS)", was.requested)
                    };
                    anyhow::bail!(
                        "{kind}: the checkpoint in {} was written under the numerics profile {}, this run has {} ({}): resuming would mix the two profiles' bytes in one output; {how} to continue it, or remove that work dir to start over",
                        ctx.work_dir.display(),
                        was.summary(),
                        here.summary(),
                        d.join(", ")
                    );
                }
            }
            l.restore_optimizer(&mut t.opt, t.device)?;
            t.log = l.log;
            t.best = l.best;
            // Later checkpoints record the profile in force (an older one had none).
            let here = t.state.numerics.take();
            t.state = l.state;
            t.state.numerics = here;
            t.resumed_from = t.state.step;
            t.last_saved = t.state.step;
            ctx.log("info", format!("{kind}: resumed from the checkpoint at step {}", t.state.step));
        }
        if t.dist.is_ranks() {
            // Every rank read the checkpoint rank 0 wrote (a shared work
            // dir); make sure they agree, then take rank 0's weights.
            let steps = t.dist.gather_f64(vec![vec![t.state.step as f64]])?;
            if steps.iter().any(|v| v != &steps[0]) {
                anyhow::bail!("{kind}: the ranks resumed from different steps {steps:?}: the work dir {} must be the same directory on every node", ctx.work_dir.display());
            }
            t.dist.broadcast_from_rank0(&t.trainee.trainable)?;
        }
        Ok(t)
    }

    /// The optimizer steps still to run, then one more iteration (`total`)
    /// that only evaluates the last step's weights.
    pub fn steps(&self) -> std::ops::RangeInclusive<usize> {
        self.state.step as usize..=self.total
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.sched.lr(step)
    }

    /// Whether the weights after `done` updates are evaluated: every
    /// `eval_steps` and after the last step; never the resumed-from step
    /// (its checkpoint already holds its evaluation).
    pub fn eval_due(&self, done: usize) -> bool {
        done as u64 > self.resumed_from && (done == self.total || (self.eval_steps > 0 && done.is_multiple_of(self.eval_steps)))
    }

    /// Puts an evaluation's values into the log row of the step evaluated
    /// (the last one pushed) and keeps the weights when `metric` (lower is
    /// better) is the best so far.
    pub fn record_eval(&mut self, values: &[(&str, Option<f64>)], metric: Option<f64>) -> anyhow::Result<()> {
        self.log.set_last(values)?;
        if let Some(m) = metric {
            if self.state.best_metric().is_none_or(|b| m < b) {
                self.state.best_metric_bits = Some(m.to_bits());
                self.state.best_step = Some(self.state.step);
                self.best = Some(checkpoint::snapshot(&self.trainee.trainable));
            }
        }
        Ok(())
    }

    /// Checkpoints the state after `done` updates when it is a boundary and
    /// either `save_steps` more steps are done since the previous boundary
    /// or `save_minutes` passed since the last checkpoint (a slow CPU step
    /// never loses more than that), never after the last step: the outputs
    /// follow. Which boundaries get a checkpoint thus depends on the clock,
    /// but what a checkpoint holds does not (resume is exact), so the
    /// outputs do not.
    pub fn checkpoint_if_due(&mut self, ctx: &mut StageCtx, done: usize) -> anyhow::Result<()> {
        let (b, every) = (self.boundary, self.save_steps);
        let at_boundary = done as u64 > self.resumed_from && done < self.total && done.is_multiple_of(b);
        let by_steps = done / every != done.saturating_sub(b) / every;
        let by_time = self.saved_at.elapsed() >= self.save_every;
        if at_boundary && (by_steps || by_time) {
            self.save(ctx)?;
        }
        Ok(())
    }

    /// Rank 0 writes the checkpoint; the other ranks hold the same state.
    fn save(&mut self, ctx: &mut StageCtx) -> anyhow::Result<()> {
        if self.dist.writes() {
            checkpoint::save(&ctx.work_dir, &self.state, &self.trainee.trainable, &self.opt, self.best.as_deref(), &self.log)?;
            ctx.checkpoint_saved(self.state.step);
        }
        self.last_saved = self.state.step;
        self.saved_at = Instant::now();
        Ok(())
    }

    /// Cancellation (Ctrl-C / SIGTERM) at a boundary: checkpoint the state
    /// after `step` updates and stop, so the rerun continues from exactly
    /// here. `during`: called between the micro-batches of step `step + 1`,
    /// whose update has not happened yet — its state is saved now rather
    /// than a step later, as the runner's grace before SIGKILL is short.
    ///
    /// Ranks decide together, at step boundaries only (`during` checks are
    /// skipped: ranks run different numbers of micro-batches, so no
    /// collective can happen there): a stop signal seen by any rank stops
    /// all of them at the same step, and rank 0 saves.
    pub fn stop_if_cancelled(&mut self, ctx: &mut StageCtx, step: usize, during: bool) -> anyhow::Result<()> {
        if !step.is_multiple_of(self.boundary) {
            return Ok(());
        }
        let cancelled = if self.dist.is_ranks() {
            !during && self.dist.any(ctx.is_cancelled())?
        } else {
            ctx.is_cancelled()
        };
        if !cancelled {
            return Ok(());
        }
        if self.state.step != self.last_saved {
            self.save(ctx)?;
        }
        let kind = self.kind;
        if during {
            anyhow::bail!("{kind} cancelled during step {}; checkpoint of step {step} kept in the work dir, a rerun continues from it", step + 1);
        }
        anyhow::bail!("{kind} cancelled after step {step}; checkpoint kept in the work dir, a rerun continues from it");
    }

    /// Whether a stage's micro-batch loop should stop for a cancellation
    /// now (then [`Trainer::stop_if_cancelled`] with `during`): never for
    /// ranks, which stop together at the next boundary.
    pub fn cancel_due(&self, ctx: &StageCtx, step: usize) -> bool {
        !self.dist.is_ranks() && ctx.is_cancelled() && step.is_multiple_of(self.boundary)
    }

    /// The result of a stage's [`Dist::backward_shares`] for step `step`:
    /// a [`MidStep`] cancellation becomes [`Trainer::stop_if_cancelled`]'s
    /// checkpoint and error.
    pub fn shares_done<T>(&mut self, ctx: &mut StageCtx, step: usize, r: anyhow::Result<Vec<T>>) -> anyhow::Result<Vec<T>> {
        match r {
            Err(e) if e.is::<MidStep>() => {
                self.stop_if_cancelled(ctx, step, true)?;
                Err(e)
            }
            r => r,
        }
    }

    /// Starts the wall-clock and memory figures of one optimizer step.
    pub fn begin_step(&mut self) {
        self.step_t0 = Instant::now();
        self.meter.begin();
    }

    /// Clip → AdamW at `lr` on the accumulated gradients, skipped (with a
    /// warning) when the loss or the gradient norm is NaN or infinite.
    /// Ends step `step`: the state now counts `step + 1` updates. Returns
    /// the gradient norm before clipping.
    pub fn update(&mut self, ctx: &mut StageCtx, step: usize, loss: f64, lr: f64) -> anyhow::Result<f64> {
        let grad_norm = clip_grad_norm(&self.trainee.trainable, self.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            self.nonfinite_steps += 1;
            ctx.warn(format!(
                "{} step {}: loss {loss} / grad norm {grad_norm} is NaN or infinite — update skipped",
                self.kind,
                step + 1
            ));
        } else {
            self.opt.step(&self.trainee.trainable, lr)?;
        }
        self.step_times.push(self.step_t0.elapsed().as_secs_f64());
        self.meter.end();
        self.state.step = step as u64 + 1;
        Ok(grad_norm)
    }

    /// Steps whose update [`Trainer::update`] skipped.
    pub fn nonfinite_steps(&self) -> usize {
        self.nonfinite_steps
    }

    /// Wall seconds since the model started loading.
    pub fn wall_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// The outputs — best weights when asked, the `log`, the merged
    /// `model`, the `adapter` — and `stage` plus the metrics both stages
    /// report: steps, resume point, best step and metric (as `best_key`),
    /// timing and memory.
    pub fn finish(self, ctx: &StageCtx, best_key: &str, mut stage: Metrics) -> anyhow::Result<Metrics> {
        if self.load_best {
            if let Some(b) = &self.best {
                checkpoint::copy_into(&self.trainee.trainable, b)?;
            }
        }
        let m = &mut stage;
        if self.dist.world_size > 1 || self.dist.is_ranks() {
            m.insert("world_size".into(), serde_json::json!(self.dist.world_size));
            m.insert("rank_threads".into(), serde_json::json!(tch::get_num_threads()));
            m.insert("collective_s".into(), serde_json::json!(self.dist.collective_s()));
        }
        if self.dist.writes() {
            self.log.write(&ctx.output("log")?)?;
            let (mdir, adir) = (ctx.output("model")?, ctx.output("adapter")?);
            write_outputs(self.trainee, &mdir, &adir)?;
        }
        m.insert("steps".into(), serde_json::json!(self.total));
        m.insert("resumed_from_step".into(), serde_json::json!(self.resumed_from));
        m.insert("best_step".into(), serde_json::json!(self.state.best_step));
        m.insert(best_key.into(), serde_json::json!(self.state.best_metric()));
        m.insert("wall_s".into(), serde_json::json!(self.t0.elapsed().as_secs_f64()));
        m.insert("step_s_median".into(), serde_json::json!(super::median(&self.step_times)));
        m.insert("peak_rss_bytes".into(), serde_json::json!(super::peak_rss_bytes()));
        self.meter.insert_metrics(m);
        if self.device.is_cuda() {
            m.insert("note_cuda_determinism".into(), serde_json::json!(self.cuda_note));
        }
        Ok(stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recflow::stages::{grpo, sft};

    /// What `grpo.rs` and `sft.rs` computed by hand before [`fingerprint`]
    /// derived it from `OPERATIONAL`: the fingerprint must not move, or a
    /// checkpoint of an interrupted run would be refused after the upgrade.
    #[test]
    fn fingerprint_equals_the_hand_written_one() {
        let g: grpo::Config = serde_json::from_str(r#"{"save_steps": 7, "kl_warn_threshold": 2.5}"#).unwrap();
        let mut old = g.clone();
        old.save_steps = 0;
        old.max_tokens_per_microbatch = 0;
        old.logprob_chunk_tokens = 0;
        old.kl_warn_threshold = 0.0;
        assert_eq!(fingerprint(&g, 3, "cpu").unwrap(), checkpoint::fingerprint(&(old, 3u64, "cpu")), "grpo");
        let s: sft::Config = serde_json::from_str(r#"{"save_steps": 9}"#).unwrap();
        let mut old = s.clone();
        old.save_steps = 0;
        assert_eq!(fingerprint(&s, 3, "cpu").unwrap(), checkpoint::fingerprint(&(old, 3u64, "cpu")), "sft");
    }

    /// Turborepo-style: an operational field must not move the fingerprint,
    /// any other field, the seed and the device must.
    #[test]
    fn fingerprint_moves_with_results_not_with_operational_fields() {
        let base: grpo::Config = serde_json::from_str("{}").unwrap();
        let fp = fingerprint(&base, 1, "cpu").unwrap();
        for f in grpo::Grpo::OPERATIONAL {
            // A value of the field's type, unset ones (skipped while at
            // their default) included.
            let c: grpo::Config = [serde_json::json!(123), serde_json::json!(123.5), serde_json::json!(true)]
                .into_iter()
                .find_map(|x| {
                    let mut v = serde_json::to_value(&base).unwrap();
                    v[*f] = x;
                    serde_json::from_value(v).ok()
                })
                .unwrap_or_else(|| panic!("no test value for `{f}`"));
            assert_ne!(c, base, "`{f}` was changed");
            assert_eq!(fingerprint(&c, 1, "cpu").unwrap(), fp, "operational `{f}` must not move the fingerprint");
        }
        let mut c = base.clone();
        c.learning_rate *= 2.0;
        assert_ne!(fingerprint(&c, 1, "cpu").unwrap(), fp, "learning_rate changes results");
        assert_ne!(fingerprint(&base, 2, "cpu").unwrap(), fp, "the seed changes results");
        assert_ne!(fingerprint(&base, 1, "cuda").unwrap(), fp, "the device changes results");
    }
}
