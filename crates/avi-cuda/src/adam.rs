//! libtorch's own Adam (`torch::optim::Adam`), built exactly as tch's
//! `nn::Adam::default().build(vs, lr)` builds it, with its per-parameter
//! state readable and writable (checkpoints): tch 0.24 keeps the optimizer
//! behind a private pointer.

use std::ffi::{c_int, c_void};

use tch::{nn, Tensor};

use crate::{check, Result};

type TensorPtr = *const torch_sys::C_tensor;

extern "C" {
    fn avi_adam_new(
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        params: *const TensorPtr,
        groups: *const usize,
        n: usize,
        out: *mut *mut c_void,
    ) -> c_int;
    fn avi_adam_free(opt: *mut c_void);
    fn avi_adam_zero_grad(opt: *mut c_void) -> c_int;
    fn avi_adam_step(opt: *mut c_void) -> c_int;
    fn avi_adam_set_lr(opt: *mut c_void, lr: f64);
    fn avi_adam_get_state(
        opt: *mut c_void,
        param: TensorPtr,
        present: *mut c_int,
        step: *mut i64,
        exp_avg: *mut *mut torch_sys::C_tensor,
        exp_avg_sq: *mut *mut torch_sys::C_tensor,
    ) -> c_int;
    fn avi_adam_set_state(
        opt: *mut c_void,
        param: TensorPtr,
        step: i64,
        exp_avg: TensorPtr,
        exp_avg_sq: TensorPtr,
    ) -> c_int;
}

/// The state libtorch's Adam keeps for one parameter after its first step.
#[derive(Debug)]
pub struct AdamParamState {
    /// Steps taken (the bias corrections' exponent).
    pub step: i64,
    /// First moment, shaped as the parameter.
    pub exp_avg: Tensor,
    /// Second moment, shaped as the parameter.
    pub exp_avg_sq: Tensor,
}

/// `torch::optim::Adam` with tch's `nn::Adam::default()` settings
/// (β = (0.9, 0.999), ε = 1e-8, no weight decay, no AMSGrad) over the
/// trainable variables of a `VarStore`, in its order and groups: the same
/// C++ object and calls as tch's `nn::Optimizer`, so the same bits.
#[derive(Debug)]
pub struct TorchAdam {
    ptr: *mut c_void,
    params: Vec<Tensor>,
}

