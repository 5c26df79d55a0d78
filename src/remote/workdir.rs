//! Files that are not (yet) a stage's outputs, for executors that run a
//! stage on a machine without the submitting machine's disk: a key's work
//! dir (checkpoints, journals), so a stage killed on one node resumes on
//! another with an empty local store, and any file or directory (a job's
//! spec, a raw input) by its content id.
//!
//! * [`Remote::push_content`] / [`Remote::fetch_content`]: a file or
//!   directory as ordinary content-addressed objects (a directory through
//!   the store's [`Manifest`]), named by its content id (`sha256:…` /
//!   `tree:…`); only what the remote lacks is sent, every byte fetched is
//!   verified. Objects no record or work dir names are kept by `gc --remote`
//!   only while younger than its `--keep-days`.
//! * [`Remote::push_workdir`]: `push_content` of the dir, then the pointer
//!   `work/KEY.json` is replaced — last, so a push killed half-way leaves the
//!   previous checkpoint whole. Call it after each checkpoint save (cheap
//!   when little changed: files are hashed through the given stat cache,
//!   objects known to be there are not asked for again).
//! * [`Remote::pull_workdir`]: before resuming a key whose local work dir is
//!   empty; [`Remote::drop_workdir`] once the key's run record is committed.
use std::path::Path;

use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::transfer::Progress;
use super::{io_err, Remote, RemoteError};
use crate::cache::hash::{self, Entry, Manifest};
use crate::cache::StatCache;

/// `work/KEY.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pointer {
    key: String,
    /// `tree:HEX` of the work dir's manifest.
    tree: String,
}

/// What a content or work dir sync moved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkSync {
    /// Files in the content (1 for a file).
    pub files: usize,
    /// Files (objects) transferred this time.
    pub transferred: usize,
    pub bytes: u64,
}

impl Remote {
    /// Uploads a file or directory (absent: an empty directory) as objects;
    /// returns its content id and what was sent. `key` only names the
    /// stage in errors.
    pub async fn push_content(&self, key: &str, path: &Path, sc: &mut StatCache) -> Result<(String, WorkSync), RemoteError> {
        use std::os::unix::fs::PermissionsExt;
        let progress = Progress::hidden();
        let mut sync = WorkSync::default();
        if path.is_file() {
            let h = sc.hash_file(path).map_err(io_err(path))?;
            let size = std::fs::metadata(path).map_err(io_err(path))?.len();
            sync.files = 1;
            if self.send_new(key, &h, path, size, &progress).await? {
                sync.transferred = 1;
                sync.bytes = size;
            }
            return Ok((format!("sha256:{h}"), sync));
        }
        let mut m = Manifest::default();
        let mut files = Vec::new();
        if path.is_dir() {
            for (rel, p) in hash::walk_files(path).map_err(io_err(path))? {
                let md = std::fs::metadata(&p).map_err(io_err(&p))?;
                let h = sc.hash_file(&p).map_err(io_err(&p))?;
                m.entries.push(Entry { path: rel, hash: h.clone(), size: md.len(), exec: md.permissions().mode() & 0o111 != 0 });
                files.push((h, p, md.len()));
            }
        }
        m.entries.sort();
        sync.files = m.entries.len();
        files.sort();
        files.dedup_by(|a, b| a.0 == b.0);
        for (h, p, size) in &files {
            if self.send_new(key, h, p, *size, &progress).await? {
                sync.transferred += 1;
                sync.bytes += size;
            }
        }
        let id = m.id();
        let mhex = hash::hex_of(&id).to_string();
        if !self.known_present(&mhex) {
            self.store()
                .put(&self.object_loc(&mhex), bytes::Bytes::from(m.bytes()).into())
                .await
                .map_err(|e| self.classify(e, "writing a manifest"))?;
            self.note_present(&mhex);
        }
        Ok((id, sync))
    }

