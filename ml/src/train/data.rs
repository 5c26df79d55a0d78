//! Reading the pinned `samples` / `coldstart` Parquet tables
//! (`recflow::data::schema`) and writing the per-step `log` Parquet.
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::TrainError;

/// One training / evaluation example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub sample_id: String,
    /// Chat messages `(role, content)` of the prompt.
    pub messages: Vec<(String, String)>,
    pub target: f32,
    /// coldstart only: the accepted answer.
    pub completion: Option<String>,
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T, TrainError> {
    b.column_by_name(name)
        .ok_or_else(|| TrainError::Data { path: path.into(), msg: format!("column `{name}` is missing") })?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| TrainError::Data { path: path.into(), msg: format!("column `{name}` has an unexpected type") })
}

/// Reads a samples table (or a coldstart one with `coldstart = true`,
/// keeping only `accepted` rows, whose `completion` must be set).
pub fn read_examples(path: &Path, coldstart: bool) -> Result<Vec<Example>, TrainError> {
    let derr = |msg: String| TrainError::Data { path: path.into(), msg };
    let f = File::open(path).map_err(TrainError::io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| derr(format!("not a Parquet file: {e}")))?
        .build()
        .map_err(|e| derr(e.to_string()))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| derr(e.to_string()))?;
        let ids = col::<StringArray>(&b, "sample_id", path)?;
        let msgs = col::<ListArray>(&b, "messages", path)?;
        let target = col::<Float32Array>(&b, "target", path)?;
        let (comp, acc) = if coldstart {
            (Some(col::<StringArray>(&b, "completion", path)?), Some(col::<BooleanArray>(&b, "accepted", path)?))
        } else {
            (None, None)
        };
        for i in 0..b.num_rows() {
            if let Some(acc) = acc {
                if acc.is_null(i) || !acc.value(i) {
                    continue; // SFT trains on accepted rows only (ARCHITECTURE "Schemas")
                }
            }
            let row = format!("row {} (sample_id {:?})", out.len(), ids.value(i));
            let list = msgs.value(i);
            let st = list
                .as_any()
                .downcast_ref::<StructArray>()
                .ok_or_else(|| derr(format!("{row}: messages must be list<struct<role, content>>")))?;
            let role = st.column_by_name("role").and_then(|c| c.as_any().downcast_ref::<StringArray>());
            let content = st.column_by_name("content").and_then(|c| c.as_any().downcast_ref::<StringArray>());
            let (Some(role), Some(content)) = (role, content) else {
                return Err(derr(format!("{row}: messages need utf8 fields role and content")));
            };
            let messages =
                (0..st.len()).map(|j| (role.value(j).to_string(), content.value(j).to_string())).collect::<Vec<_>>();
            if messages.is_empty() {
                return Err(derr(format!("{row}: empty messages")));
            }
            let completion = match comp {
                Some(c) if c.is_null(i) => {
                    return Err(derr(format!("{row}: accepted row without a completion")));
                }
                Some(c) => Some(c.value(i).to_string()),
                None => None,
            };
            out.push(Example { sample_id: ids.value(i).to_string(), messages, target: target.value(i), completion });
        }
    }
    Ok(out)
}

/// Writes examples as a samples table (or coldstart with `coldstart = true`:
/// every row accepted by the `toy` teacher), using the pinned schemas.
/// For tests, benchmarks and toy pipelines.
pub fn write_examples(path: &Path, rows: &[Example], coldstart: bool) -> Result<(), TrainError> {
    use arrow::array::{BooleanBuilder, Int32Array, ListBuilder, StringBuilder, StructBuilder};
    let schema = if coldstart { recflow::data::schema::coldstart() } else { recflow::data::schema::samples() };
    let n = rows.len();
    let strs = |f: &dyn Fn(&Example) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let fields = match recflow::data::schema::message_type() {
        DataType::Struct(f) => f,
        _ => return Err(TrainError::Invalid("message type is not a struct".into())),
    };
    let item = Arc::new(Field::new("item", recflow::data::schema::message_type(), true));
    let mut lb = ListBuilder::new(StructBuilder::from_fields(fields, 0)).with_field(item);
    for r in rows {
        let sb = lb.values();
        for (role, content) in &r.messages {
            sb.field_builder::<StringBuilder>(0).ok_or_else(|| TrainError::Invalid("role builder".into()))?.append_value(role);
            sb.field_builder::<StringBuilder>(1).ok_or_else(|| TrainError::Invalid("content builder".into()))?.append_value(content);
            sb.append(true);
        }
        lb.append(true);
    }
    let mut cols: Vec<ArrayRef> = vec![
        strs(&|e| e.sample_id.clone()),
        strs(&|_| "u".into()),
        strs(&|_| "i".into()),
        Arc::new(Int64Array::from(vec![0i64; n])),
        Arc::new(lb.finish()),
        Arc::new(Float32Array::from(rows.iter().map(|e| e.target).collect::<Vec<_>>())),
        Arc::new(Int32Array::from(vec![0i32; n])),
        Arc::new(Int32Array::from(vec![0i32; n])),
    ];
    if coldstart {
        let mut acc = BooleanBuilder::new();
        rows.iter().for_each(|e| acc.append_value(e.completion.is_some()));
        cols.push(Arc::new(StringArray::from(rows.iter().map(|e| e.completion.clone()).collect::<Vec<_>>())));
        cols.push(Arc::new(acc.finish()));
        cols.push(Arc::new(StringArray::from(vec![None::<String>; n])));
        cols.push(Arc::new(Int32Array::from(vec![1i32; n])));
        cols.push(strs(&|_| "toy".into()));
        cols.push(Arc::new(StringArray::from(vec![None::<String>; n])));
    }
    write_table(path, schema, cols)
}

