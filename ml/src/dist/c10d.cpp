// recflow's data-parallel collectives over PyTorch's own c10d (what
// torch.distributed runs on), which tch does not expose: a TCPStore for the
// rendezvous and a process group (Gloo or NCCL, created in gloo.cpp /
// nccl.cpp) for all-reduce, all-gather and broadcast. A plain C interface
// for ml/src/dist/mod.rs; every C++ exception becomes a -1 / null return
// with its message in the caller's buffer, so none unwinds into Rust.
//
// Tensors arrive as tch's tensor handles: torch-sys's C API hands out
// `torch::Tensor*` (= at::Tensor*) as its opaque C_tensor, so the pointers
// are dereferenced here as at::Tensor, as tch's own wrapper does.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backends.h"

struct RecflowStore {
  c10::intrusive_ptr<c10d::Store> store;
};

struct RecflowGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
};

namespace {

void set_err(char* buf, int n, const char* msg) {
  if (buf == nullptr || n <= 0) return;
  std::strncpy(buf, msg, static_cast<size_t>(n) - 1);
  buf[n - 1] = '\0';
}

// c10::Error's what() carries a C++ backtrace; the message alone is enough.
template <typename F>
int guarded(char* err, int err_len, F&& f) noexcept {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_err(err, err_len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_err(err, err_len, e.what());
  } catch (...) {
    set_err(err, err_len, "unknown C++ exception");
  }
  return -1;
}

void wait(const c10::intrusive_ptr<c10d::Work>& w) {
  // The group's own timeout (ddp_timeout) bounds the wait.
  w->wait();
}

}  // namespace

extern "C" {

// Bit 0: Gloo built, bit 1: NCCL built.
int recflow_dist_backends() noexcept {
  int b = 0;
#ifdef RECFLOW_HAVE_GLOO
  b |= 1;
#endif
#ifdef RECFLOW_HAVE_NCCL
  b |= 2;
#endif
  return b;
}

// A TCPStore at host:port; `is_server`: this process listens (port 0 picks
// a free one, written to *port_out).
RecflowStore* recflow_dist_store(const char* host, int port, int is_server, int64_t timeout_ms, int* port_out,
                                 char* err, int err_len) noexcept {
  RecflowStore* out = nullptr;
  guarded(err, err_len, [&] {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = is_server != 0;
    o.waitWorkers = false;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    auto s = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    if (port_out != nullptr) *port_out = s->getPort();
    out = new RecflowStore{s};
  });
  return out;
}

void recflow_dist_store_free(RecflowStore* s) noexcept {
  delete s;
}

// backend: 0 Gloo, 1 NCCL (on CUDA device `device`).
RecflowGroup* recflow_dist_group(RecflowStore* s, int backend, int rank, int size, int64_t timeout_ms, int device,
                                 char* err, int err_len) noexcept {
  RecflowGroup* out = nullptr;
  guarded(err, err_len, [&] {
    const auto t = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Backend> b;
    if (backend == 0) {
#ifdef RECFLOW_HAVE_GLOO
      b = recflow_dist::make_gloo(s->store, rank, size, t);
#else
      throw std::runtime_error("this worker was built without c10d's Gloo (libgloo-dev headers missing at build time; run scripts/setup.sh and rebuild)");
#endif
    } else {
#ifdef RECFLOW_HAVE_NCCL
      b = recflow_dist::make_nccl(s->store, rank, size, t, device);
#else
      (void)device;
      throw std::runtime_error("this worker was built without c10d's NCCL (nccl.h or the CUDA headers missing at build time; run scripts/setup.sh and rebuild)");
#endif
    }
    out = new RecflowGroup{b};
  });
  return out;
}

void recflow_dist_group_free(RecflowGroup* g) noexcept {
  delete g;
}

// In place: t ← Σ over ranks of t.
int recflow_dist_allreduce_sum(RecflowGroup* g, at::Tensor* t, char* err, int err_len) noexcept {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> v{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    wait(g->backend->allreduce(v, o));
  });
}

// outs[r] ← rank r's `in` (every outs[r] preallocated like `in`).
int recflow_dist_allgather(RecflowGroup* g, at::Tensor* in, at::Tensor** outs, int n, char* err, int err_len) noexcept {
  return guarded(err, err_len, [&] {
    std::vector<std::vector<at::Tensor>> o(1);
    for (int i = 0; i < n; ++i) o[0].push_back(*outs[i]);
    std::vector<at::Tensor> i{*in};
    wait(g->backend->allgather(o, i));
  });
}

// In place: t ← rank `root`'s t.
int recflow_dist_broadcast(RecflowGroup* g, at::Tensor* t, int root, char* err, int err_len) noexcept {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait(g->backend->broadcast(v, o));
  });
}

}  // extern "C"
