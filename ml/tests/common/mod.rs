//! Toy data and stage harness for the training tests: a tiny random-init
//! Llama with a character tokenizer (`recflow_ml::train::toy`) and prompts
//! whose target rating is written in the prompt ("rate 4"), so a model can
//! learn both the answer format (SFT) and the rating (GRPO).
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use recflow::stages::{StageCtx, StageDef};
use recflow_ml::train::data::{write_examples, Example};

/// `n` examples; `completion_rating` decides the rating in the (accepted)
/// completion: `None` → samples only (no completion).
pub fn examples(n: usize, offset: usize, completion_rating: Option<&dyn Fn(usize, u32) -> u32>) -> Vec<Example> {
    (0..n)
        .map(|k| {
            let i = k + offset;
            // A cheap deterministic hash for names and targets.
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
            let target = 1 + (h % 5) as u32;
            let name: String = (0..3).map(|j| (b'a' + ((h >> (5 * j)) % 26) as u8) as char).collect();
            let completion = completion_rating.map(|f| {
                recflow::answer::render(&format!("{name} fan"), "an album", "fits", f(i, target) as f32)
            });
            Example {
                sample_id: format!("s{i}"),
                messages: vec![("user".into(), format!("{name} rate {target}\n"))],
                target: target as f32,
                completion,
            }
        })
        .collect()
}

/// The small toy model the resume and kill tests train (hidden 32,
/// intermediate 64), written to `dir/base`.
pub fn small_toy_model(dir: &Path, seed: i64) -> PathBuf {
    use recflow_ml::train::toy::{write_toy_model, ToySpec};
    let base = dir.join("base");
    write_toy_model(&base, ToySpec { hidden: 32, intermediate: 64, seed, ..ToySpec::default() }).expect("write toy model");
    base
}

/// SFT inputs in `dir`: `coldstart.parquet` with `n` accepted rows that
/// answer the prompt's target, and `valid.parquet` with `n_valid` samples.
pub fn sft_data(dir: &Path, n: usize, n_valid: usize) -> (PathBuf, PathBuf) {
    let answer_target = |_: usize, t: u32| t;
    (write(dir, "coldstart.parquet", &examples(n, 0, Some(&answer_target)), true), write(dir, "valid.parquet", &examples(n_valid, 500, None), false))
}

/// GRPO inputs in `dir`: `samples.parquet` with `n` prompts and
/// `valid.parquet` with `n_valid`.
pub fn grpo_data(dir: &Path, n: usize, n_valid: usize) -> (PathBuf, PathBuf) {
    (write(dir, "samples.parquet", &examples(n, 0, None), false), write(dir, "valid.parquet", &examples(n_valid, 500, None), false))
}

pub fn write(dir: &Path, name: &str, rows: &[Example], coldstart: bool) -> PathBuf {
    let p = dir.join(name);
    write_examples(&p, rows, coldstart).expect("write toy examples");
    p
}

/// Runs stage `D` in-process with the given inputs and `with:` config, in `root`
/// (outputs under `root/out`, work dir `root/work`).
pub fn run_stage<D: StageDef>(
    root: &Path,
    inputs: &[(&str, &Path)],
    cfg: serde_json::Value,
    run: fn(&D::Config, &mut StageCtx) -> anyhow::Result<recflow::stages::Metrics>,
) -> recflow::stages::Metrics {
    try_run_stage::<D>(root, inputs, cfg, run).expect("stage run must succeed")
}

/// [`run_stage`] for a run that may fail.
pub fn try_run_stage<D: StageDef>(
    root: &Path,
    inputs: &[(&str, &Path)],
    cfg: serde_json::Value,
    run: fn(&D::Config, &mut StageCtx) -> anyhow::Result<recflow::stages::Metrics>,
) -> anyhow::Result<recflow::stages::Metrics> {
    let cfg: D::Config = serde_json::from_value(cfg).expect("test config must parse");
    D::validate(&cfg).expect("test config must validate");
    let inputs: BTreeMap<String, Vec<PathBuf>> =
        inputs.iter().map(|(k, p)| (k.to_string(), vec![p.to_path_buf()])).collect();
    let mut ctx = StageCtx::for_test(D::KIND, root, inputs, D::outputs(&cfg));
    ctx.seed = 7;
    run(&cfg, &mut ctx)
}

/// Fraction of greedy answers that parse under the answer grammar.
pub fn valid_rate(model_dir: &Path, prompts: &[Example], max_new: usize) -> f64 {
    use recflow_ml::llm::{Model, Tokenizer};
    use recflow_ml::train::rollout::{encode_prompt, sample};
    let m = Model::load(model_dir, tch::Device::Cpu, tch::Kind::Float).expect("load model");
    let tok = Tokenizer::load(model_dir).expect("load tokenizer");
    let ids: Vec<Vec<i64>> = prompts.iter().map(|e| encode_prompt(&tok, e, 256).unwrap()).collect();
    let req: Vec<u64> = (0..ids.len() as u64).collect();
    let out = sample(&m, &tok, &ids, &req, 1, max_new, 0.0, 1.0, 0, 0, false).expect("generate");
    let ok = out.iter().filter(|g| recflow::answer::parse(&g[0].text, Default::default()).is_ok()).count();
    ok as f64 / prompts.len() as f64
}

/// Reads a log Parquet column as options.
pub fn log_column(path: &Path, col: &str) -> Vec<Option<f64>> {
    let log = recflow_ml::train::data::Log::read(path).expect("read log");
    let j = log.columns.iter().position(|c| c == col).unwrap_or_else(|| panic!("log has no column {col}"));
    log.rows.iter().map(|r| r[j]).collect()
}
