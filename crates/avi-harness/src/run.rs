//! Running a configuration: device choice, model and data construction, the
//! fit itself and its report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use avi_inference::{fit, Fit, FitStatus, Observer, ThetaFactor, Variational};
use avi_models::fashion_mnist;
use avi_models::{BnnModel, GaussianReference, LinearModel, Model};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{load_data_file, Data, DataConfig, FashionMnistSplit, FitConfig, ModelConfig};
use crate::models::CliModel;
use crate::report::{fit_report, Reference};
use crate::run_report::{Diagnosis, MseTrace, RunReport};

/// The `--device` choice of the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device; an error when there is none.
    Cuda,
}

/// Resolve a device choice. `cuda` without a CUDA device is an error, never a
/// silent fallback.
pub fn resolve_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
        DeviceChoice::Cuda => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                bail!("--device cuda: no CUDA device is available (use --device cpu or auto)")
            }
        }
    }
}

/// `"cpu"` or `"cuda:K"`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(k) => format!("cuda:{k}"),
        _ => "cpu".into(),
    }
}

/// A model built from its config, with its exact references where they exist.
#[derive(Debug)]
pub struct BuiltModel(Box<dyn CliModel>);

impl BuiltModel {
    /// Build and validate the model of a config; `dim` is the dimension of
    /// one observation (used by models with vector observations).
    pub fn new(cfg: &ModelConfig, dim: usize) -> Result<Self> {
        Ok(Self(cfg.kind.entry().build(dim)?))
    }

    /// The model, with its simulation and references.
    pub fn model(&self) -> &dyn CliModel {
        &*self.0
    }

    /// The model as a trait object.
    pub fn as_model(&self) -> &dyn Model {
        &*self.0
    }

    /// The model as its concrete type, when it is a `T` (for what only one
    /// model has: the linear model's exact ELBO of any Gaussian q, the BNN's
    /// reconstruction error).
    pub fn downcast_ref<T: Model>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = &*self.0;
        any.downcast_ref()
    }

    /// The observation dimension for models with vector observations.
    pub fn vector_dim(&self) -> Option<usize> {
        self.0.vector_dim()
    }

    /// Simulate a data set (θ drawn from its prior unless given).
    pub fn simulate(&self, n: usize, seed: u64, theta: Option<&[f64]>) -> Result<Vec<f64>> {
        if let Some(t) = theta {
            let d = self.0.theta_dim();
            if t.len() != d {
                bail!(
                    "data.simulate.theta: the {} model's θ has {d} value{}, got {}",
                    self.0.name(),
                    if d == 1 { "" } else { "s" },
                    t.len()
                );
            }
        }
        Ok(self.0.simulate(n, seed, theta)?)
    }

    /// The optimal F-VI ELBO when it is known exactly without fitting: the
    /// closed form of Gaussian models, and `log p(x | θ)` for the mixture with
    /// θ fixed (the exact posterior is in the factorised family).
    pub fn reference_elbo(&self, data: &Data, fixed_theta: Option<&[f64]>) -> Result<Option<f64>> {
        Ok(self
            .0
            .reference_elbo(&data.values, fixed_theta)?
            .map(|r| r.elbo))
    }

    /// The exact F-VI optimum, when the model has one in closed form.
    pub fn reference(
        &self,
        x: &[f64],
        fixed_theta: Option<&[f64]>,
    ) -> Result<Option<GaussianReference>> {
        Ok(self.0.fvi_reference(x, fixed_theta)?)
    }
}

/// A config turned into a model and data, ready to fit.
#[derive(Debug)]
pub struct Prepared {
    /// The model.
    pub model: BuiltModel,
    /// The observations.
    pub x: Data,
    /// The closed-form optimum, when there is one.
    pub reference: Option<GaussianReference>,
    /// The optimal ELBO when known exactly (closed form or exact posterior).
    pub reference_elbo: Option<f64>,
    /// Held-out observations for the BNN's test MSE (`mse.test`).
    pub test_x: Option<Data>,
    /// The saved state to start from (`init_from`, resolved against the
    /// config's folder and checked against the config and data).
    pub init_from: Option<std::path::PathBuf>,
}

