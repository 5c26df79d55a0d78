//! The numerics profile (ARCHITECTURE "Interfaces (pinned)" → "Numerics
//! profile"): which CPU code paths libtorch's kernels take, pinned by the
//! runner in every worker's environment, read back by the worker, recorded
//! in run records and the lock.
//!
//! * [`Request`]: what the user asked for, from `RECFLOW_NUMERICS` (or
//!   `--numerics`): a comma list `aten=avx2,mkl=compatible,threads=2`;
//!   omitted fields take [`Request::DEFAULT`].
//! * [`Resolved`]: the request with `threads=auto` made a number; its
//!   [`Resolved::env`] is what the runner sets in the worker's environment
//!   (`ATEN_CPU_CAPABILITY`, `MKL_CBWR`, `OMP_NUM_THREADS`, `MKL_NUM_THREADS`,
//!   `ONEDNN_MAX_CPU_ISA`/`DNNL_MAX_CPU_ISA`, and `RECFLOW_NUMERICS` itself in
//!   canonical form, which the worker checks against what is in force).
//! * [`Profile`]: what a worker observed in force (CPU vendor and model, the
//!   ATen capability, MKL's CNR branch, the intra-op thread count, torch's
//!   version). Stored as `numerics` in run records and lock stages; never
//!   part of a stage key.
//!
//! [`Profile::differences`] decides whether two profiles can be expected to
//! give the same bytes; `verify` compares bytes when they can, and metrics
//! within [`TOLERANCE`] when they cannot (docs/engine.md "Numerics profile").
use std::fmt;

use serde::{Deserialize, Serialize};

/// The environment variable holding the requested profile.
pub const ENV: &str = "RECFLOW_NUMERICS";

/// Relative tolerance `verify` uses on metrics when the profiles differ:
/// |a−b| ≤ tol·max(1, |a|, |b|) for every number (see docs/engine.md).
pub const TOLERANCE: f64 = 1e-2;

/// ATen's CPU capability (`ATEN_CPU_CAPABILITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aten {
    /// Not pinned: ATen picks the machine's best (recorded as what it picked).
    Native,
    /// Scalar kernels (no explicit vectorisation).
    Default,
    Avx2,
    Avx512,
}

/// MKL's conditional-numerical-reproducibility branch (`MKL_CBWR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mkl {
    /// Not pinned (MKL dispatches per CPU, no CNR).
    Off,
    Auto,
    /// Vendor-neutral SSE2-class code: the same bytes on Intel and AMD.
    Compatible,
    /// Intel CPUs only: on other vendors MKL runs its AUTO branch instead.
    Avx2,
    Avx512,
}

/// The intra-op thread count (`OMP_NUM_THREADS`, `MKL_NUM_THREADS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// The CPUs this process may use.
    Auto,
    N(u32),
}

/// A requested profile (declared).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub aten: Aten,
    pub mkl: Mkl,
    pub threads: Threads,
}

/// A request with the thread count resolved on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub aten: Aten,
    pub mkl: Mkl,
    pub threads: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NumericsError {
    #[error("{ENV}: `{0}` is not FIELD=VALUE (fields: aten, mkl, threads; e.g. `aten=avx2,mkl=compatible,threads=2`)")]
    Syntax(String),
    #[error("{ENV}: unknown field `{0}` (fields: aten, mkl, threads)")]
    Field(String),
    #[error("{ENV}: `{field}={value}`: expected one of {expected}")]
    Value { field: &'static str, value: String, expected: &'static str },
}

impl Aten {
    fn parse(v: &str) -> Option<Aten> {
        Some(match v {
            "native" => Aten::Native,
            "default" => Aten::Default,
            "avx2" => Aten::Avx2,
            "avx512" => Aten::Avx512,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Aten::Native => "native",
            Aten::Default => "default",
            Aten::Avx2 => "avx2",
            Aten::Avx512 => "avx512",
        }
    }
    /// oneDNN's ISA cap matching the ATen capability (None: not capped).
    fn onednn(self) -> Option<&'static str> {
        match self {
            Aten::Native => None,
            Aten::Default => Some("SSE41"),
            Aten::Avx2 => Some("AVX2"),
            Aten::Avx512 => Some("AVX512_CORE"),
        }
    }
}

