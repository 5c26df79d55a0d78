//! The rule reward as a sum of terms, each reported on its own.
//!
//! RecZero (arXiv 2510.23077, Sec. 3): `r = r_format + r_answer`, with
//! `r_format = 1` for a well-formed answer (the four tags in order, a
//! rating in scale) and `−1` otherwise, and `r_answer = 1 − |ŷ − y| / 2` for
//! well-formed answers (0 otherwise). The grammar and constants live in
//! `recflow::answer`, which also owns the two terms
//! ([`answer::format_term`], [`answer::accuracy_term`]; the teacher and eval
//! use their sum [`answer::reward`]); here they become two [`RewardTerm`]s
//! so users can add terms (length penalties, …) and every term is logged
//! separately (`reward_<name>` columns of the grpo log).
use recflow::answer::{self, Answer, Invalid, RewardConfig, Scale};

/// What a term sees of one completion.
pub struct Completion<'a> {
    pub text: &'a str,
    /// The answer grammar's verdict on `text`.
    pub parsed: &'a Result<Answer, Invalid>,
    /// Target rating of the sample.
    pub target: f32,
    /// Whether generation stopped at the length limit.
    pub truncated: bool,
}

/// One additive term of the reward.
pub trait RewardTerm: Send + Sync {
    /// Column suffix in the log (`reward_<name>`): snake_case.
    fn name(&self) -> &str;
    fn score(&self, c: &Completion<'_>) -> f32;
}

/// [`answer::format_term`]: `format_reward` when valid, `invalid_reward`
/// otherwise (paper: +1 / −1).
pub struct FormatTerm(pub RewardConfig);

impl RewardTerm for FormatTerm {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&self, c: &Completion<'_>) -> f32 {
        answer::format_term(c.parsed, &self.0)
    }
}

/// [`answer::accuracy_term`]: `accuracy_weight · (1 − |ŷ − y| / error_scale)`
/// when valid, 0 otherwise.
pub struct AccuracyTerm(pub RewardConfig);

impl RewardTerm for AccuracyTerm {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn score(&self, c: &Completion<'_>) -> f32 {
        answer::accuracy_term(c.parsed, c.target, &self.0)
    }
}

/// One completion's reward: total, per-term values (in [`RewardFn::names`]
/// order) and the parsed rating (None when invalid).
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub total: f32,
    pub terms: Vec<f32>,
    pub rating: Option<f32>,
}

/// The reward: a list of terms summed.
pub struct RewardFn {
    terms: Vec<Box<dyn RewardTerm>>,
    scale: Scale,
}

impl RewardFn {
    /// The paper's reward with configurable constants (format + accuracy).
    pub fn paper(cfg: &RewardConfig, scale: Scale) -> Self {
        RewardFn {
            terms: vec![Box::new(FormatTerm(*cfg)), Box::new(AccuracyTerm(*cfg))],
            scale,
        }
    }

    /// Adds a term (summed into the total, logged as `reward_<name>`).
    pub fn with_term(mut self, t: Box<dyn RewardTerm>) -> Self {
        self.terms.push(t);
        self
    }

    pub fn names(&self) -> Vec<String> {
        self.terms.iter().map(|t| t.name().to_string()).collect()
    }

    pub fn score(&self, text: &str, target: f32, truncated: bool) -> Scored {
        let parsed = answer::parse(text, self.scale);
        let c = Completion { text, parsed: &parsed, target, truncated };
        let terms: Vec<f32> = self.terms.iter().map(|t| t.score(&c)).collect();
        Scored { total: terms.iter().sum(), terms, rating: parsed.as_ref().ok().map(|a| a.rating) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_terms_sum_to_the_shared_reward() {
        let f = RewardFn::paper(&RewardConfig::default(), Scale::default());
        assert_eq!(f.names(), ["format", "accuracy"]);
        for (text, target) in [
            (answer::render("u", "i", "m", 4.0), 4.0),
            (answer::render("u", "i", "m", 2.0), 5.0),
            ("no tags at all".to_string(), 3.0),
        ] {
            let s = f.score(&text, target, false);
            let shared = answer::reward(&answer::parse(&text, Scale::default()), target, &RewardConfig::default());
            // The GRPO reward must equal the one eval and teacher use.
            assert_eq!(s.total, shared.total, "{text}");
            assert_eq!(s.terms, vec![shared.format, shared.accuracy], "per-term breakdown for {text}");
        }
        // Hand values: exact 1 + 1 = 2; off by 3: 1 + (1 − 3/2) = 0.5; invalid −1.
        assert_eq!(f.score(&answer::render("u", "i", "m", 2.0), 5.0, false).total, 0.5);
    }

    struct ShortBonus;
    impl RewardTerm for ShortBonus {
        fn name(&self) -> &str {
            "short"
        }
        fn score(&self, c: &Completion<'_>) -> f32 {
            if c.text.len() < 10 {
                0.25
            } else {
                0.0
            }
        }
    }

    #[test]
    fn custom_terms_are_added_and_reported() {
        let f = RewardFn::paper(&RewardConfig::default(), Scale::default()).with_term(Box::new(ShortBonus));
        let s = f.score("nope", 3.0, true);
        // −1 (invalid) + 0 (accuracy) + 0.25 (short) — the new term enters the total.
        assert_eq!((s.total, s.terms.clone(), s.rating), (-0.75, vec![-1.0, 0.0, 0.25], None));
    }
}
