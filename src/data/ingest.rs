//! Raw review dumps → `interactions` + `items` Parquet + an audit report.
//!
//! Formats (field names as in the public dumps):
//! * `amazon2014`, `amazon2018` — reviews: reviewerID, asin, overall,
//!   reviewText, summary, unixReviewTime (reviewTime `MM DD, YYYY` as
//!   fallback); metadata `meta_*.json(.gz)`: asin, title, categories
//!   (2014, nested lists) / category (2018), description, brand, price. The
//!   2014 metadata are Python-dict literals, one per line: both are read.
//! * `amazon2023` — user_id, parent_asin (else asin), rating, title, text,
//!   timestamp (ms); metadata: parent_asin, title, main_category, categories,
//!   description, features, price, store (→ brand).
//! * `yelp` — review.json: user_id, business_id, stars, text, date; optional
//!   business.json: business_id, name, categories ("A, B"), city, state.
//! * `movielens` — 100K (`u.data` tab-separated, `u.item` `|`-separated,
//!   Latin-1) or 1M (`ratings.dat`, `movies.dat`, `::`-separated), detected
//!   from the content.
//! * `recbole` — RecBole's atomic files (`NAME.inter`, `NAME.item`: typed
//!   tab-separated headers, any RecBole dataset), see [`super::recbole`].
//! * `synthetic` — see [`super::synthetic`].
//!
//! Streaming: reviews are parsed record by record into Arrow builders and
//! written in row groups of [`io::ROW_GROUP`] to a staging Parquet file, so
//! memory stays flat in the input size (only a 16-byte hash per distinct
//! user–item pair, a hash per user and the item ids are kept).
//!
//! Duplicates (the same user–item pair more than once, e.g. product variants
//! in Amazon 2018): **keep the latest** — the record with the largest
//! timestamp, and among equal timestamps the one later in the file. If any
//! pair repeats, a second pass over the staging file drops the others.
//!
//! Bad records never panic and never vanish: each is counted under a reason
//! (`malformed`, `invalid_encoding`, `not_an_object`, `missing_<field>`,
//! `mistyped_<field>`, `rating_out_of_range`, `bad_timestamp`,
//! `truncated_input`) with the first examples as `file:line: message`.
//! `on_error: fail` stops at the first one; `max_bad_fraction` fails the
//! stage when too many records of a file are bad. Text fields are nullable:
//! a missing or blank review text is counted (`missing_text`), not dropped.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, BooleanArray, Float32Builder, Int64Builder, RecordBatch, StringBuilder};
use serde::{Deserialize, Serialize};

use super::io::{self, IoError};
use super::raw::{self, Next, RecordReader, ReviewFields, Val};
use super::recbole;
use super::synthetic::{self, SyntheticConfig};
use super::{format_rating, parse_datetime, schema, Interaction, Item};

/// Raw dump formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Amazon2014,
    Amazon2018,
    Amazon2023,
    Yelp,
    Movielens,
    Recbole,
    Synthetic,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Amazon2014 => "amazon2014",
            Format::Amazon2018 => "amazon2018",
            Format::Amazon2023 => "amazon2023",
            Format::Yelp => "yelp",
            Format::Movielens => "movielens",
            Format::Recbole => "recbole",
            Format::Synthetic => "synthetic",
        }
    }
}

/// What to do with a bad record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Drop it, count it in the report (default).
    #[default]
    Skip,
    /// Fail the stage at the first bad record.
    Fail,
}

/// Resolved ingest options.
#[derive(Debug, Clone)]
pub struct Options {
    pub format: Format,
    pub reviews: Option<PathBuf>,
    /// Item metadata (Amazon meta, Yelp business.json, MovieLens u.item/movies.dat).
    pub meta: Option<PathBuf>,
    pub on_error: OnError,
    pub max_bad_fraction: f64,
    pub rating_min: f32,
    pub rating_max: f32,
    /// `format: recbole`: column names per role (empty: RecBole's usual names).
    pub recbole: recbole::Fields,
    pub synthetic: SyntheticConfig,
    /// Parser threads and Parquet encoder threads (each). Operational: the
    /// outputs are byte-identical for any value (tested).
    pub threads: usize,
}

/// The default for [`Options::threads`]: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot read {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] IoError),
    /// A bad record under `on_error: fail`, too many bad records, or no valid one.
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Config(String),
}

/// Drops of one reason.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DropStat {
    pub count: u64,
    /// The first few, as `file:line: message`.
    pub examples: Vec<String>,
}

/// Where a truncated input ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cut {
    /// Last line read before the cut.
    pub after_line: u64,
    pub error: String,
}

/// Per input file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FileReport {
    /// File name (not the full path: outputs must not depend on where the data lives).
    pub file: String,
    /// `reviews` or `meta`.
    pub role: String,
    /// Records read, good and bad.
    pub raw_records: u64,
    pub bad_records: u64,
    pub truncated: Option<Cut>,
    pub drops: BTreeMap<String, DropStat>,
}

/// How duplicates were resolved.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Duplicates {
    pub rule: String,
    /// Distinct user–item pairs seen more than once.
    pub pairs_with_repeats: u64,
    /// Records dropped as repeats (records − distinct pairs).
    pub extra_records: u64,
}

/// The `report` output.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub format: String,
    pub files: Vec<FileReport>,
    /// Review records read (good and bad).
    pub raw_records: u64,
    pub bad_records: u64,
    /// Valid records before duplicate resolution.
    pub valid_records: u64,
    /// Rows written to `interactions` (= distinct pairs).
    pub kept: u64,
    pub distinct_pairs: u64,
    pub users: u64,
    pub items: u64,
    pub duplicates: Duplicates,
    /// Valid records without review text (null or blank).
    pub missing_text: u64,
    /// Valid records without a review title/summary.
    pub missing_title: u64,
    /// Ratings of the valid records (before duplicate resolution).
    pub rating_histogram: BTreeMap<String, u64>,
    /// Items of `items` that have metadata.
    pub items_with_metadata: u64,
    /// Metadata records for items that have no interaction.
    pub meta_unused: u64,
    /// Synthetic generator facts (noise, best achievable RMSE …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<serde_json::Value>,
}

