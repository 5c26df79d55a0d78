//! `model_import` — brings a model people have into the store in HF layout.
//!
//! `with: source:` is a llama-architecture GGUF file (F32/F16/BF16/Q8_0/
//! Q4_0/Q4_1, dequantized to f32; tokenizer and chat template converted) or
//! an HF model directory (validated and copied). Output: `model` (HF dir).
//! Key: the source's content (a path-valued field) and the stage version;
//! the result is checked by loading it (weights, tokenizer, chat template).
use serde::{Deserialize, Serialize};

use super::{InputSpec, OutputSpec, StageDef};

/// `with:` of a `model_import` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A `.gguf` file or an HF model directory (relative to the pipeline file).
    pub source: String,
}

pub struct ModelImport;

impl StageDef for ModelImport {
    type Config = Config;
    const KIND: &'static str = "model_import";
    const VERSION: u32 = 1;
    const PATH_FIELDS: &'static [&'static str] = &["source"];
    const MODEL_INPUTS: &'static [(&'static str, super::model_files::ModelForm)] =
        &[("with.source", super::model_files::ModelForm::HfDirOrGguf)];
    fn inputs() -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(_cfg: &Config) -> Vec<OutputSpec> {
        vec![OutputSpec::dir("model")]
    }
    fn validate(c: &Config) -> Result<(), String> {
        if c.source.trim().is_empty() {
            return Err("`source` must name a GGUF file or an HF model directory".into());
        }
        Ok(())
    }
}
