//! Token log-probabilities of sequences under the model, and their backward
//! pass, with bounded memory:
//!
//! * **Chunked log-probs.** Only the scored positions' hidden states are
//!   gathered (`[M, H]`), and `lm_head` + `log_softmax` run over `chunk`
//!   rows at a time; each chunk's loss is back-propagated into the detached
//!   hidden states at once, so at most `[chunk, V]` logits (plus their
//!   gradient) exist at any moment — never `[B, T, V]` (Qwen's V = 151,936).
//! * **Gradient checkpointing per decoder layer**, by hand (tch has none):
//!   the forward runs without autograd keeping only each layer's input
//!   `[B, T, H]`; the backward walks the layers in reverse, recomputing one
//!   layer's forward with autograd and back-propagating the incoming
//!   gradient through it. Dropout (LoRA's) draws from torch's generator
//!   re-seeded per layer, so the recomputed forward is the same function.
//!
//! Sequences are right-padded with causal attention (no padding mask needed:
//! padding comes after every real token), positions `0..T`.
use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::TrainError;
use crate::llm::model::Model;

/// A batch of token sequences and the positions to score.
pub struct SeqBatch {
    /// `[N, T]` i64, right-padded.
    pub ids: Tensor,
    /// `[M]` i64: flat index `row·T + t` of each scored position t (whose
    /// logits predict token t + 1).
    pub pos_idx: Tensor,
    /// `[M]` i64: the predicted token of each scored position.
    pub targets: Tensor,
    /// Scored tokens per row (`Σ = M`), in row order.
    pub counts: Vec<usize>,
    /// Longest row, T.
    pub max_len: usize,
}

impl SeqBatch {
    /// Builds a batch from rows `(prefix, scored)`: each row is
    /// `prefix ++ scored` and every token of `scored` is scored (predicted
    /// from everything before it). `prefix` must be non-empty.
    pub fn new(rows: &[(&[i64], &[i64])], pad_id: i64, device: Device) -> Result<SeqBatch, TrainError> {
        let t = rows.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(0);
        if rows.is_empty() || t == 0 {
            return Err(TrainError::Invalid("empty sequence batch".into()));
        }
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut pos = Vec::new();
        let mut tgt = Vec::new();
        let mut counts = Vec::with_capacity(rows.len());
        for (i, (p, c)) in rows.iter().enumerate() {
            if p.is_empty() {
                return Err(TrainError::Invalid("every sequence needs at least one prompt token".into()));
            }
            let start = ids.len();
            ids.extend_from_slice(p);
            ids.extend_from_slice(c);
            ids.resize(start + t, pad_id);
            for (j, &tok) in c.iter().enumerate() {
                pos.push((i * t + p.len() - 1 + j) as i64);
                tgt.push(tok);
            }
            counts.push(c.len());
        }
        Ok(SeqBatch {
            ids: Tensor::from_slice(&ids).view([rows.len() as i64, t as i64]).to_device(device),
            pos_idx: Tensor::from_slice(&pos).to_device(device),
            targets: Tensor::from_slice(&tgt).to_device(device),
            counts,
            max_len: t,
        })
    }

    pub fn rows(&self) -> usize {
        self.counts.len()
    }
    pub fn num_scored(&self) -> usize {
        self.counts.iter().sum()
    }
    /// Row of each scored token, `[M]`.
    pub fn row_of_token(&self) -> Vec<usize> {
        self.counts.iter().enumerate().flat_map(|(i, &c)| std::iter::repeat_n(i, c)).collect()
    }
}

/// How to run the model.
#[derive(Debug, Clone, Copy)]
pub struct RunOpts {
    /// Logits are divided by this before `log_softmax` (the sampling temperature).
    pub temperature: f64,
    /// Scored positions per `lm_head` chunk.
    pub chunk: usize,
    pub checkpointing: bool,
    pub autocast: bool,
    /// Re-seeds torch's generator per layer (`seed + layer`) so dropout
    /// masks repeat in the recomputed forward; None leaves the generator alone.
    pub dropout_seed: Option<u64>,
}

