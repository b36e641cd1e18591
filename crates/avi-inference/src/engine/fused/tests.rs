//! The fused engine against libtorch autograd through `Model::log_joint`.

use super::*;
use avi_models::HALF_LN_2PI;

use crate::elbo::elbo_draws;
use crate::function::{Activation, FunctionConfig, Heads};
use crate::method::Edges;
use avi_models::{LinearModel, Model, NonlinearModel, NonlinearObjective, NonlinearSim, SawModel};

/// `|got − want| ≤ 1e-9 |want| + 1e-9`: both sides are f64 sums of O(N·M)
/// terms of magnitude O(1–100), so their rounding errors are ~1e-13
/// relative; 1e-9 leaves ample room and still catches any wrong term.
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-9 * want.abs() + 1e-9
}

/// The largest |got − want| / (|want| + 1) over a pair of slices.
fn worst(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / (w.abs() + 1.0))
        .fold(0.0, f64::max)
}

fn assert_all_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w), "{what}[{i}]: fused {g} vs autograd {w}");
    }
}

/// Linear, nonlinear, saw, and the nonlinear model with the authors'
/// objective (last, so that the indices of the first three stay).
fn models() -> Vec<(Box<dyn Model>, FusedModel, Vec<f64>)> {
    let lin = LinearModel::new(1.155, 2.43).unwrap();
    let non = NonlinearModel::new(NonlinearSim::Authors);
    let aut = non.with_objective(NonlinearObjective::Authors);
    let saw = SawModel::new(0.75, 0.3).unwrap();
    vec![
        (
            Box::new(lin),
            (&lin).into(),
            lin.simulate(1101, 3, None).unwrap(),
        ),
        (
            Box::new(non),
            (&non).into(),
            non.simulate(1101, 4, None).unwrap(),
        ),
        (
            Box::new(saw),
            (&saw).into(),
            saw.simulate(1101, 5, Some(3.4159)).unwrap(),
        ),
        (
            Box::new(aut),
            (&aut).into(),
            aut.simulate(1101, 4, None).unwrap(),
        ),
    ]
}

fn methods() -> Vec<MethodConfig> {
    vec![
        MethodConfig::Fvi,
        MethodConfig::Const,
        MethodConfig::Avi {
            function: FunctionConfig::Mlp {
                width: 5,
                depth: 2,
                activation: Activation::Relu,
                heads: Heads::Shared,
            },
            standardize: true,
            window: [1, 0],
            edges: Edges::Pad,
        },
    ]
}

fn variational(model: &dyn Model, x: &Tensor, method: &MethodConfig, seed: i64) -> Variational {
    tch::manual_seed(seed);
    let var = Variational::for_model(method, model, x, None, Kind::Double, Device::Cpu).unwrap();
    // Spread the local rows away from the initial U[0, 1) (log-sds in
    // about [−1.5, 1]).
    tch::no_grad(|| {
        if let crate::method::LocalFactor::Free(p) | crate::method::LocalFactor::Shared(p) =
            &var.local
        {
            let noise = Tensor::randn(p.size(), (Kind::Double, Device::Cpu)) * 0.5 - 0.3;
            let _ = p.shallow_clone().g_add_(&noise);
        }
    });
    var
}