    /// Writes content `id` at `dest` (a file, or a directory created as
    /// needed): files whose content differs are fetched, verified and
    /// renamed into place; files of `dest` the content does not list are
    /// left alone. None when the remote lacks a part of it or holds one that
    /// does not verify (nothing unverified is written).
    pub async fn fetch_content(&self, id: &str, dest: &Path) -> Result<Option<WorkSync>, RemoteError> {
        let entries: Vec<Entry> = if hash::is_tree(id) {
            let mhex = hash::hex_of(id).to_string();
            let Some((mb, _)) = self.get_small(&self.object_loc(&mhex), "reading a manifest").await? else { return Ok(None) };
            if hash::sha256_hex(&mb) != mhex {
                self.mark_bad(&mhex);
                return Ok(None);
            }
            let Ok(m) = serde_json::from_slice::<Manifest>(&mb) else { return Ok(None) };
            std::fs::create_dir_all(dest).map_err(io_err(dest))?;
            m.entries
        } else {
            vec![Entry { path: String::new(), hash: hash::hex_of(id).to_string(), size: 0, exec: false }]
        };
        let mut sync = WorkSync { files: entries.len(), ..Default::default() };
        for e in &entries {
            if e.path.split('/').any(|p| p == "." || p == "..") || (hash::is_tree(id) && e.path.split('/').any(str::is_empty)) {
                return Err(RemoteError::Config(format!("remote content {id} names a path outside its directory: {}", e.path)));
            }
            let to = if e.path.is_empty() { dest.to_path_buf() } else { dest.join(&e.path) };
            if to.is_file() && hash::hash_file(&to).map(|h| h == e.hash).unwrap_or(false) {
                continue;
            }
            let parent = to.parent().unwrap_or(Path::new(".")).to_path_buf();
            std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
            let got = match self.store().get(&self.object_loc(&e.hash)).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(err) => return Err(self.classify(err, "fetching an object")),
            };
            let tmp = parent.join(format!(".{}.fetch.{}", e.hash.get(..12).unwrap_or("x"), std::process::id()));
            let (h, n) = self.stream_to_file(got, &tmp, &Progress::hidden()).await?;
            if h != e.hash {
                let _ = std::fs::remove_file(&tmp);
                self.mark_bad(&e.hash);
                return Ok(None);
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = if e.exec { 0o755 } else { 0o644 };
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
            crate::cache::store::remove_any(&to);
            std::fs::rename(&tmp, &to).map_err(io_err(&to))?;
            sync.transferred += 1;
            sync.bytes += n;
        }
        Ok(Some(sync))
    }

    /// Uploads `dir` as the work dir of `key` (see the module doc).
    pub async fn push_workdir(&self, key: &str, dir: &Path, sc: &mut StatCache) -> Result<WorkSync, RemoteError> {
        let (tree, sync) = if dir.is_dir() {
            self.push_content(key, dir, sc).await?
        } else {
            // Absent: an empty work dir (a manifest with no files).
            self.push_content(key, &dir.join(".recflow-absent"), sc).await?
        };
        let ptr = serde_json::to_vec(&Pointer { key: key.to_string(), tree }).unwrap_or_default();
        self.store().put(&self.work_loc(key), bytes::Bytes::from(ptr).into()).await.map_err(|e| self.classify(e, "writing a work dir pointer"))?;
        Ok(sync)
    }

    /// Writes the remote work dir of `key` into `dir` (see
    /// [`Remote::fetch_content`]). None when the remote has no usable work
    /// dir for the key: the stage then starts from what `dir` holds.
    pub async fn pull_workdir(&self, key: &str, dir: &Path) -> Result<Option<WorkSync>, RemoteError> {
        let Some((b, _)) = self.get_small(&self.work_loc(key), "reading a work dir pointer").await? else { return Ok(None) };
        let Ok(ptr) = serde_json::from_slice::<Pointer>(&b) else { return Ok(None) };
        if ptr.key != key || !hash::is_tree(&ptr.tree) {
            return Ok(None);
        }
        self.fetch_content(&ptr.tree, dir).await
    }

    /// Removes the work dir pointer of `key` (its files stay until
    /// `gc --remote`: objects may be shared with other keys).
    pub async fn drop_workdir(&self, key: &str) -> Result<(), RemoteError> {
        match self.store().delete(&self.work_loc(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.classify(e, "removing a work dir pointer")),
        }
    }
}
