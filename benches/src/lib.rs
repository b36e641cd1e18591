//! Helpers shared by the avi benchmarks: the device to run on (from
//! `AVI_BENCH_DEVICE=cpu|cuda`) and device synchronisation for honest timing.

use tch::Device;

/// The benchmark device: `AVI_BENCH_DEVICE=cuda` asks for CUDA (returns
/// `None`, after saying so, when there is no CUDA device); anything else, or
/// nothing, means the CPU.
pub fn bench_device() -> Option<Device> {
    match std::env::var("AVI_BENCH_DEVICE").as_deref() {
        Ok("cuda") => {
            if tch::Cuda::is_available() {
                Some(Device::Cuda(0))
            } else {
                eprintln!("no CUDA device: skipping the CUDA benchmarks");
                None
            }
        }
        _ => Some(Device::Cpu),
    }
}

/// Wait for queued device work, so that a timer stopped afterwards measures
/// it (a no-op on the CPU).
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
