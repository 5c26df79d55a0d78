//! A YAML tree that remembers where every node came from.
//!
//! serde-based YAML loaders drop positions once a value is deserialised, but
//! every pipeline mistake must be reported as `file:line:col`. So pipeline
//! files are read from `saphyr-parser` events into [`Node`]s carrying their
//! [`Pos`], and typed only afterwards (plain scalars resolve like YAML 1.2
//! core: null, bool, int, float, else string; quoted scalars stay strings).
use std::path::{Path, PathBuf};

use saphyr_parser::{Event, Parser, ScalarStyle};

/// 1-based line and column of a node in its file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// A YAML value with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub val: Val,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys in file order with their own positions.
    Map(Vec<(String, Pos, Node)>),
}

/// A position in a named file, printed `file:line:col`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: PathBuf,
    pub pos: Pos,
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pos.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}:{}", self.file.display(), self.pos.line, self.pos.col)
        }
    }
}

/// A YAML syntax error (or an unsupported construct) at a position.
#[derive(Debug, Clone)]
pub struct YamlError {
    pub pos: Pos,
    pub msg: String,
}

impl Node {
    pub fn new(pos: Pos, val: Val) -> Self {
        Node { pos, val }
    }

    /// Human name of the node's type, for "expected X, got Y" messages.
    pub fn type_name(&self) -> &'static str {
        match &self.val {
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a number",
            Val::Str(_) => "a string",
            Val::Seq(_) => "a list",
            Val::Map(_) => "a mapping",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.val {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.val {
            Val::Map(m) => m.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| v),
            _ => None,
        }
    }

    /// Position of a key inside a mapping node.
    pub fn key_pos(&self, key: &str) -> Option<Pos> {
        match &self.val {
            Val::Map(m) => m.iter().find(|(k, _, _)| k == key).map(|(_, p, _)| *p),
            _ => None,
        }
    }

    /// Converts to JSON (positions dropped).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.val {
            Val::Null => J::Null,
            Val::Bool(b) => J::Bool(*b),
            Val::Int(i) => J::from(*i),
            Val::Float(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
            Val::Str(s) => J::String(s.clone()),
            Val::Seq(v) => J::Array(v.iter().map(|n| n.to_json()).collect()),
            Val::Map(m) => J::Object(m.iter().map(|(k, _, v)| (k.clone(), v.to_json())).collect()),
        }
    }

    /// A node from JSON, every position set to `pos` (values from `--set`).
    pub fn from_json(v: &serde_json::Value, pos: Pos) -> Node {
        use serde_json::Value as J;
        let val = match v {
            J::Null => Val::Null,
            J::Bool(b) => Val::Bool(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => Val::Int(i),
                None => Val::Float(n.as_f64().unwrap_or(0.0)),
            },
            J::String(s) => Val::Str(s.clone()),
            J::Array(a) => Val::Seq(a.iter().map(|x| Node::from_json(x, pos)).collect()),
            J::Object(o) => Val::Map(o.iter().map(|(k, x)| (k.clone(), pos, Node::from_json(x, pos))).collect()),
        };
        Node { pos, val }
    }
}

/// Types a plain (unquoted) scalar as YAML 1.2 core schema does.
pub fn plain_scalar(s: &str) -> Val {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Val::Null,
        "true" | "True" | "TRUE" => return Val::Bool(true),
        "false" | "False" | "FALSE" => return Val::Bool(false),
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return Val::Int(i);
    }
    let looks_numeric = s.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
    if looks_numeric {
        if let Ok(f) = s.parse::<f64>() {
            if f.is_finite() {
                return Val::Float(f);
            }
        }
    }
    match s {
        ".inf" | ".Inf" | "+.inf" => Val::Float(f64::INFINITY),
        "-.inf" | "-.Inf" => Val::Float(f64::NEG_INFINITY),
        _ => Val::Str(s.to_string()),
    }
}

