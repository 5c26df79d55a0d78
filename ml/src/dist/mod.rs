//! Data-parallel training on PyTorch's own collectives (c10d: Gloo on CPU,
//! NCCL on CUDA), through the C++ shim in this folder (`c10d.cpp`,
//! `gloo.cpp`, `nccl.cpp`; built by build.rs, cfg `recflow_dist`).
//!
//! * [`Store`], [`Group`] — a TCPStore and a process group: all-reduce,
//!   all-gather, broadcast of tch tensors;
//! * [`Dist`] — what a training stage sees: which *shares* of every step
//!   this process computes, and the reductions that make the ranks' update
//!   the single-process update of the same global batch;
//! * [`start`] — at the top of a training stage: a single process, the
//!   `serial` emulation, one rank of several, or the launcher of the ranks
//!   ([`launch`]).
//!
//! Exact semantics. Each optimizer step's global batch is cut into
//! `world_size` shares, share `r` computed by rank `r`. Losses are
//! normalised by global counts (every rank knows the whole batch: SFT's
//! data order is a function of `(seed, step)`, GRPO's rollouts are
//! all-gathered before scoring), so the sum of the ranks' gradients is the
//! gradient of the global loss: the all-reduce sums, it does not average.
//! Every rank then clips and steps AdamW on identical gradients, so the
//! weights stay identical without being sent. Scalar statistics are
//! gathered and summed in share order on every rank, so logs agree bit for
//! bit across ranks and with the serial emulation.
use std::ops::Range;
use std::time::{Duration, Instant};

use recflow::dist::{Backend, RankEnv};
use recflow::stages::{Metrics, StageCtx};
use tch::{Device, Kind, Tensor};

use crate::train::TrainError;

pub mod launch;

#[cfg(recflow_dist)]
mod ffi {
    use std::ffi::c_char;

    #[repr(C)]
    pub struct RecflowStore {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub struct RecflowGroup {
        _p: [u8; 0],
    }
    /// tch's tensor handle (`*mut C_tensor`, an `at::Tensor*`), cast.
    pub type TensorPtr = *mut std::ffi::c_void;

