//! The hint-leak filter of the rationalization loop.
//!
//! A rationalized trace (the teacher was given the true rating as a hint)
//! is only useful for SFT if its reasoning reaches the rating on its own: a
//! trace that says "as I was told, the actual rating is 4" teaches the
//! student to hallucinate an oracle. The filter rejects answers that
//!
//! 1. refer to being told / given / hinted the rating ([`TOLD`]),
//! 2. talk about the "actual", "true", "real", "correct" or "ground-truth"
//!    rating ([`ORACLE`]),
//! 3. state the target's rating as already known ([`KNOWN`]), e.g. "the user
//!    rated this item 4", "the rating is known to be 4".
//!
//! Ratings quoted from the user's or the item's *history* are evidence, not
//! leaks: "the user rated Abbey Road 5 and gave Thriller 2 stars; their
//! average is 4.2" passes. Matching is case-insensitive on whitespace-
//! normalised text, by phrase; the phrase lists below are the documentation
//! (docs/teacher.md repeats them) and the tests exercise each list both ways.
//! The filter looks at the answer `content` only; a separate
//! `reasoning_content` channel (DeepSeek-R1) is stored verbatim and may well
//! mention the hint — never train on it.

/// Phrases that refer to having been told the rating.
pub const TOLD: &[&str] = &[
    "was told",
    "were told",
    "been told",
    "i'm told",
    "i am told",
    "told that",
    "told me",
    "the hint",
    "this hint",
    "hint says",
    "hinted rating",
    "given rating",
    "rating given",
    "rating provided",
    "provided rating",
    "rating was provided",
    "rating was given",
    "we are given",
    "i was given",
    "i've been given",
    "the prompt says",
    "as instructed",
    "instructed not to",
    "not to mention",
    "without mentioning",
];

/// Phrases naming an oracle rating.
pub const ORACLE: &[&str] = &[
    "actual rating",
    "true rating",
    "real rating",
    "correct rating",
    "correct answer",
    "ground truth",
    "ground-truth",
    "target rating",
    "expected rating",
    "actual score",
    "true score",
    "actually rated",
    "actually gave",
    "rating is actually",
];

/// Phrases stating the target item's rating as known.
pub const KNOWN: &[&str] = &[
    "known to be",
    "known rating",
    "we know the user rated",
    "we know that the user rated",
    "we know the rating",
    "the user rated this item",
    "the user gave this item",
    "user has rated this item",
    "user already rated this",
    "rating for this item is",
    "rating of this item is",
    "rated the target",
];

/// A detected leak: which list, which phrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    /// `told` | `oracle` | `known`.
    pub class: &'static str,
    pub phrase: &'static str,
}

impl std::fmt::Display for Leak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "answer leaks the hint ({}: \"{}\")", self.class, self.phrase)
    }
}

/// Lower-cases and collapses whitespace (also curly apostrophes → `'`).
fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        let c = if c == '\u{2019}' { '\'' } else { c };
        if c.is_whitespace() {
            if !space && !out.is_empty() {
                out.push(' ');
            }
            space = true;
        } else {
            out.extend(c.to_lowercase());
            space = false;
        }
    }
    out
}

/// Every phrase with its class, in the order they are checked (told,
/// oracle, known; list order within each): the first listed phrase that
/// matches is the one reported.
fn phrases() -> impl Iterator<Item = (&'static str, &'static str)> {
    [("told", TOLD), ("oracle", ORACLE), ("known", KNOWN)].into_iter().flat_map(|(c, l)| l.iter().map(move |p| (c, *p)))
}

/// One automaton over all phrases (built once): the filter runs on every
/// answer, and ~50 separate substring searches per answer were a visible
/// share of the client's CPU in the throughput benchmark.
fn automaton() -> Option<&'static aho_corasick::AhoCorasick> {
    static AC: std::sync::OnceLock<Option<aho_corasick::AhoCorasick>> = std::sync::OnceLock::new();
    AC.get_or_init(|| aho_corasick::AhoCorasick::new(phrases().map(|(_, p)| p)).ok()).as_ref()
}

