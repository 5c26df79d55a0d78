//! Parquet IO of the pinned tables: deterministic writers (identical rows →
//! byte-identical files: fixed row-group size, snappy, no timestamps in the
//! metadata) and readers that accept any integer/string physical variant a
//! foreign tool may have written (LargeUtf8, Utf8View, Int32 …) by casting.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Int32Type, Int64Type, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use super::{schema, ColdRow, Interaction, Item, Message, Sample};

/// Rows per Parquet row group (and per in-memory batch while streaming).
pub const ROW_GROUP: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: Parquet: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: Arrow: {source}")]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("{path}: column `{column}`: {msg}")]
    Column { path: PathBuf, column: String, msg: String },
    // The evaluation side's errors (`report::io`'s tables: predictions,
    // samples and logs read by eval, baselines and the report). Their texts
    // predate the merge into this one type and are kept as they were: each
    // names the file, and the column and what was expected where there is one.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable Parquet file: {msg}")]
    NotParquet { path: PathBuf, msg: String },
    #[error("{path}: column `{column}` is missing (expected {expected}); is this the right input?")]
    MissingColumn { path: PathBuf, column: String, expected: &'static str },
    #[error("{path}: column `{column}` has type {found}, expected {expected}")]
    ColumnType { path: PathBuf, column: String, found: String, expected: &'static str },
    #[error("{path}: row {row} of column `{column}` is null")]
    Null { path: PathBuf, column: String, row: usize },
    #[error("cannot write {path}: {msg}")]
    Write { path: PathBuf, msg: String },
}

fn perr(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> IoError + '_ {
    move |source| IoError::Parquet {
        path: path.to_path_buf(),
        source,
    }
}
fn aerr(path: &Path) -> impl Fn(arrow::error::ArrowError) -> IoError + '_ {
    move |source| IoError::Arrow {
        path: path.to_path_buf(),
        source,
    }
}

/// Writer properties shared by every table we write (the benchmark's polars
/// side uses the same codec).
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_size(ROW_GROUP)
        // Review texts repeat more than one would think (product variants in
        // Amazon 2018 share one review; short "Great product!" texts): a
        // dictionary of up to 8 MiB per row group holds every distinct text of
        // a row group that repeats, and the Snappy pass then runs over the
        // distinct texts only. Where texts do not repeat, the column falls
        // back to plain encoding once the dictionary is full (a bounded cost).
        .set_column_dictionary_page_size_limit(
            parquet::schema::types::ColumnPath::from("review_text"),
            8 << 20,
        )
        .set_column_dictionary_enabled(parquet::schema::types::ColumnPath::from("description"), false)
        // Min/max of free text are useless for pruning and cost a comparison per value.
        .set_column_statistics_enabled(parquet::schema::types::ColumnPath::from("review_text"), EnabledStatistics::None)
        .set_column_statistics_enabled(parquet::schema::types::ColumnPath::from("description"), EnabledStatistics::None)
        .set_created_by("recflow".to_string())
        .build()
}

/// Writer properties of the evaluation side's small one-batch tables
/// (eval and baselines predictions, and the training logs the report
/// reads): Snappy and otherwise parquet's defaults (one row group, its own
/// `created_by`, dictionaries and page statistics on every column). Not
/// [`writer_properties`]: these files were always written this way, and
/// their bytes are the output ids committed locks record and downstream
/// keys (the report's) hash, so other bytes would fail `recflow verify`
/// against every lock and rerun every report. Pinned by a test.
pub fn eval_writer_properties() -> WriterProperties {
    WriterProperties::builder().set_compression(Compression::SNAPPY).build()
}

/// Writes `columns` as one batch of one Parquet file, atomically (a
/// temporary file renamed into place: a reader never sees half a table),
/// under `props` — the caller says which properties its bytes are pinned
/// to. Every error is [`IoError::Write`] naming the file.
pub fn write_batch_atomic(path: &Path, schema: SchemaRef, columns: Vec<ArrayRef>, props: WriterProperties) -> Result<(), IoError> {
    let werr = |e: &dyn std::fmt::Display| IoError::Write { path: path.into(), msg: e.to_string() };
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| werr(&e))?;
    let mut buf = Vec::new();
    {
        let mut w = ArrowWriter::try_new(&mut buf, schema, Some(props)).map_err(|e| werr(&e))?;
        w.write(&batch).map_err(|e| werr(&e))?;
        w.close().map_err(|e| werr(&e))?;
    }
    crate::util::write_atomic(path, &buf).map_err(|e| werr(&e))
}

