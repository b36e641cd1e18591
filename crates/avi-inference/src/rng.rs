//! Where a fit's random draws come from: its own copy of libtorch's
//! generator ([`Draws`]), made right after seeding and initialising under
//! the one process-wide lock ([`global_guard`]).

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::Result;

/// libtorch's process-wide default generators and CUDA's global capture
/// mode: held while a fit seeds and initialises (from the default
/// generator), while it draws a shuffle order, and for the whole of a fit
/// that captures CUDA graphs (a capture must not meet another thread's
/// synchronising CUDA calls). Between those moments each fit draws from its
/// own generator ([`Draws`]), so fits in different threads run side by side.
static GENERATOR: Mutex<()> = Mutex::new(());

/// Hold the lock on libtorch's default generators and on CUDA graph
/// capture (a process-wide mutex, held while a fit seeds and initialises,
/// draws a shuffle order, or captures CUDA graphs).
pub fn global_guard() -> std::sync::MutexGuard<'static, ()> {
    GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tests that seed or draw from libtorch's default generator directly run
/// one at a time under this lock (not [`global_guard`], which the engines'
/// constructors take themselves).
#[cfg(test)]
pub(crate) fn test_serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a fit's standard normals come from.
#[derive(Debug)]
pub(crate) enum Draws {
    /// The fit's own copy of libtorch's generator: the draws the default
    /// generator would give, without touching it.
    Own(avi_cuda::Generator),
    /// libtorch's default generator (a fit that captures CUDA graphs: the
    /// capture records the default generator's offsets; it holds
    /// [`global_guard`] throughout).
    Default,
}

impl Draws {
    /// Standard normals of shape `size`.
    pub(crate) fn randn(&self, size: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        match self {
            Self::Own(g) => Ok(g.randn(size, kind)?),
            Self::Default => Ok(Tensor::randn(size, (kind, device))),
        }
    }

    /// Run `f`, which draws from libtorch's default generator, as if it
    /// drew from this stream (the default generator's own state is left
    /// where this stream ends).
    pub(crate) fn with_default<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
        match self {
            Self::Default => Ok(f()),
            Self::Own(g) => {
                let device = g.device();
                let _lock = global_guard();
                g.restore_default()?;
                let out = f();
                *g = avi_cuda::Generator::clone_default(device)?;
                Ok(out)
            }
        }
    }

    /// Leave libtorch's default generator where this stream is, so that
    /// draws made after a fit from the default generator continue the
    /// fit's stream (as when every fit drew from it).
    pub(crate) fn hand_back(&self) -> Result<()> {
        if let Self::Own(g) = self {
            let _lock = global_guard();
            g.restore_default()?;
        }
        Ok(())
    }
}

/// Seed libtorch's default generators with `seed`, run `init` (which draws
/// the initial parameters from them) and return its value with a generator
/// that continues the stream where `init` left it, on `device`.
pub(crate) fn seeded<T>(
    seed: u64,
    device: Device,
    init: impl FnOnce() -> Result<T>,
) -> Result<(T, Draws)> {
    let _lock = global_guard();
    tch::manual_seed(seed as i64);
    let value = init()?;
    Ok((
        value,
        Draws::Own(avi_cuda::Generator::clone_default(device)?),
    ))
}