pub const DUPLICATE_RULE: &str =
    "keep_latest: per user-item pair keep the record with the largest timestamp; equal timestamps: the later one in the file";

const EXAMPLES: usize = 3;

/// Bad-record bookkeeping for one file.
struct Drops<'a> {
    report: FileReport,
    on_error: OnError,
    path: &'a Path,
}

impl<'a> Drops<'a> {
    fn new(path: &'a Path, role: &str, on_error: OnError) -> Self {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        Drops {
            report: FileReport {
                file,
                role: role.into(),
                ..Default::default()
            },
            on_error,
            path,
        }
    }

    fn add(&mut self, line: u64, reason: &str, msg: &str) -> Result<(), IngestError> {
        self.report.bad_records += 1;
        let where_ = format!("{}:{line}", self.report.file);
        if self.on_error == OnError::Fail {
            return Err(IngestError::Bad(format!(
                "{}:{line}: {reason}: {msg} (on_error: fail; set on_error: skip to drop and count such records)",
                self.path.display()
            )));
        }
        let d = self.report.drops.entry(reason.to_string()).or_default();
        d.count += 1;
        if d.examples.len() < EXAMPLES {
            let msg: String = msg.chars().take(200).collect();
            d.examples.push(format!("{where_}: {msg}"));
        }
        Ok(())
    }

    fn cut(&mut self, reader: &RecordReader) -> Result<(), IngestError> {
        if let Some((after_line, error)) = reader.truncated.clone() {
            self.report.truncated = Some(Cut {
                after_line,
                error: error.clone(),
            });
            self.add(
                after_line + 1,
                "truncated_input",
                &format!("input ends early ({error}); the {after_line} lines before the cut were read, a partial record after them is dropped"),
            )?;
        }
        Ok(())
    }

    /// Fails when more than `max` of the records were bad.
    fn check_fraction(&self, max: f64) -> Result<(), IngestError> {
        let r = &self.report;
        let raw = r.raw_records.max(1);
        let frac = r.bad_records as f64 / raw as f64;
        if r.bad_records > 0 && frac > max {
            let reasons: Vec<String> = r
                .drops
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}: {} (first: {})",
                        v.count,
                        v.examples.first().map(String::as_str).unwrap_or("")
                    )
                })
                .collect();
            return Err(IngestError::Bad(format!(
                "{}: {} of {} records ({:.2}%) are bad, above max_bad_fraction = {max}; reasons: {}. \
                 Fix the input, or raise max_bad_fraction to accept the loss.",
                self.path.display(),
                r.bad_records,
                r.raw_records,
                100.0 * frac,
                reasons.join("; ")
            )));
        }
        Ok(())
    }
}

type Bad = (&'static str, String);

/// A parsed review, borrowing from the record's bytes where possible.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub user: Cow<'a, str>,
    pub item: Cow<'a, str>,
    pub rating: f32,
    pub timestamp: i64,
    pub title: Option<Cow<'a, str>>,
    pub text: Option<Cow<'a, str>>,
}

fn req_str<'a>(v: Option<Val<'a>>, name: &str) -> Result<Cow<'a, str>, Bad> {
    match v {
        Some(Val::Str(s)) if !s.trim().is_empty() => Ok(s),
        Some(Val::Str(_)) | Some(Val::Null) | None => Err((
            leak_reason("missing", name),
            format!("field `{name}` is missing or empty"),
        )),
        Some(Val::Num(n)) if n.fract() == 0.0 && n.abs() < 1e15 => Ok(Cow::Owned(format!("{}", n as i64))),
        Some(other) => Err((
            leak_reason("mistyped", name),
            format!("field `{name}` is {}, expected a string", other.type_name()),
        )),
    }
}

fn opt_text(v: Option<Val<'_>>) -> Option<Cow<'_, str>> {
    match v {
        Some(Val::Str(s)) if !s.trim().is_empty() => Some(s),
        _ => None,
    }
}

fn req_num(v: Option<Val<'_>>, name: &str) -> Result<f64, Bad> {
    match v {
        Some(Val::Num(n)) => Ok(n),
        Some(Val::Null) | None => Err((leak_reason("missing", name), format!("field `{name}` is missing"))),
        Some(other) => Err((
            leak_reason("mistyped", name),
            format!("field `{name}` is {}, expected a number", other.type_name()),
        )),
    }
}

/// Reason codes are a small closed set per format; interning them as
/// `&'static str` keeps the hot loop free of allocations.
pub(crate) fn leak_reason(kind: &str, field: &str) -> &'static str {
    use std::sync::{Mutex, OnceLock};
    static CODES: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let key = format!("{kind}_{field}");
    let mut m = CODES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(s) = m.get(&key) {
        return s;
    }
    let s: &'static str = Box::leak(key.clone().into_boxed_str());
    m.insert(key, s);
    s
}

/// `MM DD, YYYY` (Amazon `reviewTime`) → UTC seconds.
fn parse_review_time(s: &str) -> Option<i64> {
    let mut it = s.split([' ', ',']).filter(|x| !x.is_empty());
    let m: u32 = it.next()?.parse().ok()?;
    let d: u32 = it.next()?.parse().ok()?;
    let y: i64 = it.next()?.parse().ok()?;
    parse_datetime(&format!("{y:04}-{m:02}-{d:02}"))
}