/// Streams record batches into one Parquet file; `finish` closes it.
pub struct TableWriter {
    path: PathBuf,
    inner: ArrowWriter<File>,
    rows: u64,
}

impl TableWriter {
    pub fn create(path: &Path, schema: SchemaRef) -> Result<Self, IoError> {
        let file = File::create(path).map_err(|source| IoError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let inner = ArrowWriter::try_new(file, schema, Some(writer_properties())).map_err(perr(path))?;
        Ok(TableWriter {
            path: path.to_path_buf(),
            inner,
            rows: 0,
        })
    }
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), IoError> {
        self.rows += batch.num_rows() as u64;
        self.inner.write(batch).map_err(perr(&self.path))
    }
    pub fn rows(&self) -> u64 {
        self.rows
    }
    pub fn finish(self) -> Result<u64, IoError> {
        let path = self.path;
        let f = self.inner.into_inner().map_err(perr(&path))?;
        f.sync_all().map_err(|source| IoError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(self.rows)
    }
}

/// A [`TableWriter`] that encodes row groups on several threads.
///
/// Batches of any size are cut into row groups of exactly [`ROW_GROUP`] rows
/// (the last one shorter), each row group is encoded (levels, dictionaries,
/// Snappy) on one of `threads` encoder threads, and the encoded column chunks
/// are appended to the file strictly in row-group order. Every row group is
/// encoded from one contiguous batch, exactly as [`TableWriter`] encodes a
/// batch of [`ROW_GROUP`] rows, so the file is byte-identical to
/// [`TableWriter`]'s for the same rows, whatever the thread count or the
/// sizes of the incoming batches (page boundaries depend on how rows are fed
/// to a column writer, hence the re-cutting). At most `threads + 1` row
/// groups are in flight: memory stays bounded.
pub struct ParallelTableWriter {
    path: PathBuf,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    next_group: usize,
    rows: u64,
    /// One token per row group in flight; the sink hands them back.
    tokens: std::sync::mpsc::Receiver<()>,
    work: Option<std::sync::mpsc::SyncSender<(usize, Vec<RecordBatch>)>>,
    encoders: Vec<std::thread::JoinHandle<()>>,
    sink: Option<std::thread::JoinHandle<Result<(), IoError>>>,
}

type Encoded = (usize, Result<Vec<parquet::arrow::arrow_writer::ArrowColumnChunk>, IoError>);

impl ParallelTableWriter {
    pub fn create(path: &Path, schema: SchemaRef, threads: usize) -> Result<Self, IoError> {
        use std::sync::mpsc::{sync_channel, Receiver};
        use std::sync::Mutex;
        let threads = threads.max(1);
        let file = File::create(path).map_err(|source| IoError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // Through ArrowWriter so the file carries the same key-value metadata
        // (the encoded Arrow schema) as a TableWriter's.
        let (mut file_writer, factory) = ArrowWriter::try_new(file, schema.clone(), Some(writer_properties()))
            .and_then(ArrowWriter::into_serialized_writer)
            .map_err(perr(path))?;
        let factory = Arc::new(factory);
        let in_flight = threads + 1;
        let (token_tx, tokens) = sync_channel::<()>(in_flight);
        for _ in 0..in_flight {
            let _ = token_tx.send(());
        }
        let (work_tx, work_rx) = sync_channel::<(usize, Vec<RecordBatch>)>(threads);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (done_tx, done_rx) = sync_channel::<Encoded>(in_flight);
        let encoders = (0..threads)
            .map(|_| {
                let (work_rx, done_tx, factory, schema, path) =
                    (work_rx.clone(), done_tx.clone(), factory.clone(), schema.clone(), path.to_path_buf());
                std::thread::spawn(move || loop {
                    let next = work_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((group, parts)) = next else { return };
                    let encoded = encode_row_group(&factory, &schema, group, &parts).map_err(|e| match e {
                        EncodeError::Parquet(source) => IoError::Parquet {
                            path: path.clone(),
                            source,
                        },
                        EncodeError::Arrow(source) => IoError::Arrow {
                            path: path.clone(),
                            source,
                        },
                    });
                    if done_tx.send((group, encoded)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        drop(done_tx);
        let sink_path = path.to_path_buf();
        let sink = std::thread::spawn(move || -> Result<(), IoError> {
            let done_rx: Receiver<Encoded> = done_rx;
            let mut waiting = std::collections::BTreeMap::new();
            let mut next = 0usize;
            for (group, encoded) in done_rx {
                waiting.insert(group, encoded?);
                while let Some(chunks) = waiting.remove(&next) {
                    let mut rg = file_writer.next_row_group().map_err(perr(&sink_path))?;
                    for chunk in chunks {
                        chunk.append_to_row_group(&mut rg).map_err(perr(&sink_path))?;
                    }
                    rg.close().map_err(perr(&sink_path))?;
                    next += 1;
                    let _ = token_tx.send(());
                }
            }
            let f = file_writer.into_inner().map_err(perr(&sink_path))?;
            f.sync_all().map_err(|source| IoError::Io {
                path: sink_path.clone(),
                source,
            })
        });
        Ok(ParallelTableWriter {
            path: path.to_path_buf(),
            pending: Vec::new(),
            pending_rows: 0,
            next_group: 0,
            rows: 0,
            tokens,
            work: Some(work_tx),
            encoders,
            sink: Some(sink),
        })
    }

    /// Queues `batch`; full row groups go to the encoders (blocking while
    /// `threads + 1` are in flight).
    pub fn write(&mut self, batch: RecordBatch) -> Result<(), IoError> {
        self.rows += batch.num_rows() as u64;
        let mut batch = batch;
        while self.pending_rows + batch.num_rows() >= ROW_GROUP {
            let take = ROW_GROUP - self.pending_rows;
            self.pending.push(batch.slice(0, take));
            batch = batch.slice(take, batch.num_rows() - take);
            self.pending_rows = ROW_GROUP;
            self.dispatch()?;
        }
        if batch.num_rows() > 0 {
            self.pending_rows += batch.num_rows();
            self.pending.push(batch);
        }
        Ok(())
    }

    fn dispatch(&mut self) -> Result<(), IoError> {
        let parts = std::mem::take(&mut self.pending);
        self.pending_rows = 0;
        let sent = self.tokens.recv().is_ok()
            && self
                .work
                .as_ref()
                .is_some_and(|w| w.send((self.next_group, parts)).is_ok());
        self.next_group += 1;
        if !sent {
            // The sink stopped early: its error says why.
            return Err(self.shutdown().err().unwrap_or_else(|| IoError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("the Parquet encoder threads stopped"),
            }));
        }
        Ok(())
    }

    fn shutdown(&mut self) -> Result<(), IoError> {
        self.work = None;
        for e in self.encoders.drain(..) {
            let _ = e.join();
        }
        match self.sink.take().map(|s| s.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(IoError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("the Parquet writer thread panicked"),
            }),
            None => Ok(()),
        }
    }

    /// Writes the last (short) row group and closes the file; returns the rows written.
    pub fn finish(mut self) -> Result<u64, IoError> {
        if self.pending_rows > 0 {
            self.dispatch()?;
        }
        self.shutdown()?;
        Ok(self.rows)
    }
}

impl Drop for ParallelTableWriter {
    fn drop(&mut self) {
        // Not finished (an error upstream): stop the threads; the partial
        // file is the caller's to remove.
        let _ = self.shutdown();
    }
}

enum EncodeError {
    Parquet(parquet::errors::ParquetError),
    Arrow(arrow::error::ArrowError),
}

/// Encodes one row group from its parts (concatenated first: see [`ParallelTableWriter`]).
fn encode_row_group(
    factory: &parquet::arrow::arrow_writer::ArrowRowGroupWriterFactory,
    schema: &SchemaRef,
    group: usize,
    parts: &[RecordBatch],
) -> Result<Vec<parquet::arrow::arrow_writer::ArrowColumnChunk>, EncodeError> {
    let batch = if parts.len() == 1 {
        parts[0].clone()
    } else {
        arrow::compute::concat_batches(schema, parts).map_err(EncodeError::Arrow)?
    };
    let mut writers = factory.create_column_writers(group).map_err(EncodeError::Parquet)?;
    let mut it = writers.iter_mut();
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        for leaf in parquet::arrow::arrow_writer::compute_leaves(field, column).map_err(EncodeError::Parquet)? {
            let Some(w) = it.next() else {
                return Err(EncodeError::Parquet(parquet::errors::ParquetError::General(
                    "more leaf columns than column writers".into(),
                )));
            };
            w.write(&leaf).map_err(EncodeError::Parquet)?;
        }
    }
    writers
        .into_iter()
        .map(|w| w.close().map_err(EncodeError::Parquet))
        .collect()
}

/// Reads every record batch of a Parquet file.
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>, IoError> {
    let file = File::open(path).map_err(|source| IoError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(perr(path))?
        .with_batch_size(ROW_GROUP)
        .build()
        .map_err(perr(path))?;
    reader.map(|b| b.map_err(aerr(path))).collect()
}

/// A named column cast to `to`; a clear error when absent or not castable.
fn column(path: &Path, batch: &RecordBatch, name: &str, to: &DataType) -> Result<ArrayRef, IoError> {
    let col = batch.column_by_name(name).ok_or_else(|| IoError::Column {
        path: path.to_path_buf(),
        column: name.into(),
        msg: "missing (is this the right table?)".into(),
    })?;
    if col.data_type() == to {
        return Ok(col.clone());
    }
    arrow::compute::cast(col, to).map_err(|e| IoError::Column {
        path: path.to_path_buf(),
        column: name.into(),
        msg: format!("has type {} where {to} was expected: {e}", col.data_type()),
    })
}

fn no_nulls(path: &Path, name: &str, a: &dyn Array) -> Result<(), IoError> {
    if a.null_count() > 0 {
        return Err(IoError::Column {
            path: path.to_path_buf(),
            column: name.into(),
            msg: "contains nulls".into(),
        });
    }
    Ok(())
}

fn strings(path: &Path, b: &RecordBatch, name: &str, nullable: bool) -> Result<Vec<Option<String>>, IoError> {
    let col = column(path, b, name, &DataType::Utf8)?;
    if !nullable {
        no_nulls(path, name, col.as_ref())?;
    }
    Ok(col.as_string::<i32>().iter().map(|s| s.map(str::to_string)).collect())
}

fn req_strings(path: &Path, b: &RecordBatch, name: &str) -> Result<Vec<String>, IoError> {
    Ok(strings(path, b, name, false)?
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect())
}

// ---------------------------------------------------------------- interactions

/// Arrow batch of interactions (schema [`schema::interactions`]).
pub fn interactions_batch(rows: &[Interaction]) -> RecordBatch {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.user_id.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.item_id.as_str()))),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.rating))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.timestamp))),
        Arc::new(rows.iter().map(|r| r.review_title.as_deref()).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.review_text.as_deref()).collect::<StringArray>()),
    ];
    // The columns match the pinned schema by construction.
    RecordBatch::try_new(schema::interactions(), cols).expect("interactions columns match the schema")
}

