//! Batched seeds (`fit(..).seeds(..).run_all()` with the graph engine): R seeds of one F-VI or Const problem as one
//! optimisation with a leading run dimension give the results of R separate
//! fits.

use avi_inference::{fit, Dtype, Engine, Fit, FitOptions, FitStatus, MethodConfig};
use avi_models::{LinearModel, Model, NonlinearModel, SawModel};
use avi_tests::{max_rel, mlp, serial};
use tch::Tensor;

fn options(engine: Engine, dtype: Dtype) -> FitOptions {
    tch::set_num_threads(1);
    FitOptions {
        steps: 230,
        lr: 0.02,
        draws: 10,
        eval_draws: 100,
        dtype,
        // 230 = four checks of 50 and a last one of 30
        check_every: 50,
        engine,
        ..FitOptions::default()
    }
}

fn separate(
    model: &dyn Model,
    x: &Tensor,
    method: &MethodConfig,
    seed: u64,
    opts: &FitOptions,
) -> Fit {
    let mut o = opts.clone();
    o.seed = seed;
    fit(model, x, method).options(&o).run().unwrap()
}

/// Compare every output of a batched run with the separate run.
fn assert_same(name: &str, a: &Fit, b: &Fit, tol: f64) {
    assert_eq!(a.status, b.status, "{name}");
    assert_eq!(a.trace.iteration, b.trace.iteration, "{name}");
    let checks = [
        ("trace", max_rel(&a.trace.elbo, &b.trace.elbo)),
        ("q(z) means", max_rel(&a.q_z.mean, &b.q_z.mean)),
        ("q(z) sds", max_rel(&a.q_z.sd, &b.q_z.sd)),
        (
            "q(θ)",
            max_rel(
                &a.q_theta.as_ref().unwrap().mean,
                &b.q_theta.as_ref().unwrap().mean,
            ),
        ),
        ("final ELBO", max_rel(&[a.elbo], &[b.elbo])),
    ];
    for (what, d) in checks {
        assert!(
            d <= tol,
            "{name}: {what} differ by {d:e} (tolerance {tol:e})"
        );
    }
}

/// f64, against separate fits with the same Adam (the graph engine's fused
/// kernel): the batched run evaluates the same expressions on the same
/// draws, so only the order of a few reductions may differ (measured on the
/// linear trace: 2.4e-16); 1e-12 relative. Against the torch engine (tch's Adam,
/// rounding differences of ~1e-16 per step): 1e-8, as in graph_engine.rs.
#[test]
fn batched_seeds_equal_separate_runs() {
    let _serial = serial();
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let xl = Tensor::from_slice(&linear.simulate(200, 1, None).unwrap());
    let saw = SawModel::new(0.75, 0.0).unwrap();
    let xs = Tensor::from_slice(&saw.simulate(150, 2012, Some(3.4159)).unwrap());
    let non = NonlinearModel::default();
    let xn = Tensor::from_slice(&non.simulate(150, 1, None).unwrap());
    let seeds = [1954, 1955, 2013];
    let cases: [(&str, &dyn Model, &Tensor, MethodConfig); 4] = [
        ("linear fvi", &linear, &xl, MethodConfig::Fvi),
        ("linear const", &linear, &xl, MethodConfig::Const),
        ("saw fvi", &saw, &xs, MethodConfig::Fvi),
        ("nonlinear fvi", &non, &xn, MethodConfig::Fvi),
    ];
    for (name, model, x, method) in cases {
        let opts = options(Engine::Graph, Dtype::F64);
        let batched = fit(model, x, &method)
            .seeds(&seeds)
            .options(&opts)
            .run_all()
            .unwrap();
        assert_eq!(batched.len(), seeds.len());
        for (b, &seed) in batched.iter().zip(&seeds) {
            assert_eq!(b.status, FitStatus::Ok, "{name} {seed}");
            assert_eq!(b.trace.elbo.len(), 230);
            let alone = separate(model, x, &method, seed, &opts);
            assert_same(
                &format!("{name}, seed {seed}, graph engine"),
                b,
                &alone,
                1e-12,
            );
            let torch = separate(model, x, &method, seed, &options(Engine::Torch, Dtype::F64));
            assert_same(
                &format!("{name}, seed {seed}, torch engine"),
                b,
                &torch,
                1e-8,
            );
        }
        // the seeds give different runs (not one run copied R times)
        assert!(max_rel(&batched[0].trace.elbo, &batched[1].trace.elbo) > 1e-3);
    }
}

/// f32: the same expressions in single precision; 1e-5 relative (the
/// order of f32 reductions may differ between a [M, N] and a [R·M, N]
/// tensor; measured on the q(z) means: 9.7e-8).
#[test]
fn batched_seeds_equal_separate_runs_in_f32() {
    let _serial = serial();
    let saw = SawModel::new(0.75, 0.0).unwrap();
    let x = Tensor::from_slice(&saw.simulate(150, 2012, Some(3.4159)).unwrap());
    let opts = options(Engine::Graph, Dtype::F32);
    let seeds = [7, 8];
    let batched = fit(&saw, &x, &MethodConfig::Fvi)
        .seeds(&seeds)
        .options(&opts)
        .run_all()
        .unwrap();
    for (b, &seed) in batched.iter().zip(&seeds) {
        let alone = separate(&saw, &x, &MethodConfig::Fvi, seed, &opts);
        assert_same(&format!("saw f32, seed {seed}"), b, &alone, 1e-5);
    }
}

#[test]
fn batched_seeds_refuse_what_they_do_not_cover() {
    let _serial = serial();
    let saw = SawModel::new(0.75, 0.0).unwrap();
    let x = Tensor::from_slice(&saw.simulate(50, 1, None).unwrap());
    let opts = options(Engine::Graph, Dtype::F32);
    let run = |method: &MethodConfig, seeds: &[u64], o: &FitOptions| {
        fit(&saw, &x, method)
            .seeds(seeds)
            .options(o)
            .run_all()
            .unwrap_err()
            .to_string()
    };
    assert!(run(&mlp(10, [1, 0]), &[1, 2], &opts).contains("A-VI"));
    assert!(run(&MethodConfig::Fvi, &[], &opts).contains("seed"));
    let mut o = opts.clone();
    o.batch_size = Some(10);
    assert!(run(&MethodConfig::Fvi, &[1], &o).contains("batch_size"));
}
