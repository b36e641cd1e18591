//! Fitted families that outlive the process: a [`Fitted`] (a
//! [`Variational`] with what is needed to rebuild it) saved to a folder and
//! loaded back, on any device.
//!
//! A saved fit is a folder of two files:
//!
//! - `state.safetensors`: every variational tensor under its
//!   [`tch::nn::VarStore`] name (`theta_mean`, `theta_log_sd`, `z`, the
//!   inference function's `fn.*` weights, `edge_head`, `edge_tail`), θ's
//!   values `theta_fixed` when θ was held fixed, and the non-trainable
//!   tensors the encoder needs beyond its weights: `input.mean` and
//!   `input.sd` (the training data's standardisation, `[1, d]`, A-VI with
//!   `standardize`) and `data.min`, `data.max` (`[d]` f64, per observation
//!   dimension: the range of the training data, see
//!   [`crate::encode`]), written by tch ([`Tensor::write_safetensors`]);
//! - `fitted.json`: the [`Manifest`] (format version, method, model and
//!   its configuration, dtype, every tensor's name, shape and dtype, the
//!   SHA-256 and size of the state file, the training data's fingerprint,
//!   the avi version and git commit). It is written last.
//!
//! Both are written into a temporary folder beside the target, synced, and
//! the folder is renamed into place: a reader sees the old state or the new
//! one, never half of one. A folder holding the state of another fit (other
//! model, method or data) is refused; one holding the same fit's state is
//! replaced.
//!
//! [`Fitted::load`] checks everything before it builds anything: the format
//! version, the file's size and checksum, that the file's tensors are those
//! of the manifest, that the manifest is the model, method and data the
//! caller asks for ([`Expect`]), and that every tensor has the shape and
//! dtype the method needs. Each failure is an [`InferenceError::Saved`]
//! naming the file and the problem.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};

use crate::family::GaussianParams;
use crate::function::Output;
use crate::method::{Edges, InputMap, LocalFactor, MethodConfig, ThetaFactor, Variational};
use crate::options::Dtype;
use crate::{InferenceError, Result};

/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name in a saved folder.
pub const MANIFEST_FILE: &str = "fitted.json";
/// The tensors' file name in a saved folder.
pub const STATE_FILE: &str = "state.safetensors";

/// Names of the tensors a state holds beside the store's variables.
const THETA_FIXED: &str = "theta_fixed";
const INPUT_MEAN: &str = "input.mean";
const INPUT_SD: &str = "input.sd";
const DATA_MIN: &str = "data.min";
const DATA_MAX: &str = "data.max";

/// What identifies the training data of a fit: its shape and the SHA-256
/// of its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// The data's shape, `[N]` or `[N, d]`.
    pub shape: Vec<usize>,
    /// Number of values (N·d).
    pub len: usize,
    /// Lower-case hex SHA-256 of the values converted to f64, in row-major
    /// order, each as its 8 little-endian IEEE-754 bytes (so f32 data hash
    /// as their exact f64 values).
    pub sha256: String,
}

impl DataFingerprint {
    /// The fingerprint of `x` (any device and float kind).
    pub fn of(x: &Tensor) -> Result<Self> {
        let values = crate::family::host_vec(x)?;
        let mut hasher = Sha256::new();
        for v in &values {
            hasher.update(v.to_le_bytes());
        }
        Ok(Self {
            shape: x.size().iter().map(|&s| s as usize).collect(),
            len: values.len(),
            sha256: hex(&hasher.finalize()),
        })
    }
}

/// One tensor of a state file, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// The tensor's name in the state file.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its dtype (`f32`, `f64`).
    pub dtype: String,
}

/// One file of a saved folder, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file's name in the folder.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of its bytes.
    pub sha256: String,
}

