//! RecBole's atomic files (`format: recbole`): `NAME.inter` (interactions)
//! and `NAME.item` (item features), as RecBole ships every dataset it
//! supports (e.g. `recbole/dataset_example/ml-100k/` in PyPI's
//! `recbole==1.2.1`; the other datasets on RecBole's dataset page use the
//! same layout).
//!
//! Layout (RecBole's documentation, "Atomic Files"): tab-separated, UTF-8,
//! the first line a typed header `name:type` per column, the types `token`
//! (one string), `token_seq` (space-separated tokens), `float` and
//! `float_seq`. Column names differ between datasets (`item_id` or
//! `business_id`, `rating` or `stars`, `timestamp` or `date`, `movie_title`
//! or `title`), so each role of the pinned schema is found by the first of
//! a list of RecBole's usual names, or named explicitly in [`Fields`].
//!
//! What a column may hold is checked on the header: ids are `token`,
//! rating and time are `float` (RecBole stores Unix seconds as float), the
//! item title is `token` or `token_seq`, categories `token_seq` (split on
//! spaces) or `token`. A header that lacks a required role, or whose type
//! does not fit, fails the stage naming the file, the header and the field
//! to set. Records follow the bad-record rules of every format
//! ([`super::ingest`]): a wrong field count is `malformed`, a rating that is
//! not a number `mistyped_<column>`, a time that is not a number
//! `bad_timestamp`, an empty id `missing_<column>`.
use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ingest::{IngestError, Parsed};
use super::Item;

/// A reason code and its message, as the other parsers of ingest return.
pub type Bad = (&'static str, String);

/// Column names for the roles of the pinned schemas; a role left out is
/// found by RecBole's usual names ([`InterLayout::CANDIDATES`],
/// [`ItemLayout::CANDIDATES`]). `with.recbole` of an ingest stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fields {
    // --- .inter
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rating: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review_title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review_text: Option<String>,
    // --- .item
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Appended to the title as ` (YEAR)`, as MovieLens' own `u.item` spells titles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub year: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub categories: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Fields {
    /// Nothing named: every role found by RecBole's usual names. Keeps the
    /// block out of the stage key then.
    pub fn is_empty(&self) -> bool {
        *self == Fields::default()
    }
}

/// RecBole's column types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Token,
    TokenSeq,
    Float,
    FloatSeq,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Token => "token",
            Type::TokenSeq => "token_seq",
            Type::Float => "float",
            Type::FloatSeq => "float_seq",
        }
    }
}

/// One header column `name:type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: Type,
}

/// Parses a typed header line. `path` and `line` only name the place in errors.
pub fn parse_header(path: &Path, line: u64, bytes: &[u8]) -> Result<Vec<Column>, IngestError> {
    let at = |m: String| IngestError::Bad(format!("{}:{line}: {m}", path.display()));
    let s = std::str::from_utf8(bytes).map_err(|e| at(format!("the header is not valid UTF-8: {e}")))?;
    let mut cols: Vec<Column> = Vec::new();
    for raw in s.split('\t') {
        let raw = raw.trim();
        let (name, ty) = raw.rsplit_once(':').ok_or_else(|| {
            at(format!(
                "header column `{raw}` has no `:type`; a RecBole atomic file starts with a typed header such as `user_id:token\\titem_id:token\\trating:float\\ttimestamp:float` (is this the right format?)"
            ))
        })?;
        let ty = match ty {
            "token" => Type::Token,
            "token_seq" => Type::TokenSeq,
            "float" => Type::Float,
            "float_seq" => Type::FloatSeq,
            other => {
                return Err(at(format!(
                    "header column `{raw}`: unknown type `{other}` (RecBole's types: token, token_seq, float, float_seq)"
                )))
            }
        };
        if name.is_empty() {
            return Err(at(format!("header column `{raw}` has no name")));
        }
        if cols.iter().any(|c| c.name == name) {
            return Err(at(format!("header names column `{name}` twice")));
        }
        cols.push(Column { name: name.to_string(), ty });
    }
    Ok(cols)
}

