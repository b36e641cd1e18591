//! The one entry point (`fit` → `FitRequest`): `auto` resolves to the
//! fused engine exactly where it applies and gives that engine's bits; fits
//! in different threads draw from their own generators and give the bits
//! they give alone; the result serialises.

use avi_inference::{fit, Clock, Dtype, Engine, Fit, FitOptions, MethodConfig};
use avi_models::{GaussianHmm, LinearModel, Model};
use avi_tests::closed_form_options;
use tch::Tensor;

fn options(engine: Engine) -> FitOptions {
    FitOptions {
        steps: 300,
        engine,
        ..closed_form_options(5, Dtype::F32)
    }
}

fn same_bits(a: &Fit, b: &Fit) -> bool {
    a.elbo.to_bits() == b.elbo.to_bits()
        && a.trace.elbo.len() == b.trace.elbo.len()
        && a.trace
            .elbo
            .iter()
            .zip(&b.trace.elbo)
            .all(|(x, y)| x.to_bits() == y.to_bits())
        && a.q_z
            .mean
            .iter()
            .zip(&b.q_z.mean)
            .all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn auto_is_the_fused_engine_where_it_applies() {
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&model.simulate(200, 1, None).unwrap());
    let auto = fit(&model, &x, &MethodConfig::Fvi)
        .options(options(Engine::Auto))
        .run()
        .unwrap();
    let fused = fit(&model, &x, &MethodConfig::Fvi)
        .options(options(Engine::Fused))
        .run()
        .unwrap();
    assert_eq!(auto.engine, Engine::Fused);
    assert!(same_bits(&auto, &fused), "auto gave other bits than fused");
    // Where the fused engine does not apply, auto is libtorch.
    let fixed = fit(&model, &x, &MethodConfig::Fvi)
        .options(options(Engine::Auto))
        .fixed_theta(Some(&[0.5]))
        .run()
        .unwrap();
    assert_eq!(fixed.engine, Engine::Torch);
    // (mini-batches: the choice only; the linear model has no batched
    // likelihood and refuses them on every engine)
    let batches = fit(&model, &x, &MethodConfig::Fvi).options(FitOptions {
        batch_size: Some(50),
        ..options(Engine::Auto)
    });
    assert_eq!(batches.engine(), Engine::Torch);
    let hmm = GaussianHmm::new(0.8, 1.0, 1.0, 1.0).unwrap();
    let xh = Tensor::from_slice(&hmm.simulate(100, 1, None).unwrap());
    let request = fit(&hmm, &xh, &MethodConfig::Fvi).options(options(Engine::Auto));
    assert_eq!(request.engine(), Engine::Torch);
    assert_eq!(request.run().unwrap().engine, Engine::Torch);
}

/// Fits in two threads at once: each draws from its own generator, so each
/// gives the bits it gives alone (before, fits took turns on libtorch's one
/// generator under a process-wide lock).
#[test]
fn fits_in_threads_give_their_own_bits() {
    let run = |seed: u64, engine: Engine| {
        let model = LinearModel::new(1.155, 2.43).unwrap();
        let x = Tensor::from_slice(&model.simulate(200, 1, None).unwrap());
        let f = fit(&model, &x, &MethodConfig::Fvi)
            .options(FitOptions {
                seed,
                ..options(engine)
            })
            .run()
            .unwrap();
        (
            f.elbo.to_bits(),
            f.trace.elbo.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        )
    };
    for engine in [Engine::Torch, Engine::Fused] {
        let alone: Vec<_> = [11, 12, 13].iter().map(|&s| run(s, engine)).collect();
        let together: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = [11, 12, 13]
                .iter()
                .map(|&s| scope.spawn(move || run(s, engine)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(alone, together, "{engine:?}: threads changed the bits");
        assert_ne!(alone[0], alone[1], "the seeds give different fits");
    }
}

#[test]
fn a_fit_serialises_without_its_parameters() {
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&model.simulate(100, 1, None).unwrap());
    let f = fit(&model, &x, &MethodConfig::Fvi)
        .options(options(Engine::Auto))
        .run()
        .unwrap();
    let v = serde_json::to_value(&f).unwrap();
    assert_eq!(v["engine"], "fused");
    assert_eq!(v["threads"], 1);
    assert_eq!(v["trace"]["elbo"].as_array().unwrap().len(), 300);
    assert_eq!(v["trace"]["clock"], serde_json::json!(Clock::Step));
    assert_eq!(v["q_z"]["mean"].as_array().unwrap().len(), 100);
    assert_eq!(v["status"]["status"], "ok");
    assert!(v.get("variational").is_none());
    assert_eq!(
        model.theta_dim(),
        v["q_theta"]["mean"].as_array().unwrap().len()
    );
}