/// Build the model and load or simulate the data of `cfg`; relative data
/// paths are resolved against `config_dir`.
pub fn prepare(cfg: &FitConfig, config_dir: &Path) -> Result<Prepared> {
    let (model, x) = match &cfg.data {
        DataConfig::File(p) => {
            let path = if p.is_absolute() {
                p.clone()
            } else {
                config_dir.join(p)
            };
            let data = load_data_file(&path)?;
            let model = BuiltModel::new(&cfg.model, data.dim.unwrap_or(1))?;
            (model, data)
        }
        DataConfig::FashionMnist(f) => {
            let model = BuiltModel::new(&cfg.model, fashion_mnist::PIXELS)?;
            (model, load_fashion_mnist(f, config_dir, "data")?)
        }
        DataConfig::Simulate(s) => {
            let model = simulated_model(cfg, s)?;
            let values = model.simulate(s.n, s.seed, s.theta.as_deref())?;
            let dim = model.vector_dim();
            (model, Data { values, dim })
        }
    };
    // Checked here too (the fit checks again) so that `--check` sees it.
    avi_inference::check_representable(&to_tensor(&x), cfg.dtype)?;
    if let Some(t) = cfg.model.fixed_theta() {
        let d = model.as_model().theta_dim();
        if t.len() != d {
            bail!(
                "model.fixed_theta has {} values, the model's θ has {d}",
                t.len()
            );
        }
        if t.iter().any(|v| !v.is_finite()) {
            bail!("model.fixed_theta has a non-finite value");
        }
    }
    let reference = model.reference(&x.values, cfg.model.fixed_theta())?;
    let reference_elbo = model.reference_elbo(&x, cfg.model.fixed_theta())?;
    let test_x = match cfg.mse.as_ref().and_then(|m| m.test.as_ref()) {
        None => None,
        Some(DataConfig::FashionMnist(f)) => Some(load_fashion_mnist(f, config_dir, "mse.test")?),
        Some(DataConfig::File(p)) => {
            let path = if p.is_absolute() {
                p.clone()
            } else {
                config_dir.join(p)
            };
            Some(load_data_file(&path)?)
        }
        Some(DataConfig::Simulate(_)) => {
            bail!("field `mse.test`: give a file or fashion_mnist images, not a simulation")
        }
    };
    if let (Some(t), Some(d)) = (&test_x, x.dim) {
        if t.dim != Some(d) {
            bail!(
                "field `mse.test`: test observations have {} values, the data {d}",
                t.dim.unwrap_or(1)
            );
        }
    }
    let init_from = match &cfg.init_from {
        None => None,
        Some(p) => {
            let dir = crate::fitted::resolve(p, config_dir);
            // Checked now (on the host) so that `--check` and a bad state
            // fail before the fit; loaded again onto the fit's device.
            crate::fitted::load_start(cfg, model.as_model(), &to_tensor(&x), &dir, Device::Cpu)?;
            Some(dir)
        }
    };
    Ok(Prepared {
        model,
        x,
        reference,
        reference_elbo,
        test_x,
        init_from,
    })
}

/// The model of a config that simulates its data, after the checks that
/// come before the simulation allocates anything: the sizes, and the
/// memory the fit would need against the host's (a GPU fit is checked
/// against the host too: conservative, as its host holds the data and
/// more memory than the device).
fn simulated_model(cfg: &FitConfig, s: &crate::config::SimulateConfig) -> Result<BuiltModel> {
    if s.n == 0 {
        bail!("data.simulate.n must be at least 1");
    }
    let dim = cfg.model.kind.entry().simulated_dim(s);
    let model = BuiltModel::new(&cfg.model, dim)?;
    avi_inference::check_fit_within(
        model.as_model(),
        s.n,
        &cfg.method,
        &cfg.options(),
        avi_inference::available_memory(Device::Cpu),
    )?;
    check_host_data(s.n, model.vector_dim().unwrap_or(1))?;
    Ok(model)
}

