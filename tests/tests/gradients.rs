//! The reparameterised ELBO gradient of every model and family against
//! central finite differences in f64, with the Monte Carlo draws held fixed
//! (the generator is re-seeded before each evaluation).

use avi_inference::{elbo_draws, Dtype, Entropy, FitOptions, MethodConfig, Trainer};
use avi_models::{GaussianHmm, LinearModel, Model, NonlinearModel, NonlinearSim, SawModel};
use avi_tests::mlp;
use tch::{Device, Kind, Tensor};

fn check(model: &dyn Model, x: &[f64], method: &MethodConfig, entropy: Entropy, what: &str) {
    let opts = FitOptions {
        dtype: Dtype::F64,
        entropy,
        ..FitOptions::default()
    };
    let trainer = Trainer::new(
        model,
        &Tensor::from_slice(x),
        method,
        None,
        &opts,
        Device::Cpu,
    )
    .expect("trainer");
    let var = trainer.variational();
    let data = trainer.data();
    let elbo = || {
        tch::manual_seed(99);
        elbo_draws(model, var, data, 7, entropy)
            .unwrap()
            .mean(Kind::Double)
    };
    let mut params = var.vs.trainable_variables();
    for p in &mut params {
        p.zero_grad();
    }
    elbo().backward();
    let h = 1e-6;
    for p in &params {
        let grad = p.grad().view([-1]);
        let flat = p.detach().view([-1]); // shares storage with p
        let count = flat.size()[0];
        for i in [0, count / 2, count - 1] {
            let orig = flat.double_value(&[i]);
            let at = |v: f64| {
                tch::no_grad(|| {
                    let _ = flat.get(i).fill_(v);
                });
                elbo().double_value(&[])
            };
            let fd = (at(orig + h) - at(orig - h)) / (2.0 * h);
            at(orig);
            let g = grad.double_value(&[i]);
            // Central differences in f64: truncation O(h²) and rounding
            // O(ε·|ELBO|/h) ≈ 1e-16·1e3/1e-6 = 1e-7, so 1e-5 relative plus
            // 1e-5 absolute is ample while any wrong term would be O(1).
            assert!(
                (fd - g).abs() <= 1e-5 * g.abs().max(fd.abs()) + 1e-5,
                "{what}: d/d{}[{i}] autograd {g} vs finite difference {fd}",
                p.size()
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join("x"),
            );
        }
    }
}

#[test]
fn elbo_gradients_match_finite_differences() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let nonlinear = NonlinearModel::new(NonlinearSim::Model);
    let saw = SawModel::new(0.75, 0.5).unwrap();
    let hmm = GaussianHmm::new(0.9, 0.5, 0.7, 1.2).unwrap();
    let cases: Vec<(&str, &dyn Model, Vec<f64>)> = vec![
        ("linear", &linear, linear.simulate(12, 1, None).unwrap()),
        (
            "nonlinear",
            &nonlinear,
            nonlinear.simulate(12, 2, None).unwrap(),
        ),
        ("saw", &saw, saw.simulate(12, 3, None).unwrap()),
        ("gaussian_hmm", &hmm, hmm.simulate(12, 4, None).unwrap()),
    ];
    for (name, model, x) in cases {
        for (label, method) in [
            ("fvi", MethodConfig::Fvi),
            ("const", MethodConfig::Const),
            ("mlp window [1, 1]", mlp(5, [1, 1])),
        ] {
            for entropy in [Entropy::Mc, Entropy::Analytic] {
                check(
                    model,
                    &x,
                    &method,
                    entropy,
                    &format!("{name} {label} {entropy:?}"),
                );
            }
        }
    }
}
