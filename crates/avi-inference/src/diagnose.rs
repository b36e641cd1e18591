//! The paper's §5 diagnostic for amortized solutions (digest §6).
//!
//! Since Q_A ⊂ Q_F, an A-VI solution is a point of the F-VI family. Run F-VI
//! from it: if the ELBO rises beyond Monte Carlo error, the inference
//! function was not expressive enough (an amortization gap) or the optimiser
//! stopped early. The F-VI gradient norm at the A-VI solution is reported
//! too (the authors' unreported `fvi_diagnose` variant).

use avi_models::Model;
use tch::{Kind, Tensor};

use crate::elbo::{elbo_draws, evaluate_elbo};
use crate::engine::torch::Trainer;
use crate::limits::{available_memory, check_fit_within};
use crate::options::{FitOptions, MAX_DRAWS, MAX_STEPS};
use crate::result::Fit;
use crate::{InferenceError, MethodConfig, Result};

/// The outcome of [`diagnose`].
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    /// ELBO of the amortized solution (from the fit, `eval_draws` draws).
    pub amortized_elbo: f64,
    /// Its standard error.
    pub amortized_se: f64,
    /// ELBO after `fvi_steps` F-VI steps started at the amortized solution.
    pub refined_elbo: f64,
    /// Its standard error.
    pub refined_se: f64,
    /// `refined_elbo − amortized_elbo`.
    pub gain: f64,
    /// Standard error of the gain (independent draws).
    pub gain_se: f64,
    /// Euclidean norm of the F-VI ELBO gradient (all free parameters) at the
    /// amortized solution, from `gradient_draws` draws.
    pub gradient_norm: f64,
    /// F-VI steps taken.
    pub fvi_steps: usize,
}

/// Run the diagnostic on a finished fit: `x` is the data (any device), `opts`
/// the fit's options (their learning rate is used for the F-VI steps).
pub fn diagnose(
    model: &dyn Model,
    fit: &Fit,
    x: &Tensor,
    opts: &FitOptions,
    fvi_steps: usize,
    gradient_draws: usize,
) -> Result<Diagnosis> {
    if gradient_draws == 0 || gradient_draws > MAX_DRAWS {
        return Err(InferenceError::config(
            "gradient_draws",
            format!("{gradient_draws} must be in 1..={MAX_DRAWS}"),
        ));
    }
    if fvi_steps > MAX_STEPS {
        return Err(InferenceError::config(
            "fvi_steps",
            format!("{fvi_steps} is more than the largest supported, {MAX_STEPS}"),
        ));
    }
    // The F-VI copy of the solution and its steps (with the larger of the
    // two draw counts) must fit beside the fit, before allocating them.
    let device = fit.variational.vs.device();
    let refine = FitOptions {
        draws: opts.draws.max(gradient_draws),
        steps: fvi_steps,
        batch_size: None,
        // Exactly `fvi_steps`: the diagnostic's gain is over a fixed run.
        stop: None,
        ..opts.clone()
    };
    check_fit_within(
        model,
        fit.variational.n,
        &MethodConfig::Fvi,
        &refine,
        available_memory(device),
    )?;
    let start = fit.variational.to_free();
    let x = x.to_device(start.vs.device()).to_kind(opts.dtype.kind());
    // F-VI gradient at the amortized solution.
    let mut params = start.vs.trainable_variables();
    for p in &mut params {
        p.zero_grad();
    }
    elbo_draws(model, &start, &x, gradient_draws, opts.entropy)?
        .mean(opts.dtype.kind())
        .backward();
    let sq: Vec<Tensor> = params
        .iter()
        .filter(|p| p.grad().defined())
        .map(|p| p.grad().to_kind(Kind::Double).square().sum(Kind::Double))
        .collect();
    let gradient_norm = if sq.is_empty() {
        0.0
    } else {
        Tensor::stack(&sq, 0)
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[])
    };
    for p in &mut params {
        p.zero_grad();
    }
    let mut trainer = Trainer::from_variational(model, &x, start, opts)?;
    for _ in 0..fvi_steps {
        let _elbo = trainer.step()?;
    }
    let refined = trainer.into_variational()?;
    let (refined_elbo, refined_se) =
        evaluate_elbo(model, &refined, &x, opts.eval_draws, opts.entropy)?;
    Ok(Diagnosis {
        amortized_elbo: fit.elbo,
        amortized_se: fit.elbo_se,
        refined_elbo,
        refined_se,
        gain: refined_elbo - fit.elbo,
        gain_se: (refined_se.powi(2) + fit.elbo_se.powi(2)).sqrt(),
        gradient_norm,
        fvi_steps,
    })
}