/// `fitted.json`: everything needed to rebuild and check a saved fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The format version ([`FORMAT_VERSION`] when written by this build).
    pub format_version: u32,
    /// The avi version that wrote it.
    pub avi_version: String,
    /// The git commit of the program that wrote it, when it knows one.
    pub git_commit: Option<String>,
    /// The model's name ([`avi_models::Model::name`]).
    pub model: String,
    /// The model's configuration as given by the caller (the harness: the
    /// config's `model` block); `null` when none was given.
    pub model_config: serde_json::Value,
    /// The family, resolved (every default written).
    pub method: MethodConfig,
    /// The parameters' precision.
    pub dtype: Dtype,
    /// The local factors' layout: `{"gaussian": {"dim": L}}` or
    /// `{"categorical": {"states": K}}`.
    pub output: OutputLayout,
    /// N of the training data.
    pub n: usize,
    /// The training data.
    pub data: DataFingerprint,
    /// The tensors of the state file.
    pub tensors: Vec<TensorEntry>,
    /// The state files.
    pub files: Vec<FileEntry>,
}

/// The serialised form of [`Output`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputLayout {
    /// Gaussian local factors of dimension `dim`.
    Gaussian {
        /// L.
        dim: usize,
    },
    /// Categorical local factors over `states` states.
    Categorical {
        /// K.
        states: usize,
    },
}

impl From<Output> for OutputLayout {
    fn from(o: Output) -> Self {
        match o {
            Output::Gaussian { dim } => Self::Gaussian { dim },
            Output::Categorical { states } => Self::Categorical { states },
            // Never saved (refused by `Fitted::new`): its marginals' layout.
            Output::Markov => Self::Gaussian { dim: 1 },
        }
    }
}

impl From<OutputLayout> for Output {
    fn from(o: OutputLayout) -> Self {
        match o {
            OutputLayout::Gaussian { dim } => Self::Gaussian { dim },
            OutputLayout::Categorical { states } => Self::Categorical { states },
        }
    }
}

/// What a load asks for: each given item is checked against the manifest
/// (a mismatch is an error naming it).
#[derive(Clone, Copy)]
pub struct Expect<'a> {
    /// The model the state is for (its name is checked, and it gives the
    /// padding value, θ's dimension and the local layout).
    pub model: &'a dyn avi_models::Model,
    /// The model's configuration, checked when given.
    pub model_config: Option<&'a serde_json::Value>,
    /// The method, checked when given.
    pub method: Option<&'a MethodConfig>,
    /// The training data, checked (fingerprint) when given; an A-VI family
    /// then gets its training inputs back (built with the *saved*
    /// standardisation), so that it can be fitted further
    /// ([`crate::FitRequest::start_from`]).
    pub data: Option<&'a Tensor>,
}

impl<'a> Expect<'a> {
    /// Expect `model` only.
    pub fn model(model: &'a dyn avi_models::Model) -> Self {
        Self {
            model,
            model_config: None,
            method: None,
            data: None,
        }
    }
}

/// A fitted family that can be saved and loaded: the [`Variational`] and
/// what is needed to rebuild and check it.
#[derive(Debug)]
pub struct Fitted {
    /// The variational parameters. Loaded without its training data
    /// ([`Expect::data`]), an A-VI family holds no training inputs (`n` is
    /// 0 and [`Variational::local_raw`] has no rows); its encoder
    /// ([`Variational::predict_raw`]) is whole.
    pub variational: Variational,
    /// The method the parameters are of.
    pub method: MethodConfig,
    /// The model's name.
    pub model: String,
    /// The model's configuration as given by the caller (`null` if none).
    pub model_config: serde_json::Value,
    /// N of the training data.
    pub n: usize,
    /// The training data's fingerprint.
    pub data: DataFingerprint,
    /// Per observation dimension, the smallest and largest training value.
    pub data_range: (Vec<f64>, Vec<f64>),
    /// The git commit recorded when saving (set it before
    /// [`Fitted::save`]; the harness sets its build's commit).
    pub git_commit: Option<String>,
    /// The avi version that saved it (this build's for a new one).
    pub avi_version: String,
}

