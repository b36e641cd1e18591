//! `avi reproduce`: the paper's experiments from their JSON definitions in
//! `data/experiments/` (digest §4, §8), and the experiments the paper only
//! argues for (HMM windows, mixtures).
//!
//! An experiment lists a model, data, run length, draws, seeds and the
//! methods to compare (each with its learning rate, and optionally its own
//! model and data). Every method × seed is fitted through the same path as
//! `avi fit`, in this process or (with `--jobs K`) in K child `avi fit`
//! processes; each run's report goes to `DIR/EXPERIMENT/runs/`. The
//! effective definition (after `--quick` and `--seeds`) is stored as
//! `DIR/EXPERIMENT/experiment.json`, so that [`crate::summary`] can rebuild
//! `summary.json`, the figures and `REPORT.md` from the stored runs alone
//! (`avi report DIR`).
//!
//! `--quick` applies the experiment's `quick` block (smaller N, fewer steps
//! and seeds, optionally one learning rate and a subset of methods) so that
//! the conclusions show in about a minute on 2 CPU cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use avi_inference::{Dtype, Entropy, LrStep, MethodConfig, Observer};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::Device;

use crate::claim::{Claimed, Holder, RunClaim};
use crate::config::{DataConfig, FitConfig, ModelConfig, MseConfig};
use crate::report::{remove_stale_temp_files, write_json_atomic};
use crate::run::{diagnosis_section, prepare, run_prepared, Prepared};

/// One method of an experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodEntry {
    /// Label used in tables, figures and file names.
    pub label: String,
    /// The variational family.
    pub method: MethodConfig,
    /// Its learning rate.
    pub lr: f64,
    /// A model of its own (default: the experiment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
    /// Data of its own (default: the experiment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataConfig>,
    /// The group it is plotted and compared in (default: none; runs
    /// with their own model usually name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The `quick` block of an experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuickEntry {
    /// Number of observations (simulated or images).
    pub n: usize,
    /// Steps per run.
    pub steps: usize,
    /// Number of seeds (the first ones of the list).
    pub seeds: usize,
    /// One learning rate for every method (default: each method's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// The labels of the methods to run (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Mini-batch size (default: the experiment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Learning-rate changes (default: the experiment's; its steps are
    /// usually too late for the quick run's fewer steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_schedule: Option<Vec<LrStep>>,
    /// Steps between MSE records (default: the experiment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mse_every: Option<usize>,
    /// Number of held-out images for the test MSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_n: Option<usize>,
    /// Steps averaged for the final ELBO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_window: Option<usize>,
    /// A smaller model for the quick run (e.g. a narrower BNN decoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
    /// What the quick run can and cannot show (printed in its REPORT.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The claims checked in the quick run (default: the experiment's
    /// claims about the methods that run).
    #[serde(default)]
    pub claims: QuickClaims,
}

/// Which claims a quick run checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuickClaims {
    /// `true`: the experiment's claims whose methods all run; `false`: none
    /// (the quick run is too short to say anything about them).
    Inherit(bool),
    /// These claims instead, worded for the quick run (e.g. about the one
    /// A-VI width it runs, leaving out what a short run cannot show; the
    /// quick `note` says what and why).
    List(Vec<Claim>),
}

impl Default for QuickClaims {
    fn default() -> Self {
        Self::Inherit(true)
    }
}

/// The BNN's reconstruction-error criterion (digest §4.4).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MseEntry {
    /// Steps between records (one epoch: N / batch size).
    pub every: usize,
    /// Held-out images for the test MSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<DataConfig>,
    /// A run converges when its training MSE first falls below this (0.03
    /// in the paper).
    pub threshold: f64,
}

/// What the figures show.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FigureEntry {
    /// The seed of the single-seed figures (Fig. 3, 5, 6; default: the
    /// first seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The methods of the single-seed figures (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Plot the gap against `"window"` (window length) or `"width"` (MLP
    /// width), one curve per width or window, one figure per group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap_vs: Option<GapAxis>,
    /// Draw Fig. 8 (the HMM counterexample's F-VI means, corrected, beside
    /// the paper's erroneous curve).
    #[serde(default)]
    pub fig8: bool,
}

/// The horizontal axis of a gap figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapAxis {
    /// Window length (before + after + 1).
    Window,
    /// MLP width k.
    Width,
}

/// A published value to show beside ours in `REPORT.md`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperRow {
    /// The method's label.
    pub label: String,
    /// The paper's (recomputed) final −ELBO, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_neg_elbo: Option<String>,
    /// The paper's iterations (or epochs) to convergence, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<String>,
    /// Anything else (final MSE, time read from a figure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A paper claim and the check that decides whether our runs show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "snake_case", deny_unknown_fields)]
