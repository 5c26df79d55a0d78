//! What `run --dry-run` validates beyond the spec (which `pipeline::load`
//! already checked: keys, types, references, configs, inputs present):
//!
//! * model inputs are readable models ([`crate::stages::model_files`]):
//!   an HF directory with config.json and weights, or a GGUF file where the
//!   kind takes one;
//! * API keys named by `api_key_env` are set (for stages that will run);
//! * the teacher's cost preview ([`crate::stages::teacher::preview`]): requests,
//!   estimated tokens and cost, printed before anything is bought;
//! * the completion budgets downstream of a teacher against its traces'
//!   token lengths ([`super::budget`]) once its record is in the store;
//! * each training stage's plan: steps, examples and token lengths
//!   ([`plan_lines`]).
//!
//! With `--allow-missing`, absent external things (inputs, keys) are warnings;
//! a present but unreadable model is always an error.
use std::path::Path;

use super::Available;
use crate::pipeline::resolved::{InputRef, ResolvedStage};
use crate::pipeline::Pipeline;
use crate::stages::model_files;

/// Findings about one stage.
#[derive(Debug, Default)]
pub struct Findings {
    /// Bad input (`FILE:LINE:COL: …`): the dry run exits 2.
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Information lines (the teacher preview).
    pub notes: Vec<String>,
}

fn at(p: &Pipeline, s: &ResolvedStage, input: &str) -> String {
    let pos = s.positions.get(input).copied().unwrap_or(s.loc.pos);
    format!("{}:{}:{}", p.file.display(), pos.line, pos.col)
}

/// Checks stage `s`. `will_run`: it is not cached (keys and paid requests
/// matter only then). `avail`: outputs of upstream stages already in the store.
pub fn check_stage(p: &Pipeline, s: &ResolvedStage, avail: &Available, will_run: bool, allow_missing: bool) -> Findings {
    let mut f = Findings::default();
    // Models: external paths only (a stage's model output was checked by the
    // stage that made it). Absence was already reported by the resolver.
    for (input, form) in &s.model_inputs {
        for r in s.inputs.get(input).into_iter().flatten() {
            if let InputRef::Path { abs, shown } = r {
                if abs.exists() {
                    if let Err(m) = model_files::check(abs, *form) {
                        f.errors.push(format!("{}: stage `{}`: input `{input}` (`{shown}`) is not a readable model: {m}", at(p, s, input), s.name));
                    }
                }
            }
        }
    }
    if s.kind() == "teacher" {
        teacher(p, s, avail, will_run, allow_missing, &mut f);
    }
    f
}

fn teacher(p: &Pipeline, s: &ResolvedStage, avail: &Available, will_run: bool, allow_missing: bool, f: &mut Findings) {
    use crate::stages::teacher::{Backend, Config};
    let Ok(cfg) = serde_json::from_value::<Config>(s.config_run.clone()) else { return };
    if !will_run {
        return;
    }
    if let (Backend::Openai, Some(var)) = (cfg.backend, &cfg.api_key_env) {
        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
            let m = format!(
                "{}: stage `{}`: the API key variable `{var}` (api_key_env) is not set; export it before running",
                at(p, s, "with.api_key_env"),
                s.name
            );
            if allow_missing {
                f.warnings.push(m);
            } else {
                f.errors.push(m);
            }
        }
    }
    // Samples: an external file, or an upstream output already in the store.
    let path = match s.inputs.get("samples").and_then(|v| v.first()) {
        Some(InputRef::Path { abs, .. }) => Some(abs.clone()),
        Some(InputRef::Output { stage, output }) => avail.get(stage).and_then(|m| m.get(output)).map(|a| a.path.clone()),
        None => None,
    };
    let attempts = 1 + cfg.max_rationalize as u64;
    let Some(path) = path.filter(|p| p.exists()) else {
        let bound = match cfg.max_samples {
            Some(k) => format!("at most {k} samples, {} requests", k as u64 * attempts),
            None => "every sample".to_string(),
        };
        f.notes.push(format!(
            "  teacher preview: samples are not built yet ({bound}, up to {attempts} attempts each); run the upstream stages, then --dry-run again for tokens and cost"
        ));
        return;
    };
    match crate::data::io::read_samples(&path) {
        Ok(samples) => f.notes.push(preview_line(&cfg, &samples, &path)),
        Err(e) => f.errors.push(format!("{}: stage `{}`: samples {} cannot be read: {e}", at(p, s, "samples"), s.name, path.display())),
    }
}

