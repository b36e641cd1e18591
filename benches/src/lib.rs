//! Helpers shared by the avi benchmarks: the device to run on (from
//! `AVI_BENCH_DEVICE=cpu|cuda`), libtorch's CPU threads (from
//! `AVI_BENCH_THREADS`, default libtorch's choice) and device
//! synchronisation for honest timing.

use tch::Device;

/// The benchmark device: `AVI_BENCH_DEVICE=cuda` asks for CUDA (returns
/// `None`, after saying so, when there is no CUDA device); anything else, or
/// nothing, means the CPU. `AVI_BENCH_THREADS=T` (a positive integer) sets
/// libtorch's CPU threads first; another value is ignored with a warning.
pub fn bench_device() -> Option<Device> {
    if let Ok(t) = std::env::var("AVI_BENCH_THREADS") {
        match t.parse::<i32>() {
            Ok(t) if t > 0 => tch::set_num_threads(t),
            _ => eprintln!("AVI_BENCH_THREADS={t} is not a positive integer: ignored"),
        }
    }
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
