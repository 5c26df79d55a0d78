//! The answer grammar and the rule reward — one module that the teacher,
//! GRPO and eval all call (ARCHITECTURE "Answer grammar", pinned).
//!
//! A valid answer contains `<analyze user>`, `<analyze item>`, `<match>` and
//! `<rate>`, each opened and closed exactly once, in this order (each block
//! closes before the next opens), each non-empty after trimming. Text outside
//! the blocks is allowed. The `<rate>` content, trimmed, is a plain decimal
//! number (`4`, `4.5`) inside the rating scale.
//!
//! Reward (RecZero, arXiv 2510.23077, Sec. 3): valid → `1 + (1 − |ŷ − y| / 2)`,
//! invalid → `−1`. [`RewardConfig`] generalises the constants:
//! `r = format_reward + accuracy_weight · (1 − |ŷ − y| / error_scale)`.
use serde::{Deserialize, Serialize};

/// The four blocks, in order: (name, open tag, close tag).
pub const TAGS: [(&str, &str, &str); 4] = [
    ("analyze user", "<analyze user>", "</analyze user>"),
    ("analyze item", "<analyze item>", "</analyze item>"),
    ("match", "<match>", "</match>"),
    ("rate", "<rate>", "</rate>"),
];

/// Inclusive rating scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scale {
    pub min: f32,
    pub max: f32,
}

impl Default for Scale {
    fn default() -> Self {
        Scale { min: 1.0, max: 5.0 }
    }
}

/// A parsed, valid answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub analyze_user: String,
    pub analyze_item: String,
    pub matching: String,
    pub rating: f32,
}

/// Why an answer is invalid (stable snake_case codes for stats and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// A tag is absent (`tag` names it, e.g. `</match>`).
    Missing { tag: &'static str },
    /// A tag occurs more than once.
    Repeated { tag: &'static str },
    /// Tags present but not in the required order.
    Order,
    /// A block is empty after trimming.
    Empty { block: &'static str },
    /// `<rate>` is not a plain decimal number.
    NotANumber { text: String },
    /// The rating lies outside the scale.
    OutOfScale { value: String },
}

impl Invalid {
    /// Short stable code, e.g. for the teacher's `reasons` histogram.
    pub fn code(&self) -> &'static str {
        match self {
            Invalid::Missing { .. } => "missing_tag",
            Invalid::Repeated { .. } => "repeated_tag",
            Invalid::Order => "tag_order",
            Invalid::Empty { .. } => "empty_block",
            Invalid::NotANumber { .. } => "rating_not_a_number",
            Invalid::OutOfScale { .. } => "rating_out_of_scale",
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Missing { tag } => write!(f, "missing {tag}"),
            Invalid::Repeated { tag } => write!(f, "{tag} occurs more than once"),
            Invalid::Order => write!(f, "tags out of order"),
            Invalid::Empty { block } => write!(f, "<{block}> is empty"),
            Invalid::NotANumber { text } => write!(f, "<rate> is not a number: {text:?}"),
            Invalid::OutOfScale { value } => write!(f, "rating {value} is outside the scale"),
        }
    }
}

/// `true` for `4`, `4.5`, `04.50`; `false` for `+4`, `4.`, `.5`, `1e0`, `4/5`.
fn is_plain_decimal(s: &str) -> bool {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses an answer against the pinned grammar.
pub fn parse(text: &str, scale: Scale) -> Result<Answer, Invalid> {
    // Positions of every tag; each must occur exactly once.
    let mut pos = Vec::with_capacity(8);
    for (_, open, close) in TAGS {
        for tag in [open, close] {
            let first = text.find(tag).ok_or(Invalid::Missing { tag })?;
            if text[first + tag.len()..].contains(tag) {
                return Err(Invalid::Repeated { tag });
            }
            pos.push((first, tag.len()));
        }
    }
    // open₁ < close₁ < open₂ < close₂ < … (a block closes before the next opens).
    if pos.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(Invalid::Order);
    }
    let mut blocks = Vec::with_capacity(4);
    for (i, (block, _, _)) in TAGS.iter().enumerate() {
        let (o, ol) = pos[2 * i];
        let (c, _) = pos[2 * i + 1];
        let inner = text[o + ol..c].trim();
        if inner.is_empty() {
            return Err(Invalid::Empty { block });
        }
        blocks.push(inner);
    }
    let rate = blocks[3];
    if !is_plain_decimal(rate) {
        return Err(Invalid::NotANumber { text: rate.to_string() });
    }
    let rating: f32 = rate.parse().map_err(|_| Invalid::NotANumber { text: rate.to_string() })?;
    if !(scale.min..=scale.max).contains(&rating) {
        return Err(Invalid::OutOfScale { value: rate.to_string() });
    }
    Ok(Answer {
        analyze_user: blocks[0].to_string(),
        analyze_item: blocks[1].to_string(),
        matching: blocks[2].to_string(),
        rating,
    })
}

/// Constants of the rule reward (defaults: the paper's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Reward for a well-formed answer (paper: 1).
    pub format_reward: f32,
    /// Reward for a malformed answer (paper: −1).
    pub invalid_reward: f32,
    /// Weight of the accuracy term (paper: 1).
    pub accuracy_weight: f32,
    /// Error scale in `1 − |ŷ − y| / scale` (paper: 2).
    pub error_scale: f32,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig { format_reward: 1.0, invalid_reward: -1.0, accuracy_weight: 1.0, error_scale: 2.0 }
    }
}

