//! `recflow push [PIPELINE]` and `recflow pull [PIPELINE]`: move the keys a
//! lock file names between the local store and the remote. Without a
//! pipeline, every lock file of the project.
//!
//! * push: each locked key whose run record is local ([`Remote::push_key`]:
//!   objects, then the create-only record), then the lock itself as a root
//!   of the remote (what `gc --remote` keeps). Keys never run here are
//!   listed, not an error.
//! * pull: each locked key missing (or corrupt) locally
//!   ([`Remote::pull_key`], verified by hash), then its outputs are put
//!   where a run would put them — `cache/out/KEY/` for built-in stages, the
//!   workspace path for shell stages when nothing is there — so `verify`
//!   and downstream stages find them without running anything. A key the
//!   remote lacks (or holds corrupt) fails the pull (exit 1): CI notices.
//!
//! Progress (bytes, rate) goes to stderr: a bar on a terminal, otherwise a
//! plain line every `--progress-interval` seconds; the summary to stdout.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::RunError;
use crate::cache::{StatCache, Store};
use crate::lock::{lock_path, LockFile, LockStage};
use crate::remote::transfer::fmt_bytes;
use crate::remote::{Progress, PullOutcome, PushOutcome, Remote, RemoteSpec};

/// Flags of push and pull.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Parallel transfers (default: `[remote] jobs`, else 8).
    pub jobs: Option<usize>,
    /// Seconds between progress lines without a terminal.
    pub interval: Duration,
}

/// What a push or pull did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// Keys transferred (pushed or pulled).
    pub moved: usize,
    /// Keys already where they were asked to go.
    pub already: usize,
    /// `STAGE (KEY12): why` of keys that could not be moved.
    pub failed: Vec<String>,
    /// Notes (keys not run here, workspace files left alone, …).
    pub notes: Vec<String>,
    pub objects: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl SyncReport {
    /// Takes the totals from the transfer's progress.
    fn close(&mut self, progress: &Progress, t0: Instant) {
        let last = progress.finish();
        tracing::info!("{last}");
        self.objects = progress.objects();
        self.bytes = progress.bytes();
        self.seconds = t0.elapsed().as_secs_f64();
    }

    /// `pushed 3 keys (12 objects, 40.0 MB) in 1.2 s (33.3 MB/s); 2 already there`.
    pub fn summary(&self, verb: &str) -> String {
        let rate = fmt_bytes((self.bytes as f64 / self.seconds.max(1e-3)) as u64);
        let mut s = format!(
            "{verb} {} keys ({} objects, {}) in {:.1} s ({rate}/s); {} already {}",
            self.moved,
            self.objects,
            fmt_bytes(self.bytes),
            self.seconds,
            self.already,
            if verb == "pushed" { "in the remote" } else { "here" }
        );
        if !self.failed.is_empty() {
            s.push_str(&format!("; {} FAILED", self.failed.len()));
        }
        s
    }
}

/// The lock files to sync: PIPELINE's (a `.yaml` or its `.lock`), else every
/// lock file under the project root.
fn locks_of(root: &Path, pipeline: Option<&Path>) -> Result<Vec<PathBuf>, RunError> {
    match pipeline {
        Some(p) => {
            let lf = lock_path(p);
            if !lf.is_file() {
                return Err(RunError::BadInput(format!(
                    "{}: no lock file next to the pipeline (run it first, or commit its lock)",
                    lf.display()
                )));
            }
            Ok(vec![lf])
        }
        None => {
            let v = super::gc::project_locks(root);
            if v.is_empty() {
                return Err(RunError::BadInput(format!("no lock files under {} (name a pipeline, or run one first)", root.display())));
            }
            Ok(v)
        }
    }
}

/// Every stage entry of the lock files, each key once: (its lock file, stage, entry).
fn locked_keys(locks: &[PathBuf]) -> Result<Vec<(PathBuf, String, LockStage)>, RunError> {
    let mut seen = BTreeSet::new();
    let mut v = Vec::new();
    for lf in locks {
        for (stage, entry) in LockFile::read(lf)?.stages {
            if seen.insert(entry.key.clone()) {
                v.push((lf.clone(), stage, entry));
            }
        }
    }
    Ok(v)
}

/// `STAGE (KEY12)` in messages.
fn tag(stage: &str, key: &str) -> String {
    format!("{stage} ({})", key.get(..12).unwrap_or(key))
}

/// The project root of a pipeline (or of the current directory) and its remote.
fn setup(pipeline: Option<&Path>, opts: &SyncOptions) -> Result<(PathBuf, Remote), RunError> {
    let start = match pipeline {
        Some(p) => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).parent().map(Path::to_path_buf).unwrap_or_default(),
        None => std::env::current_dir().unwrap_or_default(),
    };
    let root = crate::pipeline::project_root(&start);
    let Some(mut spec) = RemoteSpec::from_project(&root)? else {
        return Err(RunError::BadInput(format!(
            "no remote configured: set {} or `[remote] url` in {}",
            crate::remote::REMOTE_ENV,
            crate::config::config_path(&root).display()
        )));
    };
    if let Some(j) = opts.jobs {
        if j == 0 {
            return Err(RunError::BadInput("--jobs must be at least 1".into()));
        }
        spec.jobs = j;
    }
    Ok((root, Remote::open(&spec)?))
}