impl Fitted {
    /// Wrap a fitted `variational` of `method` for `model`, trained on `x`
    /// (the data the fit was given): computes the data's fingerprint and
    /// range. `model_config` is recorded as is (use `Value::Null` when
    /// there is none).
    pub fn new(
        model: &dyn avi_models::Model,
        method: &MethodConfig,
        variational: Variational,
        x: &Tensor,
        model_config: serde_json::Value,
    ) -> Result<Self> {
        if matches!(method, MethodConfig::Markov(_)) || variational.output == Output::Markov {
            return Err(InferenceError::config(
                "method.structure",
                "fits with \"structure\": \"markov\" cannot be saved or encoded yet \
                 (the saved format holds mean-field local factors only)",
            ));
        }
        let data = DataFingerprint::of(x)?;
        let n = data.shape.first().copied().unwrap_or(0);
        if n == 0 || n != variational.n {
            return Err(InferenceError::config(
                "data",
                format!(
                    "the training data hold {n} observations, the fitted family {}",
                    variational.n
                ),
            ));
        }
        Ok(Self {
            data_range: data_range(x)?,
            variational,
            method: method.clone(),
            model: model.name().to_string(),
            model_config,
            n,
            data,
            git_commit: None,
            avi_version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    /// The parameters' precision.
    pub fn dtype(&self) -> Dtype {
        match state_kind(&self.variational) {
            Kind::Double => Dtype::F64,
            _ => Dtype::F32,
        }
    }

    /// The named tensors of the state file, on the host.
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let var = &self.variational;
        let mut named: Vec<(String, Tensor)> = var
            .vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        if let ThetaFactor::Fixed(t) = &var.theta {
            named.push((THETA_FIXED.into(), t.to_device(Device::Cpu).contiguous()));
        }
        if let LocalFactor::Amortized {
            map:
                InputMap {
                    standardize: Some((mean, sd)),
                    ..
                },
            ..
        } = &var.local
        {
            named.push((INPUT_MEAN.into(), mean.to_device(Device::Cpu).contiguous()));
            named.push((INPUT_SD.into(), sd.to_device(Device::Cpu).contiguous()));
        }
        named.push((DATA_MIN.into(), Tensor::from_slice(&self.data_range.0)));
        named.push((DATA_MAX.into(), Tensor::from_slice(&self.data_range.1)));
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(named)
    }

    /// Save to the folder `dir` (created; its parent must exist),
    /// atomically: the files are written into a temporary folder beside it,
    /// synced and renamed into place. A `dir` that exists must be empty or
    /// hold a saved state of the same model, configuration, method and
    /// data (replaced); anything else is refused.
    pub fn save(&self, dir: &Path) -> Result<()> {
        Self::check_target(
            dir,
            &self.model,
            &self.model_config,
            &self.method,
            &self.data,
        )?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dir
            .file_name()
            .ok_or_else(|| saved_error(dir, "is not a folder name"))?
            .to_string_lossy()
            .into_owned();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = parent.join(format!(".{name}.tmp-{}-{stamp}", std::process::id()));
        let result = self.write_into(&tmp).and_then(|()| replace_dir(&tmp, dir));
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    fn write_into(&self, tmp: &Path) -> Result<()> {
        let io = |e: std::io::Error| saved_error(tmp, format!("cannot be written: {e}"));
        std::fs::create_dir(tmp).map_err(io)?;
        let named = self.named_tensors()?;
        let state = tmp.join(STATE_FILE);
        Tensor::write_safetensors(&named, &state)?;
        sync_file(&state).map_err(io)?;
        let bytes = std::fs::read(&state).map_err(io)?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            avi_version: self.avi_version.clone(),
            git_commit: self.git_commit.clone(),
            model: self.model.clone(),
            model_config: self.model_config.clone(),
            method: self.method.clone(),
            dtype: self.dtype(),
            output: self.variational.output.into(),
            n: self.n,
            data: self.data.clone(),
            tensors: named
                .iter()
                .map(|(name, t)| TensorEntry {
                    name: name.clone(),
                    shape: t.size(),
                    dtype: dtype_name(t.kind()),
                })
                .collect(),
            files: vec![FileEntry {
                name: STATE_FILE.into(),
                bytes: bytes.len() as u64,
                sha256: hex(&Sha256::digest(&bytes)),
            }],
        };
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| saved_error(tmp, format!("manifest not serialisable: {e}")))?;
        let path = tmp.join(MANIFEST_FILE);
        let mut f = std::fs::File::create(&path).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        sync_dir(tmp).map_err(io)?;
        Ok(())
    }

    /// Read the manifest of the saved folder `dir` without loading its
    /// tensors (its format version is checked).
    pub fn manifest(dir: &Path) -> Result<Manifest> {
        read_manifest(dir)
    }

    /// Load the saved folder `dir` onto `device`, checking it against
    /// `expect` (see the module docs for every check). The tensors keep
    /// their saved dtype.
    pub fn load(dir: &Path, expect: &Expect<'_>, device: Device) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        check_expected(dir, &manifest, expect)?;
        let state = read_state(dir, &manifest)?;
        let data_range = (
            host_vec_named(&state, DATA_MIN, dir)?,
            host_vec_named(&state, DATA_MAX, dir)?,
        );
        let dim = match manifest.data.shape.as_slice() {
            [_] => 1,
            [_, d] => *d,
            s => {
                return Err(saved_error(
                    dir,
                    format!("data shape {s:?} is not [N] or [N, d]"),
                ))
            }
        };
        if data_range.0.len() != dim || data_range.1.len() != dim {
            return Err(saved_error(
                &dir.join(STATE_FILE),
                format!("{DATA_MIN}/{DATA_MAX} do not have the data's {dim} dimensions"),
            ));
        }
        let variational = rebuild(dir, &manifest, state, expect, dim, device)?;
        Ok(Self {
            variational,
            method: manifest.method,
            model: manifest.model,
            model_config: manifest.model_config,
            n: manifest.n,
            data: manifest.data,
            data_range,
            git_commit: manifest.git_commit,
            avi_version: manifest.avi_version,
        })
    }
}

/// The kind of a variational's state: its first trainable variable's (its
/// fixed θ's when it has none).
fn state_kind(var: &Variational) -> Kind {
    match (var.vs.trainable_variables().first(), &var.theta) {
        (Some(t), _) => t.kind(),
        (None, ThetaFactor::Fixed(t)) => t.kind(),
        (None, _) => Kind::Float,
    }
}

fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "f32".into(),
        Kind::Double => "f64".into(),
        k => format!("{k:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn saved_error(path: &Path, problem: impl Into<String>) -> InferenceError {
    InferenceError::Saved {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

/// Per observation dimension, the smallest and largest value of `x`.
pub(crate) fn data_range(x: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let x = x.detach().to_kind(Kind::Double);
    let x = if x.dim() == 1 { x.unsqueeze(1) } else { x };
    let (min, _) = x.min_dim(0, false);
    let (max, _) = x.max_dim(0, false);
    Ok((
        crate::family::host_vec(&min)?,
        crate::family::host_vec(&max)?,
    ))
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    // Directories can be opened and synced on Unix; elsewhere this is a
    // no-op that may fail, which is not an error.
    match std::fs::File::open(path) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(e) => Err(e),
    }
}

impl Fitted {
    /// Whether [`Fitted::save`] may write a fit of `model` (name and
    /// configuration), `method` and training data `data` to `dir`: absent,
    /// empty, or holding the saved state of the same fit (which a save
    /// replaces). Nothing is written; for callers that check before a fit.
    pub fn check_target(
        dir: &Path,
        model: &str,
        model_config: &serde_json::Value,
        method: &MethodConfig,
        data: &DataFingerprint,
    ) -> Result<()> {
        check_target(dir, model, model_config, method, data)
    }
}

/// The subfolder of a save folder that holds the fit's checkpoints
/// ([`crate::FitRequest::checkpoint`] as `avi fit` uses it).
pub const CHECKPOINT_FOLDER: &str = "checkpoint";

/// Refuse a target folder holding anything but the same fit's state (and
/// its checkpoints).
fn check_target(
    dir: &Path,
    model: &str,
    model_config: &serde_json::Value,
    method: &MethodConfig,
    data: &DataFingerprint,
) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(saved_error(dir, "exists and is not a folder"));
    }
    // The fit's checkpoints (`avi fit` writes them into `DIR/checkpoint/`;
    // the checkpoint code checks that they are this fit's) may sit beside
    // its state; the final save replaces them with the folder.
    let entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| saved_error(dir, format!("cannot be read: {e}")))?
        .filter_map(|e| e.ok())
        .filter(|e| !(e.file_name() == CHECKPOINT_FOLDER && e.path().is_dir()))
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let refuse = |why: &str| {
        saved_error(
            dir,
            format!("{why}: refusing to replace it (remove it or save elsewhere)"),
        )
    };
    let manifest = match read_manifest(dir) {
        Ok(m) => m,
        Err(_) => return Err(refuse("is not empty and holds no readable saved fit")),
    };
    let allowed = [MANIFEST_FILE, STATE_FILE];
    if entries
        .iter()
        .any(|e| !allowed.contains(&e.file_name().to_string_lossy().as_ref()))
    {
        return Err(refuse("holds files other than a saved fit's"));
    }
    if manifest.model != model
        || &manifest.model_config != model_config
        || &manifest.method != method
        || &manifest.data != data
    {
        return Err(refuse(
            "holds the saved state of another fit (other model, method or data)",
        ));
    }
    Ok(())
}