impl Mkl {
    fn parse(v: &str) -> Option<Mkl> {
        Some(match v {
            "off" | "native" => Mkl::Off,
            "auto" => Mkl::Auto,
            "compatible" => Mkl::Compatible,
            "avx2" => Mkl::Avx2,
            "avx512" => Mkl::Avx512,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Mkl::Off => "off",
            Mkl::Auto => "auto",
            Mkl::Compatible => "compatible",
            Mkl::Avx2 => "avx2",
            Mkl::Avx512 => "avx512",
        }
    }
}

/// The name of MKL's `mkl_cbwr_get(MKL_CBWR_BRANCH)` answer (mkl_cbwr.h).
pub fn mkl_branch_name(code: i32) -> String {
    let base = match code & !0x10000 {
        0 | 1 => "off",
        2 => "auto",
        3 => "compatible",
        4 => "sse2",
        6 => "ssse3",
        7 => "sse4_1",
        8 => "sse4_2",
        9 => "avx",
        10 => "avx2",
        11 => "avx512_mic",
        12 => "avx512",
        13 => "avx512_mic_e1",
        14 => "avx512_e1",
        _ => return format!("unknown({code})"),
    };
    if code & 0x10000 != 0 {
        format!("{base}+strict")
    } else {
        base.to_string()
    }
}

impl Request {
    /// The documented default (docs/engine.md "Numerics profile" has the
    /// measurements behind it): AVX2 kernels in ATen, which every x86-64 CPU
    /// of the last decade has, MKL's vendor-neutral COMPATIBLE branch, and
    /// the machine's CPUs as threads (recorded; another count is another
    /// profile).
    pub const DEFAULT: Request = Request { aten: Aten::Avx2, mkl: Mkl::Compatible, threads: Threads::Auto };

    /// Parses `aten=avx2,mkl=compatible,threads=2` (any subset, any order;
    /// empty = the default).
    pub fn parse(s: &str) -> Result<Request, NumericsError> {
        let mut r = Request::DEFAULT;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| NumericsError::Syntax(part.into()))?;
            let (k, v) = (k.trim(), v.trim().to_ascii_lowercase());
            match k {
                "aten" => {
                    r.aten = Aten::parse(&v).ok_or(NumericsError::Value {
                        field: "aten",
                        value: v.clone(),
                        expected: "native, default, avx2, avx512",
                    })?
                }
                "mkl" => {
                    r.mkl = Mkl::parse(&v).ok_or(NumericsError::Value {
                        field: "mkl",
                        value: v.clone(),
                        expected: "off (= native), auto, compatible, avx2, avx512",
                    })?
                }
                "threads" => {
                    r.threads = match v.as_str() {
                        "auto" => Threads::Auto,
                        n => match n.parse::<u32>() {
                            Ok(n) if n > 0 => Threads::N(n),
                            _ => {
                                return Err(NumericsError::Value {
                                    field: "threads",
                                    value: v.clone(),
                                    expected: "auto or a positive integer",
                                })
                            }
                        },
                    }
                }
                other => return Err(NumericsError::Field(other.into())),
            }
        }
        Ok(r)
    }

    /// The request of this process: `RECFLOW_NUMERICS`, else the default.
    pub fn from_env() -> Result<Request, NumericsError> {
        match std::env::var(ENV) {
            Ok(s) => Request::parse(&s),
            Err(_) => Ok(Request::DEFAULT),
        }
    }

    /// `threads=auto` → the CPUs available to this process.
    pub fn resolve(self) -> Resolved {
        let threads = match self.threads {
            Threads::N(n) => n,
            Threads::Auto => std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        };
        Resolved { aten: self.aten, mkl: self.mkl, threads }
    }
}

impl fmt::Display for Resolved {
    /// Canonical form: `aten=avx2,mkl=compatible,threads=2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "aten={},mkl={},threads={}", self.aten.name(), self.mkl.name(), self.threads)
    }
}

impl Resolved {
    /// The worker environment: `(name, Some(value))` to set, `(name, None)`
    /// to remove (a field left to the library must not inherit the shell's).
    pub fn env(&self) -> Vec<(&'static str, Option<String>)> {
        let aten = match self.aten {
            Aten::Native => None,
            a => Some(a.name().to_string()),
        };
        let mkl = match self.mkl {
            Mkl::Off => None,
            m => Some(m.name().to_ascii_uppercase()),
        };
        let onednn = self.aten.onednn().map(String::from);
        let t = Some(self.threads.to_string());
        vec![
            (ENV, Some(self.to_string())),
            ("ATEN_CPU_CAPABILITY", aten),
            ("MKL_CBWR", mkl),
            ("OMP_NUM_THREADS", t.clone()),
            ("MKL_NUM_THREADS", t),
            ("ONEDNN_MAX_CPU_ISA", onednn.clone()),
            ("DNNL_MAX_CPU_ISA", onednn),
        ]
    }