/// A reward with its per-term breakdown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reward {
    pub total: f32,
    /// Format term (format_reward or invalid_reward).
    pub format: f32,
    /// Accuracy term (0 when invalid).
    pub accuracy: f32,
}

/// Format term: `format_reward` for a valid answer, `invalid_reward`
/// otherwise (paper: +1 / −1).
pub fn format_term(parsed: &Result<Answer, Invalid>, cfg: &RewardConfig) -> f32 {
    if parsed.is_ok() {
        cfg.format_reward
    } else {
        cfg.invalid_reward
    }
}

/// Accuracy term: `accuracy_weight · (1 − |ŷ − y| / error_scale)` for a
/// valid answer with rating ŷ and target y, 0 otherwise (paper: `1 − |ŷ − y| / 2`).
pub fn accuracy_term(parsed: &Result<Answer, Invalid>, target: f32, cfg: &RewardConfig) -> f32 {
    match parsed {
        Ok(a) => cfg.accuracy_weight * (1.0 - (a.rating - target).abs() / cfg.error_scale),
        Err(_) => 0.0,
    }
}

/// The rule reward of one completion against its target rating: the
/// format term plus the accuracy term (GRPO composes the same two terms,
/// `recflow_ml::rl::reward`).
pub fn reward(parsed: &Result<Answer, Invalid>, target: f32, cfg: &RewardConfig) -> Reward {
    let (format, accuracy) = (format_term(parsed, cfg), accuracy_term(parsed, target, cfg));
    Reward { total: format + accuracy, format, accuracy }
}

