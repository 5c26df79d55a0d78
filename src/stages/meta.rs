//! Metadata of every built-in stage kind, available to the torch-free runner.
//!
//! Each kind's `StageDef` lives in its own file under `src/stages/`; add it
//! here when it lands. Custom kinds come from a worker's `describe --json`.
use super::StageMeta;

/// All built-in stage kinds, sorted by kind name.
pub fn builtin() -> Vec<StageMeta> {
    let mut v: Vec<StageMeta> = vec![
        StageMeta::of::<super::ingest::Ingest>(),
        StageMeta::of::<super::filter::Filter>(),
        StageMeta::of::<super::split::Split>(),
        StageMeta::of::<super::prompts::Prompts>(),
        StageMeta::of::<super::baselines::Baselines>(),
        StageMeta::of::<super::eval::Eval>(),
        StageMeta::of::<super::report::Report>(),
        StageMeta::of::<super::teacher::Teacher>(),
        StageMeta::of::<super::model_import::ModelImport>(),
        StageMeta::of::<super::model_init::ModelInit>(),
        StageMeta::of::<super::grpo::Grpo>(),
        StageMeta::of::<super::sft::Sft>(),
    ];
    v.sort_by_key(|m| m.kind);
    v
}

/// Metadata of one built-in kind.
pub fn find(kind: &str) -> Option<StageMeta> {
    builtin().into_iter().find(|m| m.kind == kind)
}
