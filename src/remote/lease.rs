//! The cross-machine per-key lease: one object `leases/KEY.json` naming its
//! holder and expiry, changed only by compare-and-swap, so of two runners
//! on different machines (separate local stores, one remote) one computes a
//! key and the other waits, then pulls its result.
//!
//! * **Acquire**: create-only write when there is none; when there is one
//!   that is released or expired, a conditional replace of exactly the
//!   version read (S3: `If-Match` on its ETag, `S3ConditionalPut::ETagMatch`
//!   set explicitly in [`super::Remote::open`]). A lost race re-reads.
//! * **Renew** every third of the lifetime by the same conditional replace
//!   ([`LeaseKeeper`]). A renewal that finds another version means the lease
//!   was taken over; a holder that cannot renew before its lease would lapse
//!   stops too. Either way [`LeaseKeeper::lost`] fires and the runner stops
//!   the stage: a holder never works on past its lease.
//! * **Expiry** is judged without trusting clocks across machines: a waiter
//!   takes over when the lease's version has not changed for a whole
//!   lifetime by its own monotonic clock ([`LeaseWatch`]), or when the
//!   holder's written expiry is older than one more lifetime by the wall
//!   clock (clock skew up to a lifetime tolerated), or when it was released.
//! * A holder that lost its lease and still finishes loses to the
//!   create-only run record ([`super::Remote::push_key`]).
//!
//! `object_store`'s local file system backend has no conditional replace, so
//! `file://` remotes get their own compare-and-swap: the lease file is
//! replaced (temp + rename) under an `flock` of `leases/KEY.json.lck`, its
//! version being the sha256 of its bytes.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use object_store::{PutMode, PutOptions, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::{now_ms, Location, Remote, RemoteError};
use crate::cache::locks::FileLock;

/// The content of a lease object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseBody {
    pub key: String,
    /// `HOST:PID:NONCE` of the holder.
    pub holder: String,
    /// Lifetime without renewal, ms.
    pub ttl_ms: u64,
    /// Holder's wall clock at the last write + ttl (advisory across machines).
    pub expires_unix_ms: u64,
    /// Writes by this holder (each renewal makes a new version).
    pub renewals: u64,
    /// Given back: anyone may take it.
    #[serde(default)]
    pub released: bool,
}

/// A version of a lease object: the S3 ETag (and version id), or for a
/// directory remote the sha256 of the file's bytes.
#[derive(Debug, Clone, PartialEq)]
enum Version {
    Object(UpdateVersion),
    File(String),
}

impl Version {
    fn tag(&self) -> String {
        match self {
            Version::Object(v) => format!("{:?}/{:?}", v.e_tag, v.version),
            Version::File(h) => h.clone(),
        }
    }
}

/// Whether a conditional write went through.
enum Cas {
    Done(Version),
    Conflict,
}

/// What [`Remote::try_lease`] found.
#[derive(Debug)]
pub enum Acquire {
    /// The lease is ours (newly created, or taken over from an expired or released one).
    Acquired(Lease),
    /// Someone else holds it; `holder` names them (for messages).
    Held { holder: String },
}

/// A waiter's memory of a lease it does not hold: which version it saw
/// first and when (by its own monotonic clock). One per key being waited on.
#[derive(Debug, Default)]
pub struct LeaseWatch {
    seen: Option<(String, Instant)>,
}

/// A held lease. Renew it ([`Lease::renew`]) or hand it to a
/// [`LeaseKeeper`], which renews it in the background.
#[derive(Debug)]
pub struct Lease {
    remote: Remote,
    key: String,
    body: LeaseBody,
    version: Version,
    ttl: Duration,
    /// When the last successful write was *sent* (a waiter can only have
    /// seen it later): the lease is ours until `last_ok + ttl`.
    last_ok: Instant,
}

/// `HOST:PID:NONCE` for this process.
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    let nonce: u64 = rand::random();
    format!("{host}:{}:{nonce:016x}", std::process::id())
}

fn leases_dir(dir: &Path) -> PathBuf {
    dir.join("leases")
}

impl Remote {
    fn lease_rel(key: &str) -> String {
        format!("leases/{key}.json")
    }

