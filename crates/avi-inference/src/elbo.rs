//! Monte Carlo ELBO estimators: the draw-wise terms a step
//! differentiates and the final evaluation on fresh draws.

use avi_models::{Model, HALF_LN_2PI};
use tch::{Device, Kind, Tensor};

use crate::function::Output;
use crate::method::{ThetaFactor, Variational};
use crate::options::Entropy;
use crate::rng::Draws;
use crate::Result;

/// Draw-wise ELBO terms for one step: `elbo[m] = log p(θ_m, z_m, x) −
/// log q(θ_m, z_m)` (or the analytic entropy in place of `−log q`), shape
/// `[M]`. For discrete local latents the expectation over q(z) is exact
/// (enumeration inside [`Model::expected_log_joint`]) and the entropy of q(z)
/// is exact; only θ is drawn.
pub fn elbo_draws(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
) -> Result<Tensor> {
    elbo_draws_batch(model, var, x, draws, entropy, None)
}

/// [`elbo_draws`] with the likelihood restricted to a mini-batch `(indices,
/// scale)` (see [`Model::log_joint_batch`]); `None` uses all observations.
pub fn elbo_draws_batch(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
    batch: Option<(&Tensor, f64)>,
) -> Result<Tensor> {
    draws_from(model, var, x, draws, entropy, batch, &Draws::Default)
}

/// [`elbo_draws_batch`] with the standard normals from `rng`.
pub(crate) fn draws_from(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
    batch: Option<(&Tensor, f64)>,
    rng: &Draws,
) -> Result<Tensor> {
    draws_at(
        model,
        var,
        &var.local_raw(),
        true,
        x,
        draws,
        entropy,
        batch,
        rng,
    )
}

/// [`draws_from`] with the local factors' raw `[N, W]` rows `local` in
/// place of the family's (semi-amortized refinement); with `theta_grad`
/// false, q(θ)'s parameters enter detached (no gradient reaches them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn draws_at(
    model: &dyn Model,
    var: &Variational,
    local: &Tensor,
    theta_grad: bool,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
    batch: Option<(&Tensor, f64)>,
    rng: &Draws,
) -> Result<Tensor> {
    let kind = x.kind();
    let device = x.device();
    let m = draws as i64;
    let (theta, theta_neg_log_q) = theta_draws(var, theta_grad, m, kind, device, entropy, rng)?;
    let local = match var.output {
        Output::Categorical { .. } => {
            let log_probs = local.log_softmax(1, local.kind());
            let expected = model.expected_log_joint(&theta, &log_probs, x)?;
            let h_z = -(log_probs.exp() * &log_probs).sum(kind);
            expected + h_z
        }
        Output::Gaussian { .. } | Output::Markov => {
            let eps_z = rng.randn(&[m, var.n as i64, var.local_dim as i64], kind, device)?;
            // z and Σ log sd: the map ε ↦ z is triangular with diagonal sd
            // for both families, so −log q has the same form.
            let (z, sum_log_sd) = if var.output == Output::Markov {
                crate::markov::sample(local, &eps_z)
            } else {
                let local = var.output.gaussian(local);
                (local.sample(&eps_z), local.sum_log_sd())
            };
            let log_p = match batch {
                None => model.log_joint(&theta, &z, x)?,
                Some((idx, scale)) => model.log_joint_batch(&theta, &z, x, idx, scale)?,
            };
            let dims = (var.n * var.local_dim) as f64;
            log_p + gaussian_neg_log_q(entropy, &eps_z, &[1, 2], sum_log_sd, dims)
        }
    };
    Ok(match theta_neg_log_q {
        Some(t) => local + t,
        // θ known: the target is p(z, x | θ), so log p(θ) is left out and the
        // ELBO bounds log p(x | θ).
        None => local - model.log_prior(&theta)?,
    })
}

/// M draws of θ from q(θ) (with `theta_grad` false, its parameters enter
/// detached) and −log q(θ) per draw (or its analytic expectation), `None`
/// where θ is fixed (then `theta` is the fixed value repeated M times).
fn theta_draws(
    var: &Variational,
    theta_grad: bool,
    m: i64,
    kind: Kind,
    device: Device,
    entropy: Entropy,
    rng: &Draws,
) -> Result<(Tensor, Option<Tensor>)> {
    Ok(match &var.theta {
        ThetaFactor::Free(q) => {
            let held;
            let q = if theta_grad {
                q
            } else {
                held = crate::family::GaussianParams {
                    mean: q.mean.detach(),
                    log_sd: q.log_sd.detach(),
                };
                &held
            };
            let eps = rng.randn(&[m, q.mean.size()[0]], kind, device)?;
            let neg_log_q =
                gaussian_neg_log_q(entropy, &eps, &[1], q.sum_log_sd(), q.numel() as f64);
            (q.sample(&eps), Some(neg_log_q))
        }
        ThetaFactor::Fixed(t) => (t.unsqueeze(0).expand([m, t.size()[0]], false), None),
    })
}

