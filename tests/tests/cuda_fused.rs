//! The fused engine on CUDA (`CudaFviTrainer`: F-VI of the scalar models as
//! two NVRTC-compiled kernels). Every test but the first needs a CUDA device
//! and is ignored here; on a GPU machine: `cargo test --test cuda_fused --
//! --include-ignored`.

use avi_inference::testing::{objective_and_grad, CudaFviTrainer, FusedModel, FusedParams};
use avi_inference::{fit, host_vec, Engine, Entropy, FitOptions, FitStatus, MethodConfig};
use avi_models::{LinearModel, NonlinearModel, NonlinearObjective, SawModel};
use avi_tests::{
    closed_form_options, linear_exact_elbo, linear_gap_tolerance, saw_exact_elbo, serial,
};
use tch::{Device, Tensor};

const CUDA: Device = Device::Cuda(0);

fn problems() -> Vec<(&'static str, FusedModel, Vec<f64>)> {
    let lin = LinearModel::new(1.155, 2.43).unwrap();
    let non = NonlinearModel::default();
    let aut = non.with_objective(NonlinearObjective::Authors);
    let saw = SawModel::new(0.75, 0.0).unwrap();
    vec![
        (
            "linear",
            FusedModel::from(&lin),
            lin.simulate(300, 1, None).unwrap(),
        ),
        (
            "nonlinear",
            FusedModel::from(&non),
            non.simulate(300, 1, None).unwrap(),
        ),
        (
            "saw",
            FusedModel::from(&saw),
            saw.simulate(200, 2012, Some(3.4159)).unwrap(),
        ),
        (
            "nonlinear (authors' objective)",
            FusedModel::from(&aut),
            aut.simulate(300, 1, None).unwrap(),
        ),
    ]
}

fn options(draws: usize) -> FitOptions {
    FitOptions {
        draws,
        lr: 0.01,
        seed: 5,
        engine: Engine::Fused,
        ..FitOptions::default()
    }
}

#[test]
fn cuda_fused_engine_needs_a_cuda_device() {
    let _serial = serial();
    let (_, m, x) = problems().remove(0);
    let err = CudaFviTrainer::new(&m, &x, &MethodConfig::Fvi, &options(10), Device::Cpu, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUDA device"), "{err}");
}

/// One kernel step against the f64 CPU objective at the kernel's own draws
/// (written out by the debug step), then the first Adam step, then the
/// draws' moments. 50 draws: not a multiple of the four normals per Philox
/// call.
#[test]
#[ignore = "needs a CUDA device: run with --include-ignored on a GPU machine"]
fn cuda_kernels_match_the_cpu_gradient_at_the_same_draws() {
    let _serial = serial();
    assert!(tch::Cuda::is_available(), "libtorch sees no CUDA device");
    let draws = 50;
    for (name, model, x) in problems() {
        let opts = options(draws);
        let mut t = CudaFviTrainer::new(&model, &x, &MethodConfig::Fvi, &opts, CUDA, 10)
            .unwrap()
            .without_capture();
        let st = t.state();
        let xs = host_vec(&st.x).unwrap(); // x as the kernels see it (f32)
        let mean = host_vec(&st.mean).unwrap();
        let log_sd = host_vec(&st.log_sd).unwrap();
        let tp = host_vec(&st.theta_params).unwrap();
        let eps_theta = host_vec(&st.eps_theta).unwrap();
        let theta = host_vec(&st.theta).unwrap();
        for (th, e) in theta.iter().zip(&eps_theta) {
            // θ_m = μ_θ + s_θ ε_θm, in f32
            assert!((th - (tp[0] + tp[1].exp() * e)).abs() <= 1e-5 * (1.0 + th.abs()));
        }
        let debug = t.step_debug().unwrap();
        let eps = host_vec(&debug.eps).unwrap();
        let grad = host_vec(&debug.grad).unwrap();
        let tg = host_vec(&debug.theta).unwrap();
        assert!(
            eps.iter().chain(&grad).chain(&tg).all(|v| v.is_finite()),
            "{name}: an output was not written (NaN poison left) or is not finite"
        );
        let q = FusedParams {
            theta_mean: tp[0],
            theta_log_sd: tp[1],
            local_mean: mean.clone(),
            local_log_sd: log_sd.clone(),
        };
        let g = objective_and_grad(&model, &xs, &q, &eps_theta, &eps, Entropy::Mc).unwrap();
        // f32 kernels against f64: each per-thread sum has 50 terms, each
        // block sum 256 threads, the cross-block sums are f64; relative
        // errors of a few 1e-7 are expected, 2e-5 (ELBO) and 1e-4 of the
        // gradient scale leave room for the f32 sin/cos/exp of the
        // nonlinear model.
        assert!(
            (tg[2] - g.elbo).abs() <= 2e-5 * g.elbo.abs(),
            "{name}: ELBO {} vs {}",
            tg[2],
            g.elbo
        );
        let n = xs.len();
        for (what, got, want) in [
            ("∂μ_n", &grad[..n], &g.local_mean),
            ("∂log s_n", &grad[n..], &g.local_log_sd),
        ] {
            let scale = want.iter().fold(1.0f64, |a, v| a.max(v.abs()));
            let d = got
                .iter()
                .zip(want.iter())
                .fold(0.0f64, |a, (u, v)| a.max((u - v).abs()));
            assert!(
                d <= 1e-4 * scale,
                "{name} {what}: max |Δ| {d:e} (scale {scale})"
            );
        }
        for (got, want) in [(tg[0], g.theta_mean), (tg[1], g.theta_log_sd)] {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs() + 1e-2,
                "{name}: θ gradient {got} vs {want}"
            );
        }
        // The first Adam step moves every parameter by lr in the direction
        // of its ELBO gradient (m̂ = g, v̂ = g²), up to f32 rounding of the
        // bias corrections (≈ 1e-5 relative) and of the parameter.
        let new_mean = host_vec(&t.state().mean).unwrap();
        let new_tp = host_vec(&t.state().theta_params).unwrap();
        let moved = |old: f64, new: f64, g: f64| {
            g.abs() < 1e-3
                || ((new - old) - opts.lr * g.signum()).abs()
                    <= 1e-4 * opts.lr + 1e-6 * (1.0 + old.abs())
        };
        for i in 0..n {
            assert!(
                moved(mean[i], new_mean[i], g.local_mean[i]),
                "{name}: μ_{i} {} → {} with gradient {}",
                mean[i],
                new_mean[i],
                g.local_mean[i]
            );
        }
        assert!(moved(tp[0], new_tp[0], g.theta_mean), "{name}: μ_θ");
        assert!(moved(tp[1], new_tp[1], g.theta_log_sd), "{name}: log s_θ");
        // The draws are standard normals: 5-sigma bounds on the mean and
        // the variance of the M·N values, and fresh at the next step.
        let k = eps.len() as f64;
        let mu = eps.iter().sum::<f64>() / k;
        let var = eps.iter().map(|e| (e - mu).powi(2)).sum::<f64>() / k;
        assert!(mu.abs() <= 5.0 / k.sqrt(), "{name}: mean {mu}");
        assert!(
            (var - 1.0).abs() <= 5.0 * (2.0 / k).sqrt(),
            "{name}: variance {var}"
        );
        let again = host_vec(&t.step_debug().unwrap().eps).unwrap();
        let same = eps
            .iter()
            .zip(&again)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        assert!(same < 10, "{name}: {same} draws repeated at the next step");
    }
}

