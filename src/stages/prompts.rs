//! `prompts`: Think-before-Recommendation samples for each split.
//!
//! Inputs: `train`, `valid`, `test` (the targets), `items`, and
//! `interactions` (the evidence; optional — defaults to the union of the
//! three splits). Outputs: `train`, `valid`, `test` (samples schema).
//! Path-valued: `template` (required; e.g. `../stages/think_before_rec.md`)
//! and `tokenizer` (optional tokenizer.json) — their content enters the key.
//! The leakage rule, truncation and minimum-history rules are in
//! [`crate::data::prompts`]; `max_samples` keeps a seeded random subset of
//! the eligible targets of each split (in their original order).
use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use crate::answer::Scale;
use crate::data::history::HistoryIndex;
use crate::data::io;
use crate::data::prompts::{PromptBuilder, PromptOptions};

/// `max_samples: 500` (each split) or `{train: 2000, test: 500}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MaxSamples {
    All(usize),
    PerSplit(BTreeMap<String, usize>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Template file with `system` and `user` blocks (minijinja).
    #[serde(default)]
    pub template: Option<PathBuf>,
    /// tokenizer.json used to measure `max_prompt_tokens` (else characters).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// The user's last N earlier interactions shown.
    #[serde(default = "ten")]
    pub user_history: usize,
    /// Up to N earlier ratings/reviews of the item by other users shown.
    #[serde(default = "ten")]
    pub item_history: usize,
    /// Reviews are cut to this many characters.
    #[serde(default = "review_chars")]
    pub review_chars: usize,
    #[serde(default)]
    pub max_prompt_tokens: Option<usize>,
    /// Without a tokenizer: tokens ≈ characters / chars_per_token.
    #[serde(default = "cpt")]
    pub chars_per_token: f64,
    #[serde(default = "one")]
    pub min_user_history: usize,
    #[serde(default)]
    pub min_item_history: usize,
    #[serde(default)]
    pub max_samples: Option<MaxSamples>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub scale: Scale,
}

fn ten() -> usize {
    10
}
fn one() -> usize {
    1
}
fn review_chars() -> usize {
    300
}
fn cpt() -> f64 {
    4.0
}

pub struct Prompts;

const SPLITS: [&str; 3] = ["train", "valid", "test"];

impl StageDef for Prompts {
    type Config = Config;
    const KIND: &'static str = "prompts";
    const VERSION: u32 = 1;
    const PATH_FIELDS: &'static [&'static str] = &["template", "tokenizer"];

    fn inputs() -> Vec<InputSpec> {
        vec![
            InputSpec::one("train"),
            InputSpec::one("valid"),
            InputSpec::one("test"),
            InputSpec::one("items"),
            InputSpec::optional("interactions"),
        ]
    }

    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        SPLITS.iter().map(|s| OutputSpec::file(s, "parquet")).collect()
    }

    fn validate(cfg: &Config) -> Result<(), String> {
        if cfg.template.is_none() {
            return Err("`template` is required: a minijinja file with `system` and `user` blocks, e.g. ../stages/think_before_rec.md".into());
        }
        if !(cfg.chars_per_token > 0.0) {
            return Err("`chars_per_token` must be > 0".into());
        }
        if !(cfg.scale.min < cfg.scale.max) {
            return Err("`scale.min` must be below `scale.max`".into());
        }
        if let Some(MaxSamples::PerSplit(m)) = &cfg.max_samples {
            if let Some(k) = m.keys().find(|k| !SPLITS.contains(&k.as_str())) {
                return Err(format!("`max_samples` has unknown split `{k}` (use train, valid, test)"));
            }
        }
        Ok(())
    }
}

impl Config {
    fn max_for(&self, split: &str) -> Option<usize> {
        match &self.max_samples {
            None => None,
            Some(MaxSamples::All(n)) => Some(*n),
            Some(MaxSamples::PerSplit(m)) => m.get(split).copied(),
        }
    }
}