/// Runs layer `layer`'s forward `f`; with a dropout seed, torch's generator
/// is re-seeded to `seed + layer` first (under the process-wide RNG lock), so
/// the recomputed forward of checkpointing draws the same masks.
fn seeded_layer<T>(opts: &RunOpts, layer: usize, f: impl FnOnce() -> T) -> T {
    match opts.dropout_seed {
        Some(s) => super::with_torch_seed(super::derive_seed(s, layer as u64, 0x1a7e), f),
        None => f(),
    }
}

/// Log-probs and entropies of one chunk of gathered hidden rows `h: [c, H]`.
fn chunk_logprobs(model: &Model, h: &Tensor, targets: &Tensor, temperature: f64) -> (Tensor, Tensor) {
    let logits = model.lm_head(h).to_kind(Kind::Float) / temperature; // [c, V]
    let lsm = logits.log_softmax(-1, Kind::Float); // [c, V]
    let logp = lsm.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1); // [c]
    let ent = tch::no_grad(|| -(lsm.exp() * &lsm).sum_dim_intlist(-1, false, Kind::Float)); // [c]
    (logp, ent)
}

/// Log-probs `[M]` and entropies `[M]` of the scored tokens, without autograd.
pub fn logprobs(model: &Model, batch: &SeqBatch, opts: &RunOpts) -> Result<(Tensor, Tensor), TrainError> {
    let _g = tch::no_grad_guard();
    let (n, t) = (batch.rows() as i64, batch.max_len as i64);
    let pos = Tensor::arange(t, (Kind::Int64, model.device())).unsqueeze(0).expand([n, t], true);
    let h = tch::autocast(opts.autocast, || model.hidden_states(&batch.ids, &pos, None, None))
        .map_err(|e| TrainError::Invalid(e.to_string()))?; // [N, T, H]
    let hdim = h.size()[2];
    let rows = h.view([n * t, hdim]).index_select(0, &batch.pos_idx); // [M, H]
    let m = batch.num_scored() as i64;
    let (mut lp, mut en) = (Vec::new(), Vec::new());
    let mut s = 0;
    while s < m {
        let len = (opts.chunk as i64).min(m - s);
        let (l, e) = tch::autocast(opts.autocast, || {
            chunk_logprobs(model, &rows.narrow(0, s, len), &batch.targets.narrow(0, s, len), opts.temperature)
        });
        lp.push(l);
        en.push(e);
        s += len;
    }
    if lp.is_empty() {
        let z = Tensor::zeros([0], (Kind::Float, model.device()));
        return Ok((z.shallow_clone(), z));
    }
    Ok((Tensor::cat(&lp, 0), Tensor::cat(&en, 0)))
}

/// What [`backward`] returns: the summed loss value and the detached
/// log-probs `[M]` and entropies `[M]` it saw.
pub struct BackwardOut {
    pub loss: f64,
    pub logp: Tensor,
    pub entropy: Tensor,
}

