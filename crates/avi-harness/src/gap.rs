//! `avi gap`: the split of a saved fit's gap to `log p(x | θ)` into the
//! approximation gap and the amortization gap (see [`avi_inference::gap`]),
//! on the fit's own training data, written as a JSON report.
//!
//! The training data come from a data file (`--data`, as `avi encode`
//! reads it, with the saved model) or from the fit's config (`--config`);
//! either way their SHA-256 must be the one recorded in the saved fit.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use avi_inference::{Expect, Fitted, GapOptions, GapSplit};
use serde::Serialize;
use tch::Device;

use crate::config::FitConfig;
use crate::fitted::model_value;
use crate::report::write_json_atomic;
use crate::run::{check_output, data_tensor, device_name, prepare};
use crate::run_report::Provenance;

/// Where `avi gap` finds the fit's training data.
#[derive(Debug, Clone)]
pub enum GapData {
    /// A data file (or a JSON file holding a config `data` block).
    File(PathBuf),
    /// The config the fit was made with.
    Config(PathBuf),
}

/// The arguments of `avi gap`.
#[derive(Debug, Clone)]
pub struct GapArgs {
    /// The saved fit's folder.
    pub fitted: PathBuf,
    /// The training data.
    pub data: GapData,
    /// The report's path.
    pub out: PathBuf,
    /// The device.
    pub device: Device,
    /// Draws, refinement, IW samples, seed.
    pub options: GapOptions,
}

/// The report of `avi gap`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GapReport {
    /// The saved fit's folder, as given.
    pub fitted: String,
    /// The data's (or config's) file, as given.
    pub data: String,
    /// The model's name.
    pub model: String,
    /// The saved model configuration.
    pub model_config: serde_json::Value,
    /// The saved method's label.
    pub method: String,
    /// The device.
    pub device: String,
    /// The decomposition, in words.
    pub decomposition: String,
    /// How each standard error is computed, in words.
    pub standard_errors: String,
    /// The split.
    pub split: GapSplit,
    /// Concerns, in words (empty when none).
    pub warnings: Vec<String>,
    /// Who wrote it.
    pub provenance: Provenance,
}

/// The decomposition, as written in the report.
pub const DECOMPOSITION: &str = "log p(x | θ) − ELBO(fitted) = approximation gap \
     [log p(x | θ) − ELBO(F-VI optimum)] + amortization gap [ELBO(F-VI optimum) − \
     ELBO(fitted)]; every ELBO is E_q[log p(x, z | θ) − log q(z)] at the one θ (Cremer et al. \
     2018); the F-VI optimum is the fitted factors refined by F-VI steps with θ held";

/// How the standard errors are computed, as written in the report.
pub const STANDARD_ERRORS: &str = "ELBO: sd of the M per-draw estimates / √M; amortization \
     gap: the same for the per-draw differences (both ELBOs use the same draws); approximation \
     and total gaps: the ELBO's SE, combined as √(a² + b²) with the importance-weighted \
     log p(x | θ)'s SE (delta method, summed over n) when it is not by quadrature (quadrature: \
     0, its doubling error estimate reported)";

fn read_config(path: &Path) -> Result<(FitConfig, PathBuf)> {
    let text = crate::config::read_json_text(path, "config")?;
    let cfg = FitConfig::parse(&text).with_context(|| format!("config {}", path.display()))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    Ok((cfg, dir))
}

