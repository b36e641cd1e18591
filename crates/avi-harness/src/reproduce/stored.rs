//! The runs stored in an experiment folder: listing them, moving them
//! aside (`--fresh`), checking them against the config they would run with
//! now (`--resume`), and slimming a report before it is stored.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::config::{DataConfig, FitConfig, MseConfig};
use crate::run_report::{QTheta, RunReport};

/// The run reports in `runs_dir`: full (`*.json`) and compact
/// (`*.json.gz`).
pub(super) fn finished_reports(runs_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(runs_dir)
        .with_context(|| format!("cannot read {}", runs_dir.display()))?
    {
        let p = entry?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.ends_with(".json") || n.ends_with(".json.gz")) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Move everything in an experiment folder (but earlier `previous-*`
/// folders) into a new `previous-<UTC time>/` in it; returns that folder.
pub(super) fn move_aside(dir: &Path) -> Result<PathBuf> {
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
pub(super) fn check_stored_run(path: &Path, expected: &FitConfig, batch_seeds: bool) -> Result<()> {
    let report = crate::run_report::load(path).with_context(|| {
        format!(
            "{} is not a run report (move it away or start with --fresh)",
            path.display()
        )
    })?;
    let stored: FitConfig = serde_json::from_value(report.config.clone()).with_context(|| {
        format!(
            "{}: its `config` cannot be read (move it away or start with --fresh)",
            path.display()
        )
    })?;
    let mut want = expected.clone();
    if batch_seeds && report.batched_seeds.is_some() {
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
pub(super) fn comparable(cfg: &FitConfig) -> Result<Value> {
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
pub(super) fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
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

/// Largest q(θ) kept in an experiment's run reports (the BNN's 283,920
/// means and sds would make each report ≈ 10 MB).
pub(super) const MAX_STORED_THETA: usize = 1000;

/// Drop a large q(θ) from a run report; true when something was dropped.
pub(super) fn slim(report: &mut RunReport) -> bool {
    let len = match &report.q_theta {
        Some(QTheta::Gaussian(g)) => g.mean.len(),
        _ => 0,
    };
    if len > MAX_STORED_THETA {
        report.q_theta = Some(QTheta::Omitted {
            omitted: format!("{len} values; fit the run's config with avi fit to get them"),
        });
        true
    } else {
        false
    }
}
