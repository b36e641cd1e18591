//! The `avi fit` configuration file (JSON, unknown fields rejected).
//!
//! ```json
//! { "model":  {"kind": "linear", "tau": 1.155, "sigma": 2.43},
//!   "data":   {"simulate": {"n": 10000, "seed": 7}},
//!   "method": {"kind": "avi", "fn": {"kind": "poly", "degree": 1}},
//!   "steps": 5000, "lr": 0.01, "draws": 100, "seed": 1954, "eval_draws": 1000 }
//! ```
//!
//! `data` is either `{"file": "x.json"}` (a relative path is resolved
//! against the config file's folder; the file holds `{"x": [...]}`) or
//! `{"simulate": {"n": N, "seed": S, "theta": [..]}}` (`theta` optional).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use avi_inference::{Dtype, Entropy, FitOptions, LocalUpdates, LrStep, MethodConfig};
use serde::{Deserialize, Serialize};

pub use crate::models::{
    ModelConfig, ModelKind, NonlinearObjectiveConfig, NonlinearSimConfig, SawSimConfig,
    SimulateConfig,
};

/// Where the observations come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// A JSON file `{"x": [...]}`.
    File(PathBuf),
    /// Simulate from the model with a seed.
    Simulate(SimulateConfig),
    /// The first `n` images of a Fashion-MNIST split, pixels in [0, 1].
    FashionMnist(FashionMnistConfig),
}

/// Which Fashion-MNIST images to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FashionMnistConfig {
    /// `"train"` or `"test"`.
    pub split: FashionMnistSplit,
    /// Number of images (the first n of the split).
    pub n: usize,
    /// Folder with the four official files (default: the project's
    /// `data/fashion-mnist`); relative paths are resolved against the config
    /// file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// A Fashion-MNIST split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FashionMnistSplit {
    /// 60,000 training images.
    Train,
    /// 10,000 test images.
    Test,
}

fn default_steps() -> usize {
    FitOptions::default().steps
}
fn default_lr() -> f64 {
    FitOptions::default().lr
}
fn default_draws() -> usize {
    FitOptions::default().draws
}
fn default_seed() -> u64 {
    FitOptions::default().seed
}
fn default_eval_draws() -> usize {
    FitOptions::default().eval_draws
}

