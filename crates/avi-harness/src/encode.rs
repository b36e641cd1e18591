//! `avi encode`: new data through a saved fit's inference function (see
//! [`avi_inference::encode`]), written as a JSON report with the fit
//! report's shapes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use avi_inference::{EncodeOptions, Encoded, Expect, Fitted, GaussianSummary, HELDOUT_EXCLUDES};
use serde::Serialize;
use tch::Device;

use crate::config::{read_json_text, FitConfig};
use crate::report::write_json_atomic;
use crate::run::{check_output, data_tensor, device_name, prepare};
use crate::run_report::{Gaussian, Provenance, QTheta, Values, QZ};

/// The arguments of `avi encode`.
#[derive(Debug, Clone)]
pub struct EncodeArgs {
    /// The saved fit's folder.
    pub fitted: PathBuf,
    /// The new data: a data file (JSON `{"x": …}`, CSV, .npy) or a JSON
    /// file holding a config `data` block (`{"data": {…}}`).
    pub data: PathBuf,
    /// The report's path.
    pub out: PathBuf,
    /// The device.
    pub device: Device,
    /// Draws, seed and refinement.
    pub options: EncodeOptions,
}

/// The refinement's settings and status in a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefineSection {
    /// F-VI steps asked for.
    pub steps: usize,
    /// Steps taken.
    pub iterations: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Draws per step.
    pub draws: usize,
    /// `ok` or `diverged`.
    pub status: String,
}

/// The report of `avi encode`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EncodeReport {
    /// The saved fit's folder, as given.
    pub fitted: String,
    /// The new data's file, as given.
    pub data: String,
    /// The model's name.
    pub model: String,
    /// The saved method's label.
    pub method: String,
    /// The device.
    pub device: String,
    /// N' of the new data.
    pub n: usize,
    /// Monte Carlo draws of the held-out ELBO.
    pub draws: usize,
    /// Seed of the draws.
    pub seed: u64,
    /// q(θ) as fitted (`null` when θ was fixed).
    pub q_theta: Option<QTheta>,
    /// q(z'_n) of every new observation.
    pub q_z: QZ,
    /// The held-out ELBO of the new data.
    pub heldout_elbo: Option<f64>,
    /// Its Monte Carlo standard error.
    pub heldout_elbo_se: Option<f64>,
    /// What the held-out ELBO leaves out.
    pub heldout_elbo_excludes: String,
    /// New observations outside the training data's range.
    pub outside_training_range: avi_inference::OutsideRange,
    /// The refinement, with `--refine`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refine: Option<RefineSection>,
    /// The refined held-out ELBO.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refined_heldout_elbo: Option<f64>,
    /// Its standard error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refined_heldout_elbo_se: Option<f64>,
    /// Refined minus amortized held-out ELBO (same draws): the
    /// amortization gap on the new data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_gap: Option<f64>,
    /// Its Monte Carlo standard error (from the per-draw differences).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_gap_se: Option<f64>,
    /// q(z'_n) after refinement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refined_q_z: Option<QZ>,
    /// Non-finite estimates, in words (empty when all are finite).
    pub warnings: Vec<String>,
    /// Who wrote it.
    pub provenance: Provenance,
}

fn gaussian(s: &GaussianSummary) -> Gaussian {
    let width = if s.shape.len() > 1 { s.shape[1] } else { 1 };
    Gaussian {
        mean: Values::from_rows(&s.mean, width),
        sd: Values::from_rows(&s.sd, width),
    }
}

