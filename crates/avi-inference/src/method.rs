//! The variational families: F-VI, Const and A-VI (paper Eqs. 2–3, digest
//! §1.2–1.3, §4.1), and the state that holds their parameters.

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::family::GaussianParams;
use crate::function::{FunctionConfig, InferenceFunction};
use crate::{InferenceError, Result};

fn yes() -> bool {
    true
}

/// Which family the local factors q(z_n) come from (the config's `"method"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MethodConfig {
    /// F-VI: a free (mean, log-sd) for every z_n, the richest family (Eq. 2).
    Fvi,
    /// Const: one (mean, log-sd) shared by every z_n, the poorest family.
    Const,
    /// A-VI: (mean, log-sd) of q(z_n) = f_φ(input_n), Eq. 3.
    Avi {
        /// The inference function class.
        #[serde(rename = "fn")]
        function: FunctionConfig,
        /// Feed the function `(x − mean(x)) / sd(x)` (a fixed affine map of
        /// the data, computed once) instead of raw x. Default `true`; `false`
        /// reproduces the authors' raw inputs.
        #[serde(default = "yes")]
        standardize: bool,
    },
}

impl MethodConfig {
    /// A short label for tables: `fvi`, `const`, `avi-poly1`, ...
    pub fn label(&self) -> String {
        match self {
            Self::Fvi => "fvi".into(),
            Self::Const => "const".into(),
            Self::Avi { function, .. } => match function {
                FunctionConfig::Poly { degree } => format!("avi-poly{degree}"),
            },
        }
    }
}

/// q(θ): a free diagonal Gaussian, or θ fixed at known values (no q(θ)).
#[derive(Debug)]
pub enum ThetaFactor {
    /// θ ~ N(mean, exp(log_sd)²), both `[D]`.
    Free(GaussianParams),
    /// θ is known; the `[D]` values.
    Fixed(Tensor),
}

/// The local factors q(z_1..z_N).
pub enum LocalFactor {
    /// F-VI: free `[N, L]` means and log-sds.
    Free(GaussianParams),
    /// Const: one `[1, L]` mean and log-sd broadcast to every n.
    Shared(GaussianParams),
    /// A-VI: an inference function applied to fixed `[N, I]` inputs.
    Amortized {
        /// f_φ.
        function: Box<dyn InferenceFunction>,
        /// The function's inputs, one row per observation.
        inputs: Tensor,
    },
}

impl std::fmt::Debug for LocalFactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Free(_) => f.write_str("LocalFactor::Free"),
            Self::Shared(_) => f.write_str("LocalFactor::Shared"),
            Self::Amortized { function, .. } => write!(
                f,
                "LocalFactor::Amortized({} parameters)",
                function.num_parameters()
            ),
        }
    }
}

/// All variational parameters of one fit, registered in one
/// [`nn::VarStore`] so that an optimiser can update them together.
#[derive(Debug)]
pub struct Variational {
    /// The store holding every trainable tensor.
    pub vs: nn::VarStore,
    /// q(θ).
    pub theta: ThetaFactor,
    /// q(z_n), n = 1..N.
    pub local: LocalFactor,
    /// N.
    pub n: usize,
    /// L.
    pub local_dim: usize,
}

impl Variational {
    /// Create and initialise the parameters of `method` for N observations
    /// with L-dimensional z and D-dimensional θ, drawing initial values from
    /// libtorch's generator (seed it first). Initialisation follows the
    /// authors' code (digest §4.2–4.3): m_θ, log s_θ ~ N(0, 1); F-VI
    /// m_z, log s_z ~ U[0, 1); Const mean, log-sd ~ N(0, 1).
    ///
    /// `x` is the `[N]` or `[N, d_x]` data on the device (used to build A-VI
    /// inputs); `fixed_theta`, when given, replaces q(θ).
    pub fn new(
        method: &MethodConfig,
        x: &Tensor,
        theta_dim: usize,
        local_dim: usize,
        fixed_theta: Option<&[f64]>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let n = x.size()[0] as usize;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let opts = (kind, device);
        let theta = match fixed_theta {
            Some(values) => {
                if values.len() != theta_dim {
                    return Err(InferenceError::config(
                        "fixed_theta",
                        format!("has {} values, the model's θ has {theta_dim}", values.len()),
                    ));
                }
                ThetaFactor::Fixed(Tensor::from_slice(values).to_kind(kind).to_device(device))
            }
            None => {
                let mean = Tensor::randn([theta_dim as i64], opts);
                let log_sd = Tensor::randn([theta_dim as i64], opts);
                ThetaFactor::Free(GaussianParams {
                    mean: root.add("theta_mean", mean, true),
                    log_sd: root.add("theta_log_sd", log_sd, true),
                })
            }
        };
        let shape = [n as i64, local_dim as i64];
        let local = match method {
            MethodConfig::Fvi => {
                let mean = Tensor::rand(shape, opts);
                let log_sd = Tensor::rand(shape, opts);
                LocalFactor::Free(GaussianParams {
                    mean: root.add("z_mean", mean, true),
                    log_sd: root.add("z_log_sd", log_sd, true),
                })
            }
            MethodConfig::Const => {
                let mean = Tensor::randn([1, local_dim as i64], opts);
                let log_sd = Tensor::randn([1, local_dim as i64], opts);
                LocalFactor::Shared(GaussianParams {
                    mean: root.add("z_mean", mean, true),
                    log_sd: root.add("z_log_sd", log_sd, true),
                })
            }
            MethodConfig::Avi {
                function,
                standardize,
            } => {
                let inputs = amortization_inputs(x, *standardize, kind)?;
                let input_dim = inputs.size()[1] as usize;
                let function = function.build(&root.sub("fn"), input_dim, local_dim, kind)?;
                LocalFactor::Amortized { function, inputs }
            }
        };
        Ok(Self {
            vs,
            theta,
            local,
            n,
            local_dim,
        })
    }

    /// The `[N, L]` parameters of every q(z_n) (broadcast for Const, computed
    /// by f_φ for A-VI); differentiable.
    pub fn local_params(&self) -> GaussianParams {
        let shape = [self.n as i64, self.local_dim as i64];
        match &self.local {
            LocalFactor::Free(p) => GaussianParams {
                mean: p.mean.shallow_clone(),
                log_sd: p.log_sd.shallow_clone(),
            },
            LocalFactor::Shared(p) => GaussianParams {
                mean: p.mean.expand(shape, false),
                log_sd: p.log_sd.expand(shape, false),
            },
            LocalFactor::Amortized { function, inputs } => function.forward(inputs),
        }
    }

    /// Number of learned scalars: q(θ) plus the local family's parameters.
    pub fn num_parameters(&self) -> usize {
        self.vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .sum()
    }
}

/// The `[N, I]` inputs of the inference function: x itself (one column per
/// observation dimension), standardised per column when asked.
fn amortization_inputs(x: &Tensor, standardize: bool, kind: Kind) -> Result<Tensor> {
    let x = x.to_kind(kind);
    let x = if x.dim() == 1 { x.unsqueeze(1) } else { x };
    if !standardize {
        return Ok(x);
    }
    let mean = x.mean_dim(0, true, kind);
    // Population sd; a constant column is left centred but unscaled.
    let sd = x.var_dim(0, false, true).sqrt();
    let sd = sd.where_self(&sd.gt(0.0), &sd.ones_like());
    Ok((x - mean) / sd)
}
