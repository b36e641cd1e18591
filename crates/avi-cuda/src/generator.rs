//! Independent copies of libtorch's default random generators, so that
//! several runs can draw in one process exactly as each would alone.

use std::ffi::{c_int, c_void};

use tch::{Device, Kind, Tensor};

use crate::{check, CudaError, Result};

extern "C" {
    fn avi_generator_clone_default(
        device_type: c_int,
        index: c_int,
        out: *mut *mut c_void,
    ) -> c_int;
    fn avi_generator_restore_default(gen: *mut c_void, device_type: c_int, index: c_int) -> c_int;
    fn avi_generator_free(gen: *mut c_void);
    fn avi_generator_get_state(gen: *mut c_void, out: *mut *mut torch_sys::C_tensor) -> c_int;
    fn avi_generator_set_state(gen: *mut c_void, state: *const torch_sys::C_tensor) -> c_int;
    fn avi_randn(
        gen: *mut c_void,
        sizes: *const i64,
        ndim: usize,
        kind: c_int,
        device_type: c_int,
        index: c_int,
        out: *mut *mut torch_sys::C_tensor,
    ) -> c_int;
}

fn device_code(device: Device) -> Result<(c_int, c_int)> {
    match device {
        Device::Cpu => Ok((0, 0)),
        Device::Cuda(i) => Ok((1, i as c_int)),
        d => Err(CudaError::Unsupported(format!("no generator for {d:?}"))),
    }
}

/// A libtorch generator of one device, with its own state.
#[derive(Debug)]
pub struct Generator {
    ptr: *mut c_void,
    device: Device,
}

impl Generator {
    /// A copy of `device`'s default generator in its current state: it gives
    /// the draws the default generator would give next.
    pub fn clone_default(device: Device) -> Result<Self> {
        let (t, i) = device_code(device)?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; the object is freed once in
        // `Drop`.
        check(unsafe { avi_generator_clone_default(t, i, &mut ptr) })?;
        Ok(Self { ptr, device })
    }

    /// The device whose draws this generator makes.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Give `device`'s default generator this generator's state (so that
    /// later draws from the default continue this stream).
    pub fn restore_default(&self) -> Result<()> {
        let (t, i) = device_code(self.device)?;
        // SAFETY: `self.ptr` is the live generator from clone_default.
        check(unsafe { avi_generator_restore_default(self.ptr, t, i) })
    }

    /// The generator's whole state as libtorch's `get_state` gives it (a
    /// uint8 tensor on the CPU; for the CPU generator the Mersenne Twister
    /// state and the cached normals): [`Generator::set_state`] with it
    /// makes a generator continue this stream exactly.
    pub fn state(&self) -> Result<Tensor> {
        let mut out = std::ptr::null_mut();
        // SAFETY: `self.ptr` is live; `out` receives a fresh heap tensor
        // that `Tensor::from_ptr` takes ownership of.
        check(unsafe { avi_generator_get_state(self.ptr, &mut out) })?;
        // SAFETY: `out` is a fresh tensor owned by nobody else.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Give this generator a state from [`Generator::state`] of a generator
    /// of the same kind of device (libtorch checks its size and content).
    pub fn set_state(&mut self, state: &Tensor) -> Result<()> {
        // SAFETY: `self.ptr` and `state` are live for the call.
        check(unsafe { avi_generator_set_state(self.ptr, state.as_ptr()) })
    }

    /// Standard normals of shape `size` on the generator's device, drawn as
    /// libtorch's `randn` draws them (f32 or f64).
    pub fn randn(&self, size: &[i64], kind: Kind) -> Result<Tensor> {
        let k = match kind {
            Kind::Float => 6,
            Kind::Double => 7,
            other => {
                return Err(CudaError::Unsupported(format!(
                    "randn of kind {other:?}: f32 or f64 only"
                )))
            }
        };
        let (t, i) = device_code(self.device)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: `size` outlives the call; `out` receives a new
        // `torch::Tensor*` that `Tensor::from_ptr` takes ownership of.
        check(unsafe { avi_randn(self.ptr, size.as_ptr(), size.len(), k, t, i, &mut out) })?;
        // SAFETY: `out` is a fresh heap tensor owned by nobody else.
        Ok(unsafe { Tensor::from_ptr(out) })
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from clone_default and is freed only here.
        unsafe { avi_generator_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy continues the default stream: its draws equal the default's
    /// next draws bit for bit; restoring puts the default at the copy's
    /// position.
    #[test]
    fn copies_continue_the_default_stream() {
        let _g = crate::TEST_GENERATOR
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let _ = Tensor::randn([5], (Kind::Float, Device::Cpu));
        let g = Generator::clone_default(Device::Cpu).unwrap();
        let ours = g.randn(&[4, 3], Kind::Double).unwrap();
        let theirs = Tensor::randn([4, 3], (Kind::Double, Device::Cpu));
        assert!(ours.equal(&theirs));
        // move the copy ahead, then put the default where the copy is
        let ahead = g.randn(&[6], Kind::Float).unwrap();
        g.restore_default().unwrap();
        let from_copy = g.randn(&[6], Kind::Float).unwrap();
        let from_default = Tensor::randn([6], (Kind::Float, Device::Cpu));
        assert!(from_copy.equal(&from_default));
        assert!(!ahead.equal(&from_copy));
    }

    /// A state read from one generator and set into another makes the
    /// second draw what the first draws next, bit for bit (both the odd
    /// sizes that use libtorch's cached normal and the vectorised ones).
    #[test]
    fn state_round_trips() {
        let _g = crate::TEST_GENERATOR
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(11);
        let a = Generator::clone_default(Device::Cpu).unwrap();
        let _ = a.randn(&[3], Kind::Double).unwrap();
        let _ = a.randn(&[1], Kind::Float).unwrap();
        let state = a.state().unwrap();
        assert_eq!(state.kind(), Kind::Uint8);
        tch::manual_seed(12);
        let mut b = Generator::clone_default(Device::Cpu).unwrap();
        b.set_state(&state).unwrap();
        for (size, kind) in [(1, Kind::Double), (17, Kind::Float), (5, Kind::Double)] {
            let (x, y) = (
                a.randn(&[size], kind).unwrap(),
                b.randn(&[size], kind).unwrap(),
            );
            assert!(x.equal(&y), "{size} {kind:?}");
        }
        assert!(b
            .set_state(&Tensor::zeros([3], (Kind::Uint8, Device::Cpu)))
            .is_err());
    }
}