/// Gradients of every variable of `var`, by name, after the caller's
/// backward pass.
fn grads(var: &Variational) -> Vec<(String, Vec<f64>)> {
    let mut v: Vec<_> = var
        .vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, host_vec(&t.grad()).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// For every model × {F-VI, Const, A-VI} × entropy estimator (N = 1101:
/// five blocks of the kernel, the last one partial and not a whole number
/// of lanes; 5 draws: two groups of four, the last one partial), at random
/// parameters and libtorch's own draws (the draws `elbo_draws` makes after
/// `manual_seed`, re-made here in the same order), the fused ELBO and every
/// gradient equal the plain path's (`elbo_draws` → mean → autograd through
/// `Model::log_joint`) in f64, to 1e-9 relative + 1e-9. Measured worst
/// error (printed with `--nocapture`): 6e-14.
#[test]
fn objective_and_gradients_equal_autograd() {
    // libtorch's generator is process-wide: no other test draws meanwhile.
    let _generator = crate::rng::test_serial();
    let draws = 5i64;
    let mut worst_err = 0.0f64;
    for (model, fused, x) in models() {
        let xt = Tensor::from_slice(&x);
        let n = x.len() as i64;
        for method in methods() {
            for entropy in [Entropy::Mc, Entropy::Analytic] {
                let case = format!("{fused:?} {} {entropy:?}", method.label());
                // Plain path.
                let plain = variational(model.as_ref(), &xt, &method, 11);
                tch::manual_seed(99);
                let elbo = elbo_draws(model.as_ref(), &plain, &xt, draws as usize, entropy)
                    .unwrap()
                    .mean(Kind::Double);
                elbo.neg().backward();
                let want_elbo = elbo.double_value(&[]);
                let want = grads(&plain);
                // The same draws.
                tch::manual_seed(99);
                let opts = (Kind::Double, Device::Cpu);
                let eps_theta = host_vec(&Tensor::randn([draws, 1], opts)).unwrap();
                let eps_z = host_vec(&Tensor::randn([draws, n, 1], opts)).unwrap();
                // Fused path.
                let fused_var = variational(model.as_ref(), &xt, &method, 11);
                let (tm, tls) = theta_host(&fused_var).unwrap();
                let rows = host_vec(&fused_var.local_raw()).unwrap();
                let q = FusedParams {
                    theta_mean: tm,
                    theta_log_sd: tls,
                    local_mean: rows
                        .iter()
                        .step_by(2)
                        .copied()
                        .cycle()
                        .take(n as usize)
                        .collect(),
                    local_log_sd: rows
                        .iter()
                        .skip(1)
                        .step_by(2)
                        .copied()
                        .cycle()
                        .take(n as usize)
                        .collect(),
                };
                let g = objective_and_grad(&fused, &x, &q, &eps_theta, &eps_z, entropy).unwrap();
                assert!(
                    close(g.elbo, want_elbo),
                    "{case}: ELBO {} vs {want_elbo}",
                    g.elbo
                );
                worst_err = worst_err.max(worst(&[g.elbo], &[want_elbo]));
                let get = |name: &str| &want.iter().find(|(k, _)| k == name).unwrap().1;
                // −ELBO was differentiated.
                let got_theta = [-g.theta_mean, -g.theta_log_sd];
                let want_theta = [get("theta_mean")[0], get("theta_log_sd")[0]];
                assert_all_close(&format!("{case} θ"), &got_theta, &want_theta);
                worst_err = worst_err.max(worst(&got_theta, &want_theta));
                match method {
                    MethodConfig::Fvi | MethodConfig::Const => {
                        let mut got_rows = Vec::new();
                        if method == MethodConfig::Fvi {
                            for (a, b) in g.local_mean.iter().zip(&g.local_log_sd) {
                                got_rows.extend([-a, -b]);
                            }
                        } else {
                            got_rows.push(-g.local_mean.iter().sum::<f64>());
                            got_rows.push(-g.local_log_sd.iter().sum::<f64>());
                        }
                        assert_all_close(&format!("{case} rows"), &got_rows, get("z"));
                        worst_err = worst_err.max(worst(&got_rows, get("z")));
                    }
                    MethodConfig::Markov(_) => unreachable!("no Markov case here"),
                    MethodConfig::Avi { .. } => {
                        let fill = FixedDraws {
                            eps_theta: &eps_theta,
                            eps_z: &eps_z,
                            n: n as usize,
                        };
                        // Two threads: the reduction over threads is exact
                        // to rounding too.
                        let e = torch_backward(
                            &fused_var,
                            &fused,
                            &x,
                            &fused.previous(&x),
                            draws as usize,
                            Workers::Scoped(2),
                            entropy,
                            &fill,
                        )
                        .unwrap();
                        assert!(close(e, want_elbo), "{case}: ELBO {e} vs {want_elbo}");
                        let got = grads(&fused_var);
                        assert_eq!(got.len(), want.len());
                        for ((name, a), (_, b)) in got.iter().zip(&want) {
                            assert_all_close(&format!("{case} {name}"), a, b);
                            worst_err = worst_err.max(worst(a, b));
                        }
                    }
                    MethodConfig::Semi { .. } => unreachable!("the cases hold no semi method"),
                }
            }
        }
    }
    eprintln!("worst |fused − autograd| / (|autograd| + 1): {worst_err:.2e}");
}

/// Draws are keyed on (seed, step, draw): the estimate and gradient are the
/// same whatever the number of threads, up to the order of the final sums
/// (1e-12 relative), and a re-run with the same seed repeats exactly.
#[test]
fn threads_change_only_rounding() {
    // libtorch's generator is process-wide: no other test draws meanwhile.
    let _generator = crate::rng::test_serial();
    let saw = SawModel::new(0.75, 0.0).unwrap();
    let x = saw.simulate(200, 2012, Some(3.4159)).unwrap();
    let opts = FitOptions {
        draws: 7,
        lr: 0.01,
        dtype: crate::Dtype::F64,
        ..FitOptions::default()
    };
    let run = |threads: usize| {
        let mut t = FusedTrainer::new(&(&saw).into(), &x, &MethodConfig::Fvi, &opts, Device::Cpu)
            .unwrap()
            .with_threads(threads);
        let elbos: Vec<f64> = (0..5).map(|_| t.step().unwrap()).collect();
        (elbos, t.params().unwrap())
    };
    let (e1, p1) = run(1);
    let (e3, p3) = run(3);
    let (e1b, p1b) = run(1);
    assert_eq!(e1, e1b);
    assert_eq!(p1, p1b);
    for (a, b) in e1.iter().zip(&e3) {
        assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
    }
    assert!(worst(&p1.local_mean, &p3.local_mean) < 1e-12);
    assert!(worst(&p1.local_log_sd, &p3.local_log_sd) < 1e-12);
}

/// A step's threads from a pool (the trainer's) and threads started for the
/// call split the draws alike and add the threads' sums in the same order:
/// the same bits, on every model and for 2 and 3 threads.
#[test]
fn pool_threads_equal_scoped_threads() {
    let n = 300;
    let mean: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
    let log_sd: Vec<f64> = (0..n)
        .map(|i| -1.0 + 0.3 * (i as f64 * 0.11).cos())
        .collect();
    let view = ParamsView {
        theta_mean: 0.4,
        theta_log_sd: -1.3,
        mean: &mean,
        log_sd: &log_sd,
    };
    let x: Vec<f64> = (0..n).map(|i| 2.0 * (i as f64 * 0.05).cos()).collect();
    let models = [
        FusedModel::Linear {
            tau: 1.155,
            sigma: 2.43,
        },
        FusedModel::Nonlinear,
        FusedModel::NonlinearAuthors,
        FusedModel::Saw {
            alpha: 0.75,
            x0: 0.0,
        },
    ];
    let fill = PhiloxDraws {
        key: rng::key(17),
        step: 3,
    };
    for model in models {
        let prev = model.previous(&x);
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let run = |workers| evaluate(&model, &x, &prev, &view, 50, workers, Entropy::Mc, &fill);
            let (a, b) = (run(Workers::Pool(&pool)), run(Workers::Scoped(threads)));
            let bits = |g: &FusedGrad| -> Vec<u64> {
                [g.elbo, g.theta_mean, g.theta_log_sd]
                    .iter()
                    .chain(&g.local_mean)
                    .chain(&g.local_log_sd)
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(&a), bits(&b), "{model:?}, {threads} threads");
        }
    }
}

