//! Stopping early ([`StopRule`]), the convergence verdict of every fit
//! ([`avi_inference::Convergence`]) and interrupts
//! ([`avi_inference::FitRequest::interrupt`]), on the experiments' models
//! at sizes that run in seconds.

use std::sync::atomic::{AtomicBool, Ordering};

use avi_inference::convergence::first_within;
use avi_inference::{
    fit, Engine, FitOptions, FitStatus, FunctionConfig, MethodConfig, Observer, StopRule,
};
use avi_models::{LinearModel, SawModel};
use avi_tests::{fit_cpu, linear_exact_elbo, saw_exact_elbo};
use tch::Tensor;

fn poly1() -> MethodConfig {
    MethodConfig::Avi {
        function: FunctionConfig::Poly { degree: 1 },
        standardize: true,
        window: [0, 0],
        edges: Default::default(),
    }
}

/// The linear experiment (`data/experiments/linear.json`: τ = 1.155,
/// σ = 2.43, its 5,000 steps and learning rates) at its quick size,
/// N = 1,000.
fn linear_data() -> (LinearModel, Vec<f64>) {
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let x = model.simulate(1000, 7, None).unwrap();
    (model, x)
}

fn with_stop(o: &FitOptions) -> FitOptions {
    FitOptions {
        stop: Some(StopRule::default()),
        ..o.clone()
    }
}

/// A stopped fit is the full fit cut short: the same trace up to its stop
/// (the rule is read between blocks and changes nothing before), a stop
/// at a window boundary, the step count and the reason recorded.
fn assert_prefix(full: &avi_inference::Fit, stopped: &avi_inference::Fit) -> usize {
    let s = stopped.stopped_at.expect("the rule stopped the fit");
    assert_eq!(stopped.status, FitStatus::Ok);
    assert_eq!(stopped.iterations, s);
    assert_eq!(s % StopRule::default().window, 0, "{s}");
    assert_eq!(stopped.trace.elbo, full.trace.elbo[..s].to_vec());
    let reason = stopped.stop_reason.as_deref().unwrap();
    assert!(reason.contains("windows of 300 steps"), "{reason}");
    assert!(reason.contains(&format!("ending at step {s}")), "{reason}");
    assert_eq!(full.stopped_at, None);
    s
}

/// Linear, A-VI with d = 1 at lr 0.01 (the experiment's): the rule stops
/// it after the step at which the paper's windowed 1 % metric counts the
/// full run converged and before its 5,000 steps, with an exact ELBO
/// (closed form, no Monte Carlo error) within 1 nat of the full run's and
/// of the optimum. 1 nat: the rule's relative tolerance lets a stopped fit
/// rise by at most 10⁻⁴ × |ELBO| ≈ 0.24 nats per window of 300 steps, and
/// a fit that stops gains less than that in each of its last 3 windows
/// (measured: 0.1 nats below the full run).
#[test]
fn linear_stops_after_the_papers_metric_near_the_full_result() {
    let (model, x) = linear_data();
    let opt = model.fvi_optimum(&x).unwrap();
    let o = FitOptions {
        steps: 5000,
        lr: 0.01,
        seed: 1954,
        ..FitOptions::default()
    };
    let full = fit_cpu(&model, &x, &poly1(), &o);
    let stopped = fit_cpu(&model, &x, &poly1(), &with_stop(&o));
    let s = assert_prefix(&full, &stopped);
    let paper = first_within(&full.trace.elbo, opt.elbo, 0.01, 10).unwrap();
    assert!(paper <= s && s < o.steps, "1 % metric {paper}, stop {s}");
    let (e_full, e_stop) = (
        linear_exact_elbo(&model, &x, &full),
        linear_exact_elbo(&model, &x, &stopped),
    );
    println!(
        "linear d=1: stop {s}, 1 % metric {paper}, exact ELBO {e_stop:.3} vs full {e_full:.3}, optimum {:.3}",
        opt.elbo
    );
    assert!((e_full - e_stop).abs() <= 1.0, "{e_full} vs {e_stop}");
    assert!(opt.elbo - e_stop <= 1.0, "{e_stop} vs optimum {}", opt.elbo);
    // Converged, and said so without a warning (the stopped fit's last
    // rise is below the rule's tolerance).
    for (name, f) in [("full", &full), ("stopped", &stopped)] {
        let c = f.convergence.as_ref().unwrap();
        assert!(c.converged, "{name}: {c:?}");
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);
    }
}

