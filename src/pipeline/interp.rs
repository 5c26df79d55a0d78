//! The `${...}` interpolation language of pipeline values.
//!
//! * `${params.a.b}` — a param (itself interpolated, so params may refer to
//!   params); `${env:VAR}` — an environment variable; `${matrix.KEY}` — this
//!   expansion's matrix value; `${STAGE.OUTPUT}` — an upstream output, which
//!   only the resolver may turn into an input (here it is refused).
//! * `$${` is a literal `${`; a lone `$` is literal.
//! * A value that is exactly one reference keeps the referenced JSON type;
//!   anything else concatenates to a string.
//!
//! Every value is rendered twice — the *key* rendering keeps `${env:VAR}`
//! symbolic (an env value must never reach a key, lock or store), the *run*
//! rendering holds the value — see [`Interp::value`].
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::yaml::{Node, Pos, Val};
use super::PipelineError;

/// One token of a `${...}` template.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Lit(String),
    Param(Vec<String>),
    Env(String),
    Matrix(String),
    Out(String, String),
}

/// Splits a template into literal text and references. Errors are bare
/// messages: the caller knows the node's position.
pub(super) fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
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

/// The text between `${` and `}` → a reference token.
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

/// A value as it reads inside a larger string: strings bare, null as
/// nothing, anything else as JSON.
pub(super) fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Interpolation context for one (expanded) stage.
pub(super) struct Interp<'a> {
    file: &'a Path,
    params: &'a Node,
    matrix: &'a BTreeMap<String, Value>,
    allow_missing: bool,
    /// VAR → sha256 of its value (`unset` when missing and allowed): what keys see.
    pub(super) env_hashes: BTreeMap<String, String>,
    /// VAR → value, for shell commands run with it.
    pub(super) env_values: BTreeMap<String, String>,
    /// Missing env vars under `allow_missing`, for the resolver to report.
    pub(super) warnings: Vec<String>,
}

impl<'a> Interp<'a> {
    pub(super) fn new(file: &'a Path, params: &'a Node, matrix: &'a BTreeMap<String, Value>, allow_missing: bool) -> Self {
        Interp { file, params, matrix, allow_missing, env_hashes: BTreeMap::new(), env_values: BTreeMap::new(), warnings: vec![] }
    }

    fn err(&self, pos: Pos, msg: impl Into<String>) -> PipelineError {
        PipelineError::new(self.file, pos, msg)
    }

    pub(super) fn env(&mut self, var: &str, pos: Pos) -> Result<String, PipelineError> {
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
    pub(super) fn value(&mut self, n: &Node, depth: usize, _in_list: bool) -> Result<(Value, Value), PipelineError> {
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

    pub(super) fn string(&mut self, s: &str, pos: Pos, depth: usize) -> Result<(Value, Value), PipelineError> {
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

/// A token back as written, for re-interpolating it through [`Interp::value`].
pub(super) fn tok_text(t: &Tok) -> String {
    match t {
        Tok::Lit(l) => l.clone(),
        Tok::Param(p) => format!("${{params.{}}}", p.join(".")),
        Tok::Env(v) => format!("${{env:{v}}}"),
        Tok::Matrix(k) => format!("${{matrix.{k}}}"),
        Tok::Out(a, b) => format!("${{{a}.{b}}}"),
    }
}


/// The `${STAGE.OUTPUT}` references in a string (none when it does not tokenize:
/// the error is reported where the string is interpolated).
pub(super) fn refs_in(s: &str) -> Vec<(String, String)> {
    tokenize(s)
        .map(|ts| ts.into_iter().filter_map(|t| if let Tok::Out(a, b) = t { Some((a, b)) } else { None }).collect())
        .unwrap_or_default()
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
}
