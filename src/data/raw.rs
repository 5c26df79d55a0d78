//! Streaming record readers for raw dumps.
//!
//! * plain or gzip (detected by the magic bytes, not the name; multi-member
//!   gzip as written by `pigz`/`bgzip` is read whole);
//! * one object per line (JSON lines), or concatenated / pretty-printed
//!   objects: the first non-blank line decides — if it holds one complete
//!   object the file is read line by line (a broken line is one bad record),
//!   otherwise objects are cut by brace depth (strings and escapes tracked);
//! * Python-dict literals (the 2014 Amazon metadata: `{'asin': '…', …}`),
//!   parsed by [`parse_pydict`] into JSON values;
//! * a truncated gzip (public copies are often cut mid-stream) ends the
//!   stream: every complete record before the cut is returned and the cut is
//!   reported ([`RecordReader::truncated`]); the partial last record comes
//!   back flagged `partial`.
//!
//! Nothing here holds more than one record (plus the read buffer) in memory.
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

const BUF: usize = 1 << 20;

/// How a record reader splits its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unknown,
    Lines,
    Concat,
}

/// Where the next record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A record starting at 1-based `line`; `partial` when the input was cut
    /// inside it (truncated gzip or an unclosed object at the end).
    Record {
        line: u64,
        partial: bool,
    },
    End,
}

/// Consecutive records in one buffer (see [`RecordReader::fill`]).
#[derive(Debug, Default)]
pub struct Chunk {
    pub bytes: Vec<u8>,
    /// Per record: its end offset in `bytes` (it starts where the previous
    /// one ends) and its 1-based first line.
    pub ends: Vec<(usize, u64)>,
}

impl Chunk {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// The records as (line, bytes).
    pub fn records(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(end, line)| {
            let r = (line, &self.bytes[start..end]);
            start = end;
            r
        })
    }
}

/// Opens a file, transparently decompressing gzip.
pub fn open(path: &Path) -> std::io::Result<Box<dyn BufRead + Send>> {
    let mut f = File::open(path)?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic)?;
    let f = File::open(path)?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::with_capacity(
            BUF,
            flate2::read::MultiGzDecoder::new(BufReader::with_capacity(BUF, f)),
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(BUF, f)))
    }
}

/// Reads records (object texts or lines) one at a time.
pub struct RecordReader {
    pub path: PathBuf,
    inner: Box<dyn BufRead + Send>,
    mode: Mode,
    /// Python-dict literals: `'` also quotes strings.
    pydict: bool,
    /// Lines read so far (1-based number of the last line read).
    line: u64,
    /// Concat mode: the current line and the read position in it.
    pending: Vec<u8>,
    pos: usize,
    pending_line: u64,
    done: bool,
    /// The read error that ended the stream early (a truncated gzip), with
    /// the last line number read before it.
    pub truncated: Option<(u64, String)>,
}

impl RecordReader {
    pub fn open(path: &Path, pydict: bool) -> std::io::Result<Self> {
        Ok(Self::from_reader(path, open(path)?, pydict))
    }

    pub fn from_reader(path: &Path, inner: Box<dyn BufRead + Send>, pydict: bool) -> Self {
        RecordReader {
            path: path.to_path_buf(),
            inner,
            mode: Mode::Unknown,
            pydict,
            line: 0,
            pending: Vec::new(),
            pos: 0,
            pending_line: 0,
            done: false,
            truncated: None,
        }
    }

    /// A plain line reader (MovieLens): every non-blank line is a record.
    pub fn lines(path: &Path) -> std::io::Result<Self> {
        let mut r = Self::open(path, false)?;
        r.mode = Mode::Lines;
        Ok(r)
    }

    /// Reads one raw line (without `\n` / `\r\n`) into `out`; `Ok(false)` at
    /// the end. A read error keeps the bytes read so far and ends the stream.
    fn read_line(&mut self, out: &mut Vec<u8>) -> Result<bool, ()> {
        out.clear();
        self.append_line(out)
    }

    /// [`Self::read_line`] appending to `out` (what it held stays).
    fn append_line(&mut self, out: &mut Vec<u8>) -> Result<bool, ()> {
        let start = out.len();
        if self.done {
            return Ok(false);
        }
        match self.inner.read_until(b'\n', out) {
            Ok(0) => {
                self.done = true;
                Ok(false)
            }
            Ok(_) => {
                self.line += 1;
                // A UTF-8 byte-order mark (Windows editors write one) is not data.
                if self.line == 1 && out[start..].starts_with(b"\xEF\xBB\xBF") {
                    out.drain(start..start + 3);
                }
                if out.last() == Some(&b'\n') {
                    out.pop();
                    if out.len() > start && out.last() == Some(&b'\r') {
                        out.pop();
                    }
                }
                Ok(true)
            }
            Err(e) => {
                self.done = true;
                self.truncated = Some((self.line, e.to_string()));
                if out.len() > start {
                    self.line += 1;
                }
                Err(())
            }
        }
    }

