//! The torch-free half of the `eval` stage: sample selection, the crash-safe
//! prediction journal, scoring of completions with the shared answer module
//! and a declared fallback, and writing `metrics` + `predictions`. The
//! libtorch half (`recflow-ml`'s `eval`) only generates completions.
//!
//! Honesty rules (issue 7): an invalid answer is never zero error — it is
//! scored by the declared fallback (the item's, user's or global mean rating
//! in `train`) and counted in `invalid_rate`; `rmse_valid`/`mae_valid`
//! report valid answers only.
//!
//! With `n` samples per prompt the prediction is the mean of the valid
//! answers' ratings (fallback when none is valid); `invalid_rate` is the
//! share of invalid completions, `fallback_rate` the share of samples that
//! needed the fallback, `reward_mean` the mean rule reward over completions.
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use arrow::array::{BooleanArray, Float32Array, Int32Array, StringArray};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::io::{arc, SampleRow};
use super::metrics::{summarize, Scored, SummaryConfig};
use crate::answer::{self, RewardConfig, Scale};
use crate::data::io::{eval_writer_properties, write_batch_atomic};

/// What an invalid answer is scored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// The item's mean train rating (else the user's, else the global mean).
    Item,
    /// The user's mean train rating (else the item's, else the global mean).
    User,
    /// The global mean train rating.
    Global,
}

impl Fallback {
    pub fn name(self) -> &'static str {
        match self {
            Fallback::Item => "item_mean",
            Fallback::User => "user_mean",
            Fallback::Global => "global_mean",
        }
    }
}

/// Mean train ratings for the fallback.
#[derive(Debug, Clone, Default)]
pub struct FallbackMeans {
    pub global: f64,
    pub user: HashMap<String, f64>,
    pub item: HashMap<String, f64>,
}

impl FallbackMeans {
    pub fn from_ratings(rows: &[(String, String, f32, i64)]) -> anyhow::Result<Self> {
        if rows.is_empty() {
            anyhow::bail!("the `train` input is empty: the fallback means need training ratings");
        }
        let mut u: HashMap<String, (f64, f64)> = HashMap::new();
        let mut i: HashMap<String, (f64, f64)> = HashMap::new();
        let mut sum = 0.0;
        for (user, item, r, _) in rows {
            let r = *r as f64;
            sum += r;
            let e = u.entry(user.clone()).or_default();
            e.0 += r;
            e.1 += 1.0;
            let e = i.entry(item.clone()).or_default();
            e.0 += r;
            e.1 += 1.0;
        }
        let mean = |m: HashMap<String, (f64, f64)>| m.into_iter().map(|(k, (s, n))| (k, s / n)).collect();
        Ok(FallbackMeans { global: sum / rows.len() as f64, user: mean(u), item: mean(i) })
    }

    pub fn value(&self, fb: Fallback, user: &str, item: &str) -> f64 {
        let (u, i) = (self.user.get(user).copied(), self.item.get(item).copied());
        match fb {
            Fallback::Item => i.or(u).unwrap_or(self.global),
            Fallback::User => u.or(i).unwrap_or(self.global),
            Fallback::Global => self.global,
        }
    }
}

/// Picks at most `max` rows, uniformly at random with `seed`, keeping input
/// order (so predictions line up with the samples file).
pub fn select(rows: Vec<SampleRow>, max: Option<usize>, seed: u64) -> Vec<SampleRow> {
    match max {
        Some(m) if m < rows.len() => {
            let mut idx: Vec<usize> = (0..rows.len()).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            let mut keep = idx[..m].to_vec();
            keep.sort_unstable();
            let mut rows: Vec<Option<SampleRow>> = rows.into_iter().map(Some).collect();
            keep.into_iter().filter_map(|i| rows[i].take()).collect()
        }
        _ => rows,
    }
}

/// One journal line: the completions of one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub sample_id: String,
    pub completions: Vec<String>,
}