/// Finds the column of one role: the name the user gave (`with.recbole.FIELD`),
/// else the first of `candidates` present. Checks its type.
fn find(
    path: &Path,
    cols: &[Column],
    role: &str,
    given: Option<&str>,
    candidates: &[&str],
    types: &[Type],
    required: bool,
) -> Result<Option<usize>, IngestError> {
    let header: Vec<String> = cols.iter().map(|c| format!("{}:{}", c.name, c.ty.name())).collect();
    let idx = match given {
        Some(name) => Some(cols.iter().position(|c| c.name == name).ok_or_else(|| {
            IngestError::Bad(format!(
                "{}: `recbole.{role}: {name}` names no column of the header ({})",
                path.display(),
                header.join(", ")
            ))
        })?),
        None => candidates.iter().find_map(|n| cols.iter().position(|c| c.name == *n)),
    };
    let Some(i) = idx else {
        if required {
            return Err(IngestError::Bad(format!(
                "{}: no {role} column (looked for {}) in the header ({}); name it with `recbole: {{{role}: COLUMN}}`",
                path.display(),
                candidates.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "),
                header.join(", ")
            )));
        }
        return Ok(None);
    };
    if !types.contains(&cols[i].ty) {
        return Err(IngestError::Bad(format!(
            "{}: column `{}` ({role}) is of type {}, expected {}",
            path.display(),
            cols[i].name,
            cols[i].ty.name(),
            types.iter().map(|t| t.name()).collect::<Vec<_>>().join(" or ")
        )));
    }
    Ok(Some(i))
}

/// Where each interaction field sits in a `.inter` line.
#[derive(Debug, Clone)]
pub struct InterLayout {
    pub columns: Vec<Column>,
    user: usize,
    item: usize,
    rating: usize,
    timestamp: usize,
    review_title: Option<usize>,
    review_text: Option<usize>,
}

const TEXT: &[Type] = &[Type::Token, Type::TokenSeq];

impl InterLayout {
    /// RecBole's usual names per role, first match wins.
    pub const CANDIDATES: [(&'static str, &'static [&'static str]); 6] = [
        ("user", &["user_id"]),
        ("item", &["item_id", "business_id", "book_id", "movie_id"]),
        ("rating", &["rating", "stars", "score"]),
        ("timestamp", &["timestamp", "date", "time"]),
        ("review_title", &["review_title", "summary"]),
        ("review_text", &["review_text", "text", "review"]),
    ];

    pub fn resolve(path: &Path, cols: Vec<Column>, f: &Fields) -> Result<Self, IngestError> {
        let c = |i: usize| Self::CANDIDATES[i].1;
        let tok = &[Type::Token];
        let num = &[Type::Float];
        let l = InterLayout {
            user: find(path, &cols, "user", f.user.as_deref(), c(0), tok, true)?.unwrap_or(0),
            item: find(path, &cols, "item", f.item.as_deref(), c(1), tok, true)?.unwrap_or(0),
            rating: find(path, &cols, "rating", f.rating.as_deref(), c(2), num, true)?.unwrap_or(0),
            timestamp: find(path, &cols, "timestamp", f.timestamp.as_deref(), c(3), num, true)?.unwrap_or(0),
            review_title: find(path, &cols, "review_title", f.review_title.as_deref(), c(4), TEXT, false)?,
            review_text: find(path, &cols, "review_text", f.review_text.as_deref(), c(5), TEXT, false)?,
            columns: cols,
        };
        Ok(l)
    }

    /// The item column's name: the `.item` file's id column has the same one
    /// (RecBole joins the two files on it).
    pub fn item_column(&self) -> &str {
        &self.columns[self.item].name
    }

    /// One `.inter` record. The rating's range is checked by the caller, as
    /// for every format.
    pub fn parse<'a>(&self, bytes: &'a [u8]) -> Result<Parsed<'a>, Bad> {
        let s = std::str::from_utf8(bytes).map_err(|e| ("invalid_encoding", format!("not valid UTF-8: {e}")))?;
        let p = split_fields(s, self.columns.len())?;
        let name = |i: usize| self.columns[i].name.as_str();
        let id = |i: usize| -> Result<Cow<'a, str>, Bad> {
            let v = p[i].trim();
            if v.is_empty() {
                return Err((crate::data::ingest::leak_reason("missing", name(i)), format!("column `{}` is empty", name(i))));
            }
            Ok(Cow::Borrowed(v))
        };
        let (user, item) = (id(self.user)?, id(self.item)?);
        let r = p[self.rating].trim();
        let rating: f64 = r.parse().map_err(|_| {
            (
                crate::data::ingest::leak_reason("mistyped", name(self.rating)),
                format!("column `{}`: `{r}` is not a number", name(self.rating)),
            )
        })?;
        let t = p[self.timestamp].trim();
        let timestamp = t
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && x.abs() < 1e15)
            .ok_or(("bad_timestamp", format!("column `{}`: `{t}` is not Unix seconds", name(self.timestamp))))?
            .floor() as i64;
        let text = |i: Option<usize>| i.map(|i| p[i].trim()).filter(|x| !x.is_empty()).map(Cow::Borrowed);
        Ok(Parsed {
            user,
            item,
            rating: rating as f32,
            timestamp,
            title: text(self.review_title),
            text: text(self.review_text),
        })
    }
}