    extern "C" {
        pub fn recflow_dist_backends() -> i32;
        pub fn recflow_dist_store(
            host: *const c_char,
            port: i32,
            is_server: i32,
            timeout_ms: i64,
            port_out: *mut i32,
            err: *mut c_char,
            err_len: i32,
        ) -> *mut RecflowStore;
        pub fn recflow_dist_store_free(s: *mut RecflowStore);
        pub fn recflow_dist_group(
            s: *mut RecflowStore,
            backend: i32,
            rank: i32,
            size: i32,
            timeout_ms: i64,
            device: i32,
            err: *mut c_char,
            err_len: i32,
        ) -> *mut RecflowGroup;
        pub fn recflow_dist_group_free(g: *mut RecflowGroup);
        pub fn recflow_dist_allreduce_sum(g: *mut RecflowGroup, t: TensorPtr, err: *mut c_char, err_len: i32) -> i32;
        pub fn recflow_dist_allgather(g: *mut RecflowGroup, t: TensorPtr, outs: *mut TensorPtr, n: i32, err: *mut c_char, err_len: i32) -> i32;
        pub fn recflow_dist_broadcast(g: *mut RecflowGroup, t: TensorPtr, root: i32, err: *mut c_char, err_len: i32) -> i32;
    }
    #[cfg(recflow_gloo)]
    extern "C" {
        pub fn recflow_dist_gloo_sizes(out: *mut i64);
    }
    #[cfg(recflow_nccl)]
    extern "C" {
        pub fn recflow_dist_nccl_sizes(out: *mut i64);
    }
}

/// Whether this build has c10d's Gloo (bit 0) / NCCL (bit 1) process group.
pub fn built_backends() -> (bool, bool) {
    #[cfg(recflow_dist)]
    {
        // SAFETY: a plain C call returning an int.
        let b = unsafe { ffi::recflow_dist_backends() };
        (b & 1 != 0, b & 2 != 0)
    }
    #[cfg(not(recflow_dist))]
    {
        (false, false)
    }
}

/// Sizes of `ProcessGroupGloo` and its `Options` as the shim was compiled
/// (the layout check of ml/tests/dist.rs; None without Gloo).
pub fn gloo_sizes_seen_by_shim() -> Option<(i64, i64)> {
    #[cfg(recflow_gloo)]
    return Some(sizes(ffi::recflow_dist_gloo_sizes));
    #[allow(unreachable_code)]
    None
}

/// Sizes of `ProcessGroupNCCL` and its `Options` as the shim was compiled
/// (None without NCCL).
pub fn nccl_sizes_seen_by_shim() -> Option<(i64, i64)> {
    #[cfg(recflow_nccl)]
    return Some(sizes(ffi::recflow_dist_nccl_sizes));
    #[allow(unreachable_code)]
    None
}

#[cfg(any(recflow_gloo, recflow_nccl))]
fn sizes(f: unsafe extern "C" fn(*mut i64)) -> (i64, i64) {
    let mut out = [0i64; 2];
    // SAFETY: the shim's size functions write two slots.
    unsafe { f(out.as_mut_ptr()) };
    (out[0], out[1])
}

fn dist_err(what: &str, msg: String) -> TrainError {
    TrainError::Invalid(format!("{what}: {msg}"))
}

/// A c10d TCPStore: the rendezvous of the ranks.
pub struct Store {
    #[cfg(recflow_dist)]
    ptr: *mut ffi::RecflowStore,
    port: u16,
}

// SAFETY: a TCPStore is used from one thread at a time here (the stage's),
// and c10d's store is itself thread-safe.
unsafe impl Send for Store {}

impl Store {
    /// Listens on `port` (0: a free one; [`Store::port`] says which).
    pub fn server(port: u16, timeout: Duration) -> Result<Store, TrainError> {
        Self::open("0.0.0.0", port, true, timeout)
    }

    /// Connects to the store at `host:port`, retrying until `timeout`.
    pub fn client(host: &str, port: u16, timeout: Duration) -> Result<Store, TrainError> {
        Self::open(host, port, false, timeout)
    }

