//! # recflow-ml
//!
//! The libtorch half of recflow: the LLM engine ([`llm`]), RL math ([`rl`]),
//! training stages ([`train`]) and their data parallelism ([`dist`]), the numerics-profile read-back
//! ([`numerics`]) and the worker's full stage registry ([`builtin_registry`]).
//! Only the `recflow-worker` binary links this crate.

pub mod cuda;
pub mod dist;
pub mod eval;
pub mod llm;
pub mod numerics;
pub mod teacher_local;
pub mod rl;
pub mod train;

/// Every built-in stage kind: the torch-free ones from `recflow` plus the
/// libtorch ones from this crate. A custom worker adds its own:
/// `recflow::worker::main(recflow_ml::builtin_registry().with::<MyStage>())`.
pub fn builtin_registry() -> recflow::stages::Registry {
    recflow::stages::builtin_registry()
        // the teacher's `local` backend needs the generation engine
        .with_run::<recflow::stages::teacher::Teacher>(teacher_local::run)
        .with_run::<recflow::stages::model_import::ModelImport>(llm::stages::run_model_import)
        .with_run::<recflow::stages::model_init::ModelInit>(llm::stages::run_model_init)
        .with_run::<recflow::stages::sft::Sft>(train::sft::run)
        .with_run::<recflow::stages::grpo::Grpo>(train::grpo::run)
        .with_run::<recflow::stages::eval::Eval>(eval::run)
}