/// Rename `tmp` to `dir`, moving a previous `dir` aside first and removing
/// it after.
fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let io = |e: std::io::Error| saved_error(dir, format!("cannot be written: {e}"));
    if dir.exists() {
        let mut old = tmp.as_os_str().to_owned();
        old.push(".old");
        let old = PathBuf::from(old);
        std::fs::rename(dir, &old).map_err(io)?;
        if let Err(e) = std::fs::rename(tmp, dir) {
            let _ = std::fs::rename(&old, dir);
            return Err(io(e));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, dir).map_err(io)?;
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = sync_dir(parent);
    }
    Ok(())
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(saved_error(dir, "is not a folder (no saved fit there)"));
    }
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| saved_error(&path, format!("cannot be read: {e}")))?;
    // The version first, so that a newer format is refused as such rather
    // than as a manifest with unknown fields.
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| saved_error(&path, format!("is not valid JSON: {e}")))?;
    match value.get("format_version").and_then(serde_json::Value::as_u64) {
        Some(v) if v > u64::from(FORMAT_VERSION) => {
            return Err(saved_error(
                &path,
                format!(
                    "has format version {v}; this avi ({}) reads versions up to {FORMAT_VERSION}: load it with a newer avi",
                    env!("CARGO_PKG_VERSION")
                ),
            ))
        }
        Some(_) => {}
        None => return Err(saved_error(&path, "has no integer `format_version`")),
    }
    serde_json::from_value(value).map_err(|e| saved_error(&path, format!("is not a manifest: {e}")))
}