/// `avi fit --check` of a config that simulates its data, without drawing
/// them (10⁸ observations take seconds to draw): the config's checks up to
/// the simulation and [`check_prepared`]'s on N; returns N and the memory
/// estimate in bytes. `None` when the config needs the full
/// [`prepare`] (a held-out `mse.test`, an `init_from` state, a fixed θ,
/// whose checks read the data): check with [`prepare`] then.
pub fn check_simulated(cfg: &FitConfig, device: Device) -> Result<Option<(usize, u64)>> {
    let DataConfig::Simulate(s) = &cfg.data else {
        return Ok(None);
    };
    let needs_data = cfg.mse.as_ref().is_some_and(|m| m.test.is_some())
        || cfg.init_from.is_some()
        || cfg.model.fixed_theta().is_some();
    if needs_data {
        return Ok(None);
    }
    let model = simulated_model(cfg, s)?;
    let opts = cfg.options();
    avi_inference::check_fit_within(
        model.as_model(),
        s.n,
        &cfg.method,
        &opts,
        avi_inference::available_memory(device),
    )?;
    Ok(Some((
        s.n,
        avi_inference::memory_estimate(model.as_model(), s.n, &cfg.method, &opts),
    )))
}

/// The simulated data (f64, twice: the values and their tensor) must fit
/// in the host memory available.
fn check_host_data(n: usize, dim: usize) -> Result<()> {
    let bytes = (n as u128) * (dim as u128) * 16;
    if let Some(free) = avi_inference::available_memory(Device::Cpu) {
        if bytes > u128::from(free) {
            bail!(
                "field `data.simulate.n`: {n} observations of {dim} values need about {} of host memory, {} is available",
                human_bytes(u64::try_from(bytes).unwrap_or(u64::MAX)),
                human_bytes(free)
            );
        }
    }
    Ok(())
}

/// Bytes as `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// Check a prepared config as a fit on `device` would (every range, and
/// the memory the fit would need against what `device` has, where known);
/// returns that estimate in bytes.
pub fn check_prepared(cfg: &FitConfig, prepared: &Prepared, device: Device) -> Result<u64> {
    let model = prepared.model.as_model();
    let n = prepared.x.len();
    let opts = cfg.options();
    avi_inference::check_fit_within(
        model,
        n,
        &cfg.method,
        &opts,
        avi_inference::available_memory(device),
    )?;
    Ok(avi_inference::memory_estimate(model, n, &cfg.method, &opts))
}

fn load_fashion_mnist(
    f: &crate::config::FashionMnistConfig,
    config_dir: &Path,
    field: &str,
) -> Result<Data> {
    let dir = match &f.dir {
        Some(d) if d.is_absolute() => d.clone(),
        Some(d) => config_dir.join(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist"),
    };
    let split = match f.split {
        FashionMnistSplit::Train => fashion_mnist::Split::Train,
        FashionMnistSplit::Test => fashion_mnist::Split::Test,
    };
    if f.n == 0 {
        bail!("{field}.fashion_mnist.n must be at least 1");
    }
    let images = fashion_mnist::load(&dir, split, f.n)?;
    Ok(Data {
        values: images.images,
        dim: Some(fashion_mnist::PIXELS),
    })
}

/// The prepared data as a tensor: `[N]` for scalar observations, `[N, D]`
/// for vectors (f64 on the CPU; fits move and convert it).
pub fn data_tensor(prepared: &Prepared) -> Tensor {
    to_tensor(&prepared.x)
}

fn to_tensor(data: &Data) -> Tensor {
    let x = Tensor::from_slice(&data.values).to_kind(Kind::Double);
    match data.dim {
        Some(d) => x.view([-1, d as i64]),
        None => x,
    }
}

/// The BNN's reconstruction MSE per record (digest §4.4), wrapped around
/// the caller's observer.
struct MseMonitor<'a> {
    inner: &'a mut dyn Observer,
    model: &'a BnnModel,
    every: usize,
    x: Tensor,
    test: Option<Tensor>,
    steps: Vec<usize>,
    seconds: Vec<f64>,
    train: Vec<f64>,
    test_mse: Vec<Option<f64>>,
}