/// A whole `avi fit` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitConfig {
    /// The model.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// The variational family.
    pub method: MethodConfig,
    /// Adam steps (default 5000).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Adam learning rate (default 0.01).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Monte Carlo draws per step (default 100).
    #[serde(default = "default_draws")]
    pub draws: usize,
    /// Seed of initialisation and draws (default 1954).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Fresh draws for the final ELBO (default 1000).
    #[serde(default = "default_eval_draws")]
    pub eval_draws: usize,
    /// `"mc"` (default) or `"analytic"`.
    #[serde(default)]
    pub entropy: Entropy,
    /// `"f32"` (default) or `"f64"`.
    #[serde(default)]
    pub dtype: Dtype,
    /// Write q(z) into the report (default true; large for big N).
    #[serde(default = "yes")]
    pub report_q_z: bool,
    /// Mini-batch size (default: all observations); the likelihood is scaled
    /// by N/B.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Reshuffle the mini-batch order every epoch (default false: fixed
    /// contiguous batches, as in the authors' code).
    #[serde(default)]
    pub shuffle: bool,
    /// Learning-rate changes, `[{"from": STEP, "factor": F}, …]`: from step
    /// STEP on the rate is `lr × F` (default none: `lr` throughout, as in
    /// the paper).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_schedule: Vec<LrStep>,
    /// `"auto"` (default: the fastest engine that supports the model,
    /// method, options and device; the report's `engine` names the one
    /// that ran), `"torch"` (libtorch kernels and autograd), `"fused"` (the
    /// fused CPU engine of the scalar models: linear, nonlinear, saw) or
    /// `"graph"` (the libtorch step with a device-side Adam, captured as
    /// CUDA graphs on CUDA; mini-batches without `shuffle`, whole epochs
    /// per graph).
    #[serde(default)]
    pub engine: avi_inference::Engine,
    /// How F-VI updates categorical local factors: `"gradient"` (default,
    /// Adam steps on their logits), `"cavi"` (a sweep of mean-field
    /// coordinate ascent per step) or `"annealed_cavi"` (the same after
    /// deterministic annealing over the first half of the steps); CAVI
    /// needs θ fixed (`model.fixed_theta`).
    #[serde(default, skip_serializing_if = "LocalUpdates::is_gradient")]
    pub local_updates: LocalUpdates,
    /// Reconstruction error monitoring (BNN only; digest §4.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mse: Option<MseConfig>,
    /// Save the fitted state to this folder after the fit (relative to the
    /// config's folder; `avi fit --save` wins). See `docs/saving.md`. With
    /// `checkpoint`, the checkpoints are written into `DIR/checkpoint/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save: Option<PathBuf>,
    /// Start from the fitted state saved in this folder (relative to the
    /// config's folder) instead of the family's initialisation: a warm
    /// start of the same model, method and data (checked), on the libtorch
    /// engine, with a fresh Adam state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Stop early when the ELBO has stopped improving, `{"window": W,
    /// "rel_tol": R, "se_multiple": K, "patience": P, "min_steps": M}`,
    /// every field optional (`{}`: the defaults; see
    /// `avi_inference::StopRule`); absent (the default): all `steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<avi_inference::StopRule>,
    /// Write a checkpoint every `every` steps into the `save` folder
    /// (`{"every": S}`); `avi fit --resume DIR` continues a killed fit from
    /// the latest one with the same bits as the uninterrupted fit (the
    /// libtorch and fused CPU engines; see docs/checkpoints.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointConfig>,
}

/// `"checkpoint": {"every": S}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Steps between checkpoints (at least 1).
    pub every: usize,
}

/// Reconstruction MSE of the BNN, recorded during the fit at the variational
/// means (the Bayes estimators E(θ | x), E(z | x); digest §4.4):
/// `mean((Ω(E z; E θ) − x)²)` over pixels and images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MseConfig {
    /// Steps between records (the paper: once per epoch, N / batch_size).
    pub every: usize,
    /// Held-out images for the test MSE (App. B): the inference function
    /// is applied to them and the decoder evaluated at E θ. F-VI has no test
    /// MSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<DataConfig>,
}

fn yes() -> bool {
    true
}

/// `field `data.simulate.n`: ` for an error at that path; nothing at the
/// top level. A syntax error's unknown last key (`model.?`) is left out, and
/// a path deeper than nesting makes sensible (an array nested 10,000 deep)
/// is cut after [`MAX_PATH`] characters.
fn field_prefix(path: &serde_path_to_error::Path) -> String {
    let full = path.to_string();
    let mut field = full.trim_end_matches('?').trim_end_matches('.');
    if field.is_empty() {
        return String::new();
    }
    if let Some((cut, _)) = field.char_indices().nth(MAX_PATH) {
        field = &field[..cut];
        return format!("field `{field}…`: ");
    }
    format!("field `{field}`: ")
}

/// The longest field path an error shows.
const MAX_PATH: usize = 80;

/// serde's derived deserializers of structs and internally tagged enums also
/// take a JSON array, reading its elements as the fields in declaration
/// order (`"simulate": [100, 7]` would be n = 100, seed = 7). A config
/// spells every field by name: wherever the parsed config is an object,
/// `text` must hold an object too.
fn objects_given_as_objects(text: &str, cfg: &FitConfig) -> Result<()> {
    // Both parses succeed here: `text` was just read into `cfg`.
    let given: serde_json::Value = serde_json::from_str(text)?;
    let parsed = serde_json::to_value(cfg)?;
    match first_array_for_object(&given, &parsed, String::new()) {
        None => Ok(()),
        Some(field) if field.is_empty() => {
            bail!("the config must be a JSON object {{…}}, not an array")
        }
        Some(field) => {
            bail!("field `{field}`: expected an object {{…}} with named fields, found an array")
        }
    }
}

