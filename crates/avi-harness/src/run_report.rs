//! The run report: what `avi fit` (and every run of an experiment) writes,
//! as one serde type, read back by the summaries, the demo and `--resume`.
//!
//! JSON has no NaN or infinity: a non-finite float is written as `null` and
//! read back as NaN. Fields are declared in alphabetical order, so the
//! report's bytes are those of the older `serde_json::json!` report (whose
//! maps sort their keys), plus the `provenance` section. Fields added after
//! reports were first committed (`provenance`, `threads`, `warnings`,
//! `convergence`, `interrupted_at`, `stop_reason`, `stopped_at`) are
//! optional when reading, so every committed report still loads; a missing
//! or renamed required field is an error naming the file and the key path
//! ([`load`]). `docs/report-schema.md` lists every field.
//!
//! A run report is stored in one of two forms: full (`LABEL-SEED.json`,
//! every step of the ELBO trace, as `avi fit` and `avi reproduce` write
//! it) or compact (`LABEL-SEED.json.gz`, gzip-compressed, its trace
//! replaced by 10-step block means: [`BlockTrace`], written by `avi
//! compact`). Every reader goes through [`locate`], [`load`] and
//! [`is_finished`], which take the `.json` name and read whichever form is
//! there (both at once is an error naming both files), and every summary
//! metric of a trace is defined on its blocks ([`Trace::blocks`]), so
//! that a full run and its compact form give the same summary, bit for
//! bit.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// The report of one fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Present when the run was one of a batched optimisation of this many
    /// seeds (its `seconds` are the batch's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batched_seeds: Option<usize>,
    /// The fit's configuration (a `FitConfig` as JSON).
    pub config: Value,
    /// Whether the ELBO had stopped rising at the end (absent in older
    /// reports, and for diverged fits or traces too short to tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<avi_inference::Convergence>,
    /// The device the fit ran on (`cpu`, `cuda:0`, …).
    pub device: String,
    /// The paper's §5 diagnostic, when it was run after the fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<Diagnosis>,
    /// The step at which the fit diverged (with `status: diverged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged_at: Option<usize>,
    /// The final ELBO estimate (NaN when not finite).
    #[serde(with = "nullable")]
    pub elbo: f64,
    /// Its Monte Carlo standard error.
    #[serde(with = "nullable")]
    pub elbo_se: f64,
    /// The step at which an interrupt stopped the fit (with
    /// `status: interrupted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted_at: Option<usize>,
    /// Held-out data encoded after the fit (experiments with a `heldout`
    /// block, amortized methods only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout: Option<HeldoutSection>,
    /// The optimisation steps taken.
    pub iterations: usize,
    /// The method (the config's `method`).
    pub method: Value,
    /// The model (the config's `model`).
    pub model: Value,
    /// The BNN's reconstruction MSE during the fit, when monitored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mse: Option<MseTrace>,
    /// The number of observations.
    pub n: usize,
    /// The number of optimised parameters.
    pub num_parameters: usize,
    /// Which avi built the report (absent in reports of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// q(θ), `null` when θ is fixed.
    pub q_theta: Option<QTheta>,
    /// q(z), `null` unless the config asks for it (`report_q_z`).
    pub q_z: Option<QZ>,
    /// Exact reference quantities, when the model has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceSection>,
    /// Seconds of optimisation.
    #[serde(with = "nullable")]
    pub seconds: f64,
    /// A semi-amortized fit's own numbers ([`avi_inference::SemiReport`]:
    /// inner steps, K, the switch step, the encoder's own ELBO); absent for
    /// every other method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semi: Option<Value>,
    /// Whether the fit finished, diverged or was interrupted.
    pub status: RunStatus,
    /// Why the config's stopping rule stopped the fit early (with its
    /// numbers; absent when it ran all its steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// The last step of a fit its stopping rule stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<usize>,
    /// libtorch's intra-op threads (absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<i32>,
    /// The ELBO trace: every step, or 10-step blocks in a compact report.
    pub trace: Trace,
    /// Warnings of the fit (absent, read as none, in older reports).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// A second data set encoded with the fitted inference function