impl Observer for MseMonitor<'_> {
    fn on_check(&mut self, done: usize, total: usize, elbo: f64) {
        self.inner.on_check(done, total, elbo);
    }

    fn monitor_every(&self) -> usize {
        self.every
    }

    fn on_monitor(
        &mut self,
        done: usize,
        seconds: f64,
        var: &Variational,
    ) -> avi_inference::Result<()> {
        let theta = match &var.theta {
            ThetaFactor::Free(q) => q.mean.detach(),
            ThetaFactor::Fixed(t) => t.shallow_clone(),
        };
        let z = var.local_params().mean.detach();
        let kind = z.kind();
        let x = self.x.to_kind(kind);
        let train = self.model.reconstruction_mse(&theta, &z, &x)?;
        let test = match &self.test {
            None => None,
            Some(t) => {
                let t = t.to_kind(kind);
                match var.predict_params(&t)? {
                    None => None,
                    Some(q) => Some(self.model.reconstruction_mse(&theta, &q.mean, &t)?),
                }
            }
        };
        self.steps.push(done);
        self.seconds.push(seconds);
        self.train.push(train);
        self.test_mse.push(test);
        Ok(())
    }

    /// The records so far, for a checkpoint: floats as their bits (exact,
    /// and NaN survives).
    fn state(&self) -> Option<serde_json::Value> {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
        let test: Vec<Option<u64>> = self.test_mse.iter().map(|t| t.map(f64::to_bits)).collect();
        Some(serde_json::json!({
            "mse": {
                "every": self.every,
                "iteration": self.steps,
                "seconds_bits": bits(&self.seconds),
                "train_bits": bits(&self.train),
                "test_bits": test,
            }
        }))
    }

    fn restore(&mut self, state: &serde_json::Value) -> avi_inference::Result<()> {
        #[derive(serde::Deserialize)]
        struct Saved {
            every: usize,
            iteration: Vec<usize>,
            seconds_bits: Vec<u64>,
            train_bits: Vec<u64>,
            test_bits: Vec<Option<u64>>,
        }
        let bad = |why: String| avi_inference::InferenceError::InvalidConfig {
            field: "resume",
            reason: format!("the checkpoint's MSE records: {why}"),
        };
        let saved: Saved =
            serde_json::from_value(state["mse"].clone()).map_err(|e| bad(e.to_string()))?;
        let n = saved.iteration.len();
        if saved.every != self.every
            || [
                saved.seconds_bits.len(),
                saved.train_bits.len(),
                saved.test_bits.len(),
            ]
            .iter()
            .any(|&l| l != n)
        {
            return Err(bad(format!(
                "{n} records every {} steps do not fit this fit's every {}",
                saved.every, self.every
            )));
        }
        self.steps = saved.iteration;
        self.seconds = saved.seconds_bits.into_iter().map(f64::from_bits).collect();
        self.train = saved.train_bits.into_iter().map(f64::from_bits).collect();
        self.test_mse = saved
            .test_bits
            .into_iter()
            .map(|t| t.map(f64::from_bits))
            .collect();
        Ok(())
    }
}

/// The thread count `avi --threads` set for libtorch (in this thread), which
/// every fit is given.
fn libtorch_threads() -> usize {
    usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
}

/// Checkpointing of one `avi fit`: a config with `checkpoint` and a save
/// folder, or `avi fit --resume`.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    /// The checkpoints' folder (`SAVE/checkpoint`).
    pub dir: PathBuf,
    /// Steps between checkpoints.
    pub every: usize,
    /// Continue from the latest checkpoint in `dir` instead of starting.
    pub resume: bool,
    /// Stored in every checkpoint: what `--resume` needs.
    pub context: CheckpointContext,
}

