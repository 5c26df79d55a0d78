//! Plan-time checks of a custom kind's `with:` against the config schema its
//! worker gave in `describe --json` (cached by the binary's hash), so a bad
//! config is a `FILE:LINE:COL` error (exit 2) before anything runs, like a
//! built-in kind's — not a stage failure hours later.
//!
//! The schema is JSON Schema; this checks the subset that describes serde
//! configs (what `schemars` emits, or what a stage writes by hand): `type`,
//! `enum`, `const`, `properties`, `required`, `additionalProperties`,
//! `items`, `minimum`/`maximum` (and the exclusive forms), `minLength`/
//! `maxLength`, `minItems`/`maxItems`, `anyOf`/`oneOf`/`allOf`, and local
//! `$ref`s (`#/$defs/X`, `#/definitions/X`). Other keywords are ignored: the
//! stage's own validation still runs in the worker.
use serde_json::Value;

/// A violation: the dotted path of the offending field (empty: the whole
/// config) and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub path: String,
    pub msg: String,
}

/// Checks `v` against `schema` (the root, for `$ref`s).
pub fn check(schema: &Value, v: &Value) -> Result<(), Violation> {
    at(schema, schema, v, "")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    let vt = type_name(v);
    vt == t || (t == "number" && vt == "integer") || (t == "integer" && v.as_f64().is_some_and(|f| f.fract() == 0.0))
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn resolve<'a>(root: &'a Value, r: &str) -> Option<&'a Value> {
    let p = r.strip_prefix('#')?;
    root.pointer(p)
}

fn at(root: &Value, s: &Value, v: &Value, path: &str) -> Result<(), Violation> {
    let bad = |msg: String| Err(Violation { path: path.to_string(), msg });
    let Some(s) = s.as_object() else {
        // `true` accepts everything, `false` nothing.
        return if s == &Value::Bool(false) { bad("is not allowed here".into()) } else { Ok(()) };
    };
    if let Some(r) = s.get("$ref").and_then(|r| r.as_str()) {
        match resolve(root, r) {
            Some(target) => at(root, target, v, path)?,
            None => return bad(format!("the kind's schema has an unresolvable $ref `{r}`")),
        }
    }
    match s.get("type") {
        Some(Value::String(t)) if !has_type(v, t) => return bad(format!("must be {t}, got {}", type_name(v))),
        Some(Value::Array(ts)) if !ts.iter().filter_map(|t| t.as_str()).any(|t| has_type(v, t)) => {
            let names: Vec<&str> = ts.iter().filter_map(|t| t.as_str()).collect();
            return bad(format!("must be {}, got {}", names.join(" or "), type_name(v)));
        }
        _ => {}
    }
    if let Some(Value::Array(opts)) = s.get("enum") {
        if !opts.contains(v) {
            let shown: Vec<String> = opts.iter().map(|o| o.to_string()).collect();
            return bad(format!("must be one of {}, got {v}", shown.join(", ")));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            return bad(format!("must be {c}, got {v}"));
        }
    }
    if let Some(x) = v.as_f64() {
        let num = |k: &str| s.get(k).and_then(|n| n.as_f64());
        if let Some(m) = num("minimum").filter(|m| x < *m) {
            return bad(format!("must be ≥ {m}, got {v}"));
        }
        if let Some(m) = num("maximum").filter(|m| x > *m) {
            return bad(format!("must be ≤ {m}, got {v}"));
        }
        if let Some(m) = num("exclusiveMinimum").filter(|m| x <= *m) {
            return bad(format!("must be > {m}, got {v}"));
        }
        if let Some(m) = num("exclusiveMaximum").filter(|m| x >= *m) {
            return bad(format!("must be < {m}, got {v}"));
        }
    }
    let count = |k: &str| s.get(k).and_then(|n| n.as_u64());
    if let Some(t) = v.as_str() {
        let n = t.chars().count() as u64;
        if let Some(m) = count("minLength").filter(|m| n < *m) {
            return bad(format!("must have at least {m} characters"));
        }
        if let Some(m) = count("maxLength").filter(|m| n > *m) {
            return bad(format!("must have at most {m} characters"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(m) = count("minItems").filter(|m| n < *m) {
            return bad(format!("must have at least {m} items"));
        }
        if let Some(m) = count("maxItems").filter(|m| n > *m) {
            return bad(format!("must have at most {m} items"));
        }
        if let Some(is) = s.get("items") {
            for (i, x) in items.iter().enumerate() {
                at(root, is, x, &join(path, &i.to_string()))?;
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(|p| p.as_object());
        if let Some(Value::Array(req)) = s.get("required") {
            for r in req.iter().filter_map(|r| r.as_str()) {
                if !obj.contains_key(r) {
                    return bad(format!("needs field `{r}`"));
                }
            }
        }
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => at(root, ps, x, &join(path, k))?,
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        let known: Vec<&str> = props.map(|p| p.keys().map(|k| k.as_str()).collect()).unwrap_or_default();
                        return Err(Violation {
                            path: join(path, k),
                            msg: format!("unknown field `{k}` (fields: {})", if known.is_empty() { "none".into() } else { known.join(", ") }),
                        });
                    }
                    Some(extra) => at(root, extra, x, &join(path, k))?,
                    None => {}
                },
            }
        }
    }
    if let Some(Value::Array(all)) = s.get("allOf") {
        for sub in all {
            at(root, sub, v, path)?;
        }
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(alts)) = s.get(key) {
            let mut first_err = None;
            let ok = alts.iter().any(|sub| match at(root, sub, v, path) {
                Ok(()) => true,
                Err(e) => {
                    first_err.get_or_insert(e);
                    false
                }
            });
            if !ok {
                // The first alternative's reason reads best for `T | null` shapes.
                return Err(first_err.unwrap_or(Violation { path: path.to_string(), msg: "matches none of the allowed forms".into() }));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["mode"],
            "properties": {
                "factor": {"type": "integer", "minimum": 1, "maximum": 1000},
                "mode": {"$ref": "#/$defs/Mode"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "name": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]}
            },
            "$defs": {"Mode": {"enum": ["fast", "slow"]}}
        })
    }

    fn path_of(v: Value) -> (String, String) {
        let e = check(&schema(), &v).unwrap_err();
        (e.path, e.msg)
    }

    #[test]
    fn accepts_a_valid_config() {
        assert_eq!(check(&schema(), &json!({"mode": "fast", "factor": 3, "tags": ["a"], "name": null})), Ok(()), "a valid config passes");
    }

    #[test]
    fn names_the_offending_field() {
        assert_eq!(path_of(json!({"mode": "fast", "factor": 0})).0, "factor", "a range violation names its field");
        assert!(path_of(json!({"mode": "fast", "factor": 0})).1.contains("≥ 1"), "and the bound");
        assert_eq!(path_of(json!({"mode": "fast", "factr": 2})).0, "factr", "an unknown field is named");
        assert!(path_of(json!({"mode": "fast", "factor": "2"})).1.contains("must be integer, got string"), "a wrong type says both types");
        assert!(path_of(json!({})).1.contains("needs field `mode`"), "a missing required field is named");
        assert!(path_of(json!({"mode": "medium"})).1.contains("one of"), "an enum behind a $ref is checked");
        assert_eq!(path_of(json!({"mode": "slow", "tags": ["a", 1]})).0, "tags.1", "list items are checked by index");
        assert_eq!(path_of(json!({"mode": "slow", "name": ""})).0, "name", "anyOf reports why the first form failed");
    }
}
