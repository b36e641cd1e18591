//! The variational families: F-VI, Const and A-VI (paper Eqs. 2–3, digest
//! §1.2–1.3, §4.1), and the state that holds their parameters.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::de::{check_key, read_field};
use crate::family::GaussianParams;
use crate::family::GaussianSummary;
use crate::function::{FunctionConfig, InferenceFunction, Output};
use crate::{InferenceError, Result};

fn yes() -> bool {
    true
}

/// Which family the local factors q(z_n) come from (the config's `"method"`):
/// an object with a `"kind"` (`"fvi"`, `"const"` or `"avi"`) and, for A-VI,
/// its fields; F-VI and A-VI also take `"structure"` (`"mean_field"`, the
/// default, or `"markov"`: [`MethodConfig::Markov`]).
///
/// Serialized as an internally tagged object (`{"kind": "fvi"}`; the
/// structure is written only when it is `"markov"`). Read by
/// a hand-written [`Deserialize`] that refuses every field its kind does not
/// take (`{"kind": "fvi", "window": [1, 1]}` is an error, not F-VI) and
/// reads each field with its own deserializer, so that a path-tracking
/// reader (`serde_path_to_error`) names the field at fault
/// (`method.fn.width`, `method.window`), not only `method`.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodConfig {
    /// F-VI: a free (mean, log-sd) for every z_n, the richest family (Eq. 2).
    Fvi,
    /// Const: one (mean, log-sd) shared by every z_n, the poorest family.
    Const,
    /// A-VI: (mean, log-sd) of q(z_n) = f_φ(input_n), Eq. 3.
    Avi {
        /// The inference function class (the config's `"fn"`).
        function: FunctionConfig,
        /// Feed the function `(x − mean(x)) / sd(x)` (a fixed affine map of
        /// the data, computed once) instead of raw x. Default `true`; `false`
        /// reproduces the authors' raw inputs.
        standardize: bool,
        /// Expanded domain (Remark 3.7): `[before, after]` feeds
        /// `x_{n−before} … x_{n+after}` to the function. Default `[0, 0]`;
        /// `before + after` must be less than N.
        window: [usize; 2],
        /// What indices without a full window get (default `"pad"`).
        edges: Edges,
    },
    /// The structured Gauss–Markov family (`docs/structured.md`)
    /// (`"structure": "markov"`): the F-VI or A-VI method inside gives each
    /// observation the parameters `(a_n, m_n, log s_n)` of
    /// q(z_n | z_{n−1}) instead of a mean and a log-sd. Only
    /// [`MethodConfig::Fvi`] and [`MethodConfig::Avi`] may be inside; for
    /// models whose scalar local latents form a chain (Gaussian HMM, saw).
    Markov(Box<MethodConfig>),
    /// Semi-amortized VI: A-VI's inference function (the same fields) with
    /// exactly one of `refine` (the encoder's output refined by K gradient
    /// steps inside every training step, Kim et al. 2018) or `switch_at`
    /// (A-VI for S steps, then F-VI started at the encoder's output, the
    /// paper's suggestion); see [`crate::Refine`] and `docs/semi.md`.
    Semi {
        /// The inference function class (the config's `"fn"`).
        function: FunctionConfig,
        /// As A-VI's `standardize` (default `true`).
        standardize: bool,
        /// As A-VI's `window` (default `[0, 0]`).
        window: [usize; 2],
        /// As A-VI's `edges` (default `"pad"`).
        edges: Edges,
        /// Refine the encoder's output inside every step.
        refine: Option<Refine>,
        /// Switch from A-VI to F-VI after this many steps.
        switch_at: Option<usize>,
    },
}

/// The inner refinement of a semi-amortized method (`"refine"`): K plain
/// gradient-ascent steps λ_{k+1} = λ_k + η ∇_λ ELBO(λ_k, θ) on the local
/// factors' raw parameters λ (means and log-sds, or logits), started at the
/// encoder's output λ₀ = f_φ(x), with fresh draws at every inner step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refine {
    /// K ≥ 1, the inner steps per training step.
    pub steps: usize,
    /// η > 0, the inner step size (no 1/N scaling: the gradient of the
    /// ELBO with respect to factor n's row is that factor's own term's).
    pub lr: f64,
    /// Train the encoder (and θ) through the K steps (SA-VAE; default);
    /// `false`: the encoder is trained on its own output's ELBO and θ on
    /// the refined factors' ELBO.
    #[serde(default = "yes")]
    pub through: bool,
    /// The longest step one factor's row may take (Euclidean length of
    /// η·gradient in raw parameters, > 0): longer steps are shortened to it
    /// (gradient-norm clipping, as SA-VAE clips its inner steps). Default:
    /// none. A stiff model (the BNN with a small pixel sd) needs it, or an η
    /// small enough for its stiffest factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_step: Option<f64>,
}

/// How the local factors depend on each other (a method's `"structure"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    /// Independent factors q(z_n) (every method's default).
    #[default]
    MeanField,
    /// A Gauss–Markov chain q(z_1) ∏ q(z_n | z_{n−1}).
    Markov,
}

impl Serialize for MethodConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.write(serializer, Structure::MeanField)
    }
}

