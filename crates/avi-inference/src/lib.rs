//! # avi-inference
//!
//! Variational inference for any [`avi_models::Model`]: the factorized family
//! (F-VI), the constant family (Const) and amortized families (A-VI) whose
//! inference function maps each observation to the parameters of its local
//! factor, fitted by reparameterised Monte Carlo ELBO gradients and Adam on
//! libtorch, on the device the caller chooses.
//!
//! ```no_run
//! use avi_inference::{fit, FitOptions, FunctionConfig, MethodConfig, Silent};
//! use avi_models::LinearModel;
//! use tch::{Device, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = LinearModel::new(1.155, 2.43)?;
//! let x = model.simulate(1_000, 7, None)?;
//! let method = MethodConfig::Avi {
//!     function: FunctionConfig::Poly { degree: 1 },
//!     standardize: true,
//!     window: [0, 0],
//!     edges: Default::default(),
//! };
//! let opts = FitOptions { steps: 2_000, lr: 0.01, ..FitOptions::default() };
//! let result = fit(&model, &Tensor::from_slice(&x), &method, None, &opts, Device::Cpu, &mut Silent)?;
//! let optimum = model.fvi_optimum(&x)?.elbo;
//! println!("ELBO {:.2} ± {:.2}, optimum {optimum:.2}", result.elbo, result.elbo_se);
//! # Ok(())
//! # }
//! ```
//!
//! **Threads.** libtorch starts with one CPU thread per core. At the
//! paper's sizes one thread is the fastest, and the default collapses when
//! other processes share the cores (a step measured 45× slower on a loaded
//! 2-core machine): choose the count with `tch::set_num_threads(1)` before
//! fitting (the `avi` binary uses 1 unless `--threads` says otherwise). The
//! fused engine splits its sums over its threads, so its last bits depend
//! on the count.
//!
//! **Sizes.** [`fit()`] checks every range and the memory a fit would need
//! ([`check_fit`], [`memory_estimate`]) before it allocates anything.
#![warn(missing_docs)]

pub mod batched;
pub mod convergence;
pub mod diagnose;
pub mod error;
pub mod family;
pub mod fit;
pub mod forms;
pub mod function;
pub mod fused;
pub mod fused_cuda;
pub mod limits;
pub mod method;

/// The `tch` crate (libtorch's Rust bindings) this crate is built on,
/// re-exported so that users pin the same version.
pub use tch;

pub use batched::{fit_batched, BatchedTrainer};
pub use diagnose::{diagnose, Diagnosis};
pub use error::{InferenceError, Result};
pub use family::GaussianParams;
pub use fit::{
    elbo_draws, elbo_draws_batch, elbo_warnings, evaluate_elbo, fit, generator_guard, host_vec,
    Dtype, Engine, Entropy, Fit, FitOptions, FitStatus, GaussianSummary, GraphTrainer, LrStep,
    Observer, Silent, Trace, Trainer, ELBO_WARN_PER_VALUE, MAX_DRAWS, MAX_LR, MAX_STEPS, MIN_LR,
    SE_WARN_NATS, SE_WARN_REL, TRACE_WARN_SPREADS, TRACE_WARN_STEPS,
};
pub use forms::{fused_form, FusedModel, Init};
pub use function::{
    Activation, FunctionConfig, FunctionParts, Heads, InferenceFunction, Mlp, NetParts, Output,
    Polynomial,
};
pub use fused::{objective_and_grad, FusedGrad, FusedParams, FusedTrainer};
pub use fused_cuda::CudaFviTrainer;
pub use limits::{
    available_memory, check_fit, check_fit_within, check_representable, memory_estimate,
};
pub use method::{
    amortization_inputs, check_window, Edges, InputMap, LocalFactor, MethodConfig, ThetaFactor,
    Variational,
};
