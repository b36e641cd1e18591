//! F-VI with coordinate-ascent updates of the categorical factors (issue
//! 17): on discrete HMM data like the (K = 3, N = 500,
//! self-transitions 0.9, emission means −1.5, 0.5, 2.0, sd 0.9, θ fixed at
//! the truth), `"local_updates": "cavi"` reaches the best of 20 randomly
//! started mean-field CAVI runs, where gradient F-VI stalls below it.

use std::time::Instant;

use avi_inference::{fit, Dtype, Engine, Fit, FitOptions, LocalUpdates, MethodConfig};
use avi_models::hmm_reference::{forward_backward, mean_field_cavi_from};
use avi_models::DiscreteHmm;
use tch::Tensor;

const K: usize = 3;
const N: usize = 500;
const MU: [f64; K] = [-1.5, 0.5, 2.0];
const SD: f64 = 0.9;
const PI: [f64; K] = [1.0 / 3.0; K];
const A: [f64; K * K] = [0.9, 0.05, 0.05, 0.05, 0.9, 0.05, 0.05, 0.05, 0.9];

fn model() -> DiscreteHmm {
    DiscreteHmm::new(&PI, &A, SD, 2.0).unwrap()
}

/// Random factors (rows of a flat Dirichlet-like draw) from a splitmix64
/// stream: the reference's random starts.
fn random_start(seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut uniform = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut q = Vec::with_capacity(N * K);
    for _ in 0..N {
        let row: Vec<f64> = (0..K).map(|_| -(1.0 - uniform()).ln()).collect();
        let total: f64 = row.iter().sum();
        q.extend(row.iter().map(|v| v / total));
    }
    q
}

/// The best ELBO of 20 randomly started mean-field CAVI runs (500 sweeps).
fn best_cavi(x: &[f64]) -> f64 {
    (0..20)
        .map(|r| {
            mean_field_cavi_from(&PI, &A, &MU, SD, x, &random_start(r), 500)
                .unwrap()
                .1
        })
        .fold(f64::NEG_INFINITY, f64::max)
}

fn fvi(x: &[f64], opts: &FitOptions) -> Fit {
    let model = model();
    let xt = Tensor::from_slice(x);
    fit(&model, &xt, &MethodConfig::Fvi)
        .fixed_theta(Some(&MU))
        .options(opts)
        .run()
        .expect("fit runs")
}

fn cavi_options(seed: u64, dtype: Dtype) -> FitOptions {
    FitOptions {
        steps: 100,
        seed,
        eval_draws: 2,
        dtype,
        local_updates: LocalUpdates::Cavi,
        ..FitOptions::default()
    }
}

/// Annealed CAVI sweeps (`"local_updates": "annealed_cavi"`, 100 sweeps)
/// reach the best of 20 randomly started mean-field CAVI runs on three
/// simulated data sets, from three seeds each, in f64 and f32: within 0.5
/// nats (CAVI's local optima: the best of 20 random starts itself varies
/// by 0.8 nats between batches of 20 on data set 1, and annealing from
/// 0.3 lands on one optimum whatever the start; measured −817.819 vs the
/// reference's −818.205, −810.798 vs −810.798 and −792.926 vs −792.733,
/// the same to 1e-3 in f32). Plain CAVI sweeps never lower the ELBO but
/// stop in the local optimum nearest their random start (measured 3–8 nats
/// below); gradient F-VI with the settings stops 14 nats below.
#[test]
fn cavi_updates_reach_the_mean_field_optimum() {
    const TOLERANCE: f64 = 0.5;
    let mut annealed_first = f64::NAN;
    let mut x_first = Vec::new();
    for data_seed in [1u64, 2, 3] {
        let x = model().simulate(N, data_seed, Some(&MU)).unwrap();
        let exact = forward_backward(&PI, &A, &MU, SD, &x)
            .unwrap()
            .log_likelihood;
        let reference = best_cavi(&x);
        for (dtype, updates) in [
            (Dtype::F64, LocalUpdates::Cavi),
            (Dtype::F64, LocalUpdates::AnnealedCavi),
            (Dtype::F32, LocalUpdates::AnnealedCavi),
        ] {
            let t0 = Instant::now();
            let fits: Vec<Fit> = [1u64, 2, 3]
                .iter()
                .map(|&s| {
                    fvi(
                        &x,
                        &FitOptions {
                            local_updates: updates,
                            ..cavi_options(s, dtype)
                        },
                    )
                })
                .collect();
            let elbos: Vec<f64> = fits.iter().map(|f| f.elbo).collect();
            eprintln!(
                "data {data_seed} {dtype:?} {updates:?}: F-VI {elbos:.3?} ({:.2} s for 3), \
                 CAVI best of 20 {reference:.3}, log p(x|θ) {exact:.3}",
                t0.elapsed().as_secs_f64()
            );
            let rounding = match dtype {
                Dtype::F64 => 1e-9,
                Dtype::F32 => 1e-4,
            } * exact.abs();
            for f in &fits {
                assert_eq!(f.engine, Engine::Torch);
                assert_eq!(f.trace.elbo.len(), 100);
                let last = *f.trace.elbo.last().unwrap();
                // θ fixed and z enumerated: the final ELBO is exact, the
                // trace's last value.
                assert!((f.elbo - last).abs() <= rounding, "{} vs {last}", f.elbo);
                assert!(
                    f.elbo <= exact + rounding,
                    "{} above log p(x|θ) {exact}",
                    f.elbo
                );
                if updates == LocalUpdates::Cavi {
                    // Coordinate ascent: the ELBO never falls.
                    for w in f.trace.elbo.windows(2) {
                        assert!(w[1] >= w[0] - rounding, "ELBO fell: {w:?}");
                    }
                } else {
                    assert!(
                        f.elbo >= reference - TOLERANCE,
                        "data {data_seed}: annealed CAVI {} below the best of 20 CAVI runs {reference}",
                        f.elbo
                    );
                }
            }
            if data_seed == 1 && updates == LocalUpdates::AnnealedCavi {
                annealed_first = elbos[0];
            }
        }
        if data_seed == 1 {
            x_first = x;
        }
    }
    // The gradient F-VI (lr 0.05, 6,000 steps, 10 draws) on data
    // set 1: its trace is flat, below the optimum (measured −832.2).
    let t0 = Instant::now();
    let grad = fvi(
        &x_first,
        &FitOptions {
            steps: 6000,
            lr: 0.05,
            draws: 10,
            seed: 1,
            eval_draws: 2,
            ..FitOptions::default()
        },
    );
    let t = &grad.trace.elbo;
    eprintln!(
        "gradient F-VI: {:.3} (step 3000 {:.3}, step 6000 {:.3}; {:.2} s); annealed CAVI {annealed_first:.3}",
        grad.elbo,
        t[2999],
        t[5999],
        t0.elapsed().as_secs_f64()
    );
    assert!(
        grad.elbo < annealed_first - 1.0,
        "{} vs {annealed_first}",
        grad.elbo
    );
}