/// Append-only JSON-lines journal of generated completions in the stage's
/// work dir: each sample is flushed and fsynced as soon as it is generated,
/// so a crashed eval resumes where it stopped (the work dir is keyed by the
/// stage key, so a journal always matches the config that wrote it).
pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
}

impl Journal {
    /// Opens (or creates) the journal and returns what it already holds. A
    /// torn last line (crash mid-write) is dropped and truncated away.
    pub fn open(path: &Path) -> anyhow::Result<(Self, HashMap<String, Vec<String>>)> {
        let mut done = HashMap::new();
        let mut good_len = 0u64;
        if path.exists() {
            let f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot read journal {}: {e}", path.display()))?;
            let mut reader = std::io::BufReader::new(f);
            let mut line = String::new();
            loop {
                line.clear();
                let n = reader.read_line(&mut line)?;
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                match serde_json::from_str::<JournalEntry>(line.trim_end()) {
                    Ok(e) => {
                        done.insert(e.sample_id, e.completions);
                        good_len += n as u64;
                    }
                    Err(_) => break,
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot open journal {}: {e}", path.display()))?;
        file.set_len(good_len)?;
        let mut j = Journal { path: path.into(), file };
        use std::io::Seek;
        j.file.seek(std::io::SeekFrom::End(0))?;
        Ok((j, done))
    }

    pub fn append(&mut self, sample_id: &str, completions: &[String]) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(&JournalEntry { sample_id: sample_id.into(), completions: completions.to_vec() })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| anyhow::anyhow!("cannot append to journal {}: {e}", self.path.display()))
    }
}

/// Settings of the scoring step (from the eval config).
#[derive(Debug, Clone)]
pub struct ScoreConfig {
    pub stage: String,
    pub method: String,
    pub fallback: Fallback,
    pub scale: Scale,
    pub reward: RewardConfig,
    pub bootstrap: u32,
    pub seed: u64,
}

/// One scored sample (a predictions row).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub row: SampleRow,
    /// First completion (the greedy answer), with its reasoning text.
    pub completion: String,
    pub n_completions: i32,
    pub n_valid: i32,
    /// Mean of the valid answers' ratings; None when none is valid.
    pub rating: Option<f64>,
    /// The value scored: `rating`, or the fallback.
    pub prediction: f64,
    pub fallback_used: bool,
    /// Why the first completion is invalid (None when valid).
    pub invalid_reason: Option<String>,
    pub reward_mean: f64,
}

pub fn score_one(row: &SampleRow, completions: &[String], means: &FallbackMeans, cfg: &ScoreConfig) -> Prediction {
    let mut ratings = Vec::new();
    let mut reward_sum = 0.0f64;
    let mut first_reason = None;
    for (k, c) in completions.iter().enumerate() {
        let parsed = answer::parse(c, cfg.scale);
        reward_sum += answer::reward(&parsed, row.target as f32, &cfg.reward).total as f64;
        match parsed {
            Ok(a) => ratings.push(a.rating as f64),
            Err(e) if k == 0 => first_reason = Some(e.to_string()),
            Err(_) => {}
        }
    }
    let rating = (!ratings.is_empty()).then(|| ratings.iter().sum::<f64>() / ratings.len() as f64);
    let fb = means.value(cfg.fallback, &row.user_id, &row.item_id);
    Prediction {
        row: row.clone(),
        completion: completions.first().cloned().unwrap_or_default(),
        n_completions: completions.len() as i32,
        n_valid: ratings.len() as i32,
        rating,
        prediction: rating.unwrap_or(fb),
        fallback_used: rating.is_none(),
        invalid_reason: first_reason,
        reward_mean: if completions.is_empty() { 0.0 } else { reward_sum / completions.len() as f64 },
    }
}