    #[allow(unused_variables)]
    fn open(host: &str, port: u16, server: bool, timeout: Duration) -> Result<Store, TrainError> {
        #[cfg(recflow_dist)]
        {
            let h = std::ffi::CString::new(host).map_err(|_| TrainError::Invalid(format!("host {host:?} holds a NUL")))?;
            let mut err = [0 as std::ffi::c_char; 1024];
            let mut got = 0i32;
            // SAFETY: `h` is NUL-terminated, `err` has the length passed, `got` is one int.
            let ptr = unsafe {
                ffi::recflow_dist_store(h.as_ptr(), port as i32, server as i32, timeout.as_millis() as i64, &mut got, err.as_mut_ptr(), err.len() as i32)
            };
            if ptr.is_null() {
                let what = if server { format!("rendezvous store: listening on port {port}") } else { format!("rendezvous store at {host}:{port}") };
                return Err(dist_err(&what, c_msg(&err)));
            }
            Ok(Store { ptr, port: got as u16 })
        }
        #[cfg(not(recflow_dist))]
        Err(unavailable())
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        #[cfg(recflow_dist)]
        // SAFETY: `ptr` came from recflow_dist_store and is freed once.
        unsafe {
            ffi::recflow_dist_store_free(self.ptr)
        };
    }
}

#[cfg(not(recflow_dist))]
fn unavailable() -> TrainError {
    TrainError::Invalid("this worker was built without c10d's collectives (the torch headers were missing at build time)".into())
}

#[cfg(recflow_dist)]
fn c_msg(buf: &[std::ffi::c_char]) -> String {
    // SAFETY: the shim NUL-terminates what it writes into the buffer, and the
    // buffer starts zeroed.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// A c10d process group of `size` ranks.
pub struct Group {
    #[cfg(recflow_dist)]
    ptr: *mut ffi::RecflowGroup,
    pub rank: usize,
    pub size: usize,
    /// Where the tensors of [`Group::all_gather_bytes`] live: CPU for Gloo,
    /// the rank's GPU for NCCL (which reduces CUDA tensors only).
    pub comm: Device,
}

// SAFETY: used from the stage's thread only; c10d's process groups accept
// calls from any thread.
unsafe impl Send for Group {}

impl Group {
    /// Joins the group through `store` with `backend` (Gloo or NCCL).
    #[allow(unused_variables)]
    pub fn new(store: &Store, backend: Backend, rank: usize, size: usize, timeout: Duration, device: Device) -> Result<Group, TrainError> {
        #[cfg(recflow_dist)]
        {
            let (code, comm, dev) = match (backend, device) {
                (Backend::Nccl, Device::Cuda(d)) => (1, device, d as i32),
                (Backend::Nccl, _) => return Err(TrainError::Invalid("NCCL needs a CUDA device".into())),
                (_, Device::Cuda(d)) => (0, Device::Cpu, d as i32),
                _ => (0, Device::Cpu, -1),
            };
            let mut err = [0 as std::ffi::c_char; 2048];
            // SAFETY: `store.ptr` is live for the call; `err` has the length passed.
            let ptr = unsafe {
                ffi::recflow_dist_group(store.ptr, code, rank as i32, size as i32, timeout.as_millis() as i64, dev, err.as_mut_ptr(), err.len() as i32)
            };
            if ptr.is_null() {
                return Err(dist_err(&format!("rank {rank} of {size}: joining the {} process group", backend.name()), c_msg(&err)));
            }
            Ok(Group { ptr, rank, size, comm })
        }
        #[cfg(not(recflow_dist))]
        Err(unavailable())
    }

    /// In place: `t` ← Σ over ranks (c10d `allreduce`, SUM).
    #[allow(unused_variables)]
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), TrainError> {
        #[cfg(recflow_dist)]
        {
            let mut err = [0 as std::ffi::c_char; 2048];
            // SAFETY: `t` is a live tensor handle (an at::Tensor*, see c10d.cpp).
            let rc = unsafe { ffi::recflow_dist_allreduce_sum(self.ptr, t.as_mut_ptr() as ffi::TensorPtr, err.as_mut_ptr(), err.len() as i32) };
            return self.check(rc, "all-reduce", &err);
        }
        #[cfg(not(recflow_dist))]
        Err(unavailable())
    }

    /// Every rank's `t` (same shape and dtype on every rank), in rank order.
    #[allow(unused_variables)]
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>, TrainError> {
        #[cfg(recflow_dist)]
        {
            let mut outs: Vec<Tensor> = (0..self.size).map(|_| t.empty_like()).collect();
            let mut ptrs: Vec<ffi::TensorPtr> = outs.iter_mut().map(|o| o.as_mut_ptr() as ffi::TensorPtr).collect();
            let mut input = t.shallow_clone();
            let mut err = [0 as std::ffi::c_char; 2048];
            // SAFETY: every pointer is a live tensor handle; `ptrs` has `size` entries.
            let rc = unsafe {
                ffi::recflow_dist_allgather(self.ptr, input.as_mut_ptr() as ffi::TensorPtr, ptrs.as_mut_ptr(), ptrs.len() as i32, err.as_mut_ptr(), err.len() as i32)
            };
            self.check(rc, "all-gather", &err)?;
            return Ok(outs);
        }
        #[cfg(not(recflow_dist))]
        Err(unavailable())
    }

    /// In place: `t` ← rank `root`'s `t`.
    #[allow(unused_variables)]
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), TrainError> {
        #[cfg(recflow_dist)]
        {
            let mut err = [0 as std::ffi::c_char; 2048];
            // SAFETY: `t` is a live tensor handle.
            let rc = unsafe { ffi::recflow_dist_broadcast(self.ptr, t.as_mut_ptr() as ffi::TensorPtr, root as i32, err.as_mut_ptr(), err.len() as i32) };
            return self.check(rc, "broadcast", &err);
        }
        #[cfg(not(recflow_dist))]
        Err(unavailable())
    }