    /// Appends whole records to `chunk` until it holds at least `target`
    /// bytes or the input ends; `false` when the input ended (the chunk may
    /// still hold records). Feeds the parallel parsers of ingest: records
    /// come in file order, with their line numbers, exactly as
    /// [`Self::next_record`] returns them, except that a record cut by a
    /// truncated input is left out (the cut is reported through
    /// [`Self::truncated`]); an object left open at the end of an intact
    /// file is kept, so it is reported as malformed rather than lost.
    pub fn fill(&mut self, chunk: &mut Chunk, target: usize) -> bool {
        let mut scratch = Vec::new();
        while chunk.bytes.len() < target {
            if self.mode == Mode::Lines {
                // The common case, without the copy through `scratch`.
                let start = chunk.bytes.len();
                match self.append_line(&mut chunk.bytes) {
                    Ok(true) => {
                        if chunk.bytes[start..].iter().all(u8::is_ascii_whitespace) {
                            chunk.bytes.truncate(start);
                        } else {
                            chunk.ends.push((chunk.bytes.len(), self.line));
                        }
                    }
                    Ok(false) => return false,
                    Err(()) => {
                        chunk.bytes.truncate(start);
                        return false;
                    }
                }
                continue;
            }
            match self.next_record(&mut scratch) {
                Next::End => return false,
                Next::Record { partial: true, .. } if self.truncated.is_some() => {}
                Next::Record { line, .. } => {
                    chunk.bytes.extend_from_slice(&scratch);
                    chunk.ends.push((chunk.bytes.len(), line));
                }
            }
        }
        true
    }

    /// The next record's bytes into `out`.
    pub fn next_record(&mut self, out: &mut Vec<u8>) -> Next {
        loop {
            match self.mode {
                Mode::Lines => match self.read_line(out) {
                    Ok(false) => return Next::End,
                    Ok(true) => {
                        if out.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        return Next::Record {
                            line: self.line,
                            partial: false,
                        };
                    }
                    Err(()) => {
                        if out.iter().all(u8::is_ascii_whitespace) {
                            return Next::End;
                        }
                        return Next::Record {
                            line: self.line,
                            partial: true,
                        };
                    }
                },
                Mode::Unknown => {
                    let mut first = Vec::new();
                    match self.read_line(&mut first) {
                        Ok(false) => return Next::End,
                        Ok(true) => {}
                        Err(()) => {
                            if first.iter().all(u8::is_ascii_whitespace) {
                                return Next::End;
                            }
                            *out = first;
                            return Next::Record {
                                line: self.line,
                                partial: true,
                            };
                        }
                    }
                    if first.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    if one_object(&first, self.pydict) {
                        self.mode = Mode::Lines;
                        *out = first;
                        return Next::Record {
                            line: self.line,
                            partial: false,
                        };
                    }
                    self.mode = Mode::Concat;
                    self.pending = first;
                    self.pos = 0;
                    self.pending_line = self.line;
                }
                Mode::Concat => return self.next_concat(out),
            }
        }
    }

    /// Concatenated / pretty-printed objects, cut where brace depth returns to 0.
    fn next_concat(&mut self, out: &mut Vec<u8>) -> Next {
        out.clear();
        let (mut depth, mut quote, mut esc, mut start) = (0i32, 0u8, false, None::<u64>);
        loop {
            if self.pos >= self.pending.len() {
                if start.is_some() {
                    out.push(b'\n');
                }
                let mut line = std::mem::take(&mut self.pending);
                let r = self.read_line(&mut line);
                self.pending = line;
                self.pos = 0;
                self.pending_line = self.line;
                match r {
                    Ok(true) => {}
                    Ok(false) | Err(()) => {
                        let cut = r.is_err();
                        if cut && start.is_some() {
                            out.extend_from_slice(&self.pending);
                        }
                        self.pending.clear();
                        return match start {
                            Some(line) => Next::Record { line, partial: true },
                            None if cut && !self.pending.iter().all(u8::is_ascii_whitespace) => Next::Record {
                                line: self.line,
                                partial: true,
                            },
                            None => Next::End,
                        };
                    }
                }
                continue;
            }
            let b = self.pending[self.pos];
            self.pos += 1;
            if start.is_none() {
                if b.is_ascii_whitespace() {
                    continue;
                }
                if b != b'{' {
                    // Stray text between objects: the rest of the line is one bad record.
                    out.push(b);
                    out.extend_from_slice(&self.pending[self.pos..]);
                    self.pos = self.pending.len();
                    return Next::Record {
                        line: self.pending_line,
                        partial: false,
                    };
                }
                start = Some(self.pending_line);
                depth = 1;
                out.push(b);
                continue;
            }
            out.push(b);
            if quote != 0 {
                if esc {
                    esc = false;
                } else if b == b'\\' {
                    esc = true;
                } else if b == quote {
                    quote = 0;
                }
                continue;
            }
            match b {
                b'"' => quote = b'"',
                b'\'' if self.pydict => quote = b'\'',
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        return Next::Record {
                            line: start.unwrap_or(self.pending_line),
                            partial: false,
                        };
                    }
                }
                _ => {}
            }
        }
    }

    /// The last line number read.
    pub fn line(&self) -> u64 {
        self.line
    }
}