pub fn write_interactions(path: &Path, rows: &[Interaction]) -> Result<(), IoError> {
    let mut w = TableWriter::create(path, schema::interactions())?;
    for chunk in rows.chunks(ROW_GROUP) {
        w.write(&interactions_batch(chunk))?;
    }
    if rows.is_empty() {
        w.write(&interactions_batch(&[]))?;
    }
    w.finish()?;
    Ok(())
}

pub fn interactions_from_batch(path: &Path, b: &RecordBatch) -> Result<Vec<Interaction>, IoError> {
    let users = req_strings(path, b, "user_id")?;
    let items = req_strings(path, b, "item_id")?;
    let rating = column(path, b, "rating", &DataType::Float32)?;
    no_nulls(path, "rating", rating.as_ref())?;
    let ts = column(path, b, "timestamp", &DataType::Int64)?;
    no_nulls(path, "timestamp", ts.as_ref())?;
    let titles = strings(path, b, "review_title", true)?;
    let texts = strings(path, b, "review_text", true)?;
    let rating = rating.as_primitive::<Float32Type>();
    let ts = ts.as_primitive::<Int64Type>();
    Ok(users
        .into_iter()
        .zip(items)
        .zip(titles.into_iter().zip(texts))
        .enumerate()
        .map(|(i, ((user_id, item_id), (review_title, review_text)))| Interaction {
            user_id,
            item_id,
            rating: rating.value(i),
            timestamp: ts.value(i),
            review_title,
            review_text,
        })
        .collect())
}