fn preview_line(cfg: &crate::stages::teacher::Config, samples: &[crate::data::Sample], path: &Path) -> String {
    let pv = crate::stages::teacher::preview(cfg, samples);
    let cost = if pv.paid {
        format!("est. cost ${:.4} (≤ ${:.4} if every sample used every attempt)", pv.est_cost_first_usd, pv.est_cost_max_usd)
    } else {
        "offline backend: no cost".to_string()
    };
    format!(
        "  teacher preview ({}): {} samples → {} requests (≤ {} with rationalization), ~{} prompt tokens, ≤ {} completion tokens, {cost}; answers already in the response cache are not bought again",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        pv.n_samples,
        pv.requests_min,
        pv.requests_max,
        pv.est_tokens_in,
        pv.est_tokens_out_max,
    )
}

/// The completion budgets downstream of teacher `s` ([`super::budget`]):
/// checked against its recorded metrics when it is in the store, else a
/// note that the run checks them once it has run (before SFT starts).
pub fn budgets(p: &Pipeline, s: &ResolvedStage, recorded: Option<&serde_json::Value>, f: &mut Findings) {
    if s.kind() != "teacher" || super::budget::budgets(p, &s.name).is_empty() {
        return;
    }
    match recorded {
        Some(m) if m.get("trace_tokens_max").is_some() => {
            let b = super::budget::check_metrics(p, s, m);
            f.errors.extend(b.errors);
            f.warnings.extend(b.warnings);
            let q = |k: &str| m.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            f.notes.push(format!(
                "  traces: {} tokens p50, {} p95, {} max; completion budgets need ≥ {}",
                q("trace_tokens_p50"),
                q("trace_tokens_p95"),
                q("trace_tokens_max"),
                super::budget::required(q("trace_tokens_max"))
            ));
        }
        Some(_) => f.notes.push("  traces: the teacher recorded no token lengths (give it a `tokenizer` input): completion budgets not checked".into()),
        None if s.inputs.contains_key("tokenizer") => {
            f.notes.push("  traces: completion budgets downstream are checked against the traces' token lengths when the teacher has run, before SFT starts".into())
        }
        None => f.notes.push("  traces: no `tokenizer` input: completion budgets downstream will not be checked against the traces".into()),
    }
}

/// Nearest-rank p50 / p95 / max of token counts, as `p50 A, p95 B, max C`.
fn lengths(v: Vec<u64>) -> String {
    match crate::teacher::stats::TraceLengths::from_counts(v) {
        Some(l) => format!("p50 {}, p95 {}, max {}", l.p50, l.p95, l.max),
        None => "none".into(),
    }
}

/// The path of input `name` of `s`: an external path, or an upstream output
/// already in the store.
fn input_path(s: &ResolvedStage, avail: &Available, name: &str) -> Option<std::path::PathBuf> {
    match s.inputs.get(name).and_then(|v| v.first())? {
        InputRef::Path { abs, .. } => Some(abs.clone()).filter(|p| p.exists()),
        InputRef::Output { stage, output } => avail.get(stage).and_then(|m| m.get(output)).map(|a| a.path.clone()),
    }
}

/// The tokenizer of the model `s` trains or evaluates: the nearest model
/// directory up its `model` inputs that exists (adapters and fine-tuning
/// keep the tokenizer).
fn model_tokenizer(p: &Pipeline, s: &ResolvedStage, avail: &Available) -> Option<tokenizers::Tokenizer> {
    let mut cur = s;
    for _ in 0..p.stages.len() {
        if let Some(dir) = input_path(cur, avail, "model").filter(|d| d.join("tokenizer.json").is_file()) {
            return crate::util::load_tokenizer(&dir).ok();
        }
        let up = match cur.inputs.get("model").and_then(|v| v.first()) {
            Some(InputRef::Output { stage, .. }) => p.stages.iter().find(|x| &x.name == stage)?,
            _ => return None,
        };
        cur = up;
    }
    None
}

/// Content tokens (system + user messages, plus `completion`) of a sample:
/// what the chat template wraps (a few tokens per message more).
fn content_tokens(tok: &tokenizers::Tokenizer, messages: &[crate::data::Message], completion: Option<&str>) -> u64 {
    let n = |t: &str| tok.encode(t, false).map(|e| e.len() as u64).unwrap_or(0);
    messages.iter().map(|m| n(&m.content)).sum::<u64>() + completion.map(n).unwrap_or(0)
}

