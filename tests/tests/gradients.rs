//! The reparameterised ELBO gradient of every model and family against
//! central finite differences in f64, with the Monte Carlo draws held fixed
//! (the generator is re-seeded before each evaluation).

use avi_inference::testing::Trainer;
use avi_inference::{elbo_draws, Dtype, Entropy, FitOptions, MethodConfig};
use avi_models::{
    BnnModel, DiscreteHmm, GaussianHmm, LinearModel, MixtureModel, Model, NonlinearModel,
    NonlinearSim, SawModel,
};
use avi_tests::mlp;
use tch::{Device, Kind, Tensor};

fn check(
    model: &dyn Model,
    x: &[f64],
    dim: Option<usize>,
    method: &MethodConfig,
    entropy: Entropy,
    what: &str,
) {
    let opts = FitOptions {
        dtype: Dtype::F64,
        entropy,
        ..FitOptions::default()
    };
    let xt = Tensor::from_slice(x);
    let xt = match dim {
        Some(d) => xt.view([-1, d as i64]),
        None => xt,
    };
    let trainer = Trainer::new(model, &xt, method, None, &opts, Device::Cpu).expect("trainer");
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

/// (name, model, data, observation dimension for vector data).
type Case<'a> = (&'static str, &'a dyn Model, Vec<f64>, Option<usize>);

#[test]
fn elbo_gradients_match_finite_differences() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let nonlinear = NonlinearModel::new(NonlinearSim::Model);
    let saw = SawModel::new(0.75, 0.5).unwrap();
    let hmm = GaussianHmm::new(0.9, 0.5, 0.7, 1.2).unwrap();
    let mixture = MixtureModel::new(3, 2, 3.0, 0.8, Some(&[0.2, 0.3, 0.5])).unwrap();
    let dhmm = DiscreteHmm::new(&[0.3, 0.7], &[0.8, 0.2, 0.4, 0.6], 0.6, 2.0).unwrap();
    let bnn = BnnModel::new(2, 3, 4).unwrap();
    let cases: Vec<Case> = vec![
        (
            "linear",
            &linear,
            linear.simulate(12, 1, None).unwrap(),
            None,
        ),
        (
            "nonlinear",
            &nonlinear,
            nonlinear.simulate(12, 2, None).unwrap(),
            None,
        ),
        ("saw", &saw, saw.simulate(12, 3, None).unwrap(), None),
        (
            "gaussian_hmm",
            &hmm,
            hmm.simulate(12, 4, None).unwrap(),
            None,
        ),
        (
            "mixture",
            &mixture,
            mixture.simulate(12, 5, None).unwrap(),
            Some(2),
        ),
        (
            "discrete_hmm",
            &dhmm,
            dhmm.simulate(12, 6, None).unwrap(),
            None,
        ),
        ("bnn", &bnn, bnn.simulate(6, 7, None).unwrap(), Some(4)),
    ];
    for (name, model, x, dim) in cases {
        for (label, method) in [
            ("fvi", MethodConfig::Fvi),
            ("const", MethodConfig::Const),
            ("mlp window [1, 1]", mlp(5, [1, 1])),
        ] {
            for entropy in [Entropy::Mc, Entropy::Analytic] {
                let what = format!("{name} {label} {entropy:?}");
                check(model, &x, dim, &method, entropy, &what);
            }
        }
    }
}
