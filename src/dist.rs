//! Data-parallel training, the torch-free half: the `sft` / `grpo` settings
//! ([`Distributed`], `world_size`, `ddp_timeout`), their checks, and how a
//! rank learns who it is ([`RankEnv`]). The collectives themselves (PyTorch's
//! c10d: Gloo on CPU, NCCL on CUDA) live in `recflow-ml`'s `dist` module.
//!
//! A data-parallel stage runs as `world_size` processes, the *ranks*. They
//! are started in one of three ways, all running the same
//! `recflow-worker exec-stage SPEC` command:
//! * by the worker itself (one node): the `exec-stage` process becomes a
//!   launcher that hosts the rendezvous store, starts the ranks with
//!   `RECFLOW_RANK` / `RECFLOW_LOCAL_RANK` / `RECFLOW_WORLD_SIZE` /
//!   `MASTER_ADDR` / `MASTER_PORT` and watches them;
//! * by Slurm: `srun` starts one task per rank; `SLURM_PROCID`,
//!   `SLURM_LOCALID` and `SLURM_NTASKS` say which, `MASTER_ADDR` (and
//!   optionally `MASTER_PORT`) where rank 0 hosts the store;
//! * by hand or another launcher, torchrun's convention: `RANK`,
//!   `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (rank 0 hosts
//!   the store unless `TORCHELASTIC_USE_AGENT_STORE=True` says the agent does).
use serde::{Deserialize, Serialize};

/// The collective backend of a data-parallel stage (`distributed.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Gloo on CPU, NCCL on CUDA.
    #[default]
    Auto,
    /// c10d's Gloo: CPU tensors, or CUDA tensors through host copies.
    Gloo,
    /// c10d's NCCL: one CUDA device per rank.
    Nccl,
    /// No processes: this one process runs the `world_size` shares of each
    /// step one after another, with each rank's thread count, and sums them
    /// as the ranks' all-reduce does. The same update as the ranks' (bit for
    /// bit at two ranks on CPU, where a sum of two terms has one order), for
    /// reproducing a multi-rank run on one device.
    Serial,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
            Backend::Serial => "serial",
        }
    }

    /// `auto` made concrete for a device (`cpu`, `cuda`, `cuda:N`).
    pub fn resolve(self, device: &str) -> Backend {
        match self {
            Backend::Auto if device.starts_with("cuda") => Backend::Nccl,
            Backend::Auto => Backend::Gloo,
            b => b,
        }
    }
}

/// `distributed:` of a training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Distributed {
    /// `auto` | `gloo` | `nccl` | `serial`.
    pub backend: Backend,
}

impl Distributed {
    /// The default stays out of the serialized (key) form, so stages written
    /// before data parallelism existed keep their keys.
    pub fn is_default(&self) -> bool {
        *self == Distributed::default()
    }
}

/// Default `ddp_timeout` (seconds): how long a collective waits for the
/// other ranks. Gloo's own default is 30 minutes; a dead rank is noticed at
/// once by the launcher and by its peers' closed connections, so this only
/// bounds a rank that hangs. Generous enough for a rank that is writing a
/// checkpoint or evaluating while the others wait.
pub const DEFAULT_DDP_TIMEOUT_S: u64 = 600;

pub(crate) fn is_one(v: &usize) -> bool {
    *v == 1
}

pub(crate) fn is_default_ddp_timeout(v: &u64) -> bool {
    *v == DEFAULT_DDP_TIMEOUT_S
}

