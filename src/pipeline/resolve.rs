//! Spec → resolved stages: params and overrides, `stages/KIND.yaml`
//! defaults (`extends:`, in `defaults`), `${...}` interpolation (in
//! `interp`), matrix expansion and propagation, stage metadata
//! checks (against [`super::kinds`]). Pure apart from reading the pipeline,
//! defaults and params files (and asking a custom worker `describe --json`).
//!
//! Two renderings of every interpolated value are kept: the *run* value
//! (what the stage sees) and the *key* value, where `${env:VAR}` stays
//! symbolic so an env value never reaches a key, a lock or the store — the
//! value enters keys only as its hash ([`ResolvedStage::env_hashes`]).
//!
//! The steps run in a fixed order — overrides, worker and kinds, the
//! spec-level graph, matrix dims, then each expansion in topological order —
//! and the first mistake wins, so that order is part of what users see.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::defaults::{load_defaults, merge, set_path};
use super::interp::{refs_in, scalar_text, tok_text, tokenize, Interp, Tok};
use super::kinds::{kinds_for, KindInfo};
use super::normalize;
use super::resolved::{cmd_key_text, Action, CmdPiece, InputRef, Options, Pipeline, ResolvedStage, ShellOut};
use super::spec::{Body, Outs, PipelineSpec, StageSpec};
use super::yaml::{self, Loc, Node, Pos, Val};
use super::PipelineError;
use crate::stages::model_files::ModelForm;

/// Base stage → its expansions (matrix combination, expanded name).
type Expansions = BTreeMap<String, Vec<(BTreeMap<String, Value>, String)>>;
/// Base stage → matrix key → values (own and inherited).
type Dims = BTreeMap<String, BTreeMap<String, Vec<Value>>>;
/// Base stage → the base stages its text refers to.
type BaseEdges = BTreeMap<String, Vec<BaseRef>>;
/// Absolute shell-output path → (expanded stage, output name), so a later
/// stage naming that path depends on the stage that writes it.
type OutPaths = BTreeMap<PathBuf, (String, String)>;
/// A stage body resolved: action, key config, run config, device.
type Body4 = (Action, Value, Value, Option<String>);

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
    let set_warnings = apply_overrides(&mut spec, opts, &root)?;

    let store_dir = crate::cache::store_dir(&root);
    let worker = find_worker(&spec, &file, &dir)?;
    let kinds = kinds_for(worker.as_deref(), &store_dir).map_err(|m| {
        PipelineError::new(&file, spec.worker.as_ref().map(|w| w.1).unwrap_or_default(), m)
    })?;

    let mut r = Resolver {
        spec: &spec,
        opts,
        file: &file,
        dir: &dir,
        root: &root,
        kinds,
        done: Vec::new(),
        expansions: BTreeMap::new(),
        out_paths: BTreeMap::new(),
        warnings: set_warnings,
    };
    let base_edges = r.base_edges()?;
    let order = r.order(&base_edges)?;
    let dims = r.matrix_dims(&order, &base_edges)?;
    r.expand(&order, &dims)?;
    let params = r.params_key()?;
    let Resolver { done: stages, warnings, .. } = r;
    Ok(Pipeline { name: spec.name, file, dir, root, params, worker, stages, warnings })
}

// ---------------------------------------------------------------- overrides

/// `--params FILE`, then each `--set`, in order, onto the spec. Returns the
/// warnings the overrides earn.
fn apply_overrides(spec: &mut PipelineSpec, opts: &Options, root: &Path) -> Result<Vec<String>, PipelineError> {
    if let Some(pf) = &opts.params_file {
        let n = yaml::load(pf).map_err(|(loc, msg)| PipelineError { loc, msg })?;
        if !matches!(n.val, Val::Map(_)) {
            return Err(PipelineError::new(pf, n.pos, "a --params file must be a mapping of params"));
        }
        merge(&mut spec.params, &n);
    }
    let mut set_warnings = Vec::new();
    for s in &opts.sets {
        apply_set(spec, s, root, &mut set_warnings)?;
    }
    Ok(set_warnings)
}