pub enum Claim {
    /// Every run (or at least `min_fraction` of the runs) of each method
    /// converges.
    Converge {
        /// The claim in words.
        text: String,
        /// The methods.
        labels: Vec<String>,
        /// Fraction of runs that must converge (default 1: all).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_fraction: Option<f64>,
    },
    /// No run of any of these methods converges.
    Never {
        /// The claim in words.
        text: String,
        /// The methods.
        labels: Vec<String>,
    },
    /// Each method's median iterations to converge is below `than`'s.
    Faster {
        /// The claim in words.
        text: String,
        /// The methods.
        labels: Vec<String>,
        /// The reference method.
        than: String,
    },
    /// Each method's largest gap is at most `max` nats.
    GapBelow {
        /// The claim in words.
        text: String,
        /// The methods.
        labels: Vec<String>,
        /// Largest allowed gap (nats).
        max: f64,
    },
    /// Each method's smallest gap is at least `min` nats, or `min` nats
    /// above the largest gap of `than`.
    GapAbove {
        /// The claim in words.
        text: String,
        /// The methods.
        labels: Vec<String>,
        /// Smallest allowed gap (nats), or margin over `than`.
        min: f64,
        /// The reference method.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        than: Option<String>,
    },
    /// Each method's median final training MSE divided by `than`'s is at
    /// most `max` and at least `min` (BNN).
    MseRatio {
        /// The claim in words.
        text: String,
        /// The methods.
        labels: Vec<String>,
        /// The reference method.
        than: String,
        /// Largest allowed ratio.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<f64>,
        /// Smallest allowed ratio.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<f64>,
    },
    /// The exact gap of the best possible inference function on each
    /// method's window is positive and shrinks along the list (HMM
    /// counterexample).
    WindowBound {
        /// The claim in words.
        text: String,
        /// A-VI methods in order of growing window.
        labels: Vec<String>,
    },
    /// Along each list, the median gap never grows by more than `slack`
    /// nats and the last is below the first.
    GapShrinks {
        /// The claim in words.
        text: String,
        /// Lists of methods in order of growing window or width.
        series: Vec<Vec<String>>,
        /// Monte Carlo and optimisation slack (nats).
        slack: f64,
    },
}

impl Claim {
    /// Every method the claim names.
    pub fn labels(&self) -> Vec<&String> {
        match self {
            Self::Converge { labels, .. }
            | Self::Never { labels, .. }
            | Self::WindowBound { labels, .. }
            | Self::GapBelow { labels, .. }
            | Self::GapAbove {
                labels, than: None, ..
            } => labels.iter().collect(),
            Self::GapAbove {
                labels,
                than: Some(than),
                ..
            }
            | Self::Faster { labels, than, .. }
            | Self::MseRatio { labels, than, .. } => {
                labels.iter().chain(std::iter::once(than)).collect()
            }
            Self::GapShrinks { series, .. } => series.iter().flatten().collect(),
        }
    }

    /// The claim in words.
    pub fn text(&self) -> &str {
        match self {
            Self::Converge { text, .. }
            | Self::Never { text, .. }
            | Self::Faster { text, .. }
            | Self::GapBelow { text, .. }
            | Self::GapAbove { text, .. }
            | Self::MseRatio { text, .. }
            | Self::WindowBound { text, .. }
            | Self::GapShrinks { text, .. } => text,
        }
    }
}

/// An experiment definition (`data/experiments/NAME.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Its name.
    pub name: String,
    /// What it shows.
    pub description: String,
    /// The model.
    pub model: ModelConfig,
    /// The data (simulated in most of the paper's experiments).
    pub data: DataConfig,
    /// Steps per run.
    pub steps: usize,
    /// Monte Carlo draws per step.
    pub draws: usize,
    /// Fresh draws for each run's final ELBO.
    pub eval_draws: usize,
    /// Precision.
    pub dtype: Dtype,
    /// `"mc"` (default, the authors') or `"analytic"` entropy.
    #[serde(default)]
    pub entropy: Entropy,
    /// Mini-batch size (default: all observations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Reshuffle the mini-batches every epoch.
    #[serde(default)]
    pub shuffle: bool,
    /// Learning-rate changes of every run, as multiples of each method's
    /// own rate (default none: constant, as in the paper).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_schedule: Vec<LrStep>,
    /// The seeds (the paper's lists).
    pub seeds: Vec<u64>,
    /// Relative tolerance of the convergence metric (0.01 in the paper).
    pub rel_tol: f64,
    /// Steps averaged for the final ELBO (the paper: the last 1,000, i.e.
    /// a window of half-width 500).
    pub final_window: usize,
    /// BNN: record the reconstruction MSE and converge on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mse: Option<MseEntry>,
    /// Run the §5 diagnostic after every amortized run.
    #[serde(default)]
    pub diagnose: bool,
    /// `"torch"` (default), `"fused"` (the fused CPU engine; scalar models
    /// only) or `"graph"` (CUDA graphs of the libtorch step; mini-batches
    /// in a fixed order, whole epochs per graph).
    #[serde(default)]
    pub engine: avi_inference::Engine,
    /// The methods compared.
    pub methods: Vec<MethodEntry>,
    /// The reduced setting of `--quick`.
    pub quick: QuickEntry,
    /// What the figures show.
    #[serde(default)]
    pub figures: FigureEntry,
    /// The paper's published values (digest §4.2–4.5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paper: Vec<PaperRow>,
    /// The paper's claims and how to check them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<Claim>,
    /// Whether this is the `--quick` version (set by `avi reproduce`).
    #[serde(default)]
    pub quick_run: bool,
    /// Claims of the definition that this (quick) run does not check, and
    /// why; the summary lists them as "not checked" (set by `avi
    /// reproduce`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchecked: Vec<Unchecked>,
}

/// A claim that a run of an experiment does not check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unchecked {
    /// The claim.
    pub claim: Claim,
    /// Why it is not checked.
    pub why: String,
}

/// The experiments `avi reproduce` knows, in the order of `all`.
pub const EXPERIMENTS: [&str; 7] = [
    "linear",
    "nonlinear",
    "bnn",
    "saw",
    "hmm-window",
    "mixture",
    "hmm-counterexample",
];

/// The project's experiment folder.
pub fn default_experiments_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/experiments")
}

/// Read and check an experiment definition (a file path, or `NAME.json` in
/// `dir`). Relative data files are resolved against the definition's folder.
pub fn load_experiment(dir: &Path, name: &str) -> Result<Experiment> {
    load_experiment_file(&dir.join(format!("{name}.json")))
}

