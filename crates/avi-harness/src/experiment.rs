//! The experiment schema: what `data/experiments/*.json` and a results
//! folder's `experiment.json` hold (a model, data, run length, draws, seeds,
//! the methods to compare and the paper's claims about them), its loading
//! and checking, `--quick` and `--seeds` ([`effective`]) and the runs it
//! asks for ([`plan`]). Read by `avi reproduce` (which runs them) and the
//! summaries (which summarise them); imports neither.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use avi_inference::{Dtype, Entropy, LocalUpdates, LrStep, MethodConfig};
use serde::{Deserialize, Serialize};

use crate::config::{DataConfig, FitConfig, ModelConfig, MseConfig};

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
    /// How its F-VI updates categorical local factors (default
    /// `"gradient"`; `"cavi"` or `"annealed_cavi"` with θ fixed).
    #[serde(default, skip_serializing_if = "LocalUpdates::is_gradient")]
    pub local_updates: LocalUpdates,
    /// An engine of its own (default: the experiment's), e.g. the fused
    /// CPU engine for the scalar models of an experiment that also fits
    /// the BNN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<avi_inference::Engine>,
    /// Steps of its own (default: the experiment's; a quick run uses the
    /// quick block's steps for every method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Monte Carlo draws per step of its own (default: the experiment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draws: Option<usize>,
    /// Draws of its final ELBO of its own (default: the experiment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_draws: Option<usize>,
    /// Precision of its own (default: the experiment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// Mini-batch size of its own (default: the experiment's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
}

/// The `heldout` block of an experiment: after each amortized run (A-VI,
/// Const), encode a second data set with the fitted inference function
/// ([`avi_inference::encode`]) and store its held-out ELBO, refined and
/// amortized, in the run report's `heldout` section.
///
/// The held-out data follow from each method's training data: a simulation
/// is repeated with seed `seed + seed_offset` (same N and the same θ, which
/// the simulation must name: a θ drawn from the prior would differ between
/// the two seeds); Fashion-MNIST training images are replaced by the first
/// N test images. F-VI runs have no encoder and get no section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldoutEntry {
    /// Added to a simulation's seed for the held-out data.
    pub seed_offset: u64,
    /// Monte Carlo draws of each held-out ELBO.
    pub draws: usize,
    /// Seed of those draws (the same for the amortized and the refined
    /// estimate, so that their difference is not blurred by independent
    /// noise).
    #[serde(default)]
    pub seed: u64,
    /// F-VI steps on the held-out local factors, from the encoder's
    /// output, with q(θ) held ([`avi_inference::EncodeOptions::refine_steps`]).
    pub refine_steps: usize,
    /// Adam's rate of the refinement (×0.1 from half-way, ×0.01 for the
    /// last quarter).
    pub refine_lr: f64,
    /// Draws per refinement step (default: the run's own draws per step,
    /// e.g. 100 for linear and saw, 1 for the BNN whose decoder makes each
    /// draw costly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine_draws: Option<usize>,
    /// Refinement steps of the quick run (default: `refine_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quick_refine_steps: Option<usize>,
}

impl HeldoutEntry {
    /// The held-out data of a run trained on `data` (see the type's docs).
    pub fn data(&self, data: &DataConfig) -> Result<DataConfig> {
        match data {
            DataConfig::Simulate(s) => {
                if s.theta.is_none() {
                    bail!(
                        "heldout: the simulation (seed {}) draws θ from its prior, so data simulated with another seed would have another θ: name `theta` in the data block",
                        s.seed
                    );
                }
                let mut h = s.clone();
                h.seed = s.seed.checked_add(self.seed_offset).with_context(|| {
                    format!("heldout: seed {} + seed_offset {} overflows", s.seed, self.seed_offset)
                })?;
                Ok(DataConfig::Simulate(h))
            }
            DataConfig::FashionMnist(f) => {
                if f.split != crate::config::FashionMnistSplit::Train {
                    bail!("heldout: Fashion-MNIST training data must be the `train` split (the held-out images are the test split)");
                }
                if f.n > 10_000 {
                    bail!("heldout: {} training images, but the test split has 10,000", f.n);
                }
                Ok(DataConfig::FashionMnist(crate::config::FashionMnistConfig {
                    split: crate::config::FashionMnistSplit::Test,
                    ..f.clone()
                }))
            }
            DataConfig::File(p) => bail!(
                "heldout: the training data are a file ({}): there is no second data set to derive from it",
                p.display()
            ),
        }
    }

