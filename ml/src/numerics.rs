//! The worker's half of the numerics profile ([`recflow::numerics`]): reads
//! back what libtorch has in force — ATen's CPU capability and MKL's CNR
//! branch through the shim in `numerics.cpp` (cfg `recflow_numerics_shim`),
//! torch's intra-op thread count through tch — and refuses to run a stage
//! whose requested profile (`RECFLOW_NUMERICS`, set by the runner) was not
//! applied.
use std::path::PathBuf;

use recflow::numerics::{mkl_branch_name, Cpu, Profile, Request, Resolved};

/// The libtorch library this process loaded and its version (PyTorch's
/// `torch/version.py` next to `lib/`), from `/proc/self/maps`.
pub fn libtorch_info() -> Option<(PathBuf, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.contains("libtorch_cpu"))?;
    let lib = PathBuf::from(lib);
    let root = lib.parent()?.parent()?; // .../torch/lib/libtorch_cpu.so → .../torch
    let ver = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("__version__"))
                .and_then(|l| l.split(['\'', '"']).nth(1).map(String::from))
        })
        .or_else(|| std::fs::read_to_string(root.join("build-version")).ok().map(|s| s.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    Some((lib, ver))
}

#[cfg(recflow_numerics_shim)]
mod ffi {
    extern "C" {
        pub fn recflow_aten_cpu_capability(buf: *mut std::ffi::c_char, n: i32) -> i32;
        pub fn recflow_mkl_cbwr_branch() -> i32;
    }
}

/// ATen's CPU capability in force, lowercase; `unknown` without the shim.
pub fn aten_capability() -> String {
    #[cfg(recflow_numerics_shim)]
    {
        let mut buf = [0 as std::ffi::c_char; 64];
        // SAFETY: the shim writes at most `buf.len()` bytes, NUL included,
        // and catches every C++ exception.
        let n = unsafe { ffi::recflow_aten_cpu_capability(buf.as_mut_ptr(), buf.len() as i32) };
        if n >= 0 {
            // SAFETY: a non-negative answer means a NUL-terminated string in `buf`.
            let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
            return s.to_string_lossy().to_ascii_lowercase();
        }
    }
    "unknown".into()
}

/// MKL's CNR branch in force (`absent` without MKL, `unknown` without the shim).
pub fn mkl_branch() -> String {
    #[cfg(recflow_numerics_shim)]
    {
        // SAFETY: a plain C call; the shim looks the MKL entry point up first.
        let code = unsafe { ffi::recflow_mkl_cbwr_branch() };
        return if code == -2 { "absent".into() } else { mkl_branch_name(code) };
    }
    #[allow(unreachable_code)]
    {
        let _ = mkl_branch_name;
        "unknown".into()
    }
}

/// The profile in force in this process; `requested` is the canonical
/// request it is checked against (empty when none was made).
pub fn observe(requested: Option<&Resolved>) -> Profile {
    let cpu = Cpu::read();
    Profile {
        requested: requested.map(|r| r.to_string()).unwrap_or_default(),
        cpu_vendor: cpu.vendor,
        cpu_model: cpu.model,
        aten: aten_capability(),
        mkl: mkl_branch(),
        threads: tch::get_num_threads().max(0) as u32,
        torch: libtorch_info().map(|(_, v)| v).unwrap_or_default(),
        onednn_max_isa: std::env::var("ONEDNN_MAX_CPU_ISA").ok(),
        world_size: None,
    }
}

/// The request this worker was started with (`RECFLOW_NUMERICS`; None when
/// unset, e.g. a worker started by hand) and the profile in force.
/// Err: the request does not parse, or a field was not applied — one
/// message naming every such field.
pub fn check() -> Result<(Option<Resolved>, Profile), String> {
    let req = match std::env::var_os(recflow::numerics::ENV) {
        None => None,
        Some(_) => Some(Request::from_env().map_err(|e| e.to_string())?.resolve()),
    };
    let prof = observe(req.as_ref());
    if let Some(r) = &req {
        let bad = r.not_applied(&prof);
        if !bad.is_empty() {
            return Err(format!(
                "numerics profile `{r}` was not applied ({}): {}",
                prof.summary(),
                bad.join("; ")
            ));
        }
    }
    Ok((req, prof))
}

/// Before `exec-stage`: checks the profile and announces it to the runner as
/// a `{"numerics": {...}}` event line. Err = exit 2.
pub fn enforce_for_stage() -> Result<Profile, String> {
    let (_, prof) = check()?;
    println!("{}", serde_json::json!({ "numerics": prof }));
    Ok(prof)
}