/// ([`avi_inference::encode`]): its held-out ELBO from the encoder's
/// factors (amortized) and after F-VI steps on those factors with q(θ)
/// held (refined). Both estimates leave out log p(θ) and q(θ)'s entropy
/// (`elbo_excludes`) and use the same draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldoutSection {
    /// The held-out data's config block.
    pub data: Value,
    /// N' of the held-out data.
    pub n: usize,
    /// Monte Carlo draws of each estimate.
    pub draws: usize,
    /// Held-out ELBO of the encoder's factors.
    #[serde(with = "nullable")]
    pub amortized_elbo: f64,
    /// Its standard error.
    #[serde(with = "nullable")]
    pub amortized_elbo_se: f64,
    /// Held-out ELBO after the refinement.
    #[serde(with = "nullable")]
    pub refined_elbo: f64,
    /// Its standard error.
    #[serde(with = "nullable")]
    pub refined_elbo_se: f64,
    /// Refined − amortized: the amortization gap on the held-out data.
    #[serde(with = "nullable")]
    pub gap: f64,
    /// Its Monte Carlo standard error (from the per-draw differences).
    #[serde(with = "nullable")]
    pub gap_se: f64,
    /// F-VI steps of the refinement taken.
    pub refine_steps: usize,
    /// Its learning rate.
    pub refine_lr: f64,
    /// `ok`, or `diverged at K`.
    pub refine_status: String,
    /// Held-out observations outside the training data's range.
    pub outside_training_range: usize,
    /// What the held-out ELBOs leave out.
    pub elbo_excludes: String,
    /// Seconds of encoding and refining.
    #[serde(with = "nullable")]
    pub seconds: f64,
}

/// How a fit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// It ran its steps (or stopped by its rule).
    Ok,
    /// Its ELBO became non-finite (`diverged_at` says when).
    Diverged,
    /// It was stopped part-way by Ctrl-C (`interrupted_at` says when): not
    /// a finished run (`reproduce --resume` runs it again; summaries leave
    /// it out as missing).
    Interrupted,
}

/// Which avi wrote a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The `avi-harness` version.
    pub avi_version: String,
    /// The engine that ran the fit (its config name).
    pub engine: String,
    /// The git commit avi was built from, `unknown` outside git.
    pub git_commit: String,
    /// Whether the code it was built from had uncommitted changes to that
    /// commit (under `crates/`, `build/` or the manifests). Absent outside
    /// git and in reports written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_dirty: Option<bool>,
}

impl Provenance {
    /// This build's provenance, with the engine that ran the fit.
    pub fn here(engine: &str) -> Self {
        Provenance {
            avi_version: env!("CARGO_PKG_VERSION").to_string(),
            engine: engine.to_string(),
            git_commit: option_env!("AVI_GIT_COMMIT")
                .unwrap_or("unknown")
                .to_string(),
            git_dirty: option_env!("AVI_GIT_DIRTY").map(|d| d == "1"),
        }
    }
}

/// The ELBO trace of a fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceSection {
    /// The ELBO estimate at each recorded step.
    #[serde(with = "nullable_vec")]
    pub elbo: Vec<f64>,
    /// The 1-based step numbers.
    pub iteration: Vec<usize>,
    /// Seconds since the optimisation started.
    #[serde(with = "nullable_vec")]
    pub seconds: Vec<f64>,
    /// `"step"`: `seconds` taken at the end of every step; `"block"`: at the
    /// end of each block of steps run as one unit (a CUDA graph replay) and
    /// spread evenly over its steps. Absent in reports written before it
    /// existed (their engines' clocks: graph and CUDA fused per block,
    /// the others per step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<avi_inference::Clock>,
}

/// Steps (trace entries) per block of a compact trace.
pub const BLOCK: usize = 10;

/// The ELBO trace of a run report: every recorded step (full reports), or
/// its 10-step blocks (compact reports, written by `avi compact`). In JSON
/// the compact form is the object with a `block` key.
#[derive(Debug, Clone, PartialEq)]
pub enum Trace {
    /// Every recorded step.
    Full(TraceSection),
    /// 10-step block means, block starts and the raw last entries.
    Blocks(BlockTrace),
}