fn runtime() -> Result<tokio::runtime::Runtime, RunError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start the async runtime: {e}")))
}

/// `recflow push`.
pub fn push(pipeline: Option<&Path>, opts: &SyncOptions) -> Result<SyncReport, RunError> {
    let (root, remote) = setup(pipeline, opts)?;
    let locks = locks_of(&root, pipeline)?;
    let local = Store::open(&crate::cache::store_dir(&root));
    let rt = runtime()?;
    rt.block_on(async {
        remote.check().await?;
        let progress = Progress::new("push", opts.interval);
        let t0 = Instant::now();
        let mut rep = SyncReport::default();
        for (_, stage, entry) in locked_keys(&locks)? {
            let tag = tag(&stage, &entry.key);
            if local.read_record(&entry.key).is_none() {
                rep.notes.push(format!("{tag}: not in the local store (not run here); skipped"));
                continue;
            }
            match remote.push_key(&local, &entry.key, &progress).await {
                Ok(PushOutcome::Pushed { .. }) => rep.moved += 1,
                Ok(PushOutcome::AlreadyThere { .. }) => rep.already += 1,
                Ok(PushOutcome::Differs { .. }) => {
                    rep.already += 1;
                    rep.notes.push(format!("{tag}: the remote holds another writer's result for this key (other bytes); it keeps that one"));
                }
                Err(e) if e.is_bad_input() => return Err(RunError::Remote(e)),
                Err(e) => rep.failed.push(format!("{tag}: {e}")),
            }
        }
        // The locks last, as roots: what they name is in the remote now.
        for lf in &locks {
            let text = std::fs::read(lf).map_err(|e| RunError::Io { path: lf.clone(), source: e })?;
            remote.push_root(&crate::cache::roots::root_id(lf), &text).await?;
        }
        rep.close(&progress, t0);
        Ok(rep)
    })
}

/// `recflow pull`.
pub fn pull(pipeline: Option<&Path>, opts: &SyncOptions) -> Result<SyncReport, RunError> {
    let (root, remote) = setup(pipeline, opts)?;
    let locks = locks_of(&root, pipeline)?;
    let local = Store::open(&crate::cache::store_dir(&root));
    let rt = runtime()?;
    let mut sc = StatCache::load(&local.dir);
    let rep = rt.block_on(async {
        remote.check().await?;
        let progress = Progress::new("pull", opts.interval);
        let t0 = Instant::now();
        let mut rep = SyncReport::default();
        for (lf, stage, entry) in locked_keys(&locks)? {
            let tag = tag(&stage, &entry.key);
            let intact = local.read_record(&entry.key).is_some() && entry.outputs.values().all(|o| local.check(&mut sc, &o.id).is_ok());
            if intact {
                rep.already += 1;
            } else {
                local.drop_key(&entry.key);
                let why = match remote.pull_key(&local, &entry.key, &progress).await {
                    Ok(PullOutcome::Pulled { .. }) => None,
                    Ok(PullOutcome::Missing) => Some("not in the remote (push it from where it ran)".to_string()),
                    Ok(PullOutcome::Unusable(why)) => Some(format!("the remote's entry is not usable ({why})")),
                    Err(e) if e.is_bad_input() => return Err(RunError::Remote(e)),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = why {
                    rep.failed.push(format!("{tag}: {why}"));
                    continue;
                }
                rep.moved += 1;
            }
            let dir = lf.parent().map(Path::to_path_buf).unwrap_or_default();
            place_outputs(&local, &dir, &stage, &entry, &mut rep)?;
        }
        rep.close(&progress, t0);
        Ok::<_, RunError>(rep)
    })?;
    sc.save();
    Ok(rep)
}

/// Puts a pulled key's outputs where a run would: `out/KEY/` for a built-in
/// stage; a shell stage's workspace paths (relative to the pipeline's
/// directory) when nothing is there yet — an existing file is left for
/// `recflow run` to judge.
fn place_outputs(local: &Store, dir: &Path, stage: &str, entry: &LockStage, rep: &mut SyncReport) -> Result<(), RunError> {
    if entry.key_inputs.kind != "shell" {
        local.materialize_outputs(&entry.key, &entry.outputs)?;
        return Ok(());
    }
    for (name, o) in &entry.outputs {
        let dest = dir.join(&o.path);
        if std::fs::symlink_metadata(&dest).is_ok() {
            continue;
        }
        if !crate::pipeline::normalize(&dest).starts_with(crate::pipeline::normalize(dir)) {
            rep.notes.push(format!("{stage}.{name}: output path {} is outside the pipeline's directory; not placed", o.path));
            continue;
        }
        local.materialize(&o.id, &dest)?;
    }
    Ok(())
}
