//! AdamW over tensors, the learning-rate schedule and gradient clipping.
//!
//! Our own optimizer because tch's C++ optimizers cannot export their state,
//! and exact resume needs the moments. The update is PyTorch's `AdamW`
//! (Loshchilov & Hutter 2019, decoupled weight decay), step t ≥ 1:
//! ```text
//! θ ← θ · (1 − lr·λ)
//! m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
//! θ ← θ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
//! ```
//! Moments are float32 whatever the parameter's dtype. State is saved as
//! safetensors (`m.NAME`, `v.NAME`) with the step count in a JSON sidecar
//! owned by the checkpoint.
use std::collections::BTreeMap;
use std::path::Path;

use recflow::stages::sft::LrSchedulerType;
use tch::{Kind, Tensor};

use super::TrainError;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW with exportable state.
pub struct AdamW {
    cfg: AdamWConfig,
    /// Completed steps t.
    pub step: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, step: 0, m: BTreeMap::new(), v: BTreeMap::new() }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &[(String, Tensor)], lr: f64) -> Result<(), TrainError> {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let c = Coeffs::new(&self.cfg, self.step, lr);
        // (θ, g, m, v) of every parameter with a gradient; shallow handles,
        // so the fused pass below can borrow all four buffers at once.
        let mut todo: Vec<(Tensor, Tensor, Tensor, Tensor)> = Vec::new();
        for (name, p) in params {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let g = g.f_to_kind(Kind::Float)?;
            let m = self.m.entry(name.clone()).or_insert_with(|| g.zeros_like()).shallow_clone();
            let v = self.v.entry(name.clone()).or_insert_with(|| g.zeros_like()).shallow_clone();
            todo.push((p.shallow_clone(), g, m, v));
        }
        // Two names for one tensor would update it twice (and alias the
        // fused pass's buffers): refuse.
        let mut seen = std::collections::HashSet::new();
        for ((name, _), (p, ..)) in params.iter().filter(|(_, p)| p.grad().defined()).zip(&todo) {
            if !seen.insert(p.data_ptr() as usize) {
                return Err(TrainError::Invalid(format!("parameter {name} shares its storage with another trainable parameter")));
            }
        }
        let fma = has_fma();
        for (p, g, m, v) in &todo {
            if fma && fits(p, g, m, v) {
                fused_step(p, g, m, v, &c)?;
            } else {
                tensor_step(p, g, m, v, &c)?;
            }
        }
        Ok(())
    }

    /// Writes the moments to `path` (safetensors, CPU copies).
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.m.len());
        for (k, t) in &self.m {
            named.push((format!("m.{k}"), t.to_device(tch::Device::Cpu)));
        }
        for (k, t) in &self.v {
            named.push((format!("v.{k}"), t.to_device(tch::Device::Cpu)));
        }
        Tensor::write_safetensors(&named, path).map_err(|e| TrainError::io_tch(path, e))
    }

    /// Restores moments written by [`AdamW::save`] and the step count.
    pub fn load(&mut self, path: &Path, step: u64, device: tch::Device) -> Result<(), TrainError> {
        self.m.clear();
        self.v.clear();
        for (k, t) in Tensor::read_safetensors(path).map_err(|e| TrainError::io_tch(path, e))? {
            let t = t.to_device(device);
            if let Some(n) = k.strip_prefix("m.") {
                self.m.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix("v.") {
                self.v.insert(n.to_string(), t);
            } else {
                return Err(TrainError::Checkpoint(format!("{}: unexpected tensor {k}", path.display())));
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The per-step scalars of the update, each computed in f64 exactly as the
/// tensor-op form hands it to torch (which rounds it to f32 once).
struct Coeffs {
    lr: f64,
    weight_decay: f64,
    /// 1 − lr·λ.
    decay: f64,
    /// Weight of `lerp(m, g, ·)`: 1 − β1.
    w1: f64,
    beta2: f64,
    /// 1 − β2.
    w2: f64,
    eps: f64,
    /// √(1 − β2^t).
    bc2_sqrt: f64,
    /// −(1 − β1^t) / lr: the denominator's factor that folds in the step size.
    neg_inv_step: f64,
}

impl Coeffs {
    fn new(cfg: &AdamWConfig, step: u64, lr: f64) -> Self {
        let t = step as i32;
        Coeffs {
            lr,
            weight_decay: cfg.weight_decay,
            decay: 1.0 - lr * cfg.weight_decay,
            w1: 1.0 - cfg.beta1,
            beta2: cfg.beta2,
            w2: 1.0 - cfg.beta2,
            eps: cfg.eps,
            bc2_sqrt: (1.0 - cfg.beta2.powi(t)).sqrt(),
            neg_inv_step: -(1.0 - cfg.beta1.powi(t)) / lr,
        }
    }
}

/// The update as tensor ops, in place where PyTorch's single-tensor AdamW
/// is: for parameters [`fused_step`] cannot take (on CUDA, or stored in
/// bf16/f16), and the reference the fused pass reproduces bit for bit.
fn tensor_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, c: &Coeffs) -> Result<(), TrainError> {
    let (mut m, mut v) = (m.shallow_clone(), v.shallow_clone());
    // m ← lerp(m, g, 1 − β1) ; v ← β2 v + (1 − β2) g²
    let _ = m.f_lerp_(g, c.w1)?;
    let _ = v.f_mul_scalar_(c.beta2)?.f_addcmul_(&(g * c.w2), g)?;
    if c.lr == 0.0 {
        return Ok(()); // warmup's first step: moments advance, θ stays
    }
    // denom' = (√v / √bc2 + ε) · (−bc1 / lr), so θ + m / denom' is the update.
    let mut denom = v.f_sqrt()?;
    let _ = denom.f_div_scalar_(c.bc2_sqrt)?.f_add_scalar_(c.eps)?.f_mul_scalar_(c.neg_inv_step)?;
    let mut p = p.shallow_clone();
    if c.weight_decay != 0.0 {
        let _ = p.f_mul_scalar_(c.decay)?;
    }
    if p.kind() == Kind::Float {
        let _ = p.f_addcdiv_(&m, &denom)?;
    } else {
        // bf16/f16 parameters: the update in f32, rounded once.
        let _ = p.f_add_(&(&m / &denom).f_to_kind(p.kind())?)?;
    }
    Ok(())
}

/// Whether [`fused_step`] can run here: its `lerp` needs hardware FMA.
fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// θ, g, m and v all contiguous f32 on the CPU with one (non-empty) size:
/// what [`fused_step`] takes.
fn fits(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let n = p.numel();
    n > 0 && [p, g, m, v].into_iter().all(|t| t.device() == tch::Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() && t.numel() == n)
}

/// A tensor's f32 buffer as an address, to hand disjoint ranges of it to
/// threads.
#[derive(Clone, Copy)]
struct Buf(*mut f32);
// SAFETY: only ever dereferenced over disjoint index ranges, one per thread,
// while the owning tensors outlive the scope (see `fused_step`).
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    fn of(t: &Tensor) -> Buf {
        Buf(t.data_ptr() as *mut f32)
    }
}

/// Runs `f(lo, hi)` over `0..n` cut into torch's intra-op thread count of
/// contiguous ranges, one per thread (small tensors: one range, here).
fn split_run(n: usize, f: &(dyn Fn(usize, usize) + Sync)) {
    let threads = if n < 1 << 16 { 1 } else { tch::get_num_threads().max(1) as usize };
    let chunk = n.div_ceil(threads);
    std::thread::scope(|sc| {
        for k in 1..threads {
            let (lo, hi) = ((k * chunk).min(n), ((k + 1) * chunk).min(n));
            if lo < hi {
                sc.spawn(move || f(lo, hi));
            }
        }
        f(0, chunk.min(n));
    });
}

/// [`tensor_step`] for a CPU f32 parameter in two passes over memory plus
/// torch's own `sqrt` — read g, m, v, write m, v; `√v` into a temporary;
/// read θ, m, √v, write θ — where the tensor ops sweep each tensor about ten
/// times and allocate two temporaries (on SmolLM2-135M that was 0.6–0.9 s of
/// a GRPO step).
///
/// Bit for bit [`tensor_step`]'s result (a test checks it): each f32
/// operation is the one torch's CPU kernel performs, in its order — `lerp`
/// and `addcmul` each as one fused multiply-add (`fmadd(w, g − m, m)`, or
/// `fmadd(w − 1, g − m, g)` for w ≥ ½; `fmadd(g·w2, g, v·β2)`), `addcdiv`'s
/// unit-weighted add exact either way, the scalars rounded to f32 once.
/// The square root stays torch's: its CPU kernel (MKL's vector math) is not
/// correctly rounded, so a Rust `sqrt` would differ in ~0.7% of elements
/// and move every trajectory — the quickstart's gates are that sensitive.
/// Elements are independent, so the thread split cannot change a bit.
/// Callers check [`has_fma`] and [`fits`].
fn fused_step(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, c: &Coeffs) -> Result<(), TrainError> {
    let n = p.numel();
    let (bp, bg, bm, bv) = (Buf::of(p), Buf::of(g), Buf::of(m), Buf::of(v));
    // SAFETY (both passes): every buffer holds `n` f32s (`fits`) and the
    // tensors live until this function returns; p, g, m, v are distinct
    // storages (m, v are the optimizer's own, g is p's gradient, and `step`
    // refuses a tensor under two names); each thread touches only [lo, hi).
    // `has_fma` was checked by the caller.
    split_run(n, &|lo, hi| unsafe { moments(bg, bm, bv, lo, hi, c) });
    if c.lr == 0.0 {
        return Ok(()); // warmup's first step: moments advance, θ stays
    }
    let root = v.f_sqrt()?;
    let br = Buf::of(&root);
    split_run(n, &|lo, hi| unsafe { update(bp, bm, br, lo, hi, c) });
    Ok(())
}

/// `m ← fmadd(w1, g − m, m)` (torch's `lerp`), `v ← fmadd(g·w2, g, v·β2)`
/// (torch's `mul_` then `addcmul_`, whose multiply-add its compiler fuses).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn moments(g: Buf, m: Buf, v: Buf, lo: usize, hi: usize, c: &Coeffs) {
    let (w1, b2, w2) = (c.w1 as f32, c.beta2 as f32, c.w2 as f32);
    let small = w1.abs() < 0.5;
    for i in lo..hi {
        let (gi, mi, vi) = (*g.0.add(i), m.0.add(i), v.0.add(i));
        *mi = if small { w1.mul_add(gi - *mi, *mi) } else { (w1 - 1.0).mul_add(gi - *mi, gi) };
        *vi = (gi * w2).mul_add(gi, *vi * b2);
    }
}

/// `θ ← θ·decay + m / ((√v / √bc2 + ε) · (−bc1 / lr))`, given `root = √v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn update(p: Buf, m: Buf, root: Buf, lo: usize, hi: usize, c: &Coeffs) {
    let (bc2s, eps, k, decay) = (c.bc2_sqrt as f32, c.eps as f32, c.neg_inv_step as f32, c.decay as f32);
    let decays = c.weight_decay != 0.0;
    for i in lo..hi {
        let d = (*root.0.add(i) / bc2s + eps) * k;
        let pi = p.0.add(i);
        let base = if decays { *pi * decay } else { *pi };
        *pi = base + *m.0.add(i) / d;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn moments(_: Buf, _: Buf, _: Buf, _: usize, _: usize, _: &Coeffs) {
    unreachable!("has_fma() is false off x86_64")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn update(_: Buf, _: Buf, _: Buf, _: usize, _: usize, _: &Coeffs) {
    unreachable!("has_fma() is false off x86_64")
}

/// Zeroes (drops) every parameter's gradient.
pub fn zero_grad(params: &[(String, Tensor)]) {
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.detach_().zero_();
        }
    }
}

/// Gives every parameter without a gradient a zero one (by back-propagating
/// `0 · Σ p`), so the optimizer updates it as it would after a backward
/// pass whose gradient happens to be 0.
pub fn ensure_grads(params: &[(String, Tensor)]) -> Result<(), TrainError> {
    let zero: Vec<Tensor> = params.iter().filter(|(_, p)| !p.grad().defined()).map(|(_, p)| p.sum(Kind::Float) * 0.0).collect();
    if !zero.is_empty() {
        Tensor::stack(&zero, 0).sum(Kind::Float).f_backward()?;
    }
    Ok(())
}

/// Global L2 norm of all gradients; when `max_norm > 0` and the norm exceeds
/// it, scales them by `max_norm / (norm + 1e-6)` (PyTorch
/// `clip_grad_norm_`). Returns the norm before clipping (what TRL logs).
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> Result<f64, TrainError> {
    let _g = tch::no_grad_guard();
    // ‖(‖g_1‖, …, ‖g_n‖)‖ as PyTorch: per-tensor norms in the gradient's
    // dtype (no f64 copy of every gradient), combined in f64 on the host.
    let mut sq = 0f64;
    for (_, p) in params {
        let g = p.grad();
        if g.defined() {
            let n = g.f_norm()?.double_value(&[]);
            sq += n * n;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        let coef = max_norm / (norm + 1e-6);
        for (_, p) in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_mul_scalar_(coef)?;
            }
        }
    }
    Ok(norm)
}