impl Trace {
    /// The block form every summary metric is computed from: computed from
    /// a full trace ([`BlockTrace::from_full`]), or the compact one as
    /// stored.
    pub fn blocks(&self) -> BlockTrace {
        match self {
            Trace::Full(t) => BlockTrace::from_full(t),
            Trace::Blocks(b) => b.clone(),
        }
    }

    /// The full trace, `None` for a compact one.
    pub fn full(&self) -> Option<&TraceSection> {
        match self {
            Trace::Full(t) => Some(t),
            Trace::Blocks(_) => None,
        }
    }

    /// The number of recorded steps.
    pub fn len(&self) -> usize {
        match self {
            Trace::Full(t) => t.elbo.len(),
            Trace::Blocks(b) => b.length,
        }
    }

    /// Whether no step was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Serialize for Trace {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Trace::Full(t) => t.serialize(s),
            Trace::Blocks(b) => b.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Trace {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Value::deserialize(d)?;
        if v.get("block").is_some() {
            let b: BlockTrace = serde_json::from_value(v).map_err(D::Error::custom)?;
            b.check().map_err(D::Error::custom)?;
            Ok(Trace::Blocks(b))
        } else {
            serde_json::from_value(v)
                .map(Trace::Full)
                .map_err(D::Error::custom)
        }
    }
}

/// The trace of a compact run report: a full trace of `length` entries cut
/// into `length / 10` whole blocks of 10 entries and a raw `tail` of the
/// `length % 10` last ones.
///
/// Block `j` holds entries `10j .. 10j + 10` (0-based): its `elbo` is the
/// sequential sum of their ELBOs divided by 10, its `iteration` and
/// `seconds` those of its first entry. Every summary metric of a trace is
/// defined on this form ([`first_within`](Self::first_within),
/// [`final_window`](Self::final_window)), for full traces too, so a run
/// and its compact report give bit-identical summaries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockTrace {
    /// Entries per block: always [`BLOCK`] (10).
    pub block: usize,
    /// The clock of the full trace (see [`TraceSection::clock`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<avi_inference::Clock>,
    /// The mean ELBO of each block (`null`: not finite).
    #[serde(with = "nullable_vec")]
    pub elbo: Vec<f64>,
    /// The seconds of the trace's last entry (`null` for an empty trace).
    #[serde(with = "nullable")]
    pub end_seconds: f64,
    /// The 1-based step number of each block's first entry.
    pub iteration: Vec<usize>,
    /// The entries of the full trace.
    pub length: usize,
    /// The seconds of each block's first entry.
    #[serde(with = "nullable_vec")]
    pub seconds: Vec<f64>,
    /// The last `length % 10` entries, raw (no `clock`).
    pub tail: TraceSection,
}

impl BlockTrace {
    /// The block form of a full trace.
    pub fn from_full(t: &TraceSection) -> Self {
        let whole = t.elbo.len() / BLOCK * BLOCK;
        let mean = |c: &[f64]| {
            let mut s = 0.0;
            for v in c {
                s += v;
            }
            s / BLOCK as f64
        };
        BlockTrace {
            block: BLOCK,
            clock: t.clock,
            elbo: t.elbo[..whole].chunks(BLOCK).map(mean).collect(),
            end_seconds: t.seconds.last().copied().unwrap_or(f64::NAN),
            iteration: t.iteration[..whole]
                .iter()
                .step_by(BLOCK)
                .copied()
                .collect(),
            length: t.elbo.len(),
            seconds: t.seconds[..whole].iter().step_by(BLOCK).copied().collect(),
            tail: TraceSection {
                elbo: t.elbo[whole..].to_vec(),
                iteration: t.iteration[whole..].to_vec(),
                seconds: t.seconds[whole..].to_vec(),
                clock: None,
            },
        }
    }

