//! Parquet IO of the teacher stage. Samples, interactions and items are read
//! with the data module's readers ([`crate::data::io`]); this module adds the
//! coldstart table (samples columns + the teacher's outcome, schema pinned
//! in [`crate::data::schema::coldstart`]).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int32Array, RecordBatch, StringArray};

pub use crate::data::{Interaction, Item, Sample};

/// Errors reading or writing the coldstart table.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error(transparent)]
    Data(#[from] crate::data::io::IoError),
    #[error("{path}: {msg}")]
    Table { path: PathBuf, msg: String },
}

fn err(path: &Path, msg: impl Into<String>) -> IoError {
    IoError::Table { path: path.to_path_buf(), msg: msg.into() }
}

/// One coldstart row: the sample (original prompt) plus the teacher's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct ColdRow {
    pub sample: Sample,
    /// The accepted answer; for a rejected row, the last answer received.
    pub completion: Option<String>,
    pub accepted: bool,
    /// `CODE: detail` when rejected.
    pub reason: Option<String>,
    pub attempts: i32,
    pub teacher: String,
    pub reasoning_content: Option<String>,
}

/// Writes the coldstart table.
pub fn write_coldstart(path: &Path, rows: &[ColdRow]) -> Result<(), IoError> {
    let samples: Vec<Sample> = rows.iter().map(|r| r.sample.clone()).collect();
    let mut cols = crate::data::io::sample_columns(&samples);
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.completion.clone()).collect::<Vec<_>>())) as ArrayRef);
    cols.push(Arc::new(BooleanArray::from(rows.iter().map(|r| r.accepted).collect::<Vec<_>>())));
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.reason.clone()).collect::<Vec<_>>())));
    cols.push(Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.attempts))));
    cols.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.teacher))));
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.reasoning_content.clone()).collect::<Vec<_>>())));
    let batch =
        RecordBatch::try_new(crate::data::schema::coldstart(), cols).map_err(|e| err(path, e.to_string()))?;
    let mut w = crate::data::io::TableWriter::create(path, crate::data::schema::coldstart())?;
    w.write(&batch)?;
    w.finish()?;
    Ok(())
}

fn col<'a, T: 'static>(b: &'a RecordBatch, path: &Path, name: &str) -> Result<&'a T, IoError> {
    b.column_by_name(name)
        .ok_or_else(|| err(path, format!("missing column `{name}` (is this a coldstart table?)")))?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| err(path, format!("column `{name}` has the wrong type (see data::schema::coldstart)")))
}

fn opt_str(a: &StringArray, i: usize) -> Option<String> {
    (!a.is_null(i)).then(|| a.value(i).to_string())
}

/// Reads a coldstart table back (tests, inspection).
pub fn read_coldstart(path: &Path) -> Result<Vec<ColdRow>, IoError> {
    let mut out = Vec::new();
    for b in crate::data::io::read_batches(path)? {
        let samples = crate::data::io::samples_from_batch(path, &b)?;
        let completion = col::<StringArray>(&b, path, "completion")?;
        let accepted = col::<BooleanArray>(&b, path, "accepted")?;
        let reason = col::<StringArray>(&b, path, "reason")?;
        let attempts = col::<Int32Array>(&b, path, "attempts")?;
        let teacher = col::<StringArray>(&b, path, "teacher")?;
        let rc = col::<StringArray>(&b, path, "reasoning_content")?;
        for (i, sample) in samples.into_iter().enumerate() {
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
