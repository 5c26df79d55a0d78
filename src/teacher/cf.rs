//! The offline `cf` teacher: deterministic Think-before-Recommendation
//! traces from a sample's own leak-free evidence, no API.
//!
//! Evidence of a sample (user u, item i, time t) comes only from the `train`
//! interactions strictly earlier than t, excluding the pair (u, i) itself:
//! the user's earlier ratings and their average, the attributes of the
//! history items the user liked (≥ 4) or disliked (≤ 2) versus the target
//! item's, and the item's earlier ratings and their average.
//!
//! Prediction: the user/item bias estimator shared with the baselines stage,
//! [`crate::cf::predict_from_evidence`] (Koren's baseline predictor in closed
//! form over earlier-only evidence), with μ = the mean of all train ratings
//! before t (the scale midpoint if none) and the baselines' default
//! shrinkage ([`crate::cf::BiasConfig::default`]). The evidence comes from
//! the data module's leak-free [`HistoryIndex`]. The rating written in
//! `<rate>` is ŷ clamped to the scale and rounded to a whole star.
//!
//! On a rationalization retry the hint is honoured structurally: the trace
//! argues for the hinted rating from the same evidence (the signals that
//! point that way), without mentioning that a rating was supplied.
//!
//! Two styles ([`CfStyle`]) write the same evidence: `verbose` in full
//! sentences quoting recent ratings and titles (~250 tokens of a small BPE),
//! `concise` as short clauses with one-decimal numbers and the liked /
//! disliked *attributes* instead of titles (~60–90 tokens), so a small
//! student with a short completion budget can learn the whole answer.
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use super::{AskFuture, Reply, Request, TeacherBackend, TeacherError, Usage};
use crate::answer::Scale;
use crate::data::history::HistoryIndex;
use crate::data::{Interaction, Item, Sample};

/// Item attributes the reasoning quotes.
#[derive(Debug, Clone, Default)]
struct ItemMeta {
    title: Option<String>,
    categories: Vec<String>,
    brand: Option<String>,
}

/// What the teacher knows about one target, all strictly before its time.
struct Known {
    mu: f64,
    est: crate::cf::BiasEstimate,
    y: f64,
    /// The user's earlier (item, rating), oldest first.
    hist: Vec<(String, f32)>,
    item_ratings: Vec<f32>,
}

/// How the `cf` teacher writes its reasoning (`with.cf_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CfStyle {
    #[default]
    Verbose,
    Concise,
}

/// Which estimate the `cf` teacher writes and rounds (`with.cf_estimate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CfEstimate {
    /// Koren's shrunk bias predictor μ + b_u + b_i ([`crate::cf::predict_from_evidence`]).
    #[default]
    Bias,
    /// The mean of the user's and the item's averages as the trace shows them
    /// (one decimal), or the one that exists. The reasoning a general LLM
    /// teacher tends to write: computable from the prompt alone, but it halves
    /// how far both averages sit from the global mean, so its rounded rating
    /// is too timid at the extremes. A student that imitates it has room to
    /// improve under the rule reward (the quickstart's GRPO learns to stretch
    /// it; docs/eval.md "The quickstart recipe").
    MeanOfAverages,
    /// The user's own average as the trace shows it (one decimal); μ for a
    /// user without earlier ratings. A teacher that reads the user's history
    /// and ignores how others rated the item (the item's average is still in
    /// its trace, unused): easy to imitate, about as accurate as the
    /// user-mean baseline, and leaving the item's evidence for the rule
    /// reward to teach (the quickstart's GRPO learns to use it; docs/eval.md
    /// "The quickstart recipe").
    UserMean,
}

impl CfEstimate {
    pub fn is_default(&self) -> bool {
        *self == CfEstimate::default()
    }
}

/// The `cf` backend.
pub struct CfTeacher {
    samples: Arc<Vec<Sample>>,
    index: HistoryIndex,
    items: HashMap<String, ItemMeta>,
    scale: Scale,
    style: CfStyle,
    estimate: CfEstimate,
    rating_offset: f64,
    rating_noise: f64,
    show_estimate: bool,
}

