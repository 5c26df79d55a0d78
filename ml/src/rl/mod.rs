//! RL maths of GRPO (Shao et al. 2024) as used by RecZero/RecOne
//! (arXiv 2510.23077 Sec. 3), independent of the model:
//!
//! * [`reward`] — the rule reward as a sum of [`reward::RewardTerm`]s with a
//!   per-term breakdown (paper terms: format and accuracy, via
//!   `recflow::answer`);
//! * [`advantage`] — group-relative advantages with `scale_rewards`
//!   group | batch | none (Dr. GRPO);
//! * [`loss`] — the clipped surrogate with `epsilon`/`epsilon_high`, k3 KL
//!   to the reference and TRL 0.24's four `loss_type` normalisations.
//!
//! Every function is tested on tiny CPU inputs against hand-computed values.
pub mod advantage;
pub mod loss;
pub mod reward;

/// Errors of the RL maths (bad shapes or sizes: programming errors of the
/// caller, reported instead of panicking inside libtorch).
#[derive(Debug, thiserror::Error)]
pub enum RlError {
    #[error("{what}: expected {expected}, got {got}")]
    Shape { what: &'static str, expected: String, got: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}
