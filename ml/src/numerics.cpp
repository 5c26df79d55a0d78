// Reads back the CPU code paths libtorch runs (the numerics profile,
// recflow::numerics): ATen's CPU capability, which tch does not expose, and
// MKL's conditional-numerical-reproducibility branch, looked up at run time
// (mkl_cbwr_get, or the mkl_serv_ entry point that PyTorch's statically
// linked MKL exports) so that a libtorch without MKL still loads.
#include <ATen/Version.h>

#include <dlfcn.h>

#include <cstring>
#include <string>

extern "C" {

// Writes ATen's capability ("AVX2", "AVX512", "DEFAULT", ...) NUL-terminated
// into buf; returns its length, or -1 on error (truncation included).
int recflow_aten_cpu_capability(char* buf, int n) noexcept {
  try {
    const std::string s = at::get_cpu_capability();
    if (n <= 0 || s.size() + 1 > static_cast<size_t>(n)) return -1;
    std::memcpy(buf, s.c_str(), s.size() + 1);
    return static_cast<int>(s.size());
  } catch (...) {
    return -1;
  }
}

// MKL's branch (mkl_cbwr_get(MKL_CBWR_BRANCH), mkl_cbwr.h codes), or -2 when
// this process has no MKL.
int recflow_mkl_cbwr_branch() noexcept {
  using get_t = int (*)(int);
  for (const char* name : {"mkl_cbwr_get", "MKL_CBWR_Get", "mkl_serv_cbwr_get"}) {
    if (void* f = dlsym(RTLD_DEFAULT, name)) {
      return reinterpret_cast<get_t>(f)(1 /* MKL_CBWR_BRANCH */);
    }
  }
  return -2;
}

}  // extern "C"