/// Whether `line` is exactly one balanced object (leading/trailing space allowed).
fn one_object(line: &[u8], pydict: bool) -> bool {
    let s = line.trim_ascii();
    if s.first() != Some(&b'{') {
        // Not an object at all: line mode, the line will be reported as bad.
        return true;
    }
    let (mut depth, mut quote, mut esc) = (0i32, 0u8, false);
    for (i, &b) in s.iter().enumerate() {
        if quote != 0 {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == quote {
                quote = 0;
            }
            continue;
        }
        match b {
            b'"' => quote = b'"',
            b'\'' if pydict => quote = b'\'',
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return i == s.len() - 1;
                }
            }
            _ => {}
        }
    }
    false
}

// --------------------------------------------------------------- field values

/// A JSON value as far as ingest cares: scalars borrowed from the input when
/// possible, lists kept, objects skipped. Parsing into this is much cheaper
/// than into `serde_json::Value`.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Null,
    Bool(bool),
    Num(f64),
    Str(Cow<'a, str>),
    List(Vec<Val<'a>>),
    Map,
}

impl Val<'_> {
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Num(_) => "a number",
            Val::Str(_) => "a string",
            Val::List(_) => "a list",
            Val::Map => "an object",
        }
    }
}

struct ValVisitor;

impl<'de> Visitor<'de> for ValVisitor {
    type Value = Val<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Val::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Val::Num(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Val::Num(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Val::Num(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Owned(v)))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Val::Null)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Val::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(ValVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element::<Val<'de>>()? {
            v.push(x);
        }
        Ok(Val::List(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Val::Map)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Val<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValVisitor)
    }
}

/// The review fields of every JSON review format (Amazon 2014/2018/2023,
/// Yelp); each format reads its own subset. Unknown fields are skipped.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ReviewFields<'a> {
    #[serde(borrow, rename = "reviewerID")]
    pub reviewer_id: Option<Val<'a>>,
    #[serde(borrow)]
    pub asin: Option<Val<'a>>,
    #[serde(borrow)]
    pub overall: Option<Val<'a>>,
    #[serde(borrow, rename = "reviewText")]
    pub review_text: Option<Val<'a>>,
    #[serde(borrow)]
    pub summary: Option<Val<'a>>,
    #[serde(borrow, rename = "unixReviewTime")]
    pub unix_review_time: Option<Val<'a>>,
    #[serde(borrow, rename = "reviewTime")]
    pub review_time: Option<Val<'a>>,
    #[serde(borrow)]
    pub user_id: Option<Val<'a>>,
    #[serde(borrow)]
    pub parent_asin: Option<Val<'a>>,
    #[serde(borrow)]
    pub rating: Option<Val<'a>>,
    #[serde(borrow)]
    pub title: Option<Val<'a>>,
    #[serde(borrow)]
    pub text: Option<Val<'a>>,
    #[serde(borrow)]
    pub timestamp: Option<Val<'a>>,
    #[serde(borrow)]
    pub business_id: Option<Val<'a>>,
    #[serde(borrow)]
    pub stars: Option<Val<'a>>,
    #[serde(borrow)]
    pub date: Option<Val<'a>>,
}

// ------------------------------------------------------- Python dict literals

/// Parses one Python literal (as printed by `repr` of a dict: single or
/// double quoted strings with backslash escapes, numbers, True/False/None,
/// lists, tuples, dicts) into a JSON value. The 2014 Amazon metadata files
/// are such literals, one per line, and are not valid JSON.
pub fn parse_pydict(s: &str) -> Result<serde_json::Value, String> {
    let mut p = Py {
        s: s.as_bytes(),
        src: s,
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text after the literal at byte {}", p.i));
    }
    Ok(v)
}

