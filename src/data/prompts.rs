//! Think-before-Recommendation samples (RecZero, arXiv 2510.23077, Sec. 3):
//! a system message asking for `<analyze user>`, `<analyze item>`,
//! `<match>`, `<rate>` (the grammar of [`crate::answer`]) and a user message
//! with the evidence of [`HistoryIndex::evidence`] — only interactions
//! strictly earlier than the target, from any split, never the target's
//! rating — rendered from a minijinja template file with two blocks,
//! `system` and `user`.
//!
//! Template context: `user` {id, count, average, history: [{item_id, title,
//! categories, rating, date, summary, review}]}, `item` {id, title,
//! categories, description, brand, price, count, average, reviews:
//! [{rating, date, summary, review}]}, `scale` {min, max}. Averages are over
//! *all* earlier interactions (not only the shown ones), `null` when none.
//!
//! Truncation (`max_prompt_tokens`): tokens are counted with the model's
//! tokenizer.json when given, else as ⌈characters / chars_per_token⌉, over
//! the system and user contents. While too long: (1) drop the oldest shown
//! history entry — from the user's list while it is longer than the item's
//! list, else from the item's — down to `min_user_history` user entries and
//! no item entries; (2) then halve the review length limit (reviews, then
//! the item description) down to no review text; (3) a sample still too long
//! is skipped and counted (`skipped_too_long`).
//!
//! Minimum history: a target whose user has fewer than `min_user_history`
//! earlier interactions (default 1: RecZero reasons over the history), or
//! whose item has fewer than `min_item_history` earlier ratings by others
//! (default 0), yields no sample (counted).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::history::{Evidence, HistoryIndex};
use super::{format_date, format_rating, Interaction, Item, Message, Sample};
use crate::answer::Scale;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptOptions {
    pub user_history: usize,
    pub item_history: usize,
    pub review_chars: usize,
    pub max_prompt_tokens: Option<usize>,
    pub chars_per_token: f64,
    pub min_user_history: usize,
    pub min_item_history: usize,
    pub scale: Scale,
}

impl Default for PromptOptions {
    fn default() -> Self {
        PromptOptions {
            user_history: 10,
            item_history: 10,
            review_chars: 300,
            max_prompt_tokens: None,
            chars_per_token: 4.0,
            min_user_history: 1,
            min_item_history: 0,
            scale: Scale::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("template {path}: {msg}")]
    Template { path: PathBuf, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
}

/// Why a target yielded no sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skip {
    FewUserHistory,
    FewItemHistory,
    TooLong,
}

impl Skip {
    pub fn code(self) -> &'static str {
        match self {
            Skip::FewUserHistory => "few_user_history",
            Skip::FewItemHistory => "few_item_history",
            Skip::TooLong => "too_long",
        }
    }
}

/// A built sample and whether truncation touched it.
#[derive(Debug)]
pub struct Built {
    pub sample: Sample,
    pub truncated: bool,
    pub tokens: usize,
}

pub struct PromptBuilder {
    env: minijinja::Environment<'static>,
    template_path: PathBuf,
    tokenizer: Option<tokenizers::Tokenizer>,
    items: HashMap<String, Item>,
    pub opts: PromptOptions,
}

#[derive(Serialize)]
struct HistEntry {
    item_id: String,
    title: String,
    categories: Vec<String>,
    rating: String,
    date: String,
    summary: Option<String>,
    review: Option<String>,
}

#[derive(Serialize)]
struct ItemReview {
    rating: String,
    date: String,
    summary: Option<String>,
    review: Option<String>,
}

/// `s` cut to `limit` characters (with `…`), `None` when blank or limit 0.
fn cut(s: Option<&str>, limit: usize) -> Option<String> {
    let s = s?.trim();
    if s.is_empty() || limit == 0 {
        return None;
    }
    if s.chars().count() <= limit {
        Some(s.to_string())
    } else {
        let t: String = s.chars().take(limit).collect();
        Some(format!("{}…", t.trim_end()))
    }
}

impl PromptBuilder {
    pub fn new(template: &Path, tokenizer: Option<&Path>, items: Vec<Item>, opts: PromptOptions) -> Result<Self, PromptError> {
        let src = std::fs::read_to_string(template)
            .map_err(|e| PromptError::Template { path: template.into(), msg: e.to_string() })?;
        Self::from_source(template, src, tokenizer, items, opts)
    }

