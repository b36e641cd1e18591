//! The stored runs of an experiment, as a summary reads them, and the
//! small statistics over them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use avi_inference::{FunctionConfig, MethodConfig};
use serde_json::{json, Value};

use crate::experiment::{file_stem, Experiment};
use crate::run_report::{BlockTrace, MseTrace, RunReport, RunStatus};

/// One stored run.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) label: String,
    pub(super) seed: u64,
    /// Where the report was read from (named in errors).
    pub(super) path: PathBuf,
    pub(super) report: RunReport,
    /// Its trace in block form, which every metric reads (full and compact
    /// reports alike).
    pub(super) blocks: BlockTrace,
}

impl Run {
    /// A stored run.
    pub(super) fn new(label: String, seed: u64, path: PathBuf, report: RunReport) -> Self {
        let blocks = report.trace.blocks();
        Run {
            label,
            seed,
            path,
            report,
            blocks,
        }
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

/// The finished runs of `exp` stored in `dir/runs/`, full or compact
/// ([`crate::run_report::locate`]).
pub(super) fn load_runs(dir: &Path, exp: &Experiment) -> Result<Vec<Run>> {
    load_runs_with(dir, exp, &|path| crate::run_report::load(path))
}

/// The finished runs of `exp` in `dir/runs/`, each report read by `read`
/// from the path where it is stored (`avi compact` reads the compact form
/// it is about to write through it).
pub(super) fn load_runs_with(
    dir: &Path,
    exp: &Experiment,
    read: &dyn Fn(&Path) -> Result<RunReport>,
) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for m in &exp.methods {
        for &seed in &exp.seeds {
            let name = dir
                .join("runs")
                .join(format!("{}-{seed}.json", file_stem(&m.label)));
            let Some(path) = crate::run_report::locate(&name)? else {
                continue;
            };
            let report = read(&path)?;
            if !report.finished() {
                // Interrupted part-way: missing, not a result.
                continue;
            }
            runs.push(Run::new(m.label.clone(), seed, path, report));
        }
    }
    if runs.is_empty() {
        bail!("{}: no run reports in runs/", dir.display());
    }
    Ok(runs)
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
