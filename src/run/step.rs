//! One stage run away from the runner — what a Slurm job (or a future
//! Kubernetes Job) executes: `recflow step`, torch-free, which prepares the
//! stage on the node, runs it through the same launcher as a local run
//! (`recflow-worker exec-stage` or `sh -c`, supervised), commits it and
//! hands the result back.
//!
//! * [`JobSpec`] — the stage as the node needs it: kind and run config (or
//!   shell command), its key and key inputs (for the run record), each
//!   input's content id, seed, device, numerics profile. Never an env
//!   value: `${env:VAR}` stays symbolic and the node reads VAR from its own
//!   environment (Slurm exports the submitter's), checked against the
//!   hash the key recorded.
//! * **Remote mode** (`recflow step --spec-id ID --remote URL`): the runner
//!   sends every input and then the spec to the remote by content
//!   ([`push_job`]; only what the remote lacks travels). The node fetches
//!   the spec (verified against its id), takes the key's remote lease,
//!   pulls the key's work dir (checkpoints of an earlier attempt), fetches
//!   the inputs (verified) into a scratch copy of the project tree, runs the
//!   stage, pushes the work dir at each checkpoint the stage reports, and at
//!   the end pushes the outputs and the run record (create-only: of two jobs
//!   of one key one record wins).
//! * **Shared file system** (`recflow step --spec PATH`): the spec names
//!   the project and store paths, which the node sees as the runner does;
//!   the step takes the key's file lock in that store and commits there.
//!
//! Exit codes: 0 committed (or already committed by another run), 1 the
//! stage failed, 2 a bad spec or settings, 130 stopped (scancel, time limit).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::engine::Engine;
use super::executor::{Executor, Local, StageJob};
use crate::cache::hash;
use crate::cache::key::StageKeyInputs;
use crate::cache::locks::FileLock;
use crate::cache::store::remove_any;
use crate::cache::{StatCache, Store};
use crate::pipeline::resolved::{Action, CmdPiece, InputRef, ShellOut};
use crate::pipeline::{Loc, Pipeline, ResolvedStage};
use crate::remote::{Acquire, LeaseWatch, Progress, PushOutcome, Remote, RemoteConfig, RemoteSpec};
use crate::stages::OutputSpec;

/// Version of the job spec format.
pub const JOB_SCHEMA: u32 = 1;

/// The key of a JSON object standing for a string with `${env:VAR}` pieces.
const ENV_MARK: &str = "$recflow_env";