pub fn read_interactions(path: &Path) -> Result<Vec<Interaction>, IoError> {
    let mut out = Vec::new();
    for b in read_batches(path)? {
        out.extend(interactions_from_batch(path, &b)?);
    }
    Ok(out)
}

// ----------------------------------------------------------------------- items

fn list_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Utf8, true))
}

pub fn items_batch(rows: &[Item]) -> RecordBatch {
    let mut lens = Vec::with_capacity(rows.len());
    let mut vals: Vec<&str> = Vec::new();
    let mut valid = Vec::with_capacity(rows.len());
    for r in rows {
        match &r.categories {
            Some(c) => {
                lens.push(c.len());
                vals.extend(c.iter().map(String::as_str));
                valid.push(true);
            }
            None => {
                lens.push(0);
                valid.push(false);
            }
        }
    }
    let cats = ListArray::new(
        list_field(),
        OffsetBuffer::<i32>::from_lengths(lens),
        Arc::new(StringArray::from_iter_values(vals)),
        Some(valid.into()),
    );
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.item_id.as_str()))),
        Arc::new(rows.iter().map(|r| r.title.as_deref()).collect::<StringArray>()),
        Arc::new(cats),
        Arc::new(rows.iter().map(|r| r.description.as_deref()).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.brand.as_deref()).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.price).collect::<Float64Array>()),
    ];
    RecordBatch::try_new(schema::items(), cols).expect("items columns match the schema")
}