/// Run `avi gap`.
pub fn gap_command(args: &GapArgs) -> Result<()> {
    let manifest = Fitted::manifest(&args.fitted)?;
    let source = match &args.data {
        GapData::File(p) | GapData::Config(p) => p.clone(),
    };
    let inputs = vec![
        source.clone(),
        args.fitted.join(avi_inference::MANIFEST_FILE),
        args.fitted.join(avi_inference::STATE_FILE),
    ];
    check_output(&args.out, &inputs)?;
    if !source.exists() {
        bail!("{} does not exist", source.display());
    }
    let (cfg, here) = match &args.data {
        GapData::File(p) => crate::encode::data_config(&manifest, p)?,
        GapData::Config(p) => read_config(p)?,
    };
    let prepared = prepare(&cfg, &here).with_context(|| format!("data {}", source.display()))?;
    let model = prepared.model.as_model();
    let x = data_tensor(&prepared);
    let model_config = match &args.data {
        GapData::File(_) => manifest.model_config.clone(),
        GapData::Config(_) => model_value(&cfg)?,
    };
    let expect = Expect {
        model,
        model_config: Some(&model_config),
        method: Some(&manifest.method),
        data: Some(&x),
    };
    let fitted = Fitted::load(&args.fitted, &expect, args.device)
        .with_context(|| format!("--fitted {}", args.fitted.display()))?;
    let split = avi_inference::gap(model, &fitted.variational, &x, &args.options)
        .with_context(|| format!("the gap split of {}", args.fitted.display()))?;
    let mut warnings = Vec::new();
    if split.theta_source != "fixed" {
        warnings.push(
            "θ was learnt by the fit: the split is at the mean of q(θ), not of the fit's own \
             ELBO"
                .to_string(),
        );
    }
    if let Some(c) = &split.refinement.convergence {
        if !c.converged {
            warnings.push(format!(
                "the F-VI refinement was still rising at the end ({:.3} ± {:.3} nats per 1,000 \
                 steps): the approximation gap is overstated and the amortization gap \
                 understated",
                c.rise_per_1000_steps, c.rise_se
            ));
        }
    }
    if split.refinement.status != avi_inference::FitStatus::Ok {
        warnings.push(format!(
            "the refinement ended {:?}",
            split.refinement.status
        ));
    }
    if let avi_inference::Marginal::ImportanceWeighted(iw) = &split.marginal {
        if iw.min_ess < 10.0 {
            warnings.push(format!(
                "the importance weights' smallest effective sample size is {:.1}: \
                 log p(x | θ) and its SE are unreliable (raise --iw-samples)",
                iw.min_ess
            ));
        }
    }
    let values = split.n * prepared.model.as_model().observation_dim();
    for (name, e) in [
        ("fitted family's", &split.elbo_fitted),
        ("F-VI optimum's", &split.elbo_fvi),
    ] {
        let se_limit = avi_inference::SE_WARN_REL * e.value.abs() + avi_inference::SE_WARN_NATS;
        if e.se > se_limit {
            warnings.push(format!(
                "the {name} ELBO {:.6e} has a Monte Carlo standard error of {:.3e}, more than \
                 {} of its size + {} nats: a few draws dominate the estimate",
                e.value,
                e.se,
                avi_inference::SE_WARN_REL,
                avi_inference::SE_WARN_NATS
            ));
        }
        if e.value < -avi_inference::ELBO_WARN_PER_VALUE * values as f64 {
            warnings.push(format!(
                "the {name} ELBO {:.6e} is below −{} nats per observed value: a parameter has \
                 run off, and the split says little",
                e.value,
                avi_inference::ELBO_WARN_PER_VALUE
            ));
        }
    }
    if split.approximation_gap.value < -3.0 * split.approximation_gap.se {
        warnings.push(format!(
            "the approximation gap is negative ({:.3} ± {:.3}): log p(x | θ) is understated",
            split.approximation_gap.value, split.approximation_gap.se
        ));
    }
    let report = GapReport {
        fitted: args.fitted.display().to_string(),
        data: source.display().to_string(),
        model: manifest.model.clone(),
        model_config: manifest.model_config.clone(),
        method: manifest.method.label(),
        device: device_name(args.device),
        decomposition: DECOMPOSITION.to_string(),
        standard_errors: STANDARD_ERRORS.to_string(),
        split,
        warnings,
        provenance: Provenance::here("torch"),
    };
    for w in &report.warnings {
        eprintln!("avi: warning: {w}");
    }
    write_json_atomic(&args.out, &report)?;
    Ok(())
}
