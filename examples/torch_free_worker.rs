//! A worker with only the torch-free built-in stages (ingest, filter, split,
//! prompts, …): `torch_free_worker exec-stage SPEC.json`. It is also the
//! template for a custom worker: add your own stage kinds to the registry
//! (`.with::<MyStage>()`) and point the runner at the binary. The ingest
//! benchmark (benches/ingest_vs_polars.sh) drives it.
fn main() {
    std::process::exit(recflow::worker::main(recflow::stages::builtin_registry()));
}