    /// Check that the parts agree (block size, lengths).
    fn check(&self) -> Result<()> {
        if self.block != BLOCK {
            bail!("`block` is {}, only {BLOCK} is supported", self.block);
        }
        let n = self.elbo.len();
        if self.iteration.len() != n || self.seconds.len() != n {
            bail!(
                "{n} block ELBOs but {} iterations and {} seconds",
                self.iteration.len(),
                self.seconds.len()
            );
        }
        let r = self.tail.elbo.len();
        if r >= BLOCK || self.tail.iteration.len() != r || self.tail.seconds.len() != r {
            bail!("`tail` must hold fewer than {BLOCK} entries, as many of each kind");
        }
        if self.length != BLOCK * n + r {
            bail!(
                "`length` {} is not {BLOCK} × {n} blocks + {r} tail entries",
                self.length
            );
        }
        Ok(())
    }

    /// The paper's convergence metric (digest §4.1.1) on blocks: the first
    /// checkpoint `c ∈ {20, 30, 40, …}` (a 0-based index into the full
    /// trace) whose window `[c − 10, c + 10)` has a mean within
    /// `rel_tol · |target|` of `target`. That window is blocks `c/10 − 1`
    /// and `c/10`, and its mean is taken as the mean of their two means, so
    /// it is the same for a full trace and its compact form (it agrees with
    /// [`avi_inference::convergence::first_within`] with half width 10 up
    /// to rounding). A non-finite window never converges.
    pub fn first_within(&self, target: f64, rel_tol: f64) -> Option<usize> {
        (2..self.elbo.len()).find_map(|j| {
            let m = (self.elbo[j - 1] + self.elbo[j]) / 2.0;
            (m.is_finite() && (m - target).abs() <= rel_tol * target.abs()).then_some(BLOCK * j)
        })
    }

    /// The seconds at entry `c` of the full trace, a block start (as
    /// [`first_within`](Self::first_within) returns); `None` otherwise.
    pub fn seconds_at(&self, c: usize) -> Option<f64> {
        (c % BLOCK == 0)
            .then(|| self.seconds.get(c / BLOCK).copied())
            .flatten()
    }

    /// The final-window ELBO: the mean of the last `2 · half` entries (digest
    /// §4.1.1), on blocks. The raw tail (`r = length % 10` entries) always
    /// counts, with the last `k = ⌈(2 · half − r) / 10⌉` whole blocks (all
    /// blocks when there are fewer; none when `2 · half ≤ r`). Without a
    /// tail (every committed run: 20,000 or 30,000 steps) it is the
    /// sequential mean of those `k` block means, exactly the mean of the
    /// last `2 · half` entries up to rounding when `2 · half` is a multiple
    /// of 10 (a `half` that is not a multiple of 5 rounds up to whole
    /// blocks); with a tail it is (10 · Σ block means + Σ tail) / (10k + r).
    /// NaN for an empty trace.
    pub fn final_window(&self, half: usize) -> f64 {
        let r = self.tail.elbo.len();
        let k = (2 * half)
            .saturating_sub(r)
            .div_ceil(BLOCK)
            .min(self.elbo.len());
        let blocks = &self.elbo[self.elbo.len() - k..];
        let mut sum = 0.0;
        for b in blocks {
            sum += b;
        }
        if r == 0 {
            if k == 0 {
                return f64::NAN;
            }
            return sum / k as f64;
        }
        let mut tail = 0.0;
        for v in &self.tail.elbo {
            tail += v;
        }
        (BLOCK as f64 * sum + tail) / (BLOCK * k + r) as f64
    }

    /// The points of the figures' ELBO curves: each block's mean with its
    /// first step and its seconds, then the raw tail entries.
    pub fn points(&self) -> impl Iterator<Item = (usize, f64, f64)> + '_ {
        let blocks =
            (0..self.elbo.len()).map(|j| (self.iteration[j], self.seconds[j], self.elbo[j]));
        let tail = (0..self.tail.elbo.len()).map(|i| {
            (
                self.tail.iteration[i],
                self.tail.seconds[i],
                self.tail.elbo[i],
            )
        });
        blocks.chain(tail)
    }
}

/// Exact reference quantities next to a fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceSection {
    /// The optimal mean-field ELBO (or the model's exact reference).
    #[serde(with = "nullable")]
    pub elbo: f64,
    /// The fitted q's exact ELBO (the linear model, converged fits).
    #[serde(
        default,
        with = "nullable_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub exact_elbo: Option<f64>,
    /// `elbo - exact_elbo`.
    #[serde(
        default,
        with = "nullable_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub exact_gap: Option<f64>,
    /// `elbo` minus the fit's ELBO estimate.
    #[serde(with = "nullable")]
    pub gap: f64,
}

