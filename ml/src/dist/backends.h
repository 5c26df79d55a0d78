// The two process-group factories, each in its own translation unit so that
// the headers of one backend (Gloo's, NCCL's and CUDA's) never reach the
// rest of the shim. Built only when their headers are there (build.rs):
// RECFLOW_HAVE_GLOO / RECFLOW_HAVE_NCCL say which.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>

namespace recflow_dist {

#ifdef RECFLOW_HAVE_GLOO
c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout);
#endif

#ifdef RECFLOW_HAVE_NCCL
// `device`: this rank's CUDA device, made current first.
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout, int device);
#endif

}  // namespace recflow_dist