    /// Each rank's byte string, in rank order (lengths gathered first, then
    /// the strings padded to the longest).
    pub fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, TrainError> {
        let len = Tensor::from_slice(&[mine.len() as i64]).to_device(self.comm);
        let lens: Vec<i64> = self.all_gather(&len)?.iter().map(|t| t.int64_value(&[0])).collect();
        let max = lens.iter().copied().max().unwrap_or(0).max(1) as usize;
        let mut padded = mine.to_vec();
        padded.resize(max, 0);
        let t = Tensor::from_slice(&padded).to_device(self.comm);
        let all = self.all_gather(&t)?;
        all.iter()
            .zip(&lens)
            .map(|(t, &n)| {
                let v: Vec<u8> = Vec::<u8>::try_from(t.to_device(Device::Cpu))?;
                Ok(v[..n as usize].to_vec())
            })
            .collect()
    }

    #[cfg(recflow_dist)]
    fn check(&self, rc: i32, op: &str, err: &[std::ffi::c_char]) -> Result<(), TrainError> {
        if rc == 0 {
            return Ok(());
        }
        Err(TrainError::Invalid(format!(
            "rank {} of {}: {op} failed (another rank died or hung past ddp_timeout?): {}",
            self.rank,
            self.size,
            c_msg(err)
        )))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        #[cfg(recflow_dist)]
        // SAFETY: `ptr` came from recflow_dist_group and is freed once.
        unsafe {
            ffi::recflow_dist_group_free(self.ptr)
        };
    }
}

/// PyTorch DDP's default gradient bucket (`bucket_cap_mb = 25`).
pub const BUCKET_BYTES: i64 = 25 << 20;

enum Mode {
    /// One process, `world_size` 1.
    Single,
    /// One process computing every share in turn (`backend: serial`).
    Serial,
    /// One rank of several.
    Rank { group: Group, _store: Store },
}

/// A training stage's view of data parallelism (module doc).
pub struct Dist {
    pub world_size: usize,
    /// The backend in use (`auto` resolved; `serial` for the emulation).
    pub backend: Backend,
    /// The device this process computes on (a rank's own GPU).
    pub device: Device,
    mode: Mode,
    collective_s: std::cell::Cell<f64>,
}

/// What [`start`] found this process to be.
pub enum Start {
    /// Train (alone, serially, or as one rank).
    Train(Dist),
    /// This process launched the ranks, which have finished: rank 0's metrics.
    Launched(Metrics),
}

/// The data-parallel settings of a training config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub world_size: usize,
    pub backend: Backend,
    pub timeout: Duration,
}