/// What `avi fit` stores in each checkpoint so that `--resume` needs
/// nothing else: the resolved config and the folder its relative data
/// paths are resolved against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointContext {
    /// The fit's config, as resolved (defaults filled in).
    pub config: FitConfig,
    /// The config's folder (absolute).
    pub config_dir: PathBuf,
}

/// Fit a prepared config on `device`; returns the fit and its report. A
/// stop requested meanwhile ([`crate::interrupt`]) ends the fit at its next
/// block with status `interrupted` (its report is returned, to be
/// written).
pub fn run_prepared(
    cfg: &FitConfig,
    prepared: &Prepared,
    device: Device,
    observer: &mut dyn Observer,
) -> Result<(Fit, RunReport)> {
    run_prepared_checkpointed(cfg, prepared, device, observer, None)
}

/// [`run_prepared`], writing checkpoints or resuming as `plan` says.
pub fn run_prepared_checkpointed(
    cfg: &FitConfig,
    prepared: &Prepared,
    device: Device,
    observer: &mut dyn Observer,
    plan: Option<&CheckpointPlan>,
) -> Result<(Fit, RunReport)> {
    let context = plan.map(|p| serde_json::to_value(&p.context)).transpose()?;
    let x = data_tensor(prepared);
    let mut start = match &prepared.init_from {
        Some(dir) => Some(crate::fitted::load_start(
            cfg,
            prepared.model.as_model(),
            &x,
            dir,
            device,
        )?),
        None => None,
    };
    let mut run = |observer: &mut dyn Observer| {
        let mut request = fit(prepared.model.as_model(), &x, &cfg.method)
            .fixed_theta(cfg.model.fixed_theta())
            .options(cfg.options())
            .device(device)
            .threads(libtorch_threads())
            .observer(observer)
            .interrupt(crate::interrupt::flag());
        if let Some(start) = start.take() {
            request = request.start_from(start);
        }
        if let (Some(p), Some(c)) = (plan, &context) {
            request = request
                .checkpoint(&p.dir, p.every)
                .checkpoint_context(c.clone());
            if p.resume {
                request = request.resume(&p.dir);
            }
        }
        request.run()
    };
    let (result, monitor) = match (prepared.model.downcast_ref::<BnnModel>(), &cfg.mse) {
        (Some(model), Some(m)) => {
            let mut monitor = MseMonitor {
                inner: observer,
                model,
                every: m.every,
                x: x.to_device(device),
                test: prepared
                    .test_x
                    .as_ref()
                    .map(|t| to_tensor(t).to_device(device)),
                steps: vec![],
                seconds: vec![],
                train: vec![],
                test_mse: vec![],
            };
            let result = run(&mut monitor)?;
            (result, Some(monitor))
        }
        _ => (run(observer)?, None),
    };
    let mut report = prepared_report(cfg, prepared, device, &result)?;
    if let Some(m) = monitor {
        report.mse = Some(MseTrace {
            every: m.every,
            iteration: m.steps,
            seconds: m.seconds,
            test: m.test_mse,
            train: m.train,
        });
    }
    Ok((result, report))
}

/// The report of a fit of a prepared configuration (with the linear
/// model's exact ELBO of the fitted q when it converged normally).
fn prepared_report(
    cfg: &FitConfig,
    prepared: &Prepared,
    device: Device,
    result: &Fit,
) -> Result<RunReport> {
    let reference = prepared.reference_elbo.map(|elbo| Reference { elbo });
    let mut report = fit_report(
        cfg,
        prepared.x.len(),
        &device_name(device),
        result,
        reference,
    );
    if let (Some(m), Some(q_theta), FitStatus::Ok) = (
        prepared.model.downcast_ref::<LinearModel>(),
        &result.q_theta,
        result.status,
    ) {
        // The linear model's ELBO is closed form for any Gaussian q: report the
        // fitted q's exact ELBO too (no Monte Carlo error).
        let exact = m.exact_elbo(
            &prepared.x.values,
            q_theta.mean[0],
            q_theta.sd[0],
            &result.q_z.mean,
            &result.q_z.sd,
        )?;
        if let Some(section) = &mut report.reference {
            section.exact_elbo = Some(exact);
            if let Some(r) = &prepared.reference {
                section.exact_gap = Some(r.elbo - exact);
            }
        }
    }
    Ok(report)
}

