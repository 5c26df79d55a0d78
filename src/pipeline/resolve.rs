//! Spec → resolved stages: params and overrides, `stages/KIND.yaml`
//! defaults (`extends:`), `${...}` interpolation, matrix expansion and
//! propagation, stage metadata checks. Pure apart from reading the pipeline,
//! defaults and params files (and asking a custom worker `describe --json`).
//!
//! Two renderings of every interpolated value are kept: the *run* value
//! (what the stage sees) and the *key* value, where `${env:VAR}` stays
//! symbolic so an env value never reaches a key, a lock or the store — the
//! value enters keys only as its hash ([`ResolvedStage::env_hashes`]).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::spec::{Body, Outs, PipelineSpec, StageSpec};
use super::yaml::{self, Loc, Node, Pos, Val};
use super::PipelineError;
use crate::stages::model_files::ModelForm;
use crate::stages::{InputSpec, OutputKind, OutputSpec};

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
#[derive(Debug, Clone, PartialEq)]
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
    pub gpus: u32,
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

/// Parses + validates a `with:` value (the kind's config type).
pub type CheckFn = fn(&Value) -> Result<Value, String>;
/// Outputs of a kind for a checked config.
pub type OutputsFn = fn(&Value) -> Result<Vec<OutputSpec>, String>;
/// Base stage → its expansions (matrix combination, expanded name).
type Expansions = BTreeMap<String, Vec<(BTreeMap<String, Value>, String)>>;

/// Runner-side metadata of a stage kind (built-in, or described by a custom worker).
#[derive(Clone)]
pub struct KindInfo {
    pub kind: String,
    pub version: u32,
    pub operational: Vec<String>,
    pub path_fields: Vec<String>,
    pub uses_device: bool,
    /// Inputs holding models (checked readable by `--dry-run`).
    pub model_inputs: BTreeMap<String, ModelForm>,
    pub inputs: Vec<InputSpec>,
    pub check: Option<CheckFn>,
    pub outputs_fn: Option<OutputsFn>,
    /// Outputs from `describe --json` (custom kinds).
    pub outputs: Vec<OutputSpec>,
    /// Config schema from `describe --json` (custom kinds; checked at plan time).
    pub config_schema: Option<Value>,
}

impl KindInfo {
    fn from_meta(m: &crate::stages::StageMeta) -> Self {
        KindInfo {
            kind: m.kind.to_string(),
            version: m.version,
            operational: m.operational.iter().map(|s| s.to_string()).collect(),
            path_fields: m.path_fields.iter().map(|s| s.to_string()).collect(),
            uses_device: m.uses_device,
            model_inputs: m.model_inputs.iter().map(|(n, f)| (n.to_string(), *f)).collect(),
            inputs: m.inputs.clone(),
            check: Some(m.check),
            outputs_fn: Some(m.outputs),
            outputs: vec![],
            config_schema: None,
        }
    }

    /// Parses one entry of a worker's `describe --json` answer.
    pub fn from_described(v: &Value) -> Result<Self, String> {
        let s = |k: &str| -> Result<Vec<String>, String> {
            Ok(match v.get(k) {
                None | Some(Value::Null) => vec![],
                Some(x) => serde_json::from_value(x.clone()).map_err(|e| format!("`{k}`: {e}"))?,
            })
        };
        Ok(KindInfo {
            kind: v.get("kind").and_then(|k| k.as_str()).ok_or("entry without `kind`")?.to_string(),
            version: v.get("version").and_then(|k| k.as_u64()).ok_or("entry without `version`")? as u32,
            operational: s("operational")?,
            path_fields: s("path_fields")?,
            uses_device: v.get("uses_device").and_then(|k| k.as_bool()).unwrap_or(false),
            model_inputs: match v.get("model_inputs") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(x) => serde_json::from_value(x.clone()).map_err(|e| format!("`model_inputs`: {e}"))?,
            },
            inputs: serde_json::from_value(v.get("inputs").cloned().unwrap_or(Value::Array(vec![])))
                .map_err(|e| format!("`inputs`: {e}"))?,
            check: None,
            outputs_fn: None,
            outputs: serde_json::from_value(v.get("outputs").cloned().unwrap_or(Value::Array(vec![])))
                .map_err(|e| format!("`outputs`: {e}"))?,
            config_schema: v.get("config_schema").filter(|s| !s.is_null()).cloned(),
        })
    }

    fn outputs_for(&self, cfg: &Value) -> Result<Vec<OutputSpec>, String> {
        match self.outputs_fn {
            Some(f) => f(cfg),
            None => Ok(self.outputs.clone()),
        }
    }
}

/// Metadata of every kind a pipeline can use: built-ins, plus those of its custom worker.
pub fn kinds_for(worker: Option<&Path>, store_dir: &Path) -> Result<BTreeMap<String, KindInfo>, String> {
    let mut m: BTreeMap<String, KindInfo> =
        crate::stages::meta::builtin().iter().map(|x| (x.kind.to_string(), KindInfo::from_meta(x))).collect();
    if let Some(w) = worker {
        for k in describe_worker(w, store_dir)? {
            m.entry(k.kind.clone()).or_insert(k);
        }
    }
    Ok(m)
}