    /// Applies [`Resolved::env`] to a command.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        for (k, v) in self.env() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
    }

    /// The fields of this request that `observed` does not have in force
    /// (empty = applied). `native`/`off` accept whatever the library picked.
    pub fn not_applied(&self, observed: &Profile) -> Vec<String> {
        let mut bad = Vec::new();
        if self.aten != Aten::Native && observed.aten != self.aten.name() {
            bad.push(format!(
                "aten: requested {}, ATen runs {} (ATEN_CPU_CAPABILITY={}; a capability this CPU lacks is ignored by ATen)",
                self.aten.name(),
                observed.aten,
                std::env::var("ATEN_CPU_CAPABILITY").unwrap_or_else(|_| "(unset)".into())
            ));
        }
        if self.mkl != Mkl::Off && observed.mkl != self.mkl.name() {
            bad.push(format!(
                "mkl: requested {}, MKL runs branch {} (MKL_CBWR={}; MKL runs AUTO for its Intel-only branches on other vendors — use mkl=compatible or mkl=auto there)",
                self.mkl.name(),
                observed.mkl,
                std::env::var("MKL_CBWR").unwrap_or_else(|_| "(unset)".into())
            ));
        }
        if observed.threads != self.threads {
            bad.push(format!(
                "threads: requested {}, torch runs {} intra-op threads (OMP_NUM_THREADS={})",
                self.threads,
                observed.threads,
                std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| "(unset)".into())
            ));
        }
        bad
    }

    /// What a worker of this machine would observe, as far as the torch-free
    /// runner can tell (`status`): `native` from /proc/cpuinfo's flags (ATen's
    /// own rule), `off`/`auto` as such, torch's version unknown (empty).
    pub fn predict(&self) -> Profile {
        let cpu = Cpu::read();
        let aten = match self.aten {
            Aten::Native => cpu.best_aten().to_string(),
            a => a.name().to_string(),
        };
        Profile {
            requested: self.to_string(),
            cpu_vendor: cpu.vendor,
            cpu_model: cpu.model,
            aten,
            mkl: self.mkl.name().to_string(),
            threads: self.threads,
            torch: String::new(),
            onednn_max_isa: self.aten.onednn().map(String::from),
            world_size: None,
        }
    }
}

/// The CPU as /proc/cpuinfo describes it.
#[derive(Debug, Clone, Default)]
pub struct Cpu {
    pub vendor: String,
    pub model: String,
    pub flags: Vec<String>,
}

impl Cpu {
    pub fn read() -> Cpu {
        Cpu::parse(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
    }

    pub fn parse(text: &str) -> Cpu {
        let field = |name: &str| {
            text.lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        Cpu {
            vendor: field("vendor_id"),
            model: field("model name"),
            flags: field("flags").split_whitespace().map(String::from).collect(),
        }
    }

    /// ATen's choice without `ATEN_CPU_CAPABILITY` on x86-64 (DispatchStub.cpp:
    /// AVX-512 needs F, CD, BW, DQ, VL and FMA; AVX2 needs AVX2 and FMA).
    pub fn best_aten(&self) -> &'static str {
        let has = |f: &str| self.flags.iter().any(|x| x == f);
        if ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "fma"].iter().all(|f| has(f)) {
            "avx512"
        } else if has("avx2") && has("fma") {
            "avx2"
        } else {
            "default"
        }
    }
}