/// Three Rust [`Adam`] steps equal three `nn::Adam` steps from the same
/// gradients: 1e-12 relative + 1e-15 in f64; in f32 (libtorch rounds every
/// operation to f32, we do not) 1e-6 relative + 1e-7.
#[test]
fn adam_equals_libtorch() {
    // libtorch's generator is process-wide: no other test draws meanwhile.
    let _generator = crate::rng::test_serial();
    for (kind, rel, abs) in [(Kind::Double, 1e-12, 1e-15), (Kind::Float, 1e-6, 1e-7)] {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs
            .root()
            .add("p", Tensor::randn([50], (kind, Device::Cpu)), true);
        let mut opt = nn::Adam::default().build(&vs, 0.05).unwrap();
        let mut ours = host_vec(&p).unwrap();
        let mut adam = Adam::new(0.05, ours.len());
        for _ in 0..3 {
            let g = Tensor::randn([50], (kind, Device::Cpu)) * 3.0;
            opt.zero_grad();
            (&p * &g).sum(kind).backward();
            opt.step();
            adam.step(&mut ours, &host_vec(&g).unwrap());
        }
        let theirs = host_vec(&p).unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() <= rel * b.abs() + abs, "{kind:?}: {a} vs {b}");
        }
    }
}

/// Fused F-VI on the linear model (N = 500, 3000 steps, lr 0.02, 100 draws)
/// reaches the closed-form optimum: the exact ELBO of the fitted q is within
/// 0.5 + 0.002·N nats of the optimum (the tolerance of
/// tests/tests/linear_closed_form.rs) and not above it.
#[test]
fn fvi_reaches_the_linear_optimum() {
    // libtorch's generator is process-wide: no other test draws meanwhile.
    let _generator = crate::rng::test_serial();
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let n = 500;
    let x = model.simulate(n, 7, None).unwrap();
    let opt = model.fvi_optimum(&x).unwrap();
    let opts = FitOptions {
        lr: 0.02,
        draws: 100,
        seed: 5,
        ..FitOptions::default()
    };
    let mut t = FusedTrainer::new(&(&model).into(), &x, &MethodConfig::Fvi, &opts, Device::Cpu)
        .unwrap()
        .with_threads(2);
    for _ in 0..3000 {
        t.step().unwrap();
    }
    let q = t.params().unwrap();
    let sd: Vec<f64> = q.local_log_sd.iter().map(|v| v.exp()).collect();
    let exact = model
        .exact_elbo(&x, q.theta_mean, q.theta_log_sd.exp(), &q.local_mean, &sd)
        .unwrap();
    let tol = 0.5 + 2e-3 * n as f64;
    eprintln!("exact ELBO {exact}, optimum {}", opt.elbo);
    assert!(
        opt.elbo - exact <= tol && exact <= opt.elbo + 1e-6 * opt.elbo.abs(),
        "exact ELBO {exact} vs optimum {}",
        opt.elbo
    );
}