/// A stage as a compute node needs it (module doc).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub schema: u32,
    pub pipeline: String,
    pub stage: String,
    pub key: String,
    pub key_inputs: StageKeyInputs,
    pub action: JobAction,
    /// Input name → one entry per source, in order.
    pub inputs: BTreeMap<String, Vec<JobInput>>,
    pub seed: u64,
    pub device: Option<String>,
    /// The pipeline's directory relative to the project root ("" when it is the root).
    pub dir: String,
    /// The pipeline's `worker:`, if any (it must exist at this path on the node).
    pub worker: Option<PathBuf>,
    /// VAR → sha256 of the value the runner saw (the node reads the value itself).
    pub env: BTreeMap<String, String>,
    /// Shared file system mode: where the runner's project and store are.
    pub shared: Option<SharedPaths>,
    /// The runner forced the stage (`--force`, `--from`): the node computes
    /// it even when the key is already committed (in the remote, or in the
    /// shared store), and the push then says whether the bytes agree.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedPaths {
    pub root: PathBuf,
    pub store: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum JobAction {
    Builtin {
        kind: String,
        version: u32,
        uses_device: bool,
        outputs: Vec<OutputSpec>,
        /// The run config, env values symbolic (strings holding one become
        /// `{"$recflow_env": [...]}`).
        config: Value,
    },
    Shell {
        cmd: Vec<CmdPiece>,
        /// Output name → path relative to the pipeline's directory.
        outs: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobInput {
    /// Content id (`sha256:…` or `tree:…`).
    pub id: String,
    /// Where the runner read it.
    pub path: PathBuf,
    /// The same path relative to the project root, when inside it: a shell
    /// stage's command may name it literally, so the node puts it there.
    pub rel: Option<String>,
}

impl JobSpec {
    /// The spec of a keyed stage (runner side).
    pub(crate) fn build(eng: &Engine, job: &StageJob, shared: bool) -> Result<JobSpec, String> {
        let stage = &job.stage;
        let root = &eng.p.root;
        let mut inputs = BTreeMap::new();
        for (name, paths) in &job.paths {
            let ids = job.ki.inputs.get(name).ok_or_else(|| format!("input `{name}` has no content id"))?;
            if ids.len() != paths.len() {
                return Err(format!("input `{name}`: {} paths for {} content ids", paths.len(), ids.len()));
            }
            let v = ids
                .iter()
                .zip(paths)
                .map(|(id, p)| JobInput { id: id.clone(), path: p.clone(), rel: p.strip_prefix(root).ok().map(|r| r.to_string_lossy().into_owned()) })
                .collect();
            inputs.insert(name.clone(), v);
        }
        let action = match &stage.action {
            Action::Builtin { kind, version, uses_device, outputs } => JobAction::Builtin {
                kind: kind.clone(),
                version: *version,
                uses_device: *uses_device,
                outputs: outputs.clone(),
                config: symbolic_env(&stage.config_run, &stage.env_values)?,
            },
            Action::Shell { cmd, outs } => JobAction::Shell { cmd: cmd.clone(), outs: outs.iter().map(|o| (o.name.clone(), o.rel.clone())).collect() },
        };
        Ok(JobSpec {
            schema: JOB_SCHEMA,
            pipeline: eng.p.name.clone(),
            stage: stage.name.clone(),
            key: job.key.clone(),
            key_inputs: job.ki.clone(),
            action,
            inputs,
            seed: stage.seed,
            device: stage.device.clone(),
            dir: eng.p.dir.strip_prefix(root).map(|d| d.to_string_lossy().into_owned()).unwrap_or_default(),
            worker: eng.p.worker.clone(),
            env: stage.env_hashes.clone(),
            shared: shared.then(|| SharedPaths { root: root.clone(), store: eng.store.dir.clone() }),
            force: job.force,
        })
    }
}

/// Replaces every env value inside the strings of `v` by a symbolic piece,
/// so no value leaves this machine; [`expand_env`] is the inverse. A false
/// match (a value that also occurs as plain text) round-trips to the same
/// string, since the node substitutes the same value back.
pub fn symbolic_env(v: &Value, env: &BTreeMap<String, String>) -> Result<Value, String> {
    let pats: Vec<(&String, &String)> = env.iter().filter(|(_, val)| !val.is_empty()).collect();
    if pats.is_empty() {
        return Ok(v.clone());
    }
    let ac = aho_corasick::AhoCorasick::builder()
        .match_kind(aho_corasick::MatchKind::LeftmostLongest)
        .build(pats.iter().map(|(_, val)| val.as_str()))
        .map_err(|e| e.to_string())?;
    fn walk(v: &Value, ac: &aho_corasick::AhoCorasick, pats: &[(&String, &String)]) -> Result<Value, String> {
        Ok(match v {
            Value::String(s) => {
                let mut pieces = Vec::new();
                let mut at = 0;
                for m in ac.find_iter(s) {
                    if m.start() > at {
                        pieces.push(Value::String(s[at..m.start()].to_string()));
                    }
                    pieces.push(serde_json::json!({ "env": pats[m.pattern().as_usize()].0 }));
                    at = m.end();
                }
                if at == 0 && pieces.is_empty() {
                    return Ok(v.clone());
                }
                if at < s.len() {
                    pieces.push(Value::String(s[at..].to_string()));
                }
                serde_json::json!({ ENV_MARK: pieces })
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| walk(x, ac, pats)).collect::<Result<_, _>>()?),
            Value::Object(o) => {
                if o.contains_key(ENV_MARK) {
                    return Err(format!("a config object holds the reserved key `{ENV_MARK}`"));
                }
                Value::Object(o.iter().map(|(k, x)| Ok((k.clone(), walk(x, ac, pats)?))).collect::<Result<_, String>>()?)
            }
            other => other.clone(),
        })
    }
    walk(v, &ac, &pats)
}

/// The inverse of [`symbolic_env`] with the node's values.
pub fn expand_env(v: &Value, values: &BTreeMap<String, String>) -> Result<Value, String> {
    Ok(match v {
        Value::Object(o) if o.len() == 1 && o.contains_key(ENV_MARK) => {
            let mut s = String::new();
            for p in o[ENV_MARK].as_array().ok_or("malformed env pieces")? {
                match p {
                    Value::String(t) => s.push_str(t),
                    Value::Object(e) => {
                        let var = e.get("env").and_then(Value::as_str).ok_or("malformed env piece")?;
                        s.push_str(values.get(var).ok_or_else(|| format!("env var `{var}` has no value on this node"))?);
                    }
                    _ => return Err("malformed env pieces".into()),
                }
            }
            Value::String(s)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| expand_env(x, values)).collect::<Result<_, _>>()?),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| Ok((k.clone(), expand_env(x, values)?))).collect::<Result<_, String>>()?),
        other => other.clone(),
    })
}

