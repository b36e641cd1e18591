//! Settings that used to pass validation and then panic, abort or hang
//! inside a fit (a fault-testing report) are refused by `fit` with an
//! error naming the setting, before anything is allocated; settings at
//! their documented bounds run; and a fit that finishes with an absurd
//! ELBO says so in `Fit::warnings`.

use avi_inference::{
    fit, Dtype, Engine, FitOptions, FitStatus, FunctionConfig, InferenceError, MethodConfig,
    MAX_DRAWS, MAX_LR,
};
use avi_models::{BnnModel, LinearModel, Model};
use avi_tests::{mlp, serial};
use tch::Tensor;

/// The field of the invalid-setting error of a fit, which must fail.
fn refused(model: &dyn Model, x: &Tensor, method: &MethodConfig, opts: &FitOptions) -> String {
    match fit(model, x, method).options(opts).run() {
        Err(e @ InferenceError::InvalidConfig { field, .. }) => {
            eprintln!("{e}");
            field.to_string()
        }
        Err(e) => panic!("expected an invalid setting, got {e}"),
        Ok(f) => panic!("expected an invalid setting, the fit ran: {:?}", f.status),
    }
}

fn linear_data(n: usize) -> (LinearModel, Tensor) {
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&model.simulate(n, 3, None).unwrap());
    (model, x)
}

fn quick() -> FitOptions {
    tch::set_num_threads(1);
    FitOptions {
        steps: 5,
        draws: 4,
        eval_draws: 20,
        check_every: 5,
        ..FitOptions::default()
    }
}

/// lr = 3e38 is refused (before: it passed the check and the fit
/// panicked); the largest accepted rate, 10⁶, runs to a result on every
/// CPU engine (diverged or not, but no panic).
#[test]
fn learning_rates_are_bounded_and_the_bound_runs() {
    let _serial = serial();
    let (model, x) = linear_data(50);
    let huge = FitOptions {
        lr: 3e38,
        ..quick()
    };
    assert_eq!(refused(&model, &x, &MethodConfig::Fvi, &huge), "lr");
    for engine in [Engine::Torch, Engine::Graph, Engine::Fused] {
        for dtype in [Dtype::F32, Dtype::F64] {
            for method in [MethodConfig::Fvi, mlp(4, [1, 1])] {
                let opts = FitOptions {
                    lr: MAX_LR,
                    engine,
                    dtype,
                    ..quick()
                };
                let f = fit(&model, &x, &method)
                    .options(&opts)
                    .run()
                    .unwrap_or_else(|e| panic!("{engine:?} {dtype:?}: {e}"));
                eprintln!("{engine:?} {dtype:?} {}: {:?}", method.label(), f.status);
            }
        }
    }
}

/// Sizes from the report, each refused before the fit allocates or loops:
/// 2³² + 1 steps, draw counts near 2³² and 2⁶⁴, a window whose length
/// overflows, a BNN batch of 2⁶³, the widest MLP on 16 layers, and draws
/// whose tensors outgrow any machine's memory.
#[test]
fn oversized_settings_are_refused_before_the_fit() {
    let _serial = serial();
    let (model, x) = linear_data(10_000);
    let fvi = MethodConfig::Fvi;
    let start = std::time::Instant::now();
    let cases: Vec<(FitOptions, MethodConfig, &str)> = vec![
        (
            FitOptions {
                steps: 4_294_967_297,
                ..quick()
            },
            fvi.clone(),
            "steps",
        ),
        (
            FitOptions {
                draws: 1 << 32,
                ..quick()
            },
            fvi.clone(),
            "draws",
        ),
        (
            FitOptions {
                eval_draws: usize::MAX,
                ..quick()
            },
            fvi.clone(),
            "eval_draws",
        ),
        (quick(), mlp(8, [usize::MAX, 1]), "method.window"),
        (
            FitOptions {
                batch_size: Some(10_001),
                ..quick()
            },
            fvi.clone(),
            "batch_size",
        ),
        // 10⁸ draws × 10⁴ observations: terabytes of draw tensors (the
        // fused engine keeps none: there it is only slow, not refused).
        (
            FitOptions {
                draws: MAX_DRAWS,
                ..quick()
            },
            fvi.clone(),
            "draws",
        ),
        (
            quick(),
            MethodConfig::Avi {
                function: FunctionConfig::Mlp {
                    width: 65_536,
                    depth: 16,
                    activation: Default::default(),
                    heads: Default::default(),
                },
                standardize: true,
                window: [0, 0],
                edges: Default::default(),
            },
            "method.fn.width",
        ),
    ];
    for engine in [Engine::Torch, Engine::Graph, Engine::Fused] {
        for (opts, method, field) in &cases {
            if engine == Engine::Fused && opts.draws == MAX_DRAWS {
                continue;
            }
            let opts = FitOptions {
                engine,
                ..opts.clone()
            };
            assert_eq!(refused(&model, &x, method, &opts), *field, "{engine:?}");
        }
    }
    // A BNN batch of 2⁶³ (an i64 overflow before).
    let bnn = BnnModel::new(2, 4, 6).unwrap();
    let images = Tensor::from_slice(&bnn.simulate(20, 1, None).unwrap()).view([20, 6]);
    let opts = FitOptions {
        batch_size: Some(1 << 63),
        ..quick()
    };
    assert_eq!(refused(&bnn, &images, &fvi, &opts), "batch_size");
    // Refused at once, not after a fit (10 s: a generous bound for reading
    // the data and /proc/meminfo 23 times on a loaded machine).
    assert!(start.elapsed().as_secs() < 10, "{:?}", start.elapsed());
}