/// Parses one JSON review record of `format`.
pub fn parse_review(format: Format, bytes: &[u8], rmin: f32, rmax: f32) -> Result<Parsed<'_>, Bad> {
    match bytes.trim_ascii_start().first() {
        Some(b'{') => {}
        _ => {
            let bad = if std::str::from_utf8(bytes).is_err() {
                "invalid_encoding"
            } else {
                "not_an_object"
            };
            return Err((
                bad,
                format!(
                    "not a JSON object: `{}`",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
                ),
            ));
        }
    }
    let mut f: ReviewFields = match serde_json::from_slice(bytes) {
        Ok(f) => f,
        Err(e) => {
            if std::str::from_utf8(bytes).is_err() {
                return Err(("invalid_encoding", format!("not valid UTF-8: {e}")));
            }
            return Err(("malformed", format!("invalid JSON: {e}")));
        }
    };
    let (user, item, rating, title, text, ts) = match format {
        Format::Amazon2014 | Format::Amazon2018 => {
            let ts = match f.unix_review_time.take() {
                Some(Val::Num(n)) => Ok(n.floor() as i64),
                Some(Val::Null) | None => match f.review_time.take() {
                    Some(Val::Str(s)) => {
                        parse_review_time(&s).ok_or(("bad_timestamp", format!("reviewTime `{s}` is not `MM DD, YYYY`")))
                    }
                    _ => Err((
                        leak_reason("missing", "unixReviewTime"),
                        "fields `unixReviewTime` and `reviewTime` are missing".into(),
                    )),
                },
                Some(o) => Err((
                    leak_reason("mistyped", "unixReviewTime"),
                    format!("field `unixReviewTime` is {}, expected a number", o.type_name()),
                )),
            };
            (
                req_str(f.reviewer_id.take(), "reviewerID"),
                req_str(f.asin.take(), "asin"),
                req_num(f.overall.take(), "overall"),
                opt_text(f.summary.take()),
                opt_text(f.review_text.take()),
                ts,
            )
        }
        Format::Amazon2023 => {
            let item = match f.parent_asin.take() {
                Some(Val::Null) | None => req_str(f.asin.take(), "parent_asin"),
                v => req_str(v, "parent_asin"),
            };
            let ts = req_num(f.timestamp.take(), "timestamp").map(|ms| (ms / 1000.0).floor() as i64);
            (
                req_str(f.user_id.take(), "user_id"),
                item,
                req_num(f.rating.take(), "rating"),
                opt_text(f.title.take()),
                opt_text(f.text.take()),
                ts,
            )
        }
        Format::Yelp => {
            let ts = match f.date.take() {
                Some(Val::Str(s)) => {
                    parse_datetime(&s).ok_or(("bad_timestamp", format!("date `{s}` is not `YYYY-MM-DD HH:MM:SS`")))
                }
                Some(Val::Null) | None => Err((leak_reason("missing", "date"), "field `date` is missing".to_string())),
                Some(o) => Err((
                    leak_reason("mistyped", "date"),
                    format!("field `date` is {}, expected a string", o.type_name()),
                )),
            };
            (
                req_str(f.user_id.take(), "user_id"),
                req_str(f.business_id.take(), "business_id"),
                req_num(f.stars.take(), "stars"),
                None,
                opt_text(f.text.take()),
                ts,
            )
        }
        Format::Movielens | Format::Recbole | Format::Synthetic => return Err(("malformed", "not a JSON format".into())),
    };
    let (user, item, rating, timestamp) = (user?, item?, rating?, ts?);
    if !rating.is_finite() || (rating as f32) < rmin || (rating as f32) > rmax {
        return Err((
            "rating_out_of_range",
            format!("rating {rating} outside [{rmin}, {rmax}]"),
        ));
    }
    Ok(Parsed {
        user,
        item,
        rating: rating as f32,
        timestamp,
        title,
        text,
    })
}

/// Parses one MovieLens rating line (100K: tab/space separated; 1M: `::`).
pub fn parse_movielens_rating(bytes: &[u8]) -> Result<Parsed<'_>, Bad> {
    let s = std::str::from_utf8(bytes).map_err(|e| ("invalid_encoding", format!("not valid UTF-8: {e}")))?;
    let parts: Vec<&str> = if s.contains("::") {
        s.split("::").collect()
    } else {
        s.split_whitespace().collect()
    };
    if parts.len() != 4 {
        return Err((
            "malformed",
            format!(
                "expected 4 fields (user, item, rating, timestamp), got {}: `{s}`",
                parts.len()
            ),
        ));
    }
    let rating: f32 = parts[2].trim().parse().map_err(|_| {
        (
            leak_reason("mistyped", "rating"),
            format!("rating `{}` is not a number", parts[2]),
        )
    })?;
    let timestamp: i64 = parts[3]
        .trim()
        .parse()
        .map_err(|_| ("bad_timestamp", format!("timestamp `{}` is not an integer", parts[3])))?;
    if parts[0].trim().is_empty() || parts[1].trim().is_empty() {
        return Err((leak_reason("missing", "id"), "empty user or item id".into()));
    }
    Ok(Parsed {
        user: Cow::Borrowed(parts[0].trim()),
        item: Cow::Borrowed(parts[1].trim()),
        rating,
        timestamp,
        title: None,
        text: None,
    })
}

// ------------------------------------------------------------------ builders

struct Builders {
    user: StringBuilder,
    item: StringBuilder,
    rating: Float32Builder,
    ts: Int64Builder,
    title: StringBuilder,
    text: StringBuilder,
}

impl Builders {
    /// Room for `rows` records of about `bytes` raw bytes in all.
    fn with_capacity(rows: usize, bytes: usize) -> Self {
        Builders {
            user: StringBuilder::with_capacity(rows, rows * 16),
            item: StringBuilder::with_capacity(rows, rows * 12),
            rating: Float32Builder::with_capacity(rows),
            ts: Int64Builder::with_capacity(rows),
            title: StringBuilder::with_capacity(rows, rows * 24),
            text: StringBuilder::with_capacity(rows, bytes),
        }
    }
    fn push(&mut self, p: &Parsed) {
        self.user.append_value(&p.user);
        self.item.append_value(&p.item);
        self.rating.append_value(p.rating);
        self.ts.append_value(p.timestamp);
        self.title.append_option(p.title.as_deref());
        self.text.append_option(p.text.as_deref());
    }
    fn finish(&mut self) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.user.finish()),
            Arc::new(self.item.finish()),
            Arc::new(self.rating.finish()),
            Arc::new(self.ts.finish()),
            Arc::new(self.title.finish()),
            Arc::new(self.text.finish()),
        ];
        RecordBatch::try_new(schema::interactions(), cols).expect("builders follow the interactions schema")
    }
}

/// 64-bit xxh3 of an id: fixed (no per-process seed), so pass 2 finds pass 1's
/// keys, and several times cheaper than SipHash on short strings.
fn id_hash(s: &str) -> u64 {
    twox_hash::XxHash3_64::oneshot(s.as_bytes())
}