/// Parameters for the kernel-level tests below: μ_n and log s_n spread
/// over O(1) values, with μ_7 = `wild` (beyond the vectorised sine's
/// domain when ≥ 1e5).
fn spread(n: usize, wild: f64) -> (Vec<f64>, Vec<f64>) {
    let mut mean: Vec<f64> = (0..n).map(|i| 2.0 * (i as f64 * 0.37).sin()).collect();
    mean[7] = wild;
    let log_sd = (0..n)
        .map(|i| 0.5 * (i as f64 * 0.11).cos() - 1.0)
        .collect();
    (mean, log_sd)
}

/// The AVX2 build of the kernel and the portable one give the same bits
/// (the same operations in the same order; only the register width
/// differs) on every model, with Philox draws, for tame and wild
/// parameters. Where the CPU lacks AVX2 both sides are the portable build.
#[test]
fn avx2_and_portable_builds_agree_bitwise() {
    for (_, fused, x) in models() {
        for wild in [0.5, 3e5] {
            let (mean, log_sd) = spread(x.len(), wild);
            let sd: Vec<f64> = log_sd.iter().map(|v: &f64| v.exp()).collect();
            let prev = fused.previous(&x);
            let q = ParamsView {
                theta_mean: 0.3,
                theta_log_sd: -0.4,
                mean: &mean,
                log_sd: &log_sd,
            };
            let source = PhiloxDraws {
                key: rng::key(5),
                step: 3,
            };
            let ctx = Ctx {
                model: fused,
                x: &x,
                prev: &prev,
                q: &q,
                sd: &sd,
                theta_sd: 0.4f64.exp().recip(),
                draws: 10,
                source: &source,
            };
            let (a, sa) = work(&ctx, 0..3);
            let (b, sb) = work_portable(&ctx, 0..3);
            let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&[a.elbo, a.theta_mean, a.theta_log_sd, sa]),
                bits(&[b.elbo, b.theta_mean, b.theta_log_sd, sb]),
                "{fused:?}"
            );
            assert_eq!(bits(&a.mean), bits(&b.mean), "{fused:?}");
            assert_eq!(bits(&a.log_sd), bits(&b.log_sd), "{fused:?}");
        }
    }
}