    /// Reads a lease: its body (None when it does not parse) and version.
    async fn lease_read(&self, key: &str) -> Result<Option<(Option<LeaseBody>, Version)>, RemoteError> {
        match &self.spec().location {
            Location::File { dir } => {
                let p = leases_dir(dir).join(format!("{key}.json"));
                match std::fs::read(&p) {
                    Ok(b) => Ok(Some((serde_json::from_slice(&b).ok(), Version::File(crate::cache::hash::sha256_hex(&b))))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(RemoteError::Io { path: p, source: e }),
                }
            }
            Location::S3 { .. } => {
                let Some((b, meta)) = self.get_small(&self.path(&Self::lease_rel(key)), "reading a lease").await? else { return Ok(None) };
                let v = Version::Object(UpdateVersion { e_tag: meta.e_tag, version: meta.version });
                Ok(Some((serde_json::from_slice(&b).ok(), v)))
            }
        }
    }

    /// Writes a lease if it is still at `expect` (None: only if absent).
    async fn lease_cas(&self, key: &str, body: &LeaseBody, expect: Option<&Version>) -> Result<Cas, RemoteError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        match &self.spec().location {
            Location::File { dir } => {
                let (dir, key, expect) = (leases_dir(dir), key.to_string(), expect.cloned());
                let path = dir.clone();
                tokio::task::spawn_blocking(move || file_cas(&dir, &key, &bytes, expect.as_ref()))
                    .await
                    .map_err(|e| RemoteError::Io { path, source: std::io::Error::other(e.to_string()) })?
            }
            Location::S3 { .. } => {
                let mode = match expect {
                    None => PutMode::Create,
                    Some(Version::Object(v)) => PutMode::Update(v.clone()),
                    Some(Version::File(_)) => return Ok(Cas::Conflict),
                };
                let opts = PutOptions { mode, ..Default::default() };
                match self.store().put_opts(&self.path(&Self::lease_rel(key)), bytes::Bytes::from(bytes).into(), opts).await {
                    Ok(r) => Ok(Cas::Done(Version::Object(UpdateVersion { e_tag: r.e_tag, version: r.version }))),
                    Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => Ok(Cas::Conflict),
                    Err(e) => Err(self.classify(e, "writing a lease")),
                }
            }
        }
    }

    /// One attempt to take the lease on `key` for `holder` ([`holder_id`]).
    /// `watch` carries what this waiter saw of the lease before.
    pub async fn try_lease(&self, key: &str, holder: &str, watch: &mut LeaseWatch) -> Result<Acquire, RemoteError> {
        let ttl = self.spec().lease;
        loop {
            let current = self.lease_read(key).await?;
            let expect = match &current {
                None => None,
                Some((body, version)) => {
                    let tag = version.tag();
                    let since = match &watch.seen {
                        Some((t, at)) if *t == tag => *at,
                        _ => {
                            watch.seen = Some((tag, Instant::now()));
                            Instant::now()
                        }
                    };
                    let free = match body {
                        // Unreadable lease: treated like a silent holder (expires by the watch).
                        None => since.elapsed() > ttl,
                        Some(b) => {
                            b.released
                                || since.elapsed() > ttl
                                || b.expires_unix_ms.saturating_add(b.ttl_ms) < now_ms()
                        }
                    };
                    if !free {
                        let who = body.as_ref().map(|b| b.holder.clone()).unwrap_or_else(|| "an unreadable lease".into());
                        return Ok(Acquire::Held { holder: who });
                    }
                    Some(version.clone())
                }
            };
            let body = LeaseBody {
                key: key.to_string(),
                holder: holder.to_string(),
                ttl_ms: ttl.as_millis() as u64,
                expires_unix_ms: now_ms() + ttl.as_millis() as u64,
                renewals: 0,
                released: false,
            };
            let sent = Instant::now();
            match self.lease_cas(key, &body, expect.as_ref()).await? {
                Cas::Done(version) => {
                    watch.seen = None;
                    return Ok(Acquire::Acquired(Lease { remote: self.clone(), key: key.to_string(), body, version, ttl, last_ok: sent }));
                }
                // Someone else wrote in between: look again.
                Cas::Conflict => continue,
            }
        }
    }
}

impl Lease {
    pub fn key(&self) -> &str {
        &self.key
    }
    pub fn holder(&self) -> &str {
        &self.body.holder
    }
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
    /// Until when (monotonic) the lease is surely ours without another renewal.
    pub fn deadline(&self) -> Instant {
        self.last_ok + self.ttl
    }