/// `WORKER describe --json`, cached in the store keyed by the binary's sha256.
pub fn describe_worker(worker: &Path, store_dir: &Path) -> Result<Vec<KindInfo>, String> {
    let hash = crate::cache::hash::hash_file(worker).map_err(|e| format!("cannot read worker {}: {e}", worker.display()))?;
    let cache_file = store_dir.join("describe").join(format!("{hash}.json"));
    let text = match std::fs::read_to_string(&cache_file) {
        Ok(t) => t,
        Err(_) => {
            let out = std::process::Command::new(worker)
                .args(["describe", "--json"])
                .output()
                .map_err(|e| format!("cannot start worker {}: {e}", worker.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "worker {} `describe --json` failed: {}",
                    worker.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let t = String::from_utf8_lossy(&out.stdout).into_owned();
            // A cache, so a failed write only costs a later re-ask.
            let _ = crate::util::write_atomic(&cache_file, t.as_bytes());
            t
        }
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("worker {} describe: invalid JSON: {e}", worker.display()))?;
    let stages = v.get("stages").and_then(|s| s.as_array()).ok_or("describe answer lacks `stages`")?;
    stages.iter().map(KindInfo::from_described).collect()
}

// ---------------------------------------------------------------- interpolation

/// One token of a `${...}` template.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(String),
    Param(Vec<String>),
    Env(String),
    Matrix(String),
    Out(String, String),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        lit.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(r) = after.strip_prefix("$${") {
            lit.push_str("${");
            rest = r;
            continue;
        }
        if !after.starts_with("${") {
            lit.push('$');
            rest = &after[1..];
            continue;
        }
        let Some(end) = after.find('}') else {
            return Err(format!("unterminated `${{` in `{s}`"));
        };
        let inner = after[2..end].trim();
        if !lit.is_empty() {
            out.push(Tok::Lit(std::mem::take(&mut lit)));
        }
        out.push(parse_ref(inner)?);
        rest = &after[end + 1..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        out.push(Tok::Lit(lit));
    }
    Ok(out)
}

fn parse_ref(inner: &str) -> Result<Tok, String> {
    let bad = || {
        format!("unknown reference `${{{inner}}}`: expected ${{params.NAME}}, ${{env:VAR}}, ${{matrix.KEY}} or ${{STAGE.OUTPUT}}")
    };
    if let Some(v) = inner.strip_prefix("env:") {
        if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad());
        }
        return Ok(Tok::Env(v.to_string()));
    }
    let parts: Vec<&str> = inner.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    match parts[0] {
        "params" => Ok(Tok::Param(parts[1..].iter().map(|s| s.to_string()).collect())),
        "matrix" if parts.len() == 2 => Ok(Tok::Matrix(parts[1].to_string())),
        "matrix" | "env" => Err(bad()),
        _ if parts.len() == 2 => Ok(Tok::Out(parts[0].to_string(), parts[1].to_string())),
        _ => Err(bad()),
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Interpolation context for one (expanded) stage.
struct Interp<'a> {
    file: &'a Path,
    params: &'a Node,
    matrix: &'a BTreeMap<String, Value>,
    allow_missing: bool,
    env_hashes: BTreeMap<String, String>,
    env_values: BTreeMap<String, String>,
    warnings: Vec<String>,
}

impl Interp<'_> {
    fn err(&self, pos: Pos, msg: impl Into<String>) -> PipelineError {
        PipelineError::new(self.file, pos, msg)
    }

    fn env(&mut self, var: &str, pos: Pos) -> Result<String, PipelineError> {
        match std::env::var(var) {
            Ok(v) => {
                self.env_hashes.insert(var.to_string(), crate::cache::hash::sha256_hex(v.as_bytes()));
                self.env_values.insert(var.to_string(), v.clone());
                Ok(v)
            }
            Err(_) if self.allow_missing => {
                self.warnings.push(format!("{}:{}:{}: env var `{var}` is not set", self.file.display(), pos.line, pos.col));
                self.env_hashes.insert(var.to_string(), "unset".into());
                Ok(String::new())
            }
            Err(_) => Err(self.err(pos, format!("env var `{var}` is not set (export it, or run with --dry-run --allow-missing)"))),
        }
    }

    fn param(&mut self, path: &[String], pos: Pos, depth: usize) -> Result<(Value, Value), PipelineError> {
        let mut n = self.params;
        for (i, k) in path.iter().enumerate() {
            n = n.get(k).ok_or_else(|| self.err(pos, format!("unknown param `{}`", path[..=i].join("."))))?;
        }
        if depth > 16 {
            return Err(self.err(pos, "params refer to each other in a loop"));
        }
        let n = n.clone();
        self.value(&n, depth + 1, false)
    }

    /// Interpolates a node → (key value, run value). `${STAGE.OUT}` is refused here.
    fn value(&mut self, n: &Node, depth: usize, _in_list: bool) -> Result<(Value, Value), PipelineError> {
        match &n.val {
            Val::Str(s) => self.string(s, n.pos, depth),
            Val::Seq(items) => {
                let (mut k, mut r) = (vec![], vec![]);
                for i in items {
                    let (a, b) = self.value(i, depth, true)?;
                    k.push(a);
                    r.push(b);
                }
                Ok((Value::Array(k), Value::Array(r)))
            }
            Val::Map(m) => {
                let (mut k, mut r) = (serde_json::Map::new(), serde_json::Map::new());
                for (key, _, v) in m {
                    let (a, b) = self.value(v, depth, false)?;
                    k.insert(key.clone(), a);
                    r.insert(key.clone(), b);
                }
                Ok((Value::Object(k), Value::Object(r)))
            }
            _ => {
                let j = n.to_json();
                Ok((j.clone(), j))
            }
        }
    }

    fn string(&mut self, s: &str, pos: Pos, depth: usize) -> Result<(Value, Value), PipelineError> {
        let toks = tokenize(s).map_err(|m| self.err(pos, m))?;
        let mut parts: Vec<(Value, Value)> = Vec::new();
        for t in &toks {
            parts.push(match t {
                Tok::Lit(l) => (Value::String(l.clone()), Value::String(l.clone())),
                Tok::Param(p) => self.param(p, pos, depth)?,
                Tok::Env(v) => {
                    let val = self.env(v, pos)?;
                    (Value::String(format!("${{env:{v}}}")), Value::String(val))
                }
                Tok::Matrix(k) => {
                    let v = self.matrix.get(k).cloned().ok_or_else(|| {
                        self.err(pos, format!("`${{matrix.{k}}}`: this stage has no matrix key `{k}`"))
                    })?;
                    (v.clone(), v)
                }
                Tok::Out(a, b) => {
                    return Err(self.err(
                        pos,
                        format!("`${{{a}.{b}}}` (a stage output) can only appear in `inputs:`, `deps:` or `cmd:`"),
                    ))
                }
            });
        }
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        let k: String = parts.iter().map(|(a, _)| scalar_text(a)).collect();
        let r: String = parts.iter().map(|(_, b)| scalar_text(b)).collect();
        Ok((Value::String(k), Value::String(r)))
    }
}

