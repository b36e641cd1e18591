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

use std::path::Path;

use anyhow::{anyhow, Context, Result};
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
    /// The ELBO trace.
    pub trace: TraceSection,
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

/// Whether `path` holds the report of a finished run: it exists and its
/// `status` is not `interrupted` (read without the rest of the report; a
/// file that is no report counts as finished, so that the checks that
/// load it name what is wrong).
pub fn is_finished(path: &Path) -> bool {
    #[derive(Deserialize)]
    struct Status {
        status: Option<RunStatus>,
    }
    if !path.is_file() {
        return false;
    }
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Status>(&text).ok())
        .and_then(|s| s.status)
        != Some(RunStatus::Interrupted)
}

/// Load the run report at `path`; a missing or renamed key is an error
/// naming the file and the key path.
pub fn load(path: &Path) -> Result<RunReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    RunReport::from_json(&text).with_context(|| format!("run report {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
