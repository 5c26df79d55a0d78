//! `model import`: a GGUF file or an HF directory → a validated HF model
//! directory (what the `model_import` stage stores).
use std::path::Path;

use super::error::{io_err, LlmError, Result};
use super::weights::SIDE_FILES;
use super::{gguf, weights, Model, ModelConfig, Tokenizer};

/// What was imported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    pub source_format: &'static str,
    pub model_type: String,
    pub num_parameters: i64,
    pub vocab_size: i64,
    pub num_hidden_layers: i64,
}

fn is_gguf(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    p.is_file()
        && std::fs::File::open(p).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"GGUF"
}

/// Imports `src` (a `.gguf` file or an HF model dir) into `out`, then loads
/// the result (weights, tokenizer, chat template) to prove it is usable.
pub fn import_model(src: &Path, out: &Path) -> Result<ImportSummary> {
    let format = if is_gguf(src) {
        gguf::convert(src, out)?;
        "gguf"
    } else if src.is_dir() {
        ModelConfig::load(src)?;
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        let mut files: Vec<std::path::PathBuf> = weights::weight_files(src)?;
        files.push(src.join("config.json"));
        if src.join(weights::INDEX_FILE).is_file() {
            files.push(src.join(weights::INDEX_FILE));
        }
        files.extend(SIDE_FILES.iter().map(|f| src.join(f)).filter(|p| p.is_file()));
        for f in files {
            let name = f.file_name().ok_or_else(|| LlmError::Invalid(format!("bad path {}", f.display())))?;
            std::fs::copy(&f, out.join(name)).map_err(io_err(&f))?;
        }
        "hf"
    } else if src.is_file() {
        return Err(LlmError::Invalid(format!(
            "{}: neither a GGUF file (magic `GGUF`) nor an HF model directory",
            src.display()
        )));
    } else {
        return Err(LlmError::Invalid(format!("{}: no such file or directory", src.display())));
    };
    // Validate the result end to end: config + every tensor + tokenizer.
    let cfg = ModelConfig::load(out)?;
    let _g = tch::no_grad_guard();
    Model::load(out, tch::Device::Cpu, tch::Kind::Float)?;
    let tok = Tokenizer::load(out)?;
    tok.apply_chat_template(&[super::ChatMessage::new("user", "hi")], true)?;
    Ok(ImportSummary {
        source_format: format,
        model_type: cfg.model_type.clone(),
        num_parameters: cfg.num_parameters(),
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_hidden_layers,
    })
}