// ---------------------------------------------------------------- helpers

/// Lexical normalisation (no symlink resolution): drops `.`, folds `..`.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            // `..` cancels a name only: popping an earlier `..` would turn
            // `../../x` into `x` and let an output escape the directory.
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {} // `/..` is `/`
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Makes a matrix value safe inside a file name.
pub fn file_safe(v: &Value) -> String {
    scalar_text(v).chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

fn merge(base: &mut Node, over: &Node) {
    if let (Val::Map(b), Val::Map(o)) = (&mut base.val, &over.val) {
        for (k, p, v) in o {
            match b.iter_mut().find(|(bk, _, _)| bk == k) {
                Some((_, _, bv)) => merge(bv, v),
                None => b.push((k.clone(), *p, v.clone())),
            }
        }
    } else {
        *base = over.clone();
    }
}

fn set_path(node: &mut Node, path: &[&str], value: Node) {
    if !matches!(node.val, Val::Map(_)) {
        node.val = Val::Map(vec![]);
    }
    let Val::Map(m) = &mut node.val else { return };
    let (head, tail) = (path[0], &path[1..]);
    let idx = match m.iter().position(|(k, _, _)| k == head) {
        Some(i) => i,
        None => {
            m.push((head.to_string(), value.pos, Node::new(value.pos, Val::Null)));
            m.len() - 1
        }
    };
    if tail.is_empty() {
        m[idx].2 = value;
    } else {
        set_path(&mut m[idx].2, tail, value);
    }
}

fn json_get_mut<'a>(v: &'a mut Value, dotted: &str) -> Option<&'a mut Value> {
    dotted.split('.').try_fold(v, |cur, k| cur.get_mut(k))
}

fn json_remove(v: &mut Value, dotted: &str) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut cur = v;
    for p in parts {
        match cur.get_mut(p) {
            Some(x) => cur = x,
            None => return,
        }
    }
    if let Some(o) = cur.as_object_mut() {
        o.remove(last);
    }
}

/// Edges of the spec-level graph: which base stages a stage's text refers to.
struct BaseRef {
    stage: String,
    all: bool,
    pos: Pos,
}

fn refs_in(s: &str) -> Vec<(String, String)> {
    tokenize(s)
        .map(|ts| ts.into_iter().filter_map(|t| if let Tok::Out(a, b) = t { Some((a, b)) } else { None }).collect())
        .unwrap_or_default()
}

fn norm_rel(s: &str) -> String {
    normalize(Path::new(s)).to_string_lossy().into_owned()
}

/// Is an `inputs:` value `{all: ${A.b}}`?
fn all_of(n: &Node) -> Option<&Node> {
    match &n.val {
        Val::Map(m) if m.len() == 1 && m[0].0 == "all" => Some(&m[0].2),
        _ => None,
    }
}

fn base_refs(st: &StageSpec, out_owner: &BTreeMap<String, String>) -> Vec<BaseRef> {
    let mut v = Vec::new();
    let push_str = |n: &Node, all: bool, v: &mut Vec<BaseRef>| {
        if let Some(s) = n.as_str() {
            for (a, _) in refs_in(s) {
                v.push(BaseRef { stage: a, all, pos: n.pos });
            }
        }
    };
    match &st.body {
        Body::Builtin { inputs, .. } => {
            for (_, _, n) in inputs {
                let items: Vec<&Node> = match &n.val {
                    Val::Seq(xs) => xs.iter().collect(),
                    _ => vec![n],
                };
                for it in items {
                    match all_of(it) {
                        Some(inner) => push_str(inner, true, &mut v),
                        None => push_str(it, false, &mut v),
                    }
                }
            }
        }
        Body::Shell { cmd, deps, .. } => {
            push_str(cmd, false, &mut v);
            for d in deps {
                push_str(d, false, &mut v);
                if let Some(s) = d.as_str() {
                    if let Some(owner) = out_owner.get(&norm_rel(s)) {
                        if owner != &st.name {
                            v.push(BaseRef { stage: owner.clone(), all: false, pos: d.pos });
                        }
                    }
                }
            }
        }
    }
    v
}

// ---------------------------------------------------------------- load

/// Reads, checks and resolves a pipeline file.
pub fn load(file: &Path, opts: &Options) -> Result<Pipeline, PipelineError> {
    let file_abs = std::path::absolute(file).map_err(|e| PipelineError::new(file, Pos::default(), e.to_string()))?;
    let file_abs = normalize(&file_abs);
    let doc = yaml::load(&file_abs).map_err(|(loc, msg)| PipelineError { loc, msg })?;
    let spec = PipelineSpec::from_node(&file_abs, &doc)?;
    resolve(spec, opts)
}