/// Whether the match `s..e` of `text` lies at word boundaries (so "retold
/// that" or "a hinted melody" do not match "told that" / "the hint").
fn at_word_boundaries(text: &[u8], s: usize, e: usize) -> bool {
    (s == 0 || !text[s - 1].is_ascii_alphanumeric()) && (e == text.len() || !text[e].is_ascii_alphanumeric())
}

/// The first leak in an answer, if any.
pub fn find_leak(content: &str) -> Option<Leak> {
    let t = normalise(content);
    let bytes = t.as_bytes();
    let first = match automaton() {
        // Overlapping search: a phrase inside a longer or earlier one must still be seen.
        Some(ac) => ac
            .find_overlapping_iter(&t)
            .filter(|m| at_word_boundaries(bytes, m.start(), m.end()))
            .map(|m| m.pattern().as_usize())
            .min(),
        // The automaton of fixed literals cannot fail to build; plain search if it ever did.
        None => phrases().position(|(_, p)| {
            t.match_indices(p).any(|(s, m)| at_word_boundaries(bytes, s, s + m.len()))
        }),
    }?;
    phrases().nth(first).map(|(class, phrase)| Leak { class, phrase })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_ratings_are_not_leaks() {
        let ok = [
            "The user rated Abbey Road 5 and gave Thriller 2 stars; their average is 4.2.",
            "This album has 12 earlier ratings averaging 4.1, and a hint of jazz in the description.",
            "Earlier the user rated three rock albums 5, 5 and 4, so I predict 5.",
            "The story was retold that year; the user loved it (rated 5).",
            "<analyze user>Gave 4 to most guitars.</analyze user><rate>4</rate>",
        ];
        for text in ok {
            assert_eq!(find_leak(text), None, "history evidence must pass: {text}");
        }
    }

    #[test]
    fn hint_references_are_leaks_in_every_class() {
        let bad = [
            ("As I was told, the user likes it.", "told"),
            ("Based on the hint, 4 fits.", "told"),
            ("The given rating of 4 makes sense.", "told"),
            ("I must not mention it, but without mentioning the rating...", "told"),
            ("The actual rating is 4.", "oracle"),
            ("Matching the TRUE   rating of 5.", "oracle"),
            ("The ground-truth label says 3.", "oracle"),
            ("The user actually rated it 2.", "oracle"),
            ("The rating is known to be 4.", "known"),
            ("We know the user rated this item highly.", "known"),
            ("The user rated this item 4 stars.", "known"),
        ];
        for (text, class) in bad {
            let leak = find_leak(text).unwrap_or_else(|| panic!("hint reference must be caught: {text}"));
            assert_eq!(leak.class, class, "wrong class for {text}");
        }
    }

    #[test]
    fn automaton_agrees_with_a_plain_scan_at_word_boundaries() {
        // Overlaps ("we know the user rated this item"), a phrase at the very
        // end, a non-boundary hit ("retold that") next to a real one.
        for text in [
            "we know the user rated this item 4",
            "Retold that tale; the ground truth",
            "nothing here but ratings 5, 4, 2",
            "hintless: the hints differ, but the hint",
        ] {
            let t = normalise(text);
            let plain = phrases()
                .find(|(_, p)| t.match_indices(p).any(|(s, m)| at_word_boundaries(t.as_bytes(), s, s + m.len())))
                .map(|(class, phrase)| Leak { class, phrase });
            assert_eq!(find_leak(text), plain, "automaton and plain scan must agree on: {text}");
        }
        assert_eq!(find_leak("we know the user rated this item 4").map(|l| l.phrase), Some("we know the user rated"));
        assert_eq!(find_leak("hintless: the hints differ, but the hint").map(|l| l.phrase), Some("the hint"));
    }

    #[test]
    fn curly_apostrophes_and_case_are_normalised() {
        assert!(find_leak("I\u{2019}m TOLD it is 4").is_some(), "typographic apostrophe must not evade the filter");
    }
}