/// Whether the runs of `cfg` (one per seed) can be fitted as one batched
/// optimisation ([`avi_inference::FitRequest::seeds`]): F-VI or Const, Gaussian
/// local factors, free θ, full batches, no monitoring.
pub fn batchable(cfg: &FitConfig, prepared: &Prepared) -> bool {
    matches!(
        cfg.method,
        avi_inference::MethodConfig::Fvi | avi_inference::MethodConfig::Const
    ) && cfg.batch_size.is_none()
        && cfg.mse.is_none()
        && cfg.model.fixed_theta().is_none()
        && prepared.model.as_model().local_states().is_none()
}

/// Fit `cfg` once per seed of `seeds` as one batched optimisation; one
/// (fit, report) per seed, in order. The reports name the graph engine:
/// batched runs equal separate runs with its Adam (tests/tests/batched.rs),
/// and carry `"batched_seeds": R`; their `seconds` are the batch's.
pub fn run_prepared_batched(
    cfg: &FitConfig,
    prepared: &Prepared,
    seeds: &[u64],
    device: Device,
    observer: &mut dyn Observer,
    plan: Option<&CheckpointPlan>,
) -> Result<Vec<(Fit, RunReport)>> {
    let x = data_tensor(prepared);
    let mut opts = cfg.options();
    opts.engine = avi_inference::Engine::Graph;
    let mut request = avi_inference::fit(prepared.model.as_model(), &x, &cfg.method)
        .seeds(seeds)
        .options(&opts)
        .device(device)
        .threads(libtorch_threads())
        .observer(observer)
        .interrupt(crate::interrupt::flag());
    if let Some(p) = plan {
        request = request
            .checkpoint(&p.dir, p.every)
            .checkpoint_context(serde_json::to_value(&p.context)?);
        if p.resume {
            request = request.resume(&p.dir);
        }
    }
    let fits = request.run_all()?;
    let mut out = Vec::with_capacity(fits.len());
    for (fit, &seed) in fits.into_iter().zip(seeds) {
        let mut c = cfg.clone();
        c.seed = seed;
        c.engine = avi_inference::Engine::Graph;
        let mut report = prepared_report(&c, prepared, device, &fit)?;
        report.batched_seeds = Some(seeds.len());
        out.push((fit, report));
    }
    Ok(out)
}

/// Run the paper's §5 diagnostic after a fit (F-VI steps from the amortized
/// solution) and return its report section.
pub fn diagnosis_section(
    cfg: &FitConfig,
    prepared: &Prepared,
    fit: &Fit,
    fvi_steps: usize,
    gradient_draws: usize,
) -> Result<Diagnosis> {
    // The fitted family must be amortized and mean-field: F-VI, a
    // semi-amortized fit that switched to F-VI, and the Gauss–Markov
    // family (whose F-VI steps the diagnostic does not take) are refused.
    match cfg.method.fitted_family() {
        avi_inference::MethodConfig::Avi { .. } | avi_inference::MethodConfig::Const => {}
        avi_inference::MethodConfig::Markov(_) => {
            bail!("the diagnostic starts from a mean-field amortized (avi or const) solution, not a \"markov\" structure")
        }
        _ => bail!("the diagnostic starts from an amortized (avi or const) solution, not fvi"),
    }
    if cfg.batch_size.is_some() {
        bail!("the diagnostic needs full batches (remove batch_size)");
    }
    if gradient_draws == 0 {
        bail!("the diagnostic needs at least one gradient draw");
    }
    let x = data_tensor(prepared);
    let d = avi_inference::diagnose(
        prepared.model.as_model(),
        fit,
        &x,
        &cfg.options(),
        fvi_steps,
        gradient_draws,
    )?;
    Ok(Diagnosis {
        amortized_elbo: d.amortized_elbo,
        amortized_se: d.amortized_se,
        fvi_steps: d.fvi_steps,
        gain: d.gain,
        gain_se: d.gain_se,
        gradient_draws,
        gradient_norm: d.gradient_norm,
        refined_elbo: d.refined_elbo,
        refined_se: d.refined_se,
    })
}

