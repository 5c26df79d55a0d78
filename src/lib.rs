//! # recflow
//!
//! Declarative, cached pipelines for reasoning-enhanced recommenders
//! (RecZero / RecOne, arXiv 2510.23077). This crate is the torch-free half:
//! the runner, the stage contract, data, teacher and report stages. The
//! libtorch half (LLM engine, training, evaluation, the `recflow-worker`
//! binary) is the `recflow-ml` crate in `ml/`.
//!
//! Core concepts and where they live:
//! * **Pipeline** — YAML spec → resolved stages → DAG: [`pipeline`].
//! * **Stage** — one kind of work with a config, inputs and outputs; the
//!   contract is [`stages::Stage`], metadata [`stages::StageDef`].
//! * **Key** — sha256 over everything that determines a stage's outputs: [`cache`].
//! * **Store** — content-addressed objects and run records under `cache/`: [`cache`].
//! * **Lock** — the observed hashes next to the pipeline file: [`lock`].
//! * **Exec-stage protocol** — how the runner starts a worker: [`worker`].
//! * **Numerics profile** — the CPU code paths pinned in every worker and
//!   recorded per stage: [`numerics`].
//! * **Answer grammar and reward** — shared by teacher, GRPO and eval: [`answer`].
//! * **Remote store** — the store's layout on S3 or a shared directory, with
//!   per-key leases and push/pull: [`remote`]; configured in `recflow.toml`
//!   ([`config`]) or by `RECFLOW_REMOTE`.
pub mod answer;
pub mod cache;
pub mod cf;
pub mod config;
pub mod data;
pub mod lock;
pub mod numerics;
pub mod pipeline;
pub mod remote;
pub mod report;
pub mod run;
pub mod stages;
pub mod teacher;
pub mod util;
pub mod worker;
