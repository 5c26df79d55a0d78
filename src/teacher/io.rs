//! Parquet IO of the teacher stage: samples, interactions and items in,
//! coldstart out (schemas pinned in [`crate::data::schema`]).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field};

use super::Message;

/// Errors reading or writing the stage's tables.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{path}: {msg}")]
    Table { path: PathBuf, msg: String },
}

fn err(path: &Path, msg: impl Into<String>) -> IoError {
    IoError::Table { path: path.to_path_buf(), msg: msg.into() }
}

/// One prompt sample (samples schema).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub sample_id: String,
    pub user_id: String,
    pub item_id: String,
    pub timestamp: i64,
    pub messages: Vec<Message>,
    pub target: f32,
    pub user_history_len: i32,
    pub item_history_len: i32,
}

/// One interaction (the columns the teacher needs).
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub user_id: String,
    pub item_id: String,
    pub rating: f32,
    pub timestamp: i64,
}

/// Item attributes used by the `cf` teacher's reasoning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemMeta {
    pub title: Option<String>,
    pub categories: Vec<String>,
    pub brand: Option<String>,
}

/// One coldstart row: the sample plus the teacher's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdRow {
    pub sample: Sample,
    pub completion: Option<String>,
    pub accepted: bool,
    pub reason: Option<String>,
    pub attempts: i32,
    pub teacher: String,
    pub reasoning_content: Option<String>,
}

fn read_batches(path: &Path) -> Result<Vec<RecordBatch>, IoError> {
    let f = std::fs::File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| err(path, format!("not a Parquet file: {e}")))?
        .build()
        .map_err(|e| err(path, e.to_string()))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| err(path, e.to_string()))
}

fn col<'a, T: 'static>(b: &'a RecordBatch, path: &Path, name: &str) -> Result<&'a T, IoError> {
    b.column_by_name(name)
        .ok_or_else(|| err(path, format!("missing column `{name}`")))?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| err(path, format!("column `{name}` has the wrong type (see data::schema)")))
}

fn opt_str(a: &StringArray, i: usize) -> Option<String> {
    (!a.is_null(i)).then(|| a.value(i).to_string())
}

/// Reads a samples table.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>, IoError> {
    let mut out = Vec::new();
    for b in read_batches(path)? {
        let sid = col::<StringArray>(&b, path, "sample_id")?;
        let uid = col::<StringArray>(&b, path, "user_id")?;
        let iid = col::<StringArray>(&b, path, "item_id")?;
        let ts = col::<Int64Array>(&b, path, "timestamp")?;
        let msgs = col::<ListArray>(&b, path, "messages")?;
        let target = col::<Float32Array>(&b, path, "target")?;
        let uh = col::<Int32Array>(&b, path, "user_history_len")?;
        let ih = col::<Int32Array>(&b, path, "item_history_len")?;
        for i in 0..b.num_rows() {
            let m = msgs.value(i);
            let st = m
                .as_any()
                .downcast_ref::<StructArray>()
                .ok_or_else(|| err(path, "column `messages` must be list<struct<role, content>>"))?;
            let role = st
                .column_by_name("role")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| err(path, "messages struct lacks utf8 `role`"))?;
            let content = st
                .column_by_name("content")
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| err(path, "messages struct lacks utf8 `content`"))?;
            let messages = (0..st.len())
                .map(|j| Message { role: role.value(j).to_string(), content: content.value(j).to_string() })
                .collect();
            out.push(Sample {
                sample_id: sid.value(i).to_string(),
                user_id: uid.value(i).to_string(),
                item_id: iid.value(i).to_string(),
                timestamp: ts.value(i),
                messages,
                target: target.value(i),
                user_history_len: uh.value(i),
                item_history_len: ih.value(i),
            });
        }
    }
    Ok(out)
}

/// Reads an interactions table (user_id, item_id, rating, timestamp).
pub fn read_interactions(path: &Path) -> Result<Vec<Interaction>, IoError> {
    let mut out = Vec::new();
    for b in read_batches(path)? {
        let uid = col::<StringArray>(&b, path, "user_id")?;
        let iid = col::<StringArray>(&b, path, "item_id")?;
        let r = col::<Float32Array>(&b, path, "rating")?;
        let ts = col::<Int64Array>(&b, path, "timestamp")?;
        for i in 0..b.num_rows() {
            out.push(Interaction {
                user_id: uid.value(i).to_string(),
                item_id: iid.value(i).to_string(),
                rating: r.value(i),
                timestamp: ts.value(i),
            });
        }
    }
    Ok(out)
}

/// Reads an items table into item_id → attributes.
pub fn read_items(path: &Path) -> Result<HashMap<String, ItemMeta>, IoError> {
    let mut out = HashMap::new();
    for b in read_batches(path)? {
        let iid = col::<StringArray>(&b, path, "item_id")?;
        let title = col::<StringArray>(&b, path, "title")?;
        let brand = col::<StringArray>(&b, path, "brand")?;
        let cats = col::<ListArray>(&b, path, "categories")?;
        for i in 0..b.num_rows() {
            let categories = if cats.is_null(i) {
                Vec::new()
            } else {
                let v = cats.value(i);
                let s = v
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| err(path, "column `categories` must be list<utf8>"))?;
                (0..s.len()).filter(|&j| !s.is_null(j)).map(|j| s.value(j).to_string()).collect()
            };
            out.insert(
                iid.value(i).to_string(),
                ItemMeta { title: opt_str(title, i), categories, brand: opt_str(brand, i) },
            );
        }
    }
    Ok(out)
}

