//! Training: the `sft` and `grpo` stages and what they share.
//!
//! * [`optim`] — AdamW over tensors with savable state, LR schedules, clipping;
//! * [`logprobs`] — layer-wise forward/backward with per-layer gradient
//!   checkpointing and chunked log-probs (no `[B, T, V]` tensor);
//! * [`checkpoint`] — atomic checkpoints in the stage's work dir (exact resume);
//! * [`data`] — samples / coldstart Parquet reading, log Parquet writing;
//! * [`trainer`] — the core both stages share: model set-up, AdamW and
//!   schedule, resume, checkpoint and cancellation policy, outputs;
//! * [`sft`], [`grpo`] — the stage run functions.
//!
//! Determinism: every random draw derives from `(seed, step, …)` through
//! [`derive_seed`] (torch's generator is re-seeded per step and per layer,
//! data order is a ChaCha permutation per epoch), so a resumed run needs only
//! the step counter to continue the exact random stream.
use std::path::{Path, PathBuf};

use recflow::stages::sft::DType;
use tch::{Device, Kind};

pub mod checkpoint;
pub mod data;
pub mod grpo;
pub mod logprobs;
pub mod optim;
pub mod rollout;
pub mod sft;
pub mod toy;
pub mod trainer;

/// Errors of the training code.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Rl(#[from] crate::rl::RlError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl TrainError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
        move |source| TrainError::Io { path: path.to_path_buf(), source }
    }
    pub(crate) fn io_tch(path: &Path, e: tch::TchError) -> TrainError {
        TrainError::Data { path: path.to_path_buf(), msg: e.to_string() }
    }
}

/// torch's random generator is process-global. A worker process runs one
/// stage, but the test harness runs several trainings in one process at once,
/// and another thread drawing between our `manual_seed` and our draws would
/// change the numbers (the cause of a flaky gradient test). Every "seed, then
/// draw" section runs inside [`with_torch_seed`], which holds this lock.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` with torch's global generator seeded to `seed`, no other
/// [`with_torch_seed`] section interleaving.
pub fn with_torch_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let _g = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed((seed & i64::MAX as u64) as i64);
    f()
}

/// splitmix64 over `(seed, a, b)`: independent, reproducible sub-seeds.
pub fn derive_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut x = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Indices of the examples of optimizer step `step` (0-based): position
/// `step·E ..` in the concatenation of per-epoch ChaCha permutations.
pub fn step_indices(n: usize, per_step: usize, step: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(per_step);
    let mut pos = step * per_step;
    while out.len() < per_step {
        let epoch = pos / n;
        let mut perm: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(perm.as_mut_slice(), &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(derive_seed(seed, 0xe0c4, epoch as u64)));
        let take = (n - pos % n).min(per_step - out.len());
        out.extend_from_slice(&perm[pos % n..pos % n + take]);
        pos += take;
    }
    out
}

/// Packs rows into micro-batches of at most `budget` padded tokens
/// (rows × longest row; at least one row each), shortest first so rows of
/// similar length share a batch. Returns indices into `lens`. Used by `sft`
/// (`max_tokens_per_microbatch`) and `grpo`.
pub fn micro_batches(lens: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_max = 0;
    for i in order {
        let m = cur_max.max(lens[i]);
        if !cur.is_empty() && m * (cur.len() + 1) > budget {
            out.push(std::mem::take(&mut cur));
            cur_max = 0;
        }
        cur_max = cur_max.max(lens[i]);
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `cpu`, `cuda`, `cuda:N` → a tch device (the runner resolved `auto`).
pub fn parse_device(s: &str) -> Result<Device, TrainError> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| TrainError::Invalid(format!("device must be cpu, cuda or cuda:N, got {s:?}"))),
    }
}

/// How weights are stored and computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Precision {
    /// dtype the base weights are loaded in.
    pub load: Kind,
    /// bf16 autocast around forward passes (CUDA only; tch ignores it on CPU).
    pub autocast: bool,
}

