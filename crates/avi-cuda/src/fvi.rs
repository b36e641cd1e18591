//! The F-VI training iteration of the scalar models as CUDA kernels
//! (`kernels/fvi.cu`, compiled at run time with NVRTC): two launches per
//! step, the draws made in registers and never stored, Adam inside the
//! kernels. See the kernel source for the objective and its gradient.

use std::ffi::{c_char, c_int, c_void, CString};

use tch::{Device, Kind, Tensor};

use crate::{check, CudaError, Result, TensorPtr};

/// The most draws per step: `fvi_local` keeps one f32 per draw in shared
/// memory (48 KiB per block).
pub const MAX_DRAWS: usize = 8192;

/// The kernel source.
pub const FVI_SOURCE: &str = include_str!("../kernels/fvi.cu");

#[repr(C)]
struct Buffers {
    x: TensorPtr,
    prev: TensorPtr,
    mean: TensorPtr,
    log_sd: TensorPtr,
    adam_m: TensorPtr,
    adam_v: TensorPtr,
    tp: TensorPtr,
    theta_adam: TensorPtr,
    theta: TensorPtr,
    eps_theta: TensorPtr,
    dtheta: TensorPtr,
    acc: TensorPtr,
    state: TensorPtr,
}

#[repr(C)]
struct Config {
    model: c_int,
    p0: f32,
    p1: f32,
    n: c_int,
    draws: c_int,
    mc: c_int,
    seed: u64,
    constant: f64,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
}

extern "C" {
    fn avi_fvi_load(device: c_int, src: *const c_char, out: *mut *mut c_void) -> c_int;
    fn avi_fvi_compile_only(
        src: *const c_char,
        major: c_int,
        minor: c_int,
        out: *mut c_char,
        cap: usize,
        len: *mut usize,
    ) -> c_int;
    fn avi_fvi_free(f: *mut c_void);
    fn avi_fvi_draw_theta(f: *mut c_void, b: *const Buffers, c: *const Config) -> c_int;
    fn avi_fvi_step(
        f: *mut c_void,
        b: *const Buffers,
        c: *const Config,
        elbo_out: TensorPtr,
        dbg_eps: TensorPtr,
        dbg_grad: TensorPtr,
        dbg_theta: TensorPtr,
    ) -> c_int;
}

/// The scalar model whose per-element log joint the kernels evaluate (the
/// three forms are compiled into them; x_0 of the saw model is in
/// [`FviState::prev`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelModel {
    /// x_n ~ N(θ + τ z_n, σ²), z_n ~ N(0, 1), flat prior on θ.
    Linear {
        /// The loading τ.
        tau: f64,
        /// The noise standard deviation σ.
        sigma: f64,
    },
    /// x_n ~ N(θ + z_n (1 + sin z_n), exp(cos z_n)²), z_n, θ ~ N(0, 1).
    Nonlinear,
    /// The nonlinear model with the authors' objective: flat prior on θ,
    /// z_n ~ N(0, 1), the Gaussian kernel of x_n without its normaliser
    /// −cos z_n.
    NonlinearAuthors,
    /// x_n ~ N(α (θ + z_n), 1), z_n ~ N(x_{n−1}, 1), θ ~ N(0, 1).
    Saw {
        /// The slope α.
        alpha: f64,
    },
}

/// Settings of one problem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FviSettings {
    /// The model (its x_0 is in [`FviState::prev`]).
    pub model: KernelModel,
    /// Monte Carlo draws per step.
    pub draws: usize,
    /// `−log q` at the draws (true) or the closed-form entropy.
    pub mc_entropy: bool,
    /// Seed of the draws.
    pub seed: u64,
    /// Every constant of the ELBO: the model's normalising constants and the
    /// entropy's `(N + 1)·½ log 2π` (plus `(N + 1)/2` for the closed form).
    pub constant: f64,
    /// Adam learning rate (β = (0.9, 0.999), ε = 1e-8).
    pub lr: f64,
}

/// The state of one F-VI problem on the device: data, parameters, Adam
/// state, this step's θ draws and the accumulators.
#[derive(Debug)]
pub struct FviState {
    /// The observations `[N]` (f32).
    pub x: Tensor,
    /// x_{n−1} beside each x_n (the saw model's; zeros otherwise) `[N]`.
    pub prev: Tensor,
    /// Means of q(z_n) `[N]`.
    pub mean: Tensor,
    /// Log standard deviations of q(z_n) `[N]`.
    pub log_sd: Tensor,
    /// Adam's first moments of (mean, log_sd) `[2N]`.
    pub adam_m: Tensor,
    /// Adam's second moments `[2N]`.
    pub adam_v: Tensor,
    /// q(θ): (mean, log sd) `[2]`.
    pub theta_params: Tensor,
    /// Adam state of q(θ): (m_μ, m_ρ, v_μ, v_ρ) `[4]`.
    pub theta_adam: Tensor,
    /// This step's θ draws `[M]`.
    pub theta: Tensor,
    /// Their standard normals `[M]`.
    pub eps_theta: Tensor,
    /// Σ_n ∂ℓ/∂θ_m `[M]` (f64).
    pub dtheta: Tensor,
    /// Σ value, Σ log s_n `[2]` (f64).
    pub acc: Tensor,
    /// The 1-based number of the next step `[1]` (int32).
    pub state: Tensor,
}

