//! The variational families: F-VI, Const and A-VI (paper Eqs. 2–3, digest
//! §1.2–1.3, §4.1), and the state that holds their parameters.

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::family::GaussianParams;
use crate::function::{FunctionConfig, InferenceFunction, Output};
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
        /// Expanded domain (Remark 3.7): `[before, after]` feeds
        /// `x_{n−before} … x_{n+after}` to the function. Default `[0, 0]`.
        #[serde(default)]
        window: [usize; 2],
        /// What indices without a full window get.
        #[serde(default)]
        edges: Edges,
    },
}

/// Treatment of the indices whose window runs past the data (Remark 3.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edges {
    /// Pad the series with the model's pad value (`x0` for the saw model,
    /// else 0), the authors' choice.
    #[default]
    Pad,
    /// Give those indices their own free (mean, log-sd), as Remark 3.7 says.
    Free,
}

impl MethodConfig {
    /// A short label for tables: `fvi`, `const`, `avi-poly1`, ...
    pub fn label(&self) -> String {
        match self {
            Self::Fvi => "fvi".into(),
            Self::Const => "const".into(),
            Self::Avi {
                function, window, ..
            } => {
                if *window == [0, 0] {
                    format!("avi-{}", function.label())
                } else {
                    format!("avi-{}-w{}-{}", function.label(), window[0], window[1])
                }
            }
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

/// The local factors q(z_1..z_N), stored as raw parameter rows laid out as
/// their [`Output`] says (Gaussian: L means then L log-sds; categorical: K
/// logits).
pub enum LocalFactor {
    /// F-VI: a free `[N, W]` row for every observation.
    Free(Tensor),
    /// Const: one `[1, W]` row broadcast to every n.
    Shared(Tensor),
    /// A-VI: an inference function applied to fixed `[N, I]` inputs.
    Amortized {
        /// f_φ.
        function: Box<dyn InferenceFunction>,
        /// The function's inputs, one row per observation.
        inputs: Tensor,
        /// With `edges: free`, the free rows of the first `before` and the
        /// last `after` indices.
        edges: Option<(Tensor, Tensor)>,
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
    /// What each local parameter row holds.
    pub output: Output,
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
    /// inputs, padded with `pad` where a window runs past the data);
    /// `fixed_theta`, when given, replaces q(θ).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        method: &MethodConfig,
        x: &Tensor,
        pad: f64,
        theta_dim: usize,
        output: Output,
        fixed_theta: Option<&[f64]>,
        init_hint: avi_models::Init,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let local_dim = match output {
            Output::Gaussian { dim } => dim,
            Output::Categorical { states } => states,
        };
        let width = output.width() as i64;
        // Initial local rows: Gaussian F-VI rows ~ U[0, 1) (authors' code);
        // everything else ~ N(0, 1).
        let init = |rows: i64, free: bool| match (output, free, init_hint.local_normal_shift) {
            (Output::Gaussian { dim }, true, Some(shift)) => {
                let t = Tensor::randn([rows, width], (kind, device));
                let _ = t.narrow(1, dim as i64, dim as i64).g_add_scalar_(shift);
                t
            }
            (Output::Gaussian { .. }, true, None) => Tensor::rand([rows, width], (kind, device)),
            _ => Tensor::randn([rows, width], (kind, device)),
        };
        let n = x.size()[0] as usize;
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
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
                let (mean, log_sd) = match init_hint.theta {
                    Some((m, s)) => (
                        Tensor::full([theta_dim as i64], m, (kind, device)),
                        Tensor::full([theta_dim as i64], s, (kind, device)),
                    ),
                    None => (
                        Tensor::randn([theta_dim as i64], (kind, device)),
                        Tensor::randn([theta_dim as i64], (kind, device)),
                    ),
                };
                ThetaFactor::Free(GaussianParams {
                    mean: root.add("theta_mean", mean, true),
                    log_sd: root.add("theta_log_sd", log_sd, true),
                })
            }
        };
        let local = match method {
            MethodConfig::Fvi => LocalFactor::Free(root.add("z", init(n as i64, true), true)),
            MethodConfig::Const => LocalFactor::Shared(root.add("z", init(1, false), true)),
            MethodConfig::Avi {
                function,
                standardize,
                window,
                edges,
            } => {
                let [before, after] = *window;
                if before + after >= n {
                    return Err(InferenceError::config(
                        "method.window",
                        format!("[{before}, {after}] is as long as the data (N = {n})"),
                    ));
                }
                let inputs = amortization_inputs(x, *window, pad, *standardize, kind)?;
                let input_dim = inputs.size()[1] as usize;
                let function = function.build(&root.sub("fn"), input_dim, output, kind)?;
                let edges = match edges {
                    Edges::Pad => None,
                    Edges::Free => Some((
                        root.add("edge_head", init(before as i64, true), true),
                        root.add("edge_tail", init(after as i64, true), true),
                    )),
                };
                LocalFactor::Amortized {
                    function,
                    inputs,
                    edges,
                }
            }
        };
        // Layers built by tch are created in f32; bring everything to `kind`
        // (in place, so the handles above stay valid).
        vs.set_kind(kind);
        Ok(Self {
            vs,
            theta,
            local,
            output,
            n,
            local_dim,
        })
    }

    /// The raw `[N, W]` parameter rows of every q(z_n) (broadcast for Const,
    /// computed by f_φ for A-VI); differentiable.
    pub fn local_raw(&self) -> Tensor {
        match &self.local {
            LocalFactor::Free(p) => p.shallow_clone(),
            LocalFactor::Shared(p) => p.expand([self.n as i64, p.size()[1]], false),
            LocalFactor::Amortized {
                function,
                inputs,
                edges,
            } => {
                let p = function.forward(inputs);
                match edges {
                    None => p,
                    Some((head, tail)) => {
                        let (b, a) = (head.size()[0], tail.size()[0]);
                        let mid = p.narrow(0, b, self.n as i64 - b - a);
                        Tensor::cat(&[head, &mid, tail], 0)
                    }
                }
            }
        }
    }

    /// The `[N, L]` means and log-sds of Gaussian local factors.
    pub fn local_params(&self) -> GaussianParams {
        self.output.gaussian(&self.local_raw())
    }

    /// The `[N, K]` log-probabilities of categorical local factors.
    pub fn local_log_probs(&self) -> Tensor {
        let raw = self.local_raw();
        raw.log_softmax(1, raw.kind())
    }

    /// F-VI parameters started at the current q of `self`, whatever its
    /// family: q(θ) is copied and every observation gets its own free local
    /// row equal to its current factor. This is the starting point of the
    /// paper's §5 diagnostic (F-VI steps from the A-VI solution).
    pub fn to_free(&self) -> Self {
        let vs = nn::VarStore::new(self.vs.device());
        let root = vs.root();
        let theta = match &self.theta {
            ThetaFactor::Free(q) => ThetaFactor::Free(GaussianParams {
                mean: root.add("theta_mean", q.mean.detach().copy(), true),
                log_sd: root.add("theta_log_sd", q.log_sd.detach().copy(), true),
            }),
            ThetaFactor::Fixed(t) => ThetaFactor::Fixed(t.shallow_clone()),
        };
        let local = LocalFactor::Free(root.add("z", self.local_raw().detach().copy(), true));
        Self {
            vs,
            theta,
            local,
            output: self.output,
            n: self.n,
            local_dim: self.local_dim,
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

/// The `[N, I]` inputs of the inference function: row n holds
/// `x_{n−before}, …, x_{n+after}` (each `d_x` values, so I = d_x·(before +
/// after + 1)), the series padded with `pad` beyond its ends. With
/// `standardize`, every value (padding included) goes through the fixed
/// affine map `(v − mean(x)) / sd(x)`, per observation dimension, where mean
/// and sd are the data's (population sd; a constant dimension is centred
/// only).
pub fn amortization_inputs(
    x: &Tensor,
    window: [usize; 2],
    pad: f64,
    standardize: bool,
    kind: Kind,
) -> Result<Tensor> {
    let x = x.to_kind(kind);
    let x = if x.dim() == 1 { x.unsqueeze(1) } else { x };
    let (n, d) = (x.size()[0], x.size()[1]);
    let [before, after] = window;
    let padded = Tensor::cat(
        &[
            Tensor::full([before as i64, d], pad, (kind, x.device())),
            x.shallow_clone(),
            Tensor::full([after as i64, d], pad, (kind, x.device())),
        ],
        0,
    );
    let padded = if standardize {
        let mean = x.mean_dim(0, true, kind);
        let sd = x.var_dim(0, false, true).sqrt();
        let sd = sd.where_self(&sd.gt(0.0), &sd.ones_like());
        (padded - mean) / sd
    } else {
        padded
    };
    let w = (before + after + 1) as i64;
    // unfold: [N, d, w] windows; order the columns by time, then dimension.
    Ok(padded
        .unfold(0, w, 1)
        .permute([0, 2, 1])
        .contiguous()
        .view([n, w * d]))
}
