//! The runner's side of the remote store: read-through for keys missing
//! locally, the cross-machine lease around running a key, write-through
//! after a stage commits. Called by the scheduler ([`super::exec`]) only
//! after the local store missed, so a run whose keys are all local opens no
//! connection and makes no request.
//!
//! For a key missing locally (the local key lock already held):
//! 1. pull it ([`Remote::pull_key`]): a verified entry is reused like a local
//!    one; a corrupt or partial one is a warning and a miss;
//! 2. take the key's lease ([`Remote::try_lease`]); while another runner
//!    holds it, wait — pulling its result as soon as its record appears, or
//!    taking the lease over once it expires (or is released); with the lease
//!    held, look for the record once more (the last holder may have pushed
//!    it just before releasing);
//! 3. run the stage while the lease is renewed in the background; a lost
//!    lease stops the stage (its work dir is kept);
//! 4. after the local commit, push the key (objects, then the create-only
//!    record) and release the lease. A failed push is a warning: the result
//!    is committed locally and `recflow push` sends it later.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::engine::{Done, Engine};
use super::plan::Mode;
use crate::pipeline::resolved::ResolvedStage;
use crate::remote::{Acquire, LeaseKeeper, LeaseWatch, Progress, PullOutcome, PushOutcome, Remote, RemoteSpec};

/// A run's remote: opened and checked on first use, at most once.
pub(crate) struct RemoteLink {
    spec: RemoteSpec,
    opened: tokio::sync::OnceCell<Result<Remote, String>>,
    /// This process's lease holder id.
    holder: String,
    /// Something was pushed: the lock is pushed as a root at the end.
    pub pushed: AtomicBool,
}

impl RemoteLink {
    pub fn new(spec: RemoteSpec) -> Self {
        RemoteLink { spec, opened: tokio::sync::OnceCell::new(), holder: crate::remote::lease::holder_id(), pushed: AtomicBool::new(false) }
    }

    /// The opened remote; the error (a bad setting, a missing bucket, an
    /// unreachable endpoint) ends the run as bad input.
    pub async fn get(&self) -> Result<&Remote, String> {
        let r = self
            .opened
            .get_or_init(|| async {
                let r = Remote::open(&self.spec).map_err(|e| e.to_string())?;
                r.check().await.map_err(|e| e.to_string())?;
                Ok(r)
            })
            .await;
        r.as_ref().map_err(|e| e.clone())
    }

    /// The remote if it was opened by this run (no request otherwise).
    pub fn opened(&self) -> Option<&Remote> {
        self.opened.get().and_then(|r| r.as_ref().ok())
    }
}

/// What the remote said about a key missing locally.
pub(crate) enum Before {
    /// Pulled (or computed by another runner meanwhile) and reused.
    Reused(Done),
    /// The lease is ours: run the stage.
    Run(LeaseKeeper),
}

fn short(key: &str) -> &str {
    key.get(..12).unwrap_or(key)
}

/// `STAGE: pulled key KEY12 from URL (N objects, X MB)`.
fn moved(eng: &Engine, stage: &ResolvedStage, verb: &str, key: &str, remote: &Remote, objects: usize, bytes: u64) {
    let dir = if verb == "pulled" { "from" } else { "to" };
    eng.note(&format!(
        "{}: {verb} key {} {dir} {} ({objects} objects, {})",
        stage.name,
        short(key),
        remote.url(),
        crate::remote::transfer::fmt_bytes(bytes)
    ));
}

/// Pulls `key` and reuses it; None when the remote has no usable entry.
async fn pull_reuse(eng: &Arc<Engine>, stage: &ResolvedStage, key: &str, remote: &Remote) -> Option<Done> {
    match remote.pull_key(&eng.store, key, &Progress::hidden()).await {
        Ok(PullOutcome::Pulled { objects, bytes, .. }) => {
            moved(eng, stage, "pulled", key, remote, objects, bytes);
            let (e2, st2, k2) = (eng.clone(), stage.clone(), key.to_string());
            let done = tokio::task::spawn_blocking(move || super::commit::try_reuse(&e2, &st2, &k2)).await.ok().flatten();
            if done.is_none() {
                eng.note(&format!("warning: stage `{}`: key {} pulled from the remote does not check out locally; the stage will run", stage.name, short(key)));
            }
            done
        }
        Ok(PullOutcome::Missing) => None,
        Ok(PullOutcome::Unusable(why)) => {
            eng.note(&format!("warning: stage `{}`: the remote's entry for key {} is not usable ({why}); the stage will run", stage.name, short(key)));
            None
        }
        Err(e) => {
            eng.note(&format!("warning: stage `{}`: cannot pull key {}: {e}; the stage will run here", stage.name, short(key)));
            None
        }
    }
}

/// Step 1 of the module doc: the opened remote and, unless forced, its
/// verified entry for `key`, reused. Err: the run must stop.
async fn pull_first<'l>(eng: &Arc<Engine>, link: &'l RemoteLink, stage: &ResolvedStage, key: &str, mode: Mode) -> Result<(&'l Remote, Option<Done>), String> {
    let remote = match link.get().await {
        Ok(r) => r,
        Err(msg) => {
            eng.set_fatal(&msg);
            return Err(msg);
        }
    };
    if mode != Mode::Force {
        if let Some(d) = pull_reuse(eng, stage, key, remote).await {
            return Ok((remote, Some(d)));
        }
        if mode == Mode::ReuseOnly {
            return Err("not built yet (neither here nor in the remote) and outside the selection (run it, or drop --only/--from)".into());
        }
    }
    Ok((remote, None))
}