/// The profile a worker had in force (observed): recorded per stage in run
/// records and the lock (`numerics`), printed by `doctor`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Profile {
    /// The resolved request, canonical (`aten=avx2,mkl=compatible,threads=2`).
    pub requested: String,
    /// /proc/cpuinfo `vendor_id` (GenuineIntel, AuthenticAMD).
    pub cpu_vendor: String,
    /// /proc/cpuinfo `model name`.
    pub cpu_model: String,
    /// ATen's CPU capability in force, lowercase (`avx2`, `avx512`, `default`).
    pub aten: String,
    /// MKL's CNR branch in force (`compatible`, `auto`, `off`, ... ; `absent`
    /// when libtorch has no MKL).
    pub mkl: String,
    /// torch's intra-op thread count.
    pub threads: u32,
    /// torch's version (empty where unknown: the runner's prediction).
    pub torch: String,
    /// oneDNN's ISA cap as set (not read back; oneDNN serves convolutions and
    /// bf16 matmuls, which recflow's f32 CPU path does not use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onednn_max_isa: Option<String>,
    /// Ranks of a data-parallel stage (`world_size` > 1), each running
    /// `threads` intra-op threads (the requested threads ÷ ranks; see
    /// [`crate::dist`]). Absent for single-process stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
}

impl Profile {
    /// The fields in which `other` differs from `self` in a way that can
    /// change output bytes: the ATen capability, the MKL branch, the thread
    /// count, torch's version (when both are known), the CPU vendor unless
    /// MKL runs its vendor-neutral COMPATIBLE branch, and the CPU model when
    /// MKL dispatches per CPU (`auto`, `off`). Empty = the same bytes are
    /// expected.
    pub fn differences(&self, other: &Profile) -> Vec<String> {
        let mut d = Vec::new();
        let mut cmp = |name: &str, a: &str, b: &str| {
            if a != b {
                d.push(format!("{name} {a} → {b}"));
            }
        };
        cmp("aten", &self.aten, &other.aten);
        cmp("mkl", &self.mkl, &other.mkl);
        cmp("threads", &self.threads.to_string(), &other.threads.to_string());
        cmp("ranks", &self.world_size.unwrap_or(1).to_string(), &other.world_size.unwrap_or(1).to_string());
        if !self.torch.is_empty() && !other.torch.is_empty() {
            cmp("torch", &self.torch, &other.torch);
        }
        let neutral = self.mkl == "compatible" && other.mkl == "compatible";
        if !neutral {
            cmp("cpu vendor", &self.cpu_vendor, &other.cpu_vendor);
        }
        if ["auto", "off"].contains(&self.mkl.as_str()) || ["auto", "off"].contains(&other.mkl.as_str()) {
            cmp("cpu model", &self.cpu_model, &other.cpu_model);
        }
        d
    }

    /// One line: `aten=avx2 mkl=compatible threads=2 torch=2.11.0 on AuthenticAMD "AMD EPYC"`
    /// (`threads=1×2 ranks` for a data-parallel stage).
    pub fn summary(&self) -> String {
        format!(
            "aten={} mkl={} threads={}{}{} on {} \"{}\"",
            self.aten,
            self.mkl,
            self.threads,
            self.world_size.map(|w| format!("×{w} ranks")).unwrap_or_default(),
            if self.torch.is_empty() { String::new() } else { format!(" torch={}", self.torch) },
            self.cpu_vendor,
            self.cpu_model
        )
    }
}