    /// The encoding settings of a run that drew `run_draws` per step.
    pub fn options(&self, run_draws: usize) -> avi_inference::EncodeOptions {
        avi_inference::EncodeOptions {
            draws: self.draws,
            seed: self.seed,
            refine_steps: self.refine_steps,
            refine_lr: self.refine_lr,
            refine_draws: self.refine_draws.unwrap_or(run_draws),
            ..avi_inference::EncodeOptions::default()
        }
    }
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

/// Which verdict the paper's own numbers (the authors' stored results, as
/// recomputed in the digest) would give a claim under each of the two rules
/// the summary reports: `every_seed`, the claim's check as written (e.g.
/// "every run converges"), and `median`, the same check on the median over
/// seeds (e.g. "the median run converges"). Static text written from the
/// digest's tables, shown in `REPORT.md` beside our own two verdicts; a
/// claim beyond the paper has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperVerdicts {
    /// The verdict of the check on every seed.
    pub every_seed: bool,
    /// The verdict of the check on the median over seeds.
    pub median: bool,
    /// Which of the paper's numbers decide it (digest section and values).
    pub why: String,
}

/// A paper claim and the check that decides whether our runs show it.
///
/// Every kind takes an optional `paper_verdicts` ([`PaperVerdicts`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "snake_case", deny_unknown_fields)]
pub enum Claim {
    /// Every run (or at least `min_fraction` of the runs) of each method
    /// converges.
    Converge {
        /// The claim in words.
        text: String,
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
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
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
        /// The methods.
        labels: Vec<String>,
    },
    /// Each method's median iterations to converge is below `than`'s.
    Faster {
        /// The claim in words.
        text: String,
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
        /// The methods.
        labels: Vec<String>,
        /// The reference method.
        than: String,
    },
    /// Each method's largest gap is at most `max` nats.
    GapBelow {
        /// The claim in words.
        text: String,
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
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
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
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
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
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
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
        /// A-VI methods in order of growing window.
        labels: Vec<String>,
    },
    /// Along each list, the median gap never grows by more than `slack`
    /// nats and the last is below the first.
    GapShrinks {
        /// The claim in words.
        text: String,
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
        /// Lists of methods in order of growing window or width.
        series: Vec<Vec<String>>,
        /// Monte Carlo and optimisation slack (nats).
        slack: f64,
    },
    /// Held-out data (the experiment's `heldout` block): each run's
    /// held-out gap (refined − amortized held-out ELBO) is zero within
    /// `k_se` standard errors plus `slack` nats: |gap| ≤ k_se · SE + slack,
    /// SE the gap's Monte Carlo standard error (per-draw differences).
    HeldoutGapZero {
        /// The claim in words.
        text: String,
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
        /// The amortized methods.
        labels: Vec<String>,
        /// Standard errors allowed.
        k_se: f64,
        /// Optimisation slack of the refinement (nats).
        slack: f64,
    },
    /// Held-out data: each run's held-out gap is positive and within a
    /// factor `factor` of its training gap (the exact optimal ELBO minus
    /// the method's, or without one F-VI's ELBO of the same seed, model and
    /// data minus the method's): training / factor ≤ held-out ≤ training ·
    /// factor.
    HeldoutGapLikeTraining {
        /// The claim in words.
        text: String,
        /// What the paper's own (recomputed) numbers give under each rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paper_verdicts: Option<PaperVerdicts>,
        /// The amortized methods.
        labels: Vec<String>,
        /// Largest allowed ratio either way (> 1).
        factor: f64,
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
            | Self::HeldoutGapZero { labels, .. }
            | Self::HeldoutGapLikeTraining { labels, .. }
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

    /// What the paper's own numbers would give under each rule, where the
    /// definition says.
    pub fn paper_verdicts(&self) -> Option<&PaperVerdicts> {
        match self {
            Self::Converge { paper_verdicts, .. }
            | Self::Never { paper_verdicts, .. }
            | Self::Faster { paper_verdicts, .. }
            | Self::GapBelow { paper_verdicts, .. }
            | Self::GapAbove { paper_verdicts, .. }
            | Self::MseRatio { paper_verdicts, .. }
            | Self::WindowBound { paper_verdicts, .. }
            | Self::GapShrinks { paper_verdicts, .. }
            | Self::HeldoutGapZero { paper_verdicts, .. }
            | Self::HeldoutGapLikeTraining { paper_verdicts, .. } => paper_verdicts.as_ref(),
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
            | Self::GapShrinks { text, .. }
            | Self::HeldoutGapZero { text, .. }
            | Self::HeldoutGapLikeTraining { text, .. } => text,
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
    /// Encode held-out data after each amortized run ([`HeldoutEntry`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout: Option<HeldoutEntry>,
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
pub const EXPERIMENTS: [&str; 9] = [
    "linear",
    "nonlinear",
    "bnn",
    "saw",
    "hmm-window",
    "mixture",
    "hmm-counterexample",
    "generalization",
    "semi-amortized",
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
    if let Some(h) = &exp.heldout {
        if h.refine_steps == 0 || h.draws < 2 {
            bail!("heldout: needs refine_steps ≥ 1 (the held-out gap is refined − amortized) and draws ≥ 2");
        }
        for m in exp
            .methods
            .iter()
            .filter(|m| !matches!(m.method, MethodConfig::Fvi))
        {
            h.data(m.data.as_ref().unwrap_or(&exp.data))
                .with_context(|| format!("method `{}`", m.label))?;
        }
    }
    for c in &exp.claims {
        if matches!(
            c,
            Claim::HeldoutGapZero { .. } | Claim::HeldoutGapLikeTraining { .. }
        ) && exp.heldout.is_none()
        {
            bail!(
                "the claim `{}` is about held-out data: the experiment needs a `heldout` block",
                c.text()
            );
        }
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
            m.steps = None;
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
        if let Some(h) = &mut e.heldout {
            if let Some(k) = h.quick_refine_steps {
                h.refine_steps = k;
            }
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
        steps: method.steps.unwrap_or(exp.steps),
        lr: method.lr,
        draws: method.draws.unwrap_or(exp.draws),
        seed,
        eval_draws: method.eval_draws.unwrap_or(exp.eval_draws),
        entropy: exp.entropy,
        dtype: method.dtype.unwrap_or(exp.dtype),
        report_q_z: false,
        batch_size: method.batch_size.or(exp.batch_size),
        shuffle: exp.shuffle,
        lr_schedule: exp.lr_schedule.clone(),
        engine: method.engine.unwrap_or(exp.engine),
        local_updates: method.local_updates,
        stop: None,
        mse: exp.mse.as_ref().map(|m| MseConfig {
            every: m.every,
            test: m.test.clone(),
        }),
        save: None,
        init_from: None,
        checkpoint: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `paper_verdicts` is optional on every claim kind, parses with its
    /// three keys, and rejects unknown ones.
    #[test]
    fn paper_verdicts_parse_and_are_optional() {
        let without: Claim = serde_json::from_value(serde_json::json!({
            "check": "never", "text": "t", "labels": ["a"]
        }))
        .unwrap();
        assert!(without.paper_verdicts().is_none());
        let with: Claim = serde_json::from_value(serde_json::json!({
            "check": "gap_below", "text": "t", "labels": ["a"], "max": 1.0,
            "paper_verdicts": { "every_seed": false, "median": true, "why": "w" }
        }))
        .unwrap();
        assert_eq!(
            with.paper_verdicts(),
            Some(&PaperVerdicts {
                every_seed: false,
                median: true,
                why: "w".into()
            })
        );
        // Written back only where present.
        assert!(serde_json::to_value(&without)
            .unwrap()
            .get("paper_verdicts")
            .is_none());
        assert_eq!(
            serde_json::to_value(&with).unwrap()["paper_verdicts"]["median"],
            true
        );
        for bad in [
            serde_json::json!({ "every_seed": false, "median": true }),
            serde_json::json!({ "every_seed": false, "median": true, "why": "w", "extra": 1 }),
        ] {
            let r: Result<Claim, _> = serde_json::from_value(serde_json::json!({
                "check": "never", "text": "t", "labels": ["a"], "paper_verdicts": bad
            }));
            assert!(r.is_err(), "{bad}");
        }
    }

    /// Every definition `avi reproduce` knows loads; the nonlinear one gives the
    /// paper's verdicts for its three paper claims (digest §4.3: k = 4, 8
    /// and 16 have non-converging seeds, so "every seed" fails the first
    /// while its median passes) and none for the two beyond the paper.
    #[test]
    fn committed_definitions_load_with_paper_verdicts() {
        let dir = default_experiments_dir();
        for name in EXPERIMENTS {
            load_experiment(&dir, name).unwrap_or_else(|e| panic!("{e:#}"));
        }
        let exp = load_experiment(&dir, "nonlinear").unwrap();
        let v: Vec<Option<(bool, bool)>> = exp
            .claims
            .iter()
            .map(|c| c.paper_verdicts().map(|p| (p.every_seed, p.median)))
            .collect();
        assert_eq!(
            v,
            [
                Some((false, true)),
                Some((true, true)),
                Some((true, true)),
                None,
                None
            ]
        );
    }

    /// The held-out data of each kind of training data: a simulation with
    /// the seed moved by the offset (θ must be named), the Fashion-MNIST
    /// test split, no file; and the committed definition's amortized
    /// methods all have held-out data.
    #[test]
    fn heldout_data_follow_from_the_training_data() {
        let h: HeldoutEntry = serde_json::from_value(serde_json::json!({
            "seed_offset": 1000, "draws": 100, "refine_steps": 10, "refine_lr": 0.01
        }))
        .unwrap();
        let sim: DataConfig = serde_json::from_value(
            serde_json::json!({"simulate": {"n": 50, "seed": 7, "theta": [1.0]}}),
        )
        .unwrap();
        let DataConfig::Simulate(s) = h.data(&sim).unwrap() else {
            panic!("a simulation's held-out data are simulated");
        };
        assert_eq!((s.n, s.seed, s.theta), (50, 1007, Some(vec![1.0])));
        let drawn: DataConfig =
            serde_json::from_value(serde_json::json!({"simulate": {"n": 50, "seed": 7}})).unwrap();
        let err = h.data(&drawn).unwrap_err().to_string();
        assert!(err.contains("theta"), "{err}");
        let images: DataConfig = serde_json::from_value(
            serde_json::json!({"fashion_mnist": {"split": "train", "n": 300}}),
        )
        .unwrap();
        let DataConfig::FashionMnist(f) = h.data(&images).unwrap() else {
            panic!("Fashion-MNIST held-out data are images");
        };
        assert_eq!(
            (f.split, f.n),
            (crate::config::FashionMnistSplit::Test, 300)
        );
        assert!(h.data(&DataConfig::File("x.json".into())).is_err());
        // Refinement steps and draws are checked at load.
        let mut exp = load_experiment(&default_experiments_dir(), "generalization").unwrap();
        assert!(exp.heldout.is_some());
        exp.heldout.as_mut().unwrap().refine_steps = 0;
        assert!(check_experiment(&exp).is_err());
        // The quick run uses the quick refinement steps.
        let exp = load_experiment(&default_experiments_dir(), "generalization").unwrap();
        let q = effective(&exp, true, None).unwrap();
        let h = q.heldout.unwrap();
        assert_eq!(Some(h.refine_steps), h.quick_refine_steps);
        assert!(q.methods.iter().all(|m| m.steps.is_none()));
    }
}