/// 128-bit identity of a user–item pair: the user's and the item's id
/// hashes side by side (two pairs collide only if both their users and
/// their items collide: ~n²/2¹²⁹).
fn pair_key(user: u64, item: u64) -> u128 {
    ((user as u128) << 64) | item as u128
}

/// Hasher for keys that already are uniform hashes (the id and pair keys
/// above): passes the bits through instead of hashing them again.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= v as u64 ^ ((v >> 64) as u64).rotate_left(29);
    }
}

type Pre = std::hash::BuildHasherDefault<PreHashed>;

struct PairState {
    count: u32,
    ts: i64,
    row: u64,
}

/// The distinct item ids, keyed by their hash (computed on the parser
/// threads). An id whose 64-bit hash is already taken by another id (about
/// never) goes to `collided`, so the set stays exact.
#[derive(Default)]
struct ItemIds {
    by_hash: HashMap<u64, Box<str>, Pre>,
    collided: HashSet<Box<str>>,
}

impl ItemIds {
    fn insert(&mut self, hash: u64, id: &str) {
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(id.into());
            }
            std::collections::hash_map::Entry::Occupied(e) => {
                if e.get().as_ref() != id && !self.collided.contains(id) {
                    self.collided.insert(id.into());
                }
            }
        }
    }
    fn contains(&self, id: &str) -> bool {
        self.by_hash.get(&id_hash(id)).is_some_and(|x| x.as_ref() == id) || self.collided.contains(id)
    }
    fn len(&self) -> usize {
        self.by_hash.len() + self.collided.len()
    }
    fn into_sorted(self) -> Vec<Box<str>> {
        let mut ids: Vec<Box<str>> = self.by_hash.into_values().chain(self.collided).collect();
        ids.sort();
        ids
    }
}

fn hist_key(r: f32) -> i64 {
    (r as f64 * 2.0).round() as i64
}

// ----------------------------------------------------------- parallel parse

/// Raw bytes per parse chunk: large enough that channel and batch overheads
/// vanish, small enough that the chunks in flight stay a few MiB.
const CHUNK_BYTES: usize = 1 << 20;

/// One review record of `opts.format` (JSON, a MovieLens rating line, or a
/// RecBole `.inter` line laid out by `layout`).
fn parse_record<'a>(opts: &Options, layout: Option<&recbole::InterLayout>, bytes: &'a [u8]) -> Result<Parsed<'a>, Bad> {
    if matches!(opts.format, Format::Movielens | Format::Recbole) {
        let p = match layout {
            Some(l) => l.parse(bytes)?,
            None => parse_movielens_rating(bytes)?,
        };
        if !p.rating.is_finite() || p.rating < opts.rating_min || p.rating > opts.rating_max {
            return Err((
                "rating_out_of_range",
                format!("rating {} outside [{}, {}]", p.rating, opts.rating_min, opts.rating_max),
            ));
        }
        return Ok(p);
    }
    parse_review(opts.format, bytes, opts.rating_min, opts.rating_max)
}

