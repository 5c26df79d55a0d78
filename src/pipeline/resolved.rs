//! The resolved model: what [`super::resolve`] produces and the planner,
//! keyer and executor consume. Kept apart from the resolver so readers of a
//! pipeline (the DAG, `run`, `status`) depend on the data, not on how it was
//! worked out.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use super::yaml::{Loc, Pos};
use crate::stages::model_files::ModelForm;
use crate::stages::{OutputKind, OutputSpec};

/// How to resolve: overrides and leniency.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--set params.a.b=v` / `--set stages.NAME.with.k=v`.
    pub sets: Vec<String>,
    /// `--params FILE`: a YAML mapping merged over `params:`.
    pub params_file: Option<PathBuf>,
    /// Absent external inputs and env vars are warnings (`--dry-run --allow-missing`, `status`).
    pub allow_missing: bool,
    /// Stage → device recorded in the lock: `device: auto` resolves to it
    /// (`status --check` on a machine other than the one that ran).
    pub recorded_devices: BTreeMap<String, String>,
    /// Stages run on a cluster's nodes, not here: `device: auto` is `cuda`
    /// for a stage that asks `resources.gpus`, else `cpu` (this machine's
    /// GPUs say nothing about the node's).
    pub on_cluster: bool,
}

/// One input path source.
#[derive(Debug, Clone, PartialEq)]
pub enum InputRef {
    /// A file or directory outside the pipeline's stages (content hashed).
    Path { abs: PathBuf, shown: String },
    /// Output `output` of the (expanded) stage `stage`.
    Output { stage: String, output: String },
}

/// A piece of a shell command: literal text, an upstream output, an env var.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CmdPiece {
    Lit(String),
    Output { stage: String, output: String, text: String },
    Env(String),
}

/// A declared shell output: name (`outs` map key, or the path as written).
#[derive(Debug, Clone, PartialEq)]
pub struct ShellOut {
    pub name: String,
    pub rel: String,
    pub abs: PathBuf,
}

#[derive(Debug, Clone)]
pub enum Action {
    Builtin { kind: String, version: u32, uses_device: bool, outputs: Vec<OutputSpec> },
    Shell { cmd: Vec<CmdPiece>, outs: Vec<ShellOut> },
}

/// A stage ready to key, plan and run.
#[derive(Debug, Clone)]
pub struct ResolvedStage {
    /// Expanded name (`grpo_seeds@seed=1`).
    pub name: String,
    /// Name in the YAML.
    pub base: String,
    pub loc: Loc,
    pub matrix: BTreeMap<String, Value>,
    pub action: Action,
    /// Input name → sources (shell stages: one entry per dep, named as written).
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    /// Config as keyed: defaults applied, operational and path fields removed, env symbolic.
    pub config_key: Value,
    /// Config as run: env values, absolute paths, device resolved.
    pub config_run: Value,
    /// VAR → sha256 of its value.
    pub env_hashes: BTreeMap<String, String>,
    /// VAR → value (shell commands only; never serialised).
    pub env_values: BTreeMap<String, String>,
    pub seed: u64,
    pub device: Option<String>,
    /// `resources:` (GPUs for the local scheduler; the rest for Slurm).
    pub resources: super::resources::Resources,
    /// Upstream expanded stages.
    pub deps: Vec<String>,
    /// Inputs (names as in [`Self::inputs`]) that hold models, and their form.
    pub model_inputs: BTreeMap<String, ModelForm>,
    /// Where each input (by name) and each top-level `with:` field (as
    /// `with.FIELD`) was written, for messages about their content.
    pub positions: BTreeMap<String, Pos>,
}

impl ResolvedStage {
    pub fn kind(&self) -> &str {
        match &self.action {
            Action::Builtin { kind, .. } => kind,
            Action::Shell { .. } => "shell",
        }
    }

    /// Output names this stage declares.
    pub fn output_names(&self) -> Vec<String> {
        match &self.action {
            Action::Builtin { outputs, .. } => outputs.iter().map(|o| o.name.clone()).collect(),
            Action::Shell { outs, .. } => outs.iter().map(|o| o.name.clone()).collect(),
        }
    }
}

/// A resolved pipeline: stages in a topological order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub dir: PathBuf,
    pub root: PathBuf,
    /// Params after overrides, env symbolic (what the lock records).
    pub params: Value,
    pub worker: Option<PathBuf>,
    pub stages: Vec<ResolvedStage>,
    pub warnings: Vec<String>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&ResolvedStage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Stages named `name`: the exact expansion, or every expansion of a base name.
    pub fn select(&self, name: &str) -> Vec<&ResolvedStage> {
        self.stages.iter().filter(|s| s.name == name || s.base == name).collect()
    }
}

/// The command text that enters the key: outputs and env vars symbolic.
pub fn cmd_key_text(p: &CmdPiece) -> String {
    match p {
        CmdPiece::Lit(l) => l.clone(),
        CmdPiece::Output { text, .. } => text.clone(),
        CmdPiece::Env(v) => format!("${{env:{v}}}"),
    }
}

/// The kind of a resolved output: file or dir (shell outputs are decided by what exists).
pub fn output_kind(stage: &ResolvedStage, output: &str) -> Option<OutputKind> {
    match &stage.action {
        Action::Builtin { outputs, .. } => outputs.iter().find(|o| o.name == output).map(|o| o.kind.clone()),
        Action::Shell { .. } => None,
    }
}