/// The paper's §5 diagnostic: F-VI steps from the amortized solution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// ELBO of the amortized solution.
    #[serde(with = "nullable")]
    pub amortized_elbo: f64,
    /// Its standard error.
    #[serde(with = "nullable")]
    pub amortized_se: f64,
    /// F-VI steps taken from it.
    pub fvi_steps: usize,
    /// `refined_elbo - amortized_elbo`.
    #[serde(with = "nullable")]
    pub gain: f64,
    /// Its standard error.
    #[serde(with = "nullable")]
    pub gain_se: f64,
    /// Monte Carlo draws of the gradient norm.
    pub gradient_draws: usize,
    /// The F-VI gradient norm at the amortized solution.
    #[serde(with = "nullable")]
    pub gradient_norm: f64,
    /// ELBO after the F-VI steps.
    #[serde(with = "nullable")]
    pub refined_elbo: f64,
    /// Its standard error.
    #[serde(with = "nullable")]
    pub refined_se: f64,
}

/// The reconstruction MSE recorded during a BNN fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MseTrace {
    /// Steps between two records.
    pub every: usize,
    /// The step of each record.
    pub iteration: Vec<usize>,
    /// Seconds since the optimisation started.
    #[serde(with = "nullable_vec")]
    pub seconds: Vec<f64>,
    /// Test-set MSE (`null`: no test set, or not finite).
    pub test: Vec<Option<f64>>,
    /// Training-set MSE.
    #[serde(with = "nullable_vec")]
    pub train: Vec<f64>,
}

/// A Gaussian factor's summary: means and standard deviations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gaussian {
    /// Means.
    pub mean: Values,
    /// Standard deviations.
    pub sd: Values,
}

/// q(θ) in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QTheta {
    /// Its `D` means and sds.
    Gaussian(Gaussian),
    /// Left out of an experiment's run report (too large); says why.
    Omitted {
        /// The reason, with the number of values.
        omitted: String,
    },
}

/// q(z) in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QZ {
    /// Gaussian local factors: `N` values, or `N` rows of `L`.
    Gaussian(Gaussian),
    /// Discrete local factors: the state probabilities, `N` rows of `K`.
    Probs {
        /// The probabilities.
        probs: Values,
    },
}

/// Numbers of a report: flat (`[D]`, or `[N]` when each row has one value)
/// or rows (`[N, L]`). Non-finite numbers are `null` in JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// One number per entry.
    Flat(Vec<f64>),
    /// A row of numbers per entry.
    Rows(Vec<Vec<f64>>),
}

impl Values {
    /// A row-major array: flat when each row has one value (`width <= 1`),
    /// else rows of `width` values.
    pub fn from_rows(v: &[f64], width: usize) -> Self {
        if width <= 1 {
            Values::Flat(v.to_vec())
        } else {
            Values::Rows(v.chunks(width).map(<[f64]>::to_vec).collect())
        }
    }

    /// The number of entries (values or rows).
    pub fn len(&self) -> usize {
        match self {
            Values::Flat(v) => v.len(),
            Values::Rows(r) => r.len(),
        }
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Serialize for Values {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // serde_json writes a non-finite f64 as null.
        match self {
            Values::Flat(v) => v.serialize(s),
            Values::Rows(r) => r.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Cell {
            Num(Option<f64>),
            Row(Vec<Option<f64>>),
        }
        let cells = Vec::<Cell>::deserialize(d)?;
        let nan = |x: Option<f64>| x.unwrap_or(f64::NAN);
        if cells.iter().all(|c| matches!(c, Cell::Num(_))) {
            Ok(Values::Flat(
                cells
                    .into_iter()
                    .map(|c| match c {
                        Cell::Num(x) => nan(x),
                        Cell::Row(_) => unreachable!(),
                    })
                    .collect(),
            ))
        } else {
            cells
                .into_iter()
                .map(|c| match c {
                    Cell::Row(r) => Ok(r.into_iter().map(nan).collect()),
                    Cell::Num(_) => Err(serde::de::Error::custom(
                        "mixes numbers and rows of numbers",
                    )),
                })
                .collect::<Result<_, _>>()
                .map(Values::Rows)
        }
    }
}

/// A float written as `null` when not finite and read back as NaN.
mod nullable {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// An optional float (absent: `None`; `null`: NaN).
mod nullable_option {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(Some(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN)))
    }
}

/// Floats with `null` for the non-finite ones.
mod nullable_vec {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?
            .into_iter()
            .map(|x| x.unwrap_or(f64::NAN))
            .collect())
    }
}