impl TorchAdam {
    /// Adam over `vs`'s trainable variables with learning rate `lr`.
    pub fn new(vs: &nn::VarStore, lr: f64) -> Result<Self> {
        let (params, groups): (Vec<Tensor>, Vec<usize>) = {
            let v = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
            v.trainable_variables
                .iter()
                .map(|var| (var.tensor.shallow_clone(), var.group))
                .unzip()
        };
        let ptrs: Vec<TensorPtr> = params.iter().map(Tensor::as_ptr).collect();
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptrs` and `groups` have length n and outlive the call;
        // each pointer is a live tch tensor handle; `ptr` receives a new
        // optimizer freed once in `Drop`.
        check(unsafe {
            avi_adam_new(
                lr,
                0.9,
                0.999,
                0.0,
                1e-8,
                ptrs.as_ptr(),
                groups.as_ptr(),
                ptrs.len(),
                &mut ptr,
            )
        })?;
        Ok(Self { ptr, params })
    }

    /// The parameters, in the optimizer's order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Drop the gradients (libtorch's `zero_grad()`: set to none).
    pub fn zero_grad(&mut self) -> Result<()> {
        // SAFETY: `self.ptr` is the live optimizer.
        check(unsafe { avi_adam_zero_grad(self.ptr) })
    }

    /// One Adam step of the parameters that have a gradient.
    pub fn step(&mut self) -> Result<()> {
        // SAFETY: `self.ptr` is the live optimizer.
        check(unsafe { avi_adam_step(self.ptr) })
    }

    /// The learning rate of the following steps.
    pub fn set_lr(&mut self, lr: f64) {
        // SAFETY: `self.ptr` is the live optimizer.
        unsafe { avi_adam_set_lr(self.ptr, lr) }
    }

    /// The state of parameter `i` (copies); `None` before its first step.
    pub fn state(&self, i: usize) -> Result<Option<AdamParamState>> {
        let param = &self.params[i];
        let (mut present, mut step) = (0, 0i64);
        let (mut m, mut v) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: `param` is a live handle; the out-pointers are valid and
        // receive fresh heap tensors (when `present`) owned by nobody else.
        check(unsafe {
            avi_adam_get_state(
                self.ptr,
                param.as_ptr(),
                &mut present,
                &mut step,
                &mut m,
                &mut v,
            )
        })?;
        if present == 0 {
            return Ok(None);
        }
        // SAFETY: `m` and `v` are fresh tensors handed over to us.
        let (exp_avg, exp_avg_sq) = unsafe { (Tensor::from_ptr(m), Tensor::from_ptr(v)) };
        Ok(Some(AdamParamState {
            step,
            exp_avg,
            exp_avg_sq,
        }))
    }

    /// Give parameter `i` this state (the moments are copied into tensors
    /// laid out as Adam's first step lays them out).
    pub fn set_state(&mut self, i: usize, state: &AdamParamState) -> Result<()> {
        let param = &self.params[i];
        // SAFETY: every pointer is a live tch handle for the call's duration.
        check(unsafe {
            avi_adam_set_state(
                self.ptr,
                param.as_ptr(),
                state.step,
                state.exp_avg.as_ptr(),
                state.exp_avg_sq.as_ptr(),
            )
        })
    }
}

impl Drop for TorchAdam {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from avi_adam_new and is freed only here.
        unsafe { avi_adam_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::OptimizerConfig, Device, Kind};

    fn problem(kind: Kind) -> (nn::VarStore, Tensor) {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _w = root.var_copy(
            "w",
            &Tensor::from_slice(&[0.3, -1.2, 2.0, 0.01]).to_kind(kind),
        );
        let _b = root.var_copy("b", &Tensor::from_slice(&[0.5]).to_kind(kind));
        let target = Tensor::from_slice(&[1.0, 2.0, -3.0, 0.5]).to_kind(kind);
        (vs, target)
    }

    fn loss(vs: &nn::VarStore, target: &Tensor) -> Tensor {
        let v = vs.variables();
        let (w, b) = (&v["w"], &v["b"]);
        ((w * w.exp() + b - target).pow_tensor_scalar(2)).sum(w.kind())
    }

    /// The shim's Adam equals tch's `nn::Adam` bit for bit over many steps
    /// with a change of learning rate (f32 and f64), and a copy of its state
    /// set into a fresh optimizer continues identically.
    #[test]
    fn equals_tch_adam_and_restores() {
        for kind in [Kind::Float, Kind::Double] {
            let (vs_a, target) = problem(kind);
            let (vs_b, _) = problem(kind);
            let mut a = nn::Adam::default().build(&vs_a, 0.05).unwrap();
            let mut b = TorchAdam::new(&vs_b, 0.05).unwrap();
            for i in 0..300 {
                if i == 150 {
                    a.set_lr(0.01);
                    b.set_lr(0.01);
                }
                a.zero_grad();
                loss(&vs_a, &target).backward();
                a.step();
                b.zero_grad().unwrap();
                loss(&vs_b, &target).backward();
                b.step().unwrap();
            }
            for (name, t) in vs_a.variables() {
                assert!(t.equal(&vs_b.variables()[&name]), "{name} ({kind:?})");
            }
            // Copy b's parameters and state into a fresh optimizer c.
            let (vs_c, _) = problem(kind);
            tch::no_grad(|| {
                for (name, mut t) in vs_c.variables() {
                    t.copy_(&vs_b.variables()[&name]);
                }
            });
            let mut c = TorchAdam::new(&vs_c, 0.01).unwrap();
            assert!(c.state(0).unwrap().is_none());
            for i in 0..b.params().len() {
                let s = b.state(i).unwrap().unwrap();
                assert_eq!(s.step, 300);
                c.set_state(i, &s).unwrap();
            }
            for _ in 0..50 {
                for (vs, opt) in [(&vs_b, &mut b), (&vs_c, &mut c)] {
                    opt.zero_grad().unwrap();
                    loss(vs, &target).backward();
                    opt.step().unwrap();
                }
            }
            for (name, t) in vs_b.variables() {
                assert!(t.equal(&vs_c.variables()[&name]), "{name} ({kind:?})");
            }
        }
    }
}
