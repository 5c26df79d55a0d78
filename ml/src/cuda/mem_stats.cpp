// libtorch's CUDA caching-allocator statistics (what Python reads as
// torch.cuda.max_memory_allocated / reset_peak_memory_stats), which tch does
// not expose. Goes through c10's device-generic DeviceAllocator interface
// (the one torch.accelerator uses), so it needs neither the CUDA headers nor
// a CUDA build of libtorch to compile: without a CUDA allocator registered
// the calls throw, and every C++ exception becomes a -1 return.
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

extern "C" {

int recflow_cuda_reset_peak(int device) noexcept {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

// out[0..4]: allocated bytes (current, peak), reserved bytes (current, peak),
// aggregated over the allocator's pools.
int recflow_cuda_mem_stats(int device, int64_t* out) noexcept {
  try {
    const auto s = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = s.allocated_bytes[agg].current;
    out[1] = s.allocated_bytes[agg].peak;
    out[2] = s.reserved_bytes[agg].current;
    out[3] = s.reserved_bytes[agg].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