fn q_z(q: &Option<GaussianSummary>, probs: &Option<Vec<f64>>, states: usize) -> QZ {
    match (q, probs) {
        (Some(q), _) => QZ::Gaussian(gaussian(q)),
        (None, Some(p)) => QZ::Probs {
            probs: Values::from_rows(p, states),
        },
        (None, None) => QZ::Probs {
            probs: Values::Flat(vec![]),
        },
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The new data of `avi encode` as a config for the saved model and method
/// (so that every data source of a config, simulation included, works).
pub(crate) fn data_config(
    manifest: &avi_inference::Manifest,
    data: &Path,
) -> Result<(FitConfig, PathBuf)> {
    let here = data
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file = data
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let block = if data.extension().is_some_and(|e| e == "json") {
        let text = read_json_text(data, "data")?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("data {}: not valid JSON", data.display()))?;
        match v.get("data") {
            Some(block) if v.get("x").is_none() => block.clone(),
            _ => serde_json::json!({"file": file}),
        }
    } else {
        serde_json::json!({"file": file})
    };
    let cfg = serde_json::json!({
        "model": manifest.model_config,
        "data": block,
        "method": manifest.method,
        "dtype": manifest.dtype,
    });
    let cfg = FitConfig::parse(&cfg.to_string()).with_context(|| {
        format!(
            "data {} with the saved model {}",
            data.display(),
            manifest.model_config
        )
    })?;
    Ok((cfg, here))
}

/// Run `avi encode`.
pub fn encode_command(args: &EncodeArgs) -> Result<()> {
    let manifest = Fitted::manifest(&args.fitted)?;
    let inputs = vec![
        args.data.clone(),
        args.fitted.join(avi_inference::MANIFEST_FILE),
        args.fitted.join(avi_inference::STATE_FILE),
    ];
    check_output(&args.out, &inputs)?;
    if !args.data.exists() {
        bail!("data {} does not exist", args.data.display());
    }
    let (cfg, here) = data_config(&manifest, &args.data)?;
    let prepared = prepare(&cfg, &here).with_context(|| format!("data {}", args.data.display()))?;
    let model = prepared.model.as_model();
    let expect = Expect {
        model_config: Some(&manifest.model_config),
        ..Expect::model(model)
    };
    let fitted = Fitted::load(&args.fitted, &expect, args.device)?;
    let x = data_tensor(&prepared);
    let e: Encoded = avi_inference::encode(model, &fitted, &x, &args.options)
        .with_context(|| format!("data {}", args.data.display()))?;
    let states = match manifest.output {
        avi_inference::OutputLayout::Gaussian { .. } => 1,
        avi_inference::OutputLayout::Categorical { states } => states,
    };
    let mut warnings = Vec::new();
    if !e.heldout_elbo.is_finite() {
        warnings.push(format!(
            "the held-out ELBO is not finite ({})",
            e.heldout_elbo
        ));
    }
    let refined = e.refined.as_ref();
    if let Some(r) = refined {
        if !r.heldout_elbo.is_finite() {
            warnings.push(format!(
                "the refined held-out ELBO is not finite ({})",
                r.heldout_elbo
            ));
        }
    }
    let report = EncodeReport {
        fitted: args.fitted.display().to_string(),
        data: args.data.display().to_string(),
        model: manifest.model.clone(),
        method: manifest.method.label(),
        device: device_name(args.device),
        n: e.n,
        draws: e.draws,
        seed: args.options.seed,
        q_theta: e.q_theta.as_ref().map(|q| QTheta::Gaussian(gaussian(q))),
        q_z: q_z(&e.q_z, &e.q_z_probs, states),
        heldout_elbo: finite(e.heldout_elbo),
        heldout_elbo_se: finite(e.heldout_elbo_se),
        heldout_elbo_excludes: HELDOUT_EXCLUDES.to_string(),
        outside_training_range: e.outside_training_range.clone(),
        refine: refined.map(|r| RefineSection {
            steps: args.options.refine_steps,
            iterations: r.steps,
            lr: args.options.refine_lr,
            draws: args.options.refine_draws,
            status: match r.status {
                avi_inference::FitStatus::Ok => "ok".into(),
                avi_inference::FitStatus::Diverged { at } => format!("diverged at {at}"),
                avi_inference::FitStatus::Interrupted { at } => format!("interrupted at {at}"),
            },
        }),
        refined_heldout_elbo: refined.and_then(|r| finite(r.heldout_elbo)),
        refined_heldout_elbo_se: refined.and_then(|r| finite(r.heldout_elbo_se)),
        heldout_gap: refined.and_then(|r| finite(r.heldout_gap)),
        heldout_gap_se: refined.and_then(|r| finite(r.heldout_gap_se)),
        refined_q_z: refined.map(|r| q_z(&r.q_z, &r.q_z_probs, states)),
        warnings,
        provenance: Provenance::here("torch"),
    };
    for w in &report.warnings {
        eprintln!("avi: warning: {w}");
    }
    write_json_atomic(&args.out, &report)?;
    Ok(())
}
