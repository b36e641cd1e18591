//! Inference functions `f_φ : inputs_n ↦ (mean_n, log_sd_n)` (paper Eq. 3).
//!
//! An inference function maps the (possibly expanded-domain) input of each
//! observation, a row of an `[N, I]` tensor, to the parameters of the
//! Gaussian factor `q(z_n)`, two `[N, L]` tensors.

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::family::GaussianParams;
use crate::{InferenceError, Result};

/// Which inference function A-VI learns (the config's `"fn"` object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FunctionConfig {
    /// Polynomial mean of degree `degree` in a scalar input, plus one shared
    /// log-sd (the linear model's family, digest §4.2). Degree 0 is Const.
    Poly {
        /// The polynomial degree d ≥ 0.
        degree: usize,
    },
}

impl FunctionConfig {
    /// Validate the settings against the input width and local dimension.
    pub fn check(&self, input_dim: usize, local_dim: usize) -> Result<()> {
        match self {
            Self::Poly { degree } => {
                if *degree > 10 {
                    return Err(InferenceError::config(
                        "fn.degree",
                        format!("{degree} is too large (at most 10)"),
                    ));
                }
                if input_dim != 1 || local_dim != 1 {
                    return Err(InferenceError::config(
                        "fn.kind",
                        format!(
                            "a polynomial takes one scalar input and gives a scalar z \
                             (here the input has {input_dim} columns and z has {local_dim} dimensions); use an MLP"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Build the function, registering its parameters under `path` and
    /// drawing their initial values from libtorch's (seeded) generator.
    pub fn build(
        &self,
        path: &nn::Path,
        input_dim: usize,
        local_dim: usize,
        kind: Kind,
    ) -> Result<Box<dyn InferenceFunction>> {
        self.check(input_dim, local_dim)?;
        match self {
            Self::Poly { degree } => Ok(Box::new(Polynomial::new(path, *degree, kind))),
        }
    }
}

/// A learned map from per-observation inputs to Gaussian factor parameters.
pub trait InferenceFunction: Send {
    /// `inputs` is `[N, I]`; returns `mean` and `log_sd`, each `[N, L]`.
    fn forward(&self, inputs: &Tensor) -> GaussianParams;

    /// Number of learned scalars φ (independent of N).
    fn num_parameters(&self) -> usize;
}

/// Polynomial inference function for scalar inputs and scalar z (digest
/// §4.2): `mean(u) = Σ_{k=0}^{d} a_k u^k`, `log_sd(u) = ξ` (one shared
/// scalar). With d = 1 this family contains the linear model's ideal
/// inference function (Prop. 3.6); d = 0 is the Const family.
///
/// Initialisation (the authors' code order): a_0, a_1, ξ, then a_2..a_d, all
/// N(0, 1).
#[derive(Debug)]
pub struct Polynomial {
    coefficients: Tensor,
    log_sd: Tensor,
    degree: usize,
}

impl Polynomial {
    /// A polynomial of degree `degree` whose parameters live under `path`.
    pub fn new(path: &nn::Path, degree: usize, kind: Kind) -> Self {
        let dev = path.device();
        let low = Tensor::randn([degree.min(1) as i64 + 1], (kind, dev));
        let log_sd = Tensor::randn([1], (kind, dev));
        let high = Tensor::randn([degree.saturating_sub(1) as i64], (kind, dev));
        let coefficients = Tensor::cat(&[low, high], 0)
            .narrow(0, 0, degree as i64 + 1)
            .copy();
        Self {
            coefficients: path.add("coefficients", coefficients, true),
            log_sd: path.add("log_sd", log_sd, true),
            degree,
        }
    }
}

impl InferenceFunction for Polynomial {
    fn forward(&self, inputs: &Tensor) -> GaussianParams {
        // Horner's scheme on the [N, 1] input column.
        let mut mean = self.coefficients.get(self.degree as i64).expand_as(inputs);
        for k in (0..self.degree).rev() {
            mean = mean * inputs + self.coefficients.get(k as i64);
        }
        let log_sd = self.log_sd.expand_as(inputs);
        GaussianParams { mean, log_sd }
    }

    fn num_parameters(&self) -> usize {
        self.degree + 2
    }
}
