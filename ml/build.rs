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
//!
//! Emitted with `rustc-link-arg`, which reaches only this package's own
//! linked targets (the worker, its tests, examples and benches): every one of
//! them loads libtorch. The torch-free `recflow` runner is another package and
//! stays unaffected; global RUSTFLAGS would also reach proc-macro crates.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles the allocator-statistics shim when libtorch's headers are there
/// (a warning, and no cfg, when it cannot be built).
fn build_cuda_shim(torch_lib: &Path) {
    let Some(inc) = torch_lib.parent().map(|t| t.join("include")) else { return };
    if !inc.join("c10/core/CachingDeviceAllocator.h").exists() {
        return;
    }
    let ok = cc::Build::new()
        .cpp(true)
        .file("src/cuda/mem_stats.cpp")
        .include(&inc)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .try_compile("recflow_cuda_mem")
        .map_err(|e| println!("cargo:warning=CUDA memory-statistics shim not built: {e}"))
        .is_ok();
    if ok {
        println!("cargo:rustc-link-search=native={}", torch_lib.display());
        println!("cargo:rustc-link-lib=dylib=c10");
        println!("cargo:rustc-cfg=recflow_cuda_mem");
    }
}

/// Compiles the numerics read-back shim when ATen's headers are there.
fn build_numerics_shim(torch_lib: &Path) {
    let Some(inc) = torch_lib.parent().map(|t| t.join("include")) else { return };
    if !inc.join("ATen/Version.h").exists() {
        println!("cargo:warning=ATen headers not found: the numerics profile cannot be read back");
        return;
    }
    let ok = cc::Build::new()
        .cpp(true)
        .file("src/numerics.cpp")
        .include(&inc)
        .include(inc.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .try_compile("recflow_numerics")
        .map_err(|e| println!("cargo:warning=numerics read-back shim not built: {e}"))
        .is_ok();
    if ok {
        println!("cargo:rustc-link-search=native={}", torch_lib.display());
        println!("cargo:rustc-link-lib=dylib=torch_cpu");
        println!("cargo:rustc-link-lib=dylib=c10");
        println!("cargo:rustc-cfg=recflow_numerics_shim");
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
    println!("cargo::rustc-check-cfg=cfg(recflow_cuda_mem)");
    println!("cargo::rustc-check-cfg=cfg(recflow_numerics_shim)");
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
    for a in &args {
        println!("cargo:rustc-link-arg={a}");
    }
}