impl FviState {
    /// State on `device` from host values (x, x_{n−1}, means, log sds, and
    /// q(θ)'s mean and log sd), Adam moments zero, before step 1.
    pub fn new(
        device: Device,
        x: &[f64],
        prev: &[f64],
        mean: &[f64],
        log_sd: &[f64],
        theta: (f64, f64),
        draws: usize,
    ) -> Result<Self> {
        let n = x.len();
        if prev.len() != n || mean.len() != n || log_sd.len() != n || n == 0 || draws == 0 {
            return Err(CudaError::Unsupported(format!(
                "F-VI state: N = {n}, prev {}, mean {}, log_sd {}, draws {draws}",
                prev.len(),
                mean.len(),
                log_sd.len()
            )));
        }
        let f = |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).to_device(device);
        let zeros = |len: usize, kind: Kind| Tensor::zeros([len as i64], (kind, device));
        Ok(Self {
            x: f(x),
            prev: f(prev),
            mean: f(mean),
            log_sd: f(log_sd),
            adam_m: zeros(2 * n, Kind::Float),
            adam_v: zeros(2 * n, Kind::Float),
            theta_params: f(&[theta.0, theta.1]),
            theta_adam: zeros(4, Kind::Float),
            theta: zeros(draws, Kind::Float),
            eps_theta: zeros(draws, Kind::Float),
            dtheta: zeros(draws, Kind::Double),
            acc: zeros(2, Kind::Double),
            state: Tensor::ones([1], (Kind::Int, device)),
        })
    }

    fn buffers(&self) -> Buffers {
        Buffers {
            x: self.x.as_ptr(),
            prev: self.prev.as_ptr(),
            mean: self.mean.as_ptr(),
            log_sd: self.log_sd.as_ptr(),
            adam_m: self.adam_m.as_ptr(),
            adam_v: self.adam_v.as_ptr(),
            tp: self.theta_params.as_ptr(),
            theta_adam: self.theta_adam.as_ptr(),
            theta: self.theta.as_ptr(),
            eps_theta: self.eps_theta.as_ptr(),
            dtheta: self.dtheta.as_ptr(),
            acc: self.acc.as_ptr(),
            state: self.state.as_ptr(),
        }
    }
}

/// Optional outputs of one step, for tests: the z draws `[M, N]`, the
/// local gradients of the ELBO `[2N]` (∂/∂μ_n, then ∂/∂log s_n) and
/// (∂/∂μ_θ, ∂/∂log s_θ, ELBO) `[3]`, all f32 on the device.
#[derive(Debug)]
pub struct FviDebug {
    /// `[M, N]` standard normals of the z draws.
    pub eps: Tensor,
    /// `[2N]` local gradients.
    pub grad: Tensor,
    /// `[3]` θ gradients and the ELBO estimate.
    pub theta: Tensor,
}

/// The compiled kernels on one device.
#[derive(Debug)]
pub struct FviKernels {
    ptr: *mut c_void,
    device: Device,
}

fn source() -> CString {
    CString::new(FVI_SOURCE).expect("kernel source has no NUL")
}

impl FviKernels {
    /// Compile (NVRTC, for the device's compute capability) and load.
    pub fn load(device: Device) -> Result<Self> {
        let Device::Cuda(index) = device else {
            return Err(CudaError::Unsupported(format!(
                "the F-VI kernels need a CUDA device, not {device:?}"
            )));
        };
        if !crate::graphs_compiled() {
            return Err(CudaError::Unsupported(
                "avi-cuda was built without CUDA support".into(),
            ));
        }
        let src = source();
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `src` is NUL-terminated and outlives the call; `ptr` is a
        // valid out-pointer whose object `Drop` frees once.
        check(unsafe { avi_fvi_load(index as c_int, src.as_ptr(), &mut ptr) })?;
        Ok(Self { ptr, device })
    }