fn check_expected(dir: &Path, m: &Manifest, expect: &Expect<'_>) -> Result<()> {
    let mismatch = |what: &str, saved: String, asked: String| {
        Err(InferenceError::SavedMismatch {
            path: dir.display().to_string(),
            what: what.to_string(),
            saved,
            asked,
        })
    };
    let model = expect.model;
    if m.model != model.name() {
        return mismatch("model", m.model.clone(), model.name().into());
    }
    if let Some(cfg) = expect.model_config {
        if &m.model_config != cfg {
            return mismatch(
                "model configuration",
                m.model_config.to_string(),
                cfg.to_string(),
            );
        }
    }
    if let Some(method) = expect.method {
        if &m.method != method {
            let json = |m: &MethodConfig| serde_json::to_string(m).unwrap_or_default();
            return mismatch("method", json(&m.method), json(method));
        }
    }
    if let Some(x) = expect.data {
        let f = DataFingerprint::of(x)?;
        if f != m.data {
            return mismatch(
                "training data",
                format!("shape {:?}, sha256 {}", m.data.shape, m.data.sha256),
                format!("shape {:?}, sha256 {}", f.shape, f.sha256),
            );
        }
    }
    let output: Output = m.output.into();
    let want = match model.local_states() {
        Some(states) => Output::Categorical { states },
        None => Output::Gaussian {
            dim: model.local_dim(),
        },
    };
    if output != want {
        return mismatch(
            "local factors",
            format!("{:?}", m.output),
            format!("{:?}", OutputLayout::from(want)),
        );
    }
    if m.data.shape.first() != Some(&m.n) || m.n == 0 {
        return Err(saved_error(
            &dir.join(MANIFEST_FILE),
            format!(
                "n = {} does not match the data shape {:?}",
                m.n, m.data.shape
            ),
        ));
    }
    Ok(())
}