impl Stage for Prompts {
    fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        let template = cfg.template.as_deref().ok_or_else(|| anyhow::anyhow!("`template` is required"))?;
        let items = io::read_items(ctx.input("items")?)?;
        let opts = PromptOptions {
            user_history: cfg.user_history,
            item_history: cfg.item_history,
            review_chars: cfg.review_chars,
            max_prompt_tokens: cfg.max_prompt_tokens,
            chars_per_token: cfg.chars_per_token,
            min_user_history: cfg.min_user_history,
            min_item_history: cfg.min_item_history,
            scale: cfg.scale,
        };
        let builder = PromptBuilder::new(template, cfg.tokenizer.as_deref(), items, opts)?;
        let mut targets = BTreeMap::new();
        for s in SPLITS {
            targets.insert(s, io::read_interactions(ctx.input(s)?)?);
        }
        let index = match ctx.input_opt("interactions") {
            Some(p) => HistoryIndex::new(io::read_interactions(p)?),
            None => HistoryIndex::new(targets.values().flatten().cloned().collect()),
        };
        let seed = cfg.seed.unwrap_or(ctx.seed);
        let mut m = Metrics::new();
        let mut total = 0usize;
        for (k, s) in SPLITS.iter().enumerate() {
            let rows = &targets[s];
            // Eligibility first (cheap), then the seeded subset, then render.
            let mut eligible = Vec::new();
            let mut skipped: BTreeMap<&str, u64> = BTreeMap::new();
            for (i, t) in rows.iter().enumerate() {
                match builder.eligible(&index, t) {
                    Ok(()) => eligible.push(i),
                    Err(r) => *skipped.entry(r.code()).or_default() += 1,
                }
            }
            if let Some(max) = cfg.max_for(s) {
                if eligible.len() > max {
                    // One stream per split so that changing one split's cap leaves the others alone.
                    eligible.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1))));
                    eligible.truncate(max);
                    eligible.sort_unstable();
                }
            }
            let mut samples = Vec::with_capacity(eligible.len());
            let (mut truncated, mut max_tokens, mut sum_uh) = (0u64, 0usize, 0u64);
            for (n, &i) in eligible.iter().enumerate() {
                if ctx.is_cancelled() {
                    anyhow::bail!("cancelled");
                }
                match builder.build(&index, &rows[i])? {
                    Ok(b) => {
                        truncated += b.truncated as u64;
                        max_tokens = max_tokens.max(b.tokens);
                        sum_uh += b.sample.user_history_len as u64;
                        samples.push(b.sample);
                    }
                    Err(r) => *skipped.entry(r.code()).or_default() += 1,
                }
                if n % 1000 == 999 {
                    ctx.progress((total + n + 1) as u64, None, "samples");
                }
            }
            total += eligible.len();
            if samples.is_empty() && !rows.is_empty() {
                ctx.warn(format!("prompts: split `{s}` has {} targets but no sample (skipped: {skipped:?})", rows.len()));
            }
            io::write_samples(&ctx.output(s)?, &samples)?;
            m.insert(format!("{s}_targets"), rows.len().into());
            m.insert(format!("{s}_samples"), samples.len().into());
            m.insert(format!("{s}_truncated"), truncated.into());
            m.insert(format!("{s}_max_tokens"), max_tokens.into());
            let mean = if samples.is_empty() { 0.0 } else { sum_uh as f64 / samples.len() as f64 };
            m.insert(format!("{s}_mean_user_history"), mean.into());
            for (r, c) in skipped {
                m.insert(format!("{s}_skipped_{r}"), c.into());
            }
        }
        if m.get("test_samples").and_then(|v| v.as_u64()) == Some(0) && m.get("train_samples").and_then(|v| v.as_u64()) == Some(0) {
            anyhow::bail!(
                "prompts produced no train and no test samples: every target lacked history (min_user_history = {}, \
                 min_item_history = {}); lower them or filter the data to users with longer histories",
                cfg.min_user_history,
                cfg.min_item_history
            );
        }
        Ok(m)
    }
}