/// Decides what this process is (module doc) and sets it up: for ranks
/// (and for `world_size` 1 with `gloo` or `nccl` named: a group of one),
/// joins the group (the rendezvous waits up to the timeout for the others)
/// and pins the rank's device; for the launcher, runs the ranks to their end.
/// `config`: the stage config as the worker got it (the launcher hands it
/// to the ranks).
pub fn start(kind: &str, config: serde_json::Value, s: Settings, ctx: &mut StageCtx) -> anyhow::Result<Start> {
    let device = crate::train::parse_device(&ctx.device)?;
    let backend = s.backend.resolve(&ctx.device);
    let env = RankEnv::from_env().map_err(|e| anyhow::anyhow!("stage `{}`: {e}", ctx.stage))?;
    if s.world_size == 1 {
        if let Some(e) = env {
            anyhow::bail!(
                "stage `{}`: started as rank {} of {} ranks, but its world_size is 1 — set world_size: {} or start one process",
                ctx.stage,
                e.rank,
                e.world_size,
                e.world_size
            );
        }
        if matches!(s.backend, Backend::Gloo | Backend::Nccl) {
            // Asked for by name: a process group of one, so the collectives
            // run (and their cost shows) as with more ranks — the one-GPU
            // check of the NCCL path. The update is the one-process update.
            let dev = rank_device(device, 0, backend)?;
            let store = Store::server(0, s.timeout)?;
            let group = Group::new(&store, backend, 0, 1, s.timeout, dev)?;
            return Ok(Start::Train(Dist { world_size: 1, backend, device: dev, mode: Mode::Rank { group, _store: store }, collective_s: Default::default() }));
        }
        return Ok(Start::Train(Dist::single(device)));
    }
    match env {
        Some(e) => {
            if e.world_size != s.world_size {
                anyhow::bail!(
                    "stage `{}`: {} ranks were started but its world_size is {}: start world_size ranks (srun -n / WORLD_SIZE) or change world_size",
                    ctx.stage,
                    e.world_size,
                    s.world_size
                );
            }
            if backend == Backend::Serial {
                anyhow::bail!("stage `{}`: distributed.backend serial runs in one process; it was started as rank {} of {}", ctx.stage, e.rank, e.world_size);
            }
            let dev = rank_device(device, e.local_rank, backend)?;
            let store = if e.hosts_store() {
                Store::server(e.master_port, s.timeout)?
            } else {
                Store::client(&e.master_addr, e.master_port, s.timeout)?
            };
            let group = Group::new(&store, backend, e.rank, e.world_size, s.timeout, dev)?;
            let d = Dist { world_size: s.world_size, backend, device: dev, mode: Mode::Rank { group, _store: store }, collective_s: Default::default() };
            if e.rank == 0 {
                announce(ctx, s.world_size);
            } else {
                // Rank 0 speaks for all: the others' events would repeat its own.
                ctx.events = Box::new(Quiet);
            }
            Ok(Start::Train(d))
        }
        None if backend == Backend::Serial => {
            let threads = recflow::dist::rank_threads(tch::get_num_threads().max(1) as u32, s.world_size);
            tch::set_num_threads(threads as i32);
            announce(ctx, s.world_size);
            Ok(Start::Train(Dist { world_size: s.world_size, backend, device, mode: Mode::Serial, collective_s: Default::default() }))
        }
        None => Ok(Start::Launched(launch::run(kind, config, s, backend, ctx)?)),
    }
}

/// Drops events (ranks other than 0).
struct Quiet;

impl recflow::stages::EventSink for Quiet {
    fn emit(&mut self, _event: serde_json::Value) {}
}

/// The numerics profile of the ranks (threads per rank, the rank count),
/// which replaces the one the worker announced at its start.
fn announce(ctx: &mut StageCtx, world_size: usize) {
    let req = recflow::numerics::Request::from_env().ok().map(|r| r.resolve());
    let mut p = crate::numerics::observe(req.as_ref());
    p.world_size = Some(world_size as u32);
    ctx.events.emit(serde_json::json!({ "numerics": p }));
}

/// The CUDA device of local rank `local` (`cuda`, `cuda:N` = the first of
/// this node's ranks): one per rank, or the only one when each rank sees a
/// single GPU (srun with `--gpus-per-task`). Gloo may share a GPU; NCCL may not.
fn rank_device(device: Device, local: usize, backend: Backend) -> anyhow::Result<Device> {
    let Device::Cuda(base) = device else { return Ok(device) };
    let count = tch::Cuda::device_count().max(0) as usize;
    if count == 0 {
        anyhow::bail!("device {device:?}: CUDA sees no GPU");
    }
    let idx = if count == 1 { 0 } else { base + local };
    if idx < count {
        return Ok(Device::Cuda(idx));
    }
    if backend == Backend::Gloo {
        return Ok(Device::Cuda(idx % count));
    }
    anyhow::bail!("local rank {local} needs CUDA device {idx}, but CUDA sees {count}: NCCL needs one GPU per rank (or use distributed.backend gloo)")
}