/// The eval `metrics.json` object (pinned fields first).
pub fn metrics_json(preds: &[Prediction], cfg: &ScoreConfig) -> serde_json::Value {
    let scored: Vec<Scored> = preds
        .iter()
        .map(|p| Scored { target: p.row.target, prediction: p.prediction, valid: !p.fallback_used, user_history_len: p.row.user_history_len })
        .collect();
    let s = summarize(
        &scored,
        &SummaryConfig { scale_min: cfg.scale.min as f64, scale_max: cfg.scale.max as f64, bootstrap_resamples: cfg.bootstrap, seed: cfg.seed },
    );
    let mut m = s.to_json(&cfg.stage, &cfg.method, cfg.fallback.name());
    let completions: i64 = preds.iter().map(|p| p.n_completions as i64).sum();
    let valid: i64 = preds.iter().map(|p| p.n_valid as i64).sum();
    // invalid_rate counts completions (equals the sample share for greedy, n = 1).
    let invalid_rate = if completions == 0 { 0.0 } else { (completions - valid) as f64 / completions as f64 };
    m.insert("invalid_rate".into(), serde_json::json!(invalid_rate));
    m.insert("fallback_rate".into(), serde_json::json!(s.invalid_rate));
    let n = preds.len().max(1) as f64;
    m.insert("reward_mean".into(), serde_json::json!(preds.iter().map(|p| p.reward_mean).sum::<f64>() / n));
    m.insert("samples_per_prompt".into(), serde_json::json!(preds.first().map_or(0, |p| p.n_completions)));
    serde_json::Value::Object(m)
}

