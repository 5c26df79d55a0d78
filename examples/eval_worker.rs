//! A torch-free worker: runs every built-in stage kind that needs no
//! libtorch (ingest, filter, split, prompts, baselines, report, …) through
//! the exec-stage protocol — `eval_worker exec-stage SPEC.json`.
//!
//! It is what a custom worker looks like (`recflow::worker::main(registry)`),
//! and what `benches/baselines_vs_surprise.sh` drives, so the benchmark runs
//! the real `baselines` stage without building libtorch.
fn main() {
    std::process::exit(recflow::worker::main(recflow::stages::builtin_registry()));
}
