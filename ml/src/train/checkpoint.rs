//! Checkpoints in the stage's work dir, for exact resume after a crash or
//! `kill -9` (ARCHITECTURE: the work dir persists across attempts of a key).
//!
//! `WORK/checkpoint/` holds
//! * `trainable.safetensors` — the trainable tensors (all weights for full
//!   fine-tuning, the LoRA adapters otherwise), by name;
//! * `optim.safetensors` — AdamW moments;
//! * `best.safetensors` — the trainable tensors of the best evaluation so far (optional);
//! * `log.parquet` — the log rows so far;
//! * `state.json` — step (= data cursor: every random draw derives from
//!   `(seed, step)`), seed, config fingerprint, best metric (as f64 bits, so
//!   it survives JSON exactly), free-form extras.
//!
//! Writing: into `checkpoint.tmp/`, fsync every file, then
//! `checkpoint → checkpoint.old`, `checkpoint.tmp → checkpoint`, remove
//! `checkpoint.old`. A crash at any point leaves `checkpoint` or
//! `checkpoint.old` complete; loading prefers the former.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::data::Log;
use super::optim::AdamW;
use super::TrainError;

/// Scalar state of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps completed.
    pub step: u64,
    pub seed: u64,
    /// sha256 of the result-relevant config; a checkpoint of another config is ignored.
    pub fingerprint: String,
    /// `f64::to_bits` of the best evaluation metric so far.
    pub best_metric_bits: Option<u64>,
    pub best_step: Option<u64>,
    /// Ranks of the data-parallel run that wrote it (absent: one process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u64>,
    /// The CPU numerics profile in force when it was written (absent on
    /// CUDA and in older checkpoints): resuming under another one would put
    /// two profiles' bytes into one output while the run record names only
    /// the last (docs/engine.md "Numerics profile").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numerics: Option<recflow::numerics::Profile>,
}

impl State {
    pub fn best_metric(&self) -> Option<f64> {
        self.best_metric_bits.map(f64::from_bits)
    }
}

/// What a loaded checkpoint brings back.
pub struct Loaded {
    pub state: State,
    pub trainable: Vec<(String, Tensor)>,
    pub best: Option<Vec<(String, Tensor)>>,
    pub log: Log,
    optim: PathBuf,
}

impl Loaded {
    /// Restores the optimizer moments (step count = `state.step`).
    pub fn restore_optimizer(&self, opt: &mut AdamW, device: Device) -> Result<(), TrainError> {
        opt.load(&self.optim, self.state.step, device)
    }
}

fn fsync(path: &Path) -> Result<(), TrainError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(TrainError::io(path))
}

fn write_tensors(path: &Path, t: &[(String, Tensor)]) -> Result<(), TrainError> {
    let cpu: Vec<(String, Tensor)> = t.iter().map(|(k, v)| (k.clone(), v.detach().to_device(Device::Cpu))).collect();
    Tensor::write_safetensors(&cpu, path).map_err(|e| TrainError::io_tch(path, e))?;
    fsync(path)
}