/// Read and check an experiment definition file.
pub fn load_experiment_file(path: &Path) -> Result<Experiment> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read experiment {}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let mut exp: Experiment = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        anyhow::anyhow!(
            "experiment {}: field `{field}`: {}",
            path.display(),
            e.into_inner()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let absolute = |d: &mut DataConfig| {
        if let DataConfig::File(p) = d {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    };
    absolute(&mut exp.data);
    for m in &mut exp.methods {
        if let Some(d) = &mut m.data {
            absolute(d);
        }
    }
    if let Some(MseEntry { test: Some(d), .. }) = &mut exp.mse {
        absolute(d);
    }
    check_experiment(&exp).with_context(|| format!("experiment {}", path.display()))?;
    Ok(exp)
}

fn check_experiment(exp: &Experiment) -> Result<()> {
    if exp.methods.is_empty() || exp.seeds.is_empty() {
        bail!("needs at least one method and one seed");
    }
    let mut seen = std::collections::HashSet::new();
    for m in &exp.methods {
        if !seen.insert(file_stem(&m.label)) {
            bail!("two methods share the label `{}`", m.label);
        }
    }
    let known = |l: &String| exp.methods.iter().any(|m| &m.label == l);
    let mut labels: Vec<&String> = exp.quick.methods.iter().flatten().collect();
    for c in &exp.claims {
        labels.extend(c.labels());
    }
    if let QuickClaims::List(list) = &exp.quick.claims {
        for c in list {
            labels.extend(c.labels());
        }
    }
    if let Some(l) = labels.into_iter().find(|l| !known(l)) {
        bail!("names the unknown method `{l}`");
    }
    if !(exp.rel_tol > 0.0 && exp.rel_tol.is_finite()) {
        bail!("rel_tol must be > 0");
    }
    Ok(())
}

/// The file stem of a method's runs (`i=2 k=4` → `i_2_k_4`).
pub fn file_stem(label: &str) -> String {
    label.replace([' ', '=', '/'], "_")
}

/// The experiment as it runs with `--quick` and `--seeds`: N, steps, seeds,
/// learning rates and methods reduced as asked.
pub fn effective(exp: &Experiment, quick: bool, seeds: Option<usize>) -> Result<Experiment> {
    let mut e = exp.clone();
    if quick {
        let q = &exp.quick;
        let shrink = |d: &mut DataConfig| match d {
            DataConfig::Simulate(s) => s.n = q.n,
            DataConfig::FashionMnist(f) => f.n = q.n,
            DataConfig::File(_) => {}
        };
        shrink(&mut e.data);
        for m in &mut e.methods {
            if let Some(d) = &mut m.data {
                shrink(d);
            }
            if let Some(lr) = q.lr {
                m.lr = lr;
            }
        }
        e.steps = q.steps;
        e.seeds.truncate(q.seeds);
        if let Some(keep) = &q.methods {
            e.methods.retain(|m| keep.contains(&m.label));
        }
        if q.batch_size.is_some() {
            e.batch_size = q.batch_size;
        }
        if let Some(s) = &q.lr_schedule {
            e.lr_schedule = s.clone();
        }
        if let Some(w) = q.final_window {
            e.final_window = w;
        }
        if let Some(m) = &q.model {
            e.model = m.clone();
        }
        if let Some(mse) = &mut e.mse {
            if let Some(every) = q.mse_every {
                mse.every = every;
            }
            if let (Some(n), Some(DataConfig::FashionMnist(f))) = (q.test_n, &mut mse.test) {
                f.n = n;
            }
        }
        // Claims about methods that do not run are not checked.
        let kept: Vec<String> = e.methods.iter().map(|m| m.label.clone()).collect();
        let has = |l: &String| kept.contains(l);
        match &q.claims {
            QuickClaims::Inherit(check) => {
                let (checked, unchecked): (Vec<Claim>, Vec<Claim>) = std::mem::take(&mut e.claims)
                    .into_iter()
                    .partition(|c| *check && c.labels().into_iter().all(has));
                e.claims = checked;
                e.unchecked = unchecked
                    .into_iter()
                    .map(|claim| {
                        let mut missing: Vec<&String> =
                            claim.labels().into_iter().filter(|l| !has(l)).collect();
                        missing.dedup();
                        let why = if !*check {
                            "the quick run is too short to decide it".to_string()
                        } else {
                            format!(
                                "the quick run leaves out {}",
                                missing
                                    .iter()
                                    .map(|l| l.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        };
                        Unchecked { claim, why }
                    })
                    .collect();
            }
            QuickClaims::List(list) => {
                if let Some(l) = list.iter().flat_map(|c| c.labels()).find(|l| !has(l)) {
                    bail!("a quick claim names `{l}`, which the quick run does not run");
                }
                e.claims = list.clone();
            }
        }
        e.quick_run = true;
    }
    if let Some(k) = seeds {
        if k == 0 || k > exp.seeds.len() {
            bail!(
                "--seeds {k}: the experiment lists {} seeds",
                exp.seeds.len()
            );
        }
        e.seeds = exp.seeds[..k].to_vec();
    }
    if e.methods.is_empty() || e.seeds.is_empty() {
        bail!("experiment {}: no method or no seed to run", exp.name);
    }
    Ok(e)
}

/// One fit of an experiment.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The method's label.
    pub label: String,
    /// The seed.
    pub seed: u64,
    /// The full configuration.
    pub config: FitConfig,
    /// The report's file name in `runs/`.
    pub file: String,
}

/// The fit configuration of one method × seed.
pub fn run_config(exp: &Experiment, method: &MethodEntry, seed: u64) -> FitConfig {
    FitConfig {
        model: method.model.clone().unwrap_or_else(|| exp.model.clone()),
        data: method.data.clone().unwrap_or_else(|| exp.data.clone()),
        method: method.method.clone(),
        steps: exp.steps,
        lr: method.lr,
        draws: exp.draws,
        seed,
        eval_draws: exp.eval_draws,
        entropy: exp.entropy,
        dtype: exp.dtype,
        report_q_z: false,
        batch_size: exp.batch_size,
        shuffle: exp.shuffle,
        lr_schedule: exp.lr_schedule.clone(),
        engine: exp.engine,
        mse: exp.mse.as_ref().map(|m| MseConfig {
            every: m.every,
            test: m.test.clone(),
        }),
    }
}

/// Every run of an experiment, F-VI first (its runs are the target of the
/// others when there is no exact reference).
pub fn plan(exp: &Experiment) -> Vec<RunSpec> {
    let mut order: Vec<&MethodEntry> = exp.methods.iter().collect();
    order.sort_by_key(|m| !matches!(m.method, MethodConfig::Fvi));
    let mut runs = Vec::new();
    for &seed in &exp.seeds {
        for m in &order {
            runs.push(RunSpec {
                label: m.label.clone(),
                seed,
                config: run_config(exp, m, seed),
                file: format!("{}-{seed}.json", file_stem(&m.label)),
            });
        }
    }
    runs
}

/// Settings of one `avi reproduce` invocation.
#[derive(Debug, Clone)]
pub struct ReproduceOptions {
    /// Use the experiment's `quick` block.
    pub quick: bool,
    /// Use only the first this many seeds.
    pub seeds: Option<usize>,
    /// Output folder (the experiment's results go to `out/NAME/`).
    pub out: PathBuf,
    /// Device.
    pub device: Device,
    /// No progress bars and no per-run lines.
    pub quiet: bool,
    /// Runs at once: 1 fits in this process; K > 1 runs K child `avi fit`
    /// processes (each seeded by its config, so results do not depend on
    /// K), each with `cores / K` libtorch threads (at least 1).
    pub jobs: usize,
    /// Keep existing run reports whose config equals the one they would
    /// run with (resume an interrupted experiment), run the missing ones,
    /// skip runs claimed by another live process and take over stale
    /// claims. Without it, a folder holding finished runs is refused.
    pub resume: bool,
    /// Move the earlier contents of the experiment's folder aside into
    /// `previous-<UTC time>/` and start afresh (nothing is deleted).
    pub fresh: bool,
    /// Run only this slice of the runs (`--shard k/K`, or a launcher's
    /// environment). A sharded run keeps finished runs as with `resume`.
    pub shard: Option<Shard>,
    /// libtorch CPU threads of each fit (child processes get
    /// `min(threads, cores / jobs)`, at least 1).
    pub threads: usize,
    /// Fit the seeds of each F-VI or Const method (full batches, free θ) as
    /// one batched optimisation ([`avi_inference::fit_batched`]; the same
    /// results as separate runs with the graph engine). In this process
    /// only (`jobs` = 1).
    pub batch_seeds: bool,
}

/// A deterministic slice of an experiment's runs: shard `index` of `count`
/// (1-based) takes the runs `i` of [`plan`] with `i mod count = index − 1`,
/// so that every shard gets a mix of methods and seeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// 1..=count.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
    /// Where it came from (`--shard`, or the launcher's variables).
    pub source: String,
}

impl Shard {
    /// Parse `k/K` (1 ≤ k ≤ K).
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let parsed = text.split_once('/').and_then(|(k, n)| {
            Some((
                k.trim().parse::<usize>().ok()?,
                n.trim().parse::<usize>().ok()?,
            ))
        });
        match parsed {
            Some((index, count)) if index >= 1 && index <= count => Ok(Self {
                index,
                count,
                source: source.to_string(),
            }),
            _ => bail!("{source} `{text}`: expected k/K with 1 ≤ k ≤ K"),
        }
    }

    /// The shard a launcher gives this process, from its environment
    /// (`var` reads a variable): OpenMPI (`OMPI_COMM_WORLD_RANK/SIZE`),
    /// MPICH and other PMI launchers (`PMI_RANK/SIZE`), a Slurm step of
    /// several tasks (`SLURM_PROCID/SLURM_NTASKS`), or a Slurm job array
    /// (`SLURM_ARRAY_TASK_ID` counted from `SLURM_ARRAY_TASK_MIN` over
    /// `SLURM_ARRAY_TASK_COUNT`). `None` when none is set or the launcher
    /// runs one process.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    anyhow::anyhow!("environment variable {name}=`{v}` is not a count")
                }),
            }
        };
        let pairs = [
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
            ("PMI_RANK", "PMI_SIZE"),
            ("SLURM_PROCID", "SLURM_NTASKS"),
        ];
        for (rank, size) in pairs {
            if let (Some(r), Some(n)) = (num(rank)?, num(size)?) {
                if n > 1 {
                    if r >= n {
                        bail!("environment: {rank}={r} is not below {size}={n}");
                    }
                    return Ok(Some(Self {
                        index: r + 1,
                        count: n,
                        source: format!("{rank}/{size}"),
                    }));
                }
            }
        }
        if let (Some(id), Some(n)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            if n > 1 {
                let k = id.checked_sub(min).filter(|k| *k < n).ok_or_else(|| {
                    anyhow::anyhow!(
                        "environment: SLURM_ARRAY_TASK_ID={id} is not within SLURM_ARRAY_TASK_MIN={min} + SLURM_ARRAY_TASK_COUNT={n} (use a contiguous array, e.g. --array=0-{})",
                        n - 1
                    )
                })?;
                return Ok(Some(Self {
                    index: k + 1,
                    count: n,
                    source: "SLURM_ARRAY_TASK_ID".into(),
                }));
            }
        }
        Ok(None)
    }

    /// Keep this shard's runs of a plan.
    pub fn slice(&self, runs: Vec<RunSpec>) -> Vec<RunSpec> {
        runs.into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index - 1)
            .map(|(_, r)| r)
            .collect()
    }
}