impl MethodConfig {
    /// Write the method as `{"kind": …, fields…}`, with `"structure"` last
    /// when it is not mean-field (so every mean-field method keeps its
    /// serialized form).
    fn write<S: Serializer>(
        &self,
        serializer: S,
        structure: Structure,
    ) -> std::result::Result<S::Ok, S::Error> {
        if let Self::Markov(inner) = self {
            if structure != Structure::MeanField {
                return Err(serde::ser::Error::custom(
                    "a Markov structure inside a Markov structure",
                ));
            }
            return inner.write(serializer, Structure::Markov);
        }
        let mut map = serializer.serialize_map(None)?;
        match self {
            Self::Fvi => map.serialize_entry("kind", "fvi")?,
            Self::Const => map.serialize_entry("kind", "const")?,
            Self::Avi {
                function,
                standardize,
                window,
                edges,
            } => {
                map.serialize_entry("kind", "avi")?;
                map.serialize_entry("fn", function)?;
                map.serialize_entry("standardize", standardize)?;
                map.serialize_entry("window", window)?;
                map.serialize_entry("edges", edges)?;
            }
            Self::Semi {
                function,
                standardize,
                window,
                edges,
                refine,
                switch_at,
            } => {
                map.serialize_entry("kind", "semi")?;
                map.serialize_entry("fn", function)?;
                map.serialize_entry("standardize", standardize)?;
                map.serialize_entry("window", window)?;
                map.serialize_entry("edges", edges)?;
                if let Some(r) = refine {
                    map.serialize_entry("refine", r)?;
                }
                if let Some(s) = switch_at {
                    map.serialize_entry("switch_at", s)?;
                }
            }
            Self::Markov(_) => unreachable!("written above"),
        }
        if structure != Structure::MeanField {
            map.serialize_entry("structure", &structure)?;
        }
        map.end()
    }
}

/// The `"kind"` of a [`MethodConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum MethodKind {
    Fvi,
    Const,
    Avi,
    Semi,
}

/// The fields of an A-VI method, `kind` included.
const AVI_FIELDS: &[&str] = &["kind", "fn", "standardize", "window", "edges", "structure"];

/// The fields of a semi-amortized method, `kind` included.
const SEMI_FIELDS: &[&str] = &[
    "kind",
    "fn",
    "standardize",
    "window",
    "edges",
    "refine",
    "switch_at",
];

/// Every method's fields: those accepted before the kind is known.
const ANY_FIELDS: &[&str] = &[
    "kind",
    "fn",
    "standardize",
    "window",
    "edges",
    "structure",
    "refine",
    "switch_at",
];

impl MethodKind {
    /// The fields a method of this kind takes.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Fvi => &["kind", "structure"],
            Self::Const => &["kind"],
            Self::Avi => AVI_FIELDS,
            Self::Semi => SEMI_FIELDS,
        }
    }
}

impl<'de> Deserialize<'de> for MethodConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(MethodVisitor)
    }
}

struct MethodVisitor;

impl<'de> Visitor<'de> for MethodVisitor {
    type Value = MethodConfig;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a method object with a \"kind\" (\"fvi\", \"const\", \"avi\" or \"semi\")")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<MethodConfig, A::Error> {
        let mut kind: Option<MethodKind> = None;
        let mut function: Option<FunctionConfig> = None;
        let mut standardize: Option<bool> = None;
        let mut window: Option<[usize; 2]> = None;
        let mut edges: Option<Edges> = None;
        let mut structure: Option<Structure> = None;
        let mut refine: Option<Refine> = None;
        let mut switch_at: Option<usize> = None;
        while let Some(key) = map.next_key::<String>()? {
            check_key(&key, kind.map_or(ANY_FIELDS, MethodKind::fields))?;
            match key.as_str() {
                "kind" => read_field(&mut map, &mut kind, "kind")?,
                "fn" => read_field(&mut map, &mut function, "fn")?,
                "standardize" => read_field(&mut map, &mut standardize, "standardize")?,
                "window" => read_field(&mut map, &mut window, "window")?,
                "edges" => read_field(&mut map, &mut edges, "edges")?,
                "structure" => read_field(&mut map, &mut structure, "structure")?,
                "refine" => read_field(&mut map, &mut refine, "refine")?,
                "switch_at" => read_field(&mut map, &mut switch_at, "switch_at")?,
                _ => unreachable!("check_key accepts the fields above only"),
            }
        }
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        // Fields read before the kind, which it does not take.
        for (name, given) in [
            ("fn", function.is_some()),
            ("standardize", standardize.is_some()),
            ("window", window.is_some()),
            ("edges", edges.is_some()),
            ("structure", structure.is_some()),
            ("refine", refine.is_some()),
            ("switch_at", switch_at.is_some()),
        ] {
            if given {
                check_key(name, kind.fields())?;
            }
        }
        let method = match kind {
            MethodKind::Fvi => MethodConfig::Fvi,
            MethodKind::Const => MethodConfig::Const,
            MethodKind::Avi => MethodConfig::Avi {
                function: function.ok_or_else(|| de::Error::missing_field("fn"))?,
                standardize: standardize.unwrap_or_else(yes),
                window: window.unwrap_or_default(),
                edges: edges.unwrap_or_default(),
            },
            MethodKind::Semi => {
                if refine.is_some() == switch_at.is_some() {
                    return Err(de::Error::custom(
                        "a semi-amortized method takes exactly one of `refine` \
                         ({\"steps\": K, \"lr\": η}) or `switch_at` (a step count)",
                    ));
                }
                MethodConfig::Semi {
                    function: function.ok_or_else(|| de::Error::missing_field("fn"))?,
                    standardize: standardize.unwrap_or_else(yes),
                    window: window.unwrap_or_default(),
                    edges: edges.unwrap_or_default(),
                    refine,
                    switch_at,
                }
            }
        };
        Ok(match structure.unwrap_or_default() {
            Structure::MeanField => method,
            Structure::Markov => MethodConfig::Markov(Box::new(method)),
        })
    }
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
    /// A short label for tables: `fvi`, `const`, `avi-poly1`,
    /// `semi-k5-mlp8`, `semi-s500-poly1-w1-1`, ...
    pub fn label(&self) -> String {
        let windowed = |prefix: String, window: &[usize; 2]| {
            if *window == [0, 0] {
                prefix
            } else {
                format!("{prefix}-w{}-{}", window[0], window[1])
            }
        };
        match self {
            Self::Markov(inner) => format!("{}-markov", inner.label()),
            Self::Fvi => "fvi".into(),
            Self::Const => "const".into(),
            Self::Avi {
                function, window, ..
            } => windowed(format!("avi-{}", function.label()), window),
            Self::Semi {
                function,
                window,
                refine,
                switch_at,
                ..
            } => {
                let how = match (refine, switch_at) {
                    (Some(r), _) if r.through => format!("k{}", r.steps),
                    (Some(r), _) => format!("k{}d", r.steps),
                    (None, s) => format!("s{}", s.unwrap_or(0)),
                };
                windowed(format!("semi-{how}-{}", function.label()), window)
            }
        }
    }

    /// The A-VI method whose family a semi-amortized method trains (its
    /// inference function, inputs and edges); every other method itself.
    pub fn encoder(&self) -> MethodConfig {
        match self {
            Self::Semi {
                function,
                standardize,
                window,
                edges,
                ..
            } => Self::Avi {
                function: function.clone(),
                standardize: *standardize,
                window: *window,
                edges: *edges,
            },
            m => m.clone(),
        }
    }

    /// The family of a finished fit's variational parameters: F-VI for a
    /// semi-amortized method with `switch_at` (its free factors after the
    /// switch), else [`MethodConfig::encoder`].
    pub fn fitted_family(&self) -> MethodConfig {
        match self {
            Self::Semi {
                switch_at: Some(_), ..
            } => Self::Fvi,
            m => m.encoder(),
        }
    }

    /// The inner refinement of a semi-amortized method with `refine`.
    pub fn refine(&self) -> Option<&Refine> {
        match self {
            Self::Semi { refine, .. } => refine.as_ref(),
            _ => None,
        }
    }

    /// The switch step S of a semi-amortized method with `switch_at`.
    pub fn switch_at(&self) -> Option<usize> {
        match self {
            Self::Semi { switch_at, .. } => *switch_at,
            _ => None,
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
        /// How `inputs` were built from the data, to apply f_φ to new data.
        map: InputMap,
    },
}

