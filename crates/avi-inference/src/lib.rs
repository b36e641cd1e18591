//! # avi-inference
//!
//! Variational inference for any [`avi_models::Model`]: the factorized family
//! (F-VI), the constant family (Const) and amortized families (A-VI) whose
//! inference function maps each observation to the parameters of its local
//! factor, fitted by reparameterised Monte Carlo ELBO gradients and Adam on
//! libtorch, on the device the caller chooses.
//!
//! ```no_run
//! use avi_inference::{fit, FitOptions, FunctionConfig, MethodConfig};
//! use avi_models::LinearModel;
//! use tch::Tensor;
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
//! let x_t = Tensor::from_slice(&x);
//! let result = fit(&model, &x_t, &method).options(opts).run()?;
//! let optimum = model.fvi_optimum(&x)?.elbo;
//! println!("ELBO {:.2} ± {:.2}, optimum {optimum:.2}", result.elbo, result.elbo_se);
//! # Ok(())
//! # }
//! ```
//!
//! **The vocabulary.** [`fit`] starts a [`FitRequest`] (model, data,
//! method; then options, device, fixed θ, a warm start, seeds, threads,
//! an [`Observer`]) whose [`FitRequest::run`] returns a [`Fit`]: q(θ) and
//! q(z_n) as [`GaussianSummary`]s, the [`Trace`], the final ELBO, the
//! [`FitStatus`], the [`Engine`] that ran and the fitted [`Variational`]
//! (whose [`Variational::predict_local`] encodes new observations). A
//! model is anything implementing [`avi_models::Model`]. An inference
//! function of one's own implements [`InferenceFunction`]: build a
//! [`Variational`] with it ([`Variational::amortized`]) and fit it with
//! [`FitRequest::start_from`], through the same loop, trace, checks and
//! observer as the built-in ones.
//!
//! **Threads.** A fit sets libtorch's CPU thread count to
//! [`FitRequest::threads`] (default 1). At the paper's sizes one thread is
//! the fastest, and libtorch's own default (one per core) collapses when
//! other processes share the cores (a step measured 45× slower on a
//! loaded 2-core machine). The fused engine splits its sums over its
//! threads, so its last bits depend on the count.
//!
//! **Sizes.** [`fit()`] checks every range and the memory a fit would need
//! ([`check_fit`], [`memory_estimate`]) before it allocates anything.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod convergence;
mod de;
mod diagnose;
mod elbo;
mod encode;
mod engine;
mod error;
mod family;
mod fit;
mod forms;
mod function;
mod gap;
mod limits;
mod marginal;
mod markov;
mod method;
mod observer;
mod options;
mod result;
mod rng;
mod saved;
mod semi;
mod stop;

/// The `tch` crate (libtorch's Rust bindings) this crate is built on,
/// re-exported so that users pin the same version.
pub use tch;

/// The error of the CUDA layer ([`InferenceError::Cuda`]): CUDA graphs,
/// libtorch's fused Adam and the generators, in the `avi-cuda` shim (which
/// builds without the CUDA headers, graphs then off).
pub use avi_cuda::CudaError;
pub use checkpoint::{latest_checkpoint, CheckpointInfo};
pub use diagnose::{diagnose, Diagnosis};
pub use elbo::{elbo_draws, elbo_draws_batch, evaluate_elbo};
pub use encode::{encode, EncodeOptions, Encoded, OutsideRange, Refined, HELDOUT_EXCLUDES};
pub use error::{InferenceError, Result};
pub use family::{host_vec, GaussianParams, GaussianSummary};
pub use fit::{fit, FitRequest, MAX_THREADS};
pub use forms::Init;
pub use function::{Activation, FunctionConfig, Heads, InferenceFunction, Mlp, Output, Polynomial};
pub use gap::{gap, Estimate, GapOptions, GapSplit, Marginal, MarginalMethod, Refinement};
pub use limits::{
    available_memory, check_fit, check_fit_within, check_representable, memory_estimate,
};
pub use marginal::{
    log_marginal_iw, log_marginal_quadrature, IwEstimate, Quadrature, QuadratureOptions,
};
pub use method::{
    amortization_inputs, check_window, Edges, FunctionBuilder, InputMap, LocalFactor, MethodConfig,
    Refine, Structure, ThetaFactor, Variational,
};
pub use observer::{Observer, Silent};
pub use options::{
    CheckedOptions, Dtype, Engine, Entropy, FitOptions, LocalUpdates, LrStep, ANNEAL_START,
    MAX_DRAWS, MAX_LR, MAX_STEPS, MIN_LR,
};
pub use result::{
    elbo_warnings, Clock, Fit, FitStatus, SemiReport, Trace, ELBO_WARN_PER_VALUE, SE_WARN_NATS,
    SE_WARN_REL, TRACE_WARN_SPREADS, TRACE_WARN_STEPS,
};
/// Hold libtorch's process-wide default generator (and CUDA graph capture):
/// code outside [`fit`] that seeds it and draws from it while fits may run
/// in other threads (building a [`Variational`] with
/// [`Variational::amortized`], simulating with libtorch) holds this guard
/// from the seeding to its last draw, so that neither disturbs the other's
/// draws. A fit holds it only while it seeds and initialises, and while it
/// draws a shuffle order or captures CUDA graphs.
pub use rng::global_guard as generator_guard;
pub use saved::{
    DataFingerprint, Expect, FileEntry, Fitted, Manifest, OutputLayout, TensorEntry,
    CHECKPOINT_FOLDER, FORMAT_VERSION, MANIFEST_FILE, STATE_FILE,
};
pub use stop::{verdict, Convergence, StopRule, VERDICT_BINS, VERDICT_MIN_STEPS, VERDICT_T};

/// The engines' own types, for the workspace's tests and benchmark tools:
/// not part of the public vocabulary, and free to change between
/// releases. Use [`fit`] instead.
#[doc(hidden)]
pub mod testing {
    pub use crate::engine::batched::BatchedTrainer;
    pub use crate::engine::fused::{objective_and_grad, FusedGrad, FusedParams, FusedTrainer};
    pub use crate::engine::fused_cuda::CudaFviTrainer;
    pub use crate::engine::graph::GraphTrainer;
    pub use crate::engine::torch::Trainer;
    pub use crate::forms::{fused_form, FusedModel};
    pub use crate::function::{FunctionParts, NetParts};
    pub use crate::rng::global_guard as generator_guard;
}