/// The saw experiment's quick settings (`data/experiments/saw.json`:
/// α = 0.75, θ = 3.4159, N = 200, lr 0.03), F-VI with 5,000 steps: the
/// rule stops after the paper's metric (target: the full run's final ELBO,
/// as the experiment's summary takes F-VI's) with an exact ELBO within 0.5
/// nats of the full run's (rel_tol × |ELBO| ≈ 0.035 nats per window; the
/// rest is Adam's jitter at lr 0.03).
#[test]
fn saw_stops_after_the_papers_metric_near_the_full_result() {
    let model = SawModel::new(0.75, 0.0).unwrap();
    let x = model.simulate(200, 2012, Some(3.4159)).unwrap();
    let o = FitOptions {
        steps: 5000,
        lr: 0.03,
        seed: 2013,
        ..FitOptions::default()
    };
    let full = fit_cpu(&model, &x, &MethodConfig::Fvi, &o);
    let stopped = fit_cpu(&model, &x, &MethodConfig::Fvi, &with_stop(&o));
    let s = assert_prefix(&full, &stopped);
    let paper = first_within(&full.trace.elbo, full.elbo, 0.01, 10).unwrap();
    assert!(paper <= s && s < o.steps, "1 % metric {paper}, stop {s}");
    let (e_full, e_stop) = (
        saw_exact_elbo(&model, &x, &full),
        saw_exact_elbo(&model, &x, &stopped),
    );
    println!("saw F-VI: stop {s}, 1 % metric {paper}, exact ELBO {e_stop:.3} vs full {e_full:.3}");
    assert!((e_full - e_stop).abs() <= 0.5, "{e_full} vs {e_stop}");
}

/// A fit that ends while its ELBO still rises says so. The case
/// (N = 1,500, F-VI at lr 0.01 for 6,000 steps, 4.9 nats short) did not
/// recur on this data (0.9 nats short and flat, 14 s): the same behaviour
/// at the linear experiment's own F-VI rate, lr 0.001, N = 1,000 and 5,000
/// steps: the fit ends 4.7 nats below the closed-form optimum, rising
/// 4.2 ± 0.2 nats per 1,000 steps (measured). It must say converged false
/// with a rise beyond 3 standard errors, warn, and the stopping rule must
/// not stop it.
#[test]
fn a_fit_still_rising_says_it_has_not_converged() {
    let (model, x) = linear_data();
    let opt = model.fvi_optimum(&x).unwrap();
    let o = FitOptions {
        steps: 5000,
        lr: 0.001,
        seed: 1954,
        ..FitOptions::default()
    };
    let f = fit_cpu(&model, &x, &MethodConfig::Fvi, &with_stop(&o));
    let short = opt.elbo - linear_exact_elbo(&model, &x, &f);
    assert!(short > 2.0, "{short} nats short: not the case under test");
    let c = f.convergence.as_ref().unwrap();
    println!("linear F-VI lr 0.001: {short:.3} nats short, {c:?}");
    assert!(!c.converged, "{c:?}");
    assert!(c.rise_per_1000_steps > 3.0 * c.rise_se, "{c:?}");
    assert_eq!(c.steps, 1000);
    assert!(
        f.warnings.iter().any(|w| w.contains("has not converged")),
        "{:?}",
        f.warnings
    );
    assert_eq!((f.stopped_at, f.iterations), (None, 5000));
    assert_eq!(f.status, FitStatus::Ok);
}

/// Sets the flag at the first check at or after `at` steps.
struct InterruptAt<'a>(&'a AtomicBool, usize);

impl Observer for InterruptAt<'_> {
    fn on_check(&mut self, done: usize, _total: usize, _elbo: f64) {
        if done >= self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// An interrupt ends the fit at the next block: status interrupted at that
/// step, the trace that far, a finite ELBO of the parameters there; with
/// several seeds the later ones are not fitted; a flag never set changes
/// nothing.
#[test]
fn an_interrupt_ends_the_fit_at_the_next_block() {
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&model.simulate(200, 3, None).unwrap());
    let o = FitOptions {
        steps: 3000,
        ..FitOptions::default()
    };
    let flag = AtomicBool::new(false);
    let mut observer = InterruptAt(&flag, 450);
    let f = fit(&model, &x, &MethodConfig::Fvi)
        .options(&o)
        .observer(&mut observer)
        .interrupt(&flag)
        .run()
        .unwrap();
    // Checks every 100 steps: the first at or after 450 is 500.
    assert_eq!(f.status, FitStatus::Interrupted { at: 500 });
    assert_eq!((f.iterations, f.trace.elbo.len()), (500, 500));
    assert!(f.elbo.is_finite() && f.warnings.is_empty());
    let fits = fit(&model, &x, &MethodConfig::Fvi)
        .options(&o)
        .seeds(&[1, 2, 3])
        .interrupt(&flag)
        .run_all()
        .unwrap();
    assert_eq!(fits.len(), 1);
    assert_eq!(fits[0].status, FitStatus::Interrupted { at: 100 });
    let unset = AtomicBool::new(false);
    let short = FitOptions { steps: 300, ..o };
    let a = fit(&model, &x, &MethodConfig::Fvi)
        .options(&short)
        .interrupt(&unset)
        .run()
        .unwrap();
    let b = fit(&model, &x, &MethodConfig::Fvi)
        .options(&short)
        .run()
        .unwrap();
    assert_eq!(a.status, FitStatus::Ok);
    assert_eq!(a.trace.elbo, b.trace.elbo);
    assert_eq!(a.elbo.to_bits(), b.elbo.to_bits());
}