fn messages_array(rows: &[&Sample]) -> ListArray {
    let mut roles = Vec::new();
    let mut contents = Vec::new();
    let mut offsets = vec![0i32];
    for s in rows {
        for m in &s.messages {
            roles.push(m.role.as_str());
            contents.push(m.content.as_str());
        }
        offsets.push(roles.len() as i32);
    }
    let DataType::Struct(fields) = crate::data::schema::message_type() else { unreachable!("message_type is a struct") };
    let st = StructArray::new(
        fields,
        vec![Arc::new(StringArray::from(roles)) as ArrayRef, Arc::new(StringArray::from(contents)) as ArrayRef],
        None,
    );
    ListArray::new(
        Arc::new(Field::new("item", crate::data::schema::message_type(), true)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(st),
        None,
    )
}

fn sample_columns(rows: &[&Sample]) -> Vec<ArrayRef> {
    vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|s| &s.sample_id))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|s| &s.user_id))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|s| &s.item_id))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|s| s.timestamp))),
        Arc::new(messages_array(rows)),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|s| s.target))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|s| s.user_history_len))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|s| s.item_history_len))),
    ]
}

fn write_batch(path: &Path, batch: &RecordBatch) -> Result<(), IoError> {
    let mut buf = Vec::new();
    {
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None)
            .map_err(|e| err(path, e.to_string()))?;
        w.write(batch).map_err(|e| err(path, e.to_string()))?;
        w.close().map_err(|e| err(path, e.to_string()))?;
    }
    crate::util::write_atomic(path, &buf).map_err(|e| err(path, format!("cannot write: {e}")))
}

/// Writes a samples table (tests and examples build inputs with it).
pub fn write_samples(path: &Path, rows: &[Sample]) -> Result<(), IoError> {
    let refs: Vec<&Sample> = rows.iter().collect();
    let batch = RecordBatch::try_new(crate::data::schema::samples(), sample_columns(&refs))
        .map_err(|e| err(path, e.to_string()))?;
    write_batch(path, &batch)
}

/// Writes an interactions table (tests build inputs with it).
pub fn write_interactions(path: &Path, rows: &[Interaction]) -> Result<(), IoError> {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.user_id))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.item_id))),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.rating))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.timestamp))),
        Arc::new(StringArray::from(vec![None::<&str>; rows.len()])),
        Arc::new(StringArray::from(vec![None::<&str>; rows.len()])),
    ];
    let batch =
        RecordBatch::try_new(crate::data::schema::interactions(), cols).map_err(|e| err(path, e.to_string()))?;
    write_batch(path, &batch)
}

/// Writes an items table (tests build inputs with it).
pub fn write_items(path: &Path, rows: &[(String, ItemMeta)]) -> Result<(), IoError> {
    let mut offsets = vec![0i32];
    let mut values: Vec<&str> = Vec::new();
    for (_, m) in rows {
        values.extend(m.categories.iter().map(|s| s.as_str()));
        offsets.push(values.len() as i32);
    }
    let cats = ListArray::new(
        Arc::new(Field::new("item", DataType::Utf8, true)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(StringArray::from(values)),
        None,
    );
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|(id, _)| id))),
        Arc::new(StringArray::from(rows.iter().map(|(_, m)| m.title.clone()).collect::<Vec<_>>())),
        Arc::new(cats),
        Arc::new(StringArray::from(vec![None::<&str>; rows.len()])),
        Arc::new(StringArray::from(rows.iter().map(|(_, m)| m.brand.clone()).collect::<Vec<_>>())),
        Arc::new(arrow::array::Float64Array::from(vec![None::<f64>; rows.len()])),
    ];
    let batch = RecordBatch::try_new(crate::data::schema::items(), cols).map_err(|e| err(path, e.to_string()))?;
    write_batch(path, &batch)
}

/// Writes the coldstart table.
pub fn write_coldstart(path: &Path, rows: &[ColdRow]) -> Result<(), IoError> {
    let samples: Vec<&Sample> = rows.iter().map(|r| &r.sample).collect();
    let mut cols = sample_columns(&samples);
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.completion.clone()).collect::<Vec<_>>())));
    cols.push(Arc::new(BooleanArray::from(rows.iter().map(|r| r.accepted).collect::<Vec<_>>())));
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.reason.clone()).collect::<Vec<_>>())));
    cols.push(Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.attempts))));
    cols.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.teacher))));
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.reasoning_content.clone()).collect::<Vec<_>>())));
    let batch =
        RecordBatch::try_new(crate::data::schema::coldstart(), cols).map_err(|e| err(path, e.to_string()))?;
    write_batch(path, &batch)
}

/// Reads a coldstart table back (tests, `recflow show`).
pub fn read_coldstart(path: &Path) -> Result<Vec<ColdRow>, IoError> {
    let samples = read_samples(path)?;
    let mut out = Vec::with_capacity(samples.len());
    let mut it = samples.into_iter();
    for b in read_batches(path)? {
        let completion = col::<StringArray>(&b, path, "completion")?;
        let accepted = col::<BooleanArray>(&b, path, "accepted")?;
        let reason = col::<StringArray>(&b, path, "reason")?;
        let attempts = col::<Int32Array>(&b, path, "attempts")?;
        let teacher = col::<StringArray>(&b, path, "teacher")?;
        let rc = col::<StringArray>(&b, path, "reasoning_content")?;
        for i in 0..b.num_rows() {
            let sample = it.next().ok_or_else(|| err(path, "row count changed while reading"))?;
            out.push(ColdRow {
                sample,
                completion: opt_str(completion, i),
                accepted: accepted.value(i),
                reason: opt_str(reason, i),
                attempts: attempts.value(i),
                teacher: teacher.value(i).to_string(),
                reasoning_content: opt_str(rc, i),
            });
        }
    }
    Ok(out)
}
