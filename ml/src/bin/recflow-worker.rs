//! `recflow-worker`: runs stages for the runner (exec-stage protocol) and the
//! `model` / `doctor` commands. The only binary that loads libtorch.
fn main() {
    let registry = recflow_ml::builtin_registry();
    std::process::exit(recflow::worker::main(registry));
}