    /// Compile the kernel source to PTX for compute capability
    /// `major.minor` without a GPU (NVRTC only); returns the PTX.
    pub fn compile_only(major: i32, minor: i32) -> Result<String> {
        if !crate::graphs_compiled() {
            return Err(CudaError::Unsupported(
                "avi-cuda was built without CUDA support".into(),
            ));
        }
        let src = source();
        let mut len = 0usize;
        // SAFETY: first call with a zero-capacity buffer only reports the
        // length; the second writes at most `cap` bytes into `buf`.
        check(unsafe {
            avi_fvi_compile_only(
                src.as_ptr(),
                major,
                minor,
                std::ptr::null_mut(),
                0,
                &mut len,
            )
        })?;
        let mut buf = vec![0u8; len + 1];
        // SAFETY: as above, `buf` has `len + 1` bytes.
        check(unsafe {
            avi_fvi_compile_only(
                src.as_ptr(),
                major,
                minor,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut len,
            )
        })?;
        buf.truncate(len);
        String::from_utf8(buf).map_err(|e| CudaError::Torch(e.to_string()))
    }

    fn config(&self, s: &FviSettings, n: usize) -> Config {
        let (model, p0, p1) = match s.model {
            KernelModel::Linear { tau, sigma } => (0, tau as f32, sigma.recip() as f32),
            KernelModel::Nonlinear => (1, 0.0, 0.0),
            KernelModel::NonlinearAuthors => (3, 0.0, 0.0),
            KernelModel::Saw { alpha } => (2, alpha as f32, 0.0),
        };
        Config {
            model,
            p0,
            p1,
            n: n as c_int,
            draws: s.draws as c_int,
            mc: c_int::from(s.mc_entropy),
            seed: s.seed,
            constant: s.constant,
            lr: s.lr as f32,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    fn check_state(&self, st: &FviState, s: &FviSettings) -> Result<usize> {
        let n = st.x.size()[0] as usize;
        let ok = st.x.device() == self.device
            && st.theta.size()[0] as usize == s.draws
            && st.mean.size()[0] as usize == n
            && st.adam_m.size()[0] as usize == 2 * n
            && n <= i32::MAX as usize
            && s.draws <= MAX_DRAWS;
        if !ok {
            return Err(CudaError::Unsupported(
                format!("F-VI state does not match the kernels' device or the settings (at most {MAX_DRAWS} draws)"),
            ));
        }
        Ok(n)
    }

    /// Make step 1's θ draws (once, after [`FviState::new`]).
    pub fn draw_first_theta(&self, st: &FviState, s: &FviSettings) -> Result<()> {
        let n = self.check_state(st, s)?;
        let (b, c) = (st.buffers(), self.config(s, n));
        // SAFETY: `b` holds live tensor handles of `st` on this device with
        // the sizes checked above; `c` is a plain struct; both outlive the
        // (asynchronous) launch call, which reads them before returning.
        check(unsafe { avi_fvi_draw_theta(self.ptr, &b, &c) })
    }

    /// One training iteration, queued on the current CUDA stream; its ELBO
    /// estimate goes to the first element of `elbo_out` (an f32 tensor)
    /// when given.
    pub fn step(
        &self,
        st: &FviState,
        s: &FviSettings,
        elbo_out: Option<&Tensor>,
        debug: Option<&FviDebug>,
    ) -> Result<()> {
        let n = self.check_state(st, s)?;
        if let Some(e) = elbo_out {
            if e.kind() != Kind::Float || e.device() != self.device || e.numel() == 0 {
                return Err(CudaError::Unsupported(
                    "elbo_out must be f32 on the device".into(),
                ));
            }
        }
        if let Some(d) = debug {
            if d.eps.numel() != s.draws * n || d.grad.numel() != 2 * n || d.theta.numel() != 3 {
                return Err(CudaError::Unsupported(
                    "debug buffers have the wrong sizes".into(),
                ));
            }
        }
        let (b, c) = (st.buffers(), self.config(s, n));
        let null = std::ptr::null();
        let p = |t: Option<&Tensor>| t.map_or(null, Tensor::as_ptr);
        // SAFETY: as in `draw_first_theta`; the optional tensors are live
        // f32 device tensors of the checked sizes (or null).
        check(unsafe {
            avi_fvi_step(
                self.ptr,
                &b,
                &c,
                p(elbo_out),
                p(debug.map(|d| &d.eps)),
                p(debug.map(|d| &d.grad)),
                p(debug.map(|d| &d.theta)),
            )
        })
    }
}

impl Drop for FviKernels {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from avi_fvi_load and is freed only here.
        unsafe { avi_fvi_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC compiles the kernels for the Hopper GPUs (sm_90) on a machine
    /// without one; the PTX holds the three entry points.
    #[test]
    fn kernels_compile_to_ptx() {
        if !crate::graphs_compiled() {
            eprintln!("skipped: avi-cuda built without CUDA support");
            return;
        }
        let ptx = FviKernels::compile_only(9, 0).unwrap();
        for name in ["fvi_local", "fvi_global", "fvi_draw_theta"] {
            assert!(ptx.contains(&format!(".entry {name}")), "{name} missing");
        }
        if let Ok(path) = std::env::var("AVI_DUMP_PTX") {
            std::fs::write(path, &ptx).unwrap();
        }
    }
}
