//! Tokenizer and chat template, as Hugging Face applies them.
//!
//! * `tokenizer.json` through the `tokenizers` crate (the same Rust code
//!   that backs transformers' fast tokenizers), so `encode(text, true)`
//!   equals `tokenizer(text).input_ids`.
//! * The chat template is the model's own Jinja `chat_template` (from
//!   `tokenizer_config.json` or `chat_template.jinja`), rendered with
//!   minijinja configured like transformers' sandbox: `trim_blocks`,
//!   `lstrip_blocks`, loop controls, Python string/dict methods (pycompat),
//!   `raise_exception`, `strftime_now`, and a `tojson` matching Python's
//!   `json.dumps(ensure_ascii=False)`. Without a template: ChatML.
//! * Stop ids: `eos_token_id` of `generation_config.json` and `config.json`
//!   (int or list), else the tokenizer's `eos_token`.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{read_json, LlmError, Result};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// ChatML (Qwen's format), used when a model ships no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A model's tokenizer + chat template + stop ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: String,
    /// Special tokens exposed to the template (`bos_token`, `eos_token`, ...).
    specials: Vec<(String, String)>,
    stop_ids: Vec<i64>,
    pad_id: Option<i64>,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("path", &self.path).field("stop_ids", &self.stop_ids).finish()
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` (AddedToken) in tokenizer_config.json.
fn token_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn ids_of(v: Option<&serde_json::Value>) -> Vec<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => vec![],
    }
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json` (+ `tokenizer_config.json`,
    /// `chat_template.jinja`, `generation_config.json`, `config.json` when present).
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let tpath = dir.join("tokenizer.json");
        let terr = |msg: String| LlmError::Tokenizer { path: tpath.clone(), msg };
        if !tpath.is_file() {
            return Err(terr("file not found (the model dir needs an HF fast tokenizer)".into()));
        }
        let inner = tokenizers::Tokenizer::from_file(&tpath).map_err(|e| terr(e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let tcfg: serde_json::Value =
            if cfg_path.is_file() { read_json(&cfg_path)? } else { serde_json::Value::Object(Default::default()) };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.is_file() {
            std::fs::read_to_string(&jinja).map_err(super::error::io_err(&jinja))?
        } else {
            match tcfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                // A list of named templates: HF uses "default".
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(String::from)
                    .ok_or_else(|| LlmError::Tokenizer {
                        path: cfg_path.clone(),
                        msg: "`chat_template` is a list without a \"default\" entry".into(),
                    })?,
                _ => CHATML_TEMPLATE.to_string(),
            }
        };
        let mut specials = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
            if let Some(s) = tcfg.get(key).and_then(token_str) {
                specials.push((key.to_string(), s));
            }
        }
        let mut stop_ids = Vec::new();
        for f in ["generation_config.json", "config.json"] {
            let p = dir.join(f);
            if p.is_file() {
                let v: serde_json::Value = read_json(&p)?;
                for id in ids_of(v.get("eos_token_id")) {
                    if !stop_ids.contains(&id) {
                        stop_ids.push(id);
                    }
                }
            }
        }
        let special_id = |key: &str| {
            specials.iter().find(|(k, _)| k == key).and_then(|(_, s)| inner.token_to_id(s)).map(|i| i as i64)
        };
        if stop_ids.is_empty() {
            stop_ids.extend(special_id("eos_token"));
        }
        let pad_id = special_id("pad_token").or_else(|| stop_ids.first().copied());
        let tok = Tokenizer { inner, template, specials, stop_ids, pad_id, path: tpath };
        // Fail at load, not at first use, on a template minijinja cannot parse.
        tok.env()?;
        Ok(tok)
    }

    /// Token ids of `text`; with `add_special_tokens` the tokenizer's
    /// post-processor adds BOS/EOS as HF's `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| LlmError::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| LlmError::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    /// Renders the chat template over `messages` (what HF's
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` returns).
    /// Encode the result with `add_special_tokens = false`: templates carry their own BOS.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = self.env()?;
        let tmpl = env.get_template("chat").map_err(|e| LlmError::Template { msg: format!("{e:#}") })?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), serde_json::to_value(messages).unwrap_or_default());
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        for (k, v) in &self.specials {
            ctx.insert(k.clone(), v.clone().into());
        }
        tmpl.render(minijinja::Value::from_serialize(&ctx)).map_err(|e| LlmError::Template { msg: format!("{e:#}") })
    }

    fn env(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<minijinja::Value, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
        env.add_filter("tojson", tojson);
        env.add_template("chat", &self.template).map_err(|e| LlmError::Template { msg: format!("{e:#}") })?;
        Ok(env)
    }

    /// Ids that end a generation (see module docs).
    pub fn stop_token_ids(&self) -> Vec<i64> {
        self.stop_ids.clone()
    }
    /// Padding id: `pad_token`, else the first stop id.
    pub fn pad_token_id(&self) -> Option<i64> {
        self.pad_id
    }
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(|i| i as i64)
    }
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        self.inner.id_to_token(id as u32)
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    /// The chat template in use (the model's or ChatML).
    pub fn chat_template(&self) -> &str {
        &self.template
    }
    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Python `json.dumps(v, ensure_ascii=False, indent=indent)` — HF's `tojson`.
fn tojson(v: minijinja::Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let j = serde_json::to_value(&v).map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_dumps(&j, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn py_dumps(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let nl = |out: &mut String, lvl: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * lvl));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                nl(out, level + 1);
                py_dumps(x, indent, level + 1, out);
            }
            nl(out, level);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                nl(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                py_dumps(x, indent, level + 1, out);
            }
            nl(out, level);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// `strftime_now(fmt)` for templates that print today's date. Supports the
/// common `%d %m %Y %y %b %B %H %M %S %%` in UTC.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    // Civil-from-days (H. Hinnant).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    const MON: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&format!("{y}")),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('B') => out.push_str(MON[(m - 1) as usize]),
            Some('b') => out.push_str(&MON[(m - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn py_json_matches_python_separators() {
        let v = serde_json::json!({"a": [1, "é"], "b": {}});
        let mut s = String::new();
        py_dumps(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"a": [1, "é"], "b": {}}"#, "json.dumps default separators, ensure_ascii=False");
        let mut s = String::new();
        py_dumps(&serde_json::json!({"a": [1]}), Some(2), 0, &mut s);
        assert_eq!(s, "{\n  \"a\": [\n    1\n  ]\n}", "json.dumps indent=2 layout");
    }
}