/// Batched seeds (one engine, R runs) stop together when the last run
/// meets its rule: at the latest of the steps where the separate fits
/// (the same runs, the same engine) stop.
#[test]
fn batched_runs_stop_when_every_run_has() {
    let model = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&model.simulate(200, 3, None).unwrap());
    let o = FitOptions {
        steps: 4000,
        lr: 0.03,
        draws: 20,
        engine: Engine::Graph,
        stop: Some(StopRule::default()),
        ..FitOptions::default()
    };
    let seeds = [1954, 1955];
    let batch = fit(&model, &x, &MethodConfig::Fvi)
        .options(&o)
        .seeds(&seeds)
        .run_all()
        .unwrap();
    let separate: Vec<usize> = seeds
        .iter()
        .map(|&seed| {
            let f = fit(&model, &x, &MethodConfig::Fvi)
                .options(FitOptions { seed, ..o.clone() })
                .run()
                .unwrap();
            f.stopped_at.expect("each run stops on its own")
        })
        .collect();
    let last = *separate.iter().max().unwrap();
    // Measured: 1,500 and 2,400.
    assert!(last < o.steps && separate[0] != separate[1], "{separate:?}");
    for f in &batch {
        assert_eq!(f.stopped_at, Some(last), "separate: {separate:?}");
        assert_eq!(f.iterations, last);
        let reason = f.stop_reason.as_deref().unwrap();
        assert!(reason.contains("the 2 runs of the batch"), "{reason}");
    }
}

/// The verdict on the committed runs of the linear experiment
/// (`data/results/cpu/linear/runs/`, N = 10⁴, 5,000 steps), whose exact
/// gap to the closed-form optimum is known: among F-VI and A-VI it says
/// "not converged" for exactly the 17 runs 0.64 nats or more short, and
/// "converged" for the 13 within 0.51 nats; among the 10 Const runs (at
/// their own optimum, 1,134 nats below F-VI's) it flags the one still
/// rising, seed 1955, 8 nats below the others.
#[test]
fn committed_linear_runs_are_judged_by_their_gap() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/results/cpu/linear/runs");
    let (mut short, mut close, mut flagged_const) = (0, 0, Vec::new());
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let elbo: Vec<f64> = serde_json::from_value(r["trace"]["elbo"].clone()).unwrap();
        let trace = avi_inference::Trace {
            iteration: (1..=elbo.len()).collect(),
            seconds: vec![0.0; elbo.len()],
            elbo,
            ..Default::default()
        };
        let se = r["elbo_se"].as_f64().unwrap();
        let c = avi_inference::verdict(&trace, se, None).unwrap();
        let gap = r["reference"]["exact_gap"].as_f64().unwrap();
        if name.starts_with("const") {
            if !c.converged {
                flagged_const.push(name);
            }
        } else if gap >= 0.64 {
            assert!(!c.converged, "{name}: {gap} nats short, {c:?}");
            short += 1;
        } else {
            assert!(
                gap <= 0.51 && c.converged,
                "{name}: {gap} nats short, {c:?}"
            );
            close += 1;
        }
    }
    assert_eq!((short, close), (17, 13));
    assert_eq!(flagged_const, ["const-1955.json"]);
}

/// The default rule on the committed linear runs of seeds 1954–1958
/// (`StopRule::stop_step` on their stored traces): of the 14 F-VI and A-VI
/// runs that the paper's windowed 1 % metric counts converged, it stops
/// 10, each after that metric's step and at a window mean within 2.7 nats
/// of the full run's last window (measured: at most 2.62); the 4 it lets
/// run were still rising at the end, 6–111 nats per 1,000 steps.
#[test]
fn default_rule_on_the_committed_linear_runs() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/results/cpu/linear/runs");
    let rule = StopRule::default();
    let w = rule.window;
    let (mut stopped, mut ran_on) = (0, 0);
    for label in ["fvi", "d_1", "d_2"] {
        for seed in 1954..=1958 {
            let path = dir.join(format!("{label}-{seed}.json"));
            let r: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let elbo: Vec<f64> = serde_json::from_value(r["trace"]["elbo"].clone()).unwrap();
            let optimum = r["reference"]["elbo"].as_f64().unwrap();
            let Some(paper) = first_within(&elbo, optimum, 0.01, 10) else {
                continue;
            };
            let mean = |end: usize| elbo[end - w..end].iter().sum::<f64>() / w as f64;
            match rule.stop_step(&elbo) {
                Some(s) => {
                    assert!(paper <= s, "{label}-{seed}: {paper} > {s}");
                    let short = mean(elbo.len()) - mean(s);
                    assert!(short.abs() <= 2.7, "{label}-{seed}: {short}");
                    stopped += 1;
                }
                None => {
                    let trace = avi_inference::Trace {
                        iteration: (1..=elbo.len()).collect(),
                        seconds: vec![0.0; elbo.len()],
                        elbo: elbo.clone(),
                        ..Default::default()
                    };
                    let se = r["elbo_se"].as_f64().unwrap();
                    let c = avi_inference::verdict(&trace, se, None).unwrap();
                    let rise = c.rise_per_1000_steps;
                    assert!(!c.converged && (6.0..=111.0).contains(&rise), "{c:?}");
                    ran_on += 1;
                }
            }
        }
    }
    assert_eq!((stopped, ran_on), (10, 4));
}
