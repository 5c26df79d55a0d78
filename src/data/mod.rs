//! Data: Arrow schemas of the pinned tables, raw-format readers, Parquet IO.
pub mod schema;
