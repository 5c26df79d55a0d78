//! Helpers for the engine's integration tests: a temp project (with a
//! `recflow.toml`, so it is its own project root and store), and the real
//! `recflow` binary run inside it.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_recflow");

pub struct Proj {
    pub dir: tempfile::TempDir,
}

impl Proj {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("recflow.toml"), "").expect("write recflow.toml");
        Proj { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        // Outputs may be read-only links into the store: replace, never write through.
        let _ = std::fs::remove_file(&p);
        std::fs::write(p, text).expect("write");
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).current_dir(self.dir.path()).env_remove("RECFLOW_CACHE").env_remove("RECFLOW_WORKER");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("start recflow")
    }

    /// Runs and asserts exit 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "`recflow {}` must succeed; stderr:\n{}\nstdout:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// How many times a stage that appends to `.count_NAME` has run.
    pub fn count(&self, name: &str) -> usize {
        self.read(&format!(".count_{name}")).lines().count()
    }

    /// Every file under the project (store included), for content scans.
    pub fn all_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }
}

/// Polls `f` until true or the deadline; returns whether it became true.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Pids whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        // Zombies have an empty cmdline and are not alive in any useful sense.
        if cmd.contains(needle) && pid != std::process::id() {
            v.push(pid);
        }
    }
    v
}

/// Files under `dir` whose bytes contain `needle`.
pub fn files_containing(files: &[PathBuf], needle: &str) -> Vec<PathBuf> {
    files
        .iter()
        .filter(|p| std::fs::read(p).map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())).unwrap_or(false))
        .cloned()
        .collect()
}

pub fn store_objects(root: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(root.join("cache/objects")).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            v.push(f.path());
        }
    }
    v
}
