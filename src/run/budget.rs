//! Completion budgets against the teacher's traces (issue 18), checked
//! before anything pays for SFT.
//!
//! SFT teaches the student to write answers as long as the teacher's
//! accepted traces. A GRPO stage whose `max_completion_length`, an eval whose
//! `max_new_tokens`, or an SFT whose validation `eval_max_new_tokens` is
//! below the longest of them cuts answers before `<rate>`: GRPO then sees
//! only the invalid reward (no signal) and eval scores the cut answers as
//! invalid. A sampled answer also runs longer than the greedy one, so the
//! budget must exceed the longest trace by a margin
//! ([`required`]: `max + max(16, ⌈max / 4⌉)` tokens).
//!
//! The teacher records the traces' token lengths in the student's tokenizer
//! (`trace_tokens_max`, from its `tokenizer` input). [`check`] finds every
//! budget downstream of a teacher — SFT stages trained on its `coldstart`,
//! then the GRPO and eval stages whose `model` descends from them — and
//! names each one that is too short, with both numbers and the field to
//! change. `run` refuses such a pipeline as soon as the teacher is done (or
//! reused), before SFT starts; `run --dry-run` reports it when the teacher's
//! record is in the store. A stage that sets `allow_truncation: true` (an
//! operational field of sft, grpo and eval) is only warned about.
use std::collections::BTreeSet;

use serde_json::Value;

use crate::pipeline::resolved::{InputRef, ResolvedStage};
use crate::pipeline::Pipeline;

/// The smallest budget that holds a trace of `max` tokens with the margin.
pub fn required(max: u64) -> u64 {
    max + 16u64.max(max.div_ceil(4))
}

/// One budget that bounds what an SFT on the teacher's traces will write.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub stage: String,
    /// The `with:` field that holds it.
    pub field: &'static str,
    pub tokens: u64,
    /// `allow_truncation: true` on the stage.
    pub allowed: bool,
}

/// What [`check`] found.
#[derive(Debug, Default, PartialEq)]
pub struct Findings {
    /// Budgets below [`required`] without `allow_truncation`: the run is refused.
    pub errors: Vec<String>,
    /// The same, on stages that allow it.
    pub warnings: Vec<String>,
}

/// Whether `s` takes `output` of one of `from` as its input `input`.
fn reads(s: &ResolvedStage, input: &str, from: &BTreeSet<String>, output: &str) -> bool {
    s.inputs.get(input).into_iter().flatten().any(|r| matches!(r, InputRef::Output { stage, output: o } if from.contains(stage) && o == output))
}

/// The budgets downstream of teacher stage `teacher`, in pipeline order.
pub fn budgets(p: &Pipeline, teacher: &str) -> Vec<Budget> {
    let teacher: BTreeSet<String> = [teacher.to_string()].into();
    // SFT stages on its coldstart, then every model descended from them
    // through grpo stages (a chain of RL stages keeps the answer length).
    let mut models: BTreeSet<String> = p.stages.iter().filter(|s| s.kind() == "sft" && reads(s, "data", &teacher, "coldstart")).map(|s| s.name.clone()).collect();
    let sft = models.clone();
    loop {
        let more: Vec<String> = p
            .stages
            .iter()
            .filter(|s| s.kind() == "grpo" && !models.contains(&s.name) && reads(s, "model", &models, "model"))
            .map(|s| s.name.clone())
            .collect();
        if more.is_empty() {
            break;
        }
        models.extend(more);
    }
    let field = |s: &ResolvedStage, f: &str| s.config_run.get(f).and_then(Value::as_u64);
    let allowed = |s: &ResolvedStage| s.config_run.get("allow_truncation").and_then(Value::as_bool).unwrap_or(false);
    let mut out = Vec::new();
    for s in &p.stages {
        let f: &'static str = match s.kind() {
            "sft" if sft.contains(&s.name) => "eval_max_new_tokens",
            "grpo" if models.contains(&s.name) => "max_completion_length",
            "eval" if reads(s, "model", &models, "model") => "max_new_tokens",
            _ => continue,
        };
        if let Some(tokens) = field(s, f) {
            out.push(Budget { stage: s.name.clone(), field: f, tokens, allowed: allowed(s) });
        }
    }
    out
}

/// Checks the budgets downstream of `teacher` against its traces' longest
/// `trace_max` tokens (`p95` is quoted in messages).
pub fn check(p: &Pipeline, teacher: &str, trace_p95: Option<u64>, trace_max: u64) -> Findings {
    let need = required(trace_max);
    let mut f = Findings::default();
    for b in budgets(p, teacher) {
        if b.tokens >= need {
            continue;
        }
        let s = p.stages.iter().find(|s| s.name == b.stage);
        let pos = s.and_then(|s| s.positions.get(&format!("with.{}", b.field)).or(Some(&s.loc.pos))).copied().unwrap_or_default();
        let p95 = trace_p95.map(|x| format!(", p95 {x}")).unwrap_or_default();
        let msg = format!(
            "{}:{}:{}: stage `{}`: `{}: {}` is below what SFT on teacher `{teacher}` teaches the model to write (traces up to {trace_max} tokens{p95}; \
             with the margin for sampled answers, at least {need}): answers would be cut before <rate> and scored invalid",
            p.file.display(),
            pos.line,
            pos.col,
            b.stage,
            b.field,
            b.tokens,
        );
        if b.allowed {
            f.warnings.push(format!("{msg} (allowed by `allow_truncation: true`)"));
        } else {
            f.errors.push(format!(
                "{msg}. Raise `{}` to at least {need}, shorten the traces (e.g. `cf_style: concise`), or set `allow_truncation: true` on `{}` to accept it",
                b.field, b.stage
            ));
        }
    }
    f
}

/// [`check`] from a teacher's recorded metrics; nothing when it recorded no
/// token lengths (no `tokenizer` input) or `stage` is not a teacher.
pub fn check_metrics(p: &Pipeline, stage: &ResolvedStage, metrics: &Value) -> Findings {
    if stage.kind() != "teacher" {
        return Findings::default();
    }
    match metrics.get("trace_tokens_max").and_then(Value::as_u64) {
        Some(max) => check(p, &stage.name, metrics.get("trace_tokens_p95").and_then(Value::as_u64), max),
        None => Findings::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_a_quarter_and_at_least_16() {
        assert_eq!(required(40), 56, "small traces: 16 tokens of margin");
        assert_eq!(required(120), 150, "a quarter of the longest trace");
        assert_eq!(required(0), 16);
    }
}