pub fn write_items(path: &Path, rows: &[Item]) -> Result<(), IoError> {
    let mut w = TableWriter::create(path, schema::items())?;
    for chunk in rows.chunks(ROW_GROUP) {
        w.write(&items_batch(chunk))?;
    }
    if rows.is_empty() {
        w.write(&items_batch(&[]))?;
    }
    w.finish()?;
    Ok(())
}

pub fn read_items(path: &Path) -> Result<Vec<Item>, IoError> {
    let mut out = Vec::new();
    for b in read_batches(path)? {
        let ids = req_strings(path, &b, "item_id")?;
        let titles = strings(path, &b, "title", true)?;
        let descs = strings(path, &b, "description", true)?;
        let brands = strings(path, &b, "brand", true)?;
        let price = column(path, &b, "price", &DataType::Float64)?;
        let price = price.as_primitive::<Float64Type>();
        let cats = column(path, &b, "categories", &DataType::List(list_field()))?;
        let cats = cats.as_list::<i32>();
        for (i, (((item_id, title), description), brand)) in
            ids.into_iter().zip(titles).zip(descs).zip(brands).enumerate()
        {
            let categories = if cats.is_null(i) {
                None
            } else {
                let v = cats.value(i);
                Some(v.as_string::<i32>().iter().flatten().map(str::to_string).collect())
            };
            out.push(Item {
                item_id,
                title,
                categories,
                description,
                brand,
                price: if price.is_null(i) { None } else { Some(price.value(i)) },
            });
        }
    }
    Ok(out)
}

// --------------------------------------------------------------------- samples

/// The `messages` column: list<struct<role, content>>.
pub fn messages_array(rows: &[&[Message]]) -> ListArray {
    let DataType::Struct(fields) = schema::message_type() else {
        unreachable!("message_type is a struct")
    };
    let all: Vec<&Message> = rows.iter().flat_map(|m| m.iter()).collect();
    let roles = StringArray::from_iter_values(all.iter().map(|m| m.role.as_str()));
    let contents = StringArray::from_iter_values(all.iter().map(|m| m.content.as_str()));
    let st = StructArray::new(fields, vec![Arc::new(roles) as ArrayRef, Arc::new(contents)], None);
    ListArray::new(
        Arc::new(Field::new("item", schema::message_type(), true)),
        OffsetBuffer::<i32>::from_lengths(rows.iter().map(|m| m.len())),
        Arc::new(st),
        None,
    )
}

/// Reads a `messages` column (any list<struct<role, content>>).
pub fn messages_from(path: &Path, b: &RecordBatch) -> Result<Vec<Vec<Message>>, IoError> {
    let col = b.column_by_name("messages").ok_or_else(|| IoError::Column {
        path: path.to_path_buf(),
        column: "messages".into(),
        msg: "missing (is this a samples table?)".into(),
    })?;
    let bad = |msg: &str| IoError::Column {
        path: path.to_path_buf(),
        column: "messages".into(),
        msg: msg.into(),
    };
    let list = col
        .as_list_opt::<i32>()
        .ok_or_else(|| bad("is not a list<struct<role, content>>"))?;
    let mut out = Vec::with_capacity(list.len());
    for i in 0..list.len() {
        let v = list.value(i);
        let st = v.as_struct_opt().ok_or_else(|| bad("elements are not structs"))?;
        let role = st.column_by_name("role").ok_or_else(|| bad("struct has no `role`"))?;
        let content = st
            .column_by_name("content")
            .ok_or_else(|| bad("struct has no `content`"))?;
        let role = arrow::compute::cast(role, &DataType::Utf8).map_err(|e| bad(&e.to_string()))?;
        let content = arrow::compute::cast(content, &DataType::Utf8).map_err(|e| bad(&e.to_string()))?;
        let (role, content) = (role.as_string::<i32>(), content.as_string::<i32>());
        out.push(
            (0..st.len())
                .map(|j| Message {
                    role: role.value(j).to_string(),
                    content: content.value(j).to_string(),
                })
                .collect(),
        );
    }
    Ok(out)
}