/// transformers' schedules (`get_cosine_schedule_with_warmup`,
/// `get_linear_schedule_with_warmup`, `get_constant_schedule_with_warmup`):
/// the learning rate of optimizer step `step` (0-based) of `total`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    pub kind: LrSchedulerType,
}

impl LrSchedule {
    /// `warmup_steps` wins over `warmup_ratio` (transformers' rule), ratio rounded up.
    pub fn new(peak: f64, kind: LrSchedulerType, warmup_steps: usize, warmup_ratio: f64, total: usize) -> Self {
        let warmup = if warmup_steps > 0 { warmup_steps } else { (warmup_ratio * total as f64).ceil() as usize };
        LrSchedule { peak, warmup, total, kind }
    }

    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = (step - self.warmup) as f64 / span;
        match self.kind {
            LrSchedulerType::Constant => self.peak,
            LrSchedulerType::Linear => self.peak * (1.0 - progress).max(0.0),
            LrSchedulerType::Cosine => self.peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(v: &[f32]) -> (String, Tensor) {
        ("w".into(), Tensor::from_slice(v).set_requires_grad(true))
    }

    #[test]
    fn adamw_matches_hand_computed_steps() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(cfg);
        let params = vec![param(&[1.0, -2.0])];
        // loss = Σ w² → g = 2w = [2, −4].
        (&params[0].1 * &params[0].1).sum(Kind::Float).backward();
        opt.step(&params, 0.1).unwrap();
        // Step 1: m̂ = g, v̂ = g² → update = lr·sign(g) (up to ε); decay first: w·(1 − 0.01).
        let w: Vec<f32> = Vec::try_from(&params[0].1).unwrap();
        assert!((w[0] - (0.99 - 0.1)).abs() < 1e-6 && (w[1] - (-1.98 + 0.1)).abs() < 1e-6, "{w:?}");
        // Step 2 by hand for coordinate 0: g = 2·0.89 = 1.78.
        zero_grad(&params);
        (&params[0].1 * &params[0].1).sum(Kind::Float).backward();
        opt.step(&params, 0.1).unwrap();
        let g1 = 2.0f64;
        let g2 = 1.78f64;
        let m = 0.9 * (0.1 * g1) + 0.1 * g2;
        let v = 0.999 * (0.001 * g1 * g1) + 0.001 * g2 * g2;
        let expect = 0.89 * (1.0 - 0.01) - (0.1 / (1.0 - 0.81)) * m / ((v / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        let w: Vec<f32> = Vec::try_from(&params[0].1).unwrap();
        assert!((w[0] as f64 - expect).abs() < 1e-5, "step 2: {} vs hand {expect}", w[0]);
    }

    #[test]
    fn the_one_pass_update_is_the_tensor_op_update_bit_for_bit() {
        // Sizes with ragged tails (torch's vector loops end in scalar code),
        // one big enough to be split over threads; warmup (lr 0), weight
        // decay on and off, both branches of lerp (1 − β1 below and above ½).
        let sizes = [1_000_003i64, 4099, 17, 1];
        for (beta1, wd) in [(0.9, 0.1), (0.9, 0.0), (0.3, 0.01)] {
            let cfg = AdamWConfig { beta1, beta2: 0.999, eps: 1e-8, weight_decay: wd };
            tch::manual_seed(7);
            let init: Vec<Tensor> = sizes.iter().map(|&n| Tensor::randn([n], (Kind::Float, tch::Device::Cpu))).collect();
            let zeros = || -> Vec<Tensor> { init.iter().map(|t| t.zeros_like()).collect() };
            let (ma, va, mb, vb) = (zeros(), zeros(), zeros(), zeros());
            let (pa, pb): (Vec<Tensor>, Vec<Tensor>) = (init.iter().map(|t| t.copy()).collect(), init.iter().map(|t| t.copy()).collect());
            for (step, lr) in [(1u64, 0.0), (2, 1e-2), (3, 3e-3), (4, 3e-3)] {
                let c = Coeffs::new(&cfg, step, lr);
                let grads: Vec<Tensor> = sizes.iter().map(|&n| Tensor::randn([n], (Kind::Float, tch::Device::Cpu)) * 0.01).collect();
                for i in 0..sizes.len() {
                    tensor_step(&pa[i], &grads[i], &ma[i], &va[i], &c).unwrap();
                }
                if !has_fma() {
                    eprintln!("no FMA on this CPU: the fused pass is not used, nothing to compare");
                    return;
                }
                for i in 0..sizes.len() {
                    assert!(fits(&pb[i], &grads[i], &mb[i], &vb[i]));
                    fused_step(&pb[i], &grads[i], &mb[i], &vb[i], &c).unwrap();
                }
                for i in 0..sizes.len() {
                    for (a, b, what) in [(&ma[i], &mb[i], "m"), (&va[i], &vb[i], "v"), (&pa[i], &pb[i], "weights")] {
                        let differ = a.ne_tensor(b).sum(Kind::Int64).int64_value(&[]);
                        assert_eq!(differ, 0, "β1 {beta1}, λ {wd}, step {step}, size {}: {what} differ in {differ} elements", sizes[i]);
                    }
                }
                assert_eq!(pb[0].equal(&init[0]), step == 1, "step {step}: lr 0 leaves the weights alone, later steps move them");
            }
        }
    }

    #[test]
    fn one_tensor_under_two_names_is_refused() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        (&w * &w).sum(Kind::Float).backward();
        let params = vec![("a".to_string(), w.shallow_clone()), ("b".to_string(), w.shallow_clone())];
        let e = AdamW::new(cfg).step(&params, 0.1).unwrap_err().to_string();
        assert!(e.contains("parameter b shares its storage"), "{e}");
    }

    #[test]
    fn state_roundtrip_continues_identically() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 };
        let dir = tempfile::tempdir().unwrap();
        let run = |opt: &mut AdamW, p: &[(String, Tensor)]| {
            zero_grad(p);
            (&p[0].1 * &p[0].1 * 3.0).sum(Kind::Float).backward();
            opt.step(p, 0.01).unwrap();
        };
        let (pa, pb) = (vec![param(&[0.5, 1.5])], vec![param(&[0.5, 1.5])]);
        let mut a = AdamW::new(cfg);
        run(&mut a, &pa);
        a.save(&dir.path().join("o.safetensors")).unwrap();
        run(&mut a, &pa);
        // b: one step, then restore a's saved state and copy a's step-1 weights.
        let mut b = AdamW::new(cfg);
        run(&mut b, &pb);
        let mut b2 = AdamW::new(cfg);
        b2.load(&dir.path().join("o.safetensors"), 1, tch::Device::Cpu).unwrap();
        run(&mut b2, &pb);
        // Resume exactness: bitwise equal weights.
        assert!(pa[0].1.equal(&pb[0].1), "restored optimizer must continue bit-identically");
    }

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_raw_norm() {
        let params = vec![param(&[3.0, 4.0])];
        (&params[0].1 * 1.0).sum(Kind::Float).backward(); // g = [1, 1]
        let mut g = params[0].1.grad();
        g.copy_(&Tensor::from_slice(&[3.0f32, 4.0]));
        let n = clip_grad_norm(&params, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9, "pre-clip norm is |(3,4)| = 5");
        let g: Vec<f32> = Vec::try_from(params[0].1.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5, "{g:?}");
    }

    #[test]
    fn schedules_follow_transformers() {
        let c = LrSchedule::new(1.0, LrSchedulerType::Cosine, 2, 0.0, 10);
        assert_eq!((c.lr(0), c.lr(1), c.lr(2)), (0.0, 0.5, 1.0), "linear warmup from 0");
        assert!((c.lr(6) - 0.5).abs() < 1e-12, "half-way through the cosine");
        let l = LrSchedule::new(2.0, LrSchedulerType::Linear, 0, 0.0, 4);
        assert_eq!((l.lr(0), l.lr(2)), (2.0, 1.0));
        let k = LrSchedule::new(3.0, LrSchedulerType::Constant, 0, 0.25, 8);
        assert_eq!((k.warmup, k.lr(1), k.lr(7)), (2, 1.5, 3.0), "warmup_ratio 0.25 of 8 steps = 2");
    }
}