/// Check, before any fitting, that a report can be written to `out`: its
/// folder exists and is a folder, `out` is not a folder, not one of the
/// `inputs` (the config or a data file: a report must never overwrite
/// them), and a file of its name's length can be created and removed in
/// that folder. Each failure is one clear error.
pub fn check_output(out: &Path, inputs: &[std::path::PathBuf]) -> Result<()> {
    let shown = out.display();
    let Some(name) = out
        .file_name()
        .filter(|_| !out.as_os_str().to_string_lossy().ends_with('/'))
    else {
        bail!("--out {shown} is not a file path");
    };
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("--out {shown}: {} is a file, not a folder", dir.display()),
        Err(_) => bail!(
            "--out {shown}: output folder {} does not exist",
            dir.display()
        ),
    }
    if out.is_dir() {
        bail!("--out {shown} is a folder; give the report's file path");
    }
    let canonical_out = dir
        .canonicalize()
        .map(|d| d.join(name))
        .unwrap_or_else(|_| out.to_path_buf());
    for input in inputs {
        if input.canonicalize().is_ok_and(|i| i == canonical_out) {
            bail!(
                "--out {shown} is an input of the fit ({}): choose another report path",
                input.display()
            );
        }
    }
    // A probe of the same name length: catches unwritable folders and
    // names longer than the file system allows, before the fit.
    let len = name.len().max(crate::report::TEMP_PREFIX.len() + 8);
    let probe_name = format!(
        "{}{}",
        crate::report::TEMP_PREFIX,
        "p".repeat(len - crate::report::TEMP_PREFIX.len())
    );
    let probe = dir.join(probe_name);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => bail!("--out {shown}: cannot write in {}: {e}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use crate::models::{ModelConfig, ModelKind, SawSimConfig};

    /// The saw model's `sim`: `"model"` by default and then not written
    /// (so default configs serialize as before), `"authors"` parsed and
    /// written, anything else rejected; the harness builds the authors'
    /// simulator from it (the same data as `SawModel` with
    /// `SawSim::Authors`, compared exactly: the same code runs).
    #[test]
    fn saw_sim_choice() {
        let parse = |json: &str| serde_json::from_str::<ModelConfig>(json);
        let default = parse(r#"{"kind": "saw", "alpha": 0.75}"#).unwrap();
        assert!(matches!(
            default.kind,
            ModelKind::Saw(crate::models::SawConfig {
                sim: SawSimConfig::Model,
                ..
            })
        ));
        assert!(!serde_json::to_string(&default).unwrap().contains("sim"));
        let authors = parse(r#"{"kind": "saw", "alpha": 0.75, "sim": "authors"}"#).unwrap();
        assert!(matches!(
            authors.kind,
            ModelKind::Saw(crate::models::SawConfig {
                sim: SawSimConfig::Authors,
                ..
            })
        ));
        assert!(serde_json::to_string(&authors)
            .unwrap()
            .contains(r#""sim":"authors""#));
        assert!(parse(r#"{"kind": "saw", "alpha": 0.75, "sim": "code"}"#).is_err());
        let sim = |c: &ModelConfig| {
            super::BuiltModel::new(c, 1)
                .unwrap()
                .simulate(20, 2012, Some(&[3.4159]))
                .unwrap()
        };
        let m = avi_models::SawModel::new(0.75, 0.0).unwrap();
        let want = |s| m.with_sim(s).simulate(20, 2012, Some(3.4159)).unwrap();
        assert_eq!(sim(&authors), want(avi_models::SawSim::Authors));
        assert_eq!(sim(&default), want(avi_models::SawSim::Model));
        assert_ne!(sim(&authors), sim(&default));
    }
}
