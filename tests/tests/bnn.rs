//! The Bayesian neural network (Eq. 16) on a few hundred Fashion-MNIST
//! images, with mini-batches: F-VI and A-VI (encoder 784 → k → k → (64, 64),
//! LeakyReLU 0.2) both improve the ELBO far beyond Monte Carlo noise. The
//! full-size runs (N = 10,000, 50,000 steps) are experiments, not tests.

use std::path::Path;

use avi_inference::{fit, Dtype, FitOptions, MethodConfig};
use avi_models::{fashion_mnist, BnnModel, Model};
use avi_tests::bnn_encoder;
use tch::Tensor;

#[test]
fn bnn_fvi_and_avi_improve_the_elbo() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fashion-mnist");
    let data = fashion_mnist::load(&dir, fashion_mnist::Split::Train, 200).unwrap();
    let x = Tensor::from_slice(&data.images).view([200, 784]);
    let model = BnnModel::default();
    assert_eq!(model.theta_dim(), 283_920);
    let opts = FitOptions {
        steps: 200,
        lr: 1e-3,
        draws: 1,
        seed: 1797,
        eval_draws: 20,
        dtype: Dtype::F32,
        batch_size: Some(50),
        ..FitOptions::default()
    };
    for (label, method) in [("fvi", MethodConfig::Fvi), ("avi k=32", bnn_encoder(32))] {
        let f = fit(&model, &x, &method).options(&opts).run().unwrap();
        let start = f.trace.elbo[..20].iter().sum::<f64>() / 20.0;
        let end = f.trace.elbo[f.trace.elbo.len() - 20..].iter().sum::<f64>() / 20.0;
        println!(
            "{label}: start {start:.0}, end {end:.0}, final {:.0} ± {:.0}",
            f.elbo, f.elbo_se
        );
        // Mini-batch ELBO estimates (one draw) are noisy, so windows of 20
        // steps are compared; the improvement must dwarf the final estimate's
        // standard error (measured: improvements of ~1e5–1e6 nats).
        assert!(
            end > start + 10.0 * f.elbo_se.max(1.0),
            "{label}: {start} → {end}"
        );
        assert!(
            f.elbo.is_finite() && f.elbo > start,
            "{label}: final {}",
            f.elbo
        );
        assert_eq!(f.q_z.shape, vec![200, 64]);
    }
}