/// Renders a valid answer (used by offline teachers and tests).
pub fn render(user: &str, item: &str, matching: &str, rating: f32) -> String {
    let r = if rating.fract() == 0.0 { format!("{}", rating as i64) } else { format!("{rating}") };
    format!("<analyze user>{user}</analyze user>\n<analyze item>{item}</analyze item>\n<match>{matching}</match>\n<rate>{r}</rate>")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "<analyze user>likes rock</analyze user><analyze item>a rock album</analyze item><match>good fit</match><rate>4</rate>";

    #[test]
    fn parses_valid_answer_with_outside_text() {
        let a = parse(&format!("Sure.\n{OK}\nDone"), Scale::default()).expect("valid answer must parse");
        assert_eq!(a.rating, 4.0);
        assert_eq!(a.matching, "good fit");
    }

    #[test]
    fn decimal_ratings_are_valid() {
        let t = OK.replace("<rate>4</rate>", "<rate> 4.5 </rate>");
        assert_eq!(parse(&t, Scale::default()).unwrap().rating, 4.5);
    }

    #[test]
    fn rejects_each_kind_of_malformation() {
        let s = Scale::default();
        assert_eq!(parse(&OK.replace("<match>", ""), s), Err(Invalid::Missing { tag: "<match>" }));
        assert_eq!(parse(&format!("{OK}<rate>3</rate>"), s), Err(Invalid::Repeated { tag: "<rate>" }));
        let swapped = "<analyze item>x</analyze item><analyze user>y</analyze user><match>z</match><rate>4</rate>";
        assert_eq!(parse(swapped, s), Err(Invalid::Order));
        let nested = "<analyze user>a<analyze item>b</analyze item></analyze user><match>z</match><rate>4</rate>";
        assert_eq!(parse(nested, s), Err(Invalid::Order));
        assert_eq!(parse(&OK.replace("good fit", "  "), s), Err(Invalid::Empty { block: "match" }));
        for bad in ["four", "4/5", "+4", "4.", ".5", "1e0", "4 stars"] {
            let t = OK.replace("<rate>4</rate>", &format!("<rate>{bad}</rate>"));
            assert!(matches!(parse(&t, s), Err(Invalid::NotANumber { .. })), "{bad} must be rejected");
        }
        for bad in ["0", "5.5", "6"] {
            let t = OK.replace("<rate>4</rate>", &format!("<rate>{bad}</rate>"));
            assert!(matches!(parse(&t, s), Err(Invalid::OutOfScale { .. })), "{bad} is out of 1..5");
        }
    }

    #[test]
    fn paper_reward_values() {
        let cfg = RewardConfig::default();
        let ok = parse(OK, Scale::default());
        // exact: 1 + (1 − 0/2) = 2; off by one: 1 + (1 − 1/2) = 1.5; off by 4: 1 + (1 − 2) = 0.
        assert_eq!(reward(&ok, 4.0, &cfg).total, 2.0);
        assert_eq!(reward(&ok, 5.0, &cfg).total, 1.5);
        assert_eq!(reward(&parse(&OK.replace(">4<", ">1<"), Scale::default()), 5.0, &cfg).total, 0.0);
        let bad = parse("no tags", Scale::default());
        let r = reward(&bad, 4.0, &cfg);
        assert_eq!((r.total, r.format, r.accuracy), (-1.0, -1.0, 0.0));
    }

    #[test]
    fn reward_is_the_sum_of_its_two_terms() {
        // Non-paper constants, so a term using a wrong field shows.
        let cfg = RewardConfig { format_reward: 0.5, invalid_reward: -2.0, accuracy_weight: 2.0, error_scale: 4.0 };
        let ok = parse(OK, Scale::default());
        assert_eq!(format_term(&ok, &cfg), 0.5, "valid: format_reward");
        // 2 · (1 − |4 − 2| / 4) = 1.
        assert_eq!(accuracy_term(&ok, 2.0, &cfg), 1.0);
        assert_eq!(reward(&ok, 2.0, &cfg), Reward { total: 1.5, format: 0.5, accuracy: 1.0 });
        let bad = parse("no tags", Scale::default());
        assert_eq!((format_term(&bad, &cfg), accuracy_term(&bad, 2.0, &cfg)), (-2.0, 0.0), "invalid: invalid_reward and no accuracy");
        assert_eq!(reward(&bad, 2.0, &cfg).total, -2.0);
    }

    #[test]
    fn render_roundtrips() {
        let t = render("u", "i", "m", 3.0);
        assert_eq!(parse(&t, Scale::default()).unwrap().rating, 3.0);
        assert!(t.contains("<rate>3</rate>"));
    }
}
