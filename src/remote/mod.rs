//! The remote store: the local store's layout on S3 (or an S3-compatible
//! service) or a directory, through the `object_store` crate, so a key means
//! the same thing on every machine.
//!
//! Brief overview (what the runner, `recflow push`/`pull` and executors call):
//! * [`RemoteSpec`] — where the remote is: `RECFLOW_REMOTE` or `recflow.toml`
//!   `[remote]` ([`RemoteConfig`]), parsed and checked without any request.
//! * [`Remote`] — an opened remote ([`Remote::open`]; [`Remote::check`] makes
//!   the one request that tells a missing bucket or an unreachable endpoint).
//! * [`Remote::pull_key`] / [`Remote::push_key`] — one stage key: run record,
//!   manifests and objects, verified by hash on the way in; pushed objects
//!   first and the record last with a create-only write ([`transfer`]).
//! * [`Remote::try_lease`] → [`lease::Lease`] → [`lease::LeaseKeeper`] — the
//!   cross-machine per-key lease ([`lease`]).
//! * [`Remote::push_workdir`] / [`Remote::pull_workdir`] — a key's work dir
//!   (checkpoints), so a stage killed on one machine resumes on another
//!   ([`workdir`]).
//! * [`transfer::Progress`] — bytes and rate of a transfer, a bar on a
//!   terminal and plain lines without one.
//!
//! Layout under the remote's prefix (the local store's, ARCHITECTURE):
//! ```text
//! objects/AB/HEX        file contents and directory manifests (content-addressed)
//! records/KEY.json      run record, written once (create-only)
//! leases/KEY.json       a key's lease (holder, expiry), replaced by compare-and-swap
//! work/KEY.json         pointer to the tree of a key's work dir (checkpoints)
//! roots/locks/ID.json   a pushed lock file: the keys `gc --remote` keeps
//! ```
//! Secrets never pass through here: credentials come from the environment
//! or the SDK's credential chain inside `object_store`, and no credential is
//! printed, written to the store, the lock or a log.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::cache::CacheError;

mod config;
pub mod lease;
pub mod transfer;
pub mod workdir;

pub use config::{Location, RemoteConfig, RemoteSpec, REMOTE_ENV};
pub use lease::{Acquire, Lease, LeaseKeeper, LeaseWatch};
pub use transfer::{Progress, PullOutcome, PushOutcome};
pub use workdir::WorkSync;

/// Errors of the remote store. [`RemoteError::is_bad_input`] ones are the
/// user's to fix (exit 2); the rest are failed requests.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A setting is wrong: the message names the field, its value and what to do.
    #[error("{0}")]
    Config(String),
    /// The remote cannot be used at all (no such bucket, endpoint
    /// unreachable, credentials refused): the message says what to do.
    #[error("remote {remote}: {msg}")]
    Unusable { remote: String, msg: String },
    /// One request failed.
    #[error("remote {remote}: {what}: {source}")]
    Request {
        remote: String,
        what: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A key asked for is not in the local store.
    #[error("key {0} has no run record in the local store (run its stage first)")]
    NotLocal(String),
    /// A local object to push no longer hashes to its name.
    #[error("local object {hex} is corrupt (run `recflow cache verify`); nothing of key {key} was pushed after it")]
    LocalCorrupt { key: String, hex: String },
    /// Our lease on a key is gone: another runner took it over, or it could
    /// not be renewed before it expired.
    #[error("lost the remote lease on key {key}: {why}")]
    LeaseLost { key: String, why: String },
}

impl RemoteError {
    /// Bad input: a setting or a remote that cannot be used (exit 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, RemoteError::Config(_) | RemoteError::Unusable { .. })
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RemoteError + '_ {
    move |source| RemoteError::Io { path: path.to_path_buf(), source }
}

/// An opened remote. Cheap to clone (shared inside); every method is async
/// and must run inside a tokio runtime.
#[derive(Clone, Debug)]
pub struct Remote {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    spec: RemoteSpec,
    store: Arc<dyn ObjectStore>,
    /// The key prefix inside the bucket ("" for a directory remote).
    prefix: ObjPath,
    /// Object hexes found corrupt or truncated in the remote by this process:
    /// a later push rewrites them even though they exist.
    bad: Mutex<BTreeSet<String>>,
    /// Object hexes known to be in the remote (pushed or seen), so repeated
    /// pushes of a work dir do not ask again.
    present: Mutex<BTreeSet<String>>,
}