/// How an inference function's inputs are built from data: the window, the
/// padding value and the training data's standardisation (kept so that new
/// data goes through the same fixed affine map).
#[derive(Debug)]
pub struct InputMap {
    /// `[before, after]`.
    pub window: [usize; 2],
    /// The value beyond the series' ends.
    pub pad: f64,
    /// Values per observation (1 for scalar data).
    pub dim: usize,
    /// `(mean, sd)` of the training data per observation dimension, `[1, d]`
    /// each, when inputs are standardised.
    pub standardize: Option<(Tensor, Tensor)>,
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

/// Makes an inference function of one's own on a store path, from the
/// width of its inputs and the layout of its output rows (see
/// [`Variational::amortized`]).
pub type FunctionBuilder<'a> =
    &'a dyn Fn(&nn::Path, usize, Output) -> Result<Box<dyn InferenceFunction>>;

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
        init_hint: crate::forms::Init,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        Self::new_with(
            method,
            x,
            pad,
            theta_dim,
            output,
            fixed_theta,
            init_hint,
            kind,
            device,
            None,
        )
    }

    /// [`Variational::new`], with the A-VI inference function made by
    /// `custom` when given.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_with(
        method: &MethodConfig,
        x: &Tensor,
        pad: f64,
        theta_dim: usize,
        output: Output,
        fixed_theta: Option<&[f64]>,
        init_hint: crate::forms::Init,
        kind: Kind,
        device: Device,
        custom: Option<FunctionBuilder<'_>>,
    ) -> Result<Self> {
        // A semi-amortized method trains A-VI's family.
        let encoder = method.encoder();
        // A Markov structure: the method inside, with chain rows.
        let (method, output) = match &encoder {
            MethodConfig::Markov(inner) => {
                if !matches!(**inner, MethodConfig::Fvi | MethodConfig::Avi { .. }) {
                    return Err(InferenceError::config(
                        "method.structure",
                        "\"markov\" applies to the fvi and avi methods",
                    ));
                }
                if output != (Output::Gaussian { dim: 1 }) {
                    return Err(InferenceError::config(
                        "method.structure",
                        "\"markov\" needs scalar continuous local latents",
                    ));
                }
                (inner.as_ref(), Output::Markov)
            }
            m => (m, output),
        };
        let local_dim = match output {
            Output::Gaussian { dim } => dim,
            Output::Categorical { states } => states,
            Output::Markov => 1,
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
            (Output::Gaussian { .. } | Output::Markov, true, None) => {
                Tensor::rand([rows, width], (kind, device))
            }
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
                let (mean, log_sd) = match &init_hint.theta {
                    Some((m, s)) => {
                        let values = |v: &[f64], what: &str| match v.len() {
                            1 => Ok(Tensor::full([theta_dim as i64], v[0], (kind, device))),
                            d if d == theta_dim => {
                                Ok(Tensor::from_slice(v).to_kind(kind).to_device(device))
                            }
                            d => Err(InferenceError::config(
                                "init_theta",
                                format!(
                                    "{d} initial {what}s for the model's {theta_dim} θ coordinates"
                                ),
                            )),
                        };
                        (values(m, "mean")?, values(s, "log-sd")?)
                    }
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
            MethodConfig::Semi { .. } => unreachable!("encoder() is not semi-amortized"),
            MethodConfig::Avi {
                function,
                standardize,
                window,
                edges,
            } => {
                check_window(*window, n)?;
                let [before, after] = *window;
                let stats = standardize.then(|| data_stats(x, kind));
                let inputs = window_inputs(x, *window, pad, stats.as_ref(), kind)?;
                let input_dim = inputs.size()[1] as usize;
                let path = root.sub("fn");
                let function = match custom {
                    Some(build) => build(&path, input_dim, output)?,
                    None => function.build(&path, input_dim, output, kind)?,
                };
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
                    map: InputMap {
                        window: *window,
                        pad,
                        dim: if x.dim() == 1 {
                            1
                        } else {
                            x.size()[1] as usize
                        },
                        standardize: stats,
                    },
                }
            }
            MethodConfig::Markov(_) => {
                return Err(InferenceError::config(
                    "method.structure",
                    "a Markov structure inside a Markov structure",
                ))
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
                ..
            } => {
                let p = function.forward(inputs);
                match edges {
                    // A family loaded without its training data has no
                    // inputs (n = 0), and so no rows.
                    Some(_) if self.n == 0 => p,
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

    /// The local factors the fitted family gives to new observations
    /// `x_new` (`[N', …]` like the training data, on the same device): A-VI
    /// applies f_φ to the windows of `x_new` (standardised with the
    /// *training* statistics; `edges: free` rows are not transferable, so the
    /// edges are padded); Const gives every new observation its shared
    /// factor; F-VI has nothing to say about new data and returns `None`.
    /// The raw `[N', W]` rows, without gradients.
    pub fn predict_raw(&self, x_new: &Tensor) -> Result<Option<Tensor>> {
        let _guard = tch::no_grad_guard();
        let n_new = x_new.size()[0];
        Ok(match &self.local {
            LocalFactor::Free(_) => None,
            LocalFactor::Shared(p) => Some(p.expand([n_new, p.size()[1]], false).copy()),
            LocalFactor::Amortized { function, map, .. } => {
                let kind = self.local_kind();
                let d = if x_new.dim() == 1 { 1 } else { x_new.size()[1] };
                if x_new.dim() > 2 || d as usize != map.dim || n_new == 0 {
                    return Err(InferenceError::config(
                        "data",
                        format!(
                            "new data of shape {:?}: the inference function was fitted on observations of {} values",
                            x_new.size(),
                            map.dim
                        ),
                    ));
                }
                let inputs =
                    window_inputs(x_new, map.window, map.pad, map.standardize.as_ref(), kind)?;
                Some(function.forward(&inputs))
            }
        })
    }

    /// q(z_n) of new observations `x_new` (`[N']` or `[N', d_x]`, any
    /// device) through the fitted inference function: `[N', L]` means and
    /// standard deviations on the host, the same [`GaussianSummary`] as
    /// [`crate::Fit::q_z`] (Gaussian local factors only). Const gives its
    /// one factor for every n; F-VI has nothing to say about new data
    /// (`None`).
    pub fn predict_local(&self, x_new: &Tensor) -> Result<Option<GaussianSummary>> {
        self.predict_params(x_new)?
            .map(|p| crate::family::summarize(&p))
            .transpose()
    }

    /// [`Variational::predict_local`] as tensors on the parameters' device
    /// (means and log-sds), for further computation there.
    pub fn predict_params(&self, x_new: &Tensor) -> Result<Option<GaussianParams>> {
        Ok(self
            .predict_raw(x_new)?
            .map(|raw| self.output.gaussian(&raw)))
    }

    fn local_kind(&self) -> Kind {
        self.vs
            .trainable_variables()
            .first()
            .map_or(Kind::Float, Tensor::kind)
    }

    /// The `[N, K]` log-probabilities of categorical local factors.
    pub fn local_log_probs(&self) -> Tensor {
        let raw = self.local_raw();
        raw.log_softmax(1, raw.kind())
    }

    /// [`Variational::new`] with everything it needs from `model`: its
    /// padding value, θ dimension, local output (categorical when the model
    /// has discrete local states, Gaussian otherwise) and initialisation
    /// hint. Draws the initial values from libtorch's generator (seed it
    /// first).
    pub fn for_model(
        method: &MethodConfig,
        model: &dyn avi_models::Model,
        x: &Tensor,
        fixed_theta: Option<&[f64]>,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let init = crate::forms::init_hint(model);
        Self::for_model_init(method, model, x, fixed_theta, kind, device, init)
    }

    /// [`Variational::for_model`] with the initialisation `init` instead of
    /// the model's default.
    pub(crate) fn for_model_init(
        method: &MethodConfig,
        model: &dyn avi_models::Model,
        x: &Tensor,
        fixed_theta: Option<&[f64]>,
        kind: Kind,
        device: Device,
        init: crate::forms::Init,
    ) -> Result<Self> {
        if matches!(method, MethodConfig::Markov(_)) {
            crate::markov::check_model(model)?;
        }
        Self::new(
            method,
            x,
            crate::forms::pad_value(model),
            model.theta_dim(),
            match model.local_states() {
                Some(states) => Output::Categorical { states },
                None => Output::Gaussian {
                    dim: model.local_dim(),
                },
            },
            fixed_theta,
            init,
            kind,
            device,
        )
    }

    /// A-VI with an inference function of one's own: `build` makes it on
    /// the store path it is given (so that its parameters are trained with
    /// the rest) from the width of its inputs and the layout of its output
    /// rows ([`Output`]: Gaussian means then log-sds, or categorical
    /// logits). `window`, `standardize` and `edges` as in
    /// [`MethodConfig::Avi`]; q(θ) and everything else initialised as for
    /// the built-in functions. Fit it with [`crate::FitRequest::start_from`]:
    /// the same loop, trace, checks and observer as the built-in ones.
    #[allow(clippy::too_many_arguments)]
    pub fn amortized(
        model: &dyn avi_models::Model,
        x: &Tensor,
        window: [usize; 2],
        standardize: bool,
        edges: Edges,
        kind: Kind,
        device: Device,
        build: FunctionBuilder<'_>,
    ) -> Result<Self> {
        let method = MethodConfig::Avi {
            // not used: `build` makes the function
            function: FunctionConfig::Poly { degree: 1 },
            standardize,
            window,
            edges,
        };
        let x = x.to_device(device).to_kind(kind);
        Self::new_with(
            &method,
            &x,
            crate::forms::pad_value(model),
            model.theta_dim(),
            match model.local_states() {
                Some(states) => Output::Categorical { states },
                None => Output::Gaussian {
                    dim: model.local_dim(),
                },
            },
            None,
            crate::forms::init_hint(model),
            kind,
            device,
            Some(build),
        )
    }

    /// Free Gaussian factors from given values: q(θ) = N(`theta_mean`,
    /// exp(`theta_log_sd`)²) and local rows `rows` (`[N, 2L]`, or `[1, 2L]`
    /// shared by every n when `shared`: Const), copied into a new store on
    /// `rows`' device.
    pub fn from_gaussian_parts(
        theta_mean: &Tensor,
        theta_log_sd: &Tensor,
        rows: &Tensor,
        shared: bool,
        n: usize,
    ) -> Self {
        let vs = nn::VarStore::new(rows.device());
        let root = vs.root();
        let theta = ThetaFactor::Free(GaussianParams {
            mean: root.add("theta_mean", theta_mean.detach().copy(), true),
            log_sd: root.add("theta_log_sd", theta_log_sd.detach().copy(), true),
        });
        let z = root.add("z", rows.detach().copy(), true);
        let local_dim = (rows.size()[1] / 2) as usize;
        Self {
            vs,
            theta,
            local: if shared {
                LocalFactor::Shared(z)
            } else {
                LocalFactor::Free(z)
            },
            output: Output::Gaussian { dim: local_dim },
            n,
            local_dim,
        }
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
    let stats = standardize.then(|| data_stats(x, kind));
    window_inputs(x, window, pad, stats.as_ref(), kind)
}

/// Check an expanded-domain window `[before, after]` for N observations:
/// `before + after < N` (a window shorter than the data), computed without
/// overflow. The error names `method.window`.
pub fn check_window(window: [usize; 2], n: usize) -> Result<()> {
    let [before, after] = window;
    match before.checked_add(after) {
        Some(span) if span < n => Ok(()),
        Some(_) => Err(InferenceError::config(
            "method.window",
            format!("[{before}, {after}] is as long as the data (N = {n})"),
        )),
        None => Err(InferenceError::config(
            "method.window",
            format!("[{before}, {after}] is longer than any data set (before + after overflows)"),
        )),
    }
}

/// Per-dimension `[1, d]` mean and population sd of `[N]` or `[N, d]` data
/// (a constant dimension gets sd 1, i.e. is centred only).
fn data_stats(x: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let x = x.to_kind(kind);
    let x = if x.dim() == 1 { x.unsqueeze(1) } else { x };
    let mean = x.mean_dim(0, true, kind);
    let sd = x.var_dim(0, false, true).sqrt();
    let sd = sd.where_self(&sd.gt(0.0), &sd.ones_like());
    (mean, sd)
}

/// [`amortization_inputs`] with given standardisation statistics.
pub(crate) fn window_inputs(
    x: &Tensor,
    window: [usize; 2],
    pad: f64,
    stats: Option<&(Tensor, Tensor)>,
    kind: Kind,
) -> Result<Tensor> {
    let x = x.to_kind(kind);
    let x = if x.dim() == 1 { x.unsqueeze(1) } else { x };
    let (n, d) = (x.size()[0], x.size()[1]);
    // A padded series of N + before + after rows must have a length in i64.
    let too_long = || {
        InferenceError::config(
            "method.window",
            format!("{window:?} is longer than any data set"),
        )
    };
    let [before, after] = window;
    let w = before
        .checked_add(after)
        .and_then(|s| s.checked_add(1))
        .and_then(|w| i64::try_from(w).ok())
        .filter(|w| w.checked_add(n).is_some())
        .ok_or_else(too_long)?;
    let padded = Tensor::cat(
        &[
            Tensor::full([before as i64, d], pad, (kind, x.device())),
            x.shallow_clone(),
            Tensor::full([after as i64, d], pad, (kind, x.device())),
        ],
        0,
    );
    let padded = match stats {
        Some((mean, sd)) => (padded - mean) / sd,
        None => padded,
    };
    // unfold: [N, d, w] windows; order the columns by time, then dimension.
    Ok(padded
        .unfold(0, w, 1)
        .permute([0, 2, 1])
        .contiguous()
        .view([n, w * d]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::{Activation, Heads};

    /// A config holding a method, read as the harness reads its configs:
    /// `serde_path_to_error` over JSON text, the error printed as
    /// ``field `{path}`: {message}``.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[allow(dead_code)]
        steps: usize,
        method: MethodConfig,
    }

    fn read(method: &str) -> std::result::Result<MethodConfig, String> {
        let text = format!("{{\"steps\": 10, \"method\": {method}}}");
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize::<_, Config>(de)
            .map(|c| c.method)
            .map_err(|e| format!("field `{}`: {}", e.path(), e.inner()))
    }

    fn refused(method: &str) -> String {
        let e = read(method).expect_err(method);
        eprintln!("{method} -> {e}");
        e
    }

    /// F-VI and Const take no field but `kind`: any other is an error
    /// (before, a unit variant of the internally tagged enum ignored it and
    /// `{"kind": "fvi", "structure": "markov"}` was plain F-VI), whatever
    /// the order of the keys.
    #[test]
    fn fvi_and_const_refuse_unknown_fields() {
        for m in [r#"{"kind": "fvi", "x": 1}"#, r#"{"kind": "const", "x": 1}"#] {
            let e = refused(m);
            assert!(e.contains("unknown field `x`, expected `kind`"), "{e}");
        }
        // Before the kind is known, the expected fields are every method's.
        let e = refused(r#"{"x": 1, "kind": "fvi"}"#);
        assert!(
            e.contains("unknown field `x`, expected one of `kind`, `fn`"),
            "{e}"
        );
        // F-VI and A-VI take a structure; Const does not.
        let e = refused(r#"{"kind": "const", "structure": "markov"}"#);
        assert!(
            e.contains("unknown field `structure`, expected `kind`"),
            "{e}"
        );
        let e = refused(r#"{"structure": "markov", "kind": "const"}"#);
        assert!(
            e.contains("unknown field `structure`, expected `kind`"),
            "{e}"
        );
        // A field of A-VI is not one of F-VI's, before or after the kind.
        for m in [
            r#"{"kind": "fvi", "window": [1, 1]}"#,
            r#"{"window": [1, 1], "kind": "const"}"#,
        ] {
            let e = refused(m);
            assert!(e.contains("unknown field `window`, expected `kind`"), "{e}");
        }
        let e = refused(r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "x": 1}"#);
        assert!(e.contains("unknown field `x`"), "{e}");
        let e = refused(r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1, "width": 3}}"#);
        assert!(
            e.contains("unknown field `width`, expected `kind` or `degree`"),
            "{e}"
        );
        assert_eq!(read(r#"{"kind": "fvi"}"#).unwrap(), MethodConfig::Fvi);
        assert_eq!(read(r#"{"kind": "const"}"#).unwrap(), MethodConfig::Const);
    }

    /// A bad value inside `method` is reported at its own path (before,
    /// the internally tagged enums buffered their content and the error
    /// named only `method`).
    #[test]
    fn errors_inside_a_method_name_the_inner_field() {
        let cases = [
            (
                r#"{"kind": "avi", "fn": {"kind": "mlp", "width": "x"}}"#,
                "field `method.fn.width`: invalid type: string \"x\", expected usize",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "poly", "degree": -1}}"#,
                "field `method.fn.degree`: invalid value: integer `-1`, expected usize",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "mlp", "width": 8, "activation": "tanh"}}"#,
                "field `method.fn.activation`: unknown variant `tanh`",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "mlp", "width": 8, "heads": 2}}"#,
                "field `method.fn.heads`: ",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "window": [1]}"#,
                "field `method.window`: invalid length 1, expected an array of length 2",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "window": [1, "a"]}"#,
                "field `method.window[1]`: invalid type: string \"a\", expected usize",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "edges": "wrap"}"#,
                "field `method.edges`: unknown variant `wrap`",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "standardize": 1}"#,
                "field `method.standardize`: invalid type: integer `1`, expected a boolean",
            ),
            (
                r#"{"kind": "vi"}"#,
                "field `method.kind`: unknown variant `vi`",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "mlp"}}"#,
                "field `method.fn`: missing field `width`",
            ),
            (r#"{"kind": "avi"}"#, "field `method`: missing field `fn`"),
            (
                r#"{"fn": {"kind": "poly", "degree": 1}}"#,
                "field `method`: missing field `kind`",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "edges": "pad", "edges": "pad"}"#,
                "field `method`: duplicate field `edges`",
            ),
            (
                r#""fvi""#,
                "field `method`: invalid type: string \"fvi\", expected a method object",
            ),
        ];
        for (method, want) in cases {
            let e = refused(method);
            assert!(e.starts_with(want), "{method}: {e}\nwanted {want}");
        }
    }

    /// Defaults of omitted fields, and the serialized form unchanged
    /// (internally tagged, every field written).
    #[test]
    fn defaults_and_serialized_form() {
        let m = read(r#"{"fn": {"width": 8, "kind": "mlp"}, "kind": "avi"}"#).unwrap();
        assert_eq!(
            m,
            MethodConfig::Avi {
                function: FunctionConfig::Mlp {
                    width: 8,
                    depth: 2,
                    activation: Activation::Relu,
                    heads: Heads::Shared,
                },
                standardize: true,
                window: [0, 0],
                edges: Edges::Pad,
            }
        );
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"kind":"avi","fn":{"kind":"mlp","width":8,"depth":2,"activation":"relu","heads":"shared"},"standardize":true,"window":[0,0],"edges":"pad"}"#
        );
        assert_eq!(
            serde_json::to_string(&MethodConfig::Fvi).unwrap(),
            r#"{"kind":"fvi"}"#
        );
        assert_eq!(
            serde_json::to_string(&MethodConfig::Const).unwrap(),
            r#"{"kind":"const"}"#
        );
        let poly = read(
            r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 2}, "standardize": false, "window": [1, 3], "edges": "free"}"#,
        )
        .unwrap();
        let again: MethodConfig =
            serde_json::from_str(&serde_json::to_string(&poly).unwrap()).unwrap();
        assert_eq!(again, poly);
    }

    /// `"structure"`: `"markov"` wraps F-VI or A-VI in
    /// [`MethodConfig::Markov`], `"mean_field"` is the plain method; the
    /// serialized form writes the structure last and only when it is
    /// Markov; a write and a read give the same method; bad values name
    /// `method.structure`.
    #[test]
    fn markov_structure_reads_and_round_trips() {
        let fvi = read(r#"{"kind": "fvi", "structure": "markov"}"#).unwrap();
        assert_eq!(fvi, MethodConfig::Markov(Box::new(MethodConfig::Fvi)));
        assert_eq!(
            serde_json::to_string(&fvi).unwrap(),
            r#"{"kind":"fvi","structure":"markov"}"#
        );
        assert_eq!(fvi.label(), "fvi-markov");
        assert_eq!(
            read(r#"{"structure": "mean_field", "kind": "fvi"}"#).unwrap(),
            MethodConfig::Fvi
        );
        let avi = read(
            r#"{"structure": "markov", "kind": "avi", "fn": {"kind": "mlp", "width": 8}, "window": [1, 1]}"#,
        )
        .unwrap();
        let MethodConfig::Markov(inner) = &avi else {
            panic!("{avi:?}")
        };
        assert!(matches!(**inner, MethodConfig::Avi { window: [1, 1], .. }));
        assert_eq!(
            serde_json::to_string(&avi).unwrap(),
            r#"{"kind":"avi","fn":{"kind":"mlp","width":8,"depth":2,"activation":"relu","heads":"shared"},"standardize":true,"window":[1,1],"edges":"pad","structure":"markov"}"#
        );
        assert_eq!(avi.label(), "avi-mlp8-w1-1-markov");
        for m in [&fvi, &avi] {
            let again: MethodConfig =
                serde_json::from_str(&serde_json::to_string(m).unwrap()).unwrap();
            assert_eq!(&again, m);
        }
        let e = refused(r#"{"kind": "fvi", "structure": "chain"}"#);
        assert!(
            e.starts_with("field `method.structure`: unknown variant `chain`"),
            "{e}"
        );
        // A Markov structure inside a Markov structure cannot be written.
        let nested = MethodConfig::Markov(Box::new(fvi.clone()));
        assert!(serde_json::to_string(&nested).is_err());
    }

    /// A Markov structure is built for scalar Gaussian latents only, with
    /// 3 values per row (a, m, log s); Const inside it is refused.
    #[test]
    fn markov_variational_shapes_and_refusals() {
        let _generator = crate::rng::test_serial();
        let x = Tensor::randn([30], (Kind::Double, Device::Cpu));
        let build = |m: &MethodConfig, output: Output| {
            Variational::new(
                m,
                &x,
                0.0,
                1,
                output,
                None,
                crate::forms::Init::default(),
                Kind::Double,
                Device::Cpu,
            )
        };
        let fvi = MethodConfig::Markov(Box::new(MethodConfig::Fvi));
        let var = build(&fvi, Output::Gaussian { dim: 1 }).unwrap();
        assert_eq!(var.output, Output::Markov);
        assert_eq!(var.local_raw().size(), [30, 3]);
        assert_eq!(var.local_params().mean.size(), [30, 1]);
        let avi = MethodConfig::Markov(Box::new(MethodConfig::Avi {
            function: FunctionConfig::Mlp {
                width: 4,
                depth: 1,
                activation: Activation::Relu,
                heads: Heads::Shared,
            },
            standardize: true,
            window: [1, 1],
            edges: Edges::Free,
        }));
        let var = build(&avi, Output::Gaussian { dim: 1 }).unwrap();
        assert_eq!(var.local_raw().size(), [30, 3]);
        for (m, output, want) in [
            (&fvi, Output::Gaussian { dim: 2 }, "scalar continuous"),
            (&fvi, Output::Categorical { states: 3 }, "scalar continuous"),
            (
                &MethodConfig::Markov(Box::new(MethodConfig::Const)),
                Output::Gaussian { dim: 1 },
                "fvi and avi",
            ),
        ] {
            let e = build(m, output).unwrap_err().to_string();
            assert!(e.contains("method.structure") && e.contains(want), "{e}");
        }
        let poly = MethodConfig::Markov(Box::new(MethodConfig::Avi {
            function: FunctionConfig::Poly { degree: 1 },
            standardize: true,
            window: [0, 0],
            edges: Edges::Pad,
        }));
        let e = build(&poly, Output::Gaussian { dim: 1 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("use an MLP"), "{e}");
    }

    /// Every method of the committed configs and results (any `"method"`
    /// object in a JSON file under `data/`) still loads, and survives a
    /// write and a read.
    #[test]
    fn committed_methods_load() {
        fn walk(v: &serde_json::Value, found: &mut Vec<serde_json::Value>) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        if k == "method" && v.get("kind").is_some() {
                            found.push(v.clone());
                        }
                        walk(v, found);
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, found)),
                _ => {}
            }
        }
        fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    files(&path, out);
                } else if path.extension().is_some_and(|e| e == "json") {
                    out.push(path);
                }
            }
        }
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
        let mut paths = Vec::new();
        files(&data, &mut paths);
        let mut methods = Vec::new();
        for p in &paths {
            let text = std::fs::read_to_string(p).unwrap();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                walk(&v, &mut methods);
            }
        }
        assert!(methods.len() > 50, "found {} methods", methods.len());
        for v in &methods {
            let m: MethodConfig =
                serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"));
            let again: MethodConfig =
                serde_json::from_value(serde_json::to_value(&m).unwrap()).unwrap();
            assert_eq!(again, m);
        }
    }

    /// The semi-amortized kind: A-VI's fields plus exactly one of `refine`
    /// and `switch_at`; `through` defaults to `true`; the serialized form
    /// writes only the form given and reads back equal.
    #[test]
    fn semi_methods_parse_and_refuse() {
        let m = read(
            r#"{"kind": "semi", "fn": {"kind": "poly", "degree": 1}, "refine": {"steps": 5, "lr": 0.1}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            MethodConfig::Semi {
                function: FunctionConfig::Poly { degree: 1 },
                standardize: true,
                window: [0, 0],
                edges: Edges::Pad,
                refine: Some(Refine {
                    steps: 5,
                    lr: 0.1,
                    through: true,
                    max_step: None,
                }),
                switch_at: None,
            }
        );
        assert_eq!(m.label(), "semi-k5-poly1");
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"kind":"semi","fn":{"kind":"poly","degree":1},"standardize":true,"window":[0,0],"edges":"pad","refine":{"steps":5,"lr":0.1,"through":true}}"#
        );
        assert_eq!(read(&serde_json::to_string(&m).unwrap()).unwrap(), m);
        assert_eq!(
            m.encoder(),
            MethodConfig::Avi {
                function: FunctionConfig::Poly { degree: 1 },
                standardize: true,
                window: [0, 0],
                edges: Edges::Pad,
            }
        );
        assert_eq!(m.fitted_family(), m.encoder());
        let s = read(
            r#"{"switch_at": 300, "kind": "semi", "fn": {"kind": "poly", "degree": 0}, "window": [1, 1]}"#,
        )
        .unwrap();
        assert_eq!(s.switch_at(), Some(300));
        assert_eq!(s.refine(), None);
        assert_eq!(s.label(), "semi-s300-poly0-w1-1");
        assert_eq!(s.fitted_family(), MethodConfig::Fvi);
        let d = read(
            r#"{"kind": "semi", "fn": {"kind": "poly", "degree": 1}, "refine": {"steps": 2, "lr": 0.1, "through": false}}"#,
        )
        .unwrap();
        assert_eq!(d.label(), "semi-k2d-poly1");
        let c = read(
            r#"{"kind": "semi", "fn": {"kind": "poly", "degree": 1}, "refine": {"steps": 2, "lr": 0.1, "max_step": 0.5}}"#,
        )
        .unwrap();
        assert_eq!(c.refine().unwrap().max_step, Some(0.5));
        assert!(serde_json::to_string(&c)
            .unwrap()
            .contains(r#""max_step":0.5"#));
        assert!(!serde_json::to_string(&d).unwrap().contains("max_step"));
        let cases = [
            (
                r#"{"kind": "semi", "fn": {"kind": "poly", "degree": 1}}"#,
                "exactly one of `refine`",
            ),
            (
                r#"{"kind": "semi", "fn": {"kind": "poly", "degree": 1}, "switch_at": 3, "refine": {"steps": 1, "lr": 0.1}}"#,
                "exactly one of `refine`",
            ),
            (
                r#"{"kind": "semi", "fn": {"kind": "poly", "degree": 1}, "refine": {"steps": 1}}"#,
                "field `method.refine`: missing field `lr`",
            ),
            (
                r#"{"kind": "semi", "fn": {"kind": "poly", "degree": 1}, "refine": {"steps": 1, "lr": 0.1, "k": 2}}"#,
                "field `method.refine.k`: unknown field `k`",
            ),
            (
                r#"{"kind": "semi", "fn": {"kind": "poly", "degree": 1}, "switch_at": -1}"#,
                "field `method.switch_at`: invalid value",
            ),
            (
                r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "switch_at": 3}"#,
                "field `method`: unknown field `switch_at`",
            ),
            (
                r#"{"refine": {"steps": 1, "lr": 0.1}, "kind": "fvi"}"#,
                "field `method`: unknown field `refine`, expected `kind`",
            ),
            (
                r#"{"kind": "semi", "refine": {"steps": 1, "lr": 0.1}}"#,
                "field `method`: missing field `fn`",
            ),
        ];
        for (method, want) in cases {
            let e = refused(method);
            assert!(e.contains(want), "{method}: {e}\nwanted {want}");
        }
    }

    /// A window whose length overflows `usize` is an error naming
    /// `method.window` (before: an overflow panic in `before + after`).
    #[test]
    fn overflowing_windows_are_errors() {
        let _generator = crate::rng::test_serial();
        let x = Tensor::randn([10], (Kind::Double, Device::Cpu));
        for window in [
            [usize::MAX, 1],
            [1, usize::MAX],
            [usize::MAX, usize::MAX],
            [9, 1],
        ] {
            let m = MethodConfig::Avi {
                function: FunctionConfig::Poly { degree: 1 },
                standardize: true,
                window,
                edges: Edges::Free,
            };
            let e = Variational::new(
                &m,
                &x,
                0.0,
                1,
                Output::Gaussian { dim: 1 },
                None,
                crate::forms::Init::default(),
                Kind::Double,
                Device::Cpu,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("method.window"), "{e}");
            let e = amortization_inputs(&x, window, 0.0, false, Kind::Double);
            assert!(
                window == [9, 1] || e.unwrap_err().to_string().contains("method.window"),
                "{window:?}"
            );
        }
        assert!(check_window([4, 5], 10).is_ok());
        assert!(check_window([5, 5], 10).is_err());
    }

    fn variational(method: &MethodConfig, x: &Tensor) -> Variational {
        tch::manual_seed(3);
        Variational::new(
            method,
            x,
            0.5,
            1,
            Output::Gaussian { dim: 1 },
            None,
            crate::forms::Init::default(),
            Kind::Double,
            Device::Cpu,
        )
        .unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn predictions_on_the_training_data_are_the_fitted_factors() {
        // Draws from libtorch's process-wide generator: not while another
        // test has seeded it.
        let _generator = crate::rng::test_serial();
        let x = Tensor::randn([40], (Kind::Double, Device::Cpu)).multiply_scalar(3.0) + 2.0;
        let avi = MethodConfig::Avi {
            function: FunctionConfig::Mlp {
                width: 5,
                depth: 2,
                activation: Activation::Relu,
                heads: Heads::Shared,
            },
            standardize: true,
            window: [1, 1],
            edges: Edges::Pad,
        };
        let var = variational(&avi, &x);
        let raw = var.local_raw().detach();
        // The same operations on the same values: equal to rounding (1e-12).
        let again = var.predict_raw(&x).unwrap().unwrap();
        assert!(max_abs(&raw, &again) < 1e-12);
        // New data use the training statistics, not their own: a slice of the
        // series gets the same factors as inside the whole series away from
        // the slice's ends.
        let part = x.narrow(0, 10, 20);
        let p = var.predict_raw(&part).unwrap().unwrap();
        assert!(max_abs(&p.narrow(0, 1, 18), &raw.narrow(0, 11, 18)) < 1e-12);
        // Observations of the wrong shape are an error, not a panic.
        assert!(var.predict_raw(&x.view([20, 2])).is_err());

        let cst = variational(&MethodConfig::Const, &x);
        let p = cst.predict_raw(&part).unwrap().unwrap();
        assert_eq!(p.size(), [20, 2]);
        assert!(max_abs(&p, &cst.local_raw().detach().narrow(0, 0, 20)) < 1e-15);

        let fvi = variational(&MethodConfig::Fvi, &x);
        assert!(fvi.predict_raw(&part).unwrap().is_none());
    }
}
