//! One training iteration (draws, ELBO, backward, Adam step) per model and
//! method at the paper's sizes, and an N sweep for F-VI and A-VI on the
//! linear model. The BNN, the mixture and the discrete HMM are timed as
//! their experiment definitions in `data/experiments/` configure them. Throughput is reported in latent draws processed
//! (draws × N) per second. On CUDA the device is synchronised before the
//! clock stops (`iter_custom`), and each case is also timed with the graph
//! engine (`…/graph`: blocks of 50 steps replayed as CUDA graphs) and, for
//! F-VI of the scalar models, the fused CUDA kernels (`…/fused`), per step.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::path::Path;
use std::time::{Duration, Instant};

use avi_benches::{bench_device, synchronize};
use avi_harness::reproduce::{effective, load_experiment, run_config};
use avi_harness::run::{data_tensor, prepare};
use avi_inference::testing::{CudaFviTrainer, GraphTrainer, Trainer};
use avi_inference::{Activation, Edges, Engine, FitOptions, FunctionConfig, Heads, MethodConfig};
use avi_models::{GaussianHmm, LinearModel, Model, NonlinearModel, NonlinearSim, SawModel};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tch::{Device, Tensor};

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

/// F-VI and the paper's A-VI MLP (width 10, depth 2, ReLU, shared heads).
fn mlp_methods(window: [usize; 2]) -> Vec<(&'static str, MethodConfig)> {
    vec![
        ("fvi", MethodConfig::Fvi),
        (
            "avi-mlp10",
            MethodConfig::Avi {
                function: FunctionConfig::Mlp {
                    width: 10,
                    depth: 2,
                    activation: Activation::Relu,
                    heads: Heads::Shared,
                },
                standardize: true,
                window,
                edges: Edges::Pad,
            },
        ),
    ]
}

fn opts() -> FitOptions {
    FitOptions {
        draws: 100,
        ..FitOptions::default()
    }
}