/// The one Parquet writer path ([`recflow::data::io::write_batch_atomic`]),
/// under parquet's default properties: the sft/grpo logs have always been
/// written so, and their bytes are pinned by the committed locks.
fn write_table(path: &Path, schema: arrow::datatypes::SchemaRef, cols: Vec<ArrayRef>) -> Result<(), TrainError> {
    recflow::data::io::write_batch_atomic(path, schema, cols, parquet::file::properties::WriterProperties::default())
        .map_err(|e| TrainError::Invalid(e.to_string())) // "cannot write PATH: …"
}

/// A per-step log: `step` plus nullable float64 columns in a fixed order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Log {
    pub columns: Vec<String>,
    pub steps: Vec<i64>,
    /// `rows[i][j]`: column j of row i.
    pub rows: Vec<Vec<Option<f64>>>,
}

impl Log {
    pub fn new(columns: &[&str]) -> Self {
        Log { columns: columns.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    pub fn push(&mut self, step: i64, values: &[(&str, Option<f64>)]) -> Result<(), TrainError> {
        let mut row = vec![None; self.columns.len()];
        for (k, v) in values {
            let j = self
                .columns
                .iter()
                .position(|c| c == k)
                .ok_or_else(|| TrainError::Invalid(format!("log has no column `{k}`")))?;
            row[j] = *v;
        }
        self.steps.push(step);
        self.rows.push(row);
        Ok(())
    }

    /// Sets `values` in the last row (an evaluation of the step it logs).
    pub fn set_last(&mut self, values: &[(&str, Option<f64>)]) -> Result<(), TrainError> {
        for (k, v) in values {
            let j = self.columns.iter().position(|c| c == k).ok_or_else(|| TrainError::Invalid(format!("log has no column `{k}`")))?;
            let row = self.rows.last_mut().ok_or_else(|| TrainError::Invalid(format!("log has no row to set `{k}` in")))?;
            row[j] = *v;
        }
        Ok(())
    }

    /// The non-null values of column `name`, in step order (empty when absent).
    pub fn column(&self, name: &str) -> Vec<f64> {
        match self.columns.iter().position(|c| c == name) {
            Some(j) => self.rows.iter().filter_map(|r| r[j]).collect(),
            None => Vec::new(),
        }
    }

    /// Keeps the first `n` rows (resume: rows past the checkpoint are redone).
    pub fn truncate(&mut self, n: usize) {
        self.steps.truncate(n);
        self.rows.truncate(n);
    }

    /// Writes the log as Parquet (atomically: temp file + rename).
    pub fn write(&self, path: &Path) -> Result<(), TrainError> {
        let mut fields = vec![Field::new("step", DataType::Int64, false)];
        fields.extend(self.columns.iter().map(|c| Field::new(c, DataType::Float64, true)));
        let schema = Arc::new(Schema::new(fields));
        let mut cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(self.steps.clone()))];
        for j in 0..self.columns.len() {
            cols.push(Arc::new(Float64Array::from(self.rows.iter().map(|r| r[j]).collect::<Vec<_>>())));
        }
        write_table(path, schema, cols)
    }