impl Precision {
    /// Full fine-tuning keeps f32 master weights and autocasts to bf16 on
    /// CUDA; LoRA keeps the frozen base in bf16 (half the memory) and the
    /// adapters in f32. CPU computes in f32 unless bf16 is asked for.
    pub fn resolve(dtype: DType, device: Device, lora: bool) -> Precision {
        let cuda = device.is_cuda();
        match dtype {
            DType::Float32 => Precision { load: Kind::Float, autocast: false },
            DType::Auto if !cuda => Precision { load: Kind::Float, autocast: false },
            DType::Auto | DType::Bfloat16 => {
                if lora {
                    Precision { load: Kind::BFloat16, autocast: cuda }
                } else {
                    Precision { load: Kind::Float, autocast: cuda }
                }
            }
        }
    }
}

/// Median of wall-clock samples (run-record statistic), None when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

/// Peak memory and CPU time of each optimizer step, for the run record
/// (`metrics.json`), never the `log` Parquet: these figures differ machine to
/// machine and the log must stay a pure function of the key.
///
/// CPU time (user + system, all threads, from `/proc/self/stat` in the
/// kernel's fixed 100 Hz `USER_HZ` ticks) says what a step costs on a shared
/// machine, where wall time mostly measures the other load.
///
/// CPU, Linux: a sampler thread reads the resident set size (`VmRSS`) every
/// [`StepMeter::PERIOD`] and keeps the step's maximum; when the process's
/// high-water mark (`VmHWM`) rose during the step, that mark is the step's
/// exact peak and replaces the sample. The mark is never reset
/// (`/proc/self/clear_refs` would also lower the `ru_maxrss` that
/// `/usr/bin/time` and the benchmarks read).
///
/// CUDA ([`StepMeter::on`] a CUDA device): the caching allocator's peak
/// counters are reset at each step's start and read at its end
/// ([`crate::cuda`]), giving the step's peak allocated and reserved bytes —
/// PyTorch's `max_memory_allocated` / `max_memory_reserved`.
pub struct StepMeter {
    cuda: Option<usize>,
    /// Per step: (peak allocated, peak reserved) bytes on the CUDA device.
    cuda_peaks: Vec<(u64, u64)>,
    peaks: Vec<u64>,
    hwm_at_begin: u64,
    cpu: Vec<f64>,
    cpu_at_begin: Option<f64>,
    sampled: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl StepMeter {
    /// Sampling period of the RSS sampler (a /proc read costs microseconds).
    pub const PERIOD: std::time::Duration = std::time::Duration::from_millis(5);

    pub fn new() -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let sampled = std::sync::Arc::new(AtomicU64::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (s2, st2) = (sampled.clone(), stop.clone());
        let sampler = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !st2.load(Ordering::Relaxed) {
                    if let Some(b) = status_bytes("VmRSS:") {
                        s2.fetch_max(b, Ordering::Relaxed);
                    }
                    std::thread::sleep(Self::PERIOD);
                }
            })
            .ok();
        StepMeter {
            cuda: None,
            cuda_peaks: Vec::new(),
            peaks: Vec::new(),
            hwm_at_begin: 0,
            cpu: Vec::new(),
            cpu_at_begin: None,
            sampled,
            stop,
            sampler,
        }
    }

    /// Host figures plus, on a CUDA device, the allocator's per-step peaks.
    pub fn on(device: Device) -> Self {
        let mut s = Self::new();
        if let Device::Cuda(d) = device {
            s.cuda = Some(d);
        }
        s
    }

    /// Takes one RSS sample now (the sampler thread does this every PERIOD).
    pub fn sample(&self) {
        if let Some(b) = status_bytes("VmRSS:") {
            self.sampled.fetch_max(b, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Call at the start of a step.
    pub fn begin(&mut self) {
        if let Some(d) = self.cuda {
            crate::cuda::reset_peak(d);
        }
        self.cpu_at_begin = process_cpu_s();
        self.hwm_at_begin = peak_rss_bytes().unwrap_or(0);
        let now = status_bytes("VmRSS:").unwrap_or(0);
        self.sampled.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Call at the end of a step.
    pub fn end(&mut self) {
        let hwm = peak_rss_bytes().unwrap_or(0);
        let sampled = self.sampled.load(std::sync::atomic::Ordering::Relaxed).max(status_bytes("VmRSS:").unwrap_or(0));
        let peak = if hwm > self.hwm_at_begin { hwm } else { sampled };
        if peak > 0 {
            self.peaks.push(peak);
        }
        if let (Some(a), Some(b)) = (self.cpu_at_begin.take(), process_cpu_s()) {
            self.cpu.push(b - a);
        }
        if let Some(m) = self.cuda.and_then(crate::cuda::mem_stats) {
            self.cuda_peaks.push((m.allocated_peak, m.reserved_peak));
        }
    }

    /// `step_peak_rss_bytes_{max,median,last}` and `step_cpu_s_median` over
    /// the steps run.
    pub fn insert_metrics(&self, m: &mut recflow::stages::Metrics) {
        m.insert("step_cpu_s_median".into(), serde_json::json!(median(&self.cpu)));
        let f: Vec<f64> = self.peaks.iter().map(|&b| b as f64).collect();
        m.insert("step_peak_rss_bytes_max".into(), serde_json::json!(self.peaks.iter().max()));
        m.insert("step_peak_rss_bytes_median".into(), serde_json::json!(median(&f).map(|x| x as u64)));
        m.insert("step_peak_rss_bytes_last".into(), serde_json::json!(self.peaks.last()));
        if self.cuda.is_some() {
            let alloc: Vec<f64> = self.cuda_peaks.iter().map(|p| p.0 as f64).collect();
            m.insert("step_peak_cuda_allocated_bytes_max".into(), serde_json::json!(self.cuda_peaks.iter().map(|p| p.0).max()));
            m.insert("step_peak_cuda_allocated_bytes_median".into(), serde_json::json!(median(&alloc).map(|x| x as u64)));
            m.insert("step_peak_cuda_reserved_bytes_max".into(), serde_json::json!(self.cuda_peaks.iter().map(|p| p.1).max()));
            if self.cuda_peaks.is_empty() {
                m.insert("note_cuda_memory".into(), serde_json::json!("CUDA allocator statistics unavailable in this build (see ml/build.rs)"));
            }
        }
    }
}

impl Default for StepMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StepMeter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
    }
}

/// User + system CPU seconds of this process (all threads) so far.
fn process_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name (which may hold spaces):
    // state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// A `kB` line of `/proc/self/status` in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), for the
/// run record. None elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_respect_the_token_budget() {
        let mb = micro_batches(&[10, 3, 7, 4], 14);
        // Sorted by length: 3, 4, 7, 10 → [3, 4] (2·4 = 8; 3·7 = 21 > 14) → [7] (2·10 > 14) → [10].
        assert_eq!(mb, vec![vec![1, 3], vec![2], vec![0]]);
        assert_eq!(micro_batches(&[100], 10), vec![vec![0]], "an over-long row still gets its own batch");
    }

    #[test]
    fn derived_seeds_differ_and_repeat() {
        assert_eq!(derive_seed(1, 2, 3), derive_seed(1, 2, 3), "same inputs, same seed");
        assert_ne!(derive_seed(1, 2, 3), derive_seed(1, 3, 2), "argument order matters");
        assert_ne!(derive_seed(1, 2, 3), derive_seed(2, 2, 3));
    }

    #[test]
    fn step_stats_see_a_step_allocation() {
        let mut mem = StepMeter::new();
        let before = status_bytes("VmRSS:").expect("Linux reports VmRSS");
        mem.begin();
        // A step that touches 64 MiB and frees it before the step ends.
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        mem.sample(); // what the sampler thread does while the step runs
        drop(v);
        mem.end();
        let mut m = recflow::stages::Metrics::new();
        mem.insert_metrics(&mut m);
        let max = m["step_peak_rss_bytes_max"].as_u64().expect("one step measured");
        assert!(m["step_cpu_s_median"].as_f64().is_some_and(|c| c >= 0.0), "the step's CPU time is measured");
        assert!(max >= before + (60 << 20), "the step's peak must include the 64 MiB it touched and freed: {before} → {max}");
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cuda:1").unwrap(), Device::Cuda(1));
        assert!(parse_device("auto").is_err(), "the runner resolves auto before the worker");
    }
}
