//! CUDA caching-allocator statistics through the C++ shim in
//! `mem_stats.cpp` (built by build.rs against CUDA builds of libtorch; cfg
//! `recflow_cuda_mem`). The numbers are PyTorch's
//! `torch.cuda.max_memory_allocated` / `max_memory_reserved` family.

/// Allocator figures of one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMem {
    pub allocated: u64,
    pub allocated_peak: u64,
    pub reserved: u64,
    pub reserved_peak: u64,
}

#[cfg(recflow_cuda_mem)]
mod ffi {
    extern "C" {
        pub fn recflow_cuda_reset_peak(device: i32) -> i32;
        pub fn recflow_cuda_mem_stats(device: i32, out: *mut i64) -> i32;
    }
}

/// Whether `device` is a CUDA device of this machine.
fn present(device: usize) -> bool {
    tch::Cuda::is_available() && (device as i64) < tch::Cuda::device_count()
}

/// Whether this build can read allocator statistics at all.
pub const AVAILABLE: bool = cfg!(recflow_cuda_mem);

/// Resets the peak counters of `device` (the start of a measured span).
/// False when the statistics are unavailable (no shim, no such device).
pub fn reset_peak(device: usize) -> bool {
    if !present(device) {
        return false;
    }
    #[cfg(recflow_cuda_mem)]
    {
        // SAFETY: a plain C call; the shim catches every C++ exception.
        unsafe { ffi::recflow_cuda_reset_peak(device as i32) == 0 }
    }
    #[cfg(not(recflow_cuda_mem))]
    {
        false
    }
}

/// Current and peak allocated / reserved bytes of `device`, None when the
/// statistics are unavailable.
pub fn mem_stats(device: usize) -> Option<CudaMem> {
    if !present(device) {
        return None;
    }
    #[cfg(recflow_cuda_mem)]
    {
        let mut out = [0i64; 4];
        // SAFETY: `out` has the four slots the shim writes.
        let rc = unsafe { ffi::recflow_cuda_mem_stats(device as i32, out.as_mut_ptr()) };
        (rc == 0).then(|| CudaMem {
            allocated: out[0].max(0) as u64,
            allocated_peak: out[1].max(0) as u64,
            reserved: out[2].max(0) as u64,
            reserved_peak: out[3].max(0) as u64,
        })
    }
    #[cfg(not(recflow_cuda_mem))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn statistics_are_absent_without_a_device_and_never_crash() {
        // On a CPU machine both calls must decline cleanly; on a GPU machine
        // the peak can only rise after an allocation.
        if !tch::Cuda::is_available() {
            #[cfg(recflow_cuda_mem)]
            {
                // The shim itself: an invalid device is a C++ exception
                // inside libtorch, which must come back as -1.
                let mut out = [0i64; 4];
                // SAFETY: four slots, as the shim expects.
                assert_eq!(unsafe { super::ffi::recflow_cuda_mem_stats(0, out.as_mut_ptr()) }, -1);
                assert_eq!(unsafe { super::ffi::recflow_cuda_reset_peak(0) }, -1);
            }
            assert!(!super::reset_peak(0));
            assert_eq!(super::mem_stats(0), None);
            return;
        }
        assert!(super::reset_peak(0), "shim built: {}", super::AVAILABLE);
        let t = tch::Tensor::zeros([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)));
        let m = super::mem_stats(0).expect("statistics on a CUDA device");
        assert!(m.allocated_peak >= 4 << 20 && m.reserved_peak >= m.allocated_peak, "{m:?}");
        drop(t);
    }
}