/// What CAVI does not cover is refused with an error naming
/// `local_updates` (or the engine): a free q(θ), A-VI, an engine other
/// than libtorch's, continuous local latents, and a model whose factors
/// interact beyond their chain neighbours.
#[test]
fn cavi_refuses_what_it_does_not_cover() {
    let x = model().simulate(50, 4, Some(&MU)).unwrap();
    let xt = Tensor::from_slice(&x);
    let hmm = model();
    let opts = cavi_options(1, Dtype::F64);
    let field = |r: avi_inference::Result<Fit>| match r {
        Err(avi_inference::InferenceError::InvalidConfig { field, reason }) => {
            eprintln!("{field}: {reason}");
            field
        }
        other => panic!("expected a refusal, got {:?}", other.map(|f| f.elbo)),
    };
    let free = fit(&hmm, &xt, &MethodConfig::Fvi).options(&opts).run();
    assert_eq!(field(free), "local_updates");
    let avi = fit(&hmm, &xt, &avi_tests::mlp(8, [1, 1]))
        .fixed_theta(Some(&MU))
        .options(&opts)
        .run();
    assert_eq!(field(avi), "local_updates");
    let graph = fit(&hmm, &xt, &MethodConfig::Fvi)
        .fixed_theta(Some(&MU))
        .options(FitOptions {
            engine: Engine::Graph,
            ..opts.clone()
        })
        .run();
    assert_eq!(field(graph), "local_updates");
    let linear = avi_models::LinearModel::new(1.155, 2.43).unwrap();
    let lx = Tensor::from_slice(&linear.simulate(50, 1, None).unwrap());
    let continuous = fit(&linear, &lx, &MethodConfig::Fvi)
        .fixed_theta(Some(&[0.5]))
        .options(&opts)
        .run();
    assert_eq!(field(continuous), "local_updates");
    let skip = fit(&SkipChain, &xt, &MethodConfig::Fvi)
        .fixed_theta(Some(&[0.0]))
        .options(&opts)
        .run();
    assert_eq!(field(skip), "local_updates");
}

/// Two states per z_n, each meeting z_(n+2): the even/odd half-sweeps
/// would not be coordinate ascent.
struct SkipChain;

impl avi_models::Model for SkipChain {
    fn name(&self) -> &'static str {
        "skip_chain"
    }
    fn theta_dim(&self) -> usize {
        1
    }
    fn local_dim(&self) -> usize {
        2
    }
    fn local_states(&self) -> Option<usize> {
        Some(2)
    }
    fn check_data(&self, _x: &Tensor) -> avi_models::Result<()> {
        Ok(())
    }
    fn log_joint(&self, _t: &Tensor, _z: &Tensor, _x: &Tensor) -> avi_models::Result<Tensor> {
        unreachable!("discrete z")
    }
    fn log_prior(&self, theta: &Tensor) -> avi_models::Result<Tensor> {
        Ok(theta.sum_dim_intlist(1, false, theta.kind()) * 0.0)
    }
    fn expected_log_joint(
        &self,
        theta: &Tensor,
        log_probs: &Tensor,
        _x: &Tensor,
    ) -> avi_models::Result<Tensor> {
        let q = log_probs.exp();
        let n = q.size()[0];
        let pair = (q.narrow(0, 0, n - 2) * q.narrow(0, 2, n - 2)).sum(q.kind());
        Ok(theta.sum_dim_intlist(1, false, theta.kind()) * 0.0 + pair)
    }
}
