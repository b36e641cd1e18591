//! The linear model against its closed-form F-VI optimum (Prop. 3.6 with the
//! corrected Lemma A.4): F-VI and A-VI with polynomial inference functions of
//! degree 1 and 2 reach the optimum, Const does not, and no method exceeds it.

use avi_inference::{Dtype, FunctionConfig, MethodConfig};
use avi_models::LinearModel;
use avi_tests::{
    closed_form_options, fit_cpu, linear_exact_elbo, linear_gap_tolerance, max_abs_diff, rms_diff,
};

/// (N, τ, σ, data seed, fit seed, dtype): several sizes, signal-to-noise
/// ratios, seeds and both precisions.
const CASES: [(usize, f64, f64, u64, u64, Dtype); 3] = [
    (300, 1.155, 2.43, 1, 1954, Dtype::F64),
    (500, 0.5, 1.0, 2, 1955, Dtype::F32),
    (120, 2.0, 0.7, 3, 1956, Dtype::F32),
];

fn avi(degree: usize) -> MethodConfig {
    MethodConfig::Avi {
        function: FunctionConfig::Poly { degree },
        standardize: true,
        window: [0, 0],
        edges: Default::default(),
    }
}

#[test]
fn fvi_and_avi_reach_the_closed_form_optimum_const_does_not() {
    for (n, tau, sigma, data_seed, seed, dtype) in CASES {
        let model = LinearModel::new(tau, sigma).unwrap();
        let x = model.simulate(n, data_seed, None).unwrap();
        let opt = model.fvi_optimum(&x).unwrap();
        let case = format!("N={n} tau={tau} sigma={sigma} {dtype:?}");
        for (label, method) in [
            ("fvi", MethodConfig::Fvi),
            ("poly1", avi(1)),
            ("poly2", avi(2)),
        ] {
            let fit = fit_cpu(&model, &x, &method, &closed_form_options(seed, dtype));
            let q_theta = fit.q_theta.as_ref().unwrap();
            let exact = linear_exact_elbo(&model, &x, &fit);
            let tol = linear_gap_tolerance(n);
            assert!(
                opt.elbo - exact <= tol && exact <= opt.elbo + 1e-6 * opt.elbo.abs(),
                "{case} {label}: exact ELBO {exact} vs optimum {}",
                opt.elbo
            );
            // The Monte Carlo estimate agrees with the optimum within 4 standard
            // errors plus the same optimisation slack, and never exceeds it by
            // more than 4 standard errors.
            assert!(
                (fit.elbo - opt.elbo).abs() <= 4.0 * fit.elbo_se + tol,
                "{case} {label}: ELBO {} ± {} vs optimum {}",
                fit.elbo,
                fit.elbo_se,
                opt.elbo
            );
            assert!(
                fit.elbo <= opt.elbo + 4.0 * fit.elbo_se,
                "{case} {label} exceeds the optimum"
            );
            // Local factors: the amortized ones are smooth functions fitted by
            // all N observations and match tightly; F-VI's free parameters
            // carry the O(lr) jitter of each coordinate.
            // Measured at lr = 0.02: F-VI max |Δ mean| ≈ 0.10, max |Δ sd| ≈ 0.07;
            // A-VI ≤ 0.07 (the x² coefficient of degree 2 jitters, and the
            // extreme x_n amplify it), sds ≤ 0.002.
            let (mean_tol, sd_tol) = if label == "fvi" {
                (0.15, 0.12)
            } else {
                (0.1, 0.02)
            };
            let dm = max_abs_diff(&fit.q_z.mean, &opt.z_mean);
            let ds = max_abs_diff(&fit.q_z.sd, &opt.z_sd);
            assert!(dm <= mean_tol, "{case} {label}: max |Δ mean| = {dm}");
            assert!(ds <= sd_tol, "{case} {label}: max |Δ sd| = {ds}");
            assert!(
                (q_theta.mean[0] - opt.theta_mean[0]).abs() <= 3.0 * opt.theta_sd[0],
                "{case} {label}: θ mean {} vs {}",
                q_theta.mean[0],
                opt.theta_mean[0]
            );
            if label == "fvi" {
                // On average the free means are much closer than the worst one.
                // (measured rms ≈ 0.03; the closed-form means spread over ≈ ±1.5).
                let rms = rms_diff(&fit.q_z.mean, &opt.z_mean);
                assert!(rms <= 0.05, "{case} fvi: rms Δ mean = {rms}");
            }
        }
        // Const: one shared factor cannot follow x_n; its ELBO is clearly below
        // (the gap is a sizeable fraction of N nats, far beyond MC error).
        let fit = fit_cpu(
            &model,
            &x,
            &MethodConfig::Const,
            &closed_form_options(seed, dtype),
        );
        let gap = opt.elbo - fit.elbo;
        assert!(
            gap > 0.02 * n as f64 && gap > 10.0 * fit.elbo_se,
            "{case} const: gap {gap} ± {} is not clearly positive",
            fit.elbo_se
        );
    }
}