/// Progress of the runs: an overall bar with ETA and, in this process, a
/// bar per run; hidden with `--quiet` or when stderr is not a terminal.
struct Progress {
    multi: MultiProgress,
    overall: ProgressBar,
    quiet: bool,
}

impl Progress {
    fn new(total: usize, name: &str, quiet: bool) -> Self {
        let multi = MultiProgress::with_draw_target(if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        let overall = multi.add(ProgressBar::new(total as u64));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} runs, {elapsed} elapsed, ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        overall.set_prefix(name.to_string());
        Self {
            multi,
            overall,
            quiet,
        }
    }

    fn run_bar(&self, steps: usize, label: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(steps as u64));
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix:>16} [{bar:30}] {pos}/{len} steps, ETA {eta}, ELBO {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(label.to_string());
        bar
    }

    fn line(&self, text: String) {
        if !self.quiet {
            // Printed above the bars (or plainly when they are hidden).
            if self.multi.is_hidden() {
                println!("{text}");
            } else {
                let _ = self.multi.println(text);
            }
        }
    }
}

struct BarObserver(ProgressBar);

impl Observer for BarObserver {
    fn on_check(&mut self, done: usize, _total: usize, elbo: f64) {
        self.0.set_position(done as u64);
        self.0.set_message(format!("{elbo:.2}"));
    }
}