/// One `--set PATH=VALUE`: VALUE is YAML when it parses, else the raw string.
fn apply_set(spec: &mut PipelineSpec, s: &str, root: &Path, set_warnings: &mut Vec<String>) -> Result<(), PipelineError> {
    let set_loc = |m: String| PipelineError::new(Path::new("--set"), Pos::default(), format!("`{s}`: {m}"));
    let (path, raw) = s.split_once('=').ok_or_else(|| set_loc("expected PATH=VALUE".into()))?;
    // The lock spells such a path relative to the pipeline when it lies
    // under the project (`lock::spell_path`); elsewhere it cannot.
    if Path::new(raw).is_absolute() && !normalize(Path::new(raw)).starts_with(root) {
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
    Ok(())
}

/// The `worker:` binary, relative to the pipeline; it must exist before
/// anything asks it to describe its kinds.
fn find_worker(spec: &PipelineSpec, file: &Path, dir: &Path) -> Result<Option<PathBuf>, PipelineError> {
    let Some((w, pos)) = &spec.worker else { return Ok(None) };
    let p = normalize(&dir.join(w));
    if !p.is_file() {
        return Err(PipelineError::new(
            file,
            *pos,
            format!("worker binary `{}` not found (build it first, e.g. `cargo build --example ...`)", p.display()),
        ));
    }
    Ok(Some(p))
}

// ---------------------------------------------------------------- the resolver

/// What resolving one pipeline shares across its steps: the (overridden)
/// spec, where it lives, the kinds it may use, and the stages resolved so far.
struct Resolver<'a> {
    spec: &'a PipelineSpec,
    opts: &'a Options,
    file: &'a Path,
    /// The pipeline's directory: relative paths in it are relative to this.
    dir: &'a Path,
    /// The project root: `stages/KIND.yaml` defaults live under it.
    root: &'a Path,
    kinds: BTreeMap<String, KindInfo>,
    /// Expanded stages resolved so far, in order; every upstream stage of
    /// the one being resolved is among them.
    done: Vec<ResolvedStage>,
    expansions: Expansions,
    out_paths: OutPaths,
    warnings: Vec<String>,
}

/// One expansion being resolved: its interpolation context and what its
/// steps collect.
struct Draft<'s> {
    st: &'s StageSpec,
    ename: &'s str,
    combo: &'s BTreeMap<String, Value>,
    it: Interp<'s>,
    inputs: BTreeMap<String, Vec<InputRef>>,
    model_inputs: BTreeMap<String, ModelForm>,
    positions: BTreeMap<String, Pos>,
    /// Input paths that do not exist, reported together once the body is
    /// resolved (one error, or one warning each under `allow_missing`).
    missing: Vec<(Pos, PathBuf)>,
}

impl<'a> Resolver<'a> {
    fn err(&self, pos: Pos, msg: impl Into<String>) -> PipelineError {
        PipelineError::new(self.file, pos, msg)
    }

