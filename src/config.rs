//! `recflow.toml`: the project's own settings, next to its `.git` (the file
//! also marks the project root, ARCHITECTURE "Paths"; an empty file is a
//! valid one). One table per concern, each owned by the module that uses it:
//!
//! ```toml
//! [remote]                      # crate::remote::RemoteConfig
//! url = "s3://lab-bucket/recflow"
//!
//! [executor]                    # crate::run::executor::ExecutorConfig
//! kind = "slurm"
//! ```
//!
//! Unknown tables and keys are errors naming the file, line and key, so a
//! typo never silently turns a feature off. A new concern adds its table as a
//! field of [`ProjectConfig`].
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The parsed `recflow.toml` (every table optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// `[remote]`: the remote store ([`crate::remote`]).
    #[serde(default)]
    pub remote: Option<crate::remote::RemoteConfig>,
    /// `[executor]`: where stages run ([`crate::run::executor`]).
    #[serde(default)]
    pub executor: Option<crate::run::executor::ExecutorConfig>,
}

/// A `recflow.toml` that cannot be read or does not parse.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `msg` carries the line, column and key (toml's own report).
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },
}

/// `ROOT/recflow.toml`.
pub fn config_path(root: &Path) -> PathBuf {
    root.join("recflow.toml")
}

impl ProjectConfig {
    /// Reads `ROOT/recflow.toml`; a missing file is the default (empty) config.
    pub fn load(root: &Path) -> Result<ProjectConfig, ConfigError> {
        let path = config_path(root);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ProjectConfig::default()),
            Err(source) => return Err(ConfigError::Io { path, source }),
        };
        Self::parse(&text).map_err(|msg| ConfigError::Parse { path, msg })
    }

    /// Parses the text of a `recflow.toml`; the error is toml's report
    /// (line, column, the offending key or value).
    pub fn parse(text: &str) -> Result<ProjectConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_default_and_unknown_keys_are_named() {
        let c = ProjectConfig::parse("").expect("an empty recflow.toml is valid (it only marks the root)");
        assert!(c.remote.is_none(), "no [remote] table: no remote");
        let e = ProjectConfig::parse("[remot]\nurl = \"s3://b\"\n").expect_err("a misspelt table is an error");
        assert!(e.contains("remot") && e.contains("line 1"), "the error names the table and its line: {e}");
        let e = ProjectConfig::parse("[remote]\nurl = \"s3://b\"\nurll = 1\n").expect_err("a misspelt key is an error");
        assert!(e.contains("urll") && e.contains("line 3"), "the error names the key and its line: {e}");
    }
}
