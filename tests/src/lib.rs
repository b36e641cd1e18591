//! Shared helpers of the integration tests: fitting a model on CPU with a
//! few lines, and comparing arrays with stated tolerances.

use avi_inference::{fit, Fit, FitOptions, MethodConfig, Silent};
use avi_models::Model;
use tch::{Device, Tensor};

/// Fit `method` on CPU with the given options.
pub fn fit_cpu(model: &dyn Model, x: &[f64], method: &MethodConfig, opts: &FitOptions) -> Fit {
    fit(
        model,
        &Tensor::from_slice(x),
        method,
        None,
        opts,
        Device::Cpu,
        &mut Silent,
    )
    .expect("fit runs")
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