impl RunReport {
    /// The status used by summaries: `Ok` only when the run finished and its
    /// final ELBO is a number. Reports written before a non-finite final
    /// ELBO counted as divergence (`"status": "ok"`, `"elbo": null`) read as
    /// diverged, as the fit would report them now.
    pub fn effective_status(&self) -> RunStatus {
        match self.status {
            RunStatus::Ok if self.elbo.is_finite() => RunStatus::Ok,
            RunStatus::Interrupted => RunStatus::Interrupted,
            _ => RunStatus::Diverged,
        }
    }

    /// Whether the run finished (ok or diverged), as opposed to being
    /// interrupted part-way.
    pub fn finished(&self) -> bool {
        self.status != RunStatus::Interrupted
    }

    /// Parse a report from JSON text; the error names the key path.
    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            anyhow!("at key `{path}`: {}", e.into_inner())
        })
    }
}

impl RunStatus {
    /// The name written in reports (`ok`, `diverged`).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Diverged => "diverged",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// The compact form's name beside a run report's `.json` name
/// (`LABEL-SEED.json` → `LABEL-SEED.json.gz`).
pub fn compact_path(json: &Path) -> PathBuf {
    let mut name = json.as_os_str().to_owned();
    name.push(".gz");
    PathBuf::from(name)
}

fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gz")
}

/// Where the run report named `path` is stored. `path` is its full name
/// (`runs/LABEL-SEED.json`): that file, or its compact form
/// `runs/LABEL-SEED.json.gz` ([`compact_path`]); `None` when neither is
/// there; an error naming both files when both are. A `.json.gz` path is
/// taken as it is.
pub fn locate(path: &Path) -> Result<Option<PathBuf>> {
    if is_gz(path) {
        return Ok(path.is_file().then(|| path.to_path_buf()));
    }
    let gz = compact_path(path);
    match (path.is_file(), gz.is_file()) {
        (true, true) => bail!(
            "the run is stored twice, as {} and {} (its compact form): remove one",
            path.display(),
            gz.display()
        ),
        (true, false) => Ok(Some(path.to_path_buf())),
        (false, true) => Ok(Some(gz)),
        (false, false) => Ok(None),
    }
}