/// Resolves a checked spec.
pub fn resolve(mut spec: PipelineSpec, opts: &Options) -> Result<Pipeline, PipelineError> {
    let file = spec.file.clone();
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let root = super::project_root(&dir);
    let here = |pos: Pos, msg: String| PipelineError::new(&file, pos, msg);

    // Overrides: --params FILE, then --set, in order.
    if let Some(pf) = &opts.params_file {
        let n = yaml::load(pf).map_err(|(loc, msg)| PipelineError { loc, msg })?;
        if !matches!(n.val, Val::Map(_)) {
            return Err(PipelineError::new(pf, n.pos, "a --params file must be a mapping of params"));
        }
        merge(&mut spec.params, &n);
    }
    let mut set_warnings = Vec::new();
    for s in &opts.sets {
        let set_loc = |m: String| PipelineError::new(Path::new("--set"), Pos::default(), format!("`{s}`: {m}"));
        let (path, raw) = s.split_once('=').ok_or_else(|| set_loc("expected PATH=VALUE".into()))?;
        // The lock spells such a path relative to the pipeline when it lies
        // under the project (`lock::spell_path`); elsewhere it cannot.
        if Path::new(raw).is_absolute() && !normalize(Path::new(raw)).starts_with(&root) {
            set_warnings.push(format!(
                "--set `{s}`: `{raw}` lies outside the project ({}): the lock records it absolute; give it relative to the pipeline's directory to keep a committed lock portable",
                root.display()
            ));
        }
        let value = yaml::parse(raw).unwrap_or_else(|_| Node::new(Pos::default(), Val::Str(raw.to_string())));
        let value = Node { pos: Pos::default(), ..value };
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            ["params", rest @ ..] if !rest.is_empty() => set_path(&mut spec.params, rest, value),
            ["stages", name, "with", rest @ ..] if !rest.is_empty() => {
                let st = spec
                    .stages
                    .iter_mut()
                    .find(|x| x.name == *name)
                    .ok_or_else(|| set_loc(format!("no stage `{name}` in this pipeline")))?;
                match &mut st.body {
                    Body::Builtin { with, .. } => set_path(with, rest, value),
                    Body::Shell { .. } => return Err(set_loc(format!("stage `{name}` is a shell stage: it has no `with:`"))),
                }
            }
            _ => return Err(set_loc("expected `params.NAME...=VALUE` or `stages.STAGE.with.FIELD=VALUE`".into())),
        }
    }

    let store_dir = crate::cache::store_dir(&root);
    let worker = match &spec.worker {
        Some((w, pos)) => {
            let p = normalize(&dir.join(w));
            if !p.is_file() {
                return Err(here(*pos, format!("worker binary `{}` not found (build it first, e.g. `cargo build --example ...`)", p.display())));
            }
            Some(p)
        }
        None => None,
    };
    let kinds = kinds_for(worker.as_deref(), &store_dir).map_err(|m| {
        here(spec.worker.as_ref().map(|w| w.1).unwrap_or_default(), m)
    })?;

    // Spec-level graph over base names, cycles first (a matrix cannot expand a loop).
    let names: BTreeSet<String> = spec.stages.iter().map(|s| s.name.clone()).collect();
    let mut out_owner: BTreeMap<String, String> = BTreeMap::new();
    for st in &spec.stages {
        if let Body::Shell { outs, .. } = &st.body {
            let nodes: Vec<&Node> = match outs {
                Outs::List(v) => v.iter().collect(),
                Outs::Named(m) => m.iter().map(|x| &x.2).collect(),
            };
            for n in nodes {
                if let Some(s) = n.as_str() {
                    out_owner.insert(norm_rel(s), st.name.clone());
                }
            }
        }
    }
    let mut base_edges: BTreeMap<String, Vec<BaseRef>> = BTreeMap::new();
    for st in &spec.stages {
        let refs = base_refs(st, &out_owner);
        for r in &refs {
            if !names.contains(&r.stage) {
                return Err(here(r.pos, format!("stage `{}` refers to unknown stage `{}`", st.name, r.stage)));
            }
        }
        base_edges.insert(st.name.clone(), refs);
    }
    let order: Vec<String> = {
        let edges: Vec<(String, String)> = base_edges
            .iter()
            .flat_map(|(to, rs)| rs.iter().map(move |r| (r.stage.clone(), to.clone())))
            .collect();
        let spec_order: Vec<String> = spec.stages.iter().map(|s| s.name.clone()).collect();
        super::graph::topo_or_cycle(&spec_order, &edges).map_err(|cycle| {
            let st = spec.stages.iter().find(|s| s.name == cycle[0]).map(|s| s.pos).unwrap_or_default();
            here(st, format!("dependency cycle: {}", cycle.join(" -> ")))
        })?
    };

    // Matrix dims per base stage (own + inherited through non-`all` references).
    let mut dims: BTreeMap<String, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for name in &order {
        let st = spec.stages.iter().find(|s| &s.name == name).expect("ordered from spec");
        let mut d: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut origin: BTreeMap<String, String> = BTreeMap::new();
        for (k, kp, vals) in &st.matrix {
            let vs: Vec<Value> = vals.iter().map(|n| n.to_json()).collect();
            let safe: BTreeSet<String> = vs.iter().map(file_safe).collect();
            if safe.len() != vs.len() {
                return Err(here(*kp, format!("matrix `{k}` has values that give the same stage name")));
            }
            d.insert(k.clone(), vs);
            origin.insert(k.clone(), "itself".into());
        }
        for r in &base_edges[name] {
            if r.all {
                continue;
            }
            for (k, vs) in &dims[&r.stage] {
                match d.get(k) {
                    None => {
                        d.insert(k.clone(), vs.clone());
                        origin.insert(k.clone(), r.stage.clone());
                    }
                    Some(existing) if existing == vs && origin[k] != "itself" => {}
                    Some(_) => {
                        let pos = st.matrix.iter().find(|m| &m.0 == k).map(|m| m.1).unwrap_or(r.pos);
                        return Err(here(
                            pos,
                            format!("matrix key `{k}` of stage `{name}` clashes with the matrix `{k}` inherited from `{}`", r.stage),
                        ));
                    }
                }
            }
        }
        dims.insert(name.clone(), d);
    }

    // Expand and resolve each stage in order.
    let mut warnings = set_warnings;
    let mut resolved: Vec<ResolvedStage> = Vec::new();
    let mut expansions: Expansions = BTreeMap::new();
    let mut out_paths: BTreeMap<PathBuf, (String, String)> = BTreeMap::new();
    for name in &order {
        let st = spec.stages.iter().find(|s| &s.name == name).expect("ordered from spec");
        let combos = product(&dims[name]);
        let mut exps = Vec::new();
        for combo in combos {
            let ename = if combo.is_empty() {
                name.clone()
            } else {
                let tail: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={}", file_safe(v))).collect();
                format!("{name}@{}", tail.join(","))
            };
            let rs = resolve_stage(
                &file, &dir, &root, st, &ename, &combo, &spec.params, opts, &kinds, &expansions, &resolved,
                &mut out_paths, &mut warnings,
            )?;
            exps.push((combo, ename));
            resolved.push(rs);
        }
        expansions.insert(name.clone(), exps);
    }

    let params = {
        let mut it = Interp {
            file: &file,
            params: &spec.params,
            matrix: &BTreeMap::new(),
            allow_missing: true,
            env_hashes: BTreeMap::new(),
            env_values: BTreeMap::new(),
            warnings: vec![],
        };
        it.value(&spec.params, 0, false)?.0
    };
    Ok(Pipeline { name: spec.name, file, dir, root, params, worker, stages: resolved, warnings })
}