/// `run --dry-run`'s plan of a training or eval stage (issue 18): optimizer
/// steps, examples per step and in all, and token lengths in the model's
/// tokenizer, from the data and model already in the store (what is not
/// built yet is said so).
pub fn plan_lines(p: &Pipeline, s: &ResolvedStage, avail: &Available) -> Vec<String> {
    let kind = s.kind();
    if !matches!(kind, "sft" | "grpo" | "eval") {
        return Vec::new();
    }
    let tok = model_tokenizer(p, s, avail);
    let no_tok = "token lengths once the model (its tokenizer) is built";
    let mut out = Vec::new();
    match kind {
        "sft" => {
            let Ok(cfg) = serde_json::from_value::<crate::stages::sft::Config>(s.config_run.clone()) else { return out };
            let per = cfg.examples_per_step();
            let Some(rows) = input_path(s, avail, "data").and_then(|d| crate::data::io::read_coldstart(&d).ok()) else {
                let steps = cfg.max_steps.map(|n| format!("{n} steps")).unwrap_or_else(|| format!("{} epochs", cfg.num_train_epochs));
                out.push(format!("  plan: {steps} × {per} examples; rows and token lengths once `data` is built"));
                return out;
            };
            let acc: Vec<&crate::data::ColdRow> = rows.iter().filter(|r| r.accepted).collect();
            let held = if acc.len() >= 2 { acc.iter().filter(|r| crate::stages::sft::is_held_out(&r.sample.sample_id, cfg.val_fraction)).count() } else { 0 };
            let train = (acc.len() - held).max(1);
            let steps = cfg.planned_steps(train);
            out.push(format!(
                "  plan: {steps} steps × {per} examples = {} examples ({:.2} epochs of {train} trained rows; {held} held out)",
                steps * per,
                (steps * per) as f64 / train as f64
            ));
            match &tok {
                Some(t) => {
                    let len: Vec<u64> = acc.iter().map(|r| (content_tokens(t, &r.sample.messages, r.completion.as_deref()) + 1).min(cfg.max_length as u64)).collect();
                    let mb = match cfg.max_tokens_per_microbatch {
                        Some(b) => format!("micro-batches of ≤ {b} padded tokens"),
                        None => format!("micro-batches of {} examples", cfg.per_device_train_batch_size),
                    };
                    out.push(format!(
                        "  tokens per example (prompt + trace, cut at max_length {}): {}; {mb}{}",
                        cfg.max_length,
                        lengths(len),
                        if cfg.gradient_checkpointing { ", gradient checkpointing" } else { "" }
                    ));
                }
                None => out.push(format!("  {no_tok}")),
            }
        }
        "grpo" => {
            let Ok(cfg) = serde_json::from_value::<crate::stages::grpo::Config>(s.config_run.clone()) else { return out };
            let batches = cfg.max_steps.div_ceil(cfg.num_iterations);
            let per = cfg.prompts_per_step * cfg.num_generations;
            out.push(format!(
                "  plan: {} steps; {batches} rollout batches × {} prompts × G {} = {} completions of ≤ {} tokens (T {})",
                cfg.max_steps,
                cfg.prompts_per_step,
                cfg.num_generations,
                batches * per,
                cfg.max_completion_length,
                cfg.temperature
            ));
            prompt_line(&mut out, s, avail, tok.as_ref(), "samples", Some(cfg.max_prompt_length), no_tok);
        }
        _ => {
            let Ok(cfg) = serde_json::from_value::<crate::stages::eval::Config>(s.config_run.clone()) else { return out };
            let n = input_path(s, avail, "samples").and_then(|d| crate::data::io::read_samples(&d).ok()).map(|v| v.len());
            let n = match (n, cfg.max_samples) {
                (Some(n), Some(m)) => format!("{}", n.min(m)),
                (Some(n), None) => format!("{n}"),
                (None, Some(m)) => format!("≤ {m}"),
                (None, None) => "all".into(),
            };
            out.push(format!("  plan: {n} samples × {} completion(s) of ≤ {} new tokens ({:?})", cfg.num_samples, cfg.max_new_tokens, cfg.decoding).to_lowercase());
            prompt_line(&mut out, s, avail, tok.as_ref(), "samples", None, no_tok);
        }
    }
    out
}

fn prompt_line(out: &mut Vec<String>, s: &ResolvedStage, avail: &Available, tok: Option<&tokenizers::Tokenizer>, input: &str, cut: Option<usize>, no_tok: &str) {
    let Some(samples) = input_path(s, avail, input).and_then(|d| crate::data::io::read_samples(&d).ok()) else {
        out.push(format!("  prompt lengths once `{input}` is built"));
        return;
    };
    match tok {
        Some(t) => {
            let len: Vec<u64> = samples.iter().map(|x| content_tokens(t, &x.messages, None)).collect();
            let cut = cut.map(|c| format!(" (cut at {c})")).unwrap_or_default();
            out.push(format!("  prompt tokens over {} samples{cut}: {}", samples.len(), lengths(len)));
        }
        None => out.push(format!("  {no_tok}")),
    }
}