/// The sample columns in schema order (the coldstart writer appends its own).
pub fn sample_columns(rows: &[Sample]) -> Vec<ArrayRef> {
    let msgs: Vec<&[Message]> = rows.iter().map(|r| r.messages.as_slice()).collect();
    vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.sample_id.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.user_id.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.item_id.as_str()))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.timestamp))),
        Arc::new(messages_array(&msgs)),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.target))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.user_history_len))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.item_history_len))),
    ]
}

pub fn samples_batch(rows: &[Sample]) -> RecordBatch {
    RecordBatch::try_new(schema::samples(), sample_columns(rows)).expect("sample columns match the schema")
}

pub fn write_samples(path: &Path, rows: &[Sample]) -> Result<(), IoError> {
    let mut w = TableWriter::create(path, schema::samples())?;
    for chunk in rows.chunks(ROW_GROUP) {
        w.write(&samples_batch(chunk))?;
    }
    if rows.is_empty() {
        w.write(&samples_batch(&[]))?;
    }
    w.finish()?;
    Ok(())
}

/// Samples of one batch (also reads the sample columns of a coldstart table).
pub fn samples_from_batch(path: &Path, b: &RecordBatch) -> Result<Vec<Sample>, IoError> {
    let ids = req_strings(path, b, "sample_id")?;
    let users = req_strings(path, b, "user_id")?;
    let items = req_strings(path, b, "item_id")?;
    let ts = column(path, b, "timestamp", &DataType::Int64)?;
    let target = column(path, b, "target", &DataType::Float32)?;
    let uh = column(path, b, "user_history_len", &DataType::Int32)?;
    let ih = column(path, b, "item_history_len", &DataType::Int32)?;
    for (n, c) in [
        ("timestamp", &ts),
        ("target", &target),
        ("user_history_len", &uh),
        ("item_history_len", &ih),
    ] {
        no_nulls(path, n, c.as_ref())?;
    }
    let msgs = messages_from(path, b)?;
    let (ts, target) = (ts.as_primitive::<Int64Type>(), target.as_primitive::<Float32Type>());
    let (uh, ih) = (uh.as_primitive::<Int32Type>(), ih.as_primitive::<Int32Type>());
    Ok(ids
        .into_iter()
        .zip(users)
        .zip(items)
        .zip(msgs)
        .enumerate()
        .map(|(i, (((sample_id, user_id), item_id), messages))| Sample {
            sample_id,
            user_id,
            item_id,
            timestamp: ts.value(i),
            messages,
            target: target.value(i),
            user_history_len: uh.value(i),
            item_history_len: ih.value(i),
        })
        .collect())
}

pub fn read_samples(path: &Path) -> Result<Vec<Sample>, IoError> {
    let mut out = Vec::new();
    for b in read_batches(path)? {
        out.extend(samples_from_batch(path, &b)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------- coldstart

/// Writes the coldstart table (schema [`schema::coldstart`]: the sample
/// columns, then the teacher's outcome) as one batch.
pub fn write_coldstart(path: &Path, rows: &[ColdRow]) -> Result<(), IoError> {
    let samples: Vec<Sample> = rows.iter().map(|r| r.sample.clone()).collect();
    let mut cols = sample_columns(&samples);
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.completion.clone()).collect::<Vec<_>>())) as ArrayRef);
    cols.push(Arc::new(BooleanArray::from(rows.iter().map(|r| r.accepted).collect::<Vec<_>>())));
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.reason.clone()).collect::<Vec<_>>())));
    cols.push(Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.attempts))));
    cols.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.teacher))));
    cols.push(Arc::new(StringArray::from(rows.iter().map(|r| r.reasoning_content.clone()).collect::<Vec<_>>())));
    let batch = RecordBatch::try_new(schema::coldstart(), cols).map_err(aerr(path))?;
    let mut w = TableWriter::create(path, schema::coldstart())?;
    w.write(&batch)?;
    w.finish()?;
    Ok(())
}