/// Cartesian product of matrix dims, keys sorted, values in declared order.
fn product(d: &BTreeMap<String, Vec<Value>>) -> Vec<BTreeMap<String, Value>> {
    let mut acc: Vec<BTreeMap<String, Value>> = vec![BTreeMap::new()];
    for (k, vs) in d {
        let mut next = Vec::new();
        for a in &acc {
            for v in vs {
                let mut c = a.clone();
                c.insert(k.clone(), v.clone());
                next.push(c);
            }
        }
        acc = next;
    }
    acc
}

#[allow(clippy::too_many_arguments)]
fn resolve_stage(
    file: &Path,
    dir: &Path,
    root: &Path,
    st: &StageSpec,
    ename: &str,
    combo: &BTreeMap<String, Value>,
    params: &Node,
    opts: &Options,
    kinds: &BTreeMap<String, KindInfo>,
    expansions: &Expansions,
    done: &[ResolvedStage],
    out_paths: &mut BTreeMap<PathBuf, (String, String)>,
    warnings: &mut Vec<String>,
) -> Result<ResolvedStage, PipelineError> {
    let here = |pos: Pos, msg: String| PipelineError::new(file, pos, msg);
    let mut it = Interp {
        file,
        params,
        matrix: combo,
        allow_missing: opts.allow_missing,
        env_hashes: BTreeMap::new(),
        env_values: BTreeMap::new(),
        warnings: vec![],
    };
    // `${A.b}` → the expansion of A matching this combo.
    let find_out = |a: &str, b: &str, pos: Pos| -> Result<(String, String), PipelineError> {
        let exps = expansions.get(a).ok_or_else(|| here(pos, format!("unknown stage `{a}`")))?;
        let (_, en) = exps
            .iter()
            .find(|(c, _)| c.iter().all(|(k, v)| combo.get(k) == Some(v)))
            .ok_or_else(|| here(pos, format!("no expansion of `{a}` matches `{ename}`")))?;
        let up = done.iter().find(|s| &s.name == en).expect("upstream resolved first");
        if !up.output_names().iter().any(|o| o == b) {
            return Err(here(pos, format!("stage `{a}` has no output `{b}` (outputs: {})", up.output_names().join(", "))));
        }
        Ok((en.clone(), b.to_string()))
    };
    let all_outs = |a: &str, b: &str, pos: Pos| -> Result<Vec<InputRef>, PipelineError> {
        let exps = expansions.get(a).ok_or_else(|| here(pos, format!("unknown stage `{a}`")))?;
        let mut v = Vec::new();
        for (_, en) in exps {
            let up = done.iter().find(|s| &s.name == en).expect("upstream resolved first");
            if !up.output_names().iter().any(|o| o == b) {
                return Err(here(pos, format!("stage `{a}` has no output `{b}` (outputs: {})", up.output_names().join(", "))));
            }
            v.push(InputRef::Output { stage: en.clone(), output: b.to_string() });
        }
        Ok(v)
    };
    let mut missing = Vec::new();
    // A path/ref string → input source.
    let source = |it: &mut Interp, n: &Node, missing: &mut Vec<(Pos, PathBuf)>, out_paths: &BTreeMap<PathBuf, (String, String)>| -> Result<InputRef, PipelineError> {
        let s = n.as_str().ok_or_else(|| here(n.pos, format!("an input must be a path or `${{STAGE.OUTPUT}}`, got {}", n.type_name())))?;
        let toks = tokenize(s).map_err(|m| here(n.pos, m))?;
        if let [Tok::Out(a, b)] = toks.as_slice() {
            let (stage, output) = find_out(a, b, n.pos)?;
            return Ok(InputRef::Output { stage, output });
        }
        if toks.iter().any(|t| matches!(t, Tok::Out(..))) {
            return Err(here(n.pos, "a stage output reference must be the whole input value".into()));
        }
        let (_, run) = it.string(s, n.pos, 0)?;
        let p = scalar_text(&run);
        let abs = normalize(&dir.join(&p));
        if let Some((stage, output)) = out_paths.get(&abs) {
            return Ok(InputRef::Output { stage: stage.clone(), output: output.clone() });
        }
        if !abs.exists() {
            missing.push((n.pos, abs.clone()));
        }
        Ok(InputRef::Path { abs, shown: p })
    };

    let mut inputs: BTreeMap<String, Vec<InputRef>> = BTreeMap::new();
    let mut model_inputs = BTreeMap::new();
    let mut positions: BTreeMap<String, Pos> = BTreeMap::new();
    let (action, config_key, config_run, device) = match &st.body {
        Body::Builtin { uses, uses_pos, inputs: ins, with, extends } => {
            let info = kinds.get(uses).ok_or_else(|| {
                let known: Vec<&str> = kinds.keys().map(|s| s.as_str()).collect();
                here(
                    *uses_pos,
                    format!(
                        "unknown stage kind `{uses}` (known: {}; custom kinds need a `worker:` that describes them)",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                )
            })?;
            // Defaults: stages/KIND.yaml (or `extends:`), path fields made absolute relative to the defaults file.
            let mut merged = load_defaults(file, dir, root, uses, extends.as_ref(), info, 0)?;
            merge(&mut merged, with);
            let mut key_paths: Vec<String> = Vec::new();
            let (k, mut r) = it.value(&merged, 0, false)?;
            diff_paths(&k, &r, String::new(), &mut key_paths);
            // Inputs.
            for (iname, ipos, inode) in ins {
                let spec_in = info.inputs.iter().find(|x| &x.name == iname).ok_or_else(|| {
                    let names: Vec<&str> = info.inputs.iter().map(|x| x.name.as_str()).collect();
                    here(*ipos, format!("stage kind `{uses}` has no input `{iname}` (inputs: {})", names.join(", ")))
                })?;
                let mut srcs = Vec::new();
                let items: Vec<&Node> = match &inode.val {
                    Val::Seq(xs) => xs.iter().collect(),
                    _ => vec![inode],
                };
                let is_list = matches!(inode.val, Val::Seq(_)) || all_of(inode).is_some();
                for item in items {
                    match all_of(item) {
                        Some(inner) => {
                            let s = inner.as_str().unwrap_or_default();
                            match tokenize(s).map_err(|m| here(inner.pos, m))?.as_slice() {
                                [Tok::Out(a, b)] => srcs.extend(all_outs(a, b, inner.pos)?),
                                _ => return Err(here(inner.pos, "`all:` takes one `${STAGE.OUTPUT}` reference".into())),
                            }
                        }
                        None => srcs.push(source(&mut it, item, &mut missing, out_paths)?),
                    }
                }
                if !spec_in.many && (is_list || srcs.len() != 1) {
                    return Err(here(inode.pos, format!("input `{iname}` of kind `{uses}` takes one path, not a list")));
                }
                inputs.insert(iname.clone(), srcs);
                positions.insert(iname.clone(), *ipos);
            }
            for i in &info.inputs {
                if i.required && !inputs.contains_key(&i.name) {
                    return Err(here(st.pos, format!("stage `{}` (kind `{uses}`) needs input `{}`", st.name, i.name)));
                }
            }
            // Device: `auto` resolved here, without libtorch.
            let mut device = None;
            if info.uses_device {
                let d = r.get("device").and_then(|d| d.as_str()).unwrap_or("auto").to_string();
                let d = if d == "auto" {
                    opts.recorded_devices.get(ename).cloned().unwrap_or_else(|| super::resolve_auto_device().to_string())
                } else {
                    d
                };
                if let Some(o) = r.as_object_mut() {
                    o.insert("device".into(), Value::String(d.clone()));
                }
                device = Some(d);
            }
            // Config check (defaults, types, ranges) on the run value.
            let with_pos = with.pos;
            if let Val::Map(m) = &with.val {
                positions.extend(m.iter().map(|(k, p, _)| (format!("with.{k}"), *p)));
            }
            let full_run = match info.check {
                Some(check) => check(&r).map_err(|m| {
                    // Point at the offending field when serde names it.
                    let pos = m.split('`').nth(1).and_then(|f| with.key_pos(f)).unwrap_or(with_pos);
                    here(pos, format!("stage `{}` (kind `{uses}`): invalid `with:`: {m}", st.name))
                })?,
                None => {
                    if !r.is_object() {
                        return Err(here(with_pos, "`with:` must be a mapping".into()));
                    }
                    // A custom kind: its described schema, at plan time.
                    if let Some(schema) = &info.config_schema {
                        super::schema::check(schema, &r).map_err(|v| {
                            let first = v.path.split('.').next().unwrap_or_default();
                            let pos = with.key_pos(first).unwrap_or(with_pos);
                            let field = if v.path.is_empty() { String::new() } else { format!("`{}` ", v.path) };
                            here(pos, format!("stage `{}` (kind `{uses}`): invalid `with:`: {field}{}", st.name, v.msg))
                        })?;
                    }
                    r.clone()
                }
            };
            let outputs = info.outputs_for(&full_run).map_err(|m| here(with_pos, m))?;
            // Key config: run config with env-derived fields symbolic, minus operational and path fields.
            let mut full_key = full_run.clone();
            for p in &key_paths {
                if let (Some(dst), Some(src)) = (json_get_mut(&mut full_key, p), json_get_ptr(&k, p)) {
                    *dst = src;
                }
            }
            for op in &info.operational {
                json_remove(&mut full_key, op);
            }
            let mut full_run = full_run;
            for pf in &info.path_fields {
                json_remove(&mut full_key, pf);
                if let Some(v) = json_get_mut(&mut full_run, pf) {
                    if let Some(s) = v.as_str().filter(|s| !s.is_empty()).map(str::to_string) {
                        let abs = normalize(&dir.join(&s));
                        if !abs.exists() {
                            missing.push((with.key_pos(pf).unwrap_or(with_pos), abs.clone()));
                        }
                        *v = Value::String(abs.to_string_lossy().into_owned());
                        inputs.insert(format!("with.{pf}"), vec![InputRef::Path { abs, shown: s }]);
                    }
                }
            }
            model_inputs = info.model_inputs.clone();
            let action = Action::Builtin { kind: uses.clone(), version: info.version, uses_device: info.uses_device, outputs };
            (action, full_key, full_run, device)
        }
        Body::Shell { cmd, deps, outs } => {
            // Outputs first: paths inside the pipeline dir, unique across the pipeline.
            let mut souts = Vec::new();
            let out_nodes: Vec<(Option<String>, &Node)> = match outs {
                Outs::List(v) => v.iter().map(|n| (None, n)).collect(),
                Outs::Named(m) => m.iter().map(|(k, _, n)| (Some(k.clone()), n)).collect(),
            };
            for (oname, n) in out_nodes {
                let (_, r) = it.value(n, 0, false)?;
                let rel = norm_rel(&scalar_text(&r));
                let abs = normalize(&dir.join(&rel));
                if !abs.starts_with(dir) || abs == dir {
                    return Err(here(n.pos, format!("output `{rel}` must stay inside the pipeline's directory")));
                }
                if let Some((other, _)) = out_paths.get(&abs) {
                    return Err(here(n.pos, format!("output `{rel}` is also an output of stage `{other}`")));
                }
                let name = oname.unwrap_or_else(|| rel.clone());
                out_paths.insert(abs.clone(), (ename.to_string(), name.clone()));
                souts.push(ShellOut { name, rel, abs });
            }
            // Deps.
            for d in deps {
                let src = source(&mut it, d, &mut missing, out_paths)?;
                if matches!(&src, InputRef::Output { stage, .. } if stage == ename) {
                    return Err(here(d.pos, "a stage cannot depend on its own output".into()));
                }
                inputs.insert(norm_rel(d.as_str().unwrap_or_default()), vec![src]);
            }
            // Command pieces: params/matrix interpolated, outputs and env kept as pieces.
            let text = cmd.as_str().unwrap_or_default();
            let mut pieces = Vec::new();
            for t in tokenize(text).map_err(|m| here(cmd.pos, m))? {
                match t {
                    Tok::Lit(l) => pieces.push(CmdPiece::Lit(l)),
                    Tok::Out(a, b) => {
                        let (stage, output) = find_out(&a, &b, cmd.pos)?;
                        let text = format!("${{{a}.{b}}}");
                        inputs.entry(text.clone()).or_insert_with(|| vec![InputRef::Output { stage: stage.clone(), output: output.clone() }]);
                        pieces.push(CmdPiece::Output { stage, output, text });
                    }
                    Tok::Env(v) => {
                        it.env(&v, cmd.pos)?;
                        pieces.push(CmdPiece::Env(v));
                    }
                    other => {
                        let n = Node::new(cmd.pos, Val::Str(tok_text(&other)));
                        let (_, r) = it.value(&n, 0, false)?;
                        pieces.push(CmdPiece::Lit(scalar_text(&r)));
                    }
                }
            }
            let key_cmd: String = pieces.iter().map(cmd_key_text).collect();
            let outs_json: Vec<Value> = souts.iter().map(|o| serde_json::json!({"name": o.name, "path": o.rel})).collect();
            let cfg = serde_json::json!({"cmd": key_cmd, "outs": outs_json});
            (Action::Shell { cmd: pieces, outs: souts }, cfg.clone(), cfg, None)
        }
    };
    if let Some((pos, p)) = missing.first() {
        if opts.allow_missing {
            for (pos, p) in &missing {
                warnings.push(format!("{}:{}:{}: input `{}` does not exist", file.display(), pos.line, pos.col, p.display()));
            }
        } else {
            return Err(here(*pos, format!("input `{}` does not exist", p.display())));
        }
    }
    // Seed: `seed:`, else `with.seed`, else `params.seed`, else 0. A null
    // `with.seed` (the serde default of `split`/`prompts`) counts as unset.
    let with_seed = config_run.get("seed").filter(|v| !v.is_null()).cloned();
    let seed_val = match &st.seed {
        Some(n) => Some((it.value(n, 0, false)?.1, n.pos)),
        None => with_seed.map(|v| (v, st.pos)).or_else(|| params.get("seed").map(|n| (n.to_json(), n.pos))),
    };
    let seed = match seed_val {
        None => 0,
        Some((v, pos)) => match v {
            Value::Number(n) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
            Value::String(s) if s.parse::<u64>().is_ok() => s.parse().unwrap_or(0),
            other => return Err(here(pos, format!("`seed` must be a non-negative integer, got {other}"))),
        },
    };
    warnings.append(&mut it.warnings);
    let mut deps: Vec<String> = inputs
        .values()
        .flatten()
        .filter_map(|r| if let InputRef::Output { stage, .. } = r { Some(stage.clone()) } else { None })
        .collect();
    deps.sort();
    deps.dedup();
    Ok(ResolvedStage {
        name: ename.to_string(),
        base: st.name.clone(),
        loc: Loc { file: file.to_path_buf(), pos: st.pos },
        matrix: combo.clone(),
        action,
        inputs,
        config_key,
        config_run,
        env_hashes: it.env_hashes,
        env_values: it.env_values,
        seed,
        device,
        gpus: st.gpus,
        deps,
        model_inputs,
        positions,
    })
}

fn tok_text(t: &Tok) -> String {
    match t {
        Tok::Lit(l) => l.clone(),
        Tok::Param(p) => format!("${{params.{}}}", p.join(".")),
        Tok::Env(v) => format!("${{env:{v}}}"),
        Tok::Matrix(k) => format!("${{matrix.{k}}}"),
        Tok::Out(a, b) => format!("${{{a}.{b}}}"),
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

fn json_get_ptr(v: &Value, dotted: &str) -> Option<Value> {
    dotted.split('.').try_fold(v, |cur, k| cur.get(k)).cloned()
}

/// Dotted paths where the key and run renderings differ (env-derived values).
fn diff_paths(k: &Value, r: &Value, prefix: String, out: &mut Vec<String>) {
    match (k, r) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, av) in a {
                if let Some(bv) = b.get(key) {
                    let p = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    diff_paths(av, bv, p, out);
                }
            }
        }
        _ if k != r => out.push(prefix),
        _ => {}
    }
}