    /// Reads a log written by [`Log::write`] (checkpoint restore).
    pub fn read(path: &Path) -> Result<Log, TrainError> {
        let derr = |msg: String| TrainError::Data { path: path.into(), msg };
        let f = File::open(path).map_err(TrainError::io(path))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| derr(e.to_string()))?;
        let columns: Vec<String> = b.schema().fields().iter().skip(1).map(|f| f.name().clone()).collect();
        let mut log = Log { columns, ..Default::default() };
        for batch in b.build().map_err(|e| derr(e.to_string()))? {
            let batch = batch.map_err(|e| derr(e.to_string()))?;
            let steps = col::<Int64Array>(&batch, "step", path)?;
            let vals: Vec<&Float64Array> =
                log.columns.iter().map(|c| col::<Float64Array>(&batch, c, path)).collect::<Result<_, _>>()?;
            for i in 0..batch.num_rows() {
                log.steps.push(steps.value(i));
                log.rows.push(vals.iter().map(|a| if a.is_null(i) { None } else { Some(a.value(i)) }).collect());
            }
        }
        Ok(log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_roundtrip_and_coldstart_keeps_accepted_rows() {
        let dir = tempfile::tempdir().unwrap();
        let ex = |id: &str, c: Option<&str>| Example {
            sample_id: id.into(),
            messages: vec![("system".into(), "s".into()), ("user".into(), "q".into())],
            target: 4.0,
            completion: c.map(String::from),
        };
        let p = dir.path().join("c.parquet");
        write_examples(&p, &[ex("a", Some("<rate>4</rate>")), ex("b", None)], true).unwrap();
        // Rejected rows (accepted = false) never reach SFT.
        assert_eq!(read_examples(&p, true).unwrap(), vec![ex("a", Some("<rate>4</rate>"))]);
        let p = dir.path().join("s.parquet");
        write_examples(&p, &[ex("a", None)], false).unwrap();
        assert_eq!(read_examples(&p, false).unwrap(), vec![ex("a", None)]);
    }

    #[test]
    fn log_roundtrips_bit_exactly_with_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::new(&["loss", "val_loss"]);
        log.push(1, &[("loss", Some(0.1 + 0.2))]).unwrap();
        log.push(2, &[("loss", Some(f64::MIN_POSITIVE)), ("val_loss", Some(1.0 / 3.0))]).unwrap();
        assert!(log.push(3, &[("nope", None)]).is_err(), "unknown columns are errors");
        let p = dir.path().join("log.parquet");
        log.write(&p).unwrap();
        // Exact resume needs the log restored bit for bit.
        assert_eq!(Log::read(&p).unwrap(), log);
    }

    /// The one writer path keeps the bytes the former inline writer
    /// (`ArrowWriter::try_new(.., None)`) produced: log and example files
    /// are pinned by committed locks.
    #[test]
    fn logs_keep_the_former_writer_bytes() {
        let d = tempfile::tempdir().unwrap();
        let mut log = Log::new(&["loss", "val_loss"]);
        log.push(1, &[("loss", Some(0.5))]).unwrap();
        log.push(2, &[("loss", Some(0.25)), ("val_loss", Some(0.75))]).unwrap();
        let p = d.path().join("log.parquet");
        log.write(&p).unwrap();
        let mut fields = vec![Field::new("step", DataType::Int64, false)];
        fields.extend(log.columns.iter().map(|c| Field::new(c, DataType::Float64, true)));
        let schema = Arc::new(Schema::new(fields));
        let mut cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(log.steps.clone()))];
        for j in 0..log.columns.len() {
            cols.push(Arc::new(Float64Array::from(log.rows.iter().map(|r| r[j]).collect::<Vec<_>>())));
        }
        let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
        let mut former = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut former, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), former, "same bytes as the former writer");
    }

    /// The trainers log a step's row after its update and its evaluation
    /// one iteration later: `set_last` must fill exactly the last row.
    #[test]
    fn an_evaluation_fills_the_last_row_only() {
        let mut log = Log::new(&["loss", "val_loss"]);
        assert!(log.set_last(&[("val_loss", Some(1.0))]).is_err(), "no row yet");
        log.push(1, &[("loss", Some(0.5))]).unwrap();
        log.push(2, &[("loss", Some(0.25))]).unwrap();
        log.set_last(&[("val_loss", Some(0.75))]).unwrap();
        assert_eq!(log.rows, vec![vec![Some(0.5), None], vec![Some(0.25), Some(0.75)]]);
        assert!(log.set_last(&[("nope", None)]).is_err(), "unknown columns are errors");
    }
}