/// Steps 1 and 2 of the module doc. Err: the run must stop (bad remote, or cancelled).
pub(crate) async fn before_run(eng: &Arc<Engine>, link: &RemoteLink, stage: &ResolvedStage, key: &str, mode: Mode) -> Result<Before, String> {
    let (remote, reused) = pull_first(eng, link, stage, key, mode).await?;
    if let Some(d) = reused {
        return Ok(Before::Reused(d));
    }
    let ttl = remote.spec().lease;
    let poll = (ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let mut watch = LeaseWatch::default();
    let mut said = false;
    loop {
        if eng.cancel.load(Ordering::SeqCst) {
            return Err("cancelled".into());
        }
        let attempt = match remote.try_lease(key, &link.holder, &mut watch).await {
            Ok(a) => a,
            Err(e) => {
                // The remote worked at the start of the run: a failing lease
                // request is transient; keep trying until cancelled.
                eng.note(&format!("warning: stage `{}`: lease on key {}: {e}; retrying", stage.name, short(key)));
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        match attempt {
            Acquire::Acquired(lease) => {
                let keeper = lease.keep();
                // The previous holder may have pushed the key and released
                // its lease since we looked: its record decides, not the lease.
                if mode != Mode::Force && matches!(remote.has_record(key).await, Ok(true)) {
                    if let Some(d) = pull_reuse(eng, stage, key, remote).await {
                        keeper.release().await;
                        return Ok(Before::Reused(d));
                    }
                }
                return Ok(Before::Run(keeper));
            }
            Acquire::Held { holder } => {
                if !said {
                    eng.note(&format!("{}: another runner ({holder}) is building key {}; waiting for its result or its lease to expire", stage.name, short(key)));
                    said = true;
                }
                if mode != Mode::Force && matches!(remote.has_record(key).await, Ok(true)) {
                    if let Some(d) = pull_reuse(eng, stage, key, remote).await {
                        return Ok(Before::Reused(d));
                    }
                }
                tokio::time::sleep(poll).await;
            }
        }
    }
}

/// Step 1 only, for an executor whose job takes the lease and pushes the
/// result itself (Slurm through the remote: [`super::executor::slurm`]).
/// None: the stage must run. Err: the run must stop.
pub(crate) async fn read_through(eng: &Arc<Engine>, link: &RemoteLink, stage: &ResolvedStage, key: &str, mode: Mode) -> Result<Option<Done>, String> {
    let (_, reused) = pull_first(eng, link, stage, key, mode).await?;
    if reused.is_none() {
        // The job pushes its result: the lock file becomes a root of the remote.
        link.pushed.store(true, Ordering::SeqCst);
    }
    Ok(reused)
}

/// Stops a stage whose lease was lost: its supervisor gets SIGTERM (and
/// stops the stage's whole process group).
pub(crate) fn stop_stage(eng: &Engine, stage: &str) {
    if let Some(pid) = eng.children.lock().unwrap_or_else(|e| e.into_inner()).get(stage) {
        // SAFETY: signals our own supervisor child.
        unsafe {
            libc::kill(*pid as i32, libc::SIGTERM);
        }
    }
}

/// Step 4: push the committed key, then release the lease.
pub(crate) async fn after_commit(eng: &Arc<Engine>, link: &RemoteLink, stage: &ResolvedStage, key: &str, keeper: LeaseKeeper) {
    if let Some(remote) = link.opened() {
        match remote.push_key(&eng.store, key, &Progress::hidden()).await {
            Ok(PushOutcome::Pushed { objects, bytes }) => {
                link.pushed.store(true, Ordering::SeqCst);
                moved(eng, stage, "pushed", key, remote, objects, bytes);
            }
            Ok(PushOutcome::AlreadyThere { .. }) => {}
            Ok(PushOutcome::Differs { .. }) => eng.note(&format!(
                "warning: stage `{}`: another runner's result for key {} reached the remote first, with other output bytes (the stage is not deterministic); the remote keeps that one",
                stage.name,
                short(key)
            )),
            Err(e) => eng.note(&format!("warning: stage `{}`: key {} not pushed ({e}); it is committed here, `recflow push` sends it later", stage.name, short(key))),
        }
    }
    keeper.release().await;
}

/// At the end of a run that pushed something: the lock file goes to the
/// remote as a root (what `gc --remote` keeps).
pub(crate) async fn push_lock_root(eng: &Engine, link: &RemoteLink) {
    if !link.pushed.load(Ordering::SeqCst) || !eng.write_lock {
        return;
    }
    let Some(remote) = link.opened() else { return };
    let lock = crate::lock::lock_path(&eng.p.file);
    if let Ok(text) = std::fs::read(&lock) {
        if let Err(e) = remote.push_root(&crate::cache::roots::root_id(&lock), &text).await {
            eng.note(&format!("warning: the lock file was not registered in the remote ({e}); `recflow push` does it"));
        }
    }
}
