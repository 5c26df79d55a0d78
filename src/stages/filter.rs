//! `filter`: k-core on users and items iterated to a fixed point.
//!
//! Inputs: `interactions`, `items`. Outputs: `interactions`, `items` (the
//! items that still have interactions). Key: the whole config. An empty
//! result fails with what each threshold removed (e.g. 5-core leaves nothing
//! of the Musical Instruments sample). Domain code: [`crate::data::filter`].
use serde::{Deserialize, Serialize};

use super::{InputSpec, Metrics, OutputSpec, Stage, StageCtx, StageDef};
use crate::data::{filter, io};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shorthand: sets both `min_user_ratings` and `min_item_ratings`.
    #[serde(default)]
    pub k_core: Option<usize>,
    /// Minimum interactions per user (default 1 = no constraint).
    #[serde(default)]
    pub min_user_ratings: Option<usize>,
    /// Minimum interactions per item.
    #[serde(default)]
    pub min_item_ratings: Option<usize>,
}

impl Config {
    pub fn thresholds(&self) -> (usize, usize) {
        let k = self.k_core.unwrap_or(1);
        (self.min_user_ratings.unwrap_or(k), self.min_item_ratings.unwrap_or(k))
    }
}

pub struct Filter;

impl StageDef for Filter {
    type Config = Config;
    const KIND: &'static str = "filter";
    const VERSION: u32 = 1;

    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("interactions"), InputSpec::one("items")]
    }

    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::file("interactions", "parquet"), OutputSpec::file("items", "parquet")]
    }

    fn validate(cfg: &Config) -> Result<(), String> {
        if cfg.k_core == Some(0) || cfg.min_user_ratings == Some(0) || cfg.min_item_ratings == Some(0) {
            return Err("thresholds must be ≥ 1 (1 means no constraint)".into());
        }
        Ok(())
    }
}

impl Stage for Filter {
    fn run(cfg: &Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics> {
        let rows = io::read_interactions(ctx.input("interactions")?)?;
        let items = io::read_items(ctx.input("items")?)?;
        let (mu, mi) = cfg.thresholds();
        let (kept, st) = filter::kcore(rows, mu, mi);
        if kept.is_empty() {
            anyhow::bail!(
                "filter left no interactions: of {} interactions ({} users, {} items), the user threshold (≥ {mu} ratings) \
                 removed {} and the item threshold (≥ {mi} ratings) removed {} over {} rounds. Lower `k_core` / \
                 `min_user_ratings` / `min_item_ratings`, or use more data.",
                st.interactions_before,
                st.users_before,
                st.items_before,
                st.removed_by_user_threshold,
                st.removed_by_item_threshold,
                st.rounds
            );
        }
        let ids: std::collections::HashSet<&str> = kept.iter().map(|r| r.item_id.as_str()).collect();
        let items: Vec<_> = items.into_iter().filter(|i| ids.contains(i.item_id.as_str())).collect();
        io::write_interactions(&ctx.output("interactions")?, &kept)?;
        io::write_items(&ctx.output("items")?, &items)?;
        let v = serde_json::to_value(&st)?;
        Ok(v.as_object().map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default())
    }
}