/// What a parser thread hands back for one chunk: everything that does not
/// depend on the records before it. The order-dependent rest (duplicate
/// resolution by row number, the first examples of each drop reason,
/// `on_error: fail`) is applied chunk by chunk in file order.
struct ParsedChunk {
    seq: u64,
    /// The raw chunk, handed back to the reader for reuse.
    chunk: raw::Chunk,
    /// The valid records, in file order (interactions schema).
    batch: RecordBatch,
    /// Per valid record: the user's and the item's id hash.
    keys: Vec<(u64, u64)>,
    /// Bad records in file order: line, reason, message.
    bad: Vec<(u64, &'static str, String)>,
    missing_text: u64,
    missing_title: u64,
    hist: BTreeMap<i64, u64>,
}

fn parse_chunk(opts: &Options, layout: Option<&recbole::InterLayout>, seq: u64, chunk: raw::Chunk) -> ParsedChunk {
    let mut b = Builders::with_capacity(chunk.ends.len(), chunk.bytes.len());
    let mut keys = Vec::with_capacity(chunk.ends.len());
    let (mut bad, mut missing_text, mut missing_title, mut hist) = (Vec::new(), 0, 0, BTreeMap::new());
    for (line, bytes) in chunk.records() {
        match parse_record(opts, layout, bytes) {
            Ok(p) => {
                missing_text += p.text.is_none() as u64;
                missing_title += p.title.is_none() as u64;
                *hist.entry(hist_key(p.rating)).or_default() += 1;
                keys.push((id_hash(&p.user), id_hash(&p.item)));
                b.push(&p);
            }
            Err((reason, msg)) => bad.push((line, reason, msg)),
        }
    }
    ParsedChunk {
        seq,
        batch: b.finish(),
        chunk,
        keys,
        bad,
        missing_text,
        missing_title,
        hist,
    }
}

/// Row groups are assembled in ~35 MB batches and the chunks in ~1 MB
/// ones, allocated and freed continuously on several threads. glibc serves
/// blocks above its mmap threshold (128 KiB, rising to at most 32 MiB) with fresh mappings and
/// trims freed heap tops, so every such batch page-faults its memory in
/// again: measured, a third of ingest's CPU time was kernel time. Raising
/// both thresholds keeps freed blocks for reuse. The worker runs one stage
/// per process, so the process-wide setting stays within this stage; the
/// memory kept is the in-flight working set, bounded by the chunk pool and
/// the writer's row groups in flight.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is
    // thread-safe and has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum on 64-bit
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// Pass 1's running state, updated chunk by chunk in file order.
struct Pass1 {
    pairs: HashMap<u128, PairState, Pre>,
    users: HashSet<u64, Pre>,
    items: ItemIds,
    hist: BTreeMap<i64, u64>,
    /// Valid records so far = the next row's number in the staging file.
    rows: u64,
}

/// Runs ingest: writes `interactions_out`, `items_out` and returns the report.
/// `staging` is a scratch file path (same filesystem as the output).
pub fn ingest(
    opts: &Options,
    interactions_out: &Path,
    items_out: &Path,
    staging: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Report, IngestError> {
    if opts.format == Format::Synthetic {
        return ingest_synthetic(opts, interactions_out, items_out);
    }
    let reviews = opts.reviews.as_deref().ok_or_else(|| {
        IngestError::Config(format!(
            "format `{}` needs `reviews:` (the review file)",
            opts.format.name()
        ))
    })?;
    let (reviews, meta_path) = match opts.format {
        Format::Recbole => recbole::dataset_files(reviews, opts.meta.as_deref())?,
        _ => (reviews.to_path_buf(), opts.meta.clone()),
    };
    let reviews = reviews.as_path();
    let mut report = Report {
        format: opts.format.name().into(),
        ..Default::default()
    };

    // ---- pass 1: parse, stage, count
    let mut reader = if matches!(opts.format, Format::Movielens | Format::Recbole) {
        RecordReader::lines(reviews)
    } else {
        RecordReader::open(reviews, false)
    }
    .map_err(|source| IngestError::Open {
        path: reviews.to_path_buf(),
        source,
    })?;
    // RecBole: the typed header decides where each field is.
    let layout = match opts.format {
        Format::Recbole => {
            let cols = recbole_header(&mut reader)?;
            Some(recbole::InterLayout::resolve(reviews, cols, &opts.recbole)?)
        }
        _ => None,
    };
    let mut drops = Drops::new(reviews, "reviews", opts.on_error);
    let mut st = Pass1 {
        pairs: HashMap::default(),
        users: HashSet::default(),
        items: ItemIds::default(),
        hist: BTreeMap::new(),
        rows: 0,
    };
    let threads = opts.threads.max(1);
    keep_freed_memory();
    let writer = io::ParallelTableWriter::create(staging, schema::interactions(), threads)?;
    let pass1 = pass1(opts, layout.as_ref(), reader, writer, threads, &mut drops, &mut report, &mut st, progress);
    let reader = match pass1 {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(staging);
            return Err(e);
        }
    };
    let Pass1 {
        pairs,
        users,
        items,
        hist,
        ..
    } = st;
    drops.cut(&reader)?;
    if drops.report.truncated.is_some() {
        drops.report.raw_records += 1;
    }
    progress(drops.report.raw_records);
    drops.check_fraction(opts.max_bad_fraction)?;
    report.raw_records = drops.report.raw_records;
    report.bad_records = drops.report.bad_records;
    if report.valid_records == 0 {
        let reasons: Vec<String> = drops
            .report
            .drops
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.count))
            .collect();
        let _ = std::fs::remove_file(staging);
        return Err(IngestError::Bad(format!(
            "{}: no valid {} records among {} read (bad: {}); is `format: {}` right for this file?",
            reviews.display(),
            opts.format.name(),
            report.raw_records,
            if reasons.is_empty() {
                "none".into()
            } else {
                reasons.join(", ")
            },
            opts.format.name()
        )));
    }
    report.files.push(drops.report);
    report.distinct_pairs = pairs.len() as u64;
    report.users = users.len() as u64;
    report.items = items.len() as u64;
    report.rating_histogram = hist
        .into_iter()
        .map(|(k, v)| (format_rating(k as f32 / 2.0), v))
        .collect();
    let repeats = pairs.values().filter(|s| s.count > 1).count() as u64;
    report.duplicates = Duplicates {
        rule: DUPLICATE_RULE.into(),
        pairs_with_repeats: repeats,
        extra_records: report.valid_records - report.distinct_pairs,
    };
    drop(users);

    // ---- pass 2: drop repeats (only when there are any)
    if repeats == 0 {
        std::fs::rename(staging, interactions_out).map_err(|source| IngestError::Open {
            path: interactions_out.to_path_buf(),
            source,
        })?;
    } else {
        let mut w = io::ParallelTableWriter::create(interactions_out, schema::interactions(), threads)?;
        let mut row: u64 = 0;
        for batch in io::read_batches(staging)? {
            let (u, it) = (batch.column(0).as_string::<i32>(), batch.column(1).as_string::<i32>());
            let keep: BooleanArray = (0..batch.num_rows())
                .map(|i| {
                    let r = row + i as u64;
                    Some(
                        pairs
                            .get(&pair_key(id_hash(u.value(i)), id_hash(it.value(i))))
                            .is_some_and(|s| s.row == r),
                    )
                })
                .collect();
            row += batch.num_rows() as u64;
            let kept = arrow::compute::filter_record_batch(&batch, &keep).map_err(|source| IoError::Arrow {
                path: staging.to_path_buf(),
                source,
            })?;
            w.write(kept)?;
        }
        w.finish()?;
        let _ = std::fs::remove_file(staging);
    }
    report.kept = report.distinct_pairs;
    drop(pairs);

    // ---- items: every item with an interaction, metadata joined when given
    let mut meta: HashMap<String, Item> = HashMap::new();
    if let Some(mp) = meta_path.as_deref() {
        let item_column = layout.as_ref().map(|l| l.item_column());
        let (file, unused) = read_meta(opts, item_column, mp, &items, &mut meta)?;
        report.meta_unused = unused;
        report.files.push(file);
    }
    let rows: Vec<Item> = items
        .into_sorted()
        .into_iter()
        .map(|id| {
            meta.remove(id.as_ref()).unwrap_or_else(|| Item {
                item_id: id.into(),
                ..Default::default()
            })
        })
        .collect();
    report.items_with_metadata = rows
        .iter()
        .filter(|i| i.title.is_some() || i.categories.is_some())
        .count() as u64;
    io::write_items(items_out, &rows)?;
    Ok(report)
}

