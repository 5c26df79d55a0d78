//! The engine's error type: every failure names the file (and field or
//! tensor) it concerns and what to do about it.
use std::path::PathBuf;

/// Errors of the LLM engine ([`crate::llm`]).
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A config value the engine cannot honour (field named in `msg`).
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// Missing, unexpected or mis-shaped weights.
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("chat template: {msg}")]
    Template { msg: String },
    #[error("GGUF {path}: {msg}")]
    Gguf { path: PathBuf, msg: String },
    /// A sequence longer than `max_position_embeddings`.
    #[error("sequence of {len} tokens exceeds the model's context length {max} (max_position_embeddings in config.json); shorten the prompt or lower max_new_tokens")]
    ContextLength { len: i64, max: i64 },
    /// Bad arguments to an API call (shapes, options).
    #[error("{0}")]
    Invalid(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = LlmError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LlmError {
    let path = path.into();
    move |source| LlmError::Io { path, source }
}

/// Reads and parses a JSON file, naming the file in errors.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| LlmError::Json { path: path.into(), source })
}
