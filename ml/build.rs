//! Link flags for binaries that load libtorch.
//!
//! * rpath to PyTorch's `lib` dir, so the worker starts without LD_LIBRARY_PATH;
//! * `torch_cuda` forced in with `--no-as-needed`: nothing references its
//!   symbols directly, so the default `--as-needed` drops it and tch then
//!   silently reports no CUDA device;
//! * a small C++ shim (`src/cuda/mem_stats.cpp`, against libtorch's c10
//!   headers) for the CUDA caching allocator's peak statistics, which tch
//!   does not expose; cfg `recflow_cuda_mem` says it was built. Without it
//!   the training stages report host memory only.
//! * a second shim (`src/numerics.cpp`, against ATen's headers) that reads
//!   back ATen's CPU capability and MKL's CNR branch for the numerics
//!   profile; cfg `recflow_numerics_shim`. Without it the worker reports
//!   both as `unknown` and refuses a profile that pins them.
//! * a third shim (`src/dist/`, against c10d's headers, with Gloo's from
//!   Debian's libgloo-dev and NCCL's and CUDA's from the wheels next to
//!   torch) for data-parallel training's collectives; cfg `recflow_dist`.
//!   All three are compiled by one helper, [`compile_shim`].
//!
//! Emitted with `rustc-link-arg`, which reaches only this package's own
//! linked targets (the worker, its tests, examples and benches): every one of
//! them loads libtorch. The torch-free `recflow` runner is another package and
//! stays unaffected; global RUSTFLAGS would also reach proc-macro crates.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles one C++ shim against libtorch's headers into a static library
/// `name`; on success links the `dylibs` it needs and sets cfg `name`. A
/// failure is a warning: the worker then reports the feature unavailable.
fn compile_shim(torch_lib: &Path, name: &str, files: &[&str], includes: &[PathBuf], defines: &[&str], dylibs: &[&str], cfgs: &[&str]) -> bool {
    let Some(inc) = torch_lib.parent().map(|t| t.join("include")) else { return false };
    let mut b = cc::Build::new();
    b.cpp(true)
        .include(&inc)
        .include(inc.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false);
    for f in files {
        b.file(f);
    }
    for i in includes {
        b.include(i);
    }
    for d in defines {
        b.define(d, "1");
    }
    match b.try_compile(name) {
        Ok(()) => {
            println!("cargo:rustc-link-search=native={}", torch_lib.display());
            for l in dylibs {
                println!("cargo:rustc-link-lib=dylib={l}");
            }
            for c in std::iter::once(&name).chain(cfgs) {
                println!("cargo:rustc-cfg={c}");
            }
            true
        }
        Err(e) => {
            println!("cargo:warning={name} ({}) not built: {e}", files.join(", "));
            false
        }
    }
}

/// The allocator-statistics shim, when libtorch's headers are there.
fn build_cuda_shim(torch_lib: &Path) {
    let Some(inc) = torch_lib.parent().map(|t| t.join("include")) else { return };
    if inc.join("c10/core/CachingDeviceAllocator.h").exists() {
        compile_shim(torch_lib, "recflow_cuda_mem", &["src/cuda/mem_stats.cpp"], &[], &[], &["c10"], &[]);
    }
}

/// The numerics read-back shim, when ATen's headers are there.
fn build_numerics_shim(torch_lib: &Path) {
    let Some(inc) = torch_lib.parent().map(|t| t.join("include")) else { return };
    if !inc.join("ATen/Version.h").exists() {
        println!("cargo:warning=ATen headers not found: the numerics profile cannot be read back");
        return;
    }
    compile_shim(torch_lib, "recflow_numerics_shim", &["src/numerics.cpp"], &[], &[], &["torch_cpu", "c10"], &[]);
}

/// Where Gloo's headers are (`RECFLOW_GLOO_INCLUDE`, else the system's:
/// Debian's libgloo-dev, which scripts/setup.sh installs).
fn gloo_include() -> Option<PathBuf> {
    let cands: Vec<PathBuf> = std::env::var_os("RECFLOW_GLOO_INCLUDE")
        .map(|p| vec![PathBuf::from(p)])
        .unwrap_or_else(|| vec!["/usr/include".into(), "/usr/local/include".into()]);
    cands.into_iter().find(|d| d.join("gloo/algorithm.h").is_file() && d.join("gloo/rendezvous/store.h").is_file())
}

