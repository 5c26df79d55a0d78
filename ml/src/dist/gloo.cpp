// c10d's Gloo process group, created through the wheel's
// ProcessGroupGloo.hpp. That header includes <gloo/...> headers the torch
// wheel does not ship; build.rs takes them from Debian's libgloo-dev. Its
// snapshot (git 2022-05-18, 5b14351) is OLDER than the Gloo bundled in
// torch 2.11's libtorch_cpu (which has the store-v2 methods Gloo gained in
// 2023: `GlooStore::multi_get` etc. are in libtorch_cpu's symbols), so the
// headers do not match the build and nothing here may depend on a Gloo
// definition. What makes this sound anyway:
// * the two classes this file instantiates, ProcessGroupGloo and its
//   Options, hold Gloo types only behind std::shared_ptr / std::unique_ptr /
//   std::vector<std::shared_ptr<>> (see the header's members), so their size
//   and layout do not depend on Gloo's headers; ml/tests/dist.rs checks the
//   sizes this file sees (`recflow_dist_gloo_sizes`) against the ones
//   libtorch_cpu allocates (its own `make_intrusive` calls, disassembled);
// * this file calls only exported c10d functions (Options::create_default,
//   the constructor) and instantiates no Gloo class, no GlooStore and no
//   inline Gloo function: the same test checks that the worker binary
//   defines no `gloo::` symbol, so libtorch's Gloo is the only one linked.
#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "backends.h"

namespace recflow_dist {

c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                            std::chrono::milliseconds timeout) {
  // create_default: a TCP device bound to this host's name (falling back to
  // loopback), as torch.distributed's gloo backend does.
  auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
}

}  // namespace recflow_dist

extern "C" void recflow_dist_gloo_sizes(int64_t* out) noexcept {
  out[0] = static_cast<int64_t>(sizeof(c10d::ProcessGroupGloo));
  out[1] = static_cast<int64_t>(sizeof(c10d::ProcessGroupGloo::Options));
}