    pub fn from_source(
        template_path: &Path,
        src: String,
        tokenizer: Option<&Path>,
        items: Vec<Item>,
        opts: PromptOptions,
    ) -> Result<Self, PromptError> {
        let terr = |msg: String| PromptError::Template { path: template_path.into(), msg };
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("think_before_rec", src.clone()).map_err(|e| terr(format!("{e:#}")))?;
        for b in ["system", "user"] {
            let found = src.match_indices("{%").any(|(i, _)| {
                let rest = src[i + 2..].trim_start_matches(['-', '+', ' ']);
                rest.strip_prefix("block").is_some_and(|r| r.trim_start().split_whitespace().next() == Some(b))
            });
            if !found {
                return Err(terr(format!("needs a `{{% block {b} %}}…{{% endblock %}}`; see stages/think_before_rec.md")));
            }
        }
        let tokenizer = match tokenizer {
            Some(p) => Some(
                tokenizers::Tokenizer::from_file(p).map_err(|e| PromptError::Tokenizer { path: p.into(), msg: e.to_string() })?,
            ),
            None => None,
        };
        let items = items.into_iter().map(|i| (i.item_id.clone(), i)).collect();
        Ok(PromptBuilder { env, template_path: template_path.into(), tokenizer, items, opts })
    }

    fn count_tokens(&self, msgs: &[Message]) -> usize {
        match &self.tokenizer {
            Some(t) => msgs.iter().map(|m| t.encode(m.content.as_str(), false).map(|e| e.len()).unwrap_or(m.content.len())).sum(),
            None => {
                let chars: usize = msgs.iter().map(|m| m.content.chars().count()).sum();
                (chars as f64 / self.opts.chars_per_token).ceil() as usize
            }
        }
    }

    fn title_of(&self, id: &str) -> (String, Vec<String>) {
        match self.items.get(id) {
            Some(i) => (i.title.clone().unwrap_or_else(|| id.to_string()), i.categories.clone().unwrap_or_default()),
            None => (id.to_string(), Vec::new()),
        }
    }

    fn render(&self, target: &Interaction, ev: &Evidence, nu: usize, ni: usize, limit: usize) -> Result<Vec<Message>, PromptError> {
        let uh = &ev.user_history[ev.user_history.len() - nu..];
        let ih = &ev.item_history[ev.item_history.len() - ni..];
        let history: Vec<HistEntry> = uh
            .iter()
            .map(|r| {
                let (title, categories) = self.title_of(&r.item_id);
                HistEntry {
                    item_id: r.item_id.clone(),
                    title,
                    categories,
                    rating: format_rating(r.rating),
                    date: format_date(r.timestamp),
                    summary: cut(r.review_title.as_deref(), 120.min(limit)),
                    review: cut(r.review_text.as_deref(), limit),
                }
            })
            .collect();
        let reviews: Vec<ItemReview> = ih
            .iter()
            .map(|r| ItemReview {
                rating: format_rating(r.rating),
                date: format_date(r.timestamp),
                summary: cut(r.review_title.as_deref(), 120.min(limit)),
                review: cut(r.review_text.as_deref(), limit),
            })
            .collect();
        let item = self.items.get(&target.item_id);
        let (title, categories) = self.title_of(&target.item_id);
        let ctx = minijinja::context! {
            user => minijinja::context! {
                id => &target.user_id,
                count => ev.user_count,
                average => ev.user_mean.map(|m| format!("{m:.2}")),
                history => history,
            },
            item => minijinja::context! {
                id => &target.item_id,
                title => title,
                categories => categories,
                description => cut(item.and_then(|i| i.description.as_deref()), 2 * limit),
                brand => item.and_then(|i| i.brand.clone()),
                price => item.and_then(|i| i.price).map(|p| format!("{p:.2}")),
                count => ev.item_count,
                average => ev.item_mean.map(|m| format!("{m:.2}")),
                reviews => reviews,
            },
            scale => minijinja::context! { min => format_rating(self.opts.scale.min), max => format_rating(self.opts.scale.max) },
        };
        let terr = |e: minijinja::Error| PromptError::Template { path: self.template_path.clone(), msg: format!("{e:#}") };
        let t = self.env.get_template("think_before_rec").map_err(terr)?;
        // Renders the two blocks from one evaluated state.
        #[allow(deprecated)]
        let mut state = t.eval_to_state(ctx).map_err(terr)?;
        let system = state.render_block("system").map_err(terr)?;
        let user = state.render_block("user").map_err(terr)?;
        Ok(vec![
            Message { role: "system".into(), content: system.trim().to_string() },
            Message { role: "user".into(), content: user.trim().to_string() },
        ])
    }

    /// Evidence counts decide eligibility without rendering (cheap).
    pub fn eligible(&self, index: &HistoryIndex, t: &Interaction) -> Result<(), Skip> {
        let ev = index.evidence(&t.user_id, &t.item_id, t.timestamp, 0, 0);
        if ev.user_count < self.opts.min_user_history {
            return Err(Skip::FewUserHistory);
        }
        if ev.item_count < self.opts.min_item_history {
            return Err(Skip::FewItemHistory);
        }
        Ok(())
    }

