//! Linear layer with an optional LoRA adapter (Hu et al. 2021, "LoRA:
//! Low-Rank Adaptation of Large Language Models").
//!
//! `y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ` with `W: [out, in]`,
//! `A: [r, in]` (kaiming-uniform, a = √5, as PEFT), `B: [out, r]` (zeros), so a
//! fresh adapter leaves the model unchanged. Turning adapters off (see
//! [`LoraSwitch`]) gives the frozen base model — GRPO's reference policy
//! without a second copy of the weights.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::{Kind, Tensor};

/// Model-wide switches shared by every adapter: adapters on/off and
/// training mode (dropout active).
#[derive(Debug, Clone, Default)]
pub struct LoraSwitch {
    pub(crate) enabled: Arc<AtomicBool>,
    pub(crate) training: Arc<AtomicBool>,
}

impl LoraSwitch {
    pub fn new() -> Self {
        let s = Self::default();
        s.enabled.store(true, Ordering::Relaxed);
        s
    }
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
    pub fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }
}

/// One LoRA adapter: `A: [r, in]`, `B: [out, r]`, scale α/r.
#[derive(Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
}

impl Lora {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// `y = x Wᵀ + b` plus an optional adapter.
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`, HF layout.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    pub(crate) switch: LoraSwitch,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, switch: LoraSwitch) -> Self {
        Self { weight, bias, lora: None, switch }
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// `x: [..., in] → [..., out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.lora {
            Some(l) if self.switch.enabled() => {
                let xd = if l.dropout > 0.0 && self.switch.training() { x.dropout(l.dropout, true) } else { x.shallow_clone() };
                // Adapter math in the adapter's dtype (f32 during training
                // even for bf16 bases), result cast back to the activation's.
                let xa = xd.to_kind(l.a.kind()).linear::<&Tensor>(&l.a, None); // [..., r]
                let d = xa.linear::<&Tensor>(&l.b, None) * l.scale(); // [..., out]
                y + d.to_kind(x.kind())
            }
            _ => y,
        }
    }

    /// Attaches a fresh adapter: `A` kaiming-uniform with a = √5 (PEFT's
    /// `reset_lora_parameters` default, bound = 1/√in), `B` = 0. Draws from
    /// tch's global generator (seed it first). Adapter parameters are f32
    /// (trainable) on the weight's device, requiring grad.
    pub fn add_lora(&mut self, r: i64, alpha: f64, dropout: f64) {
        let (out, inp) = (self.out_features(), self.in_features());
        let dev = self.weight.device();
        let bound = 1.0 / (inp as f64).sqrt();
        let a = Tensor::empty([r, inp], (Kind::Float, dev)).uniform_(-bound, bound).set_requires_grad(true);
        let b = Tensor::zeros([out, r], (Kind::Float, dev)).set_requires_grad(true);
        self.lora = Some(Lora { a, b, r, alpha, dropout });
    }

    /// Folds the adapter into `W` (`W += (α/r) B A`) and removes it.
    pub fn merge_lora(&mut self) {
        if let Some(l) = self.lora.take() {
            let _g = tch::no_grad_guard();
            let delta = (l.b.matmul(&l.a) * l.scale()).to_kind(self.weight.kind()); // [out, in]
            let mut w = self.weight.detach();
            let _ = w.g_add_(&delta);
        }
    }
}