/// A z_n beyond the vectorised sine's domain sends its pass to the standard
/// library: for both objectives of the nonlinear model, the estimate and
/// gradient with μ_7 = 1e9 (where the fast reduction by π/2 is no longer
/// exact) equal a direct f64 sum of `FusedModel::term` over the same draws
/// (1e-9 relative + 1e-9, as `close`; both are sums of O(N·M) terms).
#[test]
fn wild_draws_use_the_exact_functions() {
    let mut all = models();
    let authors = all.swap_remove(3);
    let model = all.swap_remove(1);
    assert_eq!(model.1, FusedModel::Nonlinear);
    assert_eq!(authors.1, FusedModel::NonlinearAuthors);
    for (_, fused, x) in [model, authors] {
        wild_draws_case(fused, &x);
    }
}

fn wild_draws_case(fused: FusedModel, x: &[f64]) {
    let n = x.len();
    let (mean, log_sd) = spread(n, 1e9);
    let m = 6;
    let eps_theta: Vec<f64> = (0..m).map(|d| (d as f64 * 0.9).sin()).collect();
    let eps_z: Vec<f64> = (0..m * n).map(|k| (k as f64 * 0.013).cos() * 1.5).collect();
    let q = FusedParams {
        theta_mean: 0.2,
        theta_log_sd: -1.0,
        local_mean: mean.clone(),
        local_log_sd: log_sd.clone(),
    };
    let got = objective_and_grad(&fused, x, &q, &eps_theta, &eps_z, Entropy::Analytic).unwrap();
    let (ts, prev) = ((-1.0f64).exp(), fused.previous(x));
    let (mut elbo, mut g_mean, mut g_log_sd) = (0.0, vec![0.0; n], vec![0.0; n]);
    for d in 0..m {
        let t = 0.2 + ts * eps_theta[d];
        elbo += fused.log_prior(t).0;
        for i in 0..n {
            let e = eps_z[d * n + i];
            let (v, dz, _) = fused.term(t, mean[i] + log_sd[i].exp() * e, x[i], prev[i]);
            elbo += v;
            g_mean[i] += dz / m as f64;
            g_log_sd[i] += dz * e * log_sd[i].exp() / m as f64;
        }
    }
    let entropy: f64 = log_sd.iter().sum::<f64>() - 1.0 + (n + 1) as f64 * (0.5 + HALF_LN_2PI);
    let want = elbo / m as f64 + fused.constant(n) + entropy;
    assert!(
        close(got.elbo, want),
        "{fused:?}: ELBO {} vs {want}",
        got.elbo
    );
    let g_log_sd: Vec<f64> = g_log_sd.iter().map(|g| g + 1.0).collect();
    assert_all_close(&format!("{fused:?} μ"), &got.local_mean, &g_mean);
    assert_all_close(&format!("{fused:?} log s"), &got.local_log_sd, &g_log_sd);
}

