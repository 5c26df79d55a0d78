//! Parquet reading of the evaluation side: the columns eval, baselines and
//! the report need from the pinned tables (interactions, samples, logs),
//! read leniently by name and any numeric type. Errors are
//! [`crate::data::io::IoError`], the one error type of table IO, and the
//! predictions are written through [`crate::data::io::write_batch_atomic`]
//! under [`crate::data::io::eval_writer_properties`]: one writer path, with
//! this side's bytes pinned by name.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int32Type, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::data::io::IoError;

/// Reads every record batch of a Parquet file.
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>, IoError> {
    let file = std::fs::File::open(path).map_err(|source| IoError::Read { path: path.into(), source })?;
    let perr = |e: &dyn std::fmt::Display| IoError::NotParquet { path: path.into(), msg: e.to_string() };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| perr(&e))?.build().map_err(|e| perr(&e))?;
    reader.map(|b| b.map_err(|e| perr(&e))).collect()
}

/// A whole column across batches, as one of a few simple Rust types.
pub struct Table {
    pub path: PathBuf,
    pub batches: Vec<RecordBatch>,
}

impl Table {
    pub fn read(path: &Path) -> Result<Self, IoError> {
        Ok(Table { path: path.into(), batches: read_batches(path)? })
    }

    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    pub fn has_column(&self, name: &str) -> bool {
        self.batches.first().is_some_and(|b| b.schema().column_with_name(name).is_some())
    }

    fn columns(&self, name: &str, expected: &'static str) -> Result<Vec<ArrayRef>, IoError> {
        let mut out = Vec::with_capacity(self.batches.len());
        for b in &self.batches {
            let c = b.column_by_name(name).ok_or_else(|| IoError::MissingColumn {
                path: self.path.clone(),
                column: name.into(),
                expected,
            })?;
            out.push(c.clone());
        }
        Ok(out)
    }

    fn type_err(&self, name: &str, dt: &DataType, expected: &'static str) -> IoError {
        IoError::ColumnType { path: self.path.clone(), column: name.into(), found: dt.to_string(), expected }
    }

    fn null_err(&self, name: &str, row: usize) -> IoError {
        IoError::Null { path: self.path.clone(), column: name.into(), row }
    }

    /// Nullable utf8 column.
    pub fn strings_opt(&self, name: &str) -> Result<Vec<Option<String>>, IoError> {
        let mut out = Vec::with_capacity(self.num_rows());
        for c in self.columns(name, "utf8")? {
            match c.data_type() {
                DataType::Utf8 => out.extend(c.as_string::<i32>().iter().map(|s| s.map(str::to_string))),
                DataType::LargeUtf8 => out.extend(c.as_string::<i64>().iter().map(|s| s.map(str::to_string))),
                DataType::Utf8View => out.extend(c.as_string_view().iter().map(|s| s.map(str::to_string))),
                dt => return Err(self.type_err(name, dt, "utf8")),
            }
        }
        Ok(out)
    }

    /// Non-null utf8 column.
    pub fn strings(&self, name: &str) -> Result<Vec<String>, IoError> {
        self.strings_opt(name)?
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| self.null_err(name, i)))
            .collect()
    }

    /// Nullable numeric column (any float or int type) as f64.
    pub fn f64s_opt(&self, name: &str) -> Result<Vec<Option<f64>>, IoError> {
        let mut out = Vec::with_capacity(self.num_rows());
        for c in self.columns(name, "a number")? {
            match c.data_type() {
                DataType::Float32 => out.extend(c.as_primitive::<Float32Type>().iter().map(|v| v.map(f64::from))),
                DataType::Float64 => out.extend(c.as_primitive::<Float64Type>().iter()),
                DataType::Int32 => out.extend(c.as_primitive::<Int32Type>().iter().map(|v| v.map(f64::from))),
                DataType::Int64 => out.extend(c.as_primitive::<Int64Type>().iter().map(|v| v.map(|x| x as f64))),
                DataType::Null => out.extend(std::iter::repeat_n(None, c.len())),
                dt => return Err(self.type_err(name, dt, "a number")),
            }
        }
        Ok(out)
    }

    /// Non-null numeric column as f64.
    pub fn f64s(&self, name: &str) -> Result<Vec<f64>, IoError> {
        self.f64s_opt(name)?
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| self.null_err(name, i)))
            .collect()
    }
}

/// The columns of the samples table eval and baselines score.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub sample_id: String,
    pub user_id: String,
    pub item_id: String,
    pub target: f64,
    pub user_history_len: i64,
}

/// Reads sample_id, user_id, item_id, target, user_history_len of a samples table.
pub fn read_sample_rows(path: &Path) -> Result<Vec<SampleRow>, IoError> {
    let t = Table::read(path)?;
    let (ids, users, items) = (t.strings("sample_id")?, t.strings("user_id")?, t.strings("item_id")?);
    let (targets, hist) = (t.f64s("target")?, t.f64s("user_history_len")?);
    Ok((0..ids.len())
        .map(|i| SampleRow {
            sample_id: ids[i].clone(),
            user_id: users[i].clone(),
            item_id: items[i].clone(),
            target: targets[i],
            user_history_len: hist[i] as i64,
        })
        .collect())
}

/// (user_id, item_id, rating, timestamp) of an interactions table.
pub fn read_interactions(path: &Path) -> Result<Vec<(String, String, f32, i64)>, IoError> {
    let t = Table::read(path)?;
    let (users, items, ratings, ts) = (t.strings("user_id")?, t.strings("item_id")?, t.f64s("rating")?, t.f64s("timestamp")?);
    Ok((0..users.len()).map(|i| (users[i].clone(), items[i].clone(), ratings[i] as f32, ts[i] as i64)).collect())
}

/// Shorthand for building columns.
pub fn arc<A: Array + 'static>(a: A) -> ArrayRef {
    Arc::new(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::io::{eval_writer_properties, write_batch_atomic};
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn errors_are_data_io_errors_and_keep_their_texts() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.parquet");
        let err = Table::read(&missing).err().unwrap();
        assert!(matches!(err, IoError::Read { .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("cannot read {}: ", missing.display())), "{err}");

        let text = dir.path().join("notes.parquet");
        std::fs::write(&text, "not parquet").unwrap();
        let err = Table::read(&text).err().unwrap().to_string();
        assert!(err.starts_with(&format!("{} is not a readable Parquet file: ", text.display())), "{err}");

        let p = dir.path().join("t.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new("user_id", DataType::Utf8, true), Field::new("rating", DataType::Float64, true)]));
        let cols = vec![arc(StringArray::from(vec![Some("u"), None])), arc(Float64Array::from(vec![1.0, 2.0]))];
        write_batch_atomic(&p, schema, cols, eval_writer_properties()).unwrap();
        let t = Table::read(&p).unwrap();
        let shown = p.display();
        assert_eq!(
            t.f64s("target").err().unwrap().to_string(),
            format!("{shown}: column `target` is missing (expected a number); is this the right input?")
        );
        assert_eq!(t.f64s("user_id").err().unwrap().to_string(), format!("{shown}: column `user_id` has type Utf8, expected a number"));
        assert_eq!(t.strings("user_id").err().unwrap().to_string(), format!("{shown}: row 1 of column `user_id` is null"));
    }
}
