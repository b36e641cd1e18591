//! Shared helpers of the integration tests: fitting a model on CPU with a
//! few lines, and comparing arrays with stated tolerances.

use avi_inference::{fit, Dtype, Fit, FitOptions, MethodConfig};
use avi_models::Model;
use tch::Tensor;

/// Fit `method` on CPU with the given options (scalar observations).
pub fn fit_cpu(model: &dyn Model, x: &[f64], method: &MethodConfig, opts: &FitOptions) -> Fit {
    fit_cpu_general(model, x, None, method, None, opts)
}

/// Fit on CPU: `x` holds N observations of `dim` values each (row-major) or
/// N scalars (`dim` = None); θ fixed when `theta` is given.
pub fn fit_cpu_general(
    model: &dyn Model,
    x: &[f64],
    dim: Option<usize>,
    method: &MethodConfig,
    theta: Option<&[f64]>,
    opts: &FitOptions,
) -> Fit {
    let xt = Tensor::from_slice(x);
    let xt = match dim {
        Some(d) => xt.view([-1, d as i64]),
        None => xt,
    };
    fit(model, &xt, method)
        .fixed_theta(theta)
        .options(opts)
        .run()
        .expect("fit runs")
}

/// An A-VI method with a two-layer ReLU MLP of width `width` (shared trunk)
/// on the window `[before, after]`, edges padded.
pub fn mlp(width: usize, window: [usize; 2]) -> MethodConfig {
    MethodConfig::Avi {
        function: avi_inference::FunctionConfig::Mlp {
            width,
            depth: 2,
            activation: avi_inference::Activation::Relu,
            heads: avi_inference::Heads::Shared,
        },
        standardize: true,
        window,
        edges: avi_inference::Edges::Pad,
    }
}

/// The BNN's encoder (§4.4): two layers of width `width`, LeakyReLU 0.2,
/// shared heads, raw pixels in (no standardisation).
pub fn bnn_encoder(width: usize) -> MethodConfig {
    MethodConfig::Avi {
        function: avi_inference::FunctionConfig::Mlp {
            width,
            depth: 2,
            activation: avi_inference::Activation::LeakyRelu,
            heads: avi_inference::Heads::Shared,
        },
        standardize: false,
        window: [0, 0],
        edges: avi_inference::Edges::Pad,
    }
}

/// Fit on CPU with θ fixed at `theta`.
pub fn fit_cpu_fixed(
    model: &dyn Model,
    x: &[f64],
    method: &MethodConfig,
    theta: &[f64],
    opts: &FitOptions,
) -> Fit {
    fit_cpu_general(model, x, None, method, Some(theta), opts)
}

/// The largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Root-mean-square difference between two equally long slices.
pub fn rms_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
}

/// The exact ELBO (closed form, no Monte Carlo) of a fitted linear-model
/// q with free θ.
pub fn linear_exact_elbo(model: &avi_models::LinearModel, x: &[f64], fit: &Fit) -> f64 {
    let q = fit.q_theta.as_ref().expect("θ is free");
    model
        .exact_elbo(x, q.mean[0], q.sd[0], &fit.q_z.mean, &fit.q_z.sd)
        .expect("exact ELBO")
}

/// The exact ELBO (closed form) of a fitted saw-model q with free θ.
pub fn saw_exact_elbo(model: &avi_models::SawModel, x: &[f64], fit: &Fit) -> f64 {
    let q = fit.q_theta.as_ref().expect("θ is free");
    model
        .exact_elbo(
            x,
            Some((q.mean[0], q.sd[0])),
            None,
            &fit.q_z.mean,
            &fit.q_z.sd,
        )
        .expect("exact ELBO")
}

/// How far below the linear model's closed-form optimum a converged fit of
/// N observations may stop: 0.5 nats + 0.002·N. Adam with a constant step
/// keeps every free parameter jittering by O(lr) around the optimum, which
/// costs about ½ Φ_ii δ² per coordinate (≈ 1e-3 nats each at lr = 0.02,
/// measured).
pub fn linear_gap_tolerance(n: usize) -> f64 {
    0.5 + 2e-3 * n as f64
}

/// The options of the closed-form tests: 4,000 Adam steps at lr 0.02 with
/// 100 draws, and the final ELBO from 2,000 fresh draws.
pub fn closed_form_options(seed: u64, dtype: Dtype) -> FitOptions {
    FitOptions {
        steps: 4000,
        lr: 0.02,
        draws: 100,
        seed,
        eval_draws: 2000,
        dtype,
        ..FitOptions::default()
    }
}

/// Largest |a − b| / max(|a|, |b|, 1) over two equally long sequences.
pub fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(1.0))
        .fold(0.0, f64::max)
}

/// Serialises the tests of one test executable that use libtorch's
/// process-wide generator outside `fit`'s own lock, or capture CUDA graphs
/// (a capture fails when another thread makes a synchronising CUDA call).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