/// Reads a coldstart table back (tests, inspection).
pub fn read_coldstart(path: &Path) -> Result<Vec<ColdRow>, IoError> {
    let mut out = Vec::new();
    for b in read_batches(path)? {
        let samples = samples_from_batch(path, &b)?;
        let completion = strings(path, &b, "completion", true)?;
        let accepted = column(path, &b, "accepted", &DataType::Boolean)?;
        let reason = strings(path, &b, "reason", true)?;
        let attempts = column(path, &b, "attempts", &DataType::Int32)?;
        let teacher = req_strings(path, &b, "teacher")?;
        let rc = strings(path, &b, "reasoning_content", true)?;
        no_nulls(path, "accepted", accepted.as_ref())?;
        no_nulls(path, "attempts", attempts.as_ref())?;
        let (accepted, attempts) = (accepted.as_boolean(), attempts.as_primitive::<Int32Type>());
        let rest = completion.into_iter().zip(reason).zip(teacher).zip(rc);
        for (i, (sample, (((completion, reason), teacher), reasoning_content))) in samples.into_iter().zip(rest).enumerate() {
            out.push(ColdRow {
                sample,
                completion,
                accepted: accepted.value(i),
                reason,
                attempts: attempts.value(i),
                teacher,
                reasoning_content,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inter(u: &str, i: &str, r: f32, t: i64, text: Option<&str>) -> Interaction {
        Interaction {
            user_id: u.into(),
            item_id: i.into(),
            rating: r,
            timestamp: t,
            review_title: None,
            review_text: text.map(Into::into),
        }
    }

    #[test]
    fn parallel_writer_gives_the_sequential_bytes() {
        let rows: Vec<Interaction> = (0..ROW_GROUP * 2 + 123)
            .map(|k| {
                let text = format!("review {k} {}", "x".repeat(k % 97));
                inter(&format!("u{}", k % 301), &format!("i{}", k % 57), (1 + k % 5) as f32, k as i64, (k % 11 != 0).then_some(text.as_str()))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let seq = dir.path().join("seq.parquet");
        write_interactions(&seq, &rows).unwrap();
        for (threads, piece) in [(1, 1000), (3, 65_537), (4, 7)] {
            let par = dir.path().join(format!("par{threads}.parquet"));
            let mut w = ParallelTableWriter::create(&par, schema::interactions(), threads).unwrap();
            for chunk in rows.chunks(piece) {
                w.write(interactions_batch(chunk)).unwrap();
            }
            assert_eq!(w.finish().unwrap(), rows.len() as u64);
            assert!(
                std::fs::read(&seq).unwrap() == std::fs::read(&par).unwrap(),
                "{threads} encoder threads fed {piece}-row batches write TableWriter's bytes"
            );
        }
    }

    #[test]
    fn tables_round_trip_and_are_byte_identical() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![inter("u1", "a", 5.0, 10, Some("good")), inter("u2", "b", 2.5, 11, None)];
        let (p1, p2) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
        write_interactions(&p1, &rows).unwrap();
        write_interactions(&p2, &rows).unwrap();
        assert_eq!(
            read_interactions(&p1).unwrap(),
            rows,
            "interactions must round-trip, nulls included"
        );
        assert_eq!(
            std::fs::read(&p1).unwrap(),
            std::fs::read(&p2).unwrap(),
            "identical rows → identical bytes"
        );

        let items = vec![
            Item {
                item_id: "a".into(),
                title: Some("A".into()),
                categories: Some(vec!["x".into(), "y".into()]),
                price: Some(3.5),
                ..Default::default()
            },
            Item {
                item_id: "b".into(),
                ..Default::default()
            },
        ];
        let pi = dir.path().join("items.parquet");
        write_items(&pi, &items).unwrap();
        assert_eq!(
            read_items(&pi).unwrap(),
            items,
            "items must round-trip, null categories stay null"
        );

        let s = Sample {
            sample_id: "s1".into(),
            user_id: "u1".into(),
            item_id: "a".into(),
            timestamp: 10,
            messages: vec![
                Message {
                    role: "system".into(),
                    content: "sys".into(),
                },
                Message {
                    role: "user".into(),
                    content: "hi".into(),
                },
            ],
            target: 5.0,
            user_history_len: 3,
            item_history_len: 0,
        };
        let ps = dir.path().join("s.parquet");
        write_samples(
            &ps,
            &[
                s.clone(),
                Sample {
                    messages: vec![],
                    ..s.clone()
                },
            ],
        )
        .unwrap();
        let back = read_samples(&ps).unwrap();
        assert_eq!(back[0], s, "samples must round-trip with their messages");
        assert!(back[1].messages.is_empty(), "an empty message list stays empty");
    }

    #[test]
    fn eval_tables_keep_their_writer_properties_and_bytes() {
        // Exactly Snappy over parquet's defaults, as report::io wrote them
        // before it shared this writer (not the pinned tables' properties).
        let props = eval_writer_properties();
        let col = parquet::schema::types::ColumnPath::from("x");
        assert_eq!(props.compression(&col), Compression::SNAPPY);
        assert_eq!(props.max_row_group_size(), parquet::file::properties::DEFAULT_MAX_ROW_GROUP_SIZE);
        assert_eq!(props.created_by(), parquet::file::properties::DEFAULT_CREATED_BY);
        assert!(props.dictionary_enabled(&col));
        assert_eq!(props.statistics_enabled(&col), EnabledStatistics::Page);
        let reference = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
        assert_eq!(format!("{props:?}"), format!("{reference:?}"), "every property, not only those named above");
        assert_ne!(format!("{props:?}"), format!("{:?}", writer_properties()), "the pinned tables' properties differ");

        // The bytes: write_batch_atomic against the writer the report had.
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            Field::new("sample_id", DataType::Utf8, false),
            Field::new("prediction", DataType::Float32, true),
        ]));
        let cols = || -> Vec<ArrayRef> {
            vec![Arc::new(StringArray::from(vec!["a", "b", "a"])), Arc::new(Float32Array::from(vec![Some(4.5), None, Some(1.0)]))]
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("preds.parquet");
        write_batch_atomic(&p, schema.clone(), cols(), eval_writer_properties()).unwrap();
        let mut want = Vec::new();
        {
            let batch = RecordBatch::try_new(schema.clone(), cols()).unwrap();
            let mut w = ArrowWriter::try_new(&mut want, schema.clone(), Some(reference)).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        }
        assert!(std::fs::read(&p).unwrap() == want, "write_batch_atomic writes the report's former bytes");

        let err = write_batch_atomic(&p, schema, vec![], eval_writer_properties()).unwrap_err().to_string();
        assert!(err.starts_with("cannot write ") && err.contains("preds.parquet"), "a write error names the file: {err}");
    }

    #[test]
    fn missing_column_names_file_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.parquet");
        write_items(
            &p,
            &[Item {
                item_id: "a".into(),
                ..Default::default()
            }],
        )
        .unwrap();
        let err = read_interactions(&p).unwrap_err().to_string();
        assert!(
            err.contains("user_id") && err.contains("i.parquet"),
            "error must name file and column: {err}"
        );
    }

    #[test]
    fn coldstart_round_trips_and_is_byte_identical() {
        let dir = tempfile::tempdir().unwrap();
        let sample = |id: &str| Sample {
            sample_id: id.into(),
            user_id: "u".into(),
            item_id: "i".into(),
            timestamp: 3,
            messages: vec![Message { role: "user".into(), content: "rate".into() }],
            target: 4.0,
            user_history_len: 1,
            item_history_len: 2,
        };
        let rows = vec![
            ColdRow {
                sample: sample("a"),
                completion: Some("<rate>4</rate>".into()),
                accepted: true,
                reason: None,
                attempts: 1,
                teacher: "cf".into(),
                reasoning_content: Some("think".into()),
            },
            ColdRow {
                sample: sample("b"),
                completion: None,
                accepted: false,
                reason: Some("request_failed: timeout".into()),
                attempts: 2,
                teacher: "cf".into(),
                reasoning_content: None,
            },
        ];
        let (p1, p2) = (dir.path().join("c1.parquet"), dir.path().join("c2.parquet"));
        write_coldstart(&p1, &rows).unwrap();
        write_coldstart(&p2, &rows).unwrap();
        assert_eq!(read_coldstart(&p1).unwrap(), rows, "coldstart rows round-trip, nulls included");
        assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap(), "identical rows → identical bytes");
        let err = read_coldstart(&dir.path().join("missing.parquet")).unwrap_err().to_string();
        assert!(err.contains("missing.parquet"), "the error names the file: {err}");
        write_samples(&p2, &[sample("a")]).unwrap();
        let err = read_coldstart(&p2).unwrap_err().to_string();
        assert!(err.contains("completion") && err.contains("c2.parquet"), "a samples table is not a coldstart table: {err}");
    }

}
