//! What `run --dry-run` validates beyond the spec (which `pipeline::load`
//! already checked: keys, types, references, configs, inputs present):
//!
//! * model inputs are readable models ([`crate::stages::model_files`]):
//!   an HF directory with config.json and weights, or a GGUF file where the
//!   kind takes one;
//! * API keys named by `api_key_env` are set (for stages that will run);
//! * the teacher's cost preview ([`crate::stages::teacher::preview`]): requests,
//!   estimated tokens and cost, printed before anything is bought.
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
