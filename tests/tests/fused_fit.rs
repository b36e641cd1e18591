//! `fit` with the fused CPU engine (`Engine::Fused`) reaches the same exact
//! optima as the libtorch engine: the linear model's closed form (F-VI and
//! A-VI d = 1) and the saw model's (F-VI and the expanded-domain A-VI), with
//! the same tolerances as the libtorch-engine tests; and it refuses what it
//! does not cover.

use avi_inference::{Dtype, Engine, FitOptions, FitStatus, FunctionConfig, MethodConfig};
use avi_models::{GaussianHmm, LinearModel, SawModel};
use avi_tests::{
    closed_form_options, fit_cpu, linear_exact_elbo, linear_gap_tolerance, mlp, saw_exact_elbo,
};

fn options(seed: u64) -> FitOptions {
    // One thread: the draws are then split the same way on every machine,
    // and a busy 2-core runner does not stall on spinning workers.
    tch::set_num_threads(1);
    FitOptions {
        engine: Engine::Fused,
        ..closed_form_options(seed, Dtype::F32)
    }
}

#[test]
fn fused_engine_reaches_the_linear_closed_form() {
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let n = 300;
    let x = model.simulate(n, 1, None).unwrap();
    let opt = model.fvi_optimum(&x).unwrap();
    let d1 = MethodConfig::Avi {
        function: FunctionConfig::Poly { degree: 1 },
        standardize: true,
        window: [0, 0],
        edges: Default::default(),
    };
    for method in [MethodConfig::Fvi, d1] {
        let fit = fit_cpu(&model, &x, &method, &options(1954));
        assert_eq!(fit.status, FitStatus::Ok);
        let exact = linear_exact_elbo(&model, &x, &fit);
        // As tests/tests/linear_closed_form.rs: within the optimisation
        // slack of the optimum, never above it.
        let gap = opt.elbo - exact;
        assert!(
            gap >= -1e-9 * opt.elbo.abs() && gap <= linear_gap_tolerance(n),
            "{}: gap {gap}",
            method.label()
        );
        // The MC ELBO from fresh draws agrees with the exact one (4 se + the
        // same slack).
        assert!(
            (fit.elbo - exact).abs() <= 4.0 * fit.elbo_se + 0.5,
            "{} vs {exact}",
            fit.elbo
        );
        assert_eq!(fit.trace.elbo.len(), 4000);
    }
}

/// Const (one shared q(z)) on the linear model has a closed-form optimum:
/// with q(z_n) = N(m, s²) for all n and q(θ) = N(μ, v), the ELBO is
/// maximised at m = 0, s² = 1/(1 + τ²/σ²), μ = x̄, v = σ²/N. Both engines
/// reach it (the fitted q's exact ELBO within 0.5 nats: four parameters
/// jittering by O(lr)), and the fitted factor is shared.
#[test]
fn both_engines_reach_the_const_optimum() {
    let (tau, sigma) = (1.155, 2.43);
    let model = LinearModel::new(tau, sigma).unwrap();
    let n = 300;
    let x = model.simulate(n, 3, None).unwrap();
    let s = (1.0 / (1.0 + tau * tau / (sigma * sigma))).sqrt();
    let mean = x.iter().sum::<f64>() / n as f64;
    let best = model
        .exact_elbo(
            &x,
            mean,
            sigma / (n as f64).sqrt(),
            &vec![0.0; n],
            &vec![s; n],
        )
        .unwrap();
    for engine in [Engine::Fused, Engine::Torch] {
        let mut opts = options(1957);
        opts.engine = engine;
        let fit = fit_cpu(&model, &x, &MethodConfig::Const, &opts);
        assert_eq!(fit.status, FitStatus::Ok);
        let exact = linear_exact_elbo(&model, &x, &fit);
        assert!(
            best - exact <= 0.5 && exact <= best + 1e-9 * best.abs(),
            "{engine:?}: exact ELBO {exact} vs the Const optimum {best}"
        );
        // One shared factor: every q(z_n) is the same copy, bit for bit.
        let (m0, s0) = (fit.q_z.mean[0], fit.q_z.sd[0]);
        assert!(
            fit.q_z.mean.iter().all(|m| m.to_bits() == m0.to_bits()),
            "{engine:?}: means differ"
        );
        assert!(
            fit.q_z.sd.iter().all(|v| v.to_bits() == s0.to_bits()),
            "{engine:?}: sds differ"
        );
        // s within 0.02 of its optimum (measured jitter ≈ 1e-3 at lr 0.02).
        assert!((s0 - s).abs() <= 0.02, "{engine:?}: sd {s0} vs {s}");
    }
}

#[test]
fn fused_engine_reaches_the_saw_closed_form() {
    let model = SawModel::new(0.75, 0.0).unwrap();
    let x = model.simulate(200, 2012, Some(3.4159)).unwrap();
    let opt = model.fvi_optimum(&x, None).unwrap();
    let mut opts = options(2013);
    opts.lr = 0.03;
    opts.steps = 3000;
    // F-VI: within 0.5 nats of the closed form, as tests/tests/time_series.rs
    // (measured 0.13–0.17 over seeds 2013–2018). The expanded-domain A-VI
    // (an MLP after 3000 constant-step Adam steps) jitters more: measured
    // 0.06–0.51 over the same seeds with these draws (0.09–0.50 with the
    // engine's earlier xoshiro draws), except seed 2017, whose
    // initialisation leaves 2.4–3.5 nats with either draws; allowed 1 nat.
    for (method, tol) in [(MethodConfig::Fvi, 0.5), (mlp(10, [1, 0]), 1.0)] {
        let fit = fit_cpu(&model, &x, &method, &opts);
        let exact = saw_exact_elbo(&model, &x, &fit);
        assert!(
            opt.elbo - exact <= tol,
            "{}: gap {}",
            method.label(),
            opt.elbo - exact
        );
    }
}

#[test]
fn fused_engine_refuses_what_it_does_not_cover() {
    let model = GaussianHmm::new(0.9, 0.5, 1.0, 1.0).unwrap();
    let x = model.simulate(50, 1, Some(0.0)).unwrap();
    let r = avi_inference::fit(&model, &tch::Tensor::from_slice(&x), &MethodConfig::Fvi)
        .options(options(1))
        .run();
    assert!(r.is_err());
}
