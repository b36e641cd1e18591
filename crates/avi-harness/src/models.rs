//! The model registry of the `avi` binary: each model's config (the
//! `"model"` object of a config file) and how it is built.
//!
//! ```json
//! {"kind": "saw", "alpha": 0.75, "x0": 0, "fixed_theta": [3.4159]}
//! ```
//!
//! `kind` picks the model, the other fields are its parameters, and
//! `fixed_theta` (every model) treats θ as known. Adding a model to the CLI
//! is one variant of [`ModelKind`] holding its config struct, that struct's
//! [`ModelEntry`] impl, and one arm in [`ModelKind::entry`]
//! (`docs/models.md`).

use std::fmt::Debug;

use anyhow::{bail, Result};
use avi_models::{
    fashion_mnist, BnnModel, DiscreteHmm, ExactReference, GaussianHmm, LinearModel, MixtureModel,
    Model, NonlinearModel, NonlinearObjective, NonlinearSim, SawModel, SawSim, Simulate,
};
use serde::{de, Deserialize, Serialize};

/// What the harness asks of a model: its log joint ([`Model`]), simulation
/// ([`Simulate`]) and reference solutions ([`ExactReference`]). Every type
/// with the three is one.
pub trait CliModel: Model + Simulate + ExactReference + Debug + Send + Sync {}

impl<T: Model + Simulate + ExactReference + Debug + Send + Sync> CliModel for T {}

/// One registry entry: a model's config, and how to build the model.
pub trait ModelEntry {
    /// Build and validate the model; `dim` is the dimension of one
    /// observation (used by models with vector observations).
    fn build(&self, dim: usize) -> Result<Box<dyn CliModel>>;

    /// The dimension of one simulated observation: `data.simulate.dim`,
    /// else 1 (the default).
    fn simulated_dim(&self, sim: &SimulateConfig) -> usize {
        sim.dim.unwrap_or(1)
    }
}

/// A model and its fixed parameters.
///
/// Read by hand ([`Deserialize`] below) rather than with `#[serde(flatten)]`,
/// which would take a number as `kind` (a variant index) and name an
/// unknown `kind` at `model` instead of `model.kind`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Which model, with its parameters (`kind` and the model's fields).
    #[serde(flatten)]
    pub kind: ModelKind,
    /// Treat θ as known (no q(θ)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_theta: Option<Vec<f64>>,
}

impl ModelConfig {
    /// A model with θ unknown.
    pub fn new(kind: ModelKind) -> Self {
        Self {
            kind,
            fixed_theta: None,
        }
    }

    /// The fixed θ, if any.
    pub fn fixed_theta(&self) -> Option<&[f64]> {
        self.fixed_theta.as_deref()
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(ModelConfigVisitor)
    }
}

/// Reads `kind` and `fixed_theta` from the model object and the model's
/// own fields into its config struct (unknown fields rejected there). A
/// field read after `kind` is checked on its own ([`FieldCheck`]), so that
/// a bad value or an unknown field is named at `model.<field>`.
struct ModelConfigVisitor;

impl<'de> de::Visitor<'de> for ModelConfigVisitor {
    type Value = ModelConfig;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a model object {\"kind\": …}")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> std::result::Result<ModelConfig, A::Error> {
        Err(de::Error::custom(
            "expected an object {…} with named fields, found an array",
        ))
    }

    fn visit_map<A: de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<ModelConfig, A::Error> {
        let mut kind: Option<String> = None;
        let mut fixed_theta: Option<Option<Vec<f64>>> = None;
        let mut fields = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "kind" if kind.is_some() => return Err(de::Error::duplicate_field("kind")),
                "kind" => kind = Some(map.next_value_seed(KindName)?),
                "fixed_theta" if fixed_theta.is_some() => {
                    return Err(de::Error::duplicate_field("fixed_theta"))
                }
                "fixed_theta" => fixed_theta = Some(map.next_value()?),
                _ => {
                    let value: serde_json::Value = match &kind {
                        Some(kind) => map.next_value_seed(FieldCheck { kind, key: &key })?,
                        None => map.next_value()?,
                    };
                    if fields.insert(key.clone(), value).is_some() {
                        return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                }
            }
        }
        let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
        fields.insert("kind".into(), serde_json::Value::String(kind));
        let kind = match ModelKind::deserialize(serde_json::Value::Object(fields.clone())) {
            Ok(kind) => kind,
            // Fields read before `kind` were not checked alone: an error
            // among them names its field in the message (the path stops at
            // `model`).
            Err(e) => {
                let culprit = fields.iter().find_map(|(key, value)| {
                    let alone = serde_json::json!({ "kind": fields["kind"], key: value });
                    match ModelKind::deserialize(alone) {
                        Err(e) if key != "kind" && !e.to_string().starts_with("missing field") => {
                            Some(format!("`{key}`: {e}"))
                        }
                        _ => None,
                    }
                });
                return Err(match culprit {
                    Some(msg) => de::Error::custom(msg),
                    None => de::Error::custom(e),
                });
            }
        };
        Ok(ModelConfig {
            kind,
            fixed_theta: fixed_theta.flatten(),
        })
    }
}