pub fn write_predictions(path: &Path, preds: &[Prediction]) -> anyhow::Result<()> {
    let col_s = |f: &dyn Fn(&Prediction) -> String| arc(StringArray::from(preds.iter().map(f).collect::<Vec<_>>()));
    write_batch_atomic(
        path,
        crate::data::schema::eval_predictions(),
        vec![
            col_s(&|p| p.row.sample_id.clone()),
            col_s(&|p| p.row.user_id.clone()),
            col_s(&|p| p.row.item_id.clone()),
            arc(Float32Array::from(preds.iter().map(|p| p.row.target as f32).collect::<Vec<_>>())),
            arc(Int32Array::from(preds.iter().map(|p| p.row.user_history_len.clamp(0, i32::MAX as i64) as i32).collect::<Vec<_>>())),
            col_s(&|p| p.completion.clone()),
            arc(Float32Array::from(preds.iter().map(|p| p.rating.map(|r| r as f32)).collect::<Vec<_>>())),
            arc(Float32Array::from(preds.iter().map(|p| p.prediction as f32).collect::<Vec<_>>())),
            arc(BooleanArray::from(preds.iter().map(|p| !p.fallback_used).collect::<Vec<_>>())),
            arc(Int32Array::from(preds.iter().map(|p| p.n_valid).collect::<Vec<_>>())),
            arc(Int32Array::from(preds.iter().map(|p| p.n_completions).collect::<Vec<_>>())),
            arc(StringArray::from(preds.iter().map(|p| p.invalid_reason.clone()).collect::<Vec<_>>())),
            arc(Float32Array::from(preds.iter().map(|p| p.reward_mean as f32).collect::<Vec<_>>())),
        ],
        eval_writer_properties(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srow(id: &str, u: &str, i: &str, t: f64) -> SampleRow {
        SampleRow { sample_id: id.into(), user_id: u.into(), item_id: i.into(), target: t, user_history_len: 1 }
    }

    fn cfg(fb: Fallback) -> ScoreConfig {
        ScoreConfig { stage: "eval".into(), method: "m".into(), fallback: fb, scale: Scale::default(), reward: RewardConfig::default(), bootstrap: 10, seed: 0 }
    }

    #[test]
    fn invalid_answers_use_the_declared_fallback_never_zero_error() {
        let means = FallbackMeans::from_ratings(&[
            ("u".into(), "i".into(), 2.0, 0),
            ("u".into(), "j".into(), 4.0, 0),
            ("v".into(), "i".into(), 5.0, 0),
        ])
        .unwrap();
        // global 11/3, user u 3, item i 3.5.
        let r = srow("s", "u", "i", 5.0);
        let bad = vec!["I think 5".to_string()];
        let p = score_one(&r, &bad, &means, &cfg(Fallback::Item));
        assert_eq!((p.prediction, p.fallback_used), (3.5, true), "item mean used, not the target");
        assert_eq!(score_one(&r, &bad, &means, &cfg(Fallback::User)).prediction, 3.0, "user mean");
        assert!((score_one(&r, &bad, &means, &cfg(Fallback::Global)).prediction - 11.0 / 3.0).abs() < 1e-12, "global mean");
        assert_eq!(score_one(&srow("s", "new", "new", 5.0), &bad, &means, &cfg(Fallback::Item)).prediction, 11.0 / 3.0, "unknown both → global");
        assert_eq!(p.reward_mean, -1.0, "invalid answers get the paper's −1 reward");
        assert!(p.invalid_reason.as_deref().unwrap().contains("missing"), "the reason is kept");
        let m = metrics_json(&[p], &cfg(Fallback::Item));
        assert_eq!(m["invalid_rate"], 1.0);
        assert!((m["rmse"].as_f64().unwrap() - 1.5).abs() < 1e-9, "error |3.5 − 5| counted, not zero");
        assert!(m["rmse_valid"].is_null(), "no valid answers → no valid-only RMSE");
        assert_eq!(m["fallback"], "item_mean");
    }

    #[test]
    fn n_samples_are_averaged_and_invalid_rate_counts_completions() {
        let means = FallbackMeans::from_ratings(&[("u".into(), "i".into(), 3.0, 0)]).unwrap();
        let ok = |r: &str| answer::render("a", "b", "c", r.parse().unwrap());
        let comps = vec![ok("4"), "garbage".to_string(), ok("5"), ok("3")];
        let p = score_one(&srow("s", "u", "i", 4.0), &comps, &means, &cfg(Fallback::Item));
        assert_eq!(p.rating, Some(4.0), "mean of 4, 5, 3");
        assert_eq!((p.n_valid, p.n_completions), (3, 4));
        // rewards: 2, −1, 1.5, 1.5 → mean 1.
        assert!((p.reward_mean - 1.0).abs() < 1e-6, "mean rule reward over completions");
        let m = metrics_json(&[p], &cfg(Fallback::Item));
        assert_eq!(m["invalid_rate"], 0.25, "one of four completions invalid");
        assert_eq!(m["fallback_rate"], 0.0, "the sample had valid answers");
        assert_eq!(m["rmse"], 0.0);
    }

    #[test]
    fn journal_resumes_and_drops_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.jsonl");
        {
            let (mut j, done) = Journal::open(&p).unwrap();
            assert!(done.is_empty());
            j.append("a", &["x".into()]).unwrap();
            j.append("b", &["y".into(), "z".into()]).unwrap();
        }
        // Simulate a crash mid-write.
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"{\"sample_id\":\"c\",\"compl").unwrap();
        let (mut j, done) = Journal::open(&p).unwrap();
        assert_eq!(done.len(), 2, "complete lines survive, the torn one is dropped");
        assert_eq!(done["b"], vec!["y".to_string(), "z".to_string()]);
        j.append("c", &["w".into()]).unwrap();
        let (_, done) = Journal::open(&p).unwrap();
        assert_eq!(done.len(), 3, "appending after a torn line yields a clean journal");
    }

    #[test]
    fn selection_is_seeded_and_keeps_order() {
        let rows: Vec<SampleRow> = (0..50).map(|k| srow(&format!("{k:02}"), "u", "i", 3.0)).collect();
        let a = select(rows.clone(), Some(10), 7);
        assert_eq!(a, select(rows.clone(), Some(10), 7), "same seed → same rows");
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0].sample_id < w[1].sample_id), "input order kept");
        assert_eq!(select(rows.clone(), None, 7).len(), 50, "no limit → all rows");
    }
}