/// Forward + backward of `Σ_chunks loss_fn(logp_chunk, token_range)`:
/// gradients accumulate into every parameter that requires grad. `loss_fn`
/// returns a scalar built from the chunk's log-probs `[c]` (differentiable).
pub fn backward(
    model: &Model,
    batch: &SeqBatch,
    opts: &RunOpts,
    mut loss_fn: impl FnMut(&Tensor, Range<usize>) -> Result<Tensor, TrainError>,
) -> Result<BackwardOut, TrainError> {
    let (n, t) = (batch.rows() as i64, batch.max_len as i64);
    let dev = model.device();
    let pos = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0).expand([n, t], true);
    let ctx = model.layer_ctx(&pos, None, 0).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let layers = model.layers();

    // --- trunk forward -------------------------------------------------------
    // Checkpointing: keep layer inputs only ([L] × [N, T, H]), no graph.
    let mut saved: Vec<Tensor> = Vec::new();
    let trunk_out: Tensor; // [N, T, H]: output of the last layer (graph unless checkpointing)
    if opts.checkpointing {
        let _g = tch::no_grad_guard();
        let mut h = tch::autocast(opts.autocast, || model.embed(&batch.ids));
        for (i, l) in layers.iter().enumerate() {
            saved.push(h.shallow_clone());
            h = seeded_layer(opts, i, || tch::autocast(opts.autocast, || l.forward(&h, &ctx, None)));
        }
        trunk_out = h.detach().set_requires_grad(true);
    } else {
        let mut h = tch::autocast(opts.autocast, || model.embed(&batch.ids));
        for (i, l) in layers.iter().enumerate() {
            h = seeded_layer(opts, i, || tch::autocast(opts.autocast, || l.forward(&h, &ctx, None)));
        }
        trunk_out = h;
    }
    let hf = tch::autocast(opts.autocast, || model.final_hidden(&trunk_out)); // [N, T, H]

    // --- chunked head: loss per chunk, backward into detached hidden ---------
    // hd is a leaf: each chunk gathers its own rows from it and back-propagates
    // at once, so its [c, V] logits are freed before the next chunk.
    let hd = hf.detach().set_requires_grad(true); // [N, T, H]
    let hdim = hd.size()[2];
    let flat = hd.view([n * t, hdim]);
    let m = batch.num_scored() as i64;
    let mut total = 0f64;
    let (mut lps, mut ents) = (Vec::new(), Vec::new());
    let mut s = 0i64;
    while s < m {
        let len = (opts.chunk as i64).min(m - s);
        let (logp, ent) = tch::autocast(opts.autocast, || {
            let rows = flat.index_select(0, &batch.pos_idx.narrow(0, s, len)); // [c, H]
            chunk_logprobs(model, &rows, &batch.targets.narrow(0, s, len), opts.temperature)
        });
        let loss = loss_fn(&logp, s as usize..(s + len) as usize)?;
        total += loss.double_value(&[]);
        if loss.requires_grad() {
            loss.f_backward()?;
        }
        lps.push(logp.detach());
        ents.push(ent);
        s += len;
    }
    drop(flat);

    // --- backward through the final norm and the trunk -------------------------
    let g = hd.grad(); // [N, T, H]
    if g.defined() {
        grad_into(&hf, &g)?;
        if opts.checkpointing {
            let mut grad_h = trunk_out.grad();
            for i in (0..layers.len()).rev() {
                if !grad_h.defined() {
                    break;
                }
                let x = saved[i].detach().set_requires_grad(true);
                let y = seeded_layer(opts, i, || tch::autocast(opts.autocast, || layers[i].forward(&x, &ctx, None))); // recompute
                grad_into(&y, &grad_h)?;
                grad_h = x.grad();
            }
            if grad_h.defined() && model.embed_tokens.requires_grad() {
                let e = tch::autocast(opts.autocast, || model.embed(&batch.ids));
                grad_into(&e, &grad_h)?;
            }
        }
    }
    Ok(BackwardOut { loss: total, logp: cat_or_empty(lps, dev), entropy: cat_or_empty(ents, dev) })
}

/// Back-propagates `grad` (∂L/∂y) through `y`'s graph: `backward(Σ y ⊙ grad)`.
fn grad_into(y: &Tensor, grad: &Tensor) -> Result<(), TrainError> {
    if !y.requires_grad() {
        return Ok(());
    }
    let s = (y.to_kind(Kind::Float) * grad.detach().to_kind(Kind::Float)).sum(Kind::Float);
    s.f_backward()?;
    Ok(())
}

fn cat_or_empty(v: Vec<Tensor>, dev: Device) -> Tensor {
    if v.is_empty() {
        Tensor::zeros([0], (Kind::Float, dev))
    } else {
        Tensor::cat(&v, 0)
    }
}