    /// Builds the sample of one target interaction.
    pub fn build(&self, index: &HistoryIndex, t: &Interaction) -> Result<Result<Built, Skip>, PromptError> {
        if let Err(s) = self.eligible(index, t) {
            return Ok(Err(s));
        }
        let ev = index.evidence(&t.user_id, &t.item_id, t.timestamp, self.opts.user_history, self.opts.item_history);
        let (mut nu, mut ni, mut limit) = (ev.user_history.len(), ev.item_history.len(), self.opts.review_chars);
        let floor_u = self.opts.min_user_history.min(nu);
        let mut truncated = false;
        loop {
            let msgs = self.render(t, &ev, nu, ni, limit)?;
            let tokens = self.count_tokens(&msgs);
            let fits = self.opts.max_prompt_tokens.is_none_or(|m| tokens <= m);
            if fits {
                let sample = Sample {
                    sample_id: format!("{}:{}:{}", t.user_id, t.item_id, t.timestamp),
                    user_id: t.user_id.clone(),
                    item_id: t.item_id.clone(),
                    timestamp: t.timestamp,
                    messages: msgs,
                    target: t.rating,
                    user_history_len: nu as i32,
                    item_history_len: ni as i32,
                };
                return Ok(Ok(Built { sample, truncated, tokens }));
            }
            truncated = true;
            if nu > floor_u && (nu >= ni || ni == 0) {
                nu -= 1;
            } else if ni > 0 {
                ni -= 1;
            } else if limit > 0 {
                limit /= 2;
            } else {
                return Ok(Err(Skip::TooLong));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(u: &str, i: &str, rating: f32, t: i64, text: &str) -> Interaction {
        Interaction { user_id: u.into(), item_id: i.into(), rating, timestamp: t, review_title: None, review_text: Some(text.into()) }
    }

    fn builder(opts: PromptOptions) -> PromptBuilder {
        let tpl = Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/think_before_rec.md");
        PromptBuilder::new(&tpl, None, vec![Item { item_id: "t".into(), title: Some("Target Album".into()), ..Default::default() }], opts).unwrap()
    }

    #[test]
    fn prompt_holds_earlier_evidence_and_asks_for_the_four_tags() {
        let idx = HistoryIndex::new(vec![
            r("u", "a", 2.0, 86_400, "EARLY review"),
            r("v", "t", 4.0, 2 * 86_400, "OTHER review"),
            r("u", "t", 5.0, 3 * 86_400, "TARGET review"),
            r("u", "b", 1.0, 4 * 86_400, "LATER review"),
        ]);
        let b = builder(PromptOptions::default());
        let s = b.build(&idx, &idx.rows()[2].clone()).unwrap().unwrap().sample;
        let user = &s.messages[1].content;
        assert!(user.contains("EARLY review") && user.contains("OTHER review"), "earlier evidence is shown: {user}");
        assert!(!user.contains("TARGET") && !user.contains("LATER"), "nothing at or after the target: {user}");
        assert!(user.contains("Target Album"), "the target's title is shown");
        for tag in ["<analyze user>", "<analyze item>", "<match>", "<rate>"] {
            assert!(s.messages[0].content.contains(tag), "system prompt asks for {tag}");
        }
        assert_eq!((s.user_history_len, s.item_history_len, s.target), (1, 1, 5.0));
        let first = b.build(&idx, &idx.rows()[0].clone()).unwrap();
        assert!(matches!(first, Err(Skip::FewUserHistory)), "no history → no sample under min_user_history = 1");
    }

    #[test]
    fn truncation_drops_history_then_shortens_reviews() {
        let mut rows: Vec<Interaction> = (0..10).map(|k| r("u", &format!("i{k}"), 3.0, k * 86_400, &"long words ".repeat(40))).collect();
        rows.push(r("u", "t", 4.0, 20 * 86_400, "x"));
        let idx = HistoryIndex::new(rows);
        let full = builder(PromptOptions::default()).build(&idx, &idx.rows()[10].clone()).unwrap().unwrap();
        assert!(!full.truncated);
        let limit = full.tokens / 2;
        let cut = builder(PromptOptions { max_prompt_tokens: Some(limit), ..Default::default() })
            .build(&idx, &idx.rows()[10].clone())
            .unwrap()
            .unwrap();
        assert!(cut.truncated && cut.tokens <= limit, "fits the budget: {} > {limit}", cut.tokens);
        assert!(cut.sample.user_history_len < 10, "oldest history dropped first");
        let user = &cut.sample.messages[1].content;
        assert!(user.contains("i9") && !user.contains("i0"), "the most recent entry stays, the oldest goes: {user}");
        let tiny = builder(PromptOptions { max_prompt_tokens: Some(5), ..Default::default() }).build(&idx, &idx.rows()[10].clone()).unwrap();
        assert!(matches!(tiny, Err(Skip::TooLong)), "an impossible budget skips the sample");
    }
}