/// Pass 1 on threads: a reader cuts the input into chunks of whole records,
/// `threads` parsers parse chunks, this thread applies them in file order
/// (so the report and the row numbers are those of a sequential read) and
/// feeds the staging file, whose row groups are encoded on `threads` more.
/// The chunk buffers circulate through a fixed pool: memory stays bounded
/// however fast any one stage is. Returns the reader (its `truncated`).
#[allow(clippy::too_many_arguments)]
fn pass1(
    opts: &Options,
    layout: Option<&recbole::InterLayout>,
    mut reader: RecordReader,
    mut writer: io::ParallelTableWriter,
    threads: usize,
    drops: &mut Drops,
    report: &mut Report,
    st: &mut Pass1,
    progress: &mut dyn FnMut(u64),
) -> Result<RecordReader, IngestError> {
    use std::sync::mpsc::sync_channel;
    use std::sync::Mutex;
    let in_flight = 2 * threads + 2;
    let (pool_tx, pool_rx) = sync_channel::<raw::Chunk>(in_flight);
    for _ in 0..in_flight {
        let _ = pool_tx.send(raw::Chunk::default());
    }
    let (work_tx, work_rx) = sync_channel::<(u64, raw::Chunk)>(in_flight);
    // Shared by the parsers; dropped with the last of them, which unblocks
    // the reader if this thread stopped early.
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (done_tx, done_rx) = sync_channel::<ParsedChunk>(in_flight);
    std::thread::scope(|s| {
        let read = s.spawn(move || {
            let mut seq = 0u64;
            while let Ok(mut chunk) = pool_rx.recv() {
                chunk.clear();
                let more = reader.fill(&mut chunk, CHUNK_BYTES);
                if !chunk.ends.is_empty() {
                    if work_tx.send((seq, chunk)).is_err() {
                        break;
                    }
                    seq += 1;
                }
                if !more {
                    break;
                }
            }
            reader
        });
        for _ in 0..threads {
            let (work_rx, done_tx) = (work_rx.clone(), done_tx.clone());
            s.spawn(move || loop {
                let next = work_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((seq, chunk)) = next else { return };
                if done_tx.send(parse_chunk(opts, layout, seq, chunk)).is_err() {
                    return;
                }
            });
        }
        drop((work_rx, done_tx));
        let applied = (|| -> Result<(), IngestError> {
            let mut waiting: BTreeMap<u64, ParsedChunk> = BTreeMap::new();
            let mut next = 0u64;
            for pc in done_rx {
                waiting.insert(pc.seq, pc);
                while let Some(pc) = waiting.remove(&next) {
                    next += 1;
                    let before = st.rows;
                    let chunk = apply_chunk(pc, drops, report, st, &mut writer)?;
                    let _ = pool_tx.send(chunk);
                    // About once per row group, as the sequential reader did.
                    if before / io::ROW_GROUP as u64 != st.rows / io::ROW_GROUP as u64 {
                        progress(drops.report.raw_records);
                    }
                }
            }
            Ok(())
        })();
        // On an early stop (on_error: fail), closing the pool and the result
        // channel winds the reader and the parsers down before the scope joins them.
        drop(pool_tx);
        let reader = read
            .join()
            .map_err(|_| IngestError::Bad("ingest: the reader thread panicked".into()))?;
        applied?;
        writer.finish()?;
        Ok(reader)
    })
}

/// Applies one parsed chunk in file order; returns the raw chunk for reuse.
fn apply_chunk(
    pc: ParsedChunk,
    drops: &mut Drops,
    report: &mut Report,
    st: &mut Pass1,
    writer: &mut io::ParallelTableWriter,
) -> Result<raw::Chunk, IngestError> {
    drops.report.raw_records += pc.chunk.ends.len() as u64;
    for (line, reason, msg) in &pc.bad {
        drops.add(*line, reason, msg)?;
    }
    let n = pc.batch.num_rows();
    report.valid_records += n as u64;
    report.missing_text += pc.missing_text;
    report.missing_title += pc.missing_title;
    for (k, v) in &pc.hist {
        *st.hist.entry(*k).or_default() += v;
    }
    let (items, ts) = (
        pc.batch.column(1).as_string::<i32>(),
        pc.batch.column(3).as_primitive::<arrow::datatypes::Int64Type>(),
    );
    for (i, &(user, item)) in pc.keys.iter().enumerate() {
        st.users.insert(user);
        st.items.insert(item, items.value(i));
        let t = ts.value(i);
        let p = st.pairs.entry(pair_key(user, item)).or_insert(PairState {
            count: 0,
            ts: i64::MIN,
            row: st.rows,
        });
        p.count += 1;
        if t >= p.ts {
            p.ts = t;
            p.row = st.rows;
        }
        st.rows += 1;
    }
    if n > 0 {
        writer.write(pc.batch)?;
    }
    Ok(pc.chunk)
}

/// Streams a metadata file, keeping the records of items in `wanted`
/// (first record per item wins). Returns the file report and the number of
/// records for items without interactions.
fn read_meta(
    opts: &Options,
    item_column: Option<&str>,
    path: &Path,
    wanted: &ItemIds,
    out: &mut HashMap<String, Item>,
) -> Result<(FileReport, u64), IngestError> {
    let ml = matches!(opts.format, Format::Movielens | Format::Recbole);
    let mut reader = if ml {
        RecordReader::lines(path)
    } else {
        RecordReader::open(path, opts.format == Format::Amazon2014)
    }
    .map_err(|source| IngestError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let layout = match (opts.format, item_column) {
        (Format::Recbole, Some(id)) => {
            let cols = recbole_header(&mut reader)?;
            Some(recbole::ItemLayout::resolve(path, cols, id, &opts.recbole)?)
        }
        _ => None,
    };
    let mut drops = Drops::new(path, "meta", opts.on_error);
    let mut unused = 0u64;
    let mut buf = Vec::new();
    loop {
        let line = match reader.next_record(&mut buf) {
            Next::Record { partial: true, .. } => continue,
            Next::Record { line, .. } => line,
            Next::End => break,
        };
        drops.report.raw_records += 1;
        let item = if let Some(l) = &layout {
            l.parse(&buf)
        } else if ml {
            parse_movielens_item(&buf)
        } else {
            parse_meta(opts.format, &buf)
        };
        match item {
            Ok(item) => {
                if !wanted.contains(item.item_id.as_str()) {
                    unused += 1;
                } else if !out.contains_key(&item.item_id) {
                    out.insert(item.item_id.clone(), item);
                }
            }
            Err((reason, msg)) => drops.add(line, reason, &msg)?,
        }
    }
    drops.cut(&reader)?;
    if drops.report.truncated.is_some() {
        drops.report.raw_records += 1;
    }
    drops.check_fraction(opts.max_bad_fraction)?;
    Ok((drops.report, unused))
}

/// Reads a RecBole file's typed header: its first non-blank line.
fn recbole_header(reader: &mut RecordReader) -> Result<Vec<recbole::Column>, IngestError> {
    let mut buf = Vec::new();
    match reader.next_record(&mut buf) {
        Next::Record { line, .. } => recbole::parse_header(&reader.path, line, &buf),
        Next::End => Err(IngestError::Bad(format!(
            "{}: empty file; a RecBole atomic file starts with a typed header line (`user_id:token\\titem_id:token…`)",
            reader.path.display()
        ))),
    }
}

/// Latin-1 → UTF-8 (MovieLens files are ISO-8859-1); UTF-8 input passes through.
fn decode_latin1(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytes.iter().map(|&b| b as char).collect()),
    }
}