/// The path (`data.simulate`, `lr_schedule[0]`) of the first place where
/// `given` holds an array and `parsed` an object; fields missing from
/// `given` (defaults) are skipped.
fn first_array_for_object(
    given: &serde_json::Value,
    parsed: &serde_json::Value,
    path: String,
) -> Option<String> {
    use serde_json::Value;
    match (given, parsed) {
        (Value::Array(_), Value::Object(_)) => Some(path),
        (Value::Object(g), Value::Object(p)) => p.iter().find_map(|(key, pv)| {
            let gv = g.get(key)?;
            let sub = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            first_array_for_object(gv, pv, sub)
        }),
        (Value::Array(g), Value::Array(p)) => g
            .iter()
            .zip(p)
            .enumerate()
            .find_map(|(i, (gv, pv))| first_array_for_object(gv, pv, format!("{path}[{i}]"))),
        _ => None,
    }
}

impl FitConfig {
    /// Read and validate a config file. Errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_json_text(path, "config")?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = field_prefix(e.path());
            anyhow::anyhow!("{field}{}", e.into_inner())
        })?;
        objects_given_as_objects(text, &cfg)?;
        cfg.options().check()?;
        if let Some(m) = &cfg.mse {
            if !matches!(cfg.model.kind, ModelKind::Bnn(_)) {
                bail!("field `mse`: reconstruction error is defined for the bnn model only");
            }
            if m.every == 0 {
                bail!("field `mse.every` must be at least 1");
            }
        }
        if let Some(c) = &cfg.checkpoint {
            if c.every == 0 {
                bail!("field `checkpoint.every` must be at least 1");
            }
        }
        Ok(cfg)
    }

    /// The fit options of this config.
    pub fn options(&self) -> FitOptions {
        FitOptions {
            steps: self.steps,
            lr: self.lr,
            draws: self.draws,
            seed: self.seed,
            eval_draws: self.eval_draws,
            entropy: self.entropy,
            dtype: self.dtype,
            check_every: 100,
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            engine: self.engine,
            lr_schedule: self.lr_schedule.clone(),
            local_updates: self.local_updates,
            stop: self.stop.clone(),
        }
    }
}

/// Observations on the host: N scalars (`dim` = None) or N vectors of
/// `dim` values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    /// The values, row-major.
    pub values: Vec<f64>,
    /// The dimension of vector observations; `None` for scalars.
    pub dim: Option<usize>,
}

impl Data {
    /// Number of observations.
    pub fn len(&self) -> usize {
        self.values.len() / self.dim.unwrap_or(1).max(1)
    }

