//! `recflow status` and `recflow explain`: compare what the pipeline would
//! key now with what the lock file recorded. Works without the data (an
//! absent input's recorded id is trusted, and the report says so) and on
//! another machine (configs, code versions, input ids — never outputs).
use std::collections::BTreeMap;

use serde::Serialize;

use super::{key_inputs, Avail, Available, KeyState, RunError};
use crate::cache::key::{describe_field, diff, FieldDiff};
use crate::cache::StatCache;
use crate::lock::{lock_path, LockFile};
use crate::pipeline::resolved::Action;
use crate::pipeline::Pipeline;

#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub up_to_date: bool,
    /// Why the stage is stale (empty when up to date).
    pub reasons: Vec<String>,
    /// Inputs absent here whose recorded hashes were trusted.
    pub trusted: Vec<String>,
    /// Key-input fields that differ from the lock.
    pub changes: Vec<FieldDiff>,
    /// Lock entry of another stage with this very key (a rename).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_key_as: Option<String>,
    /// The lock's outputs were produced under another numerics profile than
    /// this machine's: how they differ (not staleness; `--check` ignores it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numerics_differs: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub pipeline: String,
    pub lock: String,
    pub stages: Vec<StageStatus>,
}

impl Status {
    pub fn stale(&self) -> usize {
        self.stages.iter().filter(|s| !s.up_to_date).count()
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        for st in &self.stages {
            if st.up_to_date {
                s.push_str(&format!("{}: up to date", st.stage));
            } else {
                s.push_str(&format!("{}: STALE — {}", st.stage, st.reasons.join("; ")));
            }
            if !st.trusted.is_empty() {
                s.push_str(&format!(" (trusted recorded hashes of absent {})", st.trusted.join(", ")));
            }
            if let Some(d) = &st.numerics_differs {
                s.push_str(&format!(
                    "\n  numerics: the lock was produced under another profile ({d}); `verify` compares metrics within tolerance, not bytes"
                ));
            }
            s.push('\n');
        }
        s.push_str(&format!("{} of {} stages stale\n", self.stale(), self.stages.len()));
        s
    }
}

/// Status of every stage against the lock file.
pub fn status(p: &Pipeline) -> Result<Status, RunError> {
    let lp = lock_path(&p.file);
    let lock = LockFile::read(&lp)?;
    let store_dir = crate::cache::store_dir(&p.root);
    let mut sc = StatCache::load(&store_dir);
    let mut avail: Available = BTreeMap::new();
    let mut up: BTreeMap<String, bool> = BTreeMap::new();
    let mut out = Vec::new();
    // This machine's profile as the runner can predict it (torch's version unknown).
    let here = crate::numerics::Request::from_env().unwrap_or(crate::numerics::Request::DEFAULT).resolve().predict();
    for s in &p.stages {
        let entry = lock.stages.get(&s.name);
        let mut st = StageStatus {
            stage: s.name.clone(),
            up_to_date: false,
            reasons: vec![],
            trusted: vec![],
            changes: vec![],
            same_key_as: None,
            numerics_differs: entry.and_then(|e| e.numerics.as_ref()).and_then(|l| {
                let d = l.differences(&here);
                (!d.is_empty()).then(|| d.join(", "))
            }),
        };
        let stale_up: Vec<&String> = s.deps.iter().filter(|d| !up.get(*d).copied().unwrap_or(false)).collect();
        if !stale_up.is_empty() {
            st.reasons.push(format!("upstream {} stale", stale_up.iter().map(|x| format!("`{x}`")).collect::<Vec<_>>().join(", ")));
        }
        match key_inputs(s, &avail, &mut sc, entry)? {
            KeyState::Unknown(why) => {
                if st.reasons.is_empty() {
                    st.reasons.push(why);
                }
            }
            KeyState::Known { ki, trusted, .. } => {
                st.trusted = trusted;
                let key = ki.key()?;
                match entry {
                    None => {
                        st.reasons.push("not in the lock file (never run)".into());
                        if let Some((other, _)) = lock.stages.iter().find(|(_, l)| l.key == key) {
                            st.reasons.push(format!("same key as former stage `{other}` (renamed? its outputs will be reused)"));
                            st.same_key_as = Some(other.clone());
                        }
                    }
                    Some(l) if l.key == key => {
                        st.up_to_date = true;
                        let a = l
                            .outputs
                            .iter()
                            .map(|(n, o)| {
                                let path = match &s.action {
                                    Action::Builtin { .. } => store_dir.join("out").join(&key).join(&o.path),
                                    Action::Shell { .. } => p.dir.join(&o.path),
                                };
                                (n.clone(), Avail { id: o.id.clone(), path })
                            })
                            .collect();
                        avail.insert(s.name.clone(), a);
                    }
                    Some(l) => {
                        st.changes = diff(&l.key_inputs, &ki);
                        for c in &st.changes {
                            st.reasons.push(format!("{} changed", describe_field(&c.field)));
                        }
                        if st.changes.is_empty() {
                            st.reasons.push("key differs from the lock".into());
                        }
                    }
                }
            }
        }
        up.insert(s.name.clone(), st.up_to_date);
        out.push(st);
    }
    Ok(Status { pipeline: p.name.clone(), lock: lp.display().to_string(), stages: out })
}

/// `explain STAGE`: field-by-field difference of the key inputs against the
/// last run (the lock entry, or the run record of its key).
pub fn explain(p: &Pipeline, stage: &str) -> Result<String, RunError> {
    let targets = p.select(stage);
    if targets.is_empty() {
        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        return Err(RunError::BadInput(format!("no stage `{stage}` in {} (stages: {})", p.file.display(), names.join(", "))));
    }
    let st = status(p)?;
    let lock = LockFile::read(&lock_path(&p.file))?;
    let mut out = String::new();
    for t in targets {
        let s = st.stages.iter().find(|x| x.stage == t.name).expect("status covers every stage");
        let key = lock.stages.get(&t.name).map(|l| l.key.clone());
        if s.up_to_date {
            out.push_str(&format!(
                "{}: up to date — key {} matches the last run\n",
                t.name,
                key.as_deref().map(|k| k.get(..12).unwrap_or(k)).unwrap_or("?")
            ));
            continue;
        }
        out.push_str(&format!("{}: would run because:\n", t.name));
        if s.changes.is_empty() {
            for r in &s.reasons {
                out.push_str(&format!("  - {r}\n"));
            }
        }
        for c in &s.changes {
            out.push_str(&format!(
                "  - {}: {} → {}\n",
                describe_field(&c.field),
                c.old.as_deref().unwrap_or("(absent)"),
                c.new.as_deref().unwrap_or("(absent)")
            ));
        }
        if !s.trusted.is_empty() {
            out.push_str(&format!("  (absent inputs compared by their recorded hashes: {})\n", s.trusted.join(", ")));
        }
    }
    Ok(out)
}