/// The 19 genre flags of MovieLens 100K `u.item`, in file order (`u.genre`).
const ML100K_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

/// `u.item` (`id|title|release|video|url|19 flags`) or `movies.dat` (`id::title::A|B`).
pub fn parse_movielens_item(bytes: &[u8]) -> Result<Item, Bad> {
    let s = decode_latin1(bytes);
    let (id, title, genres): (&str, &str, Vec<String>) = if s.contains("::") {
        let p: Vec<&str> = s.split("::").collect();
        if p.len() != 3 {
            return Err((
                "malformed",
                format!("expected `id::title::genres`, got {} fields", p.len()),
            ));
        }
        (
            p[0],
            p[1],
            p[2].split('|').filter(|g| !g.is_empty()).map(str::to_string).collect(),
        )
    } else {
        let p: Vec<&str> = s.split('|').collect();
        if p.len() < 5 {
            return Err((
                "malformed",
                format!(
                    "expected `id|title|release|video|url|genre flags`, got {} fields",
                    p.len()
                ),
            ));
        }
        let flags = &p[5..];
        let g = flags
            .iter()
            .zip(ML100K_GENRES)
            .filter(|(f, _)| f.trim() == "1")
            .map(|(_, g)| g.to_string())
            .collect();
        (p[0], p[1], g)
    };
    if id.trim().is_empty() {
        return Err((leak_reason("missing", "id"), "empty movie id".into()));
    }
    Ok(Item {
        item_id: id.trim().to_string(),
        title: Some(title.trim().to_string()).filter(|t| !t.is_empty()),
        categories: Some(genres),
        ..Default::default()
    })
}

/// Strings of a value, flattening nested lists (2014 categories are lists
/// of lists), deduplicated in first-seen order.
fn strings_of(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => {
            let s = s.trim();
            if !s.is_empty() && !out.iter().any(|x| x == s) {
                out.push(s.to_string());
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings_of(x, out)),
        _ => {}
    }
}

fn text_of(v: Option<&serde_json::Value>) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(v) = v {
        strings_of(v, &mut parts);
    }
    let s = parts.join(" ");
    (!s.trim().is_empty()).then_some(s)
}

fn price_of(v: Option<&serde_json::Value>) -> Option<f64> {
    match v? {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().trim_start_matches('$').replace(',', "").parse().ok(),
        _ => None,
    }
    .filter(|p: &f64| p.is_finite() && *p >= 0.0)
}

/// One metadata record (JSON, or a Python-dict literal for Amazon 2014).
pub fn parse_meta(format: Format, bytes: &[u8]) -> Result<Item, Bad> {
    let s = std::str::from_utf8(bytes).map_err(|e| ("invalid_encoding", format!("not valid UTF-8: {e}")))?;
    let v: serde_json::Value = match serde_json::from_str(s) {
        Ok(v) => v,
        Err(je) if format == Format::Amazon2014 => raw::parse_pydict(s).map_err(|pe| {
            (
                "malformed",
                format!("neither JSON ({je}) nor a Python dict literal ({pe})"),
            )
        })?,
        Err(e) => return Err(("malformed", format!("invalid JSON: {e}"))),
    };
    let obj = v
        .as_object()
        .ok_or(("not_an_object", "metadata record is not an object".to_string()))?;
    let id_key = match format {
        Format::Amazon2023 if obj.get("parent_asin").is_some_and(|x| !x.is_null()) => "parent_asin",
        Format::Yelp => "business_id",
        _ => "asin",
    };
    let item_id = match obj.get(id_key) {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        None | Some(serde_json::Value::Null) => {
            return Err((leak_reason("missing", id_key), format!("field `{id_key}` is missing")))
        }
        Some(_) => {
            return Err((
                leak_reason("mistyped", id_key),
                format!("field `{id_key}` is not a string"),
            ))
        }
    };
    let mut cats = Vec::new();
    let item = match format {
        Format::Yelp => {
            if let Some(serde_json::Value::String(c)) = obj.get("categories") {
                c.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .for_each(|x| strings_of(&x.into(), &mut cats));
            }
            let place: Vec<&str> = ["city", "state"]
                .iter()
                .filter_map(|k| obj.get(*k).and_then(|x| x.as_str()))
                .filter(|x| !x.is_empty())
                .collect();
            Item {
                item_id,
                title: text_of(obj.get("name")),
                categories: None,
                description: (!place.is_empty()).then(|| format!("Located in {}", place.join(", "))),
                brand: None,
                price: None,
            }
        }
        Format::Amazon2023 => {
            if let Some(m) = obj.get("main_category") {
                strings_of(m, &mut cats);
            }
            if let Some(c) = obj.get("categories") {
                strings_of(c, &mut cats);
            }
            Item {
                item_id,
                title: text_of(obj.get("title")),
                categories: None,
                description: text_of(obj.get("description")).or_else(|| text_of(obj.get("features"))),
                brand: text_of(obj.get("store")).or_else(|| text_of(obj.get("brand"))),
                price: price_of(obj.get("price")),
            }
        }
        _ => {
            for k in ["categories", "category"] {
                if let Some(c) = obj.get(k) {
                    strings_of(c, &mut cats);
                }
            }
            Item {
                item_id,
                title: text_of(obj.get("title")),
                categories: None,
                description: text_of(obj.get("description")),
                brand: text_of(obj.get("brand")),
                price: price_of(obj.get("price")),
            }
        }
    };
    Ok(Item {
        categories: (!cats.is_empty()).then_some(cats),
        ..item
    })
}