/// How long one request may take, and how often a failed one is retried:
/// short enough that an unreachable endpoint is reported in seconds, not
/// after object_store's default three minutes of retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_RETRIES: usize = 3;
const RETRY_TIMEOUT: Duration = Duration::from_secs(20);

impl Remote {
    /// Opens a remote. Makes no request (see [`Remote::check`]); fails only
    /// on settings the client rejects.
    pub fn open(spec: &RemoteSpec) -> Result<Remote, RemoteError> {
        let (store, prefix): (Arc<dyn ObjectStore>, ObjPath) = match &spec.location {
            Location::File { dir } => {
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|e| {
                    RemoteError::Config(format!("{}: {} cannot be used as a remote: {e}", spec.source, dir.display()))
                })?;
                (Arc::new(fs), ObjPath::default())
            }
            Location::S3 { bucket, prefix } => {
                use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
                // AWS_* variables first (credentials, session token, region,
                // endpoint), the project's settings over them.
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    // Explicit, whatever the environment says: leases rely on If-Match.
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    .with_retry(object_store::RetryConfig {
                        backoff: Default::default(),
                        max_retries: MAX_RETRIES,
                        retry_timeout: RETRY_TIMEOUT,
                    });
                let mut client = object_store::ClientOptions::new()
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT);
                if let Some(ep) = &spec.endpoint {
                    b = b.with_endpoint(ep);
                    if ep.starts_with("http://") {
                        client = client.with_allow_http(true);
                    }
                }
                if let Some(r) = &spec.region {
                    b = b.with_region(r);
                } else if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
                    b = b.with_region("us-east-1");
                }
                let s3 = b.with_client_options(client).build().map_err(|e| {
                    RemoteError::Config(format!("{}: the S3 client rejects these settings: {e}", spec.source))
                })?;
                (Arc::new(s3), ObjPath::from(prefix.as_str()))
            }
        };
        Ok(Remote {
            inner: Arc::new(Inner {
                spec: spec.clone(),
                store,
                prefix,
                bad: Mutex::new(BTreeSet::new()),
                present: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    /// The remote of a project (`RECFLOW_REMOTE`, else `ROOT/recflow.toml`),
    /// or None when none is configured. Makes no request.
    pub fn from_project(root: &Path) -> Result<Option<Remote>, RemoteError> {
        match RemoteSpec::from_project(root)? {
            Some(spec) => Ok(Some(Remote::open(&spec)?)),
            None => Ok(None),
        }
    }

    pub fn spec(&self) -> &RemoteSpec {
        &self.inner.spec
    }

    /// The remote's URL as configured (never holds a secret).
    pub fn url(&self) -> &str {
        &self.inner.spec.url
    }

    /// One listing of the prefix: tells a missing bucket, an unreachable
    /// endpoint or refused credentials apart, each with what to do
    /// ([`RemoteError::Unusable`]).
    pub async fn check(&self) -> Result<(), RemoteError> {
        let prefix = (!self.inner.prefix.as_ref().is_empty()).then_some(&self.inner.prefix);
        match self.inner.store.list_with_delimiter(prefix).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.classify(e, "listing the prefix")),
        }
    }

    /// Turns a failed request into an [`RemoteError::Unusable`] when the
    /// error says the remote cannot be used at all, else a request error.
    pub(crate) fn classify(&self, e: object_store::Error, what: &str) -> RemoteError {
        let text = error_chain(&e);
        let spec = &self.inner.spec;
        let remote = spec.url.clone();
        let endpoint = spec.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()).unwrap_or_else(|| "the AWS default endpoint".into());
        let msg = if text.contains("NoSuchBucket") || (matches!(spec.location, Location::S3 { .. }) && text.contains("The specified bucket does not exist")) {
            let bucket = match &spec.location {
                Location::S3 { bucket, .. } => bucket.clone(),
                Location::File { .. } => String::new(),
            };
            Some(format!(
                "bucket `{bucket}` does not exist at {endpoint}: create it (for example `aws s3 mb s3://{bucket}`), or fix the bucket in {}",
                spec.source
            ))
        } else if ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "status code: 403", "403 Forbidden"].iter().any(|s| text.contains(s)) {
            Some(
                "the service refused the credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment, or use the AWS credential chain (web identity, container or instance credentials)"
                    .to_string(),
            )
        } else if ["error sending request", "Connection refused", "dns error", "timed out", "tcp connect", "connection closed"].iter().any(|s| text.contains(s)) {
            Some(format!(
                "cannot reach {endpoint} ({}): check `endpoint` in recflow.toml's [remote] (or AWS_ENDPOINT_URL) and that the service is up",
                short_cause(&text)
            ))
        } else if text.contains("credential") || text.contains("Credential") {
            Some(format!(
                "no usable credentials ({}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, or use the AWS credential chain",
                short_cause(&text)
            ))
        } else {
            None
        };
        match msg {
            Some(msg) => RemoteError::Unusable { remote, msg },
            None => RemoteError::Request { remote, what: what.to_string(), source: e },
        }
    }

    /// A path under the remote's prefix.
    pub(crate) fn path(&self, rel: &str) -> ObjPath {
        let mut p = self.inner.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    pub(crate) fn object_loc(&self, hex: &str) -> ObjPath {
        let a = hex.get(..2).unwrap_or("00");
        self.path(&format!("objects/{a}/{hex}"))
    }
    pub(crate) fn record_loc(&self, key: &str) -> ObjPath {
        self.path(&format!("records/{key}.json"))
    }
    pub(crate) fn work_loc(&self, key: &str) -> ObjPath {
        self.path(&format!("work/{key}.json"))
    }
    pub(crate) fn root_loc(&self, id: &str) -> ObjPath {
        self.path(&format!("roots/locks/{id}.json"))
    }

    /// The part of an object path after the prefix (`records/KEY.json`).
    pub(crate) fn rel<'a>(&self, p: &'a ObjPath) -> Option<&'a str> {
        let s = p.as_ref();
        let pre = self.inner.prefix.as_ref();
        if pre.is_empty() {
            Some(s)
        } else {
            s.strip_prefix(pre).and_then(|r| r.strip_prefix('/'))
        }
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// The whole of a small object, or None when it does not exist.
    pub(crate) async fn get_small(&self, loc: &ObjPath, what: &str) -> Result<Option<(bytes::Bytes, object_store::ObjectMeta)>, RemoteError> {
        match self.inner.store.get(loc).await {
            Ok(r) => {
                let meta = r.meta.clone();
                let b = r.bytes().await.map_err(|e| self.classify(e, what))?;
                Ok(Some((b, meta)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.classify(e, what)),
        }
    }

    /// Every object under `rel` (a folder of the layout), with its metadata.
    pub(crate) async fn list(&self, rel: &str) -> Result<Vec<object_store::ObjectMeta>, RemoteError> {
        use futures::TryStreamExt;
        let p = self.path(rel);
        self.inner.store.list(Some(&p)).try_collect().await.map_err(|e| self.classify(e, &format!("listing {rel}")))
    }

    pub(crate) fn mark_bad(&self, hex: &str) {
        self.inner.bad.lock().unwrap_or_else(|e| e.into_inner()).insert(hex.to_string());
        self.inner.present.lock().unwrap_or_else(|e| e.into_inner()).remove(hex);
    }
    pub(crate) fn is_bad(&self, hex: &str) -> bool {
        self.inner.bad.lock().unwrap_or_else(|e| e.into_inner()).contains(hex)
    }
    pub(crate) fn clear_bad(&self, hex: &str) {
        self.inner.bad.lock().unwrap_or_else(|e| e.into_inner()).remove(hex);
    }
    pub(crate) fn known_present(&self, hex: &str) -> bool {
        self.inner.present.lock().unwrap_or_else(|e| e.into_inner()).contains(hex)
    }
    pub(crate) fn note_present(&self, hex: &str) {
        self.inner.present.lock().unwrap_or_else(|e| e.into_inner()).insert(hex.to_string());
    }

    /// Uploads a project's lock file as a root of the remote (what
    /// `gc --remote` keeps). `id` names the project's lock (see
    /// [`crate::cache::roots::root_id`]); the same id overwrites its last copy.
    pub async fn push_root(&self, id: &str, lock_text: &[u8]) -> Result<(), RemoteError> {
        let loc = self.root_loc(id);
        self.inner
            .store
            .put(&loc, bytes::Bytes::copy_from_slice(lock_text).into())
            .await
            .map_err(|e| self.classify(e, "writing a root"))?;
        Ok(())
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The innermost part of an error chain, for a short "(…)".
fn short_cause(text: &str) -> String {
    let last = text.rsplit(": ").next().unwrap_or(text).trim();
    last.chars().take(160).collect()
}

/// Unix milliseconds now (lease expiries).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