impl CfTeacher {
    pub fn new(samples: Arc<Vec<Sample>>, train: Vec<Interaction>, items: Vec<Item>, scale: Scale) -> Self {
        let items = items
            .into_iter()
            .map(|it| {
                let meta = ItemMeta { title: it.title, categories: it.categories.unwrap_or_default(), brand: it.brand };
                (it.item_id, meta)
            })
            .collect();
        CfTeacher {
            samples,
            index: HistoryIndex::new(train),
            items,
            scale,
            style: CfStyle::default(),
            estimate: CfEstimate::default(),
            rating_offset: 0.0,
            rating_noise: 0.0,
            show_estimate: true,
        }
    }

    pub fn with_style(mut self, style: CfStyle) -> Self {
        self.style = style;
        self
    }

    pub fn with_estimate(mut self, estimate: CfEstimate) -> Self {
        self.estimate = estimate;
        self
    }

    /// `with.cf_rating_offset`: stars added to the written estimate before
    /// it is rounded to the rating, so the teacher is miscalibrated by a
    /// known amount (−0.3: a strict rater, who rounds up only from .8). The
    /// trace still shows the estimate itself.
    pub fn with_rating_offset(mut self, offset: f64) -> Self {
        self.rating_offset = offset;
        self
    }

    /// `with.cf_show_estimate` (concise style): whether `<match>` ends with
    /// "Estimate y." Without it the trace copies the evidence (both
    /// averages, the taste overlap) and the rating itself is the one
    /// decision, so a small student's rollouts vary in the token the reward
    /// judges rather than in an intermediate number it cannot yet compute
    /// exactly (docs/eval.md, "The quickstart recipe").
    pub fn with_show_estimate(mut self, show: bool) -> Self {
        self.show_estimate = show;
        self
    }

    /// `with.cf_rating_noise`: σ (stars) of the teacher's own rating noise.
    /// Its rating is then `round(y + offset + σ·z)` with z ~ N(0, 1) drawn
    /// per sample, as an LLM teacher sampled at a temperature varies its
    /// rating around what its reasoning says; the trace is unchanged. z comes
    /// from the sample id alone (xxh3 → ChaCha8 → Box–Muller), so the
    /// teacher stays a pure function of its inputs and a retry of the same
    /// sample draws the same z.
    pub fn with_rating_noise(mut self, sigma: f64) -> Self {
        self.rating_noise = sigma;
        self
    }

    /// The teacher's own rating for sample `s` with estimate `y`: shifted by
    /// the offset, perturbed by the rating noise, then rounded to a whole
    /// star. The sum is snapped to 1e-6 first, so a printed tenth plus an
    /// offset in tenths ties exactly (3.8 − 0.3 rounds as 3.5, not as
    /// 3.4999…).
    fn rate(&self, s: &Sample, y: f64) -> f32 {
        let z = if self.rating_noise > 0.0 {
            use rand::SeedableRng;
            let seed = twox_hash::XxHash3_64::oneshot(s.sample_id.as_bytes());
            crate::data::synthetic::normal(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
        } else {
            0.0
        };
        let shifted = ((y + self.rating_offset + self.rating_noise * z) * 1e6).round() / 1e6;
        round_to_scale(shifted as f32, self.scale)
    }

    /// Earlier-only evidence and the bias prediction for one sample.
    fn known(&self, s: &Sample) -> Result<Known, TeacherError> {
        let ev = self.index.evidence(&s.user_id, &s.item_id, s.timestamp, usize::MAX, usize::MAX);
        let mu = self.index.global_mean_before(s.timestamp).unwrap_or((self.scale.min + self.scale.max) as f64 / 2.0);
        let hist: Vec<(String, f32)> = ev.user_history.iter().map(|r| (r.item_id.clone(), r.rating)).collect();
        let item_ratings: Vec<f32> = ev.item_history.iter().map(|r| r.rating).collect();
        let user_ratings: Vec<f32> = hist.iter().map(|h| h.1).collect();
        let reg = crate::cf::BiasConfig::default();
        let est = crate::cf::predict_from_evidence(mu, &user_ratings, &item_ratings, reg.reg_user, reg.reg_item)
            .map_err(|e| TeacherError::Fatal(format!("cf teacher: {e}")))?;
        let y = match self.estimate {
            CfEstimate::Bias => est.clamped(self.scale.min as f64, self.scale.max as f64),
            CfEstimate::MeanOfAverages => mean_of_averages(&user_ratings, &item_ratings, mu),
            CfEstimate::UserMean => user_mean(&user_ratings, mu),
        };
        Ok(Known { mu, est, y, hist, item_ratings })
    }

    fn title(&self, item: &str) -> String {
        self.items.get(item).and_then(|m| m.title.clone()).unwrap_or_else(|| format!("item {item}"))
    }

    fn cats(&self, item: &str) -> &[String] {
        self.items.get(item).map_or(&[], |m| m.categories.as_slice())
    }

    /// The four-tag answer for one sample; `hint` = the rating to argue for.
    pub fn answer(&self, s: &Sample, hint: Option<f32>) -> Result<String, TeacherError> {
        match self.style {
            CfStyle::Verbose => self.answer_verbose(s, hint),
            CfStyle::Concise => self.answer_concise(s, hint),
        }
    }

    /// Attributes (categories) of `items`, most frequent first (ties by
    /// name), at most `k`.
    fn top_attributes<'a>(&self, items: impl Iterator<Item = &'a str>, k: usize) -> Vec<String> {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for j in items {
            for c in self.cats(j) {
                *count.entry(c.as_str()).or_default() += 1;
            }
        }
        let mut v: Vec<(&str, usize)> = count.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.into_iter().take(k).map(|(c, _)| c.to_string()).collect()
    }

