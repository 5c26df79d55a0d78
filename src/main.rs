//! `recflow`: the torch-free runner and CLI. Parses arguments, calls the
//! library, maps errors to exit codes (2 = bad input, 1 = a stage failed or
//! a check found a difference, 130 = interrupted). Never loads libtorch:
//! `model` and `doctor` exec the `recflow-worker` binary.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use recflow::pipeline::graph::DagFormat;
use recflow::pipeline::{self, Options};
use recflow::run::exec::{self, RunOptions};
use recflow::run::plan::Selection;
use recflow::run::RunError;

#[derive(Parser)]
#[command(name = "recflow", version, about = "Declarative, cached pipelines for RecZero / RecOne recommenders")]
struct Cli {
    /// Log format of the runner's own logs (`RUST_LOG` sets the level).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Numerics profile of the workers (overrides RECFLOW_NUMERICS): a comma
    /// list `aten=avx2,mkl=compatible,threads=2`, omitted fields default
    /// (docs/engine.md "Numerics profile").
    #[arg(long, global = true, value_name = "PROFILE")]
    numerics: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// How to read a pipeline: the file plus overrides.
#[derive(Args, Clone)]
struct PipelineArgs {
    /// Pipeline YAML file.
    pipeline: PathBuf,
    /// Override a value: `params.a.b=1` or `stages.NAME.with.k=v` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    sets: Vec<String>,
    /// YAML file of params merged over the pipeline's `params:`.
    #[arg(long = "params", value_name = "FILE")]
    params_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run (or reuse) the pipeline's stages.
    Run {
        #[command(flatten)]
        p: PipelineArgs,
        /// Stages run at once (default: 2 on this machine); model stages on
        /// the CPU still take turns for the cores (`resources.cpus`).
        #[arg(long, short = 'j')]
        jobs: Option<usize>,
        /// Run only these stages (their upstream must be cached).
        #[arg(long)]
        only: Vec<String>,
        /// Rerun these stages and everything downstream of them.
        #[arg(long)]
        from: Vec<String>,
        /// Rerun these stages even when cached.
        #[arg(long)]
        force: Vec<String>,
        /// Keep running independent stages after a failure.
        #[arg(long)]
        keep_going: bool,
        /// Print the plan and validate everything without running.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: absent external inputs and env vars are warnings.
        #[arg(long, requires = "dry_run")]
        allow_missing: bool,
        /// GPUs to schedule (default: /dev/nvidiaN count).
        #[arg(long)]
        gpus: Option<u32>,
        /// No progress bars or end-of-run table.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Seconds between plain progress lines of each running stage
        /// (printed without a terminal, always appended to the stage's log); 0: none.
        #[arg(long, value_name = "SECONDS", default_value_t = recflow::run::progress::DEFAULT_INTERVAL_S)]
        progress_interval: f64,
        /// Where stages run: `local` (child processes here) or `slurm` (one
        /// sbatch job per stage); default: `[executor] kind` in recflow.toml, else local.
        #[arg(long, value_name = "local|slurm")]
        executor: Option<String>,
    },
    /// Print the stage graph.
    Dag {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Each stage up to date or stale against the lock file, and why.
    Status {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long)]
        json: bool,
        /// Exit 1 when anything is stale (the CI gate).
        #[arg(long)]
        check: bool,
    },
    /// Why a stage would run: field-by-field diff of its key inputs against the last run.
    Explain {
        #[command(flatten)]
        p: PipelineArgs,
        stage: String,
    },
    /// Re-execute stages into a scratch store and compare output hashes with the lock.
    Verify {
        #[command(flatten)]
        p: PipelineArgs,
        /// Stages to verify (default: all).
        #[arg(long)]
        stage: Vec<String>,
        /// Compare numbers in JSON outputs within this relative tolerance instead of bytes.
        #[arg(long)]
        tolerance: Option<f64>,
    },
    /// Remove store entries nothing keeps (see docs/engine.md for the rules).
    Gc {
        /// Project root (default: found from the current directory).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Keep run records and failed attempts' work dirs newer than this.
        #[arg(long, default_value_t = 30.0)]
        keep_days: f64,
        /// Also remove the teacher response cache.
        #[arg(long, conflicts_with = "remote")]
        responses: bool,
        /// Collect the remote store instead of the local one (docs/remote.md).
        #[arg(long)]
        remote: bool,
        #[arg(long)]
        dry_run: bool,
    },
    /// Send the keys a lock file names (default: every lock file of the
    /// project) from the local store to the remote store (docs/remote.md).
    Push(SyncArgs),
    /// Fetch the keys a lock file names (default: every lock file of the
    /// project) from the remote store, verified, and put their outputs in place.
    Pull(SyncArgs),
    /// Store maintenance.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Model commands (run by the recflow-worker binary).
    #[command(disable_help_flag = true)]
    Model {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Environment facts (runner side here, then the worker's).
    Doctor {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Metrics table of every eval stage and baseline method (with 95%
    /// intervals; matrix seeds as mean ± interval), plus timings and cache state.
    Show {
        /// Pipeline YAML file (its lock file is read).
        pipeline: PathBuf,
        /// Print the pinned JSON shape instead of the table (= --format json).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// text (tables with timings), json (the pinned shape) or markdown
        /// (the methods table from the lock alone, as the README embeds it).
        #[arg(long, value_enum, default_value_t = recflow::report::show::Format::Text)]
        format: recflow::report::show::Format,
        /// Compare metrics with another lock file or a git revision's lock.
        #[arg(long, value_name = "LOCK_OR_GIT_REV")]
        diff: Option<String>,
    },
    /// Regenerates the results tables of a Markdown file from the locks its
    /// `<!-- results: LOCK -->` … `<!-- /results -->` blocks name; with
    /// --check, prints a diff and exits 1 when a block differs instead.
    Readme {
        /// Markdown file (lock paths in it are relative to its directory).
        #[arg(default_value = "README.md")]
        file: PathBuf,
        #[arg(long)]
        check: bool,
    },
    /// Runs one stage on this machine from a job spec: what a Slurm job
    /// executes on a compute node (torch-free; it starts recflow-worker).
    Step {
        /// The job spec's content id in the remote (with --remote).
        #[arg(long, requires = "remote", conflicts_with = "spec")]
        spec_id: Option<String>,
        /// The remote store's URL (s3://BUCKET/PREFIX or file:///PATH).
        #[arg(long)]
        remote: Option<String>,
        /// S3 endpoint of the remote (S3-compatible services).
        #[arg(long, requires = "remote")]
        remote_endpoint: Option<String>,
        #[arg(long, requires = "remote")]
        remote_region: Option<String>,
        /// Lifetime of the key's remote lease, seconds.
        #[arg(long, requires = "remote")]
        lease_s: Option<f64>,
        /// A job spec on a shared file system (instead of --spec-id).
        #[arg(long)]
        spec: Option<PathBuf>,
        #[arg(long, value_name = "SECONDS", default_value_t = recflow::run::progress::DEFAULT_INTERVAL_S)]
        progress_interval: f64,
    },
    /// Internal: supervises one stage process (see run::supervise).
    #[command(name = "__supervise", hide = true)]
    Supervise {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Arguments of push and pull.
#[derive(Args, Clone)]
struct SyncArgs {
    /// Pipeline YAML file (its lock file is read); default: every lock file of the project.
    pipeline: Option<PathBuf>,
    /// Parallel transfers (default: `[remote] jobs` in recflow.toml, else 8).
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, default_value_t = 5.0)]
    progress_interval: f64,
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Rehash every object; report and remove corrupt ones.
    Verify {
        #[arg(long)]
        root: Option<PathBuf>,
    },
}

fn load(p: &PipelineArgs, allow_missing: bool, recorded_devices: bool) -> Result<pipeline::Pipeline, RunError> {
    load_with(p, allow_missing, recorded_devices, false)
}

fn load_with(p: &PipelineArgs, allow_missing: bool, recorded_devices: bool, on_cluster: bool) -> Result<pipeline::Pipeline, RunError> {
    let mut opts = Options { sets: p.sets.clone(), params_file: p.params_file.clone(), allow_missing, on_cluster, ..Default::default() };
    if recorded_devices {
        // status/explain on another machine: `device: auto` means what the lock recorded.
        if let Ok(l) = recflow::lock::LockFile::read(&recflow::lock::lock_path(&p.pipeline)) {
            for (name, st) in &l.stages {
                if let Some(d) = &st.key_inputs.device {
                    opts.recorded_devices.insert(name.clone(), d.clone());
                }
            }
        }
    }
    Ok(pipeline::load(&p.pipeline, &opts)?)
}

fn root_of(root: Option<PathBuf>) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    root.unwrap_or_else(|| pipeline::project_root(&cwd))
}

/// Execs the worker with the given arguments (model / doctor), under the
/// numerics profile stages get.
fn exec_worker(args: &[String], numerics: &recflow::numerics::Resolved) -> ExitCode {
    let w = recflow::run::worker_path(None);
    let mut cmd = std::process::Command::new(&w);
    numerics.apply(&mut cmd);
    match cmd.args(args).status() {
        Ok(s) => ExitCode::from(s.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!(
                "error: cannot start the worker {}: {e} (build it with `cargo build -p recflow-ml --bin recflow-worker`, or set RECFLOW_WORKER)",
                w.display()
            );
            ExitCode::from(2)
        }
    }
}

fn init_logging(fmt: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match fmt {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

fn real_main(cli: Cli) -> Result<i32, RunError> {
    match cli.cmd {
        Cmd::Run { p, jobs, only, from, force, keep_going, dry_run, allow_missing, gpus, quiet, progress_interval, executor } => {
            let sel = Selection { only, from, force };
            let pdir = std::path::absolute(&p.pipeline).ok().and_then(|f| f.parent().map(PathBuf::from)).unwrap_or_default();
            let (kind, ecfg) = recflow::run::executor::kind_of(&pipeline::project_root(&pdir), executor.as_deref())?;
            let on_cluster = kind != recflow::run::executor::ExecutorKind::Local;
            if dry_run {
                let pl = load_with(&p, allow_missing, false, on_cluster)?;
                let (plan, errors) = exec::dry_run(&pl, &sel, allow_missing)?;
                print!("{plan}");
                for e in &errors {
                    eprintln!("error: {e}");
                }
                return Ok(if errors.is_empty() { 0 } else { 2 });
            }
            let pl = load_with(&p, false, false, on_cluster)?;
            for w in &pl.warnings {
                eprintln!("warning: {w}");
            }
            let quiet = quiet || matches!(cli.log_format, LogFormat::Json);
            let progress_interval = recflow::run::progress::interval(progress_interval).map_err(RunError::BadInput)?;
            let executor = recflow::run::executor::choose(&pl, kind, &ecfg, progress_interval)?;
            let opts = RunOptions { jobs, sel, keep_going, gpus, quiet, progress_interval, executor };
            let summary = exec::run(pl, &opts)?;
            if !quiet {
                print!("{}", summary.table());
            }
            let failed = summary.failed();
            if failed.is_empty() {
                Ok(0)
            } else {
                for r in failed {
                    if let exec::Outcome::Failed(m) = &r.outcome {
                        eprintln!("error: stage `{}` failed: {m}", r.stage);
                    }
                }
                Ok(1)
            }
        }
        Cmd::Dag { p, format } => {
            let pl = load(&p, true, false)?;
            print!("{}", pipeline::graph::render(&pl, format));
            Ok(0)
        }
        Cmd::Status { p, json, check } => {
            let pl = load(&p, true, true)?;
            let st = recflow::run::status::status(&pl)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
            } else {
                print!("{}", st.text());
            }
            Ok(if check && st.stale() > 0 { 1 } else { 0 })
        }
        Cmd::Explain { p, stage } => {
            let pl = load(&p, true, true)?;
            print!("{}", recflow::run::status::explain(&pl, &stage)?);
            Ok(0)
        }
        Cmd::Verify { p, stage, tolerance } => {
            let pl = load(&p, false, false)?;
            let v = recflow::run::verify::verify(pl, &stage, tolerance)?;
            for n in &v.notes {
                println!("note: {n}");
            }
            let diffs = v.diffs;
            if diffs.is_empty() {
                println!("verify: all outputs match the lock");
                return Ok(0);
            }
            for d in &diffs {
                println!("DIFFERS {}.{}: lock {} vs rerun {}", d.stage, d.output, d.locked, d.got);
            }
            Ok(1)
        }
        Cmd::Gc { root, keep_days, responses: _, remote: true, dry_run } => {
            let root = root_of(root);
            let Some(remote) = recflow::remote::Remote::from_project(&root)? else {
                return Err(RunError::BadInput(format!(
                    "gc --remote: no remote configured (set {} or `[remote] url` in {})",
                    recflow::remote::REMOTE_ENV,
                    recflow::config::config_path(&root).display()
                )));
            };
            let r = recflow::run::gc::gc_remote(&remote, keep_days, dry_run)?;
            println!(
                "{} {}: {}removed {} run records, {} work dir pointers, {} objects ({:.1} MB), {} dead leases; kept what {} pushed lock files and {} live leases reference",
                "gc --remote",
                remote.url(),
                if dry_run { "would have " } else { "" },
                r.records_removed,
                r.work_removed,
                r.objects_removed,
                r.bytes_freed as f64 / 1e6,
                r.leases_removed,
                r.roots,
                r.leased
            );
            Ok(0)
        }
        Cmd::Push(a) | Cmd::Pull(a) if !(a.progress_interval.is_finite() && a.progress_interval > 0.0) => {
            Err(RunError::BadInput(format!("--progress-interval {}: a positive number of seconds", a.progress_interval)))
        }
        Cmd::Push(a) => {
            let opts = recflow::run::sync::SyncOptions { jobs: a.jobs, interval: std::time::Duration::from_secs_f64(a.progress_interval) };
            let r = recflow::run::sync::push(a.pipeline.as_deref(), &opts)?;
            Ok(sync_report(&r, "pushed"))
        }
        Cmd::Pull(a) => {
            let opts = recflow::run::sync::SyncOptions { jobs: a.jobs, interval: std::time::Duration::from_secs_f64(a.progress_interval) };
            let r = recflow::run::sync::pull(a.pipeline.as_deref(), &opts)?;
            Ok(sync_report(&r, "pulled"))
        }
        Cmd::Gc { root, keep_days, responses, remote: false, dry_run } => {
            let root = root_of(root);
            let store = recflow::cache::Store::open(&recflow::cache::store_dir(&root));
            let r = recflow::run::gc::gc(&root, &store, keep_days, responses, dry_run)?;
            println!(
                "{}removed {} run records, {} objects ({:.1} MB), {} work dirs; kept what {} lock files reference{} (the remote store is untouched: `gc --remote`)",
                if dry_run { "would have " } else { "" },
                r.records_removed,
                r.objects_removed,
                r.bytes_freed as f64 / 1e6,
                r.work_dirs_removed,
                r.roots,
                if r.stale_roots > 0 { format!(", dropped {} registered lock files that no longer exist", r.stale_roots) } else { String::new() }
            );
            Ok(0)
        }
        Cmd::Cache { cmd: CacheCmd::Verify { root } } => {
            let store = recflow::cache::Store::open(&recflow::cache::store_dir(&root_of(root)));
            let bad = recflow::run::gc::cache_verify(&store)?;
            if bad.is_empty() {
                println!("cache verify: {} objects intact", store.all_objects().len());
                Ok(0)
            } else {
                for b in &bad {
                    println!("CORRUPT {b} (removed; stages using it will rerun)");
                }
                Ok(1)
            }
        }
        Cmd::Model { .. } | Cmd::Doctor { .. } | Cmd::Supervise { .. } | Cmd::Show { .. } | Cmd::Readme { .. } | Cmd::Step { .. } => {
            unreachable!("dispatched in main")
        }
    }
}

/// Prints a push/pull report (notes and failures to stderr, the summary to
/// stdout); 1 when a key could not be moved.
fn sync_report(r: &recflow::run::sync::SyncReport, verb: &str) -> i32 {
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    for f in &r.failed {
        eprintln!("error: {f}");
    }
    println!("{}", r.summary(verb));
    if r.failed.is_empty() {
        0
    } else {
        1
    }
}

fn doctor_facts(numerics: &recflow::numerics::Resolved) {
    let cwd = std::env::current_dir().unwrap_or_default();
    let root = pipeline::project_root(&cwd);
    println!("recflow {} (runner, torch-free)", env!("CARGO_PKG_VERSION"));
    println!("project root: {}", root.display());
    println!("store: {}", recflow::cache::store_dir(&root).display());
    match recflow::remote::RemoteSpec::from_project(&root) {
        Ok(Some(r)) => println!("remote: {} (from {}; lease {:.0} s, {} parallel transfers)", r.url, r.source, r.lease.as_secs_f64(), r.jobs),
        Ok(None) => println!("remote: none (set {} or [remote] url in recflow.toml)", recflow::remote::REMOTE_ENV),
        Err(e) => println!("remote: ERROR {e}"),
    }
    let w = recflow::run::worker_path(None);
    println!("worker: {} ({})", w.display(), if w.is_file() { "found" } else { "NOT FOUND" });
    println!("device auto → {} ({} NVIDIA device nodes)", pipeline::resolve_auto_device(), pipeline::gpu_count());
    println!("cpus: {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let cpu = recflow::numerics::Cpu::read();
    println!("cpu: {} \"{}\" (ATen's best here: {})", cpu.vendor, cpu.model, cpu.best_aten());
    println!(
        "numerics requested: {numerics} ({}); the worker below reports what is in force",
        if std::env::var_os(recflow::numerics::ENV).is_some() { "RECFLOW_NUMERICS / --numerics" } else { "the default profile" }
    );
    let kinds: Vec<&str> = recflow::stages::meta::builtin().iter().map(|m| m.kind).collect();
    println!("built-in stage kinds: {}", if kinds.is_empty() { "(none yet)".into() } else { kinds.join(", ") });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = &cli.numerics {
        // Before any thread exists; every later reader (the engine) sees it.
        std::env::set_var(recflow::numerics::ENV, n);
    }
    let numerics = match recflow::numerics::Request::from_env() {
        Ok(r) => r.resolve(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match &cli.cmd {
        Cmd::Supervise { args } => return ExitCode::from(recflow::run::supervise::main(args).clamp(0, 255) as u8),
        Cmd::Step { spec_id, remote, remote_endpoint, remote_region, lease_s, spec, progress_interval } => {
            let progress_interval = match recflow::run::progress::interval(*progress_interval) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let args = recflow::run::step::StepArgs {
                spec_id: spec_id.clone(),
                remote: remote.clone(),
                remote_endpoint: remote_endpoint.clone(),
                remote_region: remote_region.clone(),
                lease_s: *lease_s,
                spec: spec.clone(),
                progress_interval,
            };
            return ExitCode::from(recflow::run::step::main(args).clamp(0, 255) as u8);
        }
        Cmd::Model { args } => {
            let mut a = vec!["model".to_string()];
            a.extend(args.iter().cloned());
            return exec_worker(&a, &numerics);
        }
        Cmd::Show { pipeline, json, format, diff } => {
            let format = if *json { recflow::report::show::Format::Json } else { *format };
            return match recflow::report::show::show(pipeline, format, diff.as_deref()) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Cmd::Readme { file, check } => {
            return match recflow::report::readme::run(file, *check) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Cmd::Doctor { args } => {
            doctor_facts(&numerics);
            let mut a = vec!["doctor".to_string()];
            a.extend(args.iter().cloned());
            return exec_worker(&a, &numerics);
        }
        _ => {}
    }
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