/// One field of a model of a known `kind`, read as JSON and checked alone
/// against the kind's config struct where it is read (so that an error is
/// named at `model.<field>`): every error but a missing (other) field is
/// this field's. The whole object is read again once complete.
struct FieldCheck<'a> {
    kind: &'a str,
    key: &'a str,
}

impl<'de> de::DeserializeSeed<'de> for FieldCheck<'_> {
    type Value = serde_json::Value;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<serde_json::Value, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let alone = serde_json::json!({ "kind": self.kind, self.key: &value });
        match ModelKind::deserialize(alone) {
            Err(e) if !e.to_string().starts_with("missing field") => Err(de::Error::custom(e)),
            _ => Ok(value),
        }
    }
}

/// A model's `kind`, checked against the registry where it is read (so
/// that an unknown kind is named at `model.kind`).
struct KindName;

impl<'de> de::DeserializeSeed<'de> for KindName {
    type Value = String;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<String, D::Error> {
        let name = String::deserialize(d)?;
        match ModelKind::deserialize(serde_json::json!({ "kind": name })) {
            Err(e) if e.to_string().starts_with("unknown variant") => Err(de::Error::custom(e)),
            _ => Ok(name),
        }
    }
}

/// The models of the CLI, by their `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelKind {
    /// The linear model of Eq. 8.
    Linear(LinearConfig),
    /// The nonlinear model of Eq. 15.
    Nonlinear(NonlinearConfig),
    /// The saw time series of Eq. 17.
    Saw(SawConfig),
    /// The Bayesian Gaussian mixture (θ = μ_1 … μ_K, each D values).
    Mixture(MixtureConfig),
    /// Discrete HMM with Gaussian emissions (θ = μ_1 … μ_K).
    DiscreteHmm(DiscreteHmmConfig),
    /// The Bayesian neural network decoder of Eq. 16 (θ: 283,920 weights
    /// and biases at the paper's sizes).
    Bnn(BnnConfig),
    /// The Gaussian HMM of Prop. 3.8 (corrected).
    GaussianHmm(GaussianHmmConfig),
}

impl ModelKind {
    /// The registry: each kind's entry.
    pub fn entry(&self) -> &dyn ModelEntry {
        match self {
            Self::Linear(c) => c,
            Self::Nonlinear(c) => c,
            Self::Saw(c) => c,
            Self::Mixture(c) => c,
            Self::DiscreteHmm(c) => c,
            Self::Bnn(c) => c,
            Self::GaussianHmm(c) => c,
        }
    }
}

/// The linear model's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearConfig {
    /// Loading τ > 0.
    pub tau: f64,
    /// Noise sd σ > 0.
    pub sigma: f64,
}

impl ModelEntry for LinearConfig {
    fn build(&self, _dim: usize) -> Result<Box<dyn CliModel>> {
        Ok(Box::new(LinearModel::new(self.tau, self.sigma)?))
    }
}

/// The nonlinear model's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NonlinearConfig {
    /// Simulator: `"model"` (default) or `"authors"` (z ~ N(0, 25)).
    #[serde(default)]
    pub sim: NonlinearSimConfig,
    /// Objective: `"model"` (default, the model's normalised log joint) or
    /// `"authors"` (the authors' code's: no −cos z normaliser, flat prior
    /// on θ). Left out when written if `"model"`, so default configs
    /// serialize as before.
    #[serde(default, skip_serializing_if = "NonlinearObjectiveConfig::is_model")]
    pub objective: NonlinearObjectiveConfig,
}

impl ModelEntry for NonlinearConfig {
    fn build(&self, _dim: usize) -> Result<Box<dyn CliModel>> {
        let sim = match self.sim {
            NonlinearSimConfig::Model => NonlinearSim::Model,
            NonlinearSimConfig::Authors => NonlinearSim::Authors,
        };
        let objective = match self.objective {
            NonlinearObjectiveConfig::Model => NonlinearObjective::Model,
            NonlinearObjectiveConfig::Authors => NonlinearObjective::Authors,
        };
        Ok(Box::new(NonlinearModel::new(sim).with_objective(objective)))
    }
}

/// The saw model's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SawConfig {
    /// Slope α ≠ 0.
    pub alpha: f64,
    /// Known x_0 (default 0).
    #[serde(default)]
    pub x0: f64,
    /// Simulator: `"model"` (default) or `"authors"` (x_n = α(θ +
    /// x_{n−1}) + ε, the authors' code). Left out when written if
    /// `"model"`, so default configs serialize as before.
    #[serde(default, skip_serializing_if = "SawSimConfig::is_model")]
    pub sim: SawSimConfig,
}

impl ModelEntry for SawConfig {
    fn build(&self, _dim: usize) -> Result<Box<dyn CliModel>> {
        Ok(Box::new(SawModel::new(self.alpha, self.x0)?.with_sim(
            match self.sim {
                SawSimConfig::Model => SawSim::Model,
                SawSimConfig::Authors => SawSim::Authors,
            },
        )))
    }
}