    /// Renews once. `LeaseLost` when another version is there (taken over);
    /// other errors are failed requests (the caller may retry until
    /// [`Lease::deadline`]).
    pub async fn renew(&mut self) -> Result<(), RemoteError> {
        let mut next = self.body.clone();
        next.renewals += 1;
        next.expires_unix_ms = now_ms() + self.ttl.as_millis() as u64;
        let sent = Instant::now();
        match self.remote.lease_cas(&self.key, &next, Some(&self.version)).await? {
            Cas::Done(v) => {
                self.version = v;
                self.body = next;
                self.last_ok = sent;
                Ok(())
            }
            Cas::Conflict => {
                // A renewal whose reply was lost (or whose wait timed out)
                // may have gone through: nobody else writes our holder id,
                // so a lease naming us, not released, is still ours.
                if let Some((Some(b), v)) = self.remote.lease_read(&self.key).await? {
                    if b.holder == self.body.holder && !b.released {
                        self.version = v;
                        self.body = b;
                        return Ok(());
                    }
                    return Err(RemoteError::LeaseLost { key: self.key.clone(), why: format!("{} took it over", b.holder) });
                }
                Err(RemoteError::LeaseLost { key: self.key.clone(), why: "the lease object was removed".into() })
            }
        }
    }

    /// Gives the lease back (marks it released, if it is still ours).
    pub async fn release(self) {
        let mut b = self.body.clone();
        b.released = true;
        b.renewals += 1;
        let _ = self.remote.lease_cas(&self.key, &b, Some(&self.version)).await;
    }

    /// Renews in the background every third of the lifetime until released
    /// or lost (see [`LeaseKeeper`]).
    pub fn keep(self) -> LeaseKeeper {
        let (lost_tx, lost_rx) = tokio::sync::watch::channel(None::<String>);
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut lease = self;
            let period = lease.ttl / 3;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = &mut stop_rx => return Some(lease),
                }
                // Retry a failed renewal until the lease would lapse; stop
                // with margin before a waiter could take it over.
                let give_up = lease.deadline() - lease.ttl / 10;
                loop {
                    let attempt = tokio::time::timeout(period.max(Duration::from_millis(200)), lease.renew()).await;
                    match attempt {
                        Ok(Ok(())) => break,
                        Ok(Err(RemoteError::LeaseLost { why, .. })) => {
                            let _ = lost_tx.send(Some(why));
                            return None;
                        }
                        Ok(Err(_)) | Err(_) => {
                            if Instant::now() >= give_up {
                                let _ = lost_tx.send(Some(format!(
                                    "could not renew it within its lifetime of {:.1} s",
                                    lease.ttl.as_secs_f64()
                                )));
                                return None;
                            }
                            tokio::time::sleep((lease.ttl / 20).max(Duration::from_millis(50))).await;
                        }
                    }
                }
            }
        });
        LeaseKeeper { lost: lost_rx, stop: Some(stop_tx), task: Some(task) }
    }
}

/// A lease renewed in the background. [`LeaseKeeper::lost`] resolves (with
/// the reason) when the lease is lost; [`LeaseKeeper::release`] stops the
/// renewals and gives it back.
#[derive(Debug)]
pub struct LeaseKeeper {
    lost: tokio::sync::watch::Receiver<Option<String>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Option<Lease>>>,
}