/// Run an experiment: writes `experiment.json`, `runs/*.json`, and then
/// `summary.json`, the figures and `REPORT.md` (see [`crate::summary`]).
/// Returns the summary.
pub fn reproduce(exp: &Experiment, opts: &ReproduceOptions) -> Result<Value> {
    let exp = effective(exp, opts.quick, opts.seeds)?;
    if opts.shard.is_some() && opts.fresh {
        bail!("--fresh with a shard: shards of one grid share its folder; move earlier runs aside before starting them");
    }
    // A shard keeps finished runs and shares the folder, as --resume does.
    let resumed;
    let opts = if opts.shard.is_some() && !opts.resume {
        resumed = ReproduceOptions {
            resume: true,
            ..opts.clone()
        };
        &resumed
    } else {
        opts
    };
    if opts.batch_seeds && opts.jobs > 1 {
        bail!("--batch-seeds fits in this process: leave out --jobs");
    }
    if opts.fresh && opts.resume {
        bail!("--fresh and --resume exclude each other");
    }
    let dir = opts.out.join(&exp.name);
    let runs_dir = dir.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .with_context(|| format!("cannot create {}", runs_dir.display()))?;
    for d in [&dir, &runs_dir, &dir.join("configs")] {
        remove_stale_temp_files(d).with_context(|| format!("cannot clean {}", d.display()))?;
    }
    let progress = Progress::new(0, &exp.name, opts.quiet);
    let mut runs = plan(&exp);
    if let Some(shard) = &opts.shard {
        let total = runs.len();
        runs = shard.slice(runs);
        progress.line(format!(
            "{}: shard {}/{} (from {}): {} of the {total} runs",
            exp.name,
            shard.index,
            shard.count,
            shard.source,
            runs.len()
        ));
    }
    let finished = finished_reports(&runs_dir)?;
    let claims = crate::claim::claims_in(&runs_dir)?;
    if let Some((lock, holder)) = claims.iter().find(|(_, h)| !h.is_stale()) {
        if !opts.resume {
            bail!(
                "{} is being run by another avi ({}): wait for it, or pass --resume to share the remaining runs",
                lock.with_extension("json").display(),
                holder.describe()
            );
        }
    }
    let earlier = !(finished.is_empty() && claims.is_empty());
    if earlier && !opts.resume {
        if !opts.fresh {
            bail!(
                "{} holds {} finished run report(s){}: pass --resume to keep them and run only the missing ones, or --fresh to move them aside into {}/previous-<time>/ (nothing was changed)",
                runs_dir.display(),
                finished.len(),
                if claims.is_empty() {
                    String::new()
                } else {
                    format!(" and {} claim(s) of processes that no longer run", claims.len())
                },
                dir.display()
            );
        }
        let old = move_aside(&dir)?;
        progress.line(format!(
            "moved the earlier runs of {} aside into {}",
            exp.name,
            old.display()
        ));
        std::fs::create_dir_all(&runs_dir)
            .with_context(|| format!("cannot create {}", runs_dir.display()))?;
    }
    if opts.resume {
        // A claimant killed after writing its report and before releasing
        // its claim: the run is finished, the claim is stale.
        for (lock, holder) in &claims {
            if holder.is_stale() && lock.with_extension("json").is_file() {
                std::fs::remove_file(lock)
                    .with_context(|| format!("cannot remove {}", lock.display()))?;
            }
        }
        for r in &runs {
            let path = runs_dir.join(&r.file);
            if path.is_file() {
                check_stored_run(&path, &r.config, opts.batch_seeds)?;
            }
        }
        runs.retain(|r| !runs_dir.join(&r.file).is_file());
    }
    write_json_atomic(&dir.join("experiment.json"), &serde_json::to_value(&exp)?)?;
    progress.overall.set_length(runs.len() as u64);
    if opts.jobs <= 1 {
        run_here(&exp, &runs, &runs_dir, opts, &progress)?;
    } else {
        run_children(&exp, &runs, &dir, opts, &progress)?;
    }
    progress.overall.finish_and_clear();
    if opts.shard.is_some() {
        // The last shard to finish builds the summary.
        let missing = crate::summary::missing_runs(&dir)?;
        if !missing.is_empty() {
            progress.line(format!(
                "{}: this shard is done; {} run(s) of other shards are not finished yet: the last shard to finish (or `avi report {}`) writes the summary",
                exp.name,
                missing.len(),
                dir.display()
            ));
            return Ok(Value::Null);
        }
    }
    let summary = crate::summary::rebuild(&dir)?;
    progress.line(format!("wrote {}", dir.join("summary.json").display()));
    Ok(summary)
}