/// A-VI configurations the host network covers: the polynomial, shared and
/// separate MLPs, ReLU and leaky ReLU, depths 1–3, padded and free edges.
fn host_functions() -> Vec<MethodConfig> {
    let mlp = |width, depth, activation, heads, window, edges| MethodConfig::Avi {
        function: FunctionConfig::Mlp {
            width,
            depth,
            activation,
            heads,
        },
        standardize: true,
        window,
        edges,
    };
    vec![
        MethodConfig::Avi {
            function: FunctionConfig::Poly { degree: 2 },
            standardize: true,
            window: [0, 0],
            edges: Edges::Pad,
        },
        mlp(5, 2, Activation::Relu, Heads::Shared, [1, 0], Edges::Pad),
        mlp(
            4,
            1,
            Activation::LeakyRelu,
            Heads::Separate,
            [0, 0],
            Edges::Pad,
        ),
        mlp(3, 3, Activation::Relu, Heads::Separate, [1, 1], Edges::Free),
        mlp(
            6,
            2,
            Activation::LeakyRelu,
            Heads::Shared,
            [2, 0],
            Edges::Free,
        ),
    ]
}

/// The host network (the fused engine's A-VI path without libtorch) against
/// libtorch autograd through `elbo_draws` and the model's log joint, at the
/// same draws, in f64, on every model and every configuration of
/// [`host_functions`] (N = 1101: five blocks of rows, the last partial):
/// the rows q(z_n) equal `local_raw` and the ELBO and the gradient of every
/// parameter tensor (θ, free edge rows, φ) equal autograd's, to 1e-9
/// relative + 1e-9 (`close`). After an Adam step, the parameters written
/// back into the libtorch tensors give the host's rows (1e-12).
#[test]
fn host_network_gradients_equal_autograd() {
    // libtorch's generator is process-wide: no other test draws meanwhile.
    let _generator = crate::rng::test_serial();
    let draws = 5i64;
    let mut worst_err = 0.0f64;
    for (model, fused, x) in models() {
        let xt = Tensor::from_slice(&x);
        let n = x.len();
        for method in host_functions() {
            if matches!(
                (&method, model.name()),
                (
                    MethodConfig::Avi {
                        function: FunctionConfig::Poly { .. },
                        ..
                    },
                    "saw"
                )
            ) {
                continue;
            }
            let case = format!("{fused:?} {}", method.label());
            let var = variational(model.as_ref(), &xt, &method, 11);
            let want_rows = host_vec(&var.local_raw()).unwrap();
            tch::manual_seed(99);
            let elbo = elbo_draws(model.as_ref(), &var, &xt, draws as usize, Entropy::Mc)
                .unwrap()
                .mean(Kind::Double);
            elbo.neg().backward();
            let want_elbo = elbo.double_value(&[]);
            tch::manual_seed(99);
            let opts = (Kind::Double, Device::Cpu);
            let eps_theta = host_vec(&Tensor::randn([draws, 1], opts)).unwrap();
            let eps_z = host_vec(&Tensor::randn([draws, n as i64, 1], opts)).unwrap();

            let Ok(mut host) = HostAvi::new(var, 0.01).unwrap() else {
                panic!("{case}: the host network does not cover it");
            };
            let (mean, log_sd) = host.rows(n);
            let got_rows: Vec<f64> = mean
                .iter()
                .zip(&log_sd)
                .flat_map(|(m, s)| [*m, *s])
                .collect();
            assert!(worst(&got_rows, &want_rows) <= 1e-12, "{case}: rows");
            let fill = FixedDraws {
                eps_theta: &eps_theta,
                eps_z: &eps_z,
                n,
            };
            let view = ParamsView {
                theta_mean: host.params[0],
                theta_log_sd: host.params[1],
                mean: &mean,
                log_sd: &log_sd,
            };
            let prev = fused.previous(&x);
            let g = evaluate(
                &fused,
                &x,
                &prev,
                &view,
                draws as usize,
                Workers::Scoped(2),
                Entropy::Mc,
                &fill,
            );
            assert!(
                close(g.elbo, want_elbo),
                "{case}: ELBO {} vs {want_elbo}",
                g.elbo
            );
            let grad = host.loss_grad(&g);
            let mut covered = 0;
            for slot in &host.slots {
                let len = slot.tensor.numel();
                let want = host_vec(&slot.tensor.grad()).unwrap();
                let got = &grad[slot.start..slot.start + len];
                assert_all_close(&format!("{case} {:?}", slot.tensor.size()), got, &want);
                worst_err = worst_err.max(worst(got, &want));
                covered += len;
            }
            let stored: i64 = host
                .var
                .vs
                .variables()
                .values()
                .map(|t| t.numel() as i64)
                .sum();
            assert_eq!(covered, grad.len(), "{case}: every scalar has a slot");
            assert_eq!(covered as i64, stored, "{case}: every tensor has a slot");

            let grad = grad.clone();
            host.adam.step(&mut host.params, &grad);
            let (mean, log_sd) = host.rows(n);
            let synced = host_vec(&host.synced().local_raw()).unwrap();
            let got_rows: Vec<f64> = mean
                .iter()
                .zip(&log_sd)
                .flat_map(|(m, s)| [*m, *s])
                .collect();
            assert!(
                worst(&got_rows, &synced) <= 1e-12,
                "{case}: rows after write-back"
            );
            assert!(
                worst(&got_rows, &want_rows) > 1e-6,
                "{case}: the step moved nothing"
            );
        }
    }
    eprintln!("worst |host − autograd| / (|autograd| + 1): {worst_err:.2e}");
}