/// Read the state file, checking its size, checksum and that its tensors
/// are the manifest's.
fn read_state(dir: &Path, m: &Manifest) -> Result<Vec<(String, Tensor)>> {
    let [entry] = m.files.as_slice() else {
        return Err(saved_error(
            &dir.join(MANIFEST_FILE),
            format!(
                "lists {} state files, expected one ({STATE_FILE})",
                m.files.len()
            ),
        ));
    };
    if entry.name != STATE_FILE {
        return Err(saved_error(
            &dir.join(MANIFEST_FILE),
            format!(
                "lists the state file `{}`, expected {STATE_FILE}",
                entry.name
            ),
        ));
    }
    let path = dir.join(STATE_FILE);
    let bytes =
        std::fs::read(&path).map_err(|e| saved_error(&path, format!("cannot be read: {e}")))?;
    if bytes.len() as u64 != entry.bytes {
        return Err(saved_error(
            &path,
            format!(
                "has {} bytes, the manifest records {} (truncated or replaced)",
                bytes.len(),
                entry.bytes
            ),
        ));
    }
    let sum = hex(&Sha256::digest(&bytes));
    if sum != entry.sha256 {
        return Err(saved_error(
            &path,
            format!(
                "checksum mismatch: SHA-256 {sum}, the manifest records {} (the file was modified)",
                entry.sha256
            ),
        ));
    }
    let mut tensors = Tensor::read_safetensors(&path)
        .map_err(|e| saved_error(&path, format!("is not a safetensors file: {e}")))?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut listed = m.tensors.clone();
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    let names = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(", ");
    if tensors.len() != listed.len() || tensors.iter().zip(&listed).any(|(t, e)| t.0 != e.name) {
        return Err(saved_error(
            &path,
            format!(
                "holds the tensors [{}], the manifest lists [{}]",
                names(&mut tensors.iter().map(|t| t.0.clone())),
                names(&mut listed.iter().map(|e| e.name.clone()))
            ),
        ));
    }
    for ((name, t), e) in tensors.iter().zip(&listed) {
        if t.size() != e.shape || dtype_name(t.kind()) != e.dtype {
            return Err(saved_error(
                &path,
                format!(
                    "tensor `{name}` is {} {:?}, the manifest lists {} {:?}",
                    dtype_name(t.kind()),
                    t.size(),
                    e.dtype,
                    e.shape
                ),
            ));
        }
    }
    Ok(tensors)
}

fn host_vec_named(state: &[(String, Tensor)], name: &str, dir: &Path) -> Result<Vec<f64>> {
    let t = state
        .iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| saved_error(&dir.join(STATE_FILE), format!("has no tensor `{name}`")))?;
    crate::family::host_vec(&t.1)
}

/// The saved tensors by name, taken one by one; what is left at the end is
/// an error.
struct Named {
    tensors: Vec<(String, Tensor)>,
    path: PathBuf,
    kind: Kind,
}