/// Sends a job to the remote (runner side): every input by content (only
/// what the remote lacks; each must still hash to the id its key used), then
/// the spec itself. Returns the spec's content id, which the job names.
pub(crate) async fn push_job(remote: &Remote, eng: &Engine, spec: &JobSpec) -> Result<String, String> {
    // A stat cache of our own: the engine's sits behind a lock not held across awaits.
    let mut sc = StatCache::load(&eng.store.dir);
    for (name, ins) in &spec.inputs {
        for inp in ins {
            let (id, _) = remote.push_content(&spec.key, &inp.path, &mut sc).await.map_err(|e| format!("sending input `{name}`: {e}"))?;
            if id != inp.id {
                return Err(format!("input `{name}` ({}) changed while the run was going (now {id}); rerun", inp.path.display()));
            }
        }
    }
    let tmp = eng.store.tmp_path("jobspec").map_err(|e| e.to_string())?;
    let text = serde_json::to_vec_pretty(spec).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, &text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let pushed = remote.push_content(&spec.key, &tmp, &mut sc).await;
    let _ = std::fs::remove_file(&tmp);
    Ok(pushed.map_err(|e| format!("sending the job spec: {e}"))?.0)
}

/// The `recflow step` arguments that name a remote (never a credential).
pub fn remote_args(r: &Remote) -> Vec<String> {
    let s = r.spec();
    let mut a = vec!["--remote".to_string(), s.url.clone()];
    if let Some(e) = &s.endpoint {
        a.extend(["--remote-endpoint".to_string(), e.clone()]);
    }
    if let Some(g) = &s.region {
        a.extend(["--remote-region".to_string(), g.clone()]);
    }
    a.extend(["--lease-s".to_string(), s.lease.as_secs_f64().to_string()]);
    a
}

/// Shared file system mode: writes the spec into the store (`jobs/KEY.json`).
pub(crate) fn write_shared_spec(eng: &Engine, spec: &JobSpec) -> Result<PathBuf, String> {
    let p = super::executor::slurm::shared_spec_path(&eng.store.dir, &spec.key);
    let text = serde_json::to_vec_pretty(spec).map_err(|e| e.to_string())?;
    crate::util::write_atomic(&p, &text).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

/// `recflow step` arguments.
#[derive(Debug, Clone, Default)]
pub struct StepArgs {
    /// The job spec's content id in the remote.
    pub spec_id: Option<String>,
    pub remote: Option<String>,
    pub remote_endpoint: Option<String>,
    pub remote_region: Option<String>,
    pub lease_s: Option<f64>,
    pub spec: Option<PathBuf>,
    pub progress_interval: Option<Duration>,
}

/// Why a step did not commit.
#[derive(Debug)]
pub enum StepError {
    /// Bad spec or settings (exit 2).
    Bad(String),
    /// The stage or a transfer failed (exit 1).
    Failed(String),
    /// Stopped by a signal (exit 130).
    Stopped(String),
}

impl StepError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StepError::Bad(_) => 2,
            StepError::Failed(_) => 1,
            StepError::Stopped(_) => 130,
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Bad(m) | StepError::Failed(m) | StepError::Stopped(m) => f.write_str(m),
        }
    }
}

