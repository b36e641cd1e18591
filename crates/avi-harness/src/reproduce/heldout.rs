//! The `heldout` block of an experiment ([`crate::experiment::HeldoutEntry`]):
//! after an amortized run, encode a second data set with its fitted
//! inference function and record the held-out ELBO, amortized and refined,
//! in the run report's `heldout` section.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use avi_inference::{Fit, FitStatus, Fitted, MethodConfig, HELDOUT_EXCLUDES};

use crate::experiment::{Experiment, RunSpec};
use crate::fitted::model_value;
use crate::run::{data_tensor, prepare, Prepared};
use crate::run_report::HeldoutSection;

/// Held-out data prepared once per distinct data block.
#[derive(Default)]
pub(super) struct HeldoutData(BTreeMap<String, Prepared>);

/// Whether `run` of `exp` gets a held-out section: the experiment has a
/// `heldout` block and the method has an encoder.
pub(super) fn wanted(exp: &Experiment, run: &RunSpec) -> bool {
    exp.heldout.is_some() && !matches!(run.config.method, MethodConfig::Fvi)
}

/// With `--resume`: a finished amortized run of an experiment with a
/// `heldout` block must carry its held-out section (made with the same
/// held-out data), or the summary would silently lack it.
pub(super) fn check_stored(exp: &Experiment, run: &RunSpec, path: &Path) -> Result<()> {
    let Some(h) = exp.heldout.as_ref().filter(|_| wanted(exp, run)) else {
        return Ok(());
    };
    let report = crate::run_report::load(path)?;
    if report.status != crate::run_report::RunStatus::Ok {
        return Ok(());
    }
    let want = serde_json::to_value(h.data(&run.config.data)?)?;
    match &report.heldout {
        // The rate as configured, read back from JSON exactly.
        Some(s)
            if s.data == want
                && s.draws == h.draws
                && s.refine_lr.to_bits() == h.refine_lr.to_bits() =>
        {
            Ok(())
        }
        Some(_) => anyhow::bail!(
            "{}: its held-out section was made with other held-out settings: it is kept; resume with the definition it was made with, or start with --fresh",
            path.display()
        ),
        None => anyhow::bail!(
            "{}: a finished run without the held-out section this experiment asks for: it is kept; move it away to rerun it, or start with --fresh",
            path.display()
        ),
    }
}

/// Encode the held-out data of `run` with its finished `fit` (a fit of
/// `run.config` on `train`), refine, and return the report's section and
/// the fitted family (for `--save`). A diverged fit gets no section.
pub(super) fn encode_run(
    exp: &Experiment,
    run: &RunSpec,
    train: &Prepared,
    fit: Fit,
    cache: &mut HeldoutData,
) -> Result<(Option<HeldoutSection>, Fitted)> {
    let cfg = &run.config;
    let fitted = Fitted::new(
        train.model.as_model(),
        &cfg.method,
        fit.variational,
        &data_tensor(train),
        model_value(cfg)?,
    )?;
    let Some(h) = exp.heldout.as_ref().filter(|_| fit.status == FitStatus::Ok) else {
        return Ok((None, fitted));
    };
    let data = h.data(&cfg.data)?;
    let key = serde_json::to_string(&(&cfg.model, &data))?;
    if !cache.0.contains_key(&key) {
        let mut hcfg = cfg.clone();
        hcfg.data = data.clone();
        hcfg.mse = None;
        let p = prepare(&hcfg, Path::new(".")).with_context(|| {
            format!(
                "experiment {}, method {}: held-out data",
                exp.name, run.label
            )
        })?;
        cache.0.insert(key.clone(), p);
    }
    let held = &cache.0[&key];
    let opts = h.options(cfg.draws);
    let start = Instant::now();
    let e = avi_inference::encode(held.model.as_model(), &fitted, &data_tensor(held), &opts)
        .with_context(|| format!("experiment {}, method {}: encoding", exp.name, run.label))?;
    let seconds = start.elapsed().as_secs_f64();
    let r = e
        .refined
        .as_ref()
        .context("the held-out refinement did not run (refine_steps is 0)")?;
    Ok((
        Some(HeldoutSection {
            data: serde_json::to_value(&data)?,
            n: e.n,
            draws: e.draws,
            amortized_elbo: e.heldout_elbo,
            amortized_elbo_se: e.heldout_elbo_se,
            refined_elbo: r.heldout_elbo,
            refined_elbo_se: r.heldout_elbo_se,
            gap: r.heldout_gap,
            gap_se: r.heldout_gap_se,
            refine_steps: r.steps,
            refine_lr: opts.refine_lr,
            refine_status: match r.status {
                FitStatus::Ok => "ok".into(),
                FitStatus::Diverged { at } => format!("diverged at {at}"),
                FitStatus::Interrupted { at } => format!("interrupted at {at}"),
            },
            outside_training_range: e.outside_training_range.count,
            elbo_excludes: HELDOUT_EXCLUDES.to_string(),
            seconds,
        }),
        fitted,
    ))
}