    /// The `concise` style: the verbose trace's evidence as short clauses.
    fn answer_concise(&self, s: &Sample, hint: Option<f32>) -> Result<String, TeacherError> {
        let Known { mu, est: _, y, hist, item_ratings: item_r } = self.known(s)?;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let target_cats = self.cats(&s.item_id);
        let user_ratings: Vec<f32> = hist.iter().map(|h| h.1).collect();
        let liked = self.top_attributes(hist.iter().filter(|h| h.1 >= 4.0).map(|h| h.0.as_str()), 2);
        let disliked = self.top_attributes(hist.iter().filter(|h| h.1 <= 2.0).map(|h| h.0.as_str()), 2);

        // <analyze user>
        let mut analyze_user = if hist.is_empty() {
            format!("No earlier ratings; a typical user (mean {mu:.1}).")
        } else {
            format!("Average {:.1} over {}", mean(&user_ratings), ratings(hist.len()))
        };
        if !hist.is_empty() {
            if !liked.is_empty() {
                analyze_user.push_str(&format!("; likes {}", liked.join(", ")));
            }
            if !disliked.is_empty() {
                analyze_user.push_str(&format!("; dislikes {}", disliked.join(", ")));
            }
            analyze_user.push('.');
        }

        // <analyze item>
        let what = if target_cats.is_empty() { self.title(&s.item_id) } else { target_cats.join(", ") };
        let analyze_item = if item_r.is_empty() {
            format!("{what}; no earlier ratings.")
        } else {
            format!("{what}; average {:.1} over {}.", mean(&item_r), ratings(item_r.len()))
        };

        // <match>
        let fits: Vec<&String> = target_cats.iter().filter(|c| liked.contains(c)).collect();
        let clashes: Vec<&String> = target_cats.iter().filter(|c| disliked.contains(c)).collect();
        let mut matching = String::new();
        if !fits.is_empty() {
            matching.push_str(&format!("Fits liked {}. ", fits.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")));
        }
        if !clashes.is_empty() {
            matching.push_str(&format!("Has disliked {}. ", clashes.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")));
        }
        if fits.is_empty() && clashes.is_empty() {
            matching.push_str("No clear taste signal. ");
        }
        if self.show_estimate {
            matching.push_str(&format!("Estimate {y:.1}."));
        } else {
            matching.truncate(matching.trim_end().len());
        }
        let predicted = self.rate(s, y);
        let rating = match hint.map(|h| Nudge::new(h, predicted, &user_ratings, self.scale)) {
            None => predicted,
            Some(Nudge { to: h, dir, user_extreme }) => {
                match (dir, user_extreme) {
                    (Ordering::Greater, Some(best)) => {
                        matching.push_str(&format!(" They give up to {}, so higher: {}.", fmt_r(best), fmt_r(h)))
                    }
                    (Ordering::Greater, None) => matching.push_str(&format!(" Nothing argues against it, so higher: {}.", fmt_r(h))),
                    (Ordering::Less, Some(worst)) => {
                        matching.push_str(&format!(" They give as low as {}, so lower: {}.", fmt_r(worst), fmt_r(h)))
                    }
                    (Ordering::Less, None) => matching.push_str(&format!(" Not an obvious fit, so lower: {}.", fmt_r(h))),
                    (Ordering::Equal, _) => {}
                }
                h
            }
        };
        Ok(crate::answer::render(&analyze_user, &analyze_item, &matching, rating))
    }

    /// The `verbose` style.
    fn answer_verbose(&self, s: &Sample, hint: Option<f32>) -> Result<String, TeacherError> {
        let Known { mu, est, y, hist, item_ratings: item_r } = self.known(s)?;
        let (b_u, b_i) = (est.user_bias, est.item_bias);
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let target_cats = self.cats(&s.item_id);

        // <analyze user>
        let user_ratings: Vec<f32> = hist.iter().map(|h| h.1).collect();
        let liked: Vec<&(String, f32)> = hist.iter().filter(|h| h.1 >= 4.0).collect();
        let disliked: Vec<&(String, f32)> = hist.iter().filter(|h| h.1 <= 2.0).collect();
        let list = |v: &[&(String, f32)]| {
            v.iter().rev().take(3).map(|(j, r)| format!("\"{}\" ({})", self.title(j), fmt_r(*r))).collect::<Vec<_>>().join(", ")
        };
        let analyze_user = if hist.is_empty() {
            format!("The user has no earlier ratings, so I treat them as a typical user; ratings so far average {mu:.2}.")
        } else {
            let recent: Vec<String> = user_ratings.iter().rev().take(8).map(|r| fmt_r(*r)).collect();
            let mut t = format!(
                "The user rated {} items before, averaging {:.2} (most recent first: {}).",
                hist.len(),
                mean(&user_ratings),
                recent.join(", ")
            );
            if !liked.is_empty() {
                t.push_str(&format!(" They liked {}.", list(&liked)));
            }
            if !disliked.is_empty() {
                t.push_str(&format!(" They disliked {}.", list(&disliked)));
            }
            t
        };

        // <analyze item>
        let mut analyze_item = format!("\"{}\"", self.title(&s.item_id));
        if !target_cats.is_empty() {
            analyze_item.push_str(&format!(" is in {}", target_cats.join(" / ")));
        }
        if let Some(b) = self.items.get(&s.item_id).and_then(|m| m.brand.as_deref()) {
            analyze_item.push_str(&format!(" by {b}"));
        }
        analyze_item.push('.');
        if item_r.is_empty() {
            analyze_item.push_str(" It has no earlier ratings from other users.");
        } else {
            analyze_item.push_str(&format!(
                " It has {} earlier ratings from other users, averaging {:.2}.",
                item_r.len(),
                mean(&item_r)
            ));
        }

        // <match>
        let overlap = |v: &[&(String, f32)]| -> Vec<String> {
            let mut c: Vec<String> = v
                .iter()
                .flat_map(|(j, _)| self.cats(j).iter().filter(|c| target_cats.contains(c)).cloned())
                .collect();
            c.sort();
            c.dedup();
            c
        };
        let like_overlap = overlap(&liked);
        let dislike_overlap = overlap(&disliked);
        let mut matching = String::new();
        if !like_overlap.is_empty() {
            matching.push_str(&format!("It shares {} with items the user liked. ", like_overlap.join(", ")));
        }
        if !dislike_overlap.is_empty() {
            matching.push_str(&format!("It shares {} with items the user disliked. ", dislike_overlap.join(", ")));
        }
        matching.push_str(&match self.estimate {
            CfEstimate::Bias => format!(
                "A bias estimate from the earlier ratings (overall mean {mu:.2}, user offset {b_u:+.2}, item offset {b_i:+.2}) gives {y:.2}."
            ),
            CfEstimate::MeanOfAverages => format!("The mean of the user's and the item's averages gives {y:.1}."),
            CfEstimate::UserMean => format!("The user's own average gives {y:.1}."),
        });
        let predicted = self.rate(s, y);
        let rating = match hint.map(|h| Nudge::new(h, predicted, &user_ratings, self.scale)) {
            None => predicted,
            Some(Nudge { to: h, dir, user_extreme }) => {
                if dir == Ordering::Greater {
                    let item_best = item_r.iter().filter(|&&r| r >= h).count();
                    matching.push_str(" The estimate is pulled toward the middle, though: ");
                    if let Some(best) = user_extreme {
                        matching.push_str(&format!("this user does rate items they enjoy as high as {}", fmt_r(best)));
                    } else {
                        matching.push_str("nothing in the user's history argues against enjoying it");
                    }
                    if item_best > 0 {
                        matching.push_str(&format!(", and {item_best} earlier raters rated it {} or more", fmt_r(h)));
                    }
                    matching.push_str(&format!(", so I expect the user to like it more than average, around {}.", fmt_r(h)));
                } else if dir == Ordering::Less {
                    let item_low = item_r.iter().filter(|&&r| r <= h).count();
                    matching.push_str(" The estimate is generous, though: ");
                    if let Some(worst) = user_extreme {
                        matching.push_str(&format!("this user has rated items as low as {}", fmt_r(worst)));
                    } else {
                        matching.push_str("the user is selective and this item is not an obvious fit");
                    }
                    if item_low > 0 {
                        matching.push_str(&format!(", and {item_low} earlier raters rated it {} or less", fmt_r(h)));
                    }
                    matching.push_str(&format!(", so I expect a more critical response, around {}.", fmt_r(h)));
                }
                h
            }
        };
        Ok(crate::answer::render(&analyze_user, &analyze_item, &matching, rating))
    }
}

/// A rationalization hint (the true rating) set against the prediction,
/// shared by both styles, which word it differently: the hint rounded to the
/// scale, which way it moves the prediction, and the user's most extreme
/// earlier rating on that side when it reaches the hint (the evidence the
/// answer cites for the move).
struct Nudge {
    to: f32,
    dir: Ordering,
    user_extreme: Option<f32>,
}

impl Nudge {
    fn new(hint: f32, predicted: f32, user_ratings: &[f32], scale: Scale) -> Nudge {
        let to = round_to_scale(hint, scale);
        let dir = to.partial_cmp(&predicted).unwrap_or(Ordering::Equal);
        let user_extreme = match dir {
            Ordering::Greater => Some(user_ratings.iter().copied().fold(f32::NAN, f32::max)).filter(|b| b.is_finite() && *b >= to),
            Ordering::Less => Some(user_ratings.iter().copied().fold(f32::NAN, f32::min)).filter(|w| w.is_finite() && *w <= to),
            Ordering::Equal => None,
        };
        Nudge { to, dir, user_extreme }
    }
}

/// "1 rating", "3 ratings".
fn ratings(n: usize) -> String {
    if n == 1 {
        "1 rating".into()
    } else {
        format!("{n} ratings")
    }
}

fn fmt_r(r: f32) -> String {
    if r.fract() == 0.0 {
        format!("{}", r as i64)
    } else {
        format!("{r}")
    }
}

/// One decimal of the mean of `v` as the trace prints it, in tenths; None
/// for no ratings.
fn shown_tenths(v: &[f32]) -> Option<i64> {
    // Through the printed text, so a tie (3.25) rounds exactly as the trace shows it.
    (!v.is_empty()).then(|| {
        let shown = format!("{:.1}", v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64);
        (shown.parse::<f64>().unwrap_or(0.0) * 10.0).round() as i64
    })
}

/// [`CfEstimate::UserMean`]: the user's average as printed; μ (one decimal)
/// without earlier ratings.
fn user_mean(user: &[f32], mu: f64) -> f64 {
    shown_tenths(user).unwrap_or_else(|| (mu * 10.0).round() as i64) as f64 / 10.0
}

/// [`CfEstimate::MeanOfAverages`]: in tenths, so the trace's arithmetic is
/// exact — each average rounded to one decimal as the prompt and the trace
/// print it, their mean rounded half up (3.5 and 2.6 give 3.1). A side
/// without ratings drops out; with neither, μ (one decimal).
fn mean_of_averages(user: &[f32], item: &[f32], mu: f64) -> f64 {
    let t = match (shown_tenths(user), shown_tenths(item)) {
        (Some(u), Some(i)) => (u + i + 1) / 2,
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => (mu * 10.0).round() as i64,
    };
    t as f64 / 10.0
}

/// Rounds to a whole star inside the scale.
pub fn round_to_scale(y: f32, scale: Scale) -> f32 {
    y.round().clamp(scale.min.ceil(), scale.max.floor())
}

impl TeacherBackend for CfTeacher {
    fn name(&self) -> String {
        "cf".into()
    }
    fn endpoint(&self) -> String {
        "cf".into()
    }
    fn cacheable(&self) -> bool {
        false
    }
    fn ask<'a>(&'a self, req: &'a Request) -> AskFuture<'a> {
        Box::pin(async move {
            let s = self.samples.get(req.row).ok_or_else(|| {
                super::TeacherError::Fatal(format!("cf teacher: no sample at row {} ({})", req.row, req.sample_id))
            })?;
            let content = self.answer(s, req.hint)?;
            // Offline "tokens": whitespace words, so stats stay meaningful.
            let prompt_tokens = req.messages.iter().map(|m| m.content.split_whitespace().count() as u64).sum();
            let completion_tokens = content.split_whitespace().count() as u64;
            Ok(Reply { content, reasoning_content: None, usage: Usage { prompt_tokens, completion_tokens } })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(u: &str, i: &str, rating: f32, t: i64) -> Interaction {
        Interaction { user_id: u.into(), item_id: i.into(), rating, timestamp: t, review_title: None, review_text: None }
    }

    fn sample(u: &str, i: &str, t: i64, target: f32) -> Sample {
        Sample {
            sample_id: "s".into(),
            user_id: u.into(),
            item_id: i.into(),
            timestamp: t,
            messages: vec![],
            target,
            user_history_len: 0,
            item_history_len: 0,
        }
    }

    fn teacher() -> CfTeacher {
        let train = vec![
            r("u", "a", 5.0, 1),
            r("u", "b", 1.0, 2),
            r("v", "t", 2.0, 3),
            r("u", "t", 4.0, 10), // the target itself
            r("w", "t", 5.0, 20), // later than the target
        ];
        let items = vec![
            Item { item_id: "a".into(), title: Some("Alpha".into()), categories: Some(vec!["Rock".into()]), ..Default::default() },
            Item { item_id: "t".into(), title: Some("Target".into()), categories: Some(vec!["Rock".into()]), ..Default::default() },
        ];
        CfTeacher::new(Arc::new(vec![]), train, items, Scale::default())
    }

    #[test]
    fn prediction_is_the_shared_bias_estimator_on_earlier_evidence() {
        let t = teacher();
        let s = sample("u", "t", 10, 4.0);
        let k = t.known(&s).unwrap();
        // Before t=10: 5, 1, 2 → μ = 8/3; user: [5, 1]; item t by others: [2] (the later 5 is unseen).
        assert!((k.mu - 8.0 / 3.0).abs() < 1e-9, "global mean over earlier ratings only");
        assert_eq!(k.item_ratings, vec![2.0], "later ratings of the item never leak in");
        let reg = crate::cf::BiasConfig::default();
        let want = crate::cf::predict_from_evidence(k.mu, &[5.0, 1.0], &[2.0], reg.reg_user, reg.reg_item).unwrap();
        assert_eq!(k.est, want, "one estimator, shared with the baselines");
        let a = crate::answer::parse(&t.answer(&s, None).unwrap(), Scale::default()).unwrap();
        assert_eq!(a.rating, (want.clamped(1.0, 5.0) as f32).round());
    }

    #[test]
    fn hinted_answers_argue_for_the_hint_without_leaking() {
        for style in [CfStyle::Verbose, CfStyle::Concise] {
            let t = teacher().with_style(style);
            let s = sample("u", "t", 10, 4.0);
            for h in [1.0, 2.0, 3.0, 4.0, 5.0] {
                let text = t.answer(&s, Some(h)).unwrap();
                let a = crate::answer::parse(&text, Scale::default()).expect("valid format");
                assert_eq!(a.rating, h, "{style:?}: the hinted rating is the conclusion");
                assert_eq!(crate::teacher::leak::find_leak(&text), None, "cf never leaks the hint: {text}");
            }
        }
    }

    #[test]
    fn mean_of_averages_is_exact_in_tenths() {
        // 3.5 and 2.6 → 3.05 → 3.1 (half up, in integers: no binary-float tie).
        assert_eq!(mean_of_averages(&[3.0, 4.0], &[2.6], 3.3), 3.1);
        // Each side rounded to one decimal first, as the trace prints it: 3.33 → 3.3.
        assert_eq!(mean_of_averages(&[3.0, 3.0, 4.0], &[4.0], 3.3), 3.7);
        assert_eq!(mean_of_averages(&[], &[2.0, 3.0], 3.3), 2.5, "no user history: the item's average");
        assert_eq!(mean_of_averages(&[5.0], &[], 3.3), 5.0, "no item history: the user's average");
        assert_eq!(mean_of_averages(&[], &[], 3.46), 3.5, "neither: μ");
    }

    #[test]
    fn rating_offset_shifts_the_rounding_not_the_trace() {
        // User u: 5 and 1 (3.0); item t: 2.0 earlier → mean of averages 2.5.
        let s = sample("u", "t", 10, 4.0);
        let base = teacher().with_style(CfStyle::Concise).with_estimate(CfEstimate::MeanOfAverages);
        let strict = teacher().with_style(CfStyle::Concise).with_estimate(CfEstimate::MeanOfAverages).with_rating_offset(-0.3);
        let a = crate::answer::parse(&base.answer(&s, None).unwrap(), Scale::default()).unwrap();
        let b = crate::answer::parse(&strict.answer(&s, None).unwrap(), Scale::default()).unwrap();
        assert!(b.matching.ends_with("Estimate 2.5."), "the trace keeps the estimate: {}", b.matching);
        assert_eq!((a.rating, b.rating), (3.0, 2.0));
        // Tenths tie exactly: 3.8 − 0.3 = 3.5 rounds up; 3.7 − 0.3 rounds down.
        assert_eq!(strict.rate(&s, 3.8), 4.0);
        assert_eq!(strict.rate(&s, 3.7), 3.0);
        assert_eq!(teacher().with_rating_offset(0.6).rate(&s, 4.9), 5.0, "clamped to the scale");
    }

    #[test]
    fn rating_noise_is_per_sample_deterministic_and_centred() {
        // Same sample → same rating (a retry or a rerun draws the same z);
        // over many samples the ratings spread around the estimate with the
        // noise's σ, and σ = 0 is exactly the noiseless rounding.
        let noisy = teacher().with_rating_noise(0.5);
        let s = sample("u", "t", 10, 4.0);
        assert_eq!(noisy.rate(&s, 3.6), noisy.rate(&s, 3.6), "deterministic per sample");
        let mut sum = 0.0;
        let mut moved = 0;
        for k in 0..2000 {
            let s = Sample { sample_id: format!("u:t:{k}"), ..sample("u", "t", 10, 4.0) };
            let r = noisy.rate(&s, 3.0);
            sum += r as f64;
            moved += (r != 3.0) as usize;
            assert_eq!(teacher().rate(&s, 3.0), 3.0, "no noise: plain rounding");
        }
        let mean = sum / 2000.0;
        assert!((mean - 3.0).abs() < 0.05, "centred on the estimate: mean {mean}");
        // P(|0.5·z| ≥ 0.5) = P(|z| ≥ 1) ≈ 0.317.
        let frac = moved as f64 / 2000.0;
        assert!((0.27..0.37).contains(&frac), "σ 0.5 moves ~32% of ratings off 3, got {frac}");
    }

    #[test]
    fn show_estimate_false_leaves_the_rating_as_the_one_decision() {
        // User u: 5 and 1 (3.0); item t: 2.0 earlier → mean of averages 2.5 → 3.
        let s = sample("u", "t", 10, 4.0);
        let with = teacher().with_style(CfStyle::Concise).with_estimate(CfEstimate::MeanOfAverages);
        let without = teacher().with_style(CfStyle::Concise).with_estimate(CfEstimate::MeanOfAverages).with_show_estimate(false);
        let a = crate::answer::parse(&with.answer(&s, None).unwrap(), Scale::default()).unwrap();
        let b = crate::answer::parse(&without.answer(&s, None).unwrap(), Scale::default()).expect("still a valid answer");
        assert!(a.matching.contains("Estimate 2.5."), "{}", a.matching);
        assert!(!b.matching.contains("Estimate") && !b.matching.ends_with(' '), "no estimate, no trailing space: {:?}", b.matching);
        assert_eq!(a.rating, b.rating, "the same rating either way");
        assert_eq!((a.analyze_user, a.analyze_item), (b.analyze_user, b.analyze_item), "the same evidence");
        // A rationalized answer still argues for the hint after the taste clause.
        let h = crate::answer::parse(&without.answer(&s, Some(5.0)).unwrap(), Scale::default()).unwrap();
        assert_eq!(h.rating, 5.0);
        assert!(h.matching.contains("so higher: 5"), "{}", h.matching);
    }

    #[test]
    fn user_mean_reads_the_user_only() {
        // 3.33 → 3.3 as printed; the item's ratings play no part.
        assert_eq!(user_mean(&[3.0, 3.0, 4.0], 3.46), 3.3);
        assert_eq!(user_mean(&[], 3.46), 3.5, "no user history: μ");
        let s = sample("u", "t", 10, 4.0);
        let t = teacher().with_style(CfStyle::Concise).with_estimate(CfEstimate::UserMean);
        let a = crate::answer::parse(&t.answer(&s, None).unwrap(), Scale::default()).expect("valid format");
        // User u's earlier ratings 5 and 1 → 3.0 → rating 3, whatever item t's average.
        assert!(a.matching.ends_with("Estimate 3.0."), "{}", a.matching);
        assert_eq!(a.rating, 3.0);
    }

    #[test]
    fn mean_of_averages_estimate_is_written_and_rounded() {
        // User average 3.0 (5, 1), item t's earlier average 2.0 → 2.5 → rating 3.
        let s = sample("u", "t", 10, 4.0);
        let t = teacher().with_style(CfStyle::Concise).with_estimate(CfEstimate::MeanOfAverages);
        let a = crate::answer::parse(&t.answer(&s, None).unwrap(), Scale::default()).expect("valid format");
        assert!(a.matching.ends_with("Estimate 2.5."), "{}", a.matching);
        assert_eq!(a.rating, 3.0);
        let v = teacher().with_estimate(CfEstimate::MeanOfAverages).answer(&s, None).unwrap();
        assert!(v.contains("averages gives 2.5."), "{v}");
        // The default stays the bias predictor and its key spelling: absent when default.
        assert!(CfEstimate::default().is_default() && !CfEstimate::MeanOfAverages.is_default());
    }

    #[test]
    fn concise_style_carries_the_same_evidence_in_fewer_words() {
        let s = sample("u", "t", 10, 4.0);
        let verbose = teacher().answer(&s, None).unwrap();
        let concise = teacher().with_style(CfStyle::Concise).answer(&s, None).unwrap();
        let a = crate::answer::parse(&concise, Scale::default()).expect("valid format");
        let b = crate::answer::parse(&verbose, Scale::default()).unwrap();
        assert_eq!(a.rating, b.rating, "both styles conclude with the same bias prediction");
        // User: ratings 5 (Alpha, Rock) and 1 (b, no metadata) → average 3.0, likes Rock.
        assert!(a.analyze_user.contains("Average 3.0 over 2 ratings") && a.analyze_user.contains("likes Rock"), "user evidence: {}", a.analyze_user);
        // Item t: one earlier rating by another user (2), the later 5 unseen.
        assert!(a.analyze_item.contains("Rock; average 2.0 over 1 rating."), "item evidence, earlier only: {}", a.analyze_item);
        assert!(a.matching.contains("Fits liked Rock"), "taste match: {}", a.matching);
        assert!(concise.len() * 2 < verbose.len(), "concise is much shorter:\n{concise}\n{verbose}");
    }
}