/// Loads `with:` defaults for a kind: `extends:` (relative to the pipeline,
/// else the project root) or `ROOT/stages/KIND.yaml`; a defaults file may
/// itself `extends:` another.
fn load_defaults(
    file: &Path,
    dir: &Path,
    root: &Path,
    kind: &str,
    extends: Option<&(String, Pos)>,
    info: &KindInfo,
    depth: usize,
) -> Result<Node, PipelineError> {
    let empty = Node::new(Pos::default(), Val::Map(vec![]));
    if depth > 8 {
        return Err(PipelineError::new(file, Pos::default(), "`extends:` chain is too long (a loop?)"));
    }
    let path = match extends {
        Some((p, pos)) => {
            let a = normalize(&dir.join(p));
            let b = normalize(&root.join(p));
            if a.is_file() {
                a
            } else if b.is_file() {
                b
            } else {
                return Err(PipelineError::new(file, *pos, format!("defaults file `{p}` not found (looked in {} and {})", dir.display(), root.display())));
            }
        }
        None => {
            let p = root.join("stages").join(format!("{kind}.yaml"));
            if !p.is_file() {
                return Ok(empty);
            }
            p
        }
    };
    let mut n = yaml::load(&path).map_err(|(loc, msg)| PipelineError { loc, msg })?;
    if matches!(n.val, Val::Null) {
        return Ok(empty);
    }
    if !matches!(n.val, Val::Map(_)) {
        return Err(PipelineError::new(&path, n.pos, format!("a defaults file holds the `with:` mapping of kind `{kind}`")));
    }
    let fdir = path.parent().unwrap_or(root).to_path_buf();
    let mut base = empty;
    if let Val::Map(m) = &mut n.val {
        if let Some(i) = m.iter().position(|(k, _, _)| k == "extends") {
            let (_, _, e) = m.remove(i);
            let s = e.as_str().ok_or_else(|| PipelineError::new(&path, e.pos, "`extends` must be a path"))?;
            base = load_defaults(&path, &fdir, root, kind, Some(&(s.to_string(), e.pos)), info, depth + 1)?;
        }
        // Path fields in a defaults file are relative to that file.
        for pf in &info.path_fields {
            let parts: Vec<&str> = pf.split('.').collect();
            abs_field(m, &parts, &fdir);
        }
    }
    merge(&mut base, &n);
    Ok(base)
}

