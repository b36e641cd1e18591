//! One training iteration (draws, ELBO, backward, Adam step) per model and
//! method at the paper's sizes, and an N sweep for F-VI and A-VI on the
//! linear model. Throughput is reported in latent draws processed
//! (draws × N) per second. On CUDA the device is synchronised before the
//! clock stops (`iter_custom`).

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::time::{Duration, Instant};

use avi_benches::{bench_device, synchronize};
use avi_inference::{FitOptions, FunctionConfig, MethodConfig, Trainer};
use avi_models::LinearModel;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tch::Tensor;

fn methods() -> Vec<(&'static str, MethodConfig)> {
    let avi = |degree| MethodConfig::Avi {
        function: FunctionConfig::Poly { degree },
        standardize: true,
        window: [0, 0],
        edges: Default::default(),
    };
    vec![
        ("fvi", MethodConfig::Fvi),
        ("const", MethodConfig::Const),
        ("avi-poly1", avi(1)),
        ("avi-poly2", avi(2)),
    ]
}

fn linear(c: &mut Criterion) {
    let Some(device) = bench_device() else { return };
    let model = LinearModel::new(1.155, 2.43).expect("valid model");
    let opts = FitOptions {
        draws: 100,
        ..FitOptions::default()
    };
    let mut group = c.benchmark_group("iteration/linear");
    group.sample_size(20);
    let sizes: &[usize] = if std::env::var("AVI_BENCH_SWEEP").is_ok() {
        &[1_000, 10_000, 100_000, 1_000_000]
    } else {
        &[10_000]
    };
    for &n in sizes {
        let x = Tensor::from_slice(&model.simulate(n, 7, None).expect("simulate"));
        group.throughput(Throughput::Elements((n * opts.draws) as u64));
        for (label, method) in methods() {
            if n > 10_000 && label != "fvi" && label != "avi-poly1" {
                continue;
            }
            let mut trainer =
                Trainer::new(&model, &x, &method, None, &opts, device).expect("trainer");
            group.bench_function(BenchmarkId::new(label, n), |b| {
                b.iter_custom(|iters| {
                    synchronize(device);
                    let start = Instant::now();
                    for _ in 0..iters {
                        let _elbo = trainer.step().expect("step");
                    }
                    synchronize(device);
                    start.elapsed()
                })
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = linear
}
criterion_main!(benches);
