//! The GRPO objective, matching TRL 0.24's `GRPOTrainer._compute_loss`
//! (trl/trainer/grpo_trainer.py, token-level importance sampling).
//!
//! Per completion token t of sequence i, with ρ = exp(log π_θ − log π_old):
//! ```text
//! ℓ_it = −min(ρ·Â_i, clip(ρ, 1 − ε_low, 1 + ε_high)·Â_i) + β·KL_it
//! KL_it = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1     (k3, Schulman 2020)
//! ```
//! KL_it is clamped to [−10, 10] as verl's `low_var_kl` does, so one
//! underflowing reference log-prob cannot blow up a step.
//!
//! Normalisation (`loss_type`), with m_it the completion mask, N sequences
//! in the step's batch and L = `max_completion_length`:
//! * `grpo`:    (1/N) Σ_i Σ_t m_it ℓ_it / max(1, Σ_t m_it)
//! * `bnpo`:    Σ_it m_it ℓ_it / max(1, Σ_it m_it)
//! * `dr_grpo`: Σ_it m_it ℓ_it / (N · L)
//! * `dapo`:    Σ_it m_it ℓ_it / num_items_in_batch, the count of all
//!   completion tokens of the batch *before* `mask_truncated_completions`
//!   (TRL computes it before masking).
//!
//! Every variant is a weighted sum of per-token terms, `Σ_it w_i m_it ℓ_it`,
//! with a per-sequence weight w_i ([`sequence_weights`]). That lets the
//! trainer split a step into micro-batches and chunks of tokens and call
//! `backward` on each piece: the gradients add up to the full step's. TRL
//! divides by `gradient_accumulation_steps` per micro-batch instead, which is
//! the same thing when its micro-batches have equal size; for `bnpo` TRL
//! normalises per micro-batch, we normalise by the whole step (identical with
//! one micro-batch, and independent of how we micro-batch).
use recflow::stages::grpo::LossType;
use tch::{Kind, Tensor};

use super::RlError;

/// Clamp of the k3 KL estimate (verl `kl_penalty == "low_var_kl"`).
pub const KL_CLAMP: f64 = 10.0;

/// Coefficients of the clipped surrogate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Surrogate {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
}

/// Per-token terms for a set of tokens (1-D tensors of the same length n).
pub struct TokenTerms {
    /// ℓ_t, `[n]`, differentiable through `logp`.
    pub loss: Tensor,
    /// KL_t (detached), `[n]`; zeros when there is no reference.
    pub kl: Tensor,
    /// ρ < 1 − ε_low with Â < 0 (the lower clip is active), `[n]` bool.
    pub low_clipped: Tensor,
    /// ρ > 1 + ε_high with Â > 0 (the upper clip is active), `[n]` bool.
    pub high_clipped: Tensor,
}

fn check_1d(what: &'static str, t: &Tensor, n: i64) -> Result<(), RlError> {
    if t.size() != [n] {
        return Err(RlError::Shape { what, expected: format!("[{n}]"), got: format!("{:?}", t.size()) });
    }
    Ok(())
}

impl Surrogate {
    /// ℓ for tokens with current log-probs `logp` `[n]`, behaviour log-probs
    /// `old_logp` `[n]`, optional reference log-probs `ref_logp` `[n]`, and
    /// each token's sequence advantage `adv` `[n]`.
    pub fn per_token(
        &self,
        logp: &Tensor,
        old_logp: &Tensor,
        ref_logp: Option<&Tensor>,
        adv: &Tensor,
    ) -> Result<TokenTerms, RlError> {
        let n = logp.size().first().copied().unwrap_or(-1);
        check_1d("logp", logp, n)?;
        check_1d("old_logp", old_logp, n)?;
        check_1d("adv", adv, n)?;
        let ratio = (logp - old_logp.detach()).f_exp()?; // ρ, [n]
        let clipped = ratio.f_clamp(1.0 - self.epsilon_low, 1.0 + self.epsilon_high)?;
        let adv = adv.detach();
        let l1 = &ratio * &adv;
        let l2 = &clipped * &adv;
        let mut loss = -l1.f_minimum(&l2)?; // −min(ρÂ, clip(ρ)Â)
        let kl = match ref_logp {
            Some(r) if self.beta != 0.0 => {
                check_1d("ref_logp", r, n)?;
                let d = r.detach() - logp; // log π_ref − log π_θ
                let k3 = (d.f_exp()? - &d - 1.0).f_clamp(-KL_CLAMP, KL_CLAMP)?;
                loss += &k3 * self.beta;
                k3.detach()
            }
            _ => logp.zeros_like().detach(),
        };
        let ratio = ratio.detach();
        let low_clipped = ratio.lt(1.0 - self.epsilon_low).logical_and(&adv.lt(0.0));
        let high_clipped = ratio.gt(1.0 + self.epsilon_high).logical_and(&adv.gt(0.0));
        Ok(TokenTerms { loss, kl, low_clipped, high_clipped })
    }
}

