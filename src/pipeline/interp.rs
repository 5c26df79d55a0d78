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
    use crate::pipeline::load_in_tempdir;
    use crate::pipeline::yaml;
    use crate::pipeline::resolved::InputRef;
    use crate::pipeline::Options;

    /// Interpolates `value` (a YAML document) against `params` and a matrix,
    /// as one stage would → (key, run); an error as the user reads it,
    /// `file:line:col: message`.
    fn interp(params: &str, matrix: &[(&str, Value)], value: &str) -> Result<(Value, Value), String> {
        let params = yaml::parse(params).expect("params parse");
        let value = yaml::parse(value).expect("value parses");
        let matrix: BTreeMap<String, Value> = matrix.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let mut it = Interp::new(Path::new("p.yaml"), &params, &matrix, false);
        it.value(&value, 0, false).map_err(|e| e.to_string())
    }

    /// Both renderings, when they agree (no env var involved).
    fn run(params: &str, matrix: &[(&str, Value)], value: &str) -> Value {
        let (k, r) = interp(params, matrix, value).unwrap_or_else(|e| panic!("interpolates: {e}"));
        assert_eq!(k, r, "without env vars the key and run renderings agree");
        r
    }

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

    #[test]
    fn tok_text_writes_each_token_back_as_it_reads() {
        for s in ["${params.a.b}", "${env:X}", "${matrix.k}", "${st.out}", "plain"] {
            let t = tokenize(s).unwrap();
            assert_eq!(t.len(), 1, "{s} is one token");
            assert_eq!(tok_text(&t[0]), s, "round trip");
        }
        assert_eq!(refs_in("a ${st.out} ${params.x} ${b.c}"), vec![("st".into(), "out".into()), ("b".into(), "c".into())]);
        assert!(refs_in("${oops").is_empty(), "a template that does not tokenize has no references");
    }

    #[test]
    fn a_whole_reference_keeps_its_type_and_a_mixed_one_is_text() {
        let params = "a: {b: 3, f: 0.5, on: true, s: hi}";
        assert_eq!(run(params, &[], "${params.a.b}"), Value::from(3), "a lone reference stays an integer");
        assert_eq!(run(params, &[], "${params.a.on}"), Value::Bool(true), "… a boolean");
        assert_eq!(run(params, &[], "lr=${params.a.f}, ${params.a.s}"), Value::from("lr=0.5, hi"), "mixed → text");
        assert_eq!(run(params, &[], "${ params.a.s }"), Value::from("hi"), "blanks inside `${{ }}` are trimmed");
        assert_eq!(run(params, &[], "${params.a}"), serde_json::json!({"b": 3, "f": 0.5, "on": true, "s": "hi"}), "a subtree");
        assert_eq!(
            run("x: ${params.y}\ny: [1, 2]", &[], "${params.x}"),
            serde_json::json!([1, 2]),
            "params refer to params, interpolated in turn"
        );
    }

    #[test]
    fn env_vars_stay_symbolic_in_the_key_and_are_hashed() {
        std::env::set_var("RECFLOW_INTERP_TEST_TOKEN", "s3cret");
        let params = yaml::parse("{}").unwrap();
        let value = yaml::parse("url: https://h/${env:RECFLOW_INTERP_TEST_TOKEN}").unwrap();
        let matrix = BTreeMap::new();
        let mut it = Interp::new(Path::new("p.yaml"), &params, &matrix, false);
        let (k, r) = it.value(&value, 0, false).unwrap();
        assert_eq!(k["url"], Value::from("https://h/${env:RECFLOW_INTERP_TEST_TOKEN}"), "the key never sees the value");
        assert_eq!(r["url"], Value::from("https://h/s3cret"), "the run value does");
        assert_eq!(
            it.env_hashes["RECFLOW_INTERP_TEST_TOKEN"],
            crate::cache::hash::sha256_hex(b"s3cret"),
            "the value enters keys as its hash"
        );
        assert_eq!(it.env_values["RECFLOW_INTERP_TEST_TOKEN"], "s3cret");
    }

    #[test]
    fn a_missing_env_var_is_an_error_or_with_allow_missing_a_warning() {
        std::env::remove_var("RECFLOW_INTERP_TEST_UNSET");
        assert_eq!(
            interp("{}", &[], "\n\nk: ${env:RECFLOW_INTERP_TEST_UNSET}").unwrap_err(),
            "p.yaml:3:4: env var `RECFLOW_INTERP_TEST_UNSET` is not set (export it, or run with --dry-run --allow-missing)"
        );
        let params = yaml::parse("{}").unwrap();
        let value = yaml::parse("k: ${env:RECFLOW_INTERP_TEST_UNSET}").unwrap();
        let matrix = BTreeMap::new();
        let mut it = Interp::new(Path::new("p.yaml"), &params, &matrix, true);
        let (k, r) = it.value(&value, 0, false).unwrap();
        assert_eq!((k["k"].clone(), r["k"].clone()), (Value::from("${env:RECFLOW_INTERP_TEST_UNSET}"), Value::from("")));
        assert_eq!(it.warnings, vec!["p.yaml:1:4: env var `RECFLOW_INTERP_TEST_UNSET` is not set".to_string()]);
        assert_eq!(it.env_hashes["RECFLOW_INTERP_TEST_UNSET"], "unset", "an unset var still marks the key");
    }

    #[test]
    fn matrix_values_keep_their_type() {
        let m = [("seed", Value::from(2)), ("lr", Value::from("1e-4"))];
        assert_eq!(run("{}", &m, "${matrix.seed}"), Value::from(2));
        assert_eq!(run("{}", &m, "run-${matrix.seed}-${matrix.lr}"), Value::from("run-2-1e-4"));
        assert_eq!(
            interp("{}", &m, "a: 1\nb: ${matrix.epochs}").unwrap_err(),
            "p.yaml:2:4: `${matrix.epochs}`: this stage has no matrix key `epochs`"
        );
    }

    #[test]
    fn lists_interpolate_item_by_item() {
        let m = [("k", Value::from("x"))];
        assert_eq!(
            run("n: 4", &m, "- ${params.n}\n- \"${matrix.k}\"\n- [lit, \"a${params.n}\"]"),
            serde_json::json!([4, "x", ["lit", "a4"]])
        );
        assert_eq!(
            interp("n: 4", &m, "- ok\n- [ok, \"${params.m}\"]").unwrap_err(),
            "p.yaml:2:8: unknown param `m`",
            "an error inside a nested flow list points at its item"
        );
    }

    /// In flow style `{`/`}` are YAML syntax, so a reference there is quoted;
    /// the quotes are YAML's, the template inside is the same.
    #[test]
    fn flow_style_references_are_quoted() {
        let want = serde_json::json!({"a": 4, "b": "4/4", "c": "${x}"});
        assert_eq!(run("n: 4", &[], "{a: \"${params.n}\", b: '${params.n}/${params.n}', c: \"$${x}\"}"), want);
        assert_eq!(run("n: 4", &[], "a: ${params.n}\nb: ${params.n}/${params.n}\nc: $${x}"), want, "block style needs no quotes");
        assert_eq!(
            interp("n: 4", &[], "{a: 1, b: \"${params.nope}\"}").unwrap_err(),
            "p.yaml:1:11: unknown param `nope`",
            "the position is the quoted scalar's"
        );
    }

    #[test]
    fn dollar_dollar_brace_is_a_literal_and_a_lone_dollar_is_text() {
        assert_eq!(run("n: 4", &[], "echo $${HOME} costs $5 ${params.n}"), Value::from("echo ${HOME} costs $5 4"));
        assert_eq!(run("{}", &[], "$$${x"), Value::from("$${x"), "`$$${{` is `$` then the escape");
    }

    #[test]
    fn an_unterminated_reference_is_an_error_at_its_value() {
        assert_eq!(interp("n: 4", &[], "a: ok\nb:\n  c: x ${params.n").unwrap_err(), "p.yaml:3:6: unterminated `${` in `x ${params.n`");
    }

    #[test]
    fn an_unknown_root_or_malformed_reference_is_an_error() {
        let msg = |r: &str| {
            format!("unknown reference `${{{r}}}`: expected ${{params.NAME}}, ${{env:VAR}}, ${{matrix.KEY}} or ${{STAGE.OUTPUT}}")
        };
        for (bad, shown) in [
            ("${nodot}", "nodot"),
            ("${foo.bar.baz}", "foo.bar.baz"),
            ("${matrix.a.b}", "matrix.a.b"),
            ("${env.X}", "env.X"),
            ("${env:}", "env:"),
            ("${env:A-B}", "env:A-B"),
            ("${params.}", "params."),
            ("${}", ""),
        ] {
            assert_eq!(interp("{}", &[], &format!("\n  k: \"{bad}\"")).unwrap_err(), format!("p.yaml:2:6: {}", msg(shown)), "{bad}");
        }
    }

    #[test]
    fn a_missing_param_or_a_param_loop_is_an_error_at_the_reference() {
        assert_eq!(interp("a: {b: 1}", &[], "k: ${params.a.c}").unwrap_err(), "p.yaml:1:4: unknown param `a.c`");
        // The loop is reported inside `params:`, at a reference that closes it
        // (line 2: `a: ${params.b}`), not at the value that entered it.
        assert_eq!(
            interp("x: 0\na: ${params.b}\nb: ${params.a}", &[], "k: ${params.a}").unwrap_err(),
            "p.yaml:2:4: params refer to each other in a loop"
        );
    }

    #[test]
    fn a_stage_output_is_refused_outside_inputs_deps_and_cmd() {
        assert_eq!(
            interp("{}", &[], "k: ${ingest.items}").unwrap_err(),
            "p.yaml:1:4: `${ingest.items}` (a stage output) can only appear in `inputs:`, `deps:` or `cmd:`"
        );
    }

    /// `${STAGE.OUTPUT}` is resolved by the resolver (it knows the stages):
    /// checked through a whole pipeline in a temporary project.
    fn resolve_in_tempdir(stages: &str) -> Result<crate::pipeline::Pipeline, String> {
        let yaml = format!("stages:\n  ingest: {{uses: ingest, with: {{format: synthetic}}}}\n{stages}");
        let (d, p) = load_in_tempdir(&yaml, &[], &Options::default());
        let file = d.path().join("p.yaml");
        p.map_err(|e| {
            let shown = e.to_string();
            shown.strip_prefix(&format!("{}:", std::path::absolute(&file).unwrap().display())).map(str::to_string).unwrap_or(shown)
        })
    }

    #[test]
    fn a_stage_output_reference_becomes_an_input() {
        let p = resolve_in_tempdir("  split:\n    uses: split\n    inputs: {interactions: \"${ingest.interactions}\"}\n").unwrap();
        let split = p.stage("split").expect("split resolved");
        assert_eq!(split.inputs["interactions"], vec![InputRef::Output { stage: "ingest".into(), output: "interactions".into() }]);
        assert_eq!(split.deps, vec!["ingest".to_string()]);
    }

    #[test]
    fn a_reference_to_a_missing_stage_or_output_is_an_error_at_it() {
        assert_eq!(
            resolve_in_tempdir("  split:\n    uses: split\n    inputs: {interactions: \"${ghost.interactions}\"}\n").unwrap_err(),
            "5:28: stage `split` refers to unknown stage `ghost`"
        );
        assert_eq!(
            resolve_in_tempdir("  split:\n    uses: split\n    inputs:\n      interactions: ${ingest.nope}\n").unwrap_err(),
            "6:21: stage `ingest` has no output `nope` (outputs: interactions, items, report)"
        );
    }
}