/// Metrics that measure the run rather than its result (times, rates,
/// memory): left out of `verify`'s tolerance comparison.
pub fn is_operational_metric(name: &str) -> bool {
    name.ends_with("_s") || name.contains("_s_") || name.contains("rss") || name.ends_with("_bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_in_any_order_and_defaults_the_rest() {
        let r = Request::parse("threads=2, mkl=AUTO").unwrap();
        assert_eq!(r, Request { aten: Aten::Avx2, mkl: Mkl::Auto, threads: Threads::N(2) }, "omitted aten takes the default");
        assert_eq!(Request::parse("").unwrap(), Request::DEFAULT, "empty is the default profile");
        assert_eq!(Request::parse("aten=native").unwrap().aten, Aten::Native);
        assert!(matches!(Request::parse("aten=sse9"), Err(NumericsError::Value { field: "aten", .. })), "a bad value names its field");
        assert!(matches!(Request::parse("blas=mkl"), Err(NumericsError::Field(_))), "an unknown field is refused");
        assert!(matches!(Request::parse("threads=0"), Err(NumericsError::Value { field: "threads", .. })));
        assert!(matches!(Request::parse("avx2"), Err(NumericsError::Syntax(_))));
    }

    #[test]
    fn env_sets_pinned_fields_and_removes_native_ones() {
        let r = Request::parse("aten=avx2,mkl=compatible,threads=3").unwrap().resolve();
        assert_eq!(r.to_string(), "aten=avx2,mkl=compatible,threads=3", "canonical form");
        let env: std::collections::BTreeMap<_, _> = r.env().into_iter().collect();
        assert_eq!(env["ATEN_CPU_CAPABILITY"].as_deref(), Some("avx2"));
        assert_eq!(env["MKL_CBWR"].as_deref(), Some("COMPATIBLE"));
        assert_eq!(env["OMP_NUM_THREADS"].as_deref(), Some("3"));
        assert_eq!(env[ENV].as_deref(), Some("aten=avx2,mkl=compatible,threads=3"), "the worker checks the canonical request");
        let n = Request::parse("aten=native,mkl=off,threads=1").unwrap().resolve();
        let env: std::collections::BTreeMap<_, _> = n.env().into_iter().collect();
        assert_eq!(env["ATEN_CPU_CAPABILITY"], None, "native removes an inherited ATEN_CPU_CAPABILITY");
        assert_eq!(env["MKL_CBWR"], None);
    }

    fn prof(aten: &str, mkl: &str, threads: u32, vendor: &str) -> Profile {
        Profile {
            requested: String::new(),
            cpu_vendor: vendor.into(),
            cpu_model: format!("{vendor} model"),
            aten: aten.into(),
            mkl: mkl.into(),
            threads,
            torch: "2.11.0".into(),
            onednn_max_isa: None,
            world_size: None,
        }
    }

    #[test]
    fn not_applied_names_each_field() {
        let r = Request::parse("aten=avx2,mkl=compatible,threads=2").unwrap().resolve();
        assert!(r.not_applied(&prof("avx2", "compatible", 2, "AuthenticAMD")).is_empty(), "applied profile passes");
        let bad = r.not_applied(&prof("default", "auto", 1, "AuthenticAMD"));
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].starts_with("aten:") && bad[1].starts_with("mkl:") && bad[2].starts_with("threads:"), "{bad:?}");
        let native = Request::parse("aten=native,mkl=off,threads=2").unwrap().resolve();
        assert!(native.not_applied(&prof("avx512", "off", 2, "x")).is_empty(), "native accepts what ATen picked");
    }

    #[test]
    fn differences_follow_what_changes_bytes() {
        let amd = prof("avx2", "compatible", 2, "AuthenticAMD");
        let intel = Profile { cpu_model: "Xeon".into(), ..prof("avx2", "compatible", 2, "GenuineIntel") };
        assert!(amd.differences(&intel).is_empty(), "COMPATIBLE is vendor-neutral");
        let (amd_a, intel_a) = (Profile { mkl: "auto".into(), ..amd.clone() }, Profile { mkl: "auto".into(), ..intel });
        assert!(amd_a.differences(&intel_a).iter().any(|d| d.starts_with("cpu vendor")), "AUTO depends on the vendor");
        let d = amd.differences(&prof("default", "compatible", 2, "AuthenticAMD"));
        assert_eq!(d, vec!["aten avx2 → default".to_string()]);
        assert!(!amd.differences(&prof("avx2", "compatible", 4, "AuthenticAMD")).is_empty(), "thread count matters");
        let ranks = Profile { world_size: Some(2), ..amd.clone() };
        assert_eq!(amd.differences(&ranks), vec!["ranks 1 → 2".to_string()], "the rank count matters");
        assert!(ranks.summary().contains("threads=2×2 ranks"), "{}", ranks.summary());
        let unknown_torch = Profile { torch: String::new(), ..amd.clone() };
        assert!(amd.differences(&unknown_torch).is_empty(), "an unknown torch version is not a difference");
    }

    #[test]
    fn cpuinfo_parse_and_native_prediction() {
        let c = Cpu::parse("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n");
        assert_eq!((c.vendor.as_str(), c.model.as_str(), c.best_aten()), ("AuthenticAMD", "AMD EPYC", "avx2"));
        assert_eq!(mkl_branch_name(3), "compatible");
        assert_eq!(mkl_branch_name(2 | 0x10000), "auto+strict");
        assert!(is_operational_metric("step_s_median") && is_operational_metric("wall_s") && is_operational_metric("peak_rss_bytes"));
        assert!(!is_operational_metric("final_loss") && !is_operational_metric("frac_reward_zero_std_mean") && !is_operational_metric("users"));
    }
}
