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

/// The scored sample's columns every predictions table starts with, so the
/// report joins eval and baselines predictions on the same keys.
fn prediction_key_fields() -> Vec<Field> {
    vec![
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("item_id", DataType::Utf8, false),
        Field::new("target", DataType::Float32, false),
        Field::new("user_history_len", DataType::Int32, false),
    ]
}

/// eval `predictions`: the key columns + completion, rating (nullable, the
/// parsed answer), prediction (the rating or the fallback), valid, n_valid,
/// n_completions, invalid_reason (nullable), reward_mean.
pub fn eval_predictions() -> SchemaRef {
    let mut f = prediction_key_fields();
    f.extend([
        Field::new("completion", DataType::Utf8, false),
        Field::new("rating", DataType::Float32, true),
        Field::new("prediction", DataType::Float32, false),
        Field::new("valid", DataType::Boolean, false),
        Field::new("n_valid", DataType::Int32, false),
        Field::new("n_completions", DataType::Int32, false),
        Field::new("invalid_reason", DataType::Utf8, true),
        Field::new("reward_mean", DataType::Float32, false),
    ]);
    Arc::new(Schema::new(f))
}

/// baselines `predictions`, long format (one row per sample × method): the
/// key columns + method, prediction.
pub fn baseline_predictions() -> SchemaRef {
    let mut f = prediction_key_fields();
    f.extend([
        Field::new("method", DataType::Utf8, false),
        Field::new("prediction", DataType::Float32, false),
    ]);
    Arc::new(Schema::new(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &SchemaRef) -> Vec<&str> {
        s.fields().iter().map(|f| f.name().as_str()).collect()
    }

    /// Pinned: the report and downstream readers rely on these columns, in
    /// this order (changing them moves the bytes of eval and baselines).
    #[test]
    fn predictions_schemas_share_the_key_columns_and_are_pinned() {
        let key = ["sample_id", "user_id", "item_id", "target", "user_history_len"];
        let (eval, base) = (eval_predictions(), baseline_predictions());
        assert_eq!(names(&eval)[..5], key, "eval predictions start with the key columns");
        assert_eq!(names(&base)[..5], key, "baselines predictions start with the key columns");
        assert_eq!(
            names(&eval)[5..],
            ["completion", "rating", "prediction", "valid", "n_valid", "n_completions", "invalid_reason", "reward_mean"]
        );
        assert_eq!(names(&base)[5..], ["method", "prediction"]);
        let nullable: Vec<&str> = eval.fields().iter().filter(|f| f.is_nullable()).map(|f| f.name().as_str()).collect();
        assert_eq!(nullable, ["rating", "invalid_reason"], "only the parsed rating and the reason may be null");
        assert!(base.fields().iter().all(|f| !f.is_nullable()));
    }
}