struct Py<'a> {
    s: &'a [u8],
    src: &'a str,
    i: usize,
}

impl Py<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }
    fn value(&mut self, depth: usize) -> Result<serde_json::Value, String> {
        if depth > 64 {
            return self.err("nesting too deep");
        }
        self.ws();
        let Some(&c) = self.s.get(self.i) else {
            return self.err("unexpected end");
        };
        match c {
            b'{' => {
                self.i += 1;
                let mut m = serde_json::Map::new();
                loop {
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(serde_json::Value::Object(m));
                    }
                    let k = match self.value(depth + 1)? {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    self.ws();
                    if self.s.get(self.i) != Some(&b':') {
                        return self.err("expected ':'");
                    }
                    self.i += 1;
                    let v = self.value(depth + 1)?;
                    m.insert(k, v);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {}
                        _ => return self.err("expected ',' or '}'"),
                    }
                }
            }
            b'[' | b'(' => {
                let close = if c == b'[' { b']' } else { b')' };
                self.i += 1;
                let mut v = Vec::new();
                loop {
                    self.ws();
                    if self.s.get(self.i) == Some(&close) {
                        self.i += 1;
                        return Ok(serde_json::Value::Array(v));
                    }
                    v.push(self.value(depth + 1)?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(&x) if x == close => {}
                        _ => return self.err("expected ',' or a closing bracket"),
                    }
                }
            }
            b'\'' | b'"' => self.string(c).map(serde_json::Value::String),
            b'u' | b'b' | b'r' if matches!(self.s.get(self.i + 1), Some(b'\'' | b'"')) => {
                self.i += 1;
                let q = self.s[self.i];
                self.string(q).map(serde_json::Value::String)
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len() && !matches!(self.s[self.i], b',' | b'}' | b']' | b')' | b':') {
                    self.i += 1;
                }
                let tok = self.src[start..self.i].trim();
                match tok {
                    "True" => Ok(serde_json::Value::Bool(true)),
                    "False" => Ok(serde_json::Value::Bool(false)),
                    "None" => Ok(serde_json::Value::Null),
                    _ => {
                        if let Ok(n) = tok.parse::<i64>() {
                            Ok(n.into())
                        } else if let Ok(f) = tok.parse::<f64>() {
                            Ok(serde_json::Number::from_f64(f)
                                .map(serde_json::Value::Number)
                                .unwrap_or(serde_json::Value::Null))
                        } else {
                            Err(format!(
                                "unexpected token `{}` at byte {start}",
                                tok.chars().take(20).collect::<String>()
                            ))
                        }
                    }
                }
            }
        }
    }
    fn string(&mut self, q: u8) -> Result<String, String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            // Copy the run up to the next quote or backslash (UTF-8 safe: both are ASCII).
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i] != q && self.s[self.i] != b'\\' {
                self.i += 1;
            }
            out.push_str(&self.src[start..self.i]);
            let Some(&c) = self.s.get(self.i) else {
                return self.err("unterminated string");
            };
            self.i += 1;
            if c == q {
                return Ok(out);
            }
            let Some(&e) = self.s.get(self.i) else {
                return self.err("unterminated escape");
            };
            self.i += 1;
            match e {
                b'n' => out.push('\n'),
                b't' => out.push('\t'),
                b'r' => out.push('\r'),
                b'0' => out.push('\0'),
                b'\\' | b'\'' | b'"' => out.push(e as char),
                b'x' | b'u' | b'U' => {
                    let n = match e {
                        b'x' => 2,
                        b'u' => 4,
                        _ => 8,
                    };
                    let hex = self
                        .src
                        .get(self.i..self.i + n)
                        .ok_or_else(|| format!("short \\{} escape", e as char))?;
                    let code = u32::from_str_radix(hex, 16).map_err(|_| format!("bad escape \\{}{hex}", e as char))?;
                    self.i += n;
                    // A UTF-16 surrogate pair written as two \u escapes.
                    let ch = if (0xD800..0xDC00).contains(&code) && self.src.get(self.i..self.i + 2) == Some("\\u") {
                        let lo = self
                            .src
                            .get(self.i + 2..self.i + 6)
                            .and_then(|h| u32::from_str_radix(h, 16).ok());
                        match lo {
                            Some(lo) if (0xDC00..0xE000).contains(&lo) => {
                                self.i += 6;
                                char::from_u32(0x10000 + ((code - 0xD800) << 10) + (lo - 0xDC00))
                            }
                            _ => None,
                        }
                    } else {
                        char::from_u32(code)
                    };
                    out.push(ch.unwrap_or('\u{FFFD}'));
                }
                b'\n' => {}
                other => {
                    out.push('\\');
                    out.push(other as char);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: &[u8], pydict: bool) -> RecordReader {
        RecordReader::from_reader(Path::new("t"), Box::new(std::io::Cursor::new(bytes.to_vec())), pydict)
    }

    fn all(r: &mut RecordReader) -> Vec<(u64, String, bool)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Next::Record { line, partial } = r.next_record(&mut buf) {
            out.push((line, String::from_utf8_lossy(&buf).into_owned(), partial));
        }
        out
    }

    #[test]
    fn json_lines_keep_line_numbers_and_skip_blank_lines() {
        let got = all(&mut reader(b"{\"a\":1}\n\n{\"a\":2}\r\nnot json\n", false));
        assert_eq!(
            got.iter().map(|x| x.0).collect::<Vec<_>>(),
            [1, 3, 4],
            "1-based line numbers of each record"
        );
        assert_eq!(got[1].1, "{\"a\":2}", "CRLF is stripped");
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_record() {
        let got = all(&mut reader(b"\xEF\xBB\xBF{\"a\":1}\n{\"a\":2}\n", false));
        assert_eq!(got[0].1, "{\"a\":1}", "the BOM is dropped, the record stays: {got:?}");
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn chunks_hold_the_records_of_next_record() {
        let text = b"{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}\n{\"a\":4}";
        let want = all(&mut reader(text, false));
        let mut r = reader(text, false);
        let (mut got, mut chunk) = (Vec::new(), Chunk::default());
        loop {
            chunk.clear();
            // A tiny target: one or two records per chunk.
            let more = r.fill(&mut chunk, 9);
            got.extend(chunk.records().map(|(l, b)| (l, String::from_utf8_lossy(b).into_owned(), false)));
            if !more {
                break;
            }
        }
        assert_eq!(got, want, "same records, bytes and line numbers as next_record");
    }

    #[test]
    fn pretty_printed_objects_are_cut_by_brace_depth() {
        let text = b"{\n  \"a\": \"x}{\",\n  \"b\": [1, {\"c\": 2}]\n}\n{\"a\": 3}{\"a\": 4}\n";
        let got = all(&mut reader(text, false));
        assert_eq!(got.len(), 3, "three objects: {got:?}");
        assert_eq!(got[0].0, 1);
        assert_eq!(got[1].0, 5, "second object starts on line 5");
        let v: serde_json::Value = serde_json::from_str(&got[0].1).unwrap();
        assert_eq!(v["a"], "x}{", "braces inside strings do not cut");
        assert!(!got[2].2);
    }

    #[test]
    fn unclosed_object_at_end_is_partial() {
        let got = all(&mut reader(b"{\n\"a\": 1\n}\n{\n\"a\": 2\n", false));
        assert_eq!(got.len(), 2);
        assert!(got[1].2, "an object cut by the end of input is flagged partial");
    }

    #[test]
    fn python_dict_literals_parse() {
        let v = parse_pydict(r#"{'asin': '0000031852', 'title': "Girls' Ballet \"Tutu\"", 'price': 3.17, 'x': True, 'y': None, 'categories': [['A', 'B'], ['C']], 'salesRank': {'Toys': 211836}, 't': ('a', 1), 'e': 'caf\xe9 \u2764'}"#).unwrap();
        assert_eq!(
            v["title"], "Girls' Ballet \"Tutu\"",
            "double-quoted strings with escapes"
        );
        assert_eq!(v["price"], 3.17);
        assert_eq!(v["categories"][0][1], "B");
        assert_eq!(v["y"], serde_json::Value::Null);
        assert_eq!(v["e"], "café ❤", "\\x and \\u escapes decode");
        assert!(
            parse_pydict("{'a': 1").is_err(),
            "unterminated dict is an error, not a panic"
        );
        assert!(parse_pydict("{'a': nope}").is_err());
    }

    #[test]
    fn pydict_lines_with_quotes_are_one_record_per_line() {
        let got = all(&mut reader(b"{'a': 'it\\'s {'}\n{'a': \"b'}\"}\n", true));
        assert_eq!(got.len(), 2, "single and double quoted strings are tracked: {got:?}");
    }

    #[test]
    fn fields_borrow_and_report_types() {
        let f: ReviewFields =
            serde_json::from_str(r#"{"reviewerID":"u","overall":5.0,"style":{"a":1},"asin":7}"#).unwrap();
        assert_eq!(f.reviewer_id, Some(Val::Str(Cow::Borrowed("u"))));
        assert_eq!(f.asin.as_ref().map(Val::type_name), Some("a number"));
    }
}