/// One Adam step moves every parameter by the learning rate: at lr = 100
/// in f64 the local log-sds jump to ±100 (sds up to e¹⁰⁰), the fit
/// finishes with status ok and a finite ELBO near −10⁸⁷ with a huge
/// standard error, and every engine says so in its warnings, naming the
/// local factors with the largest sds.
#[test]
fn an_absurd_final_elbo_is_flagged_on_every_engine() {
    let _serial = serial();
    let (model, x) = linear_data(50);
    for engine in [Engine::Torch, Engine::Graph, Engine::Fused] {
        let opts = FitOptions {
            lr: 100.0,
            steps: 1,
            check_every: 1,
            dtype: Dtype::F64,
            engine,
            ..quick()
        };
        let f = fit(&model, &x, &MethodConfig::Fvi)
            .options(&opts)
            .run()
            .unwrap();
        eprintln!("{engine:?}: {} ± {}: {:#?}", f.elbo, f.elbo_se, f.warnings);
        assert_eq!(f.status, FitStatus::Ok, "{engine:?}");
        assert!(
            f.elbo.is_finite() && f.elbo < -1e50,
            "{engine:?}: {}",
            f.elbo
        );
        assert!(
            f.warnings.iter().any(|w| w.contains("standard error")),
            "{engine:?}: {:?}",
            f.warnings
        );
        let worst = f.warnings.last().unwrap();
        assert!(worst.contains("largest sd"), "{worst}");
    }
}

/// A fit that converges has no warning: F-VI and A-VI (a line) on the
/// linear model, 2,000 steps at lr 0.02, on every CPU engine.
#[test]
fn a_converged_fit_has_no_warnings() {
    let _serial = serial();
    let (model, x) = linear_data(200);
    let line = MethodConfig::Avi {
        function: FunctionConfig::Poly { degree: 1 },
        standardize: true,
        window: [0, 0],
        edges: Default::default(),
    };
    for engine in [Engine::Torch, Engine::Graph, Engine::Fused] {
        for method in [MethodConfig::Fvi, line.clone()] {
            let opts = FitOptions {
                lr: 0.02,
                steps: 2000,
                draws: 10,
                eval_draws: 1000,
                check_every: 100,
                engine,
                ..FitOptions::default()
            };
            let f = fit(&model, &x, &method).options(&opts).run().unwrap();
            let optimum = model
                .fvi_optimum(&Vec::<f64>::try_from(&x).unwrap())
                .unwrap()
                .elbo;
            eprintln!(
                "{engine:?} {}: {:.2} ± {:.2} (optimum {optimum:.2})",
                method.label(),
                f.elbo,
                f.elbo_se
            );
            assert_eq!(f.status, FitStatus::Ok);
            assert!(f.warnings.is_empty(), "{engine:?}: {:?}", f.warnings);
        }
    }
}

/// Finite data beyond f32's range are refused by an f32 fit, naming the
/// value as an f32 overflow (before: converted to inf, then reported as
/// "not finite" although the data hold a number), on the single-run and
/// the batched path; the same data pass that check in an f64 fit.
#[test]
fn data_beyond_f32_are_named_as_such() {
    let _serial = serial();
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&[0.5, 1e150, -2.0]);
    let opts = FitOptions {
        dtype: Dtype::F32,
        ..quick()
    };
    for result in [
        fit(&model, &x, &MethodConfig::Fvi)
            .options(&opts)
            .run()
            .map(|_| ()),
        avi_inference::fit(&model, &x, &MethodConfig::Fvi)
            .seeds(&[1, 2])
            .options(&opts)
            .run_all()
            .map(|_| ()),
    ] {
        let e = result.unwrap_err().to_string();
        assert!(e.contains("value 1 of x (1e150) overflows f32"), "{e}");
    }
    let f64_opts = FitOptions {
        dtype: Dtype::F64,
        ..quick()
    };
    assert!(avi_inference::check_representable(&x, f64_opts.dtype).is_ok());
    // Infinite data are not called an overflow (the model's check names them).
    let inf = Tensor::from_slice(&[0.5, f64::INFINITY]);
    assert!(avi_inference::check_representable(&inf, Dtype::F32).is_ok());
}

/// A warm start brings its own q(θ): initial values for q(θ) beside it are
/// refused, not silently dropped (they were before).
#[test]
fn initial_theta_beside_a_warm_start_is_refused() {
    let _serial = serial();
    let (model, x) = linear_data(20);
    let first = fit(&model, &x, &MethodConfig::Fvi)
        .options(quick())
        .run()
        .unwrap();
    let warm = fit(&model, &x, &MethodConfig::Fvi)
        .options(quick())
        .start_from(first.variational.to_free())
        .init_theta(&[0.0], &[0.0])
        .run();
    match warm {
        Err(InferenceError::InvalidConfig { field, .. }) => assert_eq!(field, "init_theta"),
        Err(e) => panic!("expected the init_theta setting refused, got {e}"),
        Ok(f) => panic!("init_theta beside a warm start ran: {:?}", f.status),
    }
}
