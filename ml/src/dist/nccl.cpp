// c10d's NCCL process group, created through the wheel's
// ProcessGroupNCCL.hpp against nccl.h from the nvidia-nccl-cu13 wheel torch
// 2.11 pins (2.28.9, the NCCL it is built and run with) and the CUDA 13.0
// headers of the nvidia-cuda-runtime / -crt / -cccl wheels (setup.sh). Its
// Options hold an ncclConfig_t by value, so unlike Gloo the NCCL headers
// must be the build's: ml/tests/dist.rs checks the sizes seen here
// (`recflow_dist_nccl_sizes`) against the ones libtorch_cuda allocates.
#define USE_C10D_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <c10/cuda/CUDAFunctions.h>

#include "backends.h"

namespace recflow_dist {

c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout, int device) {
  // NCCL binds a communicator to the current device: one GPU per rank.
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
}

}  // namespace recflow_dist

extern "C" void recflow_dist_nccl_sizes(int64_t* out) noexcept {
  out[0] = static_cast<int64_t>(sizeof(c10d::ProcessGroupNCCL));
  out[1] = static_cast<int64_t>(sizeof(c10d::ProcessGroupNCCL::Options));
}
