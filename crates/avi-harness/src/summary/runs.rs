//! The stored runs of an experiment, as a summary reads them, and the
//! small statistics over them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use avi_inference::{FunctionConfig, MethodConfig};
use serde_json::{json, Value};

use crate::experiment::{file_stem, Experiment};
use crate::run_report::{MseTrace, RunReport, RunStatus};

/// One stored run.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) label: String,
    pub(super) seed: u64,
    /// Where the report was read from (named in errors).
    pub(super) path: PathBuf,
    pub(super) report: RunReport,
}

impl Run {
    pub(super) fn elbo(&self) -> &[f64] {
        &self.report.trace.elbo
    }

    pub(super) fn seconds(&self) -> &[f64] {
        &self.report.trace.seconds
    }

    pub(super) fn ok(&self) -> bool {
        self.report.effective_status() == RunStatus::Ok
    }

    /// The MSE section of a run of an experiment that monitors it.
    pub(super) fn mse(&self) -> Result<&MseTrace> {
        self.report.mse.as_ref().with_context(|| {
            format!(
                "run report {}: the experiment monitors the MSE but the report has no `mse`",
                self.path.display()
            )
        })
    }
}

/// Test-set MSEs, NaN where there is none.
pub(super) fn test_mse(m: &MseTrace) -> Vec<f64> {
    m.test.iter().map(|v| v.unwrap_or(f64::NAN)).collect()
}

pub(super) fn stats(values: &[f64]) -> Value {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    json!({ "median": median_sorted(&v), "min": v[0], "max": v[v.len() - 1] })
}

pub(super) fn median_sorted(v: &[f64]) -> f64 {
    if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        0.5 * (v[v.len() / 2 - 1] + v[v.len() / 2])
    }
}

/// Median where `None` ("never") counts as +∞; `None` when half or more
/// never converged.
pub(super) fn median_never(values: &[Option<f64>]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values.iter().map(|x| x.unwrap_or(f64::INFINITY)).collect();
    v.sort_by(f64::total_cmp);
    let m = median_sorted(&v);
    m.is_finite().then_some(m)
}

pub(super) fn width_of(method: &MethodConfig) -> Option<usize> {
    match method {
        MethodConfig::Avi {
            function: FunctionConfig::Mlp { width, .. },
            ..
        } => Some(*width),
        _ => None,
    }
}

pub(super) fn window_of(method: &MethodConfig) -> Option<usize> {
    match method {
        MethodConfig::Avi { window, .. } => Some(window[0] + window[1] + 1),
        _ => None,
    }
}

pub(super) fn load_runs(dir: &Path, exp: &Experiment) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for m in &exp.methods {
        for &seed in &exp.seeds {
            let path = dir
                .join("runs")
                .join(format!("{}-{seed}.json", file_stem(&m.label)));
            if !path.is_file() {
                continue;
            }
            let report = crate::run_report::load(&path)?;
            if !report.finished() {
                // Interrupted part-way: missing, not a result.
                continue;
            }
            runs.push(Run {
                label: m.label.clone(),
                seed,
                path,
                report,
            });
        }
    }
    if runs.is_empty() {
        bail!("{}: no run reports in runs/", dir.display());
    }
    Ok(runs)
}

pub(super) fn final_window(trace: &[f64], half: usize) -> f64 {
    let k = trace.len().min(2 * half).max(1);
    let tail = &trace[trace.len().saturating_sub(k)..];
    if tail.is_empty() {
        return f64::NAN;
    }
    tail.iter().sum::<f64>() / tail.len() as f64
}

/// `v` with `digits` decimals, or in scientific notation (4 significant
/// digits) from 10⁹ on, where diverged runs land (up to 10³⁰⁸: written out
/// in full they are hundreds of digits wide).
pub(super) fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".into(), |v| {
        if v.abs() >= 1e9 {
            format!("{v:.3e}")
        } else {
            format!("{v:.digits$}")
        }
    })
}
