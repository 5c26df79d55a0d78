//! Pipelines: YAML spec → resolved stages → DAG.
//!
//! * [`yaml`] — YAML tree with line/column positions.
//! * [`spec`] — the declared pipeline (what the user wrote), checked key by key.
//! * [`resolve`] — params, `--set`/`--params`, matrix expansion and
//!   propagation, stage checks → a [`resolved::Pipeline`]; it leans on
//!   `interp` (the `${...}` language), `defaults` (`stages/KIND.yaml`,
//!   `extends:`) and [`kinds`] (what each stage kind declares).
//! * [`resolved`] — the resolved model every later step reads.
//! * [`resources`] — a stage's `resources:` (GPUs, and what Slurm is asked for).
//! * [`graph`] — the petgraph DAG, cycles, `dag` output formats.
//!
//! Every mistake is a [`PipelineError`] carrying `file:line:col`; the CLI maps
//! it to exit code 2 before anything touches the store.
mod defaults;
pub mod graph;
mod interp;
pub mod kinds;
pub mod resolve;
pub mod resolved;
pub mod resources;
pub mod schema;
pub mod spec;
pub mod yaml;

pub use resolve::load;
pub use resolved::{Options, Pipeline, ResolvedStage};
pub use yaml::{Loc, Pos};

use std::path::{Component, Path, PathBuf};

/// A mistake in a pipeline (or its defaults, params file or overrides).
#[derive(Debug, thiserror::Error)]
#[error("{loc}: {msg}")]
pub struct PipelineError {
    pub loc: Loc,
    pub msg: String,
}

impl PipelineError {
    pub fn new(file: &std::path::Path, pos: Pos, msg: impl Into<String>) -> Self {
        PipelineError { loc: Loc { file: file.to_path_buf(), pos }, msg: msg.into() }
    }
}

/// The project root of a pipeline file: nearest ancestor holding `.git` or
/// `recflow.toml`, else the pipeline's directory (ARCHITECTURE "Paths").
pub fn project_root(pipeline_dir: &std::path::Path) -> std::path::PathBuf {
    let mut cur = Some(pipeline_dir);
    while let Some(d) = cur {
        if d.join(".git").exists() || d.join("recflow.toml").exists() {
            return d.to_path_buf();
        }
        cur = d.parent();
    }
    pipeline_dir.to_path_buf()
}

/// Lexical normalisation (no symlink resolution): drops `.`, folds `..`.
/// Pipeline paths are compared as written, not as the filesystem resolves
/// them, so a path means the same before and after its target exists.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            // `..` cancels a name only: popping an earlier `..` would turn
            // `../../x` into `x` and let an output escape the directory.
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {} // `/..` is `/`
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `device: auto` without libtorch: an NVIDIA device node present → `cuda`.
pub fn resolve_auto_device() -> &'static str {
    if gpu_count() > 0 {
        "cuda"
    } else {
        "cpu"
    }
}

/// Number of `/dev/nvidiaN` device nodes (0 without an NVIDIA driver).
pub fn gpu_count() -> u32 {
    let Ok(rd) = std::fs::read_dir("/dev") else { return 0 };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.strip_prefix("nvidia").is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()))
        })
        .count() as u32
}

/// Unit tests' temporary project: an empty `recflow.toml`, `p.yaml` and any
/// other `files`, loaded. The directory is returned with the result: the
/// paths the pipeline resolved point into it.
#[cfg(test)]
pub(crate) fn load_in_tempdir(
    yaml: &str,
    files: &[(&str, &str)],
    opts: &Options,
) -> (tempfile::TempDir, Result<Pipeline, PipelineError>) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("recflow.toml"), "").unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    std::fs::write(d.path().join("p.yaml"), yaml).unwrap();
    let p = load(&d.path().join("p.yaml"), opts);
    (d, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_keeps_every_leading_parent() {
        let n = |s: &str| normalize(Path::new(s));
        assert_eq!(n("../../x"), PathBuf::from("../../x"), "a second `..` must not cancel the first");
        assert_eq!(n("a/../../x"), PathBuf::from("../x"), "`..` cancels a name");
        assert_eq!(n("./a/./b/../c"), PathBuf::from("a/c"), "`.` vanishes");
        assert_eq!(n("/a/../../b"), PathBuf::from("/b"), "nothing climbs above the root");
    }
}