impl Named {
    /// The tensor `name`, which must have `shape` (when given) and the
    /// state's dtype.
    fn take(&mut self, name: &str, shape: Option<&[i64]>) -> Result<Tensor> {
        let i = self
            .tensors
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| {
                saved_error(
                    &self.path,
                    format!("has no tensor `{name}`, which the method needs"),
                )
            })?;
        let (_, t) = self.tensors.remove(i);
        if let Some(shape) = shape {
            if t.size() != shape {
                return Err(saved_error(
                    &self.path,
                    format!(
                        "tensor `{name}` has shape {:?}, the method needs {shape:?}",
                        t.size()
                    ),
                ));
            }
        }
        if t.kind() != self.kind {
            return Err(saved_error(
                &self.path,
                format!(
                    "tensor `{name}` is {}, the state's dtype is {}",
                    dtype_name(t.kind()),
                    dtype_name(self.kind)
                ),
            ));
        }
        Ok(t)
    }
}

/// Build the variational family of the manifest on `device` and fill it
/// with the saved tensors.
fn rebuild(
    dir: &Path,
    m: &Manifest,
    state: Vec<(String, Tensor)>,
    expect: &Expect<'_>,
    dim: usize,
    device: Device,
) -> Result<Variational> {
    let model = expect.model;
    let kind = m.dtype.kind();
    let output: Output = m.output.into();
    let width = output.width() as i64;
    let theta_dim = model.theta_dim() as i64;
    let mut named = Named {
        tensors: state
            .into_iter()
            .filter(|(n, _)| n != DATA_MIN && n != DATA_MAX)
            .collect(),
        path: dir.join(STATE_FILE),
        kind,
    };
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let on = |t: Tensor| t.to_device(device);
    let fixed = named.tensors.iter().any(|(n, _)| n == THETA_FIXED);
    let theta = if fixed {
        ThetaFactor::Fixed(on(named.take(THETA_FIXED, Some(&[theta_dim]))?))
    } else {
        ThetaFactor::Free(GaussianParams {
            mean: root.add(
                "theta_mean",
                on(named.take("theta_mean", Some(&[theta_dim]))?),
                true,
            ),
            log_sd: root.add(
                "theta_log_sd",
                on(named.take("theta_log_sd", Some(&[theta_dim]))?),
                true,
            ),
        })
    };
    let n = m.n as i64;
    // A semi-amortized fit holds A-VI's family (`refine`) or F-VI's
    // (`switch_at`), unless it stopped before the switch (interrupted, or
    // a stopping rule): then it holds the encoder, and the state has no
    // free factors.
    let has_free = named.tensors.iter().any(|(n, _)| n == "z");
    let family = match m.method.switch_at() {
        Some(_) if !has_free => m.method.encoder(),
        _ => m.method.fitted_family(),
    };
    let (local, n_rows) = match &family {
        MethodConfig::Markov(_) => {
            return Err(InferenceError::config(
                "method.structure",
                "a saved state of a \"markov\" structure (never written by avi)",
            ))
        }
        MethodConfig::Fvi => (
            LocalFactor::Free(root.add("z", on(named.take("z", Some(&[n, width]))?), true)),
            m.n,
        ),
        MethodConfig::Const => (
            LocalFactor::Shared(root.add("z", on(named.take("z", Some(&[1, width]))?), true)),
            m.n,
        ),
        MethodConfig::Semi { .. } => unreachable!("fitted_family() is not semi-amortized"),
        MethodConfig::Avi {
            function,
            standardize,
            window,
            edges,
        } => {
            let [before, after] = *window;
            crate::method::check_window(*window, m.n)?;
            let input_dim = dim * (before + after + 1);
            let stats = if *standardize {
                Some((
                    on(named.take(INPUT_MEAN, Some(&[1, dim as i64]))?),
                    on(named.take(INPUT_SD, Some(&[1, dim as i64]))?),
                ))
            } else {
                None
            };
            // The function's layers draw their initial values from
            // libtorch's generator: leave it where it was.
            let function = {
                let _lock = crate::rng::global_guard();
                let generator = avi_cuda::Generator::clone_default(device)?;
                let built = function.build(&root.sub("fn"), input_dim, output, kind);
                generator.restore_default()?;
                built?
            };
            let edges = match edges {
                Edges::Pad => None,
                Edges::Free => Some((
                    root.add(
                        "edge_head",
                        on(named.take("edge_head", Some(&[before as i64, width]))?),
                        true,
                    ),
                    root.add(
                        "edge_tail",
                        on(named.take("edge_tail", Some(&[after as i64, width]))?),
                        true,
                    ),
                )),
            };
            let map = InputMap {
                window: *window,
                pad: crate::forms::pad_value(model),
                dim,
                standardize: stats,
            };
            let (inputs, rows) = match expect.data {
                Some(x) => {
                    let x = x.to_device(device);
                    (
                        crate::method::window_inputs(
                            &x,
                            map.window,
                            map.pad,
                            map.standardize.as_ref(),
                            kind,
                        )?,
                        m.n,
                    )
                }
                None => (Tensor::zeros([0, input_dim as i64], (kind, device)), 0),
            };
            (
                LocalFactor::Amortized {
                    function,
                    inputs,
                    edges,
                    map,
                },
                rows,
            )
        }
    };
    let mut vs = vs;
    vs.set_kind(kind);
    // Fill the function's layers (made by tch, initialised at random).
    let variables = vs.variables();
    let mut fn_names: Vec<&String> = variables.keys().filter(|k| k.starts_with("fn.")).collect();
    fn_names.sort();
    for name in fn_names {
        let var = &variables[name];
        let saved = named.take(name, Some(&var.size()))?;
        tch::no_grad(|| {
            let mut var = var.shallow_clone();
            var.copy_(&saved);
        });
    }
    if !named.tensors.is_empty() {
        let extra: Vec<_> = named.tensors.iter().map(|(n, _)| n.as_str()).collect();
        return Err(saved_error(
            &named.path,
            format!(
                "holds tensors the method `{}` does not have: {}",
                m.method.label(),
                extra.join(", ")
            ),
        ));
    }
    let local_dim = match output {
        Output::Gaussian { dim } => dim,
        Output::Categorical { states } => states,
        Output::Markov => 1,
    };
    Ok(Variational {
        vs,
        theta,
        local,
        output,
        n: n_rows,
        local_dim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint hashes the values as f64 little-endian bytes in
    /// row-major order (the digests computed independently with Python's
    /// `hashlib.sha256(struct.pack('<3d', 1.0, -2.5, 0.1))`), whatever the
    /// tensor's kind and shape.
    #[test]
    fn fingerprint_hashes_f64_little_endian_values() {
        let x = Tensor::from_slice(&[1.0f64, -2.5, 0.1]);
        let f = DataFingerprint::of(&x).unwrap();
        assert_eq!(
            f.sha256,
            "71da1541228ec3b80f80a42910c0512bc24ce229e09875fa2684836df5f229ee"
        );
        assert_eq!((f.len, f.shape.clone()), (3, vec![3]));
        // f32 values exactly representable hash as their f64 values; the
        // shape is recorded beside the hash.
        let g = DataFingerprint::of(&Tensor::from_slice(&[1.0f32, -2.5]).view([1, 2])).unwrap();
        assert_eq!(
            g.sha256,
            "f138ae8a7b9a72de60b736f59d2474dd5b2357f5817f0dfa3309f5da5e629d87"
        );
        assert_eq!(g.shape, [1, 2]);
    }

    #[test]
    fn data_range_is_per_dimension() {
        let x = Tensor::from_slice(&[1.0f64, 10.0, -3.0, 4.0, 2.0, 7.0]).view([3, 2]);
        let (min, max) = data_range(&x).unwrap();
        assert_eq!(min, [-3.0, 4.0]);
        assert_eq!(max, [2.0, 10.0]);
    }
}
