//! Arrow schemas of the pinned tables (ARCHITECTURE "Schemas"). Every stage
//! that reads or writes these tables uses these functions.
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// interactions: user_id, item_id, rating f32, timestamp i64 (seconds),
/// review_title, review_text (nullable).
pub fn interactions() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("rating", DataType::Float32, false),
        Field::new("timestamp", DataType::Int64, false),
        Field::new("review_title", DataType::Utf8, true),
        Field::new("review_text", DataType::Utf8, true),
    ]))
}

/// items: item_id, title, categories list<utf8>, description, brand, price f64
/// (all but item_id nullable).
pub fn items() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("item_id", DataType::Utf8, false),
        Field::new("title", DataType::Utf8, true),
        Field::new(
            "categories",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
        Field::new("description", DataType::Utf8, true),
        Field::new("brand", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
    ]))
}

/// The chat message struct: role, content.
pub fn message_type() -> DataType {
    DataType::Struct(
        vec![
            Field::new("role", DataType::Utf8, false),
            Field::new("content", DataType::Utf8, false),
        ]
        .into(),
    )
}

fn sample_fields() -> Vec<Field> {
    vec![
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("timestamp", DataType::Int64, false),
        Field::new(
            "messages",
            DataType::List(Arc::new(Field::new("item", message_type(), true))),
            false,
        ),
        Field::new("target", DataType::Float32, false),
        Field::new("user_history_len", DataType::Int32, false),
        Field::new("item_history_len", DataType::Int32, false),
    ]
}

/// samples: sample_id, user_id, item_id, timestamp, messages
/// list<struct<role, content>>, target f32, user_history_len i32,
/// item_history_len i32.
pub fn samples() -> SchemaRef {
    Arc::new(Schema::new(sample_fields()))
}

/// coldstart = samples + completion, accepted, reason, attempts, teacher,
/// reasoning_content (nullable). `messages` stay the original prompt.
pub fn coldstart() -> SchemaRef {
    let mut f = sample_fields();
    f.extend([
        Field::new("completion", DataType::Utf8, true),
        Field::new("accepted", DataType::Boolean, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("attempts", DataType::Int32, false),
        Field::new("teacher", DataType::Utf8, false),
        Field::new("reasoning_content", DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(f))
}