    /// Whether there is no observation.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The UTF-8 byte-order mark some editors put at the start of a text file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Read the JSON text of `path`: a leading UTF-8 byte-order mark is dropped,
/// bytes that are not UTF-8 are refused. Errors name the file as
/// `{what} {path}` (`what` is e.g. `"config"`, `"data file"`,
/// `"experiment"`): `cannot read config c.json: …` when the file cannot be
/// read, `config c.json: not UTF-8 text (byte 17)` with the offset of the
/// first bad byte in the file.
pub fn read_json_text(path: &Path, what: &str) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let skip = if bytes.starts_with(BOM) { BOM.len() } else { 0 };
    match String::from_utf8(bytes) {
        Ok(mut text) => {
            text.drain(..skip);
            Ok(text)
        }
        Err(e) => bail!(
            "{what} {}: not UTF-8 text (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ),
    }
}

/// One element of a data file's `x`: a number or an array of numbers.
enum Observation {
    Scalar(f64),
    Vector(Vec<f64>),
}

impl<'de> Deserialize<'de> for Observation {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Observation;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or an array of numbers")
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Observation, E> {
                Ok(Observation::Scalar(v))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Observation, E> {
                Ok(Observation::Scalar(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Observation, E> {
                Ok(Observation::Scalar(v as f64))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Observation, A::Error> {
                let mut row = Vec::new();
                while let Some(v) = seq.next_element::<f64>()? {
                    row.push(v);
                }
                Ok(Observation::Vector(row))
            }
        }
        de.deserialize_any(Visit)
    }
}

/// A data file's `x`, flattened: the values row-major and the length of
/// each element (`None` for a number).
struct Observations {
    values: Vec<f64>,
    lengths: Vec<Option<usize>>,
}

impl<'de> Deserialize<'de> for Observations {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Observations;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of numbers, or of arrays of numbers")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Observations, A::Error> {
                let mut obs = Observations {
                    values: Vec::new(),
                    lengths: Vec::new(),
                };
                while let Some(o) = seq.next_element::<Observation>()? {
                    match o {
                        Observation::Scalar(v) => {
                            obs.values.push(v);
                            obs.lengths.push(None);
                        }
                        Observation::Vector(row) => {
                            obs.lengths.push(Some(row.len()));
                            obs.values.extend(row);
                        }
                    }
                }
                Ok(obs)
            }
        }
        de.deserialize_seq(Visit)
    }
}

/// The contents of a data file: an object with the one field `x` (not an
/// array, which serde's derived struct deserializer would take as `x`).
struct DataFile {
    x: Observations,
}

impl<'de> Deserialize<'de> for DataFile {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = DataFile;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"an object {"x": [...]}"#)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<DataFile, A::Error> {
                use serde::de::Error;
                let mut x = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "x" {
                        return Err(A::Error::unknown_field(&key, &["x"]));
                    }
                    if x.is_some() {
                        return Err(A::Error::duplicate_field("x"));
                    }
                    x = Some(map.next_value::<Observations>()?);
                }
                let x = x.ok_or_else(|| A::Error::missing_field("x"))?;
                Ok(DataFile { x })
            }
        }
        de.deserialize_map(Visit)
    }
}