/// The host network's AVX2 build and its portable one give the same bits
/// (rows and gradients) on a separate-heads MLP with free edges.
#[test]
fn host_network_builds_agree_bitwise() {
    // libtorch's generator is process-wide: no other test draws meanwhile.
    let _generator = crate::rng::test_serial();
    let (model, _, x) = models().swap_remove(2);
    let xt = Tensor::from_slice(&x);
    let n = x.len();
    let method = host_functions().swap_remove(3);
    let var = variational(model.as_ref(), &xt, &method, 3);
    let Ok(host) = HostAvi::new(var, 0.01).unwrap() else {
        panic!("not covered");
    };
    let (b, a) = (host.before, host.after);
    let phi = &host.params[host.phi_at()..];
    let rows = b..n - a;
    let (mut m1, mut s1) = (vec![0.0; rows.len()], vec![0.0; rows.len()]);
    let (mut m2, mut s2) = (m1.clone(), s1.clone());
    net::forward(&host.net, phi, rows.clone(), &mut m1, &mut s1);
    host.net.forward(phi, rows.clone(), &mut m2, &mut s2);
    let d: Vec<f64> = (0..rows.len()).map(|i| (i as f64 * 0.3).sin()).collect();
    let (mut g1, mut g2) = (vec![0.0; phi.len()], vec![0.0; phi.len()]);
    net::backward(&host.net, phi, rows.clone(), &d, &m1, &mut g1);
    host.net.backward(phi, rows, &d, &m1, &mut g2);
    let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&m1), bits(&m2));
    assert_eq!(bits(&s1), bits(&s2));
    assert_eq!(bits(&g1), bits(&g2));
}
