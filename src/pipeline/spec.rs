//! The declared pipeline: exactly what the YAML says, checked for unknown
//! keys and wrong types, positions kept. Observed facts live in
//! [`crate::lock`] — declared and observed are different types (DVC's lesson).
use std::path::{Path, PathBuf};

use super::yaml::{Node, Pos, Val};
use super::PipelineError;

/// Names that `${...}` reserves as roots: no stage may use them.
pub const RESERVED: &[&str] = &["params", "env", "matrix"];

#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub file: PathBuf,
    pub name: String,
    /// `params:` mapping (null when absent).
    pub params: Node,
    /// Optional custom worker binary (path relative to the pipeline file).
    pub worker: Option<(String, Pos)>,
    pub stages: Vec<StageSpec>,
}

#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    pub pos: Pos,
    pub body: Body,
    /// `matrix:` key → (key position, values).
    pub matrix: Vec<(String, Pos, Vec<Node>)>,
    pub resources: super::resources::Resources,
    pub seed: Option<Node>,
}

#[derive(Debug, Clone)]
pub enum Body {
    Builtin {
        uses: String,
        uses_pos: Pos,
        /// `inputs:` name → value node (path, `${ref}`, list, or `{all: ${ref}}`).
        inputs: Vec<(String, Pos, Node)>,
        /// `with:` mapping (may be null).
        with: Node,
        extends: Option<(String, Pos)>,
    },
    Shell {
        cmd: Node,
        deps: Vec<Node>,
        outs: Outs,
    },
}

#[derive(Debug, Clone)]
pub enum Outs {
    List(Vec<Node>),
    Named(Vec<(String, Pos, Node)>),
}

fn err(file: &Path, pos: Pos, msg: impl Into<String>) -> PipelineError {
    PipelineError::new(file, pos, msg)
}

/// Checks that a mapping has only `allowed` keys.
fn check_keys(file: &Path, node: &Node, allowed: &[&str], what: &str) -> Result<(), PipelineError> {
    if let Val::Map(m) = &node.val {
        for (k, p, _) in m {
            if !allowed.contains(&k.as_str()) {
                return Err(err(file, *p, format!("unknown key `{k}` in {what} (allowed: {})", allowed.join(", "))));
            }
        }
    }
    Ok(())
}

fn expect_map<'a>(file: &Path, node: &'a Node, what: &str) -> Result<&'a [(String, Pos, Node)], PipelineError> {
    match &node.val {
        Val::Map(m) => Ok(m),
        _ => Err(err(file, node.pos, format!("{what} must be a mapping, got {}", node.type_name()))),
    }
}

fn expect_str<'a>(file: &Path, node: &'a Node, what: &str) -> Result<&'a str, PipelineError> {
    node.as_str().ok_or_else(|| err(file, node.pos, format!("{what} must be a string, got {}", node.type_name())))
}

/// Valid stage names: letters, digits, `_` and `-`; not reserved.
pub fn check_stage_name(file: &Path, name: &str, pos: Pos) -> Result<(), PipelineError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(err(file, pos, format!("invalid stage name `{name}`: use letters, digits, `_` and `-`")));
    }
    if RESERVED.contains(&name) {
        return Err(err(
            file,
            pos,
            format!("stage name `{name}` is reserved (`${{{name}...}}` has its own meaning); rename the stage"),
        ));
    }
    Ok(())
}

impl PipelineSpec {
    /// Checks the document shape and builds the spec.
    pub fn from_node(file: &Path, doc: &Node) -> Result<Self, PipelineError> {
        let top = expect_map(file, doc, "a pipeline file")?;
        check_keys(file, doc, &["name", "params", "stages", "worker"], "the pipeline")?;
        let name = match doc.get("name") {
            Some(n) => {
                let s = expect_str(file, n, "`name`")?;
                if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return Err(err(file, n.pos, "`name` must use letters, digits, `_` and `-`"));
                }
                s.to_string()
            }
            None => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into()),
        };
        let params = match doc.get("params") {
            Some(p) if !matches!(p.val, Val::Null) => {
                expect_map(file, p, "`params`")?;
                p.clone()
            }
            _ => Node::new(Pos::default(), Val::Map(vec![])),
        };
        let worker = match doc.get("worker") {
            Some(w) => Some((expect_str(file, w, "`worker`")?.to_string(), w.pos)),
            None => None,
        };
        let stages_node = doc.get("stages").ok_or_else(|| {
            let pos = top.first().map(|(_, p, _)| *p).unwrap_or(Pos { line: 1, col: 1 });
            err(file, pos, "the pipeline has no `stages:` mapping")
        })?;
        let mut stages = Vec::new();
        for (sname, spos, snode) in expect_map(file, stages_node, "`stages`")? {
            check_stage_name(file, sname, *spos)?;
            stages.push(StageSpec::from_node(file, sname, *spos, snode)?);
        }
        if stages.is_empty() {
            return Err(err(file, stages_node.pos, "`stages` is empty"));
        }
        Ok(PipelineSpec { file: file.to_path_buf(), name, params, worker, stages })
    }
}