/// The run reports (`*.json`) in `runs_dir`.
fn finished_reports(runs_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(runs_dir)
        .with_context(|| format!("cannot read {}", runs_dir.display()))?
    {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
    Ok(out)
}

/// Move everything in an experiment folder (but earlier `previous-*`
/// folders) into a new `previous-<UTC time>/` in it; returns that folder.
fn move_aside(dir: &Path) -> Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stamp = crate::claim::utc(now).replace(':', "");
    let mut old = dir.join(format!("previous-{stamp}"));
    let mut k = 2;
    while old.exists() {
        old = dir.join(format!("previous-{stamp}-{k}"));
        k += 1;
    }
    std::fs::create_dir(&old).with_context(|| format!("cannot create {}", old.display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let p = entry?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("previous-") {
            continue;
        }
        std::fs::rename(&p, old.join(&name))
            .with_context(|| format!("cannot move {} into {}", p.display(), old.display()))?;
    }
    Ok(old)
}

/// Check that a stored run report was made with the config it would run
/// with now (same definition, size, engine, …); the error names the run and
/// the first differing field. `--batch-seeds` reports name the graph engine
/// they ran on.
fn check_stored_run(path: &Path, expected: &FitConfig, batch_seeds: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a run report (move it away or start with --fresh)",
            path.display()
        )
    })?;
    let stored: FitConfig =
        serde_json::from_value(report["config"].clone()).with_context(|| {
            format!(
                "{}: its `config` cannot be read (move it away or start with --fresh)",
                path.display()
            )
        })?;
    let mut want = expected.clone();
    if batch_seeds && report.get("batched_seeds").is_some() {
        want.engine = avi_inference::Engine::Graph;
    }
    let (a, b) = (comparable(&stored)?, comparable(&want)?);
    if let Some(d) = first_difference(&a, &b, "config") {
        bail!(
            "{} was made with a different config ({d}): it is kept; resume with the options it was made with, or start with --fresh",
            path.display()
        );
    }
    Ok(())
}

/// A config as JSON for comparison, data file paths made canonical where
/// the file exists (the same data seen from another working folder).
fn comparable(cfg: &FitConfig) -> Result<Value> {
    let mut c = cfg.clone();
    let canon = |d: &mut DataConfig| {
        if let DataConfig::File(p) = d {
            if let Ok(abs) = p.canonicalize() {
                *p = abs;
            }
        }
    };
    canon(&mut c.data);
    if let Some(MseConfig { test: Some(d), .. }) = &mut c.mse {
        canon(d);
    }
    Ok(serde_json::to_value(&c)?)
}

/// The first place where `a` (stored) and `b` (expected) differ:
/// `path: A in the stored run, B now`.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                first_difference(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{path}.{k}"),
                )
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("`{path}`: {a} in the stored run, {b} now")),
    }
}

/// Claim `run` in `runs_dir` before fitting it. `None`: skip it (another
/// live process runs it, with `--resume`, or its report appeared
/// meanwhile); without `--resume` a live or stale claim of another process
/// is an error.
fn claim_run(
    runs_dir: &Path,
    run: &RunSpec,
    opts: &ReproduceOptions,
    progress: &Progress,
) -> Result<Option<RunClaim>> {
    let lock = runs_dir.join(&run.file).with_extension("lock");
    let report = runs_dir.join(&run.file);
    let before = crate::claim::read_holder(&lock)?;
    match RunClaim::acquire(&lock, opts.resume)? {
        Claimed::Ours(claim) => {
            if report.is_file() {
                if opts.resume {
                    return Ok(None);
                }
                bail!(
                    "{} appeared while this run started: another avi writes to this folder (pass --resume to share the runs)",
                    report.display()
                );
            }
            if let Some(h) = before.filter(Holder::is_stale) {
                progress.line(format!(
                    "took over the stale claim on {} ({}, no longer running)",
                    run.file,
                    h.describe()
                ));
            }
            Ok(Some(claim))
        }
        Claimed::Held(h) if opts.resume => {
            progress.line(format!("skipped {}: another avi runs it ({})", run.file, h.describe()));
            Ok(None)
        }
        Claimed::Held(h) => bail!(
            "{} is being run by another avi ({}): wait for it, or pass --resume to share the remaining runs",
            report.display(),
            h.describe()
        ),
        Claimed::Stale(h) => bail!(
            "{} was claimed by a process that no longer runs ({}): pass --resume to take it over",
            report.display(),
            h.describe()
        ),
    }
}

/// Largest q(θ) kept in an experiment's run reports (the BNN's 283,920
/// means and sds would make each report ≈ 10 MB).
const MAX_STORED_THETA: usize = 1000;

/// Drop a large q(θ) from a run report; true when something was dropped.
fn slim(report: &mut Value) -> bool {
    let len = report["q_theta"]["mean"].as_array().map_or(0, Vec::len);
    if len > MAX_STORED_THETA {
        report["q_theta"] = serde_json::json!({
            "omitted": format!("{len} values; fit the run's config with avi fit to get them"),
        });
        true
    } else {
        false
    }
}

fn done_line(exp: &str, run: &RunSpec, report: &Value) -> String {
    format!(
        "{exp} {} seed {}: ELBO {:.2} ± {:.2}, {} steps in {:.1} s{}",
        run.label,
        run.seed,
        report["elbo"].as_f64().unwrap_or(f64::NAN),
        report["elbo_se"].as_f64().unwrap_or(f64::NAN),
        report["iterations"],
        report["seconds"].as_f64().unwrap_or(f64::NAN),
        if report["status"] == "ok" {
            String::new()
        } else {
            format!(", {}", report["status"].as_str().unwrap_or("?"))
        } + &match report["warnings"].as_array().map_or(0, Vec::len) {
            0 => String::new(),
            k => format!(", {k} warning(s) in its report"),
        }
    )
}

