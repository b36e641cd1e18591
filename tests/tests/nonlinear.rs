//! The nonlinear model (Eq. 15) at small N: F-VI and A-VI (two separate MLPs,
//! as in the authors' code) both improve the ELBO far beyond their start,
//! and A-VI with k = 16 gets close to F-VI while Const does not. A-VI runs
//! twice: on the raw observations, as the authors' code and the paper feed
//! the network, and on standardised ones (`standardize: true`, this
//! project's default, beyond the paper).

use avi_inference::{Activation, Dtype, Edges, FitOptions, FunctionConfig, Heads, MethodConfig};
use avi_models::{NonlinearModel, NonlinearSim};
use avi_tests::fit_cpu;

#[test]
fn fvi_and_avi_improve_the_elbo() {
    let model = NonlinearModel::new(NonlinearSim::Model);
    let x = model.simulate(300, 1789, None).unwrap();
    let opts = FitOptions {
        steps: 3000,
        lr: 0.01,
        draws: 100,
        seed: 1797,
        eval_draws: 2000,
        dtype: Dtype::F32,
        ..FitOptions::default()
    };
    let avi = |standardize: bool| MethodConfig::Avi {
        function: FunctionConfig::Mlp {
            width: 16,
            depth: 2,
            activation: Activation::Relu,
            heads: Heads::Separate,
        },
        standardize,
        window: [0, 0],
        edges: Edges::Pad,
    };
    let mut finals = Vec::new();
    for (label, method) in [
        ("fvi", MethodConfig::Fvi),
        ("avi k=16", avi(true)),
        ("avi k=16 raw input", avi(false)),
        ("const", MethodConfig::Const),
    ] {
        let fit = fit_cpu(&model, &x, &method, &opts);
        let start = fit.trace.elbo[..20].iter().sum::<f64>() / 20.0;
        // Every family improves on its initialisation by far more than the
        // Monte Carlo error of the final estimate.
        assert!(
            fit.elbo > start + 20.0 * fit.elbo_se.max(1.0),
            "{label}: start {start}, final {} ± {}",
            fit.elbo,
            fit.elbo_se
        );
        finals.push((label, fit.elbo, fit.elbo_se));
    }
    let (fvi, avi, raw, cst) = (finals[0].1, finals[1].1, finals[2].1, finals[3].1);
    // A-VI (k = 16) within 1% of F-VI's ELBO (the paper's criterion); Const
    // clearly below both.
    assert!((fvi - avi).abs() <= 0.01 * fvi.abs(), "{finals:?}");
    assert!(cst < fvi - 10.0 && cst < avi - 10.0, "{finals:?}");
    // On raw input too, within the paper's 1% of F-VI: here -708.6 against
    // F-VI's -707.6 (0.14%), and 0.11% and 0.15% on two other data and fit
    // seeds (11/12, 21/22), so 1% leaves about seven times the observed
    // gap. Raw input starts further off (its first steps' ELBO was -6,196
    // here, -4.0e7 on seeds 21/22) but catches up within about 1,500 steps.
    // Const is 10 nats below it as well.
    assert!((fvi - raw).abs() <= 0.01 * fvi.abs(), "{finals:?}");
    assert!(cst < raw - 10.0, "{finals:?}");
}
