//! The Stage contract (ARCHITECTURE "The Stage contract") and the registries.
//!
//! * [`StageDef`] — what the runner needs to validate, key and plan a stage
//!   without starting a worker: kind, implementation version, config type,
//!   inputs, outputs, operational and path-valued fields. Torch-free.
//! * [`Stage`] — a `StageDef` that can also `run`. Torch-free built-in stages
//!   implement it here; libtorch stages (sft, grpo, eval, model_*) have their
//!   `StageDef` here and their run function in `recflow-ml`, registered with
//!   [`Registry::with_run`].
//! * [`meta::builtin`] — metadata of every built-in kind, for the runner.
//! * [`Registry`] — kind → metadata + run function, for a worker
//!   (`recflow::worker::main(registry)`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod filter;
pub mod ingest;
pub mod meta;
pub mod model_files;
pub mod prompts;
pub mod split;
pub mod baselines;
pub mod eval;
pub mod report;
pub mod teacher;
pub mod model_import;
pub mod model_init;
pub mod grpo;
pub mod sft;

/// Every built-in stage kind whose run is torch-free. `recflow_ml::builtin_registry()`
/// adds the libtorch kinds on top; a custom worker adds its own.
pub fn builtin_registry() -> Registry {
    Registry::new()
        // one line per torch-free kind: .with::<ingest::Ingest>()
        .with::<ingest::Ingest>()
        .with::<filter::Filter>()
        .with::<split::Split>()
        .with::<prompts::Prompts>()
        .with::<baselines::Baselines>()
        .with::<report::Report>()
        .with::<teacher::Teacher>()
}

/// Flat map of scalar metrics a stage reports (written to `metrics.json` in
/// the output dir and summarised into the lock file).
pub type Metrics = BTreeMap<String, serde_json::Value>;

/// One named input of a stage kind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputSpec {
    pub name: String,
    /// A stage without a required input fails validation.
    pub required: bool,
    /// Accepts a list of paths (e.g. the report's `metrics`).
    pub many: bool,
}

impl InputSpec {
    pub fn one(name: &str) -> Self {
        Self { name: name.into(), required: true, many: false }
    }
    pub fn optional(name: &str) -> Self {
        Self { name: name.into(), required: false, many: false }
    }
    pub fn many(name: &str) -> Self {
        Self { name: name.into(), required: false, many: true }
    }
}

/// Whether an output is a single file (with extension) or a directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum OutputKind {
    File { ext: String },
    Dir,
}

/// One named output of a stage: `out_dir/NAME.EXT` for files, `out_dir/NAME/` for dirs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputSpec {
    pub name: String,
    pub kind: OutputKind,
}

impl OutputSpec {
    pub fn file(name: &str, ext: &str) -> Self {
        Self { name: name.into(), kind: OutputKind::File { ext: ext.into() } }
    }
    pub fn dir(name: &str) -> Self {
        Self { name: name.into(), kind: OutputKind::Dir }
    }
    /// File name of this output inside a stage's output dir.
    pub fn file_name(&self) -> String {
        match &self.kind {
            OutputKind::File { ext } => format!("{}.{}", self.name, ext),
            OutputKind::Dir => self.name.clone(),
        }
    }
}

/// Metadata half of the contract: everything but `run`.
pub trait StageDef {
    /// Raw `with:` config; `#[serde(deny_unknown_fields)]`, defaults filled by serde.
    type Config: DeserializeOwned + Serialize;
    const KIND: &'static str;
    /// Bump when outputs change meaning; part of every key of this kind.
    const VERSION: u32;
    /// Dotted `with:` fields that do not change results (concurrency,
    /// timeouts, rate limits, prices, log intervals): kept out of the key.
    const OPERATIONAL: &'static [&'static str] = &[];
    /// `with:` fields holding paths (relative to the pipeline file): their
    /// content is hashed into the key and they are passed to the worker as
    /// absolute paths.
    const PATH_FIELDS: &'static [&'static str] = &[];
    /// Outputs depend on `device`/`dtype` (both then enter the key).
    const USES_DEVICE: bool = false;
    /// Inputs (by name, or `with.FIELD` for a path-valued field) that hold a
    /// model: `run --dry-run` checks that they are readable
    /// ([`model_files::check`]) before anything runs.
    const MODEL_INPUTS: &'static [(&'static str, model_files::ModelForm)] = &[];
    fn inputs() -> Vec<InputSpec>;
    fn outputs(cfg: &Self::Config) -> Vec<OutputSpec>;
    /// Semantic checks beyond serde (ranges, combinations). Message names the field.
    fn validate(_cfg: &Self::Config) -> Result<(), String> {
        Ok(())
    }
    /// JSON Schema of `Config`, given in `describe --json` so the runner
    /// checks a custom kind's `with:` when it plans (see
    /// `pipeline::schema` for the keywords it checks). Built-in kinds need
    /// none: the runner has their config types. Write it by hand or derive
    /// it (e.g. `schemars`); without one a custom kind's config is checked
    /// only when the stage runs.
    fn config_schema() -> Option<serde_json::Value> {
        None
    }
}