fn ingest_synthetic(opts: &Options, interactions_out: &Path, items_out: &Path) -> Result<Report, IngestError> {
    let data = synthetic::generate(&opts.synthetic).map_err(IngestError::Config)?;
    let mut report = report_of(&data.interactions, "synthetic");
    report.items_with_metadata = data.items.len() as u64;
    report.synthetic = Some(serde_json::to_value(&data.facts).unwrap_or_default());
    io::write_interactions(interactions_out, &data.interactions)?;
    io::write_items(items_out, &data.items)?;
    Ok(report)
}

/// Report figures of an in-memory interaction table without duplicates.
pub fn report_of(rows: &[Interaction], format: &str) -> Report {
    let mut hist: BTreeMap<i64, u64> = BTreeMap::new();
    for r in rows {
        *hist.entry(hist_key(r.rating)).or_default() += 1;
    }
    let n = rows.len() as u64;
    Report {
        format: format.into(),
        raw_records: n,
        valid_records: n,
        kept: n,
        distinct_pairs: rows
            .iter()
            .map(|r| (&r.user_id, &r.item_id))
            .collect::<HashSet<_>>()
            .len() as u64,
        users: rows.iter().map(|r| &r.user_id).collect::<HashSet<_>>().len() as u64,
        items: rows.iter().map(|r| &r.item_id).collect::<HashSet<_>>().len() as u64,
        duplicates: Duplicates {
            rule: DUPLICATE_RULE.into(),
            ..Default::default()
        },
        missing_text: rows.iter().filter(|r| r.review_text.is_none()).count() as u64,
        missing_title: rows.iter().filter(|r| r.review_title.is_none()).count() as u64,
        rating_histogram: hist
            .into_iter()
            .map(|(k, v)| (format_rating(k as f32 / 2.0), v))
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_fields_map_per_format() {
        let p = parse_review(
            Format::Amazon2014,
            br#"{"reviewerID":"u","asin":"a","overall":4.0,"summary":"ok","reviewText":" ","unixReviewTime":100}"#,
            1.0,
            5.0,
        )
        .unwrap();
        assert_eq!(
            (p.user.as_ref(), p.item.as_ref(), p.rating, p.timestamp),
            ("u", "a", 4.0, 100)
        );
        assert!(p.text.is_none(), "blank review text is missing text, not a drop");
        let p = parse_review(Format::Amazon2023, br#"{"user_id":"u","parent_asin":"p","asin":"a","rating":5,"title":"t","text":"x","timestamp":1588615855070}"#, 1.0, 5.0).unwrap();
        assert_eq!(
            (p.item.as_ref(), p.timestamp),
            ("p", 1588615855),
            "2023 uses parent_asin and ms timestamps"
        );
        let p = parse_review(
            Format::Yelp,
            br#"{"user_id":"u","business_id":"b","stars":3.0,"text":"t","date":"2014-10-11 03:34:02"}"#,
            1.0,
            5.0,
        )
        .unwrap();
        assert_eq!(p.timestamp, 1_412_998_442);
        let p = parse_review(
            Format::Amazon2018,
            br#"{"reviewerID":"u","asin":"a","overall":4.0,"reviewTime":"09 4, 2015"}"#,
            1.0,
            5.0,
        )
        .unwrap();
        assert_eq!(p.timestamp, 1_441_324_800, "reviewTime is the fallback timestamp");
    }

    #[test]
    fn bad_reviews_have_reasons() {
        let r = |b: &[u8]| parse_review(Format::Amazon2014, b, 1.0, 5.0).unwrap_err().0;
        assert_eq!(
            r(br#"{"asin":"a","overall":4.0,"unixReviewTime":1}"#),
            "missing_reviewerID"
        );
        assert_eq!(
            r(br#"{"reviewerID":"u","asin":"a","overall":"4","unixReviewTime":1}"#),
            "mistyped_overall"
        );
        assert_eq!(
            r(br#"{"reviewerID":"u","asin":"a","overall":9,"unixReviewTime":1}"#),
            "rating_out_of_range"
        );
        assert_eq!(r(br#"{"reviewerID":"u","asin":"a","overall":4"#), "malformed");
        assert_eq!(r(b"[1,2]"), "not_an_object");
        assert_eq!(r(b"{\"reviewerID\":\"\xff\xfe\"}"), "invalid_encoding");
    }

    #[test]
    fn meta_formats_map_to_items() {
        let i = parse_meta(Format::Amazon2014, br#"{'asin': 'A1', 'title': "Bob's Tutu", 'price': 3.17, 'categories': [['Sports', 'Dance'], ['Sports']], 'brand': 'X'}"#).unwrap();
        assert_eq!(i.title.as_deref(), Some("Bob's Tutu"));
        assert_eq!(
            i.categories,
            Some(vec!["Sports".to_string(), "Dance".to_string()]),
            "nested categories flatten, deduplicated"
        );
        let i = parse_meta(
            Format::Amazon2018,
            br#"{"asin":"A","title":"T","category":["C"],"description":["d1","d2"],"price":"$12.99"}"#,
        )
        .unwrap();
        assert_eq!(
            (i.price, i.description.as_deref()),
            (Some(12.99), Some("d1 d2")),
            "2018 prices are strings"
        );
        let i = parse_meta(Format::Yelp, br#"{"business_id":"b","name":"Pizza Place","categories":"Restaurants, Pizza","city":"Boston","state":"MA"}"#).unwrap();
        assert_eq!(i.categories.as_deref().map(|c| c.len()), Some(2));
        let i = parse_movielens_item(b"1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0")
            .unwrap();
        assert_eq!(
            i.categories,
            Some(vec![
                "Animation".to_string(),
                "Children's".to_string(),
                "Comedy".to_string()
            ])
        );
        let i = parse_movielens_item(b"2::Jumanji (1995)::Adventure|Children's|Fantasy").unwrap();
        assert_eq!(i.categories.map(|c| c.len()), Some(3));
        let i = parse_movielens_item(b"3|Caf\xe9 (1990)||||0").unwrap();
        assert_eq!(i.title.as_deref(), Some("Café (1990)"), "MovieLens titles are Latin-1");
    }
}