/// The include dirs c10d's NCCL header needs, from the wheels next to
/// torch (site-packages/nvidia/…): nccl.h, CUDA's runtime headers, their
/// `crt/` (nvidia-cuda-crt) and libcu++'s `nv/target` (nvidia-cuda-cccl).
/// None when any is missing or libtorch has no CUDA.
/// `RECFLOW_CUDA_EXTRA_INCLUDE` may name another dir holding `crt/` and
/// `cccl/` (the same wheels unpacked elsewhere).
fn nccl_includes(torch_lib: &Path) -> Option<Vec<PathBuf>> {
    if !torch_lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = torch_lib.parent()?.parent()?.join("nvidia");
    let nccl = nvidia.join("nccl/include");
    let cuda = std::fs::read_dir(&nvidia).ok()?.filter_map(|e| e.ok()).map(|e| e.path().join("include")).find(|d| d.join("cuda_runtime_api.h").is_file())?;
    let extra = std::env::var_os("RECFLOW_CUDA_EXTRA_INCLUDE").map(PathBuf::from).unwrap_or_else(|| cuda.clone());
    let ok = nccl.join("nccl.h").is_file() && extra.join("crt/host_config.h").is_file() && extra.join("cccl/nv/target").is_file();
    ok.then(|| vec![nccl, cuda, extra.clone(), extra.join("cccl")])
}

/// The data-parallel collectives (`src/dist/`): c10d's TCPStore and process
/// groups, with Gloo and NCCL when their headers are there; cfgs
/// `recflow_dist`, `recflow_gloo`, `recflow_nccl` say what made it. Falls
/// back to fewer backends when one fails to compile.
fn build_dist_shim(torch_lib: &Path) {
    let Some(inc) = torch_lib.parent().map(|t| t.join("include")) else { return };
    if !inc.join("torch/csrc/distributed/c10d/TCPStore.hpp").exists() {
        println!("cargo:warning=c10d headers not found: data-parallel training unavailable");
        return;
    }
    let gloo = gloo_include();
    if gloo.is_none() {
        println!("cargo:warning=Gloo headers (libgloo-dev) not found: data-parallel training on CPU unavailable; run scripts/setup.sh");
    }
    let nccl = nccl_includes(torch_lib);
    let mut tries: Vec<(bool, bool)> = vec![(gloo.is_some(), nccl.is_some())];
    if nccl.is_some() {
        tries.push((gloo.is_some(), false));
    }
    if gloo.is_some() {
        tries.push((false, false));
    }
    for (g, n) in tries {
        let mut files = vec!["src/dist/c10d.cpp"];
        let mut includes = Vec::new();
        let mut defines = Vec::new();
        let mut libs = vec!["torch_cpu", "c10"];
        let mut cfgs = Vec::new();
        if let (true, Some(dir)) = (g, &gloo) {
            files.push("src/dist/gloo.cpp");
            includes.push(dir.clone());
            defines.push("RECFLOW_HAVE_GLOO");
            cfgs.push("recflow_gloo");
        }
        if let (true, Some(dirs)) = (n, &nccl) {
            files.push("src/dist/nccl.cpp");
            includes.extend(dirs.iter().cloned());
            defines.push("RECFLOW_HAVE_NCCL");
            cfgs.push("recflow_nccl");
            libs.extend(["torch_cuda", "c10_cuda"]);
        }
        if compile_shim(torch_lib, "recflow_dist", &files, &includes, &defines, &libs, &cfgs) {
            return;
        }
    }
}

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    let python = std::env::var("RECFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args(["-c", "import torch,os;print(os.path.dirname(torch.__file__))"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let root = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(root.trim()).join("lib"))
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=RECFLOW_PYTHON");
    println!("cargo:rerun-if-changed=src/cuda/mem_stats.cpp");
    println!("cargo:rerun-if-changed=src/numerics.cpp");
    println!("cargo:rerun-if-changed=src/dist");
    println!("cargo:rerun-if-env-changed=RECFLOW_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=RECFLOW_CUDA_EXTRA_INCLUDE");
    println!("cargo::rustc-check-cfg=cfg(recflow_cuda_mem)");
    println!("cargo::rustc-check-cfg=cfg(recflow_numerics_shim)");
    println!("cargo::rustc-check-cfg=cfg(recflow_dist)");
    println!("cargo::rustc-check-cfg=cfg(recflow_gloo)");
    println!("cargo::rustc-check-cfg=cfg(recflow_nccl)");
    let Some(lib) = torch_lib_dir() else {
        println!("cargo:warning=could not locate PyTorch's lib dir; run scripts/setup.sh");
        return;
    };
    let lib = lib.display().to_string();
    let mut args = vec![format!("-Wl,-rpath,{lib}"), format!("-L{lib}")];
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        args.extend(["-Wl,--no-as-needed".into(), "-ltorch_cuda".into(), "-Wl,--as-needed".into()]);
    }
    build_cuda_shim(Path::new(&lib));
    build_numerics_shim(Path::new(&lib));
    build_dist_shim(Path::new(&lib));
    for a in &args {
        println!("cargo:rustc-link-arg={a}");
    }
}