/// The full contract: a [`StageDef`] that can run.
pub trait Stage: StageDef {
    fn run(cfg: &Self::Config, ctx: &mut StageCtx) -> anyhow::Result<Metrics>;
}

/// Type-erased metadata of one stage kind, usable by the runner.
#[derive(Clone)]
pub struct StageMeta {
    pub kind: &'static str,
    pub version: u32,
    pub operational: &'static [&'static str],
    pub path_fields: &'static [&'static str],
    pub uses_device: bool,
    pub model_inputs: &'static [(&'static str, model_files::ModelForm)],
    pub inputs: Vec<InputSpec>,
    /// Parses + validates a `with:` value; returns the full config with
    /// defaults filled in (canonical form used for keys) or a message.
    pub check: fn(&serde_json::Value) -> Result<serde_json::Value, String>,
    /// Outputs for a (checked) config.
    pub outputs: fn(&serde_json::Value) -> Result<Vec<OutputSpec>, String>,
    /// [`StageDef::config_schema`].
    pub config_schema: fn() -> Option<serde_json::Value>,
}

impl std::fmt::Debug for StageMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageMeta").field("kind", &self.kind).field("version", &self.version).finish()
    }
}

fn check_config<D: StageDef>(v: &serde_json::Value) -> Result<serde_json::Value, String> {
    let cfg: D::Config = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    D::validate(&cfg)?;
    serde_json::to_value(&cfg).map_err(|e| e.to_string())
}

fn outputs_of<D: StageDef>(v: &serde_json::Value) -> Result<Vec<OutputSpec>, String> {
    let cfg: D::Config = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    Ok(D::outputs(&cfg))
}

impl StageMeta {
    pub fn of<D: StageDef>() -> Self {
        StageMeta {
            kind: D::KIND,
            version: D::VERSION,
            operational: D::OPERATIONAL,
            path_fields: D::PATH_FIELDS,
            uses_device: D::USES_DEVICE,
            model_inputs: D::MODEL_INPUTS,
            inputs: D::inputs(),
            check: check_config::<D>,
            outputs: outputs_of::<D>,
            config_schema: D::config_schema,
        }
    }

    /// Serializable form for `describe --json`. `outputs` (added for the
    /// runner's structural checks of custom kinds) are those of the default
    /// config (`{}`); kinds whose outputs depend on the config are described
    /// by their defaults.
    pub fn describe(&self) -> serde_json::Value {
        let outputs = (self.outputs)(&serde_json::json!({})).unwrap_or_default();
        serde_json::json!({
            "kind": self.kind,
            "version": self.version,
            "operational": self.operational,
            "path_fields": self.path_fields,
            "uses_device": self.uses_device,
            "model_inputs": self.model_inputs.iter().map(|(n, f)| (n.to_string(), *f)).collect::<BTreeMap<String, model_files::ModelForm>>(),
            "inputs": self.inputs,
            "outputs": outputs,
            "config_schema": (self.config_schema)(),
        })
    }
}

/// Type-erased run function.
pub type RunFn = Box<dyn Fn(&serde_json::Value, &mut StageCtx) -> anyhow::Result<Metrics> + Send + Sync>;

/// Kind → metadata + run function: what a worker can execute.
#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<&'static str, (StageMeta, RunFn)>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a stage kind implementing the full contract.
    pub fn with<S: Stage + 'static>(self) -> Self {
        self.with_run::<S>(S::run)
    }

    /// Adds a kind whose metadata is `D` and whose run function lives
    /// elsewhere (libtorch stages: metadata here, run in `recflow-ml`).
    pub fn with_run<D: StageDef + 'static>(
        mut self,
        run: fn(&D::Config, &mut StageCtx) -> anyhow::Result<Metrics>,
    ) -> Self {
        let f: RunFn = Box::new(move |v, ctx| {
            let cfg: D::Config = serde_json::from_value(v.clone())
                .map_err(|e| anyhow::anyhow!("invalid config for stage kind `{}`: {e}", D::KIND))?;
            D::validate(&cfg).map_err(|e| anyhow::anyhow!("invalid config for stage kind `{}`: {e}", D::KIND))?;
            run(&cfg, ctx)
        });
        self.entries.insert(D::KIND, (StageMeta::of::<D>(), f));
        self
    }

    pub fn get(&self, kind: &str) -> Option<&(StageMeta, RunFn)> {
        self.entries.get(kind)
    }

    pub fn metas(&self) -> impl Iterator<Item = &StageMeta> {
        self.entries.values().map(|(m, _)| m)
    }
}