    fn spec_stage(&self, name: &str) -> &'a StageSpec {
        let spec: &'a PipelineSpec = self.spec;
        spec.stages.iter().find(|s| s.name == name).expect("ordered from spec")
    }

    // ------------------------------------------------------------ spec-level graph

    /// Edges over base names; a reference to a stage that does not exist is
    /// reported here, before any matrix is expanded.
    fn base_edges(&self) -> Result<BaseEdges, PipelineError> {
        let names: BTreeSet<String> = self.spec.stages.iter().map(|s| s.name.clone()).collect();
        // Shell outputs by path: a `deps:` entry naming one is an edge too.
        let mut out_owner: BTreeMap<String, String> = BTreeMap::new();
        for st in &self.spec.stages {
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
        let mut base_edges: BaseEdges = BTreeMap::new();
        for st in &self.spec.stages {
            let refs = base_refs(st, &out_owner);
            for r in &refs {
                if !names.contains(&r.stage) {
                    return Err(self.err(r.pos, format!("stage `{}` refers to unknown stage `{}`", st.name, r.stage)));
                }
            }
            base_edges.insert(st.name.clone(), refs);
        }
        Ok(base_edges)
    }

    /// Base stages in a topological order; cycles are found at this level
    /// because a matrix cannot expand a loop away.
    fn order(&self, base_edges: &BaseEdges) -> Result<Vec<String>, PipelineError> {
        let edges: Vec<(String, String)> =
            base_edges.iter().flat_map(|(to, rs)| rs.iter().map(move |r| (r.stage.clone(), to.clone()))).collect();
        let spec_order: Vec<String> = self.spec.stages.iter().map(|s| s.name.clone()).collect();
        super::graph::topo_or_cycle(&spec_order, &edges).map_err(|cycle| {
            let st = self.spec.stages.iter().find(|s| s.name == cycle[0]).map(|s| s.pos).unwrap_or_default();
            self.err(st, format!("dependency cycle: {}", cycle.join(" -> ")))
        })
    }

    // ------------------------------------------------------------ matrix

    /// Matrix dims per base stage: its own, plus those inherited through
    /// non-`all` references (an `all:` input gathers every expansion instead).
    fn matrix_dims(&self, order: &[String], base_edges: &BaseEdges) -> Result<Dims, PipelineError> {
        let mut dims: Dims = BTreeMap::new();
        for name in order {
            let st = self.spec_stage(name);
            let mut d: BTreeMap<String, Vec<Value>> = BTreeMap::new();
            let mut origin: BTreeMap<String, String> = BTreeMap::new();
            for (k, kp, vals) in &st.matrix {
                let vs: Vec<Value> = vals.iter().map(|n| n.to_json()).collect();
                let safe: BTreeSet<String> = vs.iter().map(file_safe).collect();
                if safe.len() != vs.len() {
                    return Err(self.err(*kp, format!("matrix `{k}` has values that give the same stage name")));
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
                            return Err(self.err(
                                pos,
                                format!("matrix key `{k}` of stage `{name}` clashes with the matrix `{k}` inherited from `{}`", r.stage),
                            ));
                        }
                    }
                }
            }
            dims.insert(name.clone(), d);
        }
        Ok(dims)
    }

    // ------------------------------------------------------------ expansion

    /// Expands and resolves each base stage in order, so every upstream
    /// expansion is in `done` before a stage refers to it.
    fn expand(&mut self, order: &[String], dims: &Dims) -> Result<(), PipelineError> {
        for name in order {
            let st = self.spec_stage(name);
            let mut exps = Vec::new();
            for combo in product(&dims[name]) {
                let ename = expanded_name(name, &combo);
                let rs = self.stage(st, &ename, &combo)?;
                exps.push((combo, ename));
                self.done.push(rs);
            }
            self.expansions.insert(name.clone(), exps);
        }
        Ok(())
    }

    /// Params as the lock records them: env symbolic, a missing env var no error.
    fn params_key(&self) -> Result<Value, PipelineError> {
        let no_matrix = BTreeMap::new();
        let mut it = Interp::new(self.file, &self.spec.params, &no_matrix, true);
        Ok(it.value(&self.spec.params, 0, false)?.0)
    }

    // ------------------------------------------------------------ one stage

    /// Resolves one expansion: its body (built-in or shell), then what both
    /// share — missing inputs, seed, upstream stages.
    fn stage(&mut self, st: &StageSpec, ename: &str, combo: &BTreeMap<String, Value>) -> Result<ResolvedStage, PipelineError> {
        let spec: &'a PipelineSpec = self.spec;
        let mut d = Draft {
            st,
            ename,
            combo,
            it: Interp::new(self.file, &spec.params, combo, self.opts.allow_missing),
            inputs: BTreeMap::new(),
            model_inputs: BTreeMap::new(),
            positions: BTreeMap::new(),
            missing: Vec::new(),
        };
        let (action, config_key, config_run, device) = match &st.body {
            Body::Builtin { uses, uses_pos, inputs, with, extends } => {
                self.builtin(&mut d, uses, *uses_pos, inputs, with, extends.as_ref())?
            }
            Body::Shell { cmd, deps, outs } => self.shell(&mut d, cmd, deps, outs)?,
        };
        self.report_missing(&d.missing)?;
        let seed = self.seed(&mut d, &config_run)?;
        self.warnings.append(&mut d.it.warnings);
        let deps = upstream_stages(&d.inputs);
        Ok(ResolvedStage {
            name: ename.to_string(),
            base: st.name.clone(),
            loc: Loc { file: self.file.to_path_buf(), pos: st.pos },
            matrix: combo.clone(),
            action,
            inputs: d.inputs,
            config_key,
            config_run,
            env_hashes: d.it.env_hashes,
            env_values: d.it.env_values,
            seed,
            device,
            resources: st.resources.clone(),
            deps,
            model_inputs: d.model_inputs,
            positions: d.positions,
        })
    }

    /// Absent input paths: an error at the first, or (`allow_missing`) a warning each.
    fn report_missing(&mut self, missing: &[(Pos, PathBuf)]) -> Result<(), PipelineError> {
        let Some((pos, p)) = missing.first() else { return Ok(()) };
        if !self.opts.allow_missing {
            return Err(self.err(*pos, format!("input `{}` does not exist", p.display())));
        }
        for (pos, p) in missing {
            self.warnings.push(format!("{}:{}:{}: input `{}` does not exist", self.file.display(), pos.line, pos.col, p.display()));
        }
        Ok(())
    }

    /// Seed: `seed:`, else `with.seed`, else `params.seed`, else 0. A null
    /// `with.seed` (the serde default of `split`/`prompts`) counts as unset.
    fn seed(&self, d: &mut Draft, config_run: &Value) -> Result<u64, PipelineError> {
        let with_seed = config_run.get("seed").filter(|v| !v.is_null()).cloned();
        let seed_val = match &d.st.seed {
            Some(n) => Some((d.it.value(n, 0, false)?.1, n.pos)),
            None => with_seed.map(|v| (v, d.st.pos)).or_else(|| self.spec.params.get("seed").map(|n| (n.to_json(), n.pos))),
        };
        Ok(match seed_val {
            None => 0,
            Some((v, pos)) => match v {
                Value::Number(n) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
                Value::String(s) if s.parse::<u64>().is_ok() => s.parse().unwrap_or(0),
                other => return Err(self.err(pos, format!("`seed` must be a non-negative integer, got {other}"))),
            },
        })
    }

    // ------------------------------------------------------------ references to upstream outputs

    /// `${A.b}` → the expansion of A matching this stage's matrix combination.
    fn find_out(&self, d: &Draft, a: &str, b: &str, pos: Pos) -> Result<(String, String), PipelineError> {
        let exps = self.expansions.get(a).ok_or_else(|| self.err(pos, format!("unknown stage `{a}`")))?;
        let (_, en) = exps
            .iter()
            .find(|(c, _)| c.iter().all(|(k, v)| d.combo.get(k) == Some(v)))
            .ok_or_else(|| self.err(pos, format!("no expansion of `{a}` matches `{}`", d.ename)))?;
        self.check_output(a, en, b, pos)?;
        Ok((en.clone(), b.to_string()))
    }

    /// `{all: ${A.b}}` → output `b` of every expansion of A.
    fn all_outs(&self, a: &str, b: &str, pos: Pos) -> Result<Vec<InputRef>, PipelineError> {
        let exps = self.expansions.get(a).ok_or_else(|| self.err(pos, format!("unknown stage `{a}`")))?;
        let mut v = Vec::new();
        for (_, en) in exps {
            self.check_output(a, en, b, pos)?;
            v.push(InputRef::Output { stage: en.clone(), output: b.to_string() });
        }
        Ok(v)
    }

    /// The resolved expansion `en` of base stage `a` declares output `b`.
    fn check_output(&self, a: &str, en: &str, b: &str, pos: Pos) -> Result<(), PipelineError> {
        let up = self.done.iter().find(|s| s.name == en).expect("upstream resolved first");
        if !up.output_names().iter().any(|o| o == b) {
            return Err(self.err(pos, format!("stage `{a}` has no output `{b}` (outputs: {})", up.output_names().join(", "))));
        }
        Ok(())
    }

    /// A path or `${STAGE.OUTPUT}` string → an input source. A path that
    /// another stage writes is that stage's output, so it becomes an edge.
    fn source(&self, d: &mut Draft, n: &Node) -> Result<InputRef, PipelineError> {
        let s = n.as_str().ok_or_else(|| self.err(n.pos, format!("an input must be a path or `${{STAGE.OUTPUT}}`, got {}", n.type_name())))?;
        let toks = tokenize(s).map_err(|m| self.err(n.pos, m))?;
        if let [Tok::Out(a, b)] = toks.as_slice() {
            let (stage, output) = self.find_out(d, a, b, n.pos)?;
            return Ok(InputRef::Output { stage, output });
        }
        if toks.iter().any(|t| matches!(t, Tok::Out(..))) {
            return Err(self.err(n.pos, "a stage output reference must be the whole input value"));
        }
        let (_, run) = d.it.string(s, n.pos, 0)?;
        let p = scalar_text(&run);
        let abs = normalize(&self.dir.join(&p));
        if let Some((stage, output)) = self.out_paths.get(&abs) {
            return Ok(InputRef::Output { stage: stage.clone(), output: output.clone() });
        }
        if !abs.exists() {
            d.missing.push((n.pos, abs.clone()));
        }
        Ok(InputRef::Path { abs, shown: p })
    }

    // ------------------------------------------------------------ built-in kinds

    /// A stage of a built-in or worker-described kind. Step order matters for
    /// which mistake is reported first and for the order of env warnings.
    fn builtin(
        &self,
        d: &mut Draft,
        uses: &str,
        uses_pos: Pos,
        ins: &[(String, Pos, Node)],
        with: &Node,
        extends: Option<&(String, Pos)>,
    ) -> Result<Body4, PipelineError> {
        let info = self.kind(uses, uses_pos)?;
        let (k, mut r, key_paths) = self.with_config(d, uses, extends, info, with)?;
        self.builtin_inputs(d, info, uses, ins)?;
        let device = self.device(d.ename, info, d.st.resources.gpus, &mut r);
        if let Val::Map(m) = &with.val {
            d.positions.extend(m.iter().map(|(k, p, _)| (format!("with.{k}"), *p)));
        }
        let full_run = self.check_config(d.st, info, uses, with, &r)?;
        let outputs = info.outputs_for(&full_run).map_err(|m| self.err(with.pos, m))?;
        let mut full_key = key_config(info, &full_run, &k, &key_paths);
        let mut full_run = full_run;
        self.path_fields(d, info, with, &mut full_key, &mut full_run);
        d.model_inputs = info.model_inputs.clone();
        let action = Action::Builtin { kind: uses.to_string(), version: info.version, uses_device: info.uses_device, outputs };
        Ok((action, full_key, full_run, device))
    }

    fn kind(&self, uses: &str, uses_pos: Pos) -> Result<&KindInfo, PipelineError> {
        self.kinds.get(uses).ok_or_else(|| {
            let known: Vec<&str> = self.kinds.keys().map(|s| s.as_str()).collect();
            self.err(
                uses_pos,
                format!(
                    "unknown stage kind `{uses}` (known: {}; custom kinds need a `worker:` that describes them)",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ),
            )
        })
    }

    /// `with:` over its defaults (stages/KIND.yaml or `extends:`, path fields
    /// made absolute relative to the defaults file), interpolated → (key
    /// value, run value, dotted paths where the two differ).
    fn with_config(
        &self,
        d: &mut Draft,
        uses: &str,
        extends: Option<&(String, Pos)>,
        info: &KindInfo,
        with: &Node,
    ) -> Result<(Value, Value, Vec<String>), PipelineError> {
        let mut merged = load_defaults(self.file, self.dir, self.root, uses, extends, info, 0)?;
        merge(&mut merged, with);
        let mut key_paths: Vec<String> = Vec::new();
        let (k, r) = d.it.value(&merged, 0, false)?;
        diff_paths(&k, &r, String::new(), &mut key_paths);
        Ok((k, r, key_paths))
    }

    /// `inputs:` against the kind's declared inputs: known names, one path
    /// unless the input takes many, required ones present.
    fn builtin_inputs(&self, d: &mut Draft, info: &KindInfo, uses: &str, ins: &[(String, Pos, Node)]) -> Result<(), PipelineError> {
        for (iname, ipos, inode) in ins {
            let spec_in = info.inputs.iter().find(|x| &x.name == iname).ok_or_else(|| {
                let names: Vec<&str> = info.inputs.iter().map(|x| x.name.as_str()).collect();
                self.err(*ipos, format!("stage kind `{uses}` has no input `{iname}` (inputs: {})", names.join(", ")))
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
                        match tokenize(s).map_err(|m| self.err(inner.pos, m))?.as_slice() {
                            [Tok::Out(a, b)] => srcs.extend(self.all_outs(a, b, inner.pos)?),
                            _ => return Err(self.err(inner.pos, "`all:` takes one `${STAGE.OUTPUT}` reference")),
                        }
                    }
                    None => srcs.push(self.source(d, item)?),
                }
            }
            if !spec_in.many && (is_list || srcs.len() != 1) {
                return Err(self.err(inode.pos, format!("input `{iname}` of kind `{uses}` takes one path, not a list")));
            }
            d.inputs.insert(iname.clone(), srcs);
            d.positions.insert(iname.clone(), *ipos);
        }
        for i in &info.inputs {
            if i.required && !d.inputs.contains_key(&i.name) {
                return Err(self.err(d.st.pos, format!("stage `{}` (kind `{uses}`) needs input `{}`", d.st.name, i.name)));
            }
        }
        Ok(())
    }

    /// Device: `auto` resolved here, without libtorch — to the device the
    /// lock recorded for this stage when asked (`status --check`), else this
    /// machine's.
    fn device(&self, ename: &str, info: &KindInfo, gpus: u32, r: &mut Value) -> Option<String> {
        if !info.uses_device {
            return None;
        }
        let d = r.get("device").and_then(|d| d.as_str()).unwrap_or("auto").to_string();
        let here = || match (self.opts.on_cluster, gpus) {
            (false, _) => super::resolve_auto_device().to_string(),
            (true, 0) => "cpu".to_string(),
            (true, _) => "cuda".to_string(),
        };
        let d = if d == "auto" {
            self.opts.recorded_devices.get(ename).cloned().unwrap_or_else(here)
        } else {
            d
        };
        if let Some(o) = r.as_object_mut() {
            o.insert("device".into(), Value::String(d.clone()));
        }
        Some(d)
    }

    /// Config check (defaults, types, ranges) on the run value: the built-in
    /// kind's own parser, or a custom kind's described schema, at plan time.
    fn check_config(&self, st: &StageSpec, info: &KindInfo, uses: &str, with: &Node, r: &Value) -> Result<Value, PipelineError> {
        let with_pos = with.pos;
        match info.check {
            Some(check) => check(r).map_err(|m| {
                // Point at the offending field when serde names it.
                let pos = m.split('`').nth(1).and_then(|f| with.key_pos(f)).unwrap_or(with_pos);
                self.err(pos, format!("stage `{}` (kind `{uses}`): invalid `with:`: {m}", st.name))
            }),
            None => {
                if !r.is_object() {
                    return Err(self.err(with_pos, "`with:` must be a mapping"));
                }
                if let Some(schema) = &info.config_schema {
                    super::schema::check(schema, r).map_err(|v| {
                        let first = v.path.split('.').next().unwrap_or_default();
                        let pos = with.key_pos(first).unwrap_or(with_pos);
                        let field = if v.path.is_empty() { String::new() } else { format!("`{}` ", v.path) };
                        self.err(pos, format!("stage `{}` (kind `{uses}`): invalid `with:`: {field}{}", st.name, v.msg))
                    })?;
                }
                Ok(r.clone())
            }
        }
    }

    /// Path fields: absolute in the run config, inputs of the stage (so their
    /// content is hashed), and out of the key config (a path is not content).
    fn path_fields(&self, d: &mut Draft, info: &KindInfo, with: &Node, full_key: &mut Value, full_run: &mut Value) {
        for pf in &info.path_fields {
            json_remove(full_key, pf);
            if let Some(v) = json_get_mut(full_run, pf) {
                if let Some(s) = v.as_str().filter(|s| !s.is_empty()).map(str::to_string) {
                    let abs = normalize(&self.dir.join(&s));
                    if !abs.exists() {
                        d.missing.push((with.key_pos(pf).unwrap_or(with.pos), abs.clone()));
                    }
                    *v = Value::String(abs.to_string_lossy().into_owned());
                    d.inputs.insert(format!("with.{pf}"), vec![InputRef::Path { abs, shown: s }]);
                }
            }
        }
    }

    // ------------------------------------------------------------ shell stages

    /// A shell stage: outputs, deps, command; its config is the command as
    /// keyed plus its outputs.
    fn shell(&mut self, d: &mut Draft, cmd: &Node, deps: &[Node], outs: &Outs) -> Result<Body4, PipelineError> {
        let souts = self.shell_outputs(d, outs)?;
        for dep in deps {
            let src = self.source(d, dep)?;
            if matches!(&src, InputRef::Output { stage, .. } if stage == d.ename) {
                return Err(self.err(dep.pos, "a stage cannot depend on its own output"));
            }
            d.inputs.insert(norm_rel(dep.as_str().unwrap_or_default()), vec![src]);
        }
        let pieces = self.shell_cmd(d, cmd)?;
        let key_cmd: String = pieces.iter().map(cmd_key_text).collect();
        let outs_json: Vec<Value> = souts.iter().map(|o| serde_json::json!({"name": o.name, "path": o.rel})).collect();
        let cfg = serde_json::json!({"cmd": key_cmd, "outs": outs_json});
        Ok((Action::Shell { cmd: pieces, outs: souts }, cfg.clone(), cfg, None))
    }

    /// Outputs first (deps may name them): paths inside the pipeline dir,
    /// unique across the pipeline.
    fn shell_outputs(&mut self, d: &mut Draft, outs: &Outs) -> Result<Vec<ShellOut>, PipelineError> {
        let mut souts = Vec::new();
        let out_nodes: Vec<(Option<String>, &Node)> = match outs {
            Outs::List(v) => v.iter().map(|n| (None, n)).collect(),
            Outs::Named(m) => m.iter().map(|(k, _, n)| (Some(k.clone()), n)).collect(),
        };
        for (oname, n) in out_nodes {
            let (_, r) = d.it.value(n, 0, false)?;
            let rel = norm_rel(&scalar_text(&r));
            let abs = normalize(&self.dir.join(&rel));
            if !abs.starts_with(self.dir) || abs == self.dir {
                return Err(self.err(n.pos, format!("output `{rel}` must stay inside the pipeline's directory")));
            }
            if let Some((other, _)) = self.out_paths.get(&abs) {
                return Err(self.err(n.pos, format!("output `{rel}` is also an output of stage `{other}`")));
            }
            let name = oname.unwrap_or_else(|| rel.clone());
            self.out_paths.insert(abs.clone(), (d.ename.to_string(), name.clone()));
            souts.push(ShellOut { name, rel, abs });
        }
        Ok(souts)
    }

    /// Command pieces: params/matrix interpolated, outputs and env kept as
    /// pieces (the executor fills them in; the key keeps them symbolic).
    fn shell_cmd(&self, d: &mut Draft, cmd: &Node) -> Result<Vec<CmdPiece>, PipelineError> {
        let text = cmd.as_str().unwrap_or_default();
        let mut pieces = Vec::new();
        for t in tokenize(text).map_err(|m| self.err(cmd.pos, m))? {
            match t {
                Tok::Lit(l) => pieces.push(CmdPiece::Lit(l)),
                Tok::Out(a, b) => {
                    let (stage, output) = self.find_out(d, &a, &b, cmd.pos)?;
                    let text = format!("${{{a}.{b}}}");
                    d.inputs.entry(text.clone()).or_insert_with(|| vec![InputRef::Output { stage: stage.clone(), output: output.clone() }]);
                    pieces.push(CmdPiece::Output { stage, output, text });
                }
                Tok::Env(v) => {
                    d.it.env(&v, cmd.pos)?;
                    pieces.push(CmdPiece::Env(v));
                }
                other => {
                    let n = Node::new(cmd.pos, Val::Str(tok_text(&other)));
                    let (_, r) = d.it.value(&n, 0, false)?;
                    pieces.push(CmdPiece::Lit(scalar_text(&r)));
                }
            }
        }
        Ok(pieces)
    }
}