/// The mini-batch ELBO of a model with per-observation terms
/// ([`Model::local_terms`]) at the raw rows `local_b` (`[B, W]`, Gaussian
/// factors) of the observations `x_b` (`[B, …]`), scaled by `scale` = N/B:
/// `log p(θ) − log q(θ) + scale · Σ_{n ∈ batch} (t_n(θ, z_n, x_n) − log
/// q(z_n))` per draw, `[M]`; an unbiased estimate of the full ELBO when the
/// batch is a uniform share of the data. With θ fixed, `log p(θ)` is left
/// out (the ELBO bounds `log p(x | θ)`). Semi-amortized refinement on
/// mini-batches uses it: the gradient of one row, divided by `scale`, is
/// that of its own factor's terms.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_at(
    model: &dyn Model,
    var: &Variational,
    local_b: &Tensor,
    theta_grad: bool,
    x_b: &Tensor,
    scale: f64,
    draws: usize,
    entropy: Entropy,
    rng: &Draws,
) -> Result<Tensor> {
    let kind = x_b.kind();
    let device = x_b.device();
    let m = draws as i64;
    let (theta, theta_neg_log_q) = theta_draws(var, theta_grad, m, kind, device, entropy, rng)?;
    let b = local_b.size()[0];
    let eps_z = rng.randn(&[m, b, var.local_dim as i64], kind, device)?;
    let q = var.output.gaussian(local_b);
    let z = q.sample(&eps_z);
    let terms = model
        .local_terms(&theta, &z, x_b)?
        .sum_dim_intlist(1, false, kind);
    let dims = (b as usize * var.local_dim) as f64;
    let local = (terms + gaussian_neg_log_q(entropy, &eps_z, &[1, 2], q.sum_log_sd(), dims))
        .multiply_scalar(scale);
    Ok(match theta_neg_log_q {
        Some(t) => local + t + model.log_prior(&theta)?,
        None => local,
    })
}

/// −log q per draw of a diagonal Gaussian with `count` dimensions whose
/// Σ log sd is `sum_log_sd` (broadcast over the draws). `Entropy::Mc`: at
/// the draws whose standard normals `eps` are summed over `dims`,
/// −log q = Σ log s + ½ Σ ε² + (count/2) log 2π (ε = (v − m)/s);
/// `Entropy::Analytic`: its expectation, Σ log s + count (½ + ½ log 2π).
pub(crate) fn gaussian_neg_log_q(
    entropy: Entropy,
    eps: &Tensor,
    dims: &[i64],
    sum_log_sd: Tensor,
    count: f64,
) -> Tensor {
    match entropy {
        Entropy::Analytic => sum_log_sd + count * (0.5 + HALF_LN_2PI),
        Entropy::Mc => {
            eps.square()
                .sum_dim_intlist(dims, false, eps.kind())
                .multiply_scalar(0.5)
                + sum_log_sd
                + count * HALF_LN_2PI
        }
    }
}

/// Estimate the ELBO of the current parameters from `draws` fresh draws
/// without gradients, in chunks that bound memory. Returns (mean, standard
/// error). Draws from libtorch's default generator.
pub fn evaluate_elbo(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
) -> Result<(f64, f64)> {
    evaluate_from(model, var, x, draws, entropy, &Draws::Default)
}

/// [`evaluate_elbo`] with the standard normals from `rng`.
pub(crate) fn evaluate_from(
    model: &dyn Model,
    var: &Variational,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
    rng: &Draws,
) -> Result<(f64, f64)> {
    evaluate_at(model, var, None, x, draws, entropy, rng)
}

/// [`evaluate_from`] with the local factors' raw rows `local` in place of
/// the family's when given.
pub(crate) fn evaluate_at(
    model: &dyn Model,
    var: &Variational,
    local: Option<&Tensor>,
    x: &Tensor,
    draws: usize,
    entropy: Entropy,
    rng: &Draws,
) -> Result<(f64, f64)> {
    let per_draw = match var.output {
        Output::Gaussian { .. } | Output::Markov => (var.n * var.local_dim).max(1),
        Output::Categorical { .. } => 1,
    };
    let chunk = (crate::limits::EVAL_CHUNK_ELEMENTS / per_draw).clamp(1, draws);
    let mut values = Vec::with_capacity(draws);
    tch::no_grad(|| -> Result<()> {
        let mut left = draws;
        while left > 0 {
            let m = left.min(chunk);
            let e = match local {
                None => draws_from(model, var, x, m, entropy, None, rng)?,
                Some(l) => draws_at(model, var, l, true, x, m, entropy, None, rng)?,
            };
            values.extend(Vec::<f64>::try_from(
                e.to_kind(Kind::Double).to_device(Device::Cpu),
            )?);
            left -= m;
        }
        Ok(())
    })?;
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    Ok((mean, standard_error(&values, mean)))
}

/// The standard error `sd / √n` of the mean `mean` of `values` (NaN for
/// fewer than two), computed on deviations scaled by the largest one, so
/// that values of 10¹⁷⁴ give a finite error instead of an overflowing sum
/// of squares.
pub(crate) fn standard_error(values: &[f64], mean: f64) -> f64 {
    if values.len() < 2 {
        return f64::NAN;
    }
    let n = values.len() as f64;
    let scale = values.iter().map(|v| (v - mean).abs()).fold(0.0, f64::max);
    if scale == 0.0 || !scale.is_finite() {
        return scale;
    }
    let ss: f64 = values.iter().map(|v| ((v - mean) / scale).powi(2)).sum();
    scale * (ss / (n - 1.0) / n).sqrt()
}