/// The Bayesian Gaussian mixture's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureConfig {
    /// Number of components K ≥ 1.
    pub k: usize,
    /// Prior sd σ0 of the means.
    pub prior_sd: f64,
    /// Observation noise sd s.
    pub noise_sd: f64,
    /// Mixture weights (default uniform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
}

impl ModelEntry for MixtureConfig {
    fn build(&self, dim: usize) -> Result<Box<dyn CliModel>> {
        Ok(Box::new(MixtureModel::new(
            self.k,
            dim,
            self.prior_sd,
            self.noise_sd,
            self.weights.as_deref(),
        )?))
    }

    /// `data.simulate.dim`, else θ's length / K when θ is given, else 1.
    fn simulated_dim(&self, sim: &SimulateConfig) -> usize {
        let k = self.k.max(1);
        sim.dim
            .or_else(|| sim.theta.as_ref().map(|t| (t.len() / k).max(1)))
            .unwrap_or(1)
    }
}

/// The discrete HMM's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscreteHmmConfig {
    /// Initial probabilities π (K values).
    pub init: Vec<f64>,
    /// Transition matrix A, K rows of K probabilities.
    pub transition: Vec<Vec<f64>>,
    /// Emission sd s.
    pub emission_sd: f64,
    /// Prior sd of the state means.
    pub prior_sd: f64,
}

impl ModelEntry for DiscreteHmmConfig {
    fn build(&self, _dim: usize) -> Result<Box<dyn CliModel>> {
        if self.transition.len() != self.init.len() {
            bail!(
                "model.transition has {} rows, init has {} states",
                self.transition.len(),
                self.init.len()
            );
        }
        Ok(Box::new(DiscreteHmm::new(
            &self.init,
            &self.transition.concat(),
            self.emission_sd,
            self.prior_sd,
        )?))
    }
}

/// The BNN decoder's sizes and noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BnnConfig {
    /// Latent dimension (default 64).
    #[serde(default = "default_latent")]
    pub latent: usize,
    /// Hidden width of the decoder (default 256).
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Pixel noise sd σ (default 1, the paper's unit variance; √½ is
    /// the authors' code).
    #[serde(default = "default_bnn_noise_sd")]
    pub noise_sd: f64,
}

impl ModelEntry for BnnConfig {
    fn build(&self, dim: usize) -> Result<Box<dyn CliModel>> {
        Ok(Box::new(
            BnnModel::new(self.latent, self.hidden, dim)?.with_noise_sd(self.noise_sd)?,
        ))
    }

    /// `data.simulate.dim`, else a Fashion-MNIST image's pixels.
    fn simulated_dim(&self, sim: &SimulateConfig) -> usize {
        sim.dim.unwrap_or(fashion_mnist::PIXELS)
    }
}

/// The Gaussian HMM's parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaussianHmmConfig {
    /// Autoregression ρ.
    pub rho: f64,
    /// Transition sd q > 0.
    pub q: f64,
    /// Emission sd r > 0.
    pub r: f64,
    /// Initial sd s0 > 0.
    pub s0: f64,
}

impl ModelEntry for GaussianHmmConfig {
    fn build(&self, _dim: usize) -> Result<Box<dyn CliModel>> {
        Ok(Box::new(GaussianHmm::new(
            self.rho, self.q, self.r, self.s0,
        )?))
    }
}

/// The nonlinear model's simulator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonlinearSimConfig {
    /// z ~ N(0, 1), the model itself.
    #[default]
    Model,
    /// z ~ N(0, 25), the authors' code.
    Authors,
}

/// The nonlinear model's objective (which log joint the fit targets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonlinearObjectiveConfig {
    /// The model's normalised log joint.
    #[default]
    Model,
    /// The authors' code's: the likelihood without its −cos z normaliser
    /// and a flat prior on θ (not a normalised density).
    Authors,
}

impl NonlinearObjectiveConfig {
    /// Whether this is the default, the model's own.
    pub fn is_model(&self) -> bool {
        *self == Self::Model
    }
}

/// The saw model's simulator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SawSimConfig {
    /// x_n = α(θ + z_n) + ε, the model itself.
    #[default]
    Model,
    /// x_n = α(θ + x_{n−1}) + ε, the authors' code (z_n drawn, not used).
    Authors,
}

impl SawSimConfig {
    /// Whether this is the default, the model itself.
    pub fn is_model(&self) -> bool {
        *self == Self::Model
    }
}

fn default_bnn_noise_sd() -> f64 {
    1.0
}

fn default_latent() -> usize {
    64
}

fn default_hidden() -> usize {
    256
}
/// Settings of a simulated data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulateConfig {
    /// Number of observations.
    pub n: usize,
    /// Seed of the simulator.
    pub seed: u64,
    /// θ to simulate with (drawn from its prior when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub theta: Option<Vec<f64>>,
    /// Dimension D of each observation, for models with vector observations
    /// (mixture; default: θ's length / K when θ is given, else 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim: Option<usize>,
}