// ---------------------------------------------------------------- spec-level references

/// Edges of the spec-level graph: which base stages a stage's text refers to.
struct BaseRef {
    stage: String,
    all: bool,
    pos: Pos,
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

/// Upstream expanded stages of a stage, from its inputs: sorted, once each.
fn upstream_stages(inputs: &BTreeMap<String, Vec<InputRef>>) -> Vec<String> {
    let mut deps: Vec<String> = inputs
        .values()
        .flatten()
        .filter_map(|r| if let InputRef::Output { stage, .. } = r { Some(stage.clone()) } else { None })
        .collect();
    deps.sort();
    deps.dedup();
    deps
}

// ---------------------------------------------------------------- matrix helpers

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

/// `name@k1=v1,k2=v2` (keys sorted), or the bare name without a matrix.
fn expanded_name(name: &str, combo: &BTreeMap<String, Value>) -> String {
    if combo.is_empty() {
        return name.to_string();
    }
    let tail: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={}", file_safe(v))).collect();
    format!("{name}@{}", tail.join(","))
}

/// Makes a matrix value safe inside a file name.
pub fn file_safe(v: &Value) -> String {
    scalar_text(v).chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

// ---------------------------------------------------------------- config JSON helpers

/// The key config: the run config with env-derived fields put back symbolic
/// (from the key rendering `k`), minus operational fields (they change how a
/// stage runs, not what it computes).
fn key_config(info: &KindInfo, full_run: &Value, k: &Value, key_paths: &[String]) -> Value {
    let mut full_key = full_run.clone();
    for p in key_paths {
        if let (Some(dst), Some(src)) = (json_get_mut(&mut full_key, p), json_get_ptr(k, p)) {
            *dst = src;
        }
    }
    for op in &info.operational {
        json_remove(&mut full_key, op);
    }
    full_key
}

fn json_get_ptr(v: &Value, dotted: &str) -> Option<Value> {
    dotted.split('.').try_fold(v, |cur, k| cur.get(k)).cloned()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14: `with.seed` defaults to null in `split` and `prompts`; that null
    /// once shadowed `params.seed` and failed "`seed` must be a non-negative integer".
    #[test]
    fn issue14_split_and_prompts_default_to_the_pipeline_seed() {
        let yaml = "params: {seed: 7}\nstages:\n  ingest: {uses: ingest, with: {format: synthetic}}\n  split:\n    uses: split\n    inputs: {interactions: \"${ingest.interactions}\"}\n  prompts:\n    uses: prompts\n    inputs: {train: \"${split.train}\", valid: \"${split.valid}\", test: \"${split.test}\", items: \"${ingest.items}\"}\n    with: {template: t.md}\n  split2:\n    uses: split\n    inputs: {interactions: \"${ingest.interactions}\"}\n    with: {strategy: random, seed: 3}\n";
        let (_d, p) = crate::pipeline::load_in_tempdir(yaml, &[("t.md", "{history}")], &Options::default());
        let p = p.unwrap_or_else(|e| panic!("resolves: {e}"));
        let seed = |n: &str| p.stages.iter().find(|s| s.name == n).map(|s| s.seed);
        assert_eq!(seed("split"), Some(7), "split without `seed:` takes params.seed");
        assert_eq!(seed("prompts"), Some(7), "prompts without `seed:` takes params.seed");
        assert_eq!(seed("split2"), Some(3), "an explicit with.seed still wins over params.seed");
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