impl LeaseKeeper {
    /// Resolves when the lease is lost, with why; never while it is held.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                // The keeper ended without a loss (released): wait forever.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether the lease is already lost (and why).
    pub fn is_lost(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Stops renewing and releases the lease (if it is still ours).
    pub async fn release(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            if let Ok(Some(lease)) = t.await {
                lease.release().await;
            }
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        // Dropped without release (an error path): stop renewing; the lease
        // expires by itself.
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Compare-and-swap of a lease file under an `flock` of its `.lck` file:
/// write (temp + rename) only when the current bytes hash to `expect`
/// (None: only when there is no file).
fn file_cas(dir: &Path, key: &str, bytes: &[u8], expect: Option<&Version>) -> Result<Cas, RemoteError> {
    let path = dir.join(format!("{key}.json"));
    let lck = dir.join(format!("{key}.json.lck"));
    let _g = FileLock::exclusive(&lck).map_err(|e| RemoteError::Io { path: lck.clone(), source: e })?;
    let current = match std::fs::read(&path) {
        Ok(b) => Some(crate::cache::hash::sha256_hex(&b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(RemoteError::Io { path, source: e }),
    };
    let expected = match expect {
        None => None,
        Some(Version::File(h)) => Some(h.clone()),
        Some(Version::Object(_)) => return Ok(Cas::Conflict),
    };
    if current != expected {
        return Ok(Cas::Conflict);
    }
    // Replaced by rename (readers see the old or the new bytes), without
    // fsync: a lease need not survive a crash (it expires), and an fsync
    // stuck behind other writes would delay a renewal.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(".{key}.{}.{}.tmp", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        RemoteError::Io { path: path.clone(), source: e }
    })?;
    Ok(Cas::Done(Version::File(crate::cache::hash::sha256_hex(bytes))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::RemoteSpec;

    fn file_remote(dir: &Path, lease_s: f64) -> Remote {
        let cfg = crate::remote::RemoteConfig { url: format!("file://{}", dir.display()), endpoint: None, region: None, lease_s: Some(lease_s), jobs: None };
        let spec = RemoteSpec::resolve(Some(&cfg), None, Path::new("recflow.toml")).unwrap().unwrap();
        Remote::open(&spec).unwrap()
    }

    /// The file:// lease mechanism on its own: exclusive, renewable, lost
    /// when taken over, taken over only once expired, released for all.
    #[tokio::test(flavor = "current_thread")]
    async fn file_lease_is_exclusive_expires_and_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let r = file_remote(d.path(), 0.6);
        let (mut wa, mut wb) = (LeaseWatch::default(), LeaseWatch::default());
        let Acquire::Acquired(mut a) = r.try_lease("k1", "A", &mut wa).await.unwrap() else { panic!("a free key is acquired") };
        match r.try_lease("k1", "B", &mut wb).await.unwrap() {
            Acquire::Held { holder } => assert_eq!(holder, "A", "a live lease names its holder"),
            Acquire::Acquired(_) => panic!("a live lease is never granted twice"),
        }
        a.renew().await.expect("the holder renews");
        // B keeps watching; A stops renewing: after one lifetime without a
        // new version, B takes over.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(matches!(r.try_lease("k1", "B", &mut wb).await.unwrap(), Acquire::Held { .. }), "not expired yet");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let Acquire::Acquired(b) = r.try_lease("k1", "B", &mut wb).await.unwrap() else { panic!("an expired lease is taken over") };
        match a.renew().await {
            Err(RemoteError::LeaseLost { why, .. }) => assert!(why.contains("B took it over"), "{why}"),
            other => panic!("the old holder's renewal must fail as lost: {other:?}"),
        }
        b.release().await;
        let Acquire::Acquired(_) = r.try_lease("k1", "C", &mut LeaseWatch::default()).await.unwrap() else {
            panic!("a released lease is free at once")
        };
    }

    /// A stale lease written long ago (holder's expiry far in the past) is
    /// taken over at once, without waiting a lifetime.
    #[tokio::test(flavor = "current_thread")]
    async fn long_expired_lease_is_taken_at_once() {
        let d = tempfile::tempdir().unwrap();
        let r = file_remote(d.path(), 30.0);
        let old = LeaseBody { key: "k".into(), holder: "gone:1:0".into(), ttl_ms: 30_000, expires_unix_ms: now_ms() - 3_600_000, renewals: 4, released: false };
        std::fs::create_dir_all(d.path().join("leases")).unwrap();
        std::fs::write(d.path().join("leases/k.json"), serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(matches!(r.try_lease("k", "A", &mut LeaseWatch::default()).await.unwrap(), Acquire::Acquired(_)));
    }

    /// The keeper renews at a third of the lifetime and reports a loss.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeper_renews_and_reports_a_takeover() {
        let d = tempfile::tempdir().unwrap();
        let r = file_remote(d.path(), 0.6);
        let Acquire::Acquired(a) = r.try_lease("k", "A", &mut LeaseWatch::default()).await.unwrap() else { panic!() };
        let keeper = a.keep();
        let p = d.path().join("leases/k.json");
        let first = std::fs::read(&p).unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(keeper.is_lost().is_none(), "a renewed lease is not lost");
        assert_ne!(std::fs::read(&p).unwrap(), first, "renewals write new versions");
        // Another runner steals it (as a takeover would).
        let thief = LeaseBody { key: "k".into(), holder: "thief".into(), ttl_ms: 600, expires_unix_ms: now_ms() + 60_000, renewals: 0, released: false };
        crate::util::write_atomic(&p, &serde_json::to_vec(&thief).unwrap()).unwrap();
        // (A bound, not a timing claim: the loss is seen at the next renewal.)
        let why = tokio::time::timeout(Duration::from_secs(20), keeper.lost()).await.expect("the loss is noticed at a renewal");
        assert!(why.contains("thief"), "{why}");
    }
}
