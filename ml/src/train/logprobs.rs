//! Token log-probabilities of sequences under the model, and their backward
//! pass, with bounded memory:
//!
//! * **Chunked log-probs.** Only the scored positions' hidden states are
//!   gathered (`[M, H]`), and `lm_head` + log-softmax run over `chunk` rows
//!   at a time, so at most one chunk's `[chunk, V]` logits exist at any
//!   moment — never `[B, T, V]` (Qwen's V = 151,936).
//! * **Hand-written head backward.** A chunk's loss depends on its log-probs
//!   only; autograd differentiates it w.r.t. those `[c]` values, and the rest
//!   is written out (`∂L/∂logits = g ⊙ (onehot − softmax) / τ`, then `dh = g
//!   W`, `dW += gᵀ h`), reusing the softmax the entropy needed anyway. Each
//!   `[c, V]` pass is a large memory sweep, and autograd's gather,
//!   log-softmax and division backward would add several
//!   (`ml/tests/train_logprobs.rs` checks the gradients against autograd).
//! * **Gradient checkpointing per decoder layer**, by hand (tch has none):
//!   the forward runs without autograd keeping only each layer's input
//!   `[B, T, H]`; the backward walks the layers in reverse, recomputing one
//!   layer's forward with autograd and back-propagating the incoming
//!   gradient through it. Dropout (LoRA's) draws from torch's generator
//!   re-seeded per layer, so the recomputed forward is the same function.
//! * **Shared prefixes** ([`SeqBatch::shared`]): GRPO's G completions of a
//!   prompt all start with that prompt, and a causal model's hidden states
//!   of the prompt do not depend on what follows. So the prompt runs once per
//!   micro-batch and the completions attend to its keys/values
//!   ([`DecoderLayer::forward_shared_prefix`]); in the backward pass the G
//!   rows' gradients sum into the one prompt. Same function, up to float
//!   summation order; the prompt's share of the FLOPs drops by G×.
//!
//! Sequences are right-padded with causal attention (no padding mask needed:
//! padding comes after every real token), positions `0..T`.
use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::TrainError;
use crate::llm::model::{DecoderLayer, LayerCtx, Model};

/// A batch of token sequences and the positions to score.
pub struct SeqBatch {
    /// `[N, T]` i64, right-padded: whole rows, or with a shared prefix only
    /// each row's own (scored) part.
    ids: Tensor,
    prefix: Option<SharedPrefix>,
    /// `[M]` i64: flat index of each scored position's hidden state in the
    /// concatenation [prefix rows `P·Tp`; rows `N·T`] (its logits predict
    /// the scored token).
    pos_idx: Tensor,
    /// `[M]` i64: the predicted token of each scored position.
    targets: Tensor,
    /// Scored tokens per row (`Σ = M`), in row order.
    pub counts: Vec<usize>,
}