/// Checks the data-parallel settings of a training stage: `world_size` ≥ 1
/// divides `batch` (named `batch_name` in the message), NCCL only on CUDA,
/// a positive timeout.
pub fn check(world_size: usize, batch: usize, batch_name: &str, d: &Distributed, device: &str, ddp_timeout: u64) -> Result<(), String> {
    if world_size == 0 {
        return Err("world_size must be ≥ 1".into());
    }
    if batch % world_size != 0 {
        return Err(format!(
            "world_size {world_size} does not divide {batch_name} = {batch}: every rank takes an equal share of each optimizer step; pick a world_size that divides it, or change the batch"
        ));
    }
    if d.backend == Backend::Nccl && device == "cpu" {
        return Err("distributed.backend nccl needs device cuda (NCCL reduces CUDA tensors); use gloo or auto on CPU".into());
    }
    if ddp_timeout == 0 {
        return Err("ddp_timeout must be ≥ 1 second".into());
    }
    Ok(())
}

/// Intra-op threads of each rank: the numerics profile's `threads` (the
/// stage's cores) ÷ `world_size`, at least 1.
pub fn rank_threads(threads: u32, world_size: usize) -> u32 {
    (threads / world_size.max(1) as u32).max(1)
}

/// Who started this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// The worker's own launcher (`RECFLOW_RANK`): it hosts the store.
    Worker,
    /// `srun` (`SLURM_PROCID`): rank 0 hosts the store.
    Slurm,
    /// torchrun's variables (`RANK`): rank 0 hosts the store unless the
    /// agent does.
    Env { agent_store: bool },
}

/// This process's place among the ranks of a data-parallel stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    /// Rank on this node: picks the CUDA device.
    pub local_rank: usize,
    pub world_size: usize,
    /// Where the rendezvous store listens.
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
}

/// Environment variables the worker's launcher sets for its ranks.
pub const ENV_RANK: &str = "RECFLOW_RANK";
pub const ENV_LOCAL_RANK: &str = "RECFLOW_LOCAL_RANK";
pub const ENV_WORLD_SIZE: &str = "RECFLOW_WORLD_SIZE";

/// torchrun's default store port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl RankEnv {
    /// Reads the rank variables of this process (module doc), None when it
    /// was not started as one of several ranks.
    pub fn from_env() -> Result<Option<RankEnv>, String> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`RankEnv::from_env`] over any variable lookup (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>, String> {
        let num = |k: &str| -> Result<Option<usize>, String> {
            match var(k) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| format!("{k}={v:?} is not a non-negative integer")),
            }
        };
        let port = || -> Result<u16, String> {
            match var("MASTER_PORT") {
                None => Ok(DEFAULT_MASTER_PORT),
                Some(v) => v.trim().parse::<u16>().map_err(|_| format!("MASTER_PORT={v:?} is not a port number")),
            }
        };
        let addr = |who: &str| var("MASTER_ADDR").filter(|a| !a.is_empty()).ok_or_else(|| format!("{who}: MASTER_ADDR is not set (the host where rank 0 listens)"));
        let (rank, local, world, launcher) = if let Some(r) = num(ENV_RANK)? {
            let w = num(ENV_WORLD_SIZE)?.ok_or_else(|| format!("{ENV_RANK} is set but {ENV_WORLD_SIZE} is not"))?;
            (r, num(ENV_LOCAL_RANK)?.unwrap_or(r), w, Launcher::Worker)
        } else if let (Some(r), Some(w)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            if w <= 1 {
                return Ok(None);
            }
            (r, num("SLURM_LOCALID")?.unwrap_or(0), w, Launcher::Slurm)
        } else if let (Some(r), Some(w)) = (num("RANK")?, num("WORLD_SIZE")?) {
            if w <= 1 {
                return Ok(None);
            }
            let agent = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
            (r, num("LOCAL_RANK")?.unwrap_or(0), w, Launcher::Env { agent_store: agent })
        } else {
            return Ok(None);
        };
        if rank >= world {
            return Err(format!("rank {rank} is not below the world size {world}"));
        }
        let who = match launcher {
            Launcher::Worker => "recflow launcher",
            Launcher::Slurm => "srun (SLURM_PROCID)",
            Launcher::Env { .. } => "RANK/WORLD_SIZE",
        };
        Ok(Some(RankEnv { rank, local_rank: local, world_size: world, master_addr: addr(who)?, master_port: port()?, launcher }))
    }

    /// Whether this rank hosts the rendezvous store.
    pub fn hosts_store(&self) -> bool {
        match self.launcher {
            Launcher::Worker | Launcher::Env { agent_store: true } => false,
            Launcher::Slurm | Launcher::Env { agent_store: false } => self.rank == 0,
        }
    }
}