/// Time `trainer`'s steps as `id` (the device synchronised before the clock
/// starts and stops).
fn bench_trainer(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    device: Device,
    trainer: &mut Trainer<'_>,
) {
    group.bench_function(id, |b| {
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

/// Benchmark `Trainer::step` for one model, data set and method (θ fixed
/// at `theta` when given) with `opts` as `BenchmarkId::new(label, n)`. On
/// CUDA also the graph engine (each block of GRAPH_BLOCK steps one graph
/// replay; not with a shuffled batch order) and, for F-VI of the scalar
/// models with a free θ, the fused kernels; reported per step (a block's
/// time / GRAPH_BLOCK).
#[allow(clippy::too_many_arguments)]
fn bench_step(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    model: &dyn Model,
    x: &Tensor,
    label: &str,
    method: &MethodConfig,
    theta: Option<&[f64]>,
    opts: &FitOptions,
    device: Device,
) {
    let n = x.size()[0];
    let mut trainer = Trainer::new(model, x, method, theta, opts, device).expect("trainer");
    bench_trainer(group, BenchmarkId::new(label, n), device, &mut trainer);
    if !device.is_cuda() || opts.shuffle {
        return;
    }
    let graph_opts = FitOptions {
        engine: Engine::Graph,
        ..opts.clone()
    };
    let trainer = Trainer::new(model, x, method, theta, &graph_opts, device).expect("trainer");
    let mut graph = GraphTrainer::new(trainer, GRAPH_BLOCK).expect("graph trainer");
    bench_blocks(group, &format!("{label}/graph"), n, device, || {
        graph.step_block().map(|_| ())
    });
    if let (Some(fused), MethodConfig::Fvi, None) =
        (avi_inference::testing::fused_form(model), method, theta)
    {
        let host = avi_inference::host_vec(x).expect("data");
        let mut k = CudaFviTrainer::new(&fused, &host, method, opts, device, GRAPH_BLOCK)
            .expect("fused CUDA trainer");
        bench_blocks(group, &format!("{label}/fused"), n, device, || {
            k.step_block().map(|_| ())
        });
    }
}

/// Steps per graph replay in the CUDA benchmarks.
const GRAPH_BLOCK: usize = 50;

/// Benchmark `block` (GRAPH_BLOCK steps) as per-step time; two warm-up
/// blocks first (eager, then captured).
fn bench_blocks(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    label: &str,
    n: i64,
    device: Device,
    mut block: impl FnMut() -> avi_inference::Result<()>,
) {
    block().expect("warm-up block");
    block().expect("captured block");
    group.bench_function(BenchmarkId::new(label, n), |b| {
        b.iter_custom(|iters| {
            synchronize(device);
            let start = Instant::now();
            for _ in 0..iters {
                block().expect("block");
            }
            synchronize(device);
            start.elapsed() / GRAPH_BLOCK as u32
        })
    });
}

fn linear(c: &mut Criterion) {
    let Some(device) = bench_device() else { return };
    let model = LinearModel::new(1.155, 2.43).expect("valid model");
    let draws = opts().draws;
    let mut group = c.benchmark_group("iteration/linear");
    group.sample_size(20);
    let sizes: &[usize] = if std::env::var("AVI_BENCH_SWEEP").is_ok() {
        &[1_000, 10_000, 100_000, 1_000_000]
    } else {
        &[10_000]
    };
    for &n in sizes {
        let x = Tensor::from_slice(&model.simulate(n, 7, None).expect("simulate"));
        group.throughput(Throughput::Elements((n * draws) as u64));
        let mut all = methods();
        all.extend(mlp_methods([0, 0]).into_iter().skip(1));
        for (label, method) in all {
            if n > 10_000 && label != "fvi" && label != "avi-poly1" {
                continue;
            }
            bench_step(
                &mut group,
                &model,
                &x,
                label,
                &method,
                None,
                &opts(),
                device,
            );
        }
    }
    group.finish();
}

/// One group `iteration/{name}` with F-VI and the A-VI MLP on `x`.
fn model_group(c: &mut Criterion, name: &str, model: &dyn Model, xs: Vec<f64>, window: [usize; 2]) {
    let Some(device) = bench_device() else { return };
    let x = Tensor::from_slice(&xs);
    let mut group = c.benchmark_group(format!("iteration/{name}"));
    group.sample_size(20);
    group.throughput(Throughput::Elements((xs.len() * opts().draws) as u64));
    for (label, method) in mlp_methods(window) {
        bench_step(&mut group, model, &x, label, &method, None, &opts(), device);
    }
    group.finish();
}

fn saw(c: &mut Criterion) {
    let model = SawModel::new(0.75, 0.0).expect("valid model");
    let x = model.simulate(1_000, 2012, Some(3.4159)).expect("simulate");
    model_group(c, "saw", &model, x, [1, 0]);
}

fn gaussian_hmm(c: &mut Criterion) {
    let model = GaussianHmm::new(0.9, 0.5, 0.7, 1.0).expect("valid model");
    let x = model.simulate(1_000, 7, None).expect("simulate");
    model_group(c, "gaussian_hmm", &model, x, [0, 0]);
}

fn nonlinear(c: &mut Criterion) {
    let model = NonlinearModel::new(NonlinearSim::Model);
    let x = model.simulate(10_000, 1789, None).expect("simulate");
    model_group(c, "nonlinear", &model, x, [0, 0]);
}

/// One group `iteration/{name}` from the full-size experiment definition
/// `data/experiments/{name}.json`: the step of each kept method exactly as
/// `avi reproduce` configures it (data, draws, mini-batch, dtype, fixed θ),
/// first seed, libtorch engine; on CUDA also the graph engine (blocks of 50
/// steps: whole epochs of the BNN's 10 mini-batches). Throughput counts the
/// latent draws of one step (batch or N, × draws).
fn experiment_group(c: &mut Criterion, name: &str, keep: &[&str]) {
    let Some(device) = bench_device() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/experiments");
    let exp = load_experiment(&dir, name)
        .and_then(|e| effective(&e, false, None))
        .expect("experiment definition");
    let mut group = c.benchmark_group(format!("iteration/{name}"));
    group.sample_size(10);
    for m in exp
        .methods
        .iter()
        .filter(|m| keep.contains(&m.label.as_str()))
    {
        let cfg = run_config(&exp, m, exp.seeds[0]);
        let prepared = prepare(&cfg, &dir).expect("experiment data");
        let x = data_tensor(&prepared);
        let n = x.size()[0];
        let per_step = cfg.batch_size.unwrap_or(n as usize) * cfg.draws;
        group.throughput(Throughput::Elements(per_step as u64));
        let opts = FitOptions {
            engine: Engine::Torch,
            ..cfg.options()
        };
        let label = m.label.replace(' ', "_");
        bench_step(
            &mut group,
            prepared.model.as_model(),
            &x,
            &label,
            &cfg.method,
            cfg.model.fixed_theta(),
            &opts,
            device,
        );
    }
    group.finish();
}

/// The BNN of §4.4 at the paper's size (10,000 Fashion-MNIST images,
/// mini-batches of 1,000, one draw): every method.
fn bnn(c: &mut Criterion) {
    experiment_group(c, "bnn", &["fvi", "const", "k=1", "k=64", "k=128", "k=256"]);
}

/// The Gaussian mixture (categorical factors, N = 1,000, 20 draws).
fn mixture(c: &mut Criterion) {
    experiment_group(c, "mixture", &["fvi", "const", "k=8", "k=32"]);
}

/// The discrete HMM of the window experiment (categorical factors,
/// N = 1,000, 100 draws): F-VI and the narrowest and widest A-VI.
fn discrete_hmm(c: &mut Criterion) {
    experiment_group(
        c,
        "hmm-window",
        &["discrete fvi", "discrete w=1 k=8", "discrete w=9 k=32"],
    );
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = linear, saw, gaussian_hmm, nonlinear, bnn, mixture, discrete_hmm
}
criterion_main!(benches);