impl Dist {
    /// One process, no ranks.
    pub fn single(device: Device) -> Dist {
        Dist { world_size: 1, backend: Backend::Auto, device, mode: Mode::Single, collective_s: Default::default() }
    }

    /// The shares of each step this process computes.
    pub fn shares(&self) -> Range<usize> {
        match &self.mode {
            Mode::Single => 0..1,
            Mode::Serial => 0..self.world_size,
            Mode::Rank { group, .. } => group.rank..group.rank + 1,
        }
    }

    /// This process's rank (0 unless it is one of several).
    pub fn rank(&self) -> usize {
        match &self.mode {
            Mode::Rank { group, .. } => group.rank,
            _ => 0,
        }
    }

    /// Whether this process writes checkpoints and outputs (rank 0 alone).
    pub fn writes(&self) -> bool {
        self.rank() == 0
    }

    /// Whether other processes take part (collectives happen).
    pub fn is_ranks(&self) -> bool {
        matches!(self.mode, Mode::Rank { .. })
    }

    /// Seconds spent in collectives so far (waiting for slower ranks included).
    pub fn collective_s(&self) -> f64 {
        self.collective_s.get()
    }

    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        self.collective_s.set(self.collective_s.get() + t0.elapsed().as_secs_f64());
        out
    }

    /// The backward passes of one optimizer step: `f(share)` for each share
    /// of this process, accumulating into the trainable tensors' gradients
    /// (zeroed by the caller), then the gradients of all shares summed into
    /// every process: by bucketed all-reduce across ranks; in the serial
    /// emulation by adding each share's gradient to the sum of the ones
    /// before (`g₀ + g₁`, the order a two-rank all-reduce adds in). Returns
    /// `f`'s results, one per share of this process.
    pub fn backward_shares<T>(&self, trainable: &[(String, Tensor)], mut f: impl FnMut(usize) -> anyhow::Result<T>) -> anyhow::Result<Vec<T>> {
        use crate::train::optim::{ensure_grads, zero_grad};
        let mut out = Vec::new();
        match &self.mode {
            Mode::Single => out.push(f(0)?),
            Mode::Serial => {
                for share in self.shares() {
                    if share == 0 {
                        out.push(f(share)?);
                        continue;
                    }
                    ensure_grads(trainable)?;
                    let before: Vec<Tensor> = trainable.iter().map(|(_, p)| p.grad().copy()).collect();
                    zero_grad(trainable);
                    out.push(f(share)?);
                    ensure_grads(trainable)?;
                    let _g = tch::no_grad_guard();
                    for ((_, p), b) in trainable.iter().zip(&before) {
                        let mut g = p.grad();
                        let sum = b + &g;
                        g.f_copy_(&sum)?;
                    }
                }
            }
            Mode::Rank { group, .. } => {
                out.push(f(group.rank)?);
                ensure_grads(trainable)?;
                self.timed(|| all_reduce_buckets(group, trainable))?;
            }
        }
        Ok(out)
    }

    /// Every share's value, in share order: `mine` holds one per share of
    /// this process ([`Dist::shares`]).
    pub fn gather_bytes(&self, mine: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, TrainError> {
        match &self.mode {
            Mode::Single | Mode::Serial => Ok(mine),
            Mode::Rank { group, .. } => {
                let [one]: [Vec<u8>; 1] = mine.try_into().map_err(|_| TrainError::Invalid("a rank gathers exactly one share".into()))?;
                self.timed(|| group.all_gather_bytes(&one))
            }
        }
    }

    /// [`Dist::gather_bytes`] of f64 vectors (bit-exact, NaN included).
    pub fn gather_f64(&self, mine: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>, TrainError> {
        let enc: Vec<Vec<u8>> = mine.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        Ok(self
            .gather_bytes(enc)?
            .into_iter()
            .map(|b| b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
            .collect())
    }

    /// Σ over all shares of each component of `mine`'s vectors, in share
    /// order (the same bits on every rank and in the serial emulation; one
    /// share's values come back untouched).
    pub fn sum_f64(&self, mine: Vec<Vec<f64>>) -> Result<Vec<f64>, TrainError> {
        let mut all = self.gather_f64(mine)?.into_iter();
        let mut acc = all.next().unwrap_or_default();
        let n = acc.len();
        for v in all {
            if v.len() != n {
                return Err(TrainError::Invalid(format!("ranks reduced vectors of lengths {n} and {}", v.len())));
            }
            for (a, x) in acc.iter_mut().zip(&v) {
                *a += x;
            }
        }
        Ok(acc)
    }

    /// Whether `flag` holds on any rank (a stop decided together).
    pub fn any(&self, flag: bool) -> Result<bool, TrainError> {
        match &self.mode {
            Mode::Rank { group, .. } => {
                let mut t = Tensor::from_slice(&[flag as i64]).to_device(group.comm);
                self.timed(|| group.all_reduce_sum(&mut t))?;
                Ok(t.int64_value(&[0]) > 0)
            }
            _ => Ok(flag),
        }
    }

    /// Every rank takes rank 0's values of `tensors` (the weights at the
    /// start: the same by construction, made the same by fact).
    pub fn broadcast_from_rank0(&self, tensors: &[(String, Tensor)]) -> Result<(), TrainError> {
        if let Mode::Rank { group, .. } = &self.mode {
            let _g = tch::no_grad_guard();
            for (_, t) in tensors {
                let mut x = t.detach();
                self.timed(|| group.broadcast(&mut x, 0))?;
            }
        }
        Ok(())
    }
}

/// Sums the gradients of `params` over the ranks, in buckets of at most
/// [`BUCKET_BYTES`] per dtype (as PyTorch DDP does): each bucket is one
/// flat tensor, reduced by one c10d call and copied back.
fn all_reduce_buckets(group: &Group, params: &[(String, Tensor)]) -> Result<(), TrainError> {
    let _g = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
    let mut buckets: Vec<(Kind, Device, Vec<usize>, i64)> = Vec::new();
    for (i, g) in grads.iter().enumerate() {
        let bytes = g.numel() as i64 * g.kind().elt_size_in_bytes() as i64;
        let open = buckets.iter().rposition(|b| b.0 == g.kind() && b.1 == g.device() && b.3 + bytes <= BUCKET_BYTES);
        match open {
            Some(k) => {
                buckets[k].2.push(i);
                buckets[k].3 += bytes;
            }
            None => buckets.push((g.kind(), g.device(), vec![i], bytes)),
        }
    }
    for (_, _, idx, _) in buckets {
        let flat: Vec<Tensor> = idx.iter().map(|&i| grads[i].reshape([-1])).collect();
        let mut buf = Tensor::cat(&flat, 0);
        group.all_reduce_sum(&mut buf)?;
        let mut off = 0i64;
        for &i in &idx {
            let n = grads[i].numel() as i64;
            let mut g = grads[i].shallow_clone();
            g.f_copy_(&buf.narrow(0, off, n).view_as(&grads[i]))?;
            off += n;
        }
    }
    Ok(())
}

/// A byte writer/reader for what ranks exchange (rollouts, per-sample
/// results): little-endian, length-prefixed, no dependency.
#[derive(Default)]
pub struct Wire {
    pub buf: Vec<u8>,
    pos: usize,
}

impl Wire {
    pub fn reader(buf: Vec<u8>) -> Wire {
        Wire { buf, pos: 0 }
    }
    pub fn put_u64(&mut self, x: u64) {
        self.buf.extend_from_slice(&x.to_le_bytes());
    }
    pub fn put_f64(&mut self, x: f64) {
        self.put_u64(x.to_bits());
    }
    pub fn put_i64s(&mut self, v: &[i64]) {
        self.put_u64(v.len() as u64);
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub fn put_f32s(&mut self, v: &[f32]) {
        self.put_u64(v.len() as u64);
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub fn put_str(&mut self, s: &str) {
        self.put_u64(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn take(&mut self, n: usize) -> Result<&[u8], TrainError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| TrainError::Invalid("truncated message from another rank".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u64(&mut self) -> Result<u64, TrainError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or([0; 8])))
    }
    pub fn f64(&mut self) -> Result<f64, TrainError> {
        Ok(f64::from_bits(self.u64()?))
    }
    pub fn i64s(&mut self) -> Result<Vec<i64>, TrainError> {
        let n = self.u64()? as usize;
        Ok(self.take(n.saturating_mul(8))?.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>, TrainError> {
        let n = self.u64()? as usize;
        Ok(self.take(n.saturating_mul(4))?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect())
    }
    pub fn str(&mut self) -> Result<String, TrainError> {
        let n = self.u64()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| TrainError::Invalid("a rank sent text that is not UTF-8".into()))
    }
}

/// The contiguous block of `0..n` of share `share` of `world` (the first
/// `n % world` shares one longer): how evaluation prompts are spread.
pub fn block(n: usize, world: usize, share: usize) -> Range<usize> {
    let (q, r) = (n / world, n % world);
    let start = share * q + share.min(r);
    start..start + q + usize::from(share < r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_once_in_order() {
        for (n, w) in [(10, 3), (2, 4), (0, 2), (8, 2)] {
            let all: Vec<usize> = (0..w).flat_map(|s| block(n, w, s)).collect();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n}, world {w}");
        }
    }

    #[test]
    fn wire_roundtrips_exactly() {
        let mut w = Wire::default();
        w.put_i64s(&[1, -2]);
        w.put_f32s(&[f32::NAN, 0.5]);
        w.put_str("ü");
        w.put_f64(-0.0);
        let mut r = Wire::reader(w.buf);
        assert_eq!(r.i64s().unwrap(), [1, -2]);
        let f = r.f32s().unwrap();
        assert!(f[0].is_nan() && f[1] == 0.5);
        assert_eq!(r.str().unwrap(), "ü");
        assert!(r.f64().unwrap().is_sign_negative());
        assert!(r.u64().is_err(), "reading past the end is an error, not a panic");
    }

    #[test]
    fn serial_shares_sum_gradients_in_share_order() {
        // Two shares of y = w·x: gradients x₀ and x₁ summed as x₀ + x₁.
        let w = Tensor::from_slice(&[0.5f32, -1.0]).set_requires_grad(true);
        let params = vec![("w".to_string(), w.shallow_clone())];
        let xs = [Tensor::from_slice(&[0.1f32, 0.2]), Tensor::from_slice(&[1e-8f32, 3.0])];
        let d = Dist { world_size: 2, backend: Backend::Serial, device: Device::Cpu, mode: Mode::Serial, collective_s: Default::default() };
        let out = d
            .backward_shares(&params, |s| {
                (&w * &xs[s]).sum(Kind::Float).backward();
                Ok(s)
            })
            .unwrap();
        assert_eq!(out, [0, 1], "one result per share, in order");
        let expect = &xs[0] + &xs[1];
        assert!(w.grad().equal(&expect), "the sum of the shares' gradients, x₀ + x₁");
        assert_eq!(d.sum_f64(vec![vec![1.0, 2.0], vec![0.5, f64::NAN]]).unwrap()[0], 1.5);
    }
}