/// The experiment's diagnostic settings: F-VI steps and gradient draws.
const DIAGNOSE_STEPS: usize = 1000;
const DIAGNOSE_DRAWS: usize = 1000;

fn run_here(
    exp: &Experiment,
    runs: &[RunSpec],
    runs_dir: &Path,
    opts: &ReproduceOptions,
    progress: &Progress,
) -> Result<()> {
    // Model and data are built once per distinct (model, data, mse).
    let mut prepared: BTreeMap<String, Prepared> = BTreeMap::new();
    let mut batched: std::collections::BTreeSet<String> = Default::default();
    for run in runs {
        if crate::interrupt::requested() {
            return Err(crate::interrupt::Interrupted.into());
        }
        if batched.contains(&run.label) {
            continue;
        }
        let key = serde_json::to_string(&(&run.config.model, &run.config.data, &run.config.mse))?;
        if !prepared.contains_key(&key) {
            let p = prepare(&run.config, Path::new("."))
                .with_context(|| format!("experiment {}, method {}", exp.name, run.label))?;
            prepared.insert(key.clone(), p);
        }
        let p = &prepared[&key];
        // Every seed of this method at once (the diagnostic, which draws
        // after each fit, keeps Const runs separate).
        let diagnosed = exp.diagnose && !matches!(run.config.method, MethodConfig::Fvi);
        if opts.batch_seeds && !diagnosed && crate::run::batchable(&run.config, p) {
            batched.insert(run.label.clone());
            let mut group = Vec::new();
            for r in runs.iter().filter(|r| r.label == run.label) {
                if let Some(claim) = claim_run(runs_dir, r, opts, progress)? {
                    group.push((r, claim));
                }
            }
            if group.is_empty() {
                continue;
            }
            let seeds: Vec<u64> = group.iter().map(|(r, _)| r.seed).collect();
            let bar =
                progress.run_bar(run.config.steps, &format!("{} ×{}", run.label, seeds.len()));
            let mut observer = BarObserver(bar.clone());
            let results = crate::run::run_prepared_batched(
                &run.config,
                p,
                &seeds,
                opts.device,
                &mut observer,
            )?;
            bar.finish_and_clear();
            progress.multi.remove(&bar);
            for ((spec, claim), (_, mut report)) in group.into_iter().zip(results) {
                slim(&mut report);
                write_json_atomic(&runs_dir.join(&spec.file), &report)?;
                drop(claim);
                progress.overall.inc(1);
                progress.line(done_line(&exp.name, spec, &report));
            }
            continue;
        }
        let Some(claim) = claim_run(runs_dir, run, opts, progress)? else {
            progress.overall.inc(1);
            continue;
        };
        let bar = progress.run_bar(run.config.steps, &format!("{} {}", run.label, run.seed));
        let mut observer = BarObserver(bar.clone());
        let (fit, mut report) = run_prepared(&run.config, p, opts.device, &mut observer)?;
        bar.finish_and_clear();
        progress.multi.remove(&bar);
        if exp.diagnose
            && !matches!(run.config.method, MethodConfig::Fvi)
            && report["status"] == "ok"
        {
            report["diagnosis"] =
                diagnosis_section(&run.config, p, &fit, DIAGNOSE_STEPS, DIAGNOSE_DRAWS)?;
        }
        slim(&mut report);
        write_json_atomic(&runs_dir.join(&run.file), &report)?;
        drop(claim);
        progress.overall.inc(1);
        progress.line(done_line(&exp.name, run, &report));
    }
    Ok(())
}

fn run_children(
    exp: &Experiment,
    runs: &[RunSpec],
    dir: &Path,
    opts: &ReproduceOptions,
    progress: &Progress,
) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the avi executable")?;
    let configs = dir.join("configs");
    std::fs::create_dir_all(&configs)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = opts.threads.min(cores / opts.jobs).max(1);
    let device = match opts.device {
        Device::Cuda(_) => "cuda",
        _ => "cpu",
    };
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.min(runs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= runs.len() || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                let run = &runs[i];
                let child = Child {
                    exe: &exe,
                    device,
                    threads,
                };
                let result =
                    claim_run(&dir.join("runs"), run, opts, progress).and_then(
                        |claim| match claim {
                            None => {
                                progress.overall.inc(1);
                                Ok(())
                            }
                            Some(claim) => {
                                let r = run_child(exp, run, dir, &configs, &child, progress);
                                drop(claim);
                                r
                            }
                        },
                    );
                if let Err(e) = result {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(format!("{e:#}"));
                    }
                    break;
                }
            });
        }
    });
    if crate::interrupt::requested() {
        return Err(crate::interrupt::Interrupted.into());
    }
    if let Some(e) = failure.into_inner().unwrap_or(None) {
        bail!(e);
    }
    Ok(())
}

/// How child `avi fit` processes are started.
struct Child<'a> {
    exe: &'a Path,
    device: &'a str,
    threads: usize,
}

/// The environment variable that tells a child `avi` to exit when its
/// standard input closes (the parent died: no orphan keeps fitting).
pub const EXIT_WITH_PARENT: &str = "AVI_EXIT_WITH_PARENT";