/// The JSON text of a stored report file, gunzipped when it is a
/// `.json.gz`.
fn read_text(path: &Path) -> Result<String> {
    let mut text = String::new();
    if is_gz(path) {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot decompress {}", path.display()))?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(text)
}

/// Whether `path` (a `.json` name, see [`locate`]) holds the report of a
/// finished run: it is there, in either form, and its `status` is not
/// `interrupted` (read without the rest of the report; a file that is no
/// report, or a run stored in both forms, counts as finished, so that the
/// checks that load it name what is wrong).
pub fn is_finished(path: &Path) -> bool {
    #[derive(Deserialize)]
    struct Status {
        status: Option<RunStatus>,
    }
    let found = match locate(path) {
        Ok(Some(p)) => p,
        Ok(None) => return false,
        Err(_) => return true,
    };
    read_text(&found)
        .ok()
        .and_then(|text| serde_json::from_str::<Status>(&text).ok())
        .and_then(|s| s.status)
        != Some(RunStatus::Interrupted)
}

/// Load the run report at `path`, full or compact (a `.json` name is
/// looked up in both forms, [`locate`]); a missing or renamed key is an
/// error naming the file and the key path.
pub fn load(path: &Path) -> Result<RunReport> {
    let found = locate(path)?.unwrap_or_else(|| path.to_path_buf());
    let text = read_text(&found)?;
    RunReport::from_json(&text).with_context(|| format!("run report {}", found.display()))
}

impl RunReport {
    /// This report with its trace in block form ([`BlockTrace`]); every
    /// other field as it is.
    pub fn compacted(&self) -> RunReport {
        RunReport {
            trace: Trace::Blocks(self.trace.blocks()),
            ..self.clone()
        }
    }

    /// The bytes of a compact run report file: this report with its trace
    /// in block form, as JSON, gzip-compressed (best compression, no file
    /// name or time in the gzip header, so the same report gives the same
    /// bytes).
    pub fn compact_bytes(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(&self.compacted())?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&json)?;
        Ok(gz.finish()?)
    }

    /// Read a report from the bytes of a compact file
    /// ([`compact_bytes`](Self::compact_bytes)).
    pub fn from_compact_bytes(bytes: &[u8]) -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .context("cannot decompress the compact report")?;
        RunReport::from_json(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build inside git records its commit and whether its code had
    /// uncommitted changes; a report written before `git_dirty` existed
    /// reads with none and writes back without it.
    #[test]
    fn provenance_says_whether_the_tree_was_dirty() {
        let p = Provenance::here("torch");
        if p.git_commit != "unknown" {
            assert!(p.git_dirty.is_some(), "{p:?}");
        }
        let old = r#"{"avi_version":"0.1.0","engine":"fused","git_commit":"abc"}"#;
        let q: Provenance = serde_json::from_str(old).unwrap();
        assert_eq!(q.git_dirty, None);
        assert_eq!(serde_json::to_string(&q).unwrap(), old);
        let dirty = Provenance {
            git_dirty: Some(true),
            ..q
        };
        assert!(serde_json::to_string(&dirty)
            .unwrap()
            .ends_with(r#""git_commit":"abc","git_dirty":true}"#));
    }

    /// A full trace of `len` noisy entries rising towards -100.
    fn trace(len: usize) -> TraceSection {
        let elbo = (0..len)
            .map(|i| -100.0 - 500.0 * (-(i as f64) / 40.0).exp() + 0.3 * ((i * 7919) % 13) as f64)
            .collect();
        TraceSection {
            elbo,
            iteration: (1..=len).collect(),
            seconds: (0..len)
                .map(|i| 0.001 * (i + 1) as f64 + 1e-7 * i as f64)
                .collect(),
            clock: Some(avi_inference::Clock::Step),
        }
    }

    /// The block metrics agree with the step definitions they replace: the
    /// final window with the mean of the last `2 · half` entries (relative
    /// 1e-12: the sums are taken in a different order, each step rounding
    /// by ≤ 1e-16 relative on values of one sign), exactly when `2 · half`
    /// is a multiple of 10 and the length too; the convergence index with
    /// `first_within` on the full trace (equal indices: the two window
    /// means differ by rounding only, and no window of this trace lies that
    /// close to the tolerance's edge).
    #[test]
    fn block_metrics_match_the_step_definitions() {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        for len in [0, 7, 10, 300, 305, 1003] {
            let t = trace(len);
            let b = BlockTrace::from_full(&t);
            b.check().unwrap();
            assert_eq!(
                (b.length, b.elbo.len(), b.tail.elbo.len()),
                (len, len / 10, len % 10)
            );
            for half in [1, 5, 7, 50, 250] {
                let got = b.final_window(half);
                if len == 0 {
                    assert!(got.is_nan());
                    continue;
                }
                let r = len % 10;
                // Whole blocks rounded up, the tail always in.
                let k = (2 * half).saturating_sub(r).div_ceil(10).min(len / 10);
                let want = mean(&t.elbo[len - (10 * k + r)..]);
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs(),
                    "len {len} half {half}: {got} vs {want}"
                );
                if r == 0 && half % 5 == 0 && 2 * half <= len {
                    let step = mean(&t.elbo[len - 2 * half..]);
                    assert!((got - step).abs() <= 1e-12 * step.abs());
                }
            }
            for target in [-100.5, -101.0, -110.0, -99.0] {
                let c = b.first_within(target, 0.01);
                assert_eq!(
                    c,
                    avi_inference::convergence::first_within(&t.elbo, target, 0.01, 10),
                    "len {len} target {target}"
                );
                if let Some(c) = c {
                    assert_eq!(b.seconds_at(c), Some(t.seconds[c]));
                }
            }
        }
        // A trace that never gets there, and a non-finite window.
        let mut t = trace(300);
        assert_eq!(BlockTrace::from_full(&t).first_within(-50.0, 0.01), None);
        for v in &mut t.elbo[..200] {
            *v = -100.0;
        }
        t.elbo[15] = f64::NAN;
        let b = BlockTrace::from_full(&t);
        assert!(b.elbo[1].is_nan());
        // The window at c = 20 (blocks 1 and 2) holds the NaN: the first
        // window within tolerance is c = 30.
        assert_eq!(b.first_within(-100.0, 0.01), Some(30));
    }

    /// A compact report reads back to the same values, bit for bit (the
    /// block means and every other number), and its bytes are the same
    /// each time.
    #[test]
    fn compact_reports_round_trip_exactly() {
        let text = format!(
            r#"{{"config": {{}}, "device": "cpu", "elbo": -100.12345678901234, "elbo_se": 0.1,
                "iterations": 305, "method": {{}}, "model": {{}}, "n": 1, "num_parameters": 1,
                "q_theta": null, "q_z": null, "seconds": 0.30503, "status": "ok",
                "trace": {}}}"#,
            serde_json::to_string(&trace(305)).unwrap()
        );
        let full = RunReport::from_json(&text).unwrap();
        let bytes = full.compact_bytes().unwrap();
        assert_eq!(bytes, full.compact_bytes().unwrap());
        let back = RunReport::from_compact_bytes(&bytes).unwrap();
        assert_eq!(back, full.compacted());
        assert_eq!(back.trace.blocks(), full.trace.blocks());
        assert_eq!(back.trace.len(), 305);
        assert!(back.trace.full().is_none());
        // Written again, the compact report is unchanged.
        assert_eq!(back.compact_bytes().unwrap(), bytes);
        // A compact trace whose parts disagree is refused, naming `trace`.
        let mut v: Value = serde_json::from_str(&serde_json::to_string(&back).unwrap()).unwrap();
        v["trace"]["length"] = 306.into();
        let err = format!("{:#}", RunReport::from_json(&v.to_string()).unwrap_err());
        assert!(err.contains("trace") && err.contains("length"), "{err}");
    }

    /// A run stored in both forms is an error naming both files; either
    /// form alone is found from the `.json` name.
    #[test]
    fn a_run_is_read_from_either_form_and_not_from_both() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("fvi-1.json");
        let gz = compact_path(&json);
        assert_eq!(gz, dir.path().join("fvi-1.json.gz"));
        assert_eq!(locate(&json).unwrap(), None);
        assert!(!is_finished(&json));
        std::fs::write(&gz, b"x").unwrap();
        assert_eq!(locate(&json).unwrap(), Some(gz.clone()));
        std::fs::write(&json, b"x").unwrap();
        let err = format!("{:#}", load(&json).unwrap_err());
        assert!(
            err.contains("fvi-1.json ") && err.contains("fvi-1.json.gz"),
            "{err}"
        );
        // Counted as finished, so that loading it names the problem.
        assert!(is_finished(&json));
        std::fs::remove_file(&gz).unwrap();
        assert_eq!(locate(&json).unwrap(), Some(json));
    }

    #[test]
    fn values_round_trip_with_nulls() {
        let flat: Values = serde_json::from_str("[1.0, null, 2]").unwrap();
        let Values::Flat(v) = &flat else {
            panic!("flat expected")
        };
        assert!(v[1].is_nan());
        assert_eq!(serde_json::to_string(&flat).unwrap(), "[1.0,null,2.0]");
        let rows: Values = serde_json::from_str("[[1.0, null], [2, 3]]").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            serde_json::to_string(&rows).unwrap(),
            "[[1.0,null],[2.0,3.0]]"
        );
        assert!(serde_json::from_str::<Values>("[1.0, [2.0]]").is_err());
        assert_eq!(
            Values::from_rows(&[1.0, 2.0], 1),
            Values::Flat(vec![1.0, 2.0])
        );
    }
}