/// Makes the path-valued field at `parts` absolute relative to `fdir`.
fn abs_field(m: &mut [(String, Pos, Node)], parts: &[&str], fdir: &Path) {
    let Some((_, _, node)) = m.iter_mut().find(|(k, _, _)| k == parts[0]) else { return };
    if parts.len() > 1 {
        if let Val::Map(mm) = &mut node.val {
            abs_field(mm, &parts[1..], fdir);
        }
        return;
    }
    if let Val::Str(s) = &mut node.val {
        if !s.contains("${") && !s.is_empty() {
            *s = normalize(&fdir.join(&*s)).to_string_lossy().into_owned();
        }
    }
}

/// The kind of a resolved output: file or dir (shell outputs are decided by what exists).
pub fn output_kind(stage: &ResolvedStage, output: &str) -> Option<OutputKind> {
    match &stage.action {
        Action::Builtin { outputs, .. } => outputs.iter().find(|o| o.name == output).map(|o| o.kind.clone()),
        Action::Shell { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_reads_every_reference_form() {
        let t = tokenize("a ${params.x.y} $${lit} ${env:HOME} ${matrix.seed} ${st.out} $5").unwrap();
        assert!(t.contains(&Tok::Param(vec!["x".into(), "y".into()])), "params path");
        assert!(t.contains(&Tok::Env("HOME".into())), "env var");
        assert!(t.contains(&Tok::Matrix("seed".into())), "matrix key");
        assert!(t.contains(&Tok::Out("st".into(), "out".into())), "stage output");
        assert!(t.iter().any(|x| matches!(x, Tok::Lit(l) if l.contains("${lit}"))), "$${{ escapes");
        assert!(tokenize("${nodot}").is_err(), "a bare name is not a reference");
        assert!(tokenize("${a.b").is_err(), "unterminated reference");
    }

    /// Issue 14: `with.seed` defaults to null in `split` and `prompts`; that null
    /// once shadowed `params.seed` and failed "`seed` must be a non-negative integer".
    #[test]
    fn issue14_split_and_prompts_default_to_the_pipeline_seed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("recflow.toml"), "").unwrap();
        std::fs::write(d.path().join("t.md"), "{history}").unwrap();
        let yaml = "params: {seed: 7}\nstages:\n  ingest: {uses: ingest, with: {format: synthetic}}\n  split:\n    uses: split\n    inputs: {interactions: \"${ingest.interactions}\"}\n  prompts:\n    uses: prompts\n    inputs: {train: \"${split.train}\", valid: \"${split.valid}\", test: \"${split.test}\", items: \"${ingest.items}\"}\n    with: {template: t.md}\n  split2:\n    uses: split\n    inputs: {interactions: \"${ingest.interactions}\"}\n    with: {strategy: random, seed: 3}\n";
        std::fs::write(d.path().join("p.yaml"), yaml).unwrap();
        let p = load(&d.path().join("p.yaml"), &Options::default()).unwrap_or_else(|e| panic!("resolves: {e}"));
        let seed = |n: &str| p.stages.iter().find(|s| s.name == n).map(|s| s.seed);
        assert_eq!(seed("split"), Some(7), "split without `seed:` takes params.seed");
        assert_eq!(seed("prompts"), Some(7), "prompts without `seed:` takes params.seed");
        assert_eq!(seed("split2"), Some(3), "an explicit with.seed still wins over params.seed");
    }

    #[test]
    fn normalize_keeps_every_leading_parent() {
        let n = |s: &str| normalize(Path::new(s));
        assert_eq!(n("../../x"), PathBuf::from("../../x"), "a second `..` must not cancel the first");
        assert_eq!(n("a/../../x"), PathBuf::from("../x"), "`..` cancels a name");
        assert_eq!(n("./a/./b/../c"), PathBuf::from("a/c"), "`.` vanishes");
        assert_eq!(n("/a/../../b"), PathBuf::from("/b"), "nothing climbs above the root");
    }

    #[test]
    fn product_is_sorted_by_key_and_stable_in_values() {
        let mut d = BTreeMap::new();
        d.insert("seed".to_string(), vec![Value::from(2), Value::from(1)]);
        d.insert("lr".to_string(), vec![Value::from("a b")]);
        let p = product(&d);
        assert_eq!(p.len(), 2, "2 × 1 combinations");
        assert_eq!(p[0]["seed"], Value::from(2), "declared value order kept");
        assert_eq!(file_safe(&Value::from("a b/c")), "a_b_c", "names are file-name safe");
    }
}
