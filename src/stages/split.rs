//! `split`: `interactions` → `train`, `valid`, `test` (interactions schema).
//!
//! Strategies (see [`crate::data::split`]): `leave_last` (default, per user
//! by time with the pinned tie-break timestamp → item_id), `chronological`
//! (global time cut at `ratios`), `random` (seeded shuffle cut at `ratios`;
//! `seed` defaults to the stage seed). Metrics: per split interactions,
//! users, items, density, mean rating and rating histogram, plus
//! `tie_users`. An empty train or test split fails with the counts.
use serde::{Deserialize, Serialize};

use super::{InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use crate::data::io;
use crate::data::split::{self, SplitOptions, Strategy};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub strategy: Strategy,
    /// leave_last: hold out the second-to-last interaction as `valid`.
    #[serde(default = "yes")]
    pub valid: bool,
    /// leave_last: users with fewer interactions stay wholly in train.
    #[serde(default = "three")]
    pub min_user_interactions: usize,
    /// chronological / random: train, valid, test fractions.
    #[serde(default = "ratios")]
    pub ratios: [f64; 3],
    /// random: shuffle seed (default: the stage seed).
    #[serde(default)]
    pub seed: Option<u64>,
}

fn yes() -> bool {
    true
}
fn three() -> usize {
    3
}
fn ratios() -> [f64; 3] {
    [0.8, 0.1, 0.1]
}

pub struct Split;

impl StageDef for Split {
    type Config = Config;
    const KIND: &'static str = "split";
    const VERSION: u32 = 1;

    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("interactions")]
    }

    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::file("train", "parquet"), OutputSpec::file("valid", "parquet"), OutputSpec::file("test", "parquet")]
    }

    fn validate(cfg: &Config) -> Result<(), String> {
        if cfg.ratios.iter().any(|r| !(r.is_finite() && *r >= 0.0)) || cfg.ratios[0] <= 0.0 || cfg.ratios[2] <= 0.0 {
            return Err(format!("`ratios` must be finite, ≥ 0, with train and test > 0; got {:?}", cfg.ratios));
        }
        Ok(())
    }
}

impl Stage for Split {
    fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        let rows = io::read_interactions(ctx.input("interactions")?)?;
        let n = rows.len();
        let opts = SplitOptions {
            strategy: cfg.strategy,
            valid: cfg.valid,
            min_user_interactions: cfg.min_user_interactions,
            ratios: cfg.ratios,
            seed: cfg.seed.unwrap_or(ctx.seed),
        };
        let s = split::split(rows, &opts);
        if s.train.is_empty() || s.test.is_empty() {
            anyhow::bail!(
                "split `{:?}` of {n} interactions gives train {}, valid {}, test {}: an empty train or test split is useless. \
                 For leave_last every user needs ≥ {} interactions (min_user_interactions); filter first or use another strategy.",
                cfg.strategy,
                s.train.len(),
                s.valid.len(),
                s.test.len(),
                cfg.min_user_interactions
            );
        }
        let mut m = Metrics::new();
        for (name, rows) in [("train", &s.train), ("valid", &s.valid), ("test", &s.test)] {
            io::write_interactions(&ctx.output(name)?, rows)?;
            m.extend(split::stats(name, rows));
        }
        m.insert("tie_users".into(), s.tie_users.into());
        Ok(m)
    }
}