/// Read observations from `path`: JSON `{"x": [...]}` (numbers, or arrays
/// of numbers of one length), or by extension a `.csv` or NumPy `.npy`
/// file ([`crate::data_files`]); rejects an empty list, ragged rows and
/// non-finite values. Every error names the file.
pub fn load_data_file(path: &Path) -> Result<Data> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if let Some(ext @ ("csv" | "npy")) = ext.as_deref() {
        let (values, dim) = if ext == "csv" {
            crate::data_files::read_csv(path)?
        } else {
            crate::data_files::read_npy(path)?
        };
        let file = path.display();
        if values.is_empty() {
            bail!("data file {file}: no observations");
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!("data file {file}: value {i} ({}) is not finite", values[i]);
        }
        return Ok(Data { values, dim });
    }
    let text = read_json_text(path, "data file")?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let file = path.display();
    let x = match serde_path_to_error::deserialize::<_, DataFile>(de) {
        Ok(data) => data.x,
        Err(e) => {
            let field = field_prefix(e.path());
            bail!("data file {file}: {field}{}", e.into_inner());
        }
    };
    if x.lengths.is_empty() {
        bail!("data file {file}: `x` is empty");
    }
    let dim = x.lengths[0];
    if let Some(i) = x.lengths.iter().position(|l| l.is_some() != dim.is_some()) {
        bail!(
            "data file {file}: x[{i}] is {}, x[0] {}",
            if dim.is_some() {
                "a number"
            } else {
                "an array"
            },
            if dim.is_some() {
                "an array"
            } else {
                "a number"
            }
        );
    }
    if dim == Some(0) {
        bail!("data file {file}: `x` holds empty arrays");
    }
    if let Some(i) = x.lengths.iter().position(|l| *l != dim) {
        bail!(
            "data file {file}: x[{i}] has {} values, x[0] has {}",
            x.lengths[i].unwrap_or(1),
            dim.unwrap_or(1)
        );
    }
    if let Some(i) = x.values.iter().position(|v| !v.is_finite()) {
        bail!("data file {file}: value {i} of x is not finite");
    }
    Ok(Data {
        values: x.values,
        dim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{ "model": {"kind": "linear", "tau": 1.155, "sigma": 2.43},
        "data": {"simulate": {"n": 100, "seed": 7}},
        "method": {"kind": "avi", "fn": {"kind": "poly", "degree": 1}},
        "steps": 10, "lr": 0.01, "draws": 4, "seed": 1, "eval_draws": 10 }"#;

    #[test]
    fn parses_the_contract_example() {
        let c = FitConfig::parse(GOOD).unwrap();
        assert_eq!(c.steps, 10);
        assert!(matches!(
            c.method,
            MethodConfig::Avi {
                standardize: true,
                ..
            }
        ));
        assert!(matches!(
            c.data,
            DataConfig::Simulate(SimulateConfig { n: 100, .. })
        ));
        let f = FitConfig::parse(
            r#"{"model": {"kind": "linear", "tau": 1, "sigma": 1}, "data": {"file": "x.json"},
                "method": {"kind": "fvi"}}"#,
        )
        .unwrap();
        assert_eq!(f.data, DataConfig::File("x.json".into()));
    }

    /// The nonlinear model's `objective`: `"model"` by default and then not
    /// written (so default configs serialize as before), `"authors"` parsed,
    /// written and read back equal; the harness builds the model with that
    /// objective (and with the simulator chosen independently); an unknown
    /// objective is an error naming `model.objective`, whichever the order
    /// of the fields.
    #[test]
    fn nonlinear_objective_choice() {
        use avi_models::{NonlinearModel, NonlinearObjective, NonlinearSim};
        let parse = |json: &str| serde_json::from_str::<ModelConfig>(json);
        let default = parse(r#"{"kind": "nonlinear"}"#).unwrap();
        let written = serde_json::to_string(&default).unwrap();
        assert!(!written.contains("objective"), "{written}");
        assert_eq!(parse(&written).unwrap(), default);
        let explicit = parse(r#"{"kind": "nonlinear", "objective": "model"}"#).unwrap();
        assert_eq!(explicit, default);
        let authors =
            parse(r#"{"kind": "nonlinear", "sim": "authors", "objective": "authors"}"#).unwrap();
        assert!(matches!(
            authors.kind,
            ModelKind::Nonlinear(crate::models::NonlinearConfig {
                sim: NonlinearSimConfig::Authors,
                objective: NonlinearObjectiveConfig::Authors,
            })
        ));
        let written = serde_json::to_string(&authors).unwrap();
        assert!(written.contains(r#""objective":"authors""#), "{written}");
        assert_eq!(parse(&written).unwrap(), authors);
        let built = |c: &ModelConfig| {
            *crate::run::BuiltModel::new(c, 1)
                .unwrap()
                .downcast_ref::<NonlinearModel>()
                .unwrap()
        };
        assert_eq!(
            built(&authors),
            NonlinearModel::new(NonlinearSim::Authors).with_objective(NonlinearObjective::Authors)
        );
        assert_eq!(built(&default), NonlinearModel::new(NonlinearSim::Model));
        let with_model =
            |model: &str| GOOD.replace(r#"{"kind": "linear", "tau": 1.155, "sigma": 2.43}"#, model);
        let c = FitConfig::parse(&with_model(
            r#"{"kind": "nonlinear", "objective": "authors"}"#,
        ))
        .unwrap();
        assert_eq!(
            c.model.kind,
            parse(r#"{"kind": "nonlinear", "objective": "authors"}"#)
                .unwrap()
                .kind
        );
        let bad = r#"{"kind": "nonlinear", "objective": "code"}"#;
        let e = format!("{:#}", FitConfig::parse(&with_model(bad)).unwrap_err());
        assert!(
            e.starts_with("field `model.objective`: unknown variant `code`"),
            "{e}"
        );
        // Before `kind`, the field is named in the message.
        let bad = r#"{"objective": "code", "kind": "nonlinear"}"#;
        let e = format!("{:#}", FitConfig::parse(&with_model(bad)).unwrap_err());
        assert!(
            e.starts_with("field `model`: `objective`: unknown variant `code`"),
            "{e}"
        );
        // Read after `kind`, a field is named at its own path.
        let e = FitConfig::parse(&with_model(
            r#"{"kind": "nonlinear", "objectiv": "authors"}"#,
        ))
        .unwrap_err();
        assert!(format!("{e:#}").contains("model.objectiv"), "{e:#}");
    }

    #[test]
    fn rejects_unknown_fields_everywhere() {
        for bad in [
            GOOD.replace("\"steps\"", "\"stepz\""),
            GOOD.replace("\"tau\"", "\"tua\""),
            GOOD.replace("\"degree\"", "\"deg\""),
            GOOD.replace("\"seed\": 7", "\"seed\": 7, \"x\": 1"),
            GOOD.replace("\"kind\": \"avi\"", "\"kind\": \"avi\", \"extra\": 1"),
            GOOD.replace("\"kind\": \"linear\"", "\"kind\": \"quadratic\""),
        ] {
            assert!(FitConfig::parse(&bad).is_err(), "accepted: {bad}");
        }
        let e = FitConfig::parse(&GOOD.replace("\"steps\": 10", "\"steps\": -1")).unwrap_err();
        assert!(format!("{e:#}").contains("steps"), "{e:#}");
        let e = FitConfig::parse(&GOOD.replace("\"lr\": 0.01", "\"lr\": 0")).unwrap_err();
        assert!(format!("{e:#}").contains("lr"), "{e:#}");
    }

    /// `lr_schedule` reaches the fit options; a bad one is an error naming
    /// the field, and a misspelt entry field is rejected.
    #[test]
    fn reads_and_checks_the_lr_schedule() {
        let with = |schedule: &str| {
            GOOD.replace(
                "\"lr\": 0.01",
                &format!("\"lr\": 0.01, \"lr_schedule\": {schedule}"),
            )
        };
        let c = FitConfig::parse(&with(r#"[{"from": 6, "factor": 0.1}]"#)).unwrap();
        let o = c.options();
        assert_eq!(o.lr_change_at(6), Some(0.01 * 0.1));
        assert_eq!(o.lr_change_at(5), None);
        assert!(FitConfig::parse(GOOD)
            .unwrap()
            .options()
            .lr_schedule
            .is_empty());
        for bad in [
            r#"[{"from": 1, "factor": 0.1}]"#,
            r#"[{"from": 6, "factor": 0}]"#,
            r#"[{"from": 6, "factor": 0.1}, {"from": 3, "factor": 0.1}]"#,
        ] {
            let e = FitConfig::parse(&with(bad)).unwrap_err();
            assert!(format!("{e:#}").contains("lr_schedule"), "{bad}: {e:#}");
        }
        assert!(FitConfig::parse(&with(r#"[{"from": 6, "factr": 0.1}]"#)).is_err());
    }

    /// Write `bytes` to `name` in a fresh folder.
    fn file_with(bytes: &[u8], name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    /// A UTF-8 byte-order mark before a config or a data file is skipped;
    /// bytes that are not UTF-8 are an error naming the file and the offset.
    #[test]
    fn a_byte_order_mark_is_skipped_and_non_utf8_refused() {
        let mut bytes = BOM.to_vec();
        bytes.extend_from_slice(GOOD.as_bytes());
        let (_d, path) = file_with(&bytes, "c.json");
        assert_eq!(
            FitConfig::load(&path).unwrap(),
            FitConfig::parse(GOOD).unwrap()
        );
        assert_eq!(read_json_text(&path, "config").unwrap(), GOOD);

        let (_d, path) = file_with(b"\xEF\xBB\xBF{\"x\": [1.5, -2]}", "x.json");
        let data = load_data_file(&path).unwrap();
        assert_eq!(data.values, [1.5, -2.0]);
        assert_eq!(data.dim, None);

        // Byte 13 of the file (counting the mark) is a lone continuation byte.
        let mut bad = BOM.to_vec();
        bad.extend_from_slice(b"{\"x\": [1, \x80]}");
        let (_d, path) = file_with(&bad, "x.json");
        let e = format!("{:#}", read_json_text(&path, "data file").unwrap_err());
        assert_eq!(
            e,
            format!("data file {}: not UTF-8 text (byte 13)", path.display())
        );
        let e = format!("{:#}", load_data_file(&path).unwrap_err());
        assert!(e.contains("x.json") && e.contains("not UTF-8"), "{e}");
        let (_d, path) = file_with(b"{\"steps\": \xff}", "c.json");
        let e = format!("{:#}", FitConfig::load(&path).unwrap_err());
        assert!(
            e.contains("config") && e.contains("c.json") && e.contains("byte 10"),
            "{e}"
        );
        // A mark anywhere else is not skipped: JSON does not allow it.
        let inside = format!("{{\u{feff}{}", &GOOD[1..]);
        let (_d, path) = file_with(inside.as_bytes(), "c.json");
        assert!(FitConfig::load(&path).is_err());

        let missing = path.with_file_name("nope.json");
        let e = format!("{:#}", read_json_text(&missing, "experiment").unwrap_err());
        assert!(
            e.starts_with("cannot read experiment ") && e.contains("nope.json"),
            "{e}"
        );
    }

    /// serde's derived deserializers take an array for a struct (fields in
    /// order) and for an internally tagged enum (the tag first); a config
    /// names every field, so each such array is an error naming its field.
    #[test]
    fn objects_given_as_arrays_are_refused() {
        let bnn = r#"{"model": {"kind": "bnn", "latent": 2, "hidden": 3},
            "data": {"fashion_mnist": {"split": "test", "n": 5}},
            "method": {"kind": "fvi"}, "mse": {"every": 2, "test": {"file": "t.json"}}}"#;
        assert!(FitConfig::parse(bnn).is_ok());
        let cases = [
            (
                GOOD.replace(r#"{"n": 100, "seed": 7}"#, "[100, 7]"),
                "data.simulate",
            ),
            (
                GOOD.replace(
                    r#"{"kind": "linear", "tau": 1.155, "sigma": 2.43}"#,
                    r#"["linear", 1.155, 2.43]"#,
                ),
                "model",
            ),
            (
                GOOD.replace(r#"{"kind": "poly", "degree": 1}"#, r#"["poly", 1]"#),
                "method.fn",
            ),
            (
                GOOD.replace(
                    r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}}"#,
                    r#"["avi", {"kind": "poly", "degree": 1}]"#,
                ),
                "method",
            ),
            (
                GOOD.replace("\"lr\": 0.01", "\"lr\": 0.01, \"lr_schedule\": [[6, 0.1]]"),
                "lr_schedule[0]",
            ),
            (
                bnn.replace(r#"{"split": "test", "n": 5}"#, r#"["test", 5]"#),
                "data.fashion_mnist",
            ),
            (
                bnn.replace(r#"{"every": 2, "test": {"file": "t.json"}}"#, "[2]"),
                "mse",
            ),
        ];
        for (text, field) in cases {
            let e = format!("{:#}", FitConfig::parse(&text).unwrap_err());
            assert!(e.contains(&format!("field `{field}`")), "{field}: {e}");
        }
        let whole = r#"[{"kind": "linear", "tau": 1, "sigma": 1}, {"simulate": {"n": 5, "seed": 1}}, {"kind": "fvi"}]"#;
        let e = format!("{:#}", FitConfig::parse(whole).unwrap_err());
        assert!(e.contains("must be a JSON object"), "{e}");
        // Arrays where the config has arrays stay arrays.
        let c = FitConfig::parse(&GOOD.replace(
            "\"fn\": {\"kind\": \"poly\", \"degree\": 1}",
            "\"fn\": {\"kind\": \"poly\", \"degree\": 1}, \"window\": [1, 0]",
        ))
        .unwrap();
        assert!(matches!(c.method, MethodConfig::Avi { window: [1, 0], .. }));
    }

    /// Every way a data file can be invalid is an error that names it,
    /// including a positional array for the file's object.
    #[test]
    fn invalid_data_files_are_errors_naming_the_file() {
        let deep = format!("{{\"x\": {}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        let bad: [&[u8]; 17] = [
            b"",
            b"   ",
            b"[[1, 2, 3]]",
            b"{\"x\": [1, 2",
            b"{\"x\": []}",
            b"{\"x\": [[]]}",
            b"{\"x\": 1}",
            b"{\"x\": {\"0\": 1}}",
            b"{\"y\": [1]}",
            b"{}",
            b"{\"x\": [1], \"x\": [2]}",
            b"{\"x\": [1, [2]]}",
            b"{\"x\": [[2], 1]}",
            b"{\"x\": [[1, 2], [3]]}",
            b"{\"x\": [1, 1e999]}",
            b"{\"x\": [1, NaN]}",
            deep.as_bytes(),
        ];
        for text in bad {
            let (_d, path) = file_with(text, "obs.json");
            let e = format!("{:#}", load_data_file(&path).unwrap_err());
            let shown = String::from_utf8_lossy(&text[..text.len().min(40)]).into_owned();
            assert!(
                e.starts_with(&format!("data file {}", path.display())),
                "{shown}: {e}"
            );
        }
        let (_d, path) = file_with(b"{\"x\": [[1, 2], [3, 4], [5, 6]]}", "obs.json");
        let data = load_data_file(&path).unwrap();
        assert_eq!((data.values.len(), data.dim, data.len()), (6, Some(2), 3));
        let e = format!(
            "{:#}",
            load_data_file(&path.with_file_name("gone.json")).unwrap_err()
        );
        assert!(
            e.starts_with("cannot read data file") && e.contains("gone.json"),
            "{e}"
        );
    }

    /// Errors name the field, without a syntax error's unknown key and
    /// with a deep path cut short.
    #[test]
    fn error_paths_are_short_and_readable() {
        let e = FitConfig::parse(&GOOD[..30]).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.starts_with("field `model`: EOF"), "{e}");
        for top in ["", "{\"steps\": 1,", "{\"steps\": 1, \"st"] {
            let e = format!("{:#}", FitConfig::parse(top).unwrap_err());
            assert!(!e.contains("field"), "{top}: {e}");
        }
        let deep = GOOD.replace(
            "\"tau\": 1.155",
            &format!("\"tau\": {}{}", "[".repeat(10_000), "]".repeat(10_000)),
        );
        let e = format!("{:#}", FitConfig::parse(&deep).unwrap_err());
        assert!(e.starts_with("field `model"), "{e}");
        assert!(e.len() < 300, "{} characters: {e}", e.len());
        let (_d, path) = file_with(
            format!("{{\"x\": [{}1{}]}}", "[".repeat(500), "]".repeat(500)).as_bytes(),
            "obs.json",
        );
        let e = format!("{:#}", load_data_file(&path).unwrap_err());
        assert!(e.len() < 300 && e.contains("obs.json"), "{e}");
    }

    /// Extreme integers parse (the ranges are `FitOptions::check`'s) or are
    /// errors naming the field; nothing in this module panics on them.
    #[test]
    fn extreme_integers_never_panic() {
        for v in [
            "0",
            "4294967297",
            "9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
            "-9223372036854775809",
            "1e308",
            "-1e308",
            "1.5",
        ] {
            for field in ["\"steps\": 10", "\"draws\": 4", "\"seed\": 1", "\"n\": 100"] {
                let key = field.split(':').next().unwrap();
                let text = GOOD.replace(field, &format!("{key}: {v}"));
                if let Ok(c) = FitConfig::parse(&text) {
                    assert_eq!(c.options().seed, c.seed, "{key} = {v}");
                }
            }
        }
        let e = FitConfig::parse(&GOOD.replace("\"steps\": 10", "\"steps\": 18446744073709551616"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("steps"), "{e:#}");
    }
}