/// Through `fit`: the kernels reach the linear and saw closed-form F-VI
/// optima with the CPU engines' tolerances.
#[test]
#[ignore = "needs a CUDA device: run with --include-ignored on a GPU machine"]
fn cuda_fused_fit_reaches_the_closed_forms() {
    let _serial = serial();
    assert!(tch::Cuda::is_available(), "libtorch sees no CUDA device");
    let lin = LinearModel::new(1.155, 2.43).unwrap();
    let n = 300;
    let x = lin.simulate(n, 1, None).unwrap();
    let opt = lin.fvi_optimum(&x).unwrap();
    let opts = FitOptions {
        engine: Engine::Fused,
        ..closed_form_options(1954, avi_inference::Dtype::F32)
    };
    let xt = Tensor::from_slice(&x);
    let f = fit(&lin, &xt, &MethodConfig::Fvi)
        .options(&opts)
        .device(CUDA)
        .run()
        .unwrap();
    assert_eq!(f.status, FitStatus::Ok);
    assert_eq!(f.trace.elbo.len(), opts.steps);
    let exact = linear_exact_elbo(&lin, &x, &f);
    let gap = opt.elbo - exact;
    assert!(
        gap >= -1e-6 * opt.elbo.abs() && gap <= linear_gap_tolerance(n),
        "linear gap {gap}"
    );
    assert!(
        (f.elbo - exact).abs() <= 4.0 * f.elbo_se + 0.5,
        "{} vs {exact}",
        f.elbo
    );

    let saw = SawModel::new(0.75, 0.0).unwrap();
    let x = saw.simulate(200, 2012, Some(3.4159)).unwrap();
    let opt = saw.fvi_optimum(&x, None).unwrap();
    let mut opts = opts;
    opts.lr = 0.03;
    opts.steps = 3000;
    let xt = Tensor::from_slice(&x);
    let f = fit(&saw, &xt, &MethodConfig::Fvi)
        .options(&opts)
        .device(CUDA)
        .run()
        .unwrap();
    let exact = saw_exact_elbo(&saw, &x, &f);
    assert!(opt.elbo - exact <= 0.5, "saw gap {}", opt.elbo - exact);
}

/// Replayed graphs follow the same steps launched one by one (up to the
/// order of floating-point atomics, which differs between runs).
#[test]
#[ignore = "needs a CUDA device: run with --include-ignored on a GPU machine"]
fn cuda_fused_replays_match_launches() {
    let _serial = serial();
    assert!(tch::Cuda::is_available(), "libtorch sees no CUDA device");
    for (name, model, x) in problems() {
        let run = |capture: bool| {
            let t = CudaFviTrainer::new(&model, &x, &MethodConfig::Fvi, &options(100), CUDA, 50)
                .unwrap();
            let mut t = if capture { t } else { t.without_capture() };
            let mut trace = Vec::new();
            for _ in 0..5 {
                trace.extend(host_vec(&t.step_block().unwrap()).unwrap());
            }
            (trace, t.captured())
        };
        let (a, captured) = run(true);
        let (b, _) = run(false);
        assert!(captured);
        assert_eq!(a.len(), 250);
        let d = a
            .iter()
            .zip(&b)
            .map(|(u, v)| (u - v).abs() / u.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(d <= 1e-4, "{name}: replayed vs launched {d:e}");
        assert!(a[249] > a[0], "{name}: the ELBO did not improve");
    }
}