/// The per-sequence weight w_i of each `loss_type` (module doc), for a step
/// batch whose sequences have `masked_len[i]` tokens in the loss mask and
/// `num_items_in_batch` completion tokens before truncation masking.
pub fn sequence_weights(
    loss_type: LossType,
    masked_len: &[usize],
    num_items_in_batch: usize,
    max_completion_length: usize,
) -> Vec<f64> {
    let n = masked_len.len().max(1) as f64;
    let total: usize = masked_len.iter().sum();
    masked_len
        .iter()
        .map(|&len| match loss_type {
            LossType::Grpo => 1.0 / (n * len.max(1) as f64),
            LossType::Bnpo => 1.0 / total.max(1) as f64,
            LossType::DrGrpo => 1.0 / (n * max_completion_length.max(1) as f64),
            LossType::Dapo => 1.0 / num_items_in_batch.max(1) as f64,
        })
        .collect()
}

/// TRL's formula written literally on a padded `[N, T]` per-token loss and
/// mask (one micro-batch = the whole step). Used to test [`sequence_weights`]
/// and by callers that hold a whole batch at once.
pub fn trl_reduce(
    loss_type: LossType,
    per_token_loss: &Tensor,
    mask: &Tensor,
    num_items_in_batch: f64,
    max_completion_length: usize,
) -> Result<Tensor, RlError> {
    if per_token_loss.size() != mask.size() || per_token_loss.dim() != 2 {
        return Err(RlError::Shape {
            what: "per_token_loss / mask",
            expected: "two [N, T] tensors of one shape".into(),
            got: format!("{:?} and {:?}", per_token_loss.size(), mask.size()),
        });
    }
    let m = mask.to_kind(Kind::Float);
    let lm = per_token_loss * &m; // [N, T]
    let n = per_token_loss.size()[0] as f64;
    Ok(match loss_type {
        LossType::Grpo => (lm.sum_dim_intlist(-1, false, Kind::Float)
            / m.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0))
        .mean(Kind::Float),
        LossType::Bnpo => lm.sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0),
        LossType::DrGrpo => lm.sum(Kind::Float) / (n * max_completion_length as f64),
        LossType::Dapo => lm.sum(Kind::Float) / num_items_in_batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }
    fn close(a: &Tensor, b: &[f64]) {
        let a: Vec<f64> = Vec::<f64>::try_from(a.to_kind(Kind::Double)).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn clipped_surrogate_hand_values() {
        let s = Surrogate { epsilon_low: 0.2, epsilon_high: 0.28, beta: 0.0 };
        // ρ = e^{ln 1.5} = 1.5 (A=+1: clipped to 1.28 → ℓ = −1.28),
        // ρ = 0.5 (A=−1: min(−0.5, −0.8) = −0.8 → ℓ = 0.8),
        // ρ = 1.1 (A=+2: unclipped → ℓ = −2.2), ρ = 0.5 (A=+1: min(0.5, 0.8) = 0.5 → ℓ = −0.5).
        let old = t(&[0.0, 0.0, 0.0, 0.0]);
        let logp = t(&[1.5f32.ln(), 0.5f32.ln(), 1.1f32.ln(), 0.5f32.ln()]);
        let adv = t(&[1.0, -1.0, 2.0, 1.0]);
        let out = s.per_token(&logp, &old, None, &adv).unwrap();
        close(&out.loss, &[-1.28, 0.8, -2.2, -0.5]);
        // Clip counters as TRL: lower clip only with Â < 0, upper only with Â > 0.
        assert_eq!(Vec::<bool>::try_from(&out.low_clipped).unwrap(), [false, true, false, false]);
        assert_eq!(Vec::<bool>::try_from(&out.high_clipped).unwrap(), [true, false, false, false]);
    }

    #[test]
    fn k3_kl_hand_values_and_clamp() {
        let s = Surrogate { epsilon_low: 0.2, epsilon_high: 0.2, beta: 0.5 };
        // ρ = 1 and Â = 0 → surrogate 0; d = ref − logp = ln 2 → k3 = 2 − ln 2 − 1.
        // d = 20 → e^20 − 21 clamped to 10.
        let logp = t(&[0.0, -20.0]);
        let refp = t(&[2f32.ln(), 0.0]);
        let out = s.per_token(&logp, &logp, Some(&refp), &t(&[0.0, 0.0])).unwrap();
        let k = 1.0 - 2f64.ln();
        close(&out.kl, &[k, 10.0]);
        close(&out.loss, &[0.5 * k, 5.0]);
    }

    #[test]
    fn surrogate_gradient_is_minus_advantage_at_ratio_one() {
        // d/dlogp of −ρÂ at ρ = 1 is −Â (the policy-gradient direction).
        let logp = t(&[-1.0, -2.0]).set_requires_grad(true);
        let s = Surrogate { epsilon_low: 0.2, epsilon_high: 0.2, beta: 0.0 };
        let out = s.per_token(&logp, &logp.detach(), None, &t(&[0.5, -2.0])).unwrap();
        out.loss.sum(Kind::Float).backward();
        close(&logp.grad(), &[-0.5, 2.0]);
    }

    #[test]
    fn weights_reproduce_trl_reductions() {
        // N = 2 sequences, T = 3; sequence 0 has 3 tokens, sequence 1 has 1.
        let l = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]);
        let m = t(&[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]).view([2, 3]);
        let lens = [3usize, 1];
        // Hand: grpo ((6/3) + (4/1))/2 = 3; bnpo 10/4; dr_grpo 10/(2·5); dapo 10/5 (5 tokens before masking).
        for (lt, hand) in [
            (LossType::Grpo, 3.0),
            (LossType::Bnpo, 2.5),
            (LossType::DrGrpo, 1.0),
            (LossType::Dapo, 2.0),
        ] {
            let trl = trl_reduce(lt, &l, &m, 5.0, 5).unwrap().double_value(&[]);
            assert!((trl - hand).abs() < 1e-9, "{lt:?}: TRL formula gives {trl}, hand {hand}");
            let w = sequence_weights(lt, &lens, 5, 5);
            let lv = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]];
            let mv = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]];
            let ours: f64 = (0..2).map(|i| (0..3).map(|j| w[i] * mv[i][j] * lv[i][j]).sum::<f64>()).sum();
            assert!((ours - hand).abs() < 1e-9, "{lt:?}: weighted sum {ours} must equal TRL's {hand}");
        }
    }

    #[test]
    fn fully_masked_sequence_counts_in_grpo_mean() {
        // mask_truncated_completions zeroes a sequence: TRL still divides by N.
        let w = sequence_weights(LossType::Grpo, &[2, 0], 4, 8);
        assert_eq!(w, vec![1.0 / 4.0, 1.0 / 2.0]);
    }

    #[test]
    fn shape_errors_are_reported() {
        let s = Surrogate { epsilon_low: 0.2, epsilon_high: 0.2, beta: 0.0 };
        assert!(s.per_token(&t(&[0.0, 0.0]), &t(&[0.0]), None, &t(&[0.0, 0.0])).is_err());
    }
}
