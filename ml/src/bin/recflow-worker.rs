//! `recflow-worker`: runs stages for the runner (exec-stage protocol) and the
//! `model` / `doctor` commands. The only binary that loads libtorch. Exit 2
//! from `exec-stage` also when the numerics profile in `RECFLOW_NUMERICS`
//! (set by the runner) is not the one in force.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("model") => recflow_ml::llm::cli::model_main(&args[1..]),
        Some("doctor") => recflow_ml::llm::cli::doctor_main(&args[1..]),
        // A stage runs only under the numerics profile the runner asked for.
        Some("exec-stage") => match recflow_ml::numerics::enforce_for_stage() {
            Ok(_) => recflow::worker::run_args(&recflow_ml::builtin_registry(), &args),
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
        _ => recflow::worker::run_args(&recflow_ml::builtin_registry(), &args),
    };
    std::process::exit(code);
}
