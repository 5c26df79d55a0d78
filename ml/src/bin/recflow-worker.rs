//! `recflow-worker`: runs stages for the runner (exec-stage protocol) and the
//! `model` / `doctor` commands. The only binary that loads libtorch.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("model") => recflow_ml::llm::cli::model_main(&args[1..]),
        Some("doctor") => recflow_ml::llm::cli::doctor_main(&args[1..]),
        _ => recflow::worker::run_args(&recflow_ml::builtin_registry(), &args),
    };
    std::process::exit(code);
}
