//! `ingest`: raw review dumps → `interactions`, `items` (Parquet, pinned
//! schemas) and `report` (JSON audit: records read, kept, drops per reason
//! with first examples, duplicates, missing text, rating histogram).
//!
//! Inputs: the files named in `with:` (`reviews`, `meta`, `business`), all
//! path-valued, so their content enters the key. Key: the whole config
//! but `threads` (operational: the outputs are byte-identical for any value). Domain code: [`crate::data::ingest`].
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use crate::data::ingest::{self, Format, OnError};
use crate::data::synthetic::SyntheticConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// amazon2014 | amazon2018 | amazon2023 | yelp | movielens | recbole | synthetic
    pub format: Format,
    /// Review file (plain or .gz). Required except for `synthetic`. For
    /// `recbole`: the `NAME.inter` file, or a RecBole dataset folder holding
    /// one (its `NAME.item` is then the metadata unless `meta` names one).
    #[serde(default)]
    pub reviews: Option<PathBuf>,
    /// Item metadata (Amazon meta, MovieLens u.item / movies.dat, RecBole `.item`). Optional.
    #[serde(default)]
    pub meta: Option<PathBuf>,
    /// Yelp business.json (optional; same role as `meta`).
    #[serde(default)]
    pub business: Option<PathBuf>,
    /// skip (default: drop and count bad records) | fail (stop at the first).
    #[serde(default)]
    pub on_error: OnError,
    /// Fail when more than this fraction of a file's records are bad.
    #[serde(default = "default_max_bad")]
    pub max_bad_fraction: f64,
    /// Valid rating range; records outside are dropped (`rating_out_of_range`).
    #[serde(default = "default_rmin")]
    pub rating_min: f32,
    #[serde(default = "default_rmax")]
    pub rating_max: f32,
    /// `format: recbole`: column names of the roles RecBole's usual names do
    /// not find (`user`, `item`, `rating`, `timestamp`, `review_title`,
    /// `review_text`; `.item`: `title`, `year`, `categories`, `brand`,
    /// `price`, `description`). Out of the key while empty.
    #[serde(default, skip_serializing_if = "crate::data::recbole::Fields::is_empty")]
    pub recbole: crate::data::recbole::Fields,
    /// Generator settings for `format: synthetic`.
    #[serde(default)]
    pub synthetic: SyntheticConfig,
    /// Parser / Parquet encoder threads (default: one per core). Operational:
    /// outputs do not depend on it.
    #[serde(default)]
    pub threads: Option<usize>,
}

fn default_max_bad() -> f64 {
    0.01
}
fn default_rmin() -> f32 {
    1.0
}
fn default_rmax() -> f32 {
    5.0
}

pub struct Ingest;

impl StageDef for Ingest {
    type Config = Config;
    const KIND: &'static str = "ingest";
    const VERSION: u32 = 1;
    const PATH_FIELDS: &'static [&'static str] = &["reviews", "meta", "business"];
    const OPERATIONAL: &'static [&'static str] = &["threads"];

    fn inputs() -> Vec<InputSpec> {
        Vec::new()
    }

    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![
            OutputSpec::file("interactions", "parquet"),
            OutputSpec::file("items", "parquet"),
            OutputSpec::file("report", "json"),
        ]
    }

    fn validate(cfg: &Config) -> Result<(), String> {
        if cfg.format != Format::Synthetic && cfg.reviews.is_none() {
            return Err(format!(
                "`reviews` is required for format `{}` (the review file, plain or .gz)",
                cfg.format.name()
            ));
        }
        if cfg.format == Format::Synthetic && (cfg.reviews.is_some() || cfg.meta.is_some() || cfg.business.is_some()) {
            return Err("format `synthetic` generates its data: remove `reviews`/`meta`/`business`".into());
        }
        if cfg.meta.is_some() && cfg.business.is_some() {
            return Err("give either `meta` or `business`, not both".into());
        }
        if cfg.business.is_some() && cfg.format != Format::Yelp {
            return Err("`business` is for format `yelp`; use `meta` for item metadata".into());
        }
        if cfg.format != Format::Recbole && !cfg.recbole.is_empty() {
            return Err("`recbole` (column names) applies to format `recbole` only".into());
        }
        if !(0.0..=1.0).contains(&cfg.max_bad_fraction) {
            return Err(format!(
                "`max_bad_fraction` must be in [0, 1], got {}",
                cfg.max_bad_fraction
            ));
        }
        if cfg.rating_min.partial_cmp(&cfg.rating_max) != Some(std::cmp::Ordering::Less) {
            return Err(format!(
                "`rating_min` ({}) must be below `rating_max` ({})",
                cfg.rating_min, cfg.rating_max
            ));
        }
        Ok(())
    }
}

impl Stage for Ingest {
    fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        let opts = ingest::Options {
            format: cfg.format,
            reviews: cfg.reviews.clone(),
            meta: cfg.meta.clone().or_else(|| cfg.business.clone()),
            on_error: cfg.on_error,
            max_bad_fraction: cfg.max_bad_fraction,
            rating_min: cfg.rating_min,
            rating_max: cfg.rating_max,
            recbole: cfg.recbole.clone(),
            synthetic: cfg.synthetic.clone(),
            threads: cfg.threads.unwrap_or_else(ingest::default_threads),
        };
        let interactions = ctx.output("interactions")?;
        let items = ctx.output("items")?;
        let staging = ctx.out_dir.join(".interactions.staging.parquet");
        let events = &mut ctx.events;
        let report = ingest::ingest(&opts, &interactions, &items, &staging, &mut |n| {
            events.emit(serde_json::json!({"progress": {"done": n, "total": null, "unit": "records"}}))
        })?;
        for (reason, d) in report.files.iter().flat_map(|f| f.drops.iter().map(move |d| (f, d))) {
            ctx.warn(format!(
                "{}: dropped {} record(s) as {}: first {}",
                reason.file,
                d.1.count,
                d.0,
                d.1.examples.join("; ")
            ));
        }
        let json = serde_json::to_vec_pretty(&report)?;
        crate::util::write_atomic(&ctx.output("report")?, &json)?;
        let mut m = Metrics::new();
        m.insert("raw_records".into(), report.raw_records.into());
        m.insert("bad_records".into(), report.bad_records.into());
        m.insert("kept".into(), report.kept.into());
        m.insert("users".into(), report.users.into());
        m.insert("items".into(), report.items.into());
        m.insert("duplicate_extra_records".into(), report.duplicates.extra_records.into());
        m.insert("missing_text".into(), report.missing_text.into());
        if let Some(s) = &report.synthetic {
            for k in ["noise", "best_rmse", "global_mean_rmse"] {
                if let Some(v) = s.get(k) {
                    m.insert(format!("synthetic_{k}"), v.clone());
                }
            }
        }
        Ok(m)
    }
}