/// Where each item field sits in a `.item` line.
#[derive(Debug, Clone)]
pub struct ItemLayout {
    pub columns: Vec<Column>,
    id: usize,
    title: Option<usize>,
    year: Option<usize>,
    categories: Option<usize>,
    brand: Option<usize>,
    price: Option<usize>,
    description: Option<usize>,
}

impl ItemLayout {
    /// RecBole's usual names per role, first match wins.
    pub const CANDIDATES: [(&'static str, &'static [&'static str]); 6] = [
        ("title", &["movie_title", "title", "item_name", "name", "book_title"]),
        ("year", &["release_year", "year"]),
        ("categories", &["class", "genre", "categories", "category"]),
        ("brand", &["brand"]),
        ("price", &["price"]),
        ("description", &["description"]),
    ];

    /// `item_column`: the `.inter` file's item column (the join key).
    pub fn resolve(path: &Path, cols: Vec<Column>, item_column: &str, f: &Fields) -> Result<Self, IngestError> {
        let c = |i: usize| Self::CANDIDATES[i].1;
        let num = &[Type::Float];
        let any = &[Type::Token, Type::TokenSeq, Type::Float];
        Ok(ItemLayout {
            id: item_id_column(path, &cols, item_column)?,
            title: find(path, &cols, "title", f.title.as_deref(), c(0), TEXT, false)?,
            year: find(path, &cols, "year", f.year.as_deref(), c(1), any, false)?,
            categories: find(path, &cols, "categories", f.categories.as_deref(), c(2), TEXT, false)?,
            brand: find(path, &cols, "brand", f.brand.as_deref(), c(3), TEXT, false)?,
            price: find(path, &cols, "price", f.price.as_deref(), c(4), num, false)?,
            description: find(path, &cols, "description", f.description.as_deref(), c(5), TEXT, false)?,
            columns: cols,
        })
    }

    /// One `.item` record.
    pub fn parse(&self, bytes: &[u8]) -> Result<Item, Bad> {
        let s = std::str::from_utf8(bytes).map_err(|e| ("invalid_encoding", format!("not valid UTF-8: {e}")))?;
        let p = split_fields(s, self.columns.len())?;
        let id = p[self.id].trim();
        if id.is_empty() {
            let name = &self.columns[self.id].name;
            return Err((crate::data::ingest::leak_reason("missing", name), format!("column `{name}` is empty")));
        }
        let text = |i: Option<usize>| i.map(|i| p[i].trim()).filter(|x| !x.is_empty()).map(str::to_string);
        let title = match (text(self.title), text(self.year)) {
            (Some(t), Some(y)) => Some(format!("{t} ({y})")),
            (t, _) => t,
        };
        let categories = self.categories.and_then(|i| {
            let v = p[i].trim();
            let cats: Vec<String> = match self.columns[i].ty {
                Type::TokenSeq => v.split_whitespace().map(str::to_string).collect(),
                _ => Some(v.to_string()).into_iter().filter(|x| !x.is_empty()).collect(),
            };
            (!cats.is_empty()).then_some(cats)
        });
        let price = match self.price.map(|i| p[i].trim()).filter(|x| !x.is_empty()) {
            None => None,
            Some(v) => Some(v.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0).ok_or_else(|| {
                let name = &self.columns[self.price.unwrap_or_default()].name;
                (crate::data::ingest::leak_reason("mistyped", name), format!("column `{name}`: `{v}` is not a price"))
            })?),
        };
        Ok(Item {
            item_id: id.to_string(),
            title,
            categories,
            description: text(self.description),
            brand: text(self.brand),
            price,
        })
    }
}

/// The `.item` file's id column: named as the `.inter` file's item column.
fn item_id_column(path: &Path, cols: &[Column], name: &str) -> Result<usize, IngestError> {
    let i = cols.iter().position(|c| c.name == name).ok_or_else(|| {
        let header: Vec<String> = cols.iter().map(|c| format!("{}:{}", c.name, c.ty.name())).collect();
        IngestError::Bad(format!(
            "{}: no column `{name}` in the header ({}); RecBole joins `.item` to `.inter` on the item column's name, so both files must name it alike",
            path.display(),
            header.join(", ")
        ))
    })?;
    if cols[i].ty != Type::Token {
        return Err(IngestError::Bad(format!("{}: column `{name}` (item) is of type {}, expected token", path.display(), cols[i].ty.name())));
    }
    Ok(i)
}

/// A line's `n` tab-separated fields (RecBole pads missing values with
/// empty fields, so the count is exact).
fn split_fields(s: &str, n: usize) -> Result<Vec<&str>, Bad> {
    let p: Vec<&str> = s.split('\t').collect();
    if p.len() != n {
        let shown: String = s.chars().take(120).collect();
        return Err((
            "malformed",
            format!("expected {n} tab-separated fields (as the header), got {}: `{shown}`", p.len()),
        ));
    }
    Ok(p)
}

/// The files of a RecBole dataset: `reviews` is the `.inter` file, or a
/// dataset folder holding exactly one `NAME.inter` (then `NAME.item` beside
/// it is the metadata, unless `meta` names one).
pub fn dataset_files(reviews: &Path, meta: Option<&Path>) -> Result<(PathBuf, Option<PathBuf>), IngestError> {
    if !reviews.is_dir() {
        return Ok((reviews.to_path_buf(), meta.map(Path::to_path_buf)));
    }
    let open = |source| IngestError::Open { path: reviews.to_path_buf(), source };
    let mut inters: Vec<PathBuf> = std::fs::read_dir(reviews)
        .map_err(open)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "inter") && p.is_file())
        .collect();
    inters.sort();
    let inter = match inters.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(IngestError::Bad(format!(
                "{}: a RecBole dataset folder holds a `NAME.inter` file; this one has none",
                reviews.display()
            )))
        }
        many => {
            return Err(IngestError::Bad(format!(
                "{}: {} `.inter` files ({}); name the one to read in `reviews:`",
                reviews.display(),
                many.len(),
                many.iter().filter_map(|p| p.file_name()).map(|f| f.to_string_lossy()).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    let meta = match meta {
        Some(m) => Some(m.to_path_buf()),
        None => Some(inter.with_extension("item")).filter(|p| p.is_file()),
    };
    Ok((inter, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(h: &str) -> Vec<Column> {
        parse_header(Path::new("x.inter"), 1, h.as_bytes()).unwrap()
    }

    #[test]
    fn header_types_and_errors() {
        let c = cols("user_id:token\titem_id:token\trating:float\ttimestamp:float");
        assert_eq!(c.len(), 4);
        assert_eq!(c[2], Column { name: "rating".into(), ty: Type::Float });
        let e = parse_header(Path::new("d/x.inter"), 1, b"user_id\titem_id").unwrap_err().to_string();
        assert!(e.contains("d/x.inter:1") && e.contains("no `:type`"), "an untyped header names file, line and the fix: {e}");
        let e = parse_header(Path::new("x.inter"), 1, b"a:token\tb:int").unwrap_err().to_string();
        assert!(e.contains("unknown type `int`"), "{e}");
        let e = parse_header(Path::new("x.inter"), 1, b"a:token\ta:float").unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn inter_layout_finds_roles_and_checks_types() {
        let p = Path::new("yelp.inter");
        let yelp = cols("review_id:token\tuser_id:token\tbusiness_id:token\tstars:float\tuseful:float\tdate:float");
        let l = InterLayout::resolve(p, yelp, &Fields::default()).unwrap();
        assert_eq!(l.item_column(), "business_id", "Yelp's item column is found by RecBole's name");
        let r = l.parse(b"r1\tu1\tb1\t4\t0\t1500000000.7").unwrap();
        assert_eq!((r.user.as_ref(), r.item.as_ref(), r.rating, r.timestamp), ("u1", "b1", 4.0, 1500000000));
        let no_rating = cols("user_id:token\titem_id:token\ttimestamp:float");
        let e = InterLayout::resolve(p, no_rating, &Fields::default()).unwrap_err().to_string();
        assert!(e.contains("no rating column") && e.contains("recbole: {rating: COLUMN}"), "names the field to set: {e}");
        let typed = cols("user_id:token\titem_id:token\trating:token\ttimestamp:float");
        let e = InterLayout::resolve(p, typed, &Fields::default()).unwrap_err().to_string();
        assert!(e.contains("`rating` (rating) is of type token, expected float"), "{e}");
        let f = Fields { rating: Some("score2".into()), ..Default::default() };
        let e = InterLayout::resolve(p, cols("user_id:token\titem_id:token\trating:float\ttimestamp:float"), &f).unwrap_err().to_string();
        assert!(e.contains("`recbole.rating: score2` names no column"), "{e}");
    }

    #[test]
    fn inter_records_have_reasons() {
        let l = InterLayout::resolve(
            Path::new("x.inter"),
            cols("user_id:token\titem_id:token\trating:float\ttimestamp:float"),
            &Fields::default(),
        )
        .unwrap();
        let reason = |b: &[u8]| l.parse(b).unwrap_err().0;
        assert_eq!(reason(b"1\t2\t3"), "malformed", "a missing field");
        assert_eq!(reason(b"1\t2\tfive\t88"), "mistyped_rating");
        assert_eq!(reason(b"1\t2\t5\tyesterday"), "bad_timestamp");
        assert_eq!(reason(b"\t2\t5\t88"), "missing_user_id");
        assert_eq!(reason(b"1\t2\t\xff\t88"), "invalid_encoding");
    }

    #[test]
    fn item_records_map_to_items() {
        let c = cols("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq");
        let l = ItemLayout::resolve(Path::new("ml.item"), c, "item_id", &Fields::default()).unwrap();
        let i = l.parse("1\tToy Story\t1995\tAnimation Children's Comedy".as_bytes()).unwrap();
        assert_eq!(i.title.as_deref(), Some("Toy Story (1995)"), "the year joins the title as MovieLens spells it");
        assert_eq!(i.categories, Some(vec!["Animation".into(), "Children's".into(), "Comedy".into()]));
        let i = l.parse(b"2\tUntitled\t\t").unwrap();
        assert_eq!((i.title.as_deref(), i.categories), (Some("Untitled"), None), "empty fields are absent");
        let c = cols("item_id:token\ttitle:token\tprice:float\tbrand:token");
        let l = ItemLayout::resolve(Path::new("a.item"), c, "item_id", &Fields::default()).unwrap();
        assert_eq!(l.parse(b"B1\tA lamp\t12.5\tAcme").unwrap().price, Some(12.5));
        assert_eq!(l.parse(b"B1\tA lamp\tcheap\tAcme").unwrap_err().0, "mistyped_price");
        let e = ItemLayout::resolve(Path::new("a.item"), cols("asin:token\ttitle:token"), "item_id", &Fields::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no column `item_id`") && e.contains("join"), "the join key must match the .inter: {e}");
    }
}