/// Progress/log events a stage emits; the worker streams them as JSON lines
/// on stdout (the exec-stage protocol), tests may collect them.
pub trait EventSink: Send {
    fn emit(&mut self, event: serde_json::Value);
}

/// Writes each event as one JSON line to stdout.
pub struct StdoutEvents;

impl EventSink for StdoutEvents {
    fn emit(&mut self, event: serde_json::Value) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{event}");
        let _ = out.flush();
    }
}

/// Collects events in memory (unit tests of stages).
#[derive(Default)]
pub struct VecEvents(pub Vec<serde_json::Value>);

impl EventSink for VecEvents {
    fn emit(&mut self, event: serde_json::Value) {
        self.0.push(event);
    }
}

/// What a running stage sees (ARCHITECTURE "The Stage contract").
pub struct StageCtx {
    /// Stage instance name in the pipeline (e.g. `grpo_seeds@seed=1`).
    pub stage: String,
    /// Input name → paths (read-only). Single inputs have one path.
    pub inputs: BTreeMap<String, Vec<PathBuf>>,
    /// Output declarations for this config.
    pub outputs: Vec<OutputSpec>,
    /// Scratch output dir, committed atomically by the runner on success.
    pub out_dir: PathBuf,
    /// Persistent across attempts of the same key; removed after success.
    pub work_dir: PathBuf,
    pub seed: u64,
    /// Resolved device: `cpu`, `cuda` or `cuda:N` (never `auto`).
    pub device: String,
    pub events: Box<dyn EventSink>,
    pub cancel: Arc<AtomicBool>,
}

impl StageCtx {
    /// The single path of a required input.
    pub fn input(&self, name: &str) -> anyhow::Result<&Path> {
        match self.inputs.get(name).map(|v| v.as_slice()) {
            Some([p]) => Ok(p),
            Some([]) | None => anyhow::bail!("stage `{}`: input `{name}` is missing", self.stage),
            Some(_) => anyhow::bail!("stage `{}`: input `{name}` takes one path, got a list", self.stage),
        }
    }

    /// The path of an optional single input.
    pub fn input_opt(&self, name: &str) -> Option<&Path> {
        self.inputs.get(name).and_then(|v| v.first()).map(|p| p.as_path())
    }

    /// All paths of a (list) input; empty when absent.
    pub fn input_list(&self, name: &str) -> &[PathBuf] {
        self.inputs.get(name).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// Where output `name` must be written.
    pub fn output(&self, name: &str) -> anyhow::Result<PathBuf> {
        let spec = self
            .outputs
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| anyhow::anyhow!("stage `{}` declares no output `{name}`", self.stage))?;
        Ok(self.out_dir.join(spec.file_name()))
    }

    /// Reports progress (`done` of `total` `unit`s).
    pub fn progress(&mut self, done: u64, total: Option<u64>, unit: &str) {
        self.events.emit(serde_json::json!({"progress": {"done": done, "total": total, "unit": unit}}));
    }

    /// Says a checkpoint of `step` is complete in the work dir
    /// (`{"checkpoint": {"step": N}}`): a runner that keeps work dirs
    /// elsewhere (a Slurm job syncing to the remote) copies it now.
    pub fn checkpoint_saved(&mut self, step: u64) {
        self.events.emit(serde_json::json!({"checkpoint": {"step": step}}));
    }

    /// A human-readable log line (also the channel for loud warnings).
    pub fn log(&mut self, level: &str, msg: impl Into<String>) {
        self.events.emit(serde_json::json!({"log": {"level": level, "msg": msg.into()}}));
    }

    pub fn warn(&mut self, msg: impl Into<String>) {
        self.log("warn", msg)
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// A context over temp dirs for unit tests of stages.
    pub fn for_test(stage: &str, root: &Path, inputs: BTreeMap<String, Vec<PathBuf>>, outputs: Vec<OutputSpec>) -> Self {
        let out_dir = root.join("out");
        let work_dir = root.join("work");
        let _ = std::fs::create_dir_all(&out_dir);
        let _ = std::fs::create_dir_all(&work_dir);
        StageCtx {
            stage: stage.into(),
            inputs,
            outputs,
            out_dir,
            work_dir,
            seed: 0,
            device: "cpu".into(),
            events: Box::new(VecEvents::default()),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}
