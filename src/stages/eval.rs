//! `eval` stage (libtorch; run function in `recflow-ml`'s `eval` module):
//! generates an answer for every test sample, parses it with the shared
//! answer grammar and scores it (see [`crate::report::evaluate`]).
//!
//! Inputs: `model` (HF-layout dir), `samples` (samples schema), `train`
//! (interactions; the fallback means). Outputs: `metrics` (JSON: stage,
//! method, n, rmse, mae, invalid_rate, rmse_valid, mae_valid, exact,
//! fallback, rmse_ci95, mae_ci95, reward_mean, fallback_rate, confusion,
//! by_history) and `predictions` (Parquet, with each sample's completion).
//! Key: every field except the operational `batch_size` and
//! `progress_every`, plus device/dtype and the input hashes.
use serde::{Deserialize, Serialize};

use super::{InputSpec, OutputSpec, StageDef};
use crate::answer::{RewardConfig, Scale};
use crate::report::evaluate::Fallback;

/// Decoding: `greedy` (default; the paper's evaluation) or `sample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decoding {
    Greedy,
    Sample,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Method name in tables (default: the stage name).
    pub method: Option<String>,
    /// Score at most this many samples, chosen with the stage seed (None: all).
    pub max_samples: Option<usize>,
    pub decoding: Decoding,
    /// Completions per prompt, averaged (must be 1 with greedy decoding).
    pub num_samples: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    /// What an invalid answer is scored as: item | user | global (train means).
    pub fallback: Fallback,
    pub scale_min: f32,
    pub scale_max: f32,
    /// Rule reward constants (for `reward_mean`).
    pub reward: RewardConfig,
    /// Bootstrap resamples of the 95% intervals.
    pub bootstrap: u32,
    /// Prompts per generation batch (operational).
    pub batch_size: usize,
    /// Progress events every this many samples (operational).
    pub progress_every: usize,
    /// auto | cpu | cuda | cuda:N (resolved by the runner).
    pub device: String,
    /// float32 | bfloat16 | float16.
    pub dtype: String,
    /// Accept a completion budget below the teacher's longest trace plus
    /// a margin (the runner refuses it otherwise, before SFT starts:
    /// `recflow::run::budget`). Operational; out of the key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_truncation: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            method: None,
            max_samples: None,
            decoding: Decoding::Greedy,
            num_samples: 1,
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 1024,
            fallback: Fallback::Item,
            scale_min: 1.0,
            scale_max: 5.0,
            reward: RewardConfig::default(),
            bootstrap: 1000,
            batch_size: 8,
            progress_every: 16,
            device: "auto".into(),
            dtype: "float32".into(),
            allow_truncation: false,
        }
    }
}

impl Config {
    pub fn scale(&self) -> Scale {
        Scale { min: self.scale_min, max: self.scale_max }
    }
}

pub struct Eval;

impl StageDef for Eval {
    type Config = Config;
    const KIND: &'static str = "eval";
    const VERSION: u32 = 2;
    const OPERATIONAL: &'static [&'static str] = &["batch_size", "progress_every", "allow_truncation"];
    const USES_DEVICE: bool = true;
    const MODEL_INPUTS: &'static [(&'static str, super::model_files::ModelForm)] = &[("model", super::model_files::ModelForm::HfDir)];
    fn inputs() -> Vec<InputSpec> {
        vec![InputSpec::one("model"), InputSpec::one("samples"), InputSpec::one("train")]
    }
    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::file("metrics", "json"), OutputSpec::file("predictions", "parquet")]
    }
    fn validate(cfg: &Config) -> Result<(), String> {
        if cfg.num_samples == 0 {
            return Err("`num_samples` must be at least 1".into());
        }
        if cfg.decoding == Decoding::Greedy && cfg.num_samples != 1 {
            return Err(format!(
                "`num_samples` = {} with `decoding: greedy` would repeat one answer; set `decoding: sample` to average samples",
                cfg.num_samples
            ));
        }
        if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
            return Err(format!("`temperature` = {} must be > 0", cfg.temperature));
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(format!("`top_p` = {} must be in (0, 1]", cfg.top_p));
        }
        if cfg.max_new_tokens == 0 || cfg.batch_size == 0 {
            return Err("`max_new_tokens` and `batch_size` must be at least 1".into());
        }
        if cfg.max_samples == Some(0) {
            return Err("`max_samples` = 0 leaves nothing to evaluate; omit it to use all samples".into());
        }
        if !(cfg.scale_min < cfg.scale_max) {
            return Err(format!("`scale_min` ({}) must be below `scale_max` ({})", cfg.scale_min, cfg.scale_max));
        }
        if !["float32", "bfloat16", "float16"].contains(&cfg.dtype.as_str()) {
            return Err(format!("`dtype` = {:?}: use float32, bfloat16 or float16", cfg.dtype));
        }
        let d = cfg.device.as_str();
        if !(d == "auto" || d == "cpu" || d == "cuda" || d.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok())) {
            return Err(format!("`device` = {d:?}: use auto, cpu, cuda or cuda:N"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_field() {
        assert!(Eval::validate(&Config::default()).is_ok(), "defaults are valid");
        let bad = Config { num_samples: 4, ..Config::default() };
        assert!(Eval::validate(&bad).unwrap_err().contains("decoding: sample"), "greedy with n > 1 explained");
        let ok = Config { num_samples: 4, decoding: Decoding::Sample, ..Config::default() };
        assert!(Eval::validate(&ok).is_ok());
        let bad = Config { device: "tpu".into(), ..Config::default() };
        assert!(Eval::validate(&bad).unwrap_err().contains("device"));
        let v: Result<Config, _> = serde_json::from_value(serde_json::json!({"fallback": "zero"}));
        assert!(v.is_err(), "no zero-error fallback exists");
    }
}