fn run_child(
    exp: &Experiment,
    run: &RunSpec,
    dir: &Path,
    configs: &Path,
    child: &Child<'_>,
    progress: &Progress,
) -> Result<()> {
    let cfg_path = configs.join(&run.file);
    write_json_atomic(&cfg_path, &serde_json::to_value(&run.config)?)?;
    let out = dir.join("runs").join(&run.file);
    let diagnose = exp.diagnose && !matches!(run.config.method, MethodConfig::Fvi);
    let mut cmd = Command::new(child.exe);
    cmd.arg(if diagnose { "diagnose" } else { "fit" })
        .arg("--config")
        .arg(&cfg_path)
        .arg("--out")
        .arg(&out)
        .args([
            "--device",
            child.device,
            "--threads",
            &child.threads.to_string(),
            "--quiet",
        ])
        .env("OMP_NUM_THREADS", child.threads.to_string())
        .env(EXIT_WITH_PARENT, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if diagnose {
        cmd.args([
            "--fvi-steps",
            &DIAGNOSE_STEPS.to_string(),
            "--gradient-draws",
            &DIAGNOSE_DRAWS.to_string(),
        ]);
    }
    let mut process = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", child.exe.display()))?;
    // Held open while the child runs: it stops when this end closes, i.e.
    // when this process ends, however it ends, or is interrupted.
    let mut parent_alive = process.stdin.take();
    let mut stderr = process.stderr.take();
    // The child's error line, read while it runs (a full pipe would block it).
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = std::io::Read::read_to_string(s, &mut text);
        }
        text
    });
    let status = loop {
        if let Some(status) = process
            .try_wait()
            .with_context(|| format!("cannot wait for {}", child.exe.display()))?
        {
            break status;
        }
        if crate::interrupt::requested() && parent_alive.is_some() {
            // The child notices the closed pipe at its next check.
            parent_alive = None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(parent_alive);
    let err = reader.join().unwrap_or_default();
    if crate::interrupt::requested() {
        return Err(crate::interrupt::Interrupted.into());
    }
    // Exit 3 is a diverged fit: its report is written and counts as a run.
    if !(status.success() || status.code() == Some(3)) {
        bail!(
            "{} {} seed {}: {}",
            exp.name,
            run.label,
            run.seed,
            err.trim()
        );
    }
    let mut report: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    if slim(&mut report) {
        write_json_atomic(&out, &report)?;
    }
    progress.overall.inc(1);
    progress.line(done_line(&exp.name, run, &report));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> Experiment {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/experiments");
        load_experiment(&dir, name).unwrap()
    }

    /// Every shipped experiment and variant (`data/experiments/variants/`)
    /// loads, and its quick form keeps only claims about methods the quick
    /// run runs.
    #[test]
    fn shipped_quick_claims_name_only_methods_that_run() {
        let variants = default_experiments_dir().join("variants");
        let mut all: Vec<(String, Experiment)> = EXPERIMENTS
            .iter()
            .map(|name| (name.to_string(), shipped(name)))
            .collect();
        for entry in std::fs::read_dir(&variants).unwrap() {
            let path = entry.unwrap().path();
            let exp = load_experiment_file(&path).unwrap();
            all.push((path.display().to_string(), exp));
        }
        assert!(all.len() > EXPERIMENTS.len(), "no variant in {variants:?}");
        for (name, exp) in &all {
            let q = effective(exp, true, None).unwrap();
            let run: Vec<&String> = q.methods.iter().map(|m| &m.label).collect();
            for c in &q.claims {
                for l in c.labels() {
                    assert!(run.contains(&l), "{name}: quick claim names {l}");
                }
            }
        }
    }

    /// A quick claim list replaces the experiment's claims, and naming a
    /// method the quick run leaves out is an error, not a silent skip.
    /// `k/K` parses; a launcher's environment gives the shard (OpenMPI,
    /// PMI, a multi-task Slurm step, a Slurm job array counted from its
    /// minimum); one process or no launcher is no shard; bad values are
    /// errors naming the variable.
    #[test]
    fn shards_from_the_flag_and_the_launchers() {
        assert_eq!(Shard::parse("2/3", "--shard").unwrap().index, 2);
        for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
            assert!(Shard::parse(bad, "--shard").is_err(), "{bad}");
        }
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let get = |pairs: &'static [(&'static str, &'static str)]| {
            Shard::from_env(env(pairs))
                .unwrap()
                .map(|s| (s.index, s.count))
        };
        assert_eq!(
            get(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "3")]),
            Some((3, 3))
        );
        assert_eq!(get(&[("PMI_RANK", "0"), ("PMI_SIZE", "4")]), Some((1, 4)));
        assert_eq!(
            get(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]),
            Some((2, 2))
        );
        // A job array's task runs one process: its array index counts.
        assert_eq!(
            get(&[
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
                ("SLURM_ARRAY_TASK_ID", "7"),
                ("SLURM_ARRAY_TASK_MIN", "5"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ]),
            Some((3, 4))
        );
        assert_eq!(
            get(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "1")]),
            None
        );
        assert_eq!(get(&[]), None);
        assert!(Shard::from_env(env(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])).is_err());
        assert!(Shard::from_env(env(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")])).is_err());
        // Slices: every run in exactly one shard.
        let exp = shipped("linear");
        let all = plan(&exp);
        let mut seen: Vec<String> = (1..=3)
            .flat_map(|k| {
                Shard {
                    index: k,
                    count: 3,
                    source: String::new(),
                }
                .slice(plan(&exp))
                .into_iter()
                .map(|r| r.file)
            })
            .collect();
        seen.sort();
        let mut want: Vec<String> = all.into_iter().map(|r| r.file).collect();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn quick_claim_list_replaces_the_claims() {
        let exp = shipped("bnn");
        let q = effective(&exp, true, None).unwrap();
        let QuickClaims::List(list) = &exp.quick.claims else {
            panic!("the bnn quick block lists its own claims");
        };
        assert_eq!(q.claims.len(), list.len());
        assert!(!q.claims.is_empty());
        let full = effective(&exp, false, None).unwrap();
        assert_eq!(full.claims.len(), exp.claims.len());
        let mut bad = exp.clone();
        bad.quick.claims = QuickClaims::List(vec![Claim::Never {
            text: "k = 256 never converges".into(),
            labels: vec!["k=256".into()],
        }]);
        let err = effective(&bad, true, None).unwrap_err().to_string();
        assert!(err.contains("k=256"), "{err}");
    }
}