/// `recflow step`: returns the process exit code.
pub fn main(args: StepArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(step(args)) {
        Ok(msg) => {
            eprintln!("recflow step: {msg}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn step(args: StepArgs) -> Result<String, StepError> {
    match (&args.spec_id, &args.spec) {
        (Some(id), None) => remote_step(&args, id).await,
        (None, Some(p)) => shared_step(&args, p).await,
        _ => Err(StepError::Bad("give either --spec-id ID with --remote URL, or --spec PATH (shared file system)".into())),
    }
}

/// The node's own store: `RECFLOW_CACHE`, which the job script sets.
fn node_store() -> Result<Store, StepError> {
    match std::env::var_os("RECFLOW_CACHE").filter(|v| !v.is_empty()) {
        Some(d) => {
            let d = PathBuf::from(d);
            std::fs::create_dir_all(&d).map_err(|e| StepError::Bad(format!("RECFLOW_CACHE {}: {e}", d.display())))?;
            Ok(Store::open(&d))
        }
        None => Err(StepError::Bad("RECFLOW_CACHE is not set: the job script names the node's store there".into())),
    }
}

fn read_spec_bytes(bytes: &[u8], what: &str) -> Result<JobSpec, StepError> {
    let spec: JobSpec = serde_json::from_slice(bytes).map_err(|e| StepError::Bad(format!("{what}: not a job spec of this recflow version: {e}")))?;
    if spec.schema != JOB_SCHEMA {
        return Err(StepError::Bad(format!("{what}: job spec schema {} (this recflow reads {JOB_SCHEMA}): use the same recflow on the nodes as on the runner", spec.schema)));
    }
    let k = spec.key_inputs.key().map_err(|e| StepError::Bad(e.to_string()))?;
    if k != spec.key {
        return Err(StepError::Bad(format!("{what}: its key inputs hash to {k}, not to its key {}", spec.key)));
    }
    Ok(spec)
}

/// The env values of a spec from this process's environment, each checked
/// against the hash the runner keyed.
fn node_env(spec: &JobSpec) -> Result<BTreeMap<String, String>, StepError> {
    let mut out = BTreeMap::new();
    for (var, want) in &spec.env {
        match std::env::var(var) {
            Ok(v) if &hash::sha256_hex(v.as_bytes()) == want => {
                out.insert(var.clone(), v);
            }
            Ok(_) => {
                return Err(StepError::Bad(format!(
                    "env var `{var}` has another value on this node than where the run was started; export the same value to jobs (sbatch's default --export=ALL passes the submitter's)"
                )))
            }
            Err(_) if want == "unset" => {}
            Err(_) => return Err(StepError::Bad(format!("env var `{var}` is not set on this node; sbatch's default --export=ALL passes it from the submitting shell"))),
        }
    }
    Ok(out)
}

/// The stage of a spec with its inputs at `paths`, in a project whose root
/// is `root` (the node's scratch copy, or the shared project).
fn resolved_stage(spec: &JobSpec, root: &Path, paths: &BTreeMap<String, Vec<PathBuf>>, env: BTreeMap<String, String>) -> Result<(ResolvedStage, PathBuf), StepError> {
    let dir = if spec.dir.is_empty() { root.to_path_buf() } else { root.join(&spec.dir) };
    let inputs = paths
        .iter()
        .map(|(n, ps)| (n.clone(), ps.iter().map(|p| InputRef::Path { abs: p.clone(), shown: p.to_string_lossy().into_owned() }).collect()))
        .collect();
    let (action, config_run) = match &spec.action {
        JobAction::Builtin { kind, version, uses_device, outputs, config } => {
            let mut cfg = expand_env(config, &env).map_err(StepError::Bad)?;
            // Path-valued `with:` fields reach the stage through its config:
            // point them at where this node put their content.
            for (name, ins) in &spec.inputs {
                let Some(field) = name.strip_prefix("with.") else { continue };
                if let (Some(v), Some(new)) = (cfg.get_mut(field), paths.get(name)) {
                    for (inp, np) in ins.iter().zip(new) {
                        replace_str(v, &inp.path.to_string_lossy(), &np.to_string_lossy());
                    }
                }
            }
            (Action::Builtin { kind: kind.clone(), version: *version, uses_device: *uses_device, outputs: outputs.clone() }, cfg)
        }
        JobAction::Shell { cmd, outs } => (
            Action::Shell { cmd: cmd.clone(), outs: outs.iter().map(|(n, r)| ShellOut { name: n.clone(), rel: r.clone(), abs: crate::pipeline::normalize(&dir.join(r)) }).collect() },
            Value::Null,
        ),
    };
    let st = ResolvedStage {
        name: spec.stage.clone(),
        base: spec.stage.clone(),
        loc: Loc { file: dir.join("job.json"), pos: Default::default() },
        matrix: BTreeMap::new(),
        action,
        inputs,
        config_key: spec.key_inputs.config.clone(),
        config_run,
        env_hashes: spec.env.clone(),
        env_values: env,
        seed: spec.seed,
        device: spec.device.clone(),
        resources: Default::default(),
        deps: vec![],
        model_inputs: BTreeMap::new(),
        positions: BTreeMap::new(),
    };
    Ok((st, dir))
}

/// Replaces every string equal to `from` inside `v`.
fn replace_str(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::String(s) if s == from => *s = to.to_string(),
        Value::Array(a) => a.iter_mut().for_each(|x| replace_str(x, from, to)),
        Value::Object(o) => o.values_mut().for_each(|x| replace_str(x, from, to)),
        _ => {}
    }
}

/// The engine of a one-stage pipeline on this node.
fn node_engine(spec: &JobSpec, stage: ResolvedStage, root: PathBuf, dir: PathBuf, store: Store, args: &StepArgs) -> Engine {
    let p = Pipeline {
        name: spec.pipeline.clone(),
        file: dir.join("job.json"),
        dir,
        root,
        params: Value::Null,
        worker: spec.worker.clone(),
        stages: vec![stage],
        warnings: vec![],
    };
    let mut eng = Engine::new(p, store, false);
    eng.write_lock = false;
    eng.progress_interval = args.progress_interval;
    eng
}

/// Runs the stage through the local launcher and commits it to the
/// engine's store; SIGTERM/SIGINT (scancel, a time limit) and a lost lease
/// stop it (the work dir stays for the next attempt).
async fn run_here(eng: &Arc<Engine>, spec: &JobSpec, paths: BTreeMap<String, Vec<PathBuf>>, lock: FileLock, lost: Option<&crate::remote::LeaseKeeper>) -> Result<(), StepError> {
    let job = StageJob { stage: eng.p.stages[0].clone(), key: spec.key.clone(), ki: spec.key_inputs.clone(), paths, lock, force: spec.force, gpu_ids: vec![] };
    let e2 = eng.clone();
    let mut task = tokio::spawn(async move { Local.run(&e2, job).await });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| StepError::Failed(e.to_string()))?;
    let mut stop_why: Option<String> = None;
    let res = loop {
        tokio::select! {
            r = &mut task => break r.map_err(|e| StepError::Failed(format!("stage task: {e}")))?,
            _ = term.recv(), if stop_why.is_none() => stop_why = Some("stopped by SIGTERM (scancel or the time limit)".into()),
            _ = tokio::signal::ctrl_c(), if stop_why.is_none() => stop_why = Some("stopped by SIGINT".into()),
            why = async { match lost { Some(k) => k.lost().await, None => std::future::pending().await } }, if stop_why.is_none() => {
                stop_why = Some(format!("lost the key's lease: {why}"));
            }
        }
        if stop_why.is_some() && !eng.cancel.swap(true, Ordering::SeqCst) {
            Local.cancel(eng);
        }
    };
    match (res, stop_why) {
        (Ok(_), _) => Ok(()),
        (Err(_), Some(why)) => Err(StepError::Stopped(why)),
        (Err(msg), None) => Err(StepError::Failed(format!("stage `{}` failed: {msg}", spec.stage))),
    }
}

async fn remote_step(args: &StepArgs, spec_id: &str) -> Result<String, StepError> {
    let url = args.remote.clone().ok_or_else(|| StepError::Bad("--spec-id needs --remote URL".into()))?;
    let cfg = RemoteConfig { url, endpoint: args.remote_endpoint.clone(), region: args.remote_region.clone(), lease_s: args.lease_s, jobs: None };
    let rspec = RemoteSpec::resolve(Some(&cfg), None, Path::new("recflow step --remote"))
        .map_err(|e| StepError::Bad(e.to_string()))?
        .ok_or_else(|| StepError::Bad("no remote given".into()))?;
    let remote = Remote::open(&rspec).map_err(|e| StepError::Bad(e.to_string()))?;
    let store = node_store()?;
    // 1. The spec, verified against its content id.
    let scratch = store.tmp_dir().join(format!("job-{}-{}", hash::hex_of(spec_id).get(..16).unwrap_or("x"), std::process::id()));
    let spec_path = scratch.join("spec.json");
    match remote.fetch_content(spec_id, &spec_path).await.map_err(|e| StepError::Failed(e.to_string()))? {
        Some(_) => {}
        None => return Err(StepError::Failed(format!("job spec {spec_id} is not (intact) in the remote (removed by `gc --remote`?); rerun `recflow run`"))),
    }
    let bytes = std::fs::read(&spec_path).map_err(|e| StepError::Failed(format!("{}: {e}", spec_path.display())))?;
    let spec = read_spec_bytes(&bytes, &format!("job spec {spec_id}"))?;
    let env = node_env(&spec)?;
    let key = spec.key.clone();
    // 2. The key's lease: one job per key across machines.
    if !spec.force && remote.has_record(&key).await.map_err(|e| StepError::Failed(e.to_string()))? {
        return Ok(format!("key {key} is already committed in the remote; nothing to do"));
    }
    let holder = crate::remote::lease::holder_id();
    let mut watch = LeaseWatch::default();
    let mut said = false;
    let lease = loop {
        match remote.try_lease(&key, &holder, &mut watch).await.map_err(|e| StepError::Failed(e.to_string()))? {
            Acquire::Acquired(l) => break l,
            Acquire::Held { holder } => {
                if !said {
                    eprintln!("recflow step: key {key} is being built by {holder}; waiting for its record or its lease to lapse");
                    said = true;
                }
                tokio::time::sleep(rspec.lease / 3).await;
                if !spec.force && remote.has_record(&key).await.map_err(|e| StepError::Failed(e.to_string()))? {
                    return Ok(format!("key {key} was committed by {holder} meanwhile; nothing to do"));
                }
            }
        }
    };
    let keeper = lease.keep();
    let res = remote_step_leased(args, &remote, &store, &spec, env, &keeper, &scratch).await;
    keeper.release().await;
    remove_any(&scratch);
    res
}

/// The part of a remote step run under the key's lease.
async fn remote_step_leased(
    args: &StepArgs,
    remote: &Remote,
    store: &Store,
    spec: &JobSpec,
    env: BTreeMap<String, String>,
    keeper: &crate::remote::LeaseKeeper,
    scratch: &Path,
) -> Result<String, StepError> {
    let key = &spec.key;
    let bad = |e: String| StepError::Failed(e);
    // 3. Inputs, verified, laid out in a scratch copy of the project tree.
    let root = scratch.join("root");
    let mut paths: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let shell = matches!(spec.action, JobAction::Shell { .. });
    for (name, ins) in &spec.inputs {
        let mut v = Vec::new();
        for (i, inp) in ins.iter().enumerate() {
            let file = inp.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "input".into());
            let at = match (&inp.rel, shell) {
                (Some(rel), true) => root.join(rel),
                _ => scratch.join("inputs").join(name).join(i.to_string()).join(file),
            };
            match remote.fetch_content(&inp.id, &at).await.map_err(|e| bad(format!("input `{name}`: {e}")))? {
                Some(_) => {}
                None => return Err(bad(format!("input `{name}` ({}) is not (intact) in the remote; rerun `recflow run` to send it again", inp.id))),
            }
            v.push(at);
        }
        paths.insert(name.clone(), v);
    }
    let (stage, dir) = resolved_stage(spec, &root, &paths, env)?;
    std::fs::create_dir_all(&dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    // 4. Checkpoints of an earlier attempt (on any machine).
    let work = store.work_dir(key);
    match remote.pull_workdir(key, &work).await {
        Ok(Some(s)) if s.files > 0 => eprintln!("recflow step: resuming key {key} from the remote's checkpoints ({} files)", s.files),
        Ok(_) => {}
        Err(e) => return Err(bad(format!("pulling the work dir: {e}"))),
    }
    let mut eng = node_engine(spec, stage, root, dir, store.clone(), args);
    let notify = Arc::new(tokio::sync::Notify::new());
    eng.checkpoints = Some(notify.clone());
    let eng = Arc::new(eng);
    // 5. Every checkpoint the stage reports goes to the remote at once.
    let sync = {
        let (r, k, w, d) = (remote.clone(), key.clone(), work.clone(), store.dir.clone());
        tokio::spawn(async move {
            let mut sc = StatCache::load(&d);
            loop {
                notify.notified().await;
                if let Err(e) = r.push_workdir(&k, &w, &mut sc).await {
                    eprintln!("recflow step: warning: pushing the checkpoint to the remote failed: {e}");
                }
            }
        })
    };
    let lp = store.lock_path(key);
    let lock = tokio::task::spawn_blocking(move || FileLock::exclusive(&lp)).await.map_err(|e| bad(e.to_string()))?.map_err(|e| bad(format!("key lock: {e}")))?;
    let res = run_here(&eng, spec, paths, lock, Some(keeper)).await;
    sync.abort();
    eng.sc().save();
    match res {
        Ok(()) => {
            // 6. Outputs, then the record (create-only).
            let pushed = remote.push_key(store, key, &Progress::hidden()).await.map_err(|e| bad(format!("pushing the outputs: {e}")))?;
            if let Err(e) = remote.drop_workdir(key).await {
                eprintln!("recflow step: warning: could not remove the remote work dir pointer: {e}");
            }
            Ok(match pushed {
                PushOutcome::Pushed { objects, bytes } => format!("committed key {key} ({objects} objects, {bytes} bytes pushed)"),
                PushOutcome::AlreadyThere { .. } => format!("key {key} was already committed in the remote"),
                PushOutcome::Differs { .. } => format!("key {key}: another run's record won (its outputs differ from ours; the stage is not deterministic)"),
            })
        }
        Err(e) => {
            // What the stage saved while stopping is the next attempt's start.
            let mut sc = StatCache::load(&store.dir);
            if work.is_dir() {
                if let Err(pe) = remote.push_workdir(key, &work, &mut sc).await {
                    eprintln!("recflow step: warning: pushing the work dir after the failure: {pe}");
                }
            }
            Err(e)
        }
    }
}

async fn shared_step(args: &StepArgs, path: &Path) -> Result<String, StepError> {
    let bytes = std::fs::read(path).map_err(|e| StepError::Bad(format!("{}: {e}", path.display())))?;
    let spec = read_spec_bytes(&bytes, &path.display().to_string())?;
    let shared = spec.shared.clone().ok_or_else(|| StepError::Bad(format!("{}: not a shared file system job spec", path.display())))?;
    let env = node_env(&spec)?;
    let store = Store::open(&shared.store);
    let key = spec.key.clone();
    let lp = store.lock_path(&key);
    let lock = tokio::task::spawn_blocking(move || FileLock::exclusive(&lp))
        .await
        .map_err(|e| StepError::Failed(e.to_string()))?
        .map_err(|e| StepError::Failed(format!("key lock: {e}")))?;
    if !spec.force && store.read_record(&key).is_some() {
        return Ok(format!("key {key} is already committed; nothing to do"));
    }
    let paths: BTreeMap<String, Vec<PathBuf>> = spec.inputs.iter().map(|(n, v)| (n.clone(), v.iter().map(|i| i.path.clone()).collect())).collect();
    let (stage, dir) = resolved_stage(&spec, &shared.root, &paths, env)?;
    let eng = Arc::new(node_engine(&spec, stage, shared.root.clone(), dir, store, args));
    let t0 = Instant::now();
    run_here(&eng, &spec, paths, lock, None).await?;
    eng.sc().save();
    let _ = std::fs::remove_file(path);
    Ok(format!("committed key {key} in {} ({:.1}s)", shared.store.display(), t0.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_never_leave_and_come_back_exactly() {
        let env: BTreeMap<String, String> = [("TOKEN".to_string(), "s3cret".to_string()), ("HOST".to_string(), "h".to_string())].into();
        let cfg = serde_json::json!({"url": "https://s3cret@x/h", "n": 3, "list": ["s3cret", "plain"], "literal": "${env:TOKEN}"});
        let sym = symbolic_env(&cfg, &env).unwrap();
        let text = sym.to_string();
        assert!(!text.contains("s3cret"), "no env value in what is shipped: {text}");
        assert_eq!(expand_env(&sym, &env).unwrap(), cfg, "the node rebuilds the exact config (also a false match on `h` and a literal `${{env:…}}`)");
        assert_eq!(symbolic_env(&cfg, &BTreeMap::new()).unwrap(), cfg, "no env: unchanged");
        let e = expand_env(&sym, &BTreeMap::new()).unwrap_err();
        assert!(e.contains("env var `") && e.contains("has no value on this node"), "a value missing on the node is named: {e}");
    }
}
