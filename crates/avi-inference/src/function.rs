//! Inference functions `f_φ : inputs_n ↦ (mean_n, log_sd_n)` (paper Eq. 3).
//!
//! An inference function maps the (possibly expanded-domain) input of each
//! observation, a row of an `[N, I]` tensor, to the parameters of the
//! Gaussian factor `q(z_n)`, two `[N, L]` tensors.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Kind, Tensor};

use crate::de::{check_key, read_field};
use crate::family::GaussianParams;
use crate::{InferenceError, Result};

/// Which inference function A-VI learns (the config's `"fn"` object).
///
/// Serialized as an internally tagged object (`{"kind": "poly", "degree":
/// 1}`); read by a hand-written [`Deserialize`] that refuses fields its
/// kind does not take and reads each field with its own deserializer, so
/// that a path-tracking reader names the field at fault (`fn.width`), as
/// for [`crate::MethodConfig`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FunctionConfig {
    /// Polynomial mean of degree `degree` in a scalar input, plus one shared
    /// log-sd (the linear model's family, digest §4.2). Degree 0 is Const.
    Poly {
        /// The polynomial degree d, 0 ≤ d ≤ 10.
        degree: usize,
    },
    /// A multilayer perceptron (digest §4.3–4.5): `depth` hidden layers of
    /// `width` units, then linear heads for the mean and the log-sd.
    Mlp {
        /// Hidden width k, 1 ≤ k ≤ 65,536.
        width: usize,
        /// Number of hidden layers, 1 to 16 (default 2, as in the paper).
        depth: usize,
        /// Hidden activation (default ReLU).
        activation: Activation,
        /// `"shared"` (default): one trunk with two heads (saw, BNN);
        /// `"separate"`: two independent networks for mean and log-sd
        /// (nonlinear model).
        heads: Heads,
    },
}

/// The `"kind"` of a [`FunctionConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FunctionKind {
    Poly,
    Mlp,
}

/// Every field of a function config, `kind` included.
const FUNCTION_FIELDS: &[&str] = &["kind", "degree", "width", "depth", "activation", "heads"];

impl FunctionKind {
    /// The fields a function of this kind takes.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Poly => &["kind", "degree"],
            Self::Mlp => &["kind", "width", "depth", "activation", "heads"],
        }
    }
}

impl<'de> Deserialize<'de> for FunctionConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(FunctionVisitor)
    }
}

struct FunctionVisitor;