/// sha256 hex of a config's canonical JSON (the fingerprint).
pub fn fingerprint(cfg: &impl Serialize) -> String {
    use sha2::Digest;
    let bytes = serde_json::to_vec(cfg).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Writes a checkpoint atomically (module doc).
pub fn save(
    work_dir: &Path,
    state: &State,
    trainable: &[(String, Tensor)],
    opt: &AdamW,
    best: Option<&[(String, Tensor)]>,
    log: &Log,
) -> Result<(), TrainError> {
    let final_dir = work_dir.join("checkpoint");
    let tmp = work_dir.join("checkpoint.tmp");
    let old = work_dir.join("checkpoint.old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    write_tensors(&tmp.join("trainable.safetensors"), trainable)?;
    let op = tmp.join("optim.safetensors");
    opt.save(&op)?;
    fsync(&op)?;
    if let Some(b) = best {
        write_tensors(&tmp.join("best.safetensors"), b)?;
    }
    log.write(&tmp.join("log.parquet"))?;
    let sp = tmp.join("state.json");
    let text = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    recflow::util::write_atomic(&sp, text.as_bytes()).map_err(TrainError::io(&sp))?;
    fsync(&tmp)?;
    if final_dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(TrainError::io(&old))?;
        }
        std::fs::rename(&final_dir, &old).map_err(TrainError::io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(TrainError::io(&tmp))?;
    fsync(work_dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(TrainError::io(&old))?;
    }
    Ok(())
}

fn read_tensors(path: &Path, device: Device) -> Result<Vec<(String, Tensor)>, TrainError> {
    Ok(Tensor::read_safetensors(path)
        .map_err(|e| TrainError::io_tch(path, e))?
        .into_iter()
        .map(|(k, t)| (k, t.to_device(device)))
        .collect())
}

/// Loads the newest complete checkpoint whose fingerprint matches, if any.
/// Returns the reason as `Err` when one exists but cannot be used — among
/// them a checkpoint of another `world_size`: a resumed run equals an
/// uninterrupted one only with the ranks it started with.
pub fn load(work_dir: &Path, fingerprint: &str, device: Device, world_size: usize) -> Result<Option<Loaded>, TrainError> {
    for name in ["checkpoint", "checkpoint.old"] {
        let dir = work_dir.join(name);
        let sp = dir.join("state.json");
        if !sp.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&sp).map_err(TrainError::io(&sp))?;
        let state: State = serde_json::from_str(&text)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", sp.display())))?;
        let was = state.world_size.unwrap_or(1);
        if was != world_size as u64 {
            return Err(TrainError::Checkpoint(format!(
                "{} was written by a run with world_size {was}, this run has world_size {world_size}: resume needs the same world size (set world_size: {was} to continue that run, or remove the work dir to start over)",
                dir.display()
            )));
        }
        if state.fingerprint != fingerprint {
            return Err(TrainError::Checkpoint(format!(
                "{} was written for another configuration (fingerprint {} ≠ {}); remove it to start over",
                dir.display(),
                state.fingerprint,
                fingerprint
            )));
        }
        let best_path = dir.join("best.safetensors");
        let best = if best_path.is_file() { Some(read_tensors(&best_path, device)?) } else { None };
        return Ok(Some(Loaded {
            trainable: read_tensors(&dir.join("trainable.safetensors"), device)?,
            best,
            log: Log::read(&dir.join("log.parquet"))?,
            optim: dir.join("optim.safetensors"),
            state,
        }));
    }
    Ok(None)
}

/// Copies `src` values into the same-named tensors of `dst` (in place, no grad).
pub fn copy_into(dst: &[(String, Tensor)], src: &[(String, Tensor)]) -> Result<(), TrainError> {
    let _g = tch::no_grad_guard();
    for (k, d) in dst {
        let s = src
            .iter()
            .find(|(n, _)| n == k)
            .ok_or_else(|| TrainError::Checkpoint(format!("tensor `{k}` missing from the checkpoint")))?;
        if s.1.size() != d.size() {
            return Err(TrainError::Checkpoint(format!("tensor `{k}`: shape {:?} ≠ {:?}", s.1.size(), d.size())));
        }
        let mut d = d.shallow_clone();
        d.f_copy_(&s.1)?;
    }
    Ok(())
}

/// Detached copies of tensors (a snapshot of the best weights).
pub fn snapshot(t: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    t.iter().map(|(k, v)| (k.clone(), v.detach().copy())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamWConfig;

    #[test]
    fn save_then_load_restores_everything() {
        let dir = tempfile::tempdir().unwrap();
        let w = vec![("w".to_string(), Tensor::from_slice(&[1.5f32, -2.0]))];
        let opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 });
        let mut log = Log::new(&["loss"]);
        log.push(1, &[("loss", Some(0.25))]).unwrap();
        let st = State { step: 1, seed: 7, fingerprint: "f".into(), best_metric_bits: Some(0.1f64.to_bits()), best_step: Some(1), world_size: None, numerics: None };
        save(dir.path(), &st, &w, &opt, Some(&w), &log).unwrap();
        // A second save replaces the first atomically and leaves no temp dirs.
        save(dir.path(), &st, &w, &opt, Some(&w), &log).unwrap();
        assert!(!dir.path().join("checkpoint.tmp").exists() && !dir.path().join("checkpoint.old").exists());
        let l = load(dir.path(), "f", Device::Cpu, 1).unwrap().expect("checkpoint must be found");
        assert_eq!(l.state, st);
        assert_eq!(l.state.best_metric(), Some(0.1), "best metric survives exactly");
        assert!(l.trainable[0].1.equal(&w[0].1));
        assert_eq!(l.log, log);
        assert!(load(dir.path(), "other", Device::Cpu, 1).is_err(), "a foreign config's checkpoint is refused loudly");
        // Interrupted swap: only checkpoint.old left → still loadable.
        std::fs::rename(dir.path().join("checkpoint"), dir.path().join("checkpoint.old")).unwrap();
        assert!(load(dir.path(), "f", Device::Cpu, 1).unwrap().is_some(), "falls back to checkpoint.old");
        assert!(
            !std::fs::read_to_string(dir.path().join("checkpoint.old/state.json")).unwrap().contains("world_size"),
            "a one-process checkpoint is written as before data parallelism existed"
        );
        // A checkpoint of two ranks: refused by one process, naming both sizes.
        let two = State { world_size: Some(2), ..st.clone() };
        save(dir.path(), &two, &w, &opt, None, &log).unwrap();
        let e = load(dir.path(), "f", Device::Cpu, 1).err().expect("another world size is refused").to_string();
        assert!(e.contains("world_size 2") && e.contains("world_size 1"), "{e}");
        assert!(load(dir.path(), "f", Device::Cpu, 2).unwrap().is_some(), "the same world size resumes");
    }
}