/// The prompts a [`SeqBatch::shared`] batch computes once.
struct SharedPrefix {
    /// `[P, Tp]` i64, right-padded.
    ids: Tensor,
    /// `[N]` i64: the prefix each row continues.
    row_prefix: Tensor,
    /// `[N, Tc]` RoPE positions of the rows' tokens (prefix length + j).
    positions: Tensor,
    /// `[N, 1, Tc, Tp + Tc]`: a row's token sees its prefix's real tokens
    /// and, causally, its own.
    mask: Tensor,
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
            prefix: None,
            pos_idx: Tensor::from_slice(&pos).to_device(device),
            targets: Tensor::from_slice(&tgt).to_device(device),
            counts,
        })
    }

    /// Like [`SeqBatch::new`] on rows `prefixes[k] ++ scored`, for rows
    /// `(k, scored)` that share prefixes: each prefix is computed once.
    /// Every prefix must be non-empty and used by some row.
    pub fn shared(prefixes: &[&[i64]], rows: &[(usize, &[i64])], pad_id: i64, device: Device) -> Result<SeqBatch, TrainError> {
        let tp = prefixes.iter().map(|p| p.len()).max().unwrap_or(0);
        let tc = rows.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        if rows.is_empty() || tp == 0 || tc == 0 || prefixes.iter().any(|p| p.is_empty()) {
            return Err(TrainError::Invalid("empty shared-prefix batch (every prefix and some row need tokens)".into()));
        }
        if let Some((k, _)) = rows.iter().find(|(k, _)| *k >= prefixes.len()) {
            return Err(TrainError::Invalid(format!("row continues prefix {k} of {}", prefixes.len())));
        }
        let (n, np) = (rows.len(), prefixes.len());
        let mut pids = Vec::with_capacity(np * tp);
        for p in prefixes {
            pids.extend_from_slice(p);
            pids.resize(pids.len() + tp - p.len(), pad_id);
        }
        let (mut ids, mut positions) = (Vec::with_capacity(n * tc), Vec::with_capacity(n * tc));
        let mut mask = vec![false; n * tc * (tp + tc)];
        let (mut pos, mut tgt, mut counts) = (Vec::new(), Vec::new(), Vec::with_capacity(n));
        for (i, &(k, c)) in rows.iter().enumerate() {
            let lp = prefixes[k].len();
            ids.extend_from_slice(c);
            ids.resize((i + 1) * tc, pad_id);
            positions.extend((0..tc).map(|j| (lp + j) as i64));
            for q in 0..tc {
                let m = &mut mask[(i * tc + q) * (tp + tc)..][..tp + tc];
                m[..lp].fill(true);
                m[tp..=tp + q].fill(true);
            }
            // Token 0 is predicted by the prefix's last position, token j by row position j − 1.
            for (j, &tok) in c.iter().enumerate() {
                pos.push(if j == 0 { (k * tp + lp - 1) as i64 } else { (np * tp + i * tc + j - 1) as i64 });
                tgt.push(tok);
            }
            counts.push(c.len());
        }
        let row_prefix: Vec<i64> = rows.iter().map(|&(k, _)| k as i64).collect();
        let mask = Tensor::from_slice(&mask).view([n as i64, 1, tc as i64, (tp + tc) as i64]);
        Ok(SeqBatch {
            ids: Tensor::from_slice(&ids).view([n as i64, tc as i64]).to_device(device),
            prefix: Some(SharedPrefix {
                ids: Tensor::from_slice(&pids).view([np as i64, tp as i64]).to_device(device),
                row_prefix: Tensor::from_slice(&row_prefix).to_device(device),
                positions: Tensor::from_slice(&positions).view([n as i64, tc as i64]).to_device(device),
                mask: mask.to_device(device),
            }),
            pos_idx: Tensor::from_slice(&pos).to_device(device),
            targets: Tensor::from_slice(&tgt).to_device(device),
            counts,
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
    /// Tokens the trunk runs over (padding included): the cost of the batch.
    pub fn padded_tokens(&self) -> usize {
        let n = |t: &Tensor| t.size().iter().product::<i64>() as usize;
        n(&self.ids) + self.prefix.as_ref().map_or(0, |p| n(&p.ids))
    }
}

/// The trunk over a batch's hidden-state parts: `[h]` (`[N, T, H]`) or, with
/// a shared prefix, `[prefix h: [P, Tp, H], rows h: [N, Tc, H]]`.
struct Trunk<'a> {
    model: &'a Model,
    batch: &'a SeqBatch,
    /// One context per part.
    ctx: Vec<LayerCtx>,
}

impl<'a> Trunk<'a> {
    fn new(model: &'a Model, batch: &'a SeqBatch) -> Result<Self, TrainError> {
        let dev = model.device();
        let causal = |ids: &Tensor| {
            let (n, t) = (ids.size()[0], ids.size()[1]);
            let pos = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0).expand([n, t], true);
            model.layer_ctx(&pos, None, 0).map_err(|e| TrainError::Invalid(e.to_string()))
        };
        let ctx = match &batch.prefix {
            None => vec![causal(&batch.ids)?],
            Some(p) => {
                let mut c = model.layer_ctx(&p.positions, None, 0).map_err(|e| TrainError::Invalid(e.to_string()))?;
                c.mask = Some(p.mask.shallow_clone());
                c.is_causal = false;
                vec![causal(&p.ids)?, c]
            }
        };
        Ok(Trunk { model, batch, ctx })
    }

    fn embed(&self) -> Vec<Tensor> {
        match &self.batch.prefix {
            None => vec![self.model.embed(&self.batch.ids)],
            Some(p) => vec![self.model.embed(&p.ids), self.model.embed(&self.batch.ids)],
        }
    }

    fn layer(&self, l: &DecoderLayer, h: &[Tensor]) -> Vec<Tensor> {
        match &self.batch.prefix {
            None => vec![l.forward(&h[0], &self.ctx[0], None)],
            Some(p) => {
                let (a, b) = l.forward_shared_prefix(&h[0], &self.ctx[0], &h[1], &self.ctx[1], &p.row_prefix);
                vec![a, b]
            }
        }
    }

    /// `[Σ rows·T, H]`: the parts' positions in the order `pos_idx` indexes.
    fn flat(h: &[Tensor]) -> Tensor {
        let v: Vec<Tensor> = h.iter().map(|t| t.view([-1, t.size()[2]])).collect();
        if v.len() == 1 {
            v[0].shallow_clone()
        } else {
            Tensor::cat(&v, 0)
        }
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

/// Log-probs `[c]`, entropies `[c]` and the softmax `[c, V]` (f32) of one
/// chunk of gathered hidden rows `h: [c, H]` at temperature τ, without
/// autograd: `z = lm_head(h) / τ`, `lse = logsumexp(z)`, `log p_t = z_t −
/// lse`, `p = exp(z − lse)`, entropy `lse − Σ p z` (a batched dot, no
/// `[c, V]` temporary). The softmax is what the hand-written backward of
/// [`backward`] needs; each `[c, V]` pass is a large memory sweep (Qwen's V
/// = 151,936), which is why autograd's log-softmax, gather and division
/// backward are not used.
fn head_stats(model: &Model, h: &Tensor, targets: &Tensor, temperature: f64) -> (Tensor, Tensor, Tensor) {
    let _g = tch::no_grad_guard();
    let mut z = model.lm_head(h).to_kind(Kind::Float); // [c, V], a fresh tensor
    if temperature != 1.0 {
        let _ = z.f_div_scalar_(temperature);
    }
    let lse = z.logsumexp([-1].as_slice(), false); // [c]
    let logp = z.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1) - &lse;
    let p = (&z - lse.unsqueeze(1)).exp_(); // [c, V]
    let ent = &lse - p.unsqueeze(1).bmm(&z.unsqueeze(2)).view([-1]);
    (logp, ent, p)
}

/// Back-propagates `dL/dlogits: [c, V]` through `lm_head` at the rows `h:
/// [c, H]`: accumulates the head weight's gradient (when it is trained) and
/// returns `dL/dh: [c, H]`. By hand (`dh = g W`, `dW += gᵀ h`) when the head
/// is a plain product, else through autograd.
fn head_backward(model: &Model, h: &Tensor, g: &Tensor, autocast: bool) -> Result<Tensor, TrainError> {
    let Some(w) = model.lm_head_weight() else {
        let x = h.detach().set_requires_grad(true);
        let logits = tch::autocast(autocast, || model.lm_head(&x));
        grad_into(&[logits], &[g.shallow_clone()])?;
        return Ok(x.grad());
    };
    if w.requires_grad() && !w.grad().defined() {
        // The first step: give the weight its (zero) gradient tensor to add into.
        tch::with_grad(|| super::optim::ensure_grads(&[(String::new(), w.shallow_clone())]))?;
    }
    let _ng = tch::no_grad_guard();
    let dh = tch::autocast(autocast, || g.f_mm(w))?;
    if w.requires_grad() {
        let mut wg = w.grad();
        let gt = g.transpose(0, 1);
        if !autocast && wg.kind() == g.kind() && h.kind() == g.kind() {
            let _ = wg.f_addmm_(&gt, h)?;
        } else {
            let dw = tch::autocast(autocast, || gt.f_mm(h))?;
            let _ = wg.f_add_(&dw.to_kind(wg.kind()))?;
        }
    }
    Ok(dh)
}

/// Log-probs `[M]` and entropies `[M]` of the scored tokens, without autograd.
pub fn logprobs(model: &Model, batch: &SeqBatch, opts: &RunOpts) -> Result<(Tensor, Tensor), TrainError> {
    let _g = tch::no_grad_guard();
    let trunk = Trunk::new(model, batch)?;
    let mut h = tch::autocast(opts.autocast, || trunk.embed());
    for l in model.layers() {
        h = tch::autocast(opts.autocast, || trunk.layer(l, &h));
    }
    let h: Vec<Tensor> = tch::autocast(opts.autocast, || h.iter().map(|x| model.final_hidden(x)).collect());
    let rows = Trunk::flat(&h).index_select(0, &batch.pos_idx); // [M, H]
    drop(h);
    let m = batch.num_scored() as i64;
    let (mut lp, mut en) = (Vec::new(), Vec::new());
    let mut s = 0;
    while s < m {
        let len = (opts.chunk as i64).min(m - s);
        let (l, e, _) = tch::autocast(opts.autocast, || {
            head_stats(model, &rows.narrow(0, s, len), &batch.targets.narrow(0, s, len), opts.temperature)
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
    let dev = model.device();
    let trunk = Trunk::new(model, batch)?;
    let layers = model.layers();

    // --- trunk forward -------------------------------------------------------
    // Checkpointing: keep layer inputs only ([L] × parts), no graph.
    let mut saved: Vec<Vec<Tensor>> = Vec::new();
    let trunk_out: Vec<Tensor>; // output of the last layer (graph unless checkpointing)
    if opts.checkpointing {
        let _g = tch::no_grad_guard();
        let mut h = tch::autocast(opts.autocast, || trunk.embed());
        for (i, l) in layers.iter().enumerate() {
            saved.push(h.iter().map(Tensor::shallow_clone).collect());
            h = seeded_layer(opts, i, || tch::autocast(opts.autocast, || trunk.layer(l, &h)));
        }
        trunk_out = h.iter().map(|x| x.detach().set_requires_grad(true)).collect();
    } else {
        let mut h = tch::autocast(opts.autocast, || trunk.embed());
        for (i, l) in layers.iter().enumerate() {
            h = seeded_layer(opts, i, || tch::autocast(opts.autocast, || trunk.layer(l, &h)));
        }
        trunk_out = h;
    }
    let hf: Vec<Tensor> = tch::autocast(opts.autocast, || trunk_out.iter().map(|x| model.final_hidden(x)).collect());
    let hf = Trunk::flat(&hf); // [Σ rows·T, H]

    // --- chunked head: loss per chunk, hand-written head backward ---------------
    // Each chunk's loss is a function of its log-probs only, so autograd runs
    // over the `[c]` log-probs (giving g = ∂L/∂log p_t) and the rest is
    // written out: ∂L/∂z = g ⊙ (onehot(t) − p), ∂L/∂logits = ∂L/∂z / τ, then
    // through `lm_head` into the rows' slots of `grad_hd`. At most one
    // chunk's `[c, V]` softmax exists at a time.
    let hd = hf.detach();
    let mut grad_hd = hd.zeros_like();
    let mut any_grad = false;
    let m = batch.num_scored() as i64;
    let mut total = 0f64;
    let (mut lps, mut ents) = (Vec::new(), Vec::new());
    let mut s = 0i64;
    while s < m {
        let len = (opts.chunk as i64).min(m - s);
        let idx = batch.pos_idx.narrow(0, s, len);
        let targets = batch.targets.narrow(0, s, len);
        let rows = hd.index_select(0, &idx); // [c, H]
        let (logp, ent, mut p) = tch::autocast(opts.autocast, || head_stats(model, &rows, &targets, opts.temperature));
        let lp = logp.set_requires_grad(true);
        let loss = loss_fn(&lp, s as usize..(s + len) as usize)?;
        total += loss.double_value(&[]);
        if loss.requires_grad() {
            loss.f_backward()?;
            let g = lp.grad();
            if g.defined() {
                let _ng = tch::no_grad_guard();
                let gs = g.to_kind(Kind::Float) / opts.temperature; // [c]
                let _ = p.f_mul_(&(-&gs).unsqueeze(1))?.f_scatter_add_(1, &targets.unsqueeze(1), &gs.unsqueeze(1))?;
                let dh = head_backward(model, &rows, &p, opts.autocast)?;
                let _ = grad_hd.f_index_add_(0, &idx, &dh.to_kind(grad_hd.kind()))?;
                any_grad = true;
            }
        }
        lps.push(lp.detach());
        ents.push(ent);
        s += len;
    }

    // --- backward through the final norm and the trunk -------------------------
    if any_grad {
        grad_into(&[hf], &[grad_hd])?;
        if opts.checkpointing {
            let mut grad_h: Vec<Tensor> = trunk_out.iter().map(Tensor::grad).collect();
            for i in (0..layers.len()).rev() {
                if grad_h.iter().all(|g| !g.defined()) {
                    break;
                }
                let x: Vec<Tensor> = saved[i].iter().map(|t| t.detach().set_requires_grad(true)).collect();
                let y = seeded_layer(opts, i, || tch::autocast(opts.autocast, || trunk.layer(&layers[i], &x))); // recompute
                grad_into(&y, &grad_h)?;
                grad_h = x.iter().map(Tensor::grad).collect();
            }
            if grad_h.iter().any(Tensor::defined) && model.embed_tokens.requires_grad() {
                let e = tch::autocast(opts.autocast, || trunk.embed());
                grad_into(&e, &grad_h)?;
            }
        }
    }
    Ok(BackwardOut { loss: total, logp: cat_or_empty(lps, dev), entropy: cat_or_empty(ents, dev) })
}

/// Back-propagates `grads[k]` (∂L/∂y_k) through the `ys[k]`' graphs at once:
/// `backward(Σ_k Σ y_k ⊙ grad_k)`. Parts without a gradient (or a graph) add nothing.
fn grad_into(ys: &[Tensor], grads: &[Tensor]) -> Result<(), TrainError> {
    let mut s: Option<Tensor> = None;
    for (y, g) in ys.iter().zip(grads) {
        if !y.requires_grad() || !g.defined() {
            continue;
        }
        let t = (y.to_kind(Kind::Float) * g.detach().to_kind(Kind::Float)).sum(Kind::Float);
        s = Some(match s {
            Some(a) => a + t,
            None => t,
        });
    }
    if let Some(s) = s {
        s.f_backward()?;
    }
    Ok(())
}

fn cat_or_empty(v: Vec<Tensor>, dev: Device) -> Tensor {
    if v.is_empty() {
        Tensor::zeros([0], (Kind::Float, dev))
    } else {
        Tensor::cat(&v, 0)
    }
}