/// Whether this process is a rank other than 0 of a data-parallel stage
/// whose config asks for `world_size` > 1: such a rank writes no outputs
/// (rank 0 does), so `exec-stage` does not look for them.
pub fn is_secondary_rank(config: &serde_json::Value) -> bool {
    let w = config.get("world_size").and_then(serde_json::Value::as_u64).unwrap_or(1);
    w > 1 && matches!(RankEnv::from_env(), Ok(Some(r)) if r.rank > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
    }

    #[test]
    fn rank_variables_of_each_launcher() {
        assert_eq!(RankEnv::from_vars(env(&[])).unwrap(), None, "no variables: not a rank");
        let w = RankEnv::from_vars(env(&[(ENV_RANK, "1"), (ENV_WORLD_SIZE, "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "4000")]))
            .unwrap()
            .unwrap();
        assert_eq!((w.rank, w.local_rank, w.world_size, w.master_port, w.launcher), (1, 1, 2, 4000, Launcher::Worker));
        assert!(!w.hosts_store(), "the worker's launcher hosts the store, not a rank");
        let s = RankEnv::from_vars(env(&[("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0"), ("SLURM_NTASKS", "8"), ("MASTER_ADDR", "n01")]))
            .unwrap()
            .unwrap();
        assert_eq!((s.rank, s.world_size, s.master_port, s.launcher), (0, 8, DEFAULT_MASTER_PORT, Launcher::Slurm));
        assert!(s.hosts_store(), "under srun rank 0 hosts the store");
        assert_eq!(RankEnv::from_vars(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])).unwrap(), None, "a one-task step is no rank");
        let e = RankEnv::from_vars(env(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4")])).unwrap_err();
        assert!(e.contains("MASTER_ADDR"), "srun without MASTER_ADDR says what is missing: {e}");
        let t = RankEnv::from_vars(env(&[("RANK", "2"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h"), ("TORCHELASTIC_USE_AGENT_STORE", "True")]))
            .unwrap()
            .unwrap();
        assert_eq!(t.launcher, Launcher::Env { agent_store: true });
        assert!(!RankEnv { rank: 0, ..t.clone() }.hosts_store(), "torchrun's agent hosts its store");
        assert!(RankEnv::from_vars(env(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h")])).is_err(), "rank beyond the world");
        assert!(RankEnv::from_vars(env(&[(ENV_RANK, "x"), (ENV_WORLD_SIZE, "2")])).unwrap_err().contains("RECFLOW_RANK"));
    }

    #[test]
    fn checks_name_the_field() {
        let d = Distributed::default();
        assert!(check(2, 8, "prompts_per_step", &d, "cpu", 60).is_ok());
        let e = check(3, 8, "prompts_per_step", &d, "cpu", 60).unwrap_err();
        assert!(e.contains("world_size 3") && e.contains("prompts_per_step = 8"), "{e}");
        let nccl = Distributed { backend: Backend::Nccl };
        assert!(check(2, 8, "b", &nccl, "cpu", 60).unwrap_err().contains("nccl"));
        assert!(check(2, 8, "b", &nccl, "cuda", 60).is_ok());
        assert!(check(1, 8, "b", &d, "cpu", 0).unwrap_err().contains("ddp_timeout"));
        assert_eq!((Backend::Auto.resolve("cuda:1"), Backend::Auto.resolve("cpu")), (Backend::Nccl, Backend::Gloo));
        assert_eq!((rank_threads(16, 4), rank_threads(2, 4)), (4, 1), "cores ÷ world size, at least one");
    }
}