impl<'de> Visitor<'de> for FunctionVisitor {
    type Value = FunctionConfig;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a function object with a \"kind\" (\"poly\" or \"mlp\")")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<FunctionConfig, A::Error> {
        let mut kind: Option<FunctionKind> = None;
        let mut degree: Option<usize> = None;
        let mut width: Option<usize> = None;
        let mut depth: Option<usize> = None;
        let mut activation: Option<Activation> = None;
        let mut heads: Option<Heads> = None;
        while let Some(key) = map.next_key::<String>()? {
            check_key(&key, kind.map_or(FUNCTION_FIELDS, FunctionKind::fields))?;
            match key.as_str() {
                "kind" => read_field(&mut map, &mut kind, "kind")?,
                "degree" => read_field(&mut map, &mut degree, "degree")?,
                "width" => read_field(&mut map, &mut width, "width")?,
                "depth" => read_field(&mut map, &mut depth, "depth")?,
                "activation" => read_field(&mut map, &mut activation, "activation")?,
                "heads" => read_field(&mut map, &mut heads, "heads")?,
                _ => unreachable!("check_key accepts the fields above only"),
            }
        }
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        // Fields read before the kind, which it does not take.
        for (name, given) in [
            ("degree", degree.is_some()),
            ("width", width.is_some()),
            ("depth", depth.is_some()),
            ("activation", activation.is_some()),
            ("heads", heads.is_some()),
        ] {
            if given {
                check_key(name, kind.fields())?;
            }
        }
        Ok(match kind {
            FunctionKind::Poly => FunctionConfig::Poly {
                degree: degree.ok_or_else(|| de::Error::missing_field("degree"))?,
            },
            FunctionKind::Mlp => FunctionConfig::Mlp {
                width: width.ok_or_else(|| de::Error::missing_field("width"))?,
                depth: depth.unwrap_or_else(default_depth),
                activation: activation.unwrap_or_default(),
                heads: heads.unwrap_or_default(),
            },
        })
    }
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
    /// Validate the settings against the input width and the output.
    pub fn check(&self, input_dim: usize, output: Output) -> Result<()> {
        match self {
            Self::Poly { degree } => {
                let local_dim = match output {
                    Output::Gaussian { dim } => dim,
                    Output::Categorical { .. } => {
                        return Err(InferenceError::config(
                            "method.fn.kind",
                            "a polynomial gives Gaussian factors; use an MLP for discrete z",
                        ))
                    }
                    Output::Markov => {
                        return Err(InferenceError::config(
                            "method.fn.kind",
                            "a polynomial gives a mean and a log-sd, not a Markov chain's \
                             (a, m, log s); use an MLP",
                        ))
                    }
                };
                if *degree > 10 {
                    return Err(InferenceError::config(
                        "method.fn.degree",
                        format!("{degree} is too large (at most 10)"),
                    ));
                }
                if input_dim != 1 || local_dim != 1 {
                    return Err(InferenceError::config(
                        "method.fn.kind",
                        format!(
                            "a polynomial takes one scalar input and gives a scalar z \
                             (here the input has {input_dim} columns and z has {local_dim} dimensions); use an MLP"
                        ),
                    ));
                }
                Ok(())
            }
            Self::Mlp {
                width,
                depth,
                heads,
                ..
            } => {
                if *heads == Heads::Separate && !matches!(output, Output::Gaussian { .. }) {
                    return Err(InferenceError::config(
                        "method.fn.heads",
                        "\"separate\" needs mean-field Gaussian factors (mean and log-sd networks); use \"shared\"",
                    ));
                }
                if *width == 0 || *width > 1 << 16 {
                    return Err(InferenceError::config(
                        "method.fn.width",
                        format!("{width} must be in 1..=65536"),
                    ));
                }
                if *depth == 0 || *depth > 16 {
                    return Err(InferenceError::config(
                        "method.fn.depth",
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
        output: Output,
        kind: Kind,
    ) -> Result<Box<dyn InferenceFunction>> {
        self.check(input_dim, output)?;
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
                output,
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

/// What a local factor's parameter vector holds, per observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A diagonal Gaussian over ℝ^L: L means then L log-sds (2L values).
    Gaussian {
        /// L.
        dim: usize,
    },
    /// A categorical over K states: K logits.
    Categorical {
        /// K.
        states: usize,
    },
    /// A Gauss–Markov chain over scalar z (`"structure": "markov"`, see
    /// [`crate::MethodConfig::Markov`]): per observation `(a_n, m_n,
    /// log s_n)`, 3 values, with z_n = a_n z_{n−1} + m_n + s_n ε_n.
    Markov,
}

impl Output {
    /// Number of values per observation.
    pub fn width(self) -> usize {
        match self {
            Self::Gaussian { dim } => 2 * dim,
            Self::Categorical { states } => states,
            Self::Markov => crate::markov::WIDTH,
        }
    }

    /// Split `[N, 2L]` raw Gaussian parameters into mean and log-sd; for
    /// [`Output::Markov`], the `[N, 1]` means and log-sds of the chain's
    /// marginals q(z_n).
    pub fn gaussian(self, raw: &Tensor) -> GaussianParams {
        if self == Self::Markov {
            return crate::markov::marginals(raw);
        }
        let l = (self.width() / 2) as i64;
        GaussianParams {
            mean: raw.narrow(1, 0, l),
            log_sd: raw.narrow(1, l, l),
        }
    }
}

/// A learned map from per-observation inputs to local factor parameters.
pub trait InferenceFunction: Send {
    /// `inputs` is `[N, I]`; returns the `[N, W]` raw parameters laid out as
    /// the [`Output`] the function was built for (Gaussian: means then
    /// log-sds; categorical: logits).
    fn forward(&self, inputs: &Tensor) -> Tensor;

    /// Number of learned scalars φ (independent of N).
    fn num_parameters(&self) -> usize;

    /// The parameter tensors by role, for engines that evaluate the
    /// function without libtorch (the fused CPU engine); `None` (the
    /// default) for a function they do not know, which they then run on
    /// libtorch.
    fn parts(&self) -> Option<FunctionParts<'_>> {
        None
    }
}

/// The parameters of an inference function by role (see
/// [`InferenceFunction::parts`]); the tensors are the trainable ones
/// themselves.
#[derive(Debug)]
pub enum FunctionParts<'a> {
    /// [`Polynomial`]: `mean(u) = Σ_k a_k u^k`, `log_sd(u) = ξ`.
    Poly {
        /// a_0 … a_d, `[d + 1]`.
        coefficients: &'a Tensor,
        /// ξ, `[1]`.
        log_sd: &'a Tensor,
    },
    /// [`Mlp`]: one network (shared heads: its head gives every output
    /// column) or two (separate heads: the first gives the means, the second
    /// the log-sds), each `h ↦ act(W h + b)` per hidden layer, then a linear
    /// head.
    Mlp {
        /// The hidden activation.
        activation: Activation,
        /// The networks, in output-column order.
        nets: Vec<NetParts<'a>>,
    },
}

/// One MLP network: `(weight [out, in], bias [out])` per layer.
#[derive(Debug)]
pub struct NetParts<'a> {
    /// The hidden layers, input side first.
    pub hidden: Vec<(&'a Tensor, &'a Tensor)>,
    /// The linear head.
    pub head: (&'a Tensor, &'a Tensor),
}

/// `(weight, bias)` of a linear layer (`None` without a bias; avi builds
/// every layer with one).
fn linear_parts(l: &nn::Linear) -> Option<(&Tensor, &Tensor)> {
    Some((&l.ws, l.bs.as_ref()?))
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
    fn forward(&self, inputs: &Tensor) -> Tensor {
        // Horner's scheme on the [N, 1] input column.
        let mut mean = self.coefficients.get(self.degree as i64).expand_as(inputs);
        for k in (0..self.degree).rev() {
            mean = mean * inputs + self.coefficients.get(k as i64);
        }
        let log_sd = self.log_sd.expand_as(inputs);
        Tensor::cat(&[mean, log_sd], 1)
    }

    fn num_parameters(&self) -> usize {
        self.degree + 2
    }

    fn parts(&self) -> Option<FunctionParts<'_>> {
        Some(FunctionParts::Poly {
            coefficients: &self.coefficients,
            log_sd: &self.log_sd,
        })
    }
}

/// A stack of `depth` hidden layers `u ↦ act(W u + b)`.
/// A linear layer initialised as PyTorch's `nn.Linear` (the authors' code,
/// digest §4.3–4.5): weights and biases ~ U(−1/√fan_in, 1/√fan_in)
/// (`kaiming_uniform_(a = √5)` for the weights). tch's own default draws the
/// weights from Kaiming-uniform with the ReLU gain, bound √6/√fan_in, √6
/// times wider: the same uniform draws (the generator is used the same way),
/// scaled. Used for every layer of [`Mlp`].
fn torch_default_linear(path: &nn::Path, fan_in: i64, out: i64) -> nn::Linear {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::linear(
        path,
        fan_in,
        out,
        nn::LinearConfig {
            ws_init: nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
            bs_init: Some(nn::Init::Uniform {
                lo: -bound,
                up: bound,
            }),
            bias: true,
        },
    )
}

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
            layers.push(torch_default_linear(
                &(path / format!("hidden{i}")),
                fan_in,
                width as i64,
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
/// initialisation (Kaiming-uniform weights, uniform biases); `depth` hidden
/// layers of width k. With shared heads one trunk feeds a linear head of all
/// outputs (for Gaussian factors: means and log-sds, i.e. two heads); with
/// separate heads (Gaussian only) the mean and the log-sd each have their own
/// trunk and head, as in the authors' nonlinear experiment.
#[derive(Debug)]
pub struct Mlp {
    trunk: Trunk,
    head: nn::Linear,
    /// Separate heads: the log-sd trunk and head.
    log_sd: Option<(Trunk, nn::Linear)>,
    num_parameters: usize,
}

impl Mlp {
    /// An MLP from `input_dim` inputs to the parameters of `output`.
    pub fn new(
        path: &nn::Path,
        input_dim: usize,
        output: Output,
        width: usize,
        depth: usize,
        activation: Activation,
        heads: Heads,
    ) -> Self {
        let (i, k) = (input_dim, width);
        let trunk_params = (i * k + k) + (depth - 1) * (k * k + k);
        let trunk = Trunk::new(&(path / "trunk"), i, k, depth, activation);
        let separate = heads == Heads::Separate && matches!(output, Output::Gaussian { .. });
        let out = output.width();
        let head_out = if separate { out / 2 } else { out };
        let head = torch_default_linear(&(path / "head"), k as i64, head_out as i64);
        let log_sd = separate.then(|| {
            (
                Trunk::new(&(path / "log_sd_trunk"), i, k, depth, activation),
                torch_default_linear(&(path / "log_sd_head"), k as i64, head_out as i64),
            )
        });
        let trunks = if separate { 2 } else { 1 };
        Self {
            trunk,
            head,
            log_sd,
            num_parameters: trunks * trunk_params + out * k + out,
        }
    }
}

impl InferenceFunction for Mlp {
    fn forward(&self, inputs: &Tensor) -> Tensor {
        let main = self.head.forward(&self.trunk.forward(inputs));
        match &self.log_sd {
            None => main,
            Some((trunk, head)) => Tensor::cat(&[main, head.forward(&trunk.forward(inputs))], 1),
        }
    }

    fn num_parameters(&self) -> usize {
        self.num_parameters
    }

    fn parts(&self) -> Option<FunctionParts<'_>> {
        fn net<'a>(trunk: &'a Trunk, head: &'a nn::Linear) -> Option<NetParts<'a>> {
            Some(NetParts {
                hidden: trunk
                    .layers
                    .iter()
                    .map(linear_parts)
                    .collect::<Option<_>>()?,
                head: linear_parts(head)?,
            })
        }
        let mut nets = vec![net(&self.trunk, &self.head)?];
        if let Some((trunk, head)) = &self.log_sd {
            nets.push(net(trunk, head)?);
        }
        Some(FunctionParts::Mlp {
            activation: self.trunk.activation,
            nets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layers draw as PyTorch's `nn.Linear`: weights and biases in
    /// ±1/√fan_in. Checked two ways on a 64 → 100 layer (f64): every
    /// weight within the bound and the largest of the 6,400 within 1% of it
    /// (a wrong bound, e.g. tch's √6/√fan_in, fails both ways); and the
    /// same seed gives tch's default weights scaled by 1/√6 (relative
    /// 1e-12: the same uniform draws, `lo + (up − lo)·u` rounded
    /// differently) and the same biases.
    #[test]
    fn layers_are_initialised_as_pytorch_does() {
        let _generator = crate::rng::test_serial();
        let mut vs = nn::VarStore::new(tch::Device::Cpu);
        vs.set_kind(tch::Kind::Double);
        tch::manual_seed(3);
        let ours = torch_default_linear(&(vs.root() / "ours"), 64, 100);
        tch::manual_seed(3);
        let tch_default = nn::linear(vs.root() / "tch", 64, 100, Default::default());
        let bound = 1.0 / 8.0;
        let w = crate::family::host_vec(&ours.ws.view([-1])).unwrap();
        let max = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(max <= bound && max > 0.99 * bound, "largest |w| {max}");
        let b = crate::family::host_vec(ours.bs.as_ref().unwrap()).unwrap();
        assert!(b.iter().all(|v| v.abs() <= bound), "{b:?}");
        let wt = crate::family::host_vec(&tch_default.ws.view([-1])).unwrap();
        for (o, t) in w.iter().zip(&wt) {
            assert!(
                (o - t / 6f64.sqrt()).abs() <= 1e-12 * o.abs().max(1e-3),
                "{o} vs {t}"
            );
        }
        let bt = crate::family::host_vec(tch_default.bs.as_ref().unwrap()).unwrap();
        assert_eq!(b, bt);
    }
}