/// Parses one YAML document into a [`Node`] (empty document → null).
pub fn parse(text: &str) -> Result<Node, YamlError> {
    let mut parser = Parser::new_from_str(text);
    // Stack of containers being built.
    enum Frame {
        Seq(Pos, Vec<Node>),
        Map(Pos, Vec<(String, Pos, Node)>, Option<(String, Pos)>),
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut docs = 0;
    fn pos_of(span: &saphyr_parser::Span) -> Pos {
        Pos { line: span.start.line(), col: span.start.col() + 1 }
    }
    // Pushes a finished node into the enclosing container (or the root).
    fn emit(stack: &mut [Frame], root: &mut Option<Node>, node: Node) -> Result<(), YamlError> {
        match stack.last_mut() {
            None => {
                *root = Some(node);
                Ok(())
            }
            Some(Frame::Seq(_, items)) => {
                items.push(node);
                Ok(())
            }
            Some(Frame::Map(_, entries, pending)) => match pending.take() {
                None => {
                    let key = match &node.val {
                        Val::Str(s) => s.clone(),
                        Val::Int(i) => i.to_string(),
                        Val::Bool(b) => b.to_string(),
                        Val::Float(f) => f.to_string(),
                        Val::Null => "null".to_string(),
                        _ => return Err(YamlError { pos: node.pos, msg: "mapping keys must be plain scalars".into() }),
                    };
                    if entries.iter().any(|(k, _, _)| *k == key) {
                        return Err(YamlError { pos: node.pos, msg: format!("duplicate key `{key}`") });
                    }
                    *pending = Some((key, node.pos));
                    Ok(())
                }
                Some((k, kp)) => {
                    entries.push((k, kp, node));
                    Ok(())
                }
            },
        }
    }
    while let Some(ev) = parser.next_event() {
        let (ev, span) = ev.map_err(|e| YamlError {
            pos: Pos { line: e.marker().line(), col: e.marker().col() + 1 },
            msg: e.info().to_string(),
        })?;
        let pos = pos_of(&span);
        match ev {
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(YamlError { pos, msg: "only one YAML document per file is supported".into() });
                }
            }
            Event::Alias(_) => {
                return Err(YamlError { pos, msg: "YAML aliases (*name) are not supported; use params and ${params.x}".into() })
            }
            Event::Scalar(s, style, _, _) => {
                let val = if style == ScalarStyle::Plain { plain_scalar(&s) } else { Val::Str(s.into_owned()) };
                emit(&mut stack, &mut root, Node { pos, val })?;
            }
            Event::SequenceStart(_, _) => stack.push(Frame::Seq(pos, Vec::new())),
            Event::MappingStart(_, _) => stack.push(Frame::Map(pos, Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match stack.pop() {
                    Some(Frame::Seq(p, items)) => Node { pos: p, val: Val::Seq(items) },
                    Some(Frame::Map(p, entries, _)) => Node { pos: p, val: Val::Map(entries) },
                    None => return Err(YamlError { pos, msg: "unbalanced YAML structure".into() }),
                };
                emit(&mut stack, &mut root, node)?;
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
    }
    Ok(root.unwrap_or(Node { pos: Pos { line: 1, col: 1 }, val: Val::Null }))
}

/// Reads and parses a YAML file.
pub fn load(path: &Path) -> Result<Node, (Loc, String)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| (Loc { file: path.to_path_buf(), pos: Pos::default() }, format!("cannot read file: {e}")))?;
    parse(&text).map_err(|e| (Loc { file: path.to_path_buf(), pos: e.pos }, format!("invalid YAML: {}", e.msg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_point_at_values() {
        let n = parse("a: 1\nb:\n  c: \"x\"\n  d: [1, 2.5, true, ~]\n").unwrap();
        let b = n.get("b").unwrap();
        assert_eq!(n.key_pos("b"), Some(Pos { line: 2, col: 1 }), "key positions feed error messages");
        assert_eq!(b.get("c").unwrap().pos, Pos { line: 3, col: 6 }, "value position of a quoted scalar");
        assert_eq!(b.get("c").unwrap().val, Val::Str("x".into()));
        let d = b.get("d").unwrap().to_json();
        assert_eq!(d, serde_json::json!([1, 2.5, true, null]), "plain scalars typed as YAML core");
    }

    #[test]
    fn quoted_numbers_stay_strings_and_duplicates_fail() {
        let n = parse("a: '1'\n").unwrap();
        assert_eq!(n.get("a").unwrap().val, Val::Str("1".into()), "quoting keeps strings");
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.pos.line, 2, "duplicate key reported at the second occurrence");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "syntax errors carry a line: {e:?}");
    }
}
