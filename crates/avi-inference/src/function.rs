//! Inference functions `f_φ : inputs_n ↦ (mean_n, log_sd_n)` (paper Eq. 3).
//!
//! An inference function maps the (possibly expanded-domain) input of each
//! observation, a row of an `[N, I]` tensor, to the parameters of the
//! Gaussian factor `q(z_n)`, two `[N, L]` tensors.

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Kind, Tensor};

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
    /// A multilayer perceptron (digest §4.3–4.5): `depth` hidden layers of
    /// `width` units, then linear heads for the mean and the log-sd.
    Mlp {
        /// Hidden width k ≥ 1.
        width: usize,
        /// Number of hidden layers (default 2, as in the paper).
        #[serde(default = "default_depth")]
        depth: usize,
        /// Hidden activation (default ReLU).
        #[serde(default)]
        activation: Activation,
        /// `"shared"`: one trunk with two heads (saw, BNN); `"separate"`: two
        /// independent networks for mean and log-sd (nonlinear model).
        #[serde(default)]
        heads: Heads,
    },
}

fn default_depth() -> usize {
    2
}

/// Hidden-layer activation of an MLP inference function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, u).
    #[default]
    Relu,
    /// max(0.2 u, u), as in the BNN experiment.
    LeakyRelu,
}

/// How the mean and log-sd outputs of an MLP share parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Heads {
    /// One trunk, two linear heads.
    #[default]
    Shared,
    /// Two separate networks.
    Separate,
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
            Self::Mlp { width, depth, .. } => {
                if *width == 0 || *width > 1 << 16 {
                    return Err(InferenceError::config(
                        "fn.width",
                        format!("{width} must be in 1..=65536"),
                    ));
                }
                if *depth == 0 || *depth > 16 {
                    return Err(InferenceError::config(
                        "fn.depth",
                        format!("{depth} must be in 1..=16"),
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
            Self::Mlp {
                width,
                depth,
                activation,
                heads,
            } => Ok(Box::new(Mlp::new(
                path,
                input_dim,
                local_dim,
                *width,
                *depth,
                *activation,
                *heads,
            ))),
        }
    }
}

/// A short label: `poly1`, `mlp16`, ...
impl FunctionConfig {
    /// Label used in tables and file names.
    pub fn label(&self) -> String {
        match self {
            Self::Poly { degree } => format!("poly{degree}"),
            Self::Mlp { width, .. } => format!("mlp{width}"),
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

/// A stack of `depth` hidden layers `u ↦ act(W u + b)`.
#[derive(Debug)]
struct Trunk {
    layers: Vec<nn::Linear>,
    activation: Activation,
}

impl Trunk {
    fn new(path: &nn::Path, input_dim: usize, width: usize, depth: usize, act: Activation) -> Self {
        let mut layers = Vec::with_capacity(depth);
        let mut fan_in = input_dim as i64;
        for i in 0..depth {
            layers.push(nn::linear(
                path / format!("hidden{i}"),
                fan_in,
                width as i64,
                Default::default(),
            ));
            fan_in = width as i64;
        }
        Self {
            layers,
            activation: act,
        }
    }

    fn forward(&self, inputs: &Tensor) -> Tensor {
        let mut h = inputs.shallow_clone();
        for layer in &self.layers {
            let u = layer.forward(&h);
            h = match self.activation {
                Activation::Relu => u.relu(),
                Activation::LeakyRelu => u.maximum(&u.multiply_scalar(0.2)),
            };
        }
        h
    }
}

/// MLP inference function (digest §4.3–4.5, §7 row 19): PyTorch's default
/// initialisation (Kaiming-uniform weights, uniform biases); hidden layers of
/// width k; linear heads for mean and log-sd, either on one shared trunk or
/// on two separate trunks.
#[derive(Debug)]
pub struct Mlp {
    mean_trunk: Trunk,
    log_sd_trunk: Option<Trunk>,
    mean_head: nn::Linear,
    log_sd_head: nn::Linear,
    num_parameters: usize,
}

impl Mlp {
    /// An MLP from `input_dim` inputs to `local_dim` means and log-sds.
    pub fn new(
        path: &nn::Path,
        input_dim: usize,
        local_dim: usize,
        width: usize,
        depth: usize,
        activation: Activation,
        heads: Heads,
    ) -> Self {
        let (i, k, l) = (input_dim, width, local_dim);
        let trunk_params = (i * k + k) + (depth - 1) * (k * k + k);
        let head_params = k * l + l;
        let mean_trunk = Trunk::new(&(path / "trunk"), i, k, depth, activation);
        let log_sd_trunk = match heads {
            Heads::Shared => None,
            Heads::Separate => Some(Trunk::new(
                &(path / "log_sd_trunk"),
                i,
                k,
                depth,
                activation,
            )),
        };
        let mean_head = nn::linear(path / "mean", k as i64, l as i64, Default::default());
        let log_sd_head = nn::linear(path / "log_sd", k as i64, l as i64, Default::default());
        let trunks = if log_sd_trunk.is_some() { 2 } else { 1 };
        Self {
            mean_trunk,
            log_sd_trunk,
            mean_head,
            log_sd_head,
            num_parameters: trunks * trunk_params + 2 * head_params,
        }
    }
}

impl InferenceFunction for Mlp {
    fn forward(&self, inputs: &Tensor) -> GaussianParams {
        let h = self.mean_trunk.forward(inputs);
        let mean = self.mean_head.forward(&h);
        let log_sd = match &self.log_sd_trunk {
            None => self.log_sd_head.forward(&h),
            Some(t) => self.log_sd_head.forward(&t.forward(inputs)),
        };
        GaussianParams { mean, log_sd }
    }

    fn num_parameters(&self) -> usize {
        self.num_parameters
    }
}
