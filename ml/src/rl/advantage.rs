//! Group-relative advantages (GRPO, Shao et al. 2024, Eq. 3; Dr. GRPO,
//! Liu et al. 2025, for `scale_rewards: none`).
//!
//! Rewards arrive group-major: `r[b·G + g]` is completion `g` of prompt `b`.
//!
//! `Â_{b,g} = (r_{b,g} − mean_g(r_b)) / (σ + eps)` with `eps = 1e-4` and
//! σ the *unbiased* standard deviation (Bessel, as `torch.std` in TRL 0.24's
//! `_generate_and_score_completions`):
//! * `group`: σ = std of the group;
//! * `batch`: σ = std of all B·G rewards (still centred per group);
//! * `none`: no division (Dr. GRPO: the std term biases towards easy/hard groups).
use recflow::stages::grpo::ScaleRewards;

use super::RlError;

/// TRL's constant in `advantages / (std_rewards + 1e-4)`.
pub const STD_EPS: f64 = 1e-4;

/// Advantages of one batch plus the statistics the log reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// `[B·G]`, group-major.
    pub adv: Vec<f32>,
    /// Unbiased std of each group, `[B]`.
    pub group_std: Vec<f32>,
    /// Fraction of groups whose rewards are all equal (std ≈ 0: no learning
    /// signal from that prompt, whatever the scaling). TRL's
    /// `frac_reward_zero_std`, always from group stds.
    pub frac_zero_std: f32,
    /// Mean reward of the batch.
    pub reward_mean: f32,
    /// Mean of the group stds (`group`, `none`) or the batch std (`batch`):
    /// TRL's `reward_std`.
    pub reward_std: f32,
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Unbiased standard deviation (n − 1); 0 for a single value.
fn std_unbiased(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// Computes advantages for `rewards` in groups of `g`.
pub fn group_advantages(rewards: &[f32], g: usize, scale: ScaleRewards) -> Result<Advantages, RlError> {
    if g == 0 || rewards.is_empty() || !rewards.len().is_multiple_of(g) {
        return Err(RlError::Shape {
            what: "rewards",
            expected: format!("a non-empty multiple of num_generations = {g}"),
            got: format!("{} values", rewards.len()),
        });
    }
    let r: Vec<f64> = rewards.iter().map(|&v| v as f64).collect();
    let batch_std = std_unbiased(&r);
    let mut adv = Vec::with_capacity(r.len());
    let mut group_std = Vec::with_capacity(r.len() / g);
    let mut zero = 0usize;
    for grp in r.chunks(g) {
        let m = mean(grp); // mean_g
        let s = std_unbiased(grp); // σ_g
        // torch.isclose(std, 0): |std| ≤ atol (1e-8) + rtol·0.
        if s <= 1e-8 {
            zero += 1;
        }
        group_std.push(s as f32);
        let denom = match scale {
            ScaleRewards::Group => s + STD_EPS,
            ScaleRewards::Batch => batch_std + STD_EPS,
            ScaleRewards::None => 1.0,
        };
        adv.extend(grp.iter().map(|v| ((v - m) / denom) as f32));
    }
    let n_groups = r.len() / g;
    let reward_std = match scale {
        ScaleRewards::Batch => batch_std as f32,
        _ => (group_std.iter().map(|&s| s as f64).sum::<f64>() / n_groups as f64) as f32,
    };
    Ok(Advantages {
        adv,
        group_std,
        frac_zero_std: zero as f32 / n_groups as f32,
        reward_mean: mean(&r) as f32,
        reward_std,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() < 1e-5)
    }

    #[test]
    fn group_scaling_matches_hand_values() {
        // Group 1: [2, 0] → mean 1, unbiased std √2; group 2: [1, 1] → std 0.
        let a = group_advantages(&[2.0, 0.0, 1.0, 1.0], 2, ScaleRewards::Group).unwrap();
        let s = 2f64.sqrt();
        assert!(close(&a.adv, &[1.0 / (s + 1e-4), -1.0 / (s + 1e-4), 0.0, 0.0]), "{:?}", a.adv);
        assert_eq!(a.frac_zero_std, 0.5, "one of two groups has no variance");
        assert_eq!(a.reward_mean, 1.0);
        assert!((a.reward_std as f64 - s / 2.0).abs() < 1e-6, "reward_std is the mean group std");
    }

    #[test]
    fn batch_scaling_uses_the_global_std_but_group_means() {
        let r = [2.0, 0.0, 1.0, 1.0];
        let a = group_advantages(&r, 2, ScaleRewards::Batch).unwrap();
        // Batch mean 1, squared deviations 1+1+0+0 = 2 over n−1 = 3.
        let sb = (2.0f64 / 3.0).sqrt();
        assert!(close(&a.adv, &[1.0 / (sb + 1e-4), -1.0 / (sb + 1e-4), 0.0, 0.0]), "{:?}", a.adv);
        assert!((a.reward_std as f64 - sb).abs() < 1e-6);
    }

    #[test]
    fn none_only_centres() {
        let a = group_advantages(&[3.0, 1.0, 2.0, -1.0, -1.0, 2.0], 3, ScaleRewards::None).unwrap();
        // Means 2 and 0 (Dr. GRPO: no std division).
        assert!(close(&a.adv, &[1.0, -1.0, 0.0, -1.0, -1.0, 2.0]), "{:?}", a.adv);
        assert_eq!(a.frac_zero_std, 0.0);
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(group_advantages(&[1.0, 2.0, 3.0], 2, ScaleRewards::Group).is_err(), "3 is not a multiple of 2");
        assert!(group_advantages(&[], 2, ScaleRewards::Group).is_err(), "empty batch");
    }
}