impl StageSpec {
    fn from_node(file: &Path, name: &str, pos: Pos, node: &Node) -> Result<Self, PipelineError> {
        expect_map(file, node, &format!("stage `{name}`"))?;
        let what = format!("stage `{name}`");
        let has_uses = node.get("uses").is_some();
        let has_cmd = node.get("cmd").is_some();
        let common = ["matrix", "resources", "seed"];
        let body = match (has_uses, has_cmd) {
            (true, true) => {
                let p = node.key_pos("cmd").unwrap_or(pos);
                return Err(err(file, p, format!("{what} has both `uses:` and `cmd:`; a stage is either a built-in kind or a shell command")));
            }
            (false, false) => {
                return Err(err(file, pos, format!("{what} needs `uses: KIND` (built-in) or `cmd: ...` (shell)")));
            }
            (true, false) => {
                let allowed: Vec<&str> = ["uses", "inputs", "with", "extends"].iter().chain(common.iter()).copied().collect();
                check_keys(file, node, &allowed, &what)?;
                let u = node.get("uses").expect("checked above");
                let uses = expect_str(file, u, "`uses`")?.to_string();
                let inputs = match node.get("inputs") {
                    Some(i) if !matches!(i.val, Val::Null) => expect_map(file, i, "`inputs`")?.to_vec(),
                    _ => vec![],
                };
                let with = match node.get("with") {
                    Some(w) if !matches!(w.val, Val::Null) => {
                        expect_map(file, w, "`with`")?;
                        w.clone()
                    }
                    _ => Node::new(pos, Val::Map(vec![])),
                };
                let extends = match node.get("extends") {
                    Some(e) => Some((expect_str(file, e, "`extends`")?.to_string(), e.pos)),
                    None => None,
                };
                Body::Builtin { uses, uses_pos: u.pos, inputs, with, extends }
            }
            (false, true) => {
                let allowed: Vec<&str> = ["cmd", "deps", "outs"].iter().chain(common.iter()).copied().collect();
                check_keys(file, node, &allowed, &what)?;
                let cmd = node.get("cmd").expect("checked above").clone();
                expect_str(file, &cmd, "`cmd`")?;
                let deps = match node.get("deps") {
                    None => vec![],
                    Some(d) => match &d.val {
                        Val::Seq(v) => v.clone(),
                        Val::Null => vec![],
                        _ => return Err(err(file, d.pos, format!("`deps` must be a list, got {}", d.type_name()))),
                    },
                };
                for d in &deps {
                    expect_str(file, d, "each entry of `deps`")?;
                }
                let outs = match node.get("outs") {
                    None => Outs::List(vec![]),
                    Some(o) => match &o.val {
                        Val::Seq(v) => {
                            for x in v {
                                expect_str(file, x, "each entry of `outs`")?;
                            }
                            Outs::List(v.clone())
                        }
                        Val::Map(m) => {
                            for (_, _, x) in m {
                                expect_str(file, x, "each entry of `outs`")?;
                            }
                            Outs::Named(m.clone())
                        }
                        Val::Null => Outs::List(vec![]),
                        _ => return Err(err(file, o.pos, format!("`outs` must be a list or a mapping name: path, got {}", o.type_name()))),
                    },
                };
                Body::Shell { cmd, deps, outs }
            }
        };
        let mut matrix = Vec::new();
        if let Some(m) = node.get("matrix") {
            for (k, kp, v) in expect_map(file, m, "`matrix`")? {
                if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(err(file, *kp, format!("invalid matrix key `{k}`: use letters, digits and `_`")));
                }
                let vals = match &v.val {
                    Val::Seq(items) if !items.is_empty() => items.clone(),
                    Val::Seq(_) => return Err(err(file, v.pos, format!("matrix `{k}` has no values"))),
                    _ => return Err(err(file, v.pos, format!("matrix `{k}` must be a list of values, got {}", v.type_name()))),
                };
                for x in &vals {
                    if matches!(x.val, Val::Seq(_) | Val::Map(_) | Val::Null) {
                        return Err(err(file, x.pos, format!("matrix values must be scalars, got {}", x.type_name())));
                    }
                }
                matrix.push((k.clone(), *kp, vals));
            }
        }
        let resources = match node.get("resources") {
            Some(r) => super::resources::Resources::from_node(file, r)?,
            None => Default::default(),
        };
        Ok(StageSpec { name: name.to_string(), pos, body, matrix, resources, seed: node.get("seed").cloned() })
    }
}
