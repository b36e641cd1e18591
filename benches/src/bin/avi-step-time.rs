//! `avi-step-time`: the time of one training iteration of avi (draws → ELBO →
//! backward → Adam step, i.e. [`Trainer::step`]) for one model × method at
//! the paper's sizes, printed as one JSON object. It is our side of
//! `just bench-compare` (`benches/compare/run.py` runs it beside the PyTorch,
//! JAX, Pyro and NumPyro peers).
//!
//! Timing: `--warmup` steps, then `--repeats` blocks of `--iters` steps; each
//! block is timed from a device synchronisation to a device synchronisation,
//! with no host read inside it. `ms_per_iteration` is the median over the
//! blocks.
//!
//! `--dump FILE` instead writes the problem to FILE: the model settings, the
//! data as used (f32), the initial variational parameters under their
//! `VarStore` names, and the parameters after `--check-steps` training steps
//! with avi's ELBO estimate there from `--check-draws` fresh draws. The peers
//! load FILE to time the same data from the same initial parameters, and to
//! check at the later parameters that they compute the same objective.
//!
//! `--engine fused` times [`FusedTrainer::step`] instead (the fused CPU
//! engine of the scalar models: analytic gradients in plain Rust, the draws
//! split over `--threads` threads; A-VI's inference function still runs on
//! libtorch).
//!
//! ```text
//! avi-step-time --model saw --method avi --device cpu --threads 2
//! avi-step-time --model saw --method fvi --threads 1 --engine fused
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use avi_benches::synchronize;
use avi_inference::testing::FusedModel;
use avi_inference::testing::{BatchedTrainer, CudaFviTrainer, FusedTrainer, GraphTrainer, Trainer};
use avi_inference::{
    evaluate_elbo, Activation, Edges, Entropy, FitOptions, FunctionConfig, Heads, MethodConfig,
    Variational,
};
use avi_models::{LinearModel, Model, NonlinearModel, NonlinearSim, SawModel};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use tch::{Device, Tensor};

/// The models of the comparison (the table's `model` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModelName {
    /// Paper Eq. 8, N = 10,000, τ = 1.155, σ = 2.43 (data/experiments/linear.json).
    Linear,
    /// Paper Eq. 15, N = 10,000, data seed 1789 (data/experiments/nonlinear.json).
    Nonlinear,
    /// Paper Eq. 17, N = 1,000, α = 0.75, θ = 3.4159, data seed 2012.
    Saw,
}

/// The methods of the comparison (the table's `method` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MethodName {
    /// F-VI: a free (mean, log-sd) per z_n.
    Fvi,
    /// A-VI with the paper's inference function for the model.
    Avi,
}

/// Where the iteration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceName {
    Cpu,
    Cuda,
}

/// Which implementation of the iteration is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineName {
    /// `Trainer::step`: libtorch kernels and autograd.
    Torch,
    /// `FusedTrainer::step`: the fused CPU engine; on CUDA
    /// `CudaFviTrainer::step_block` (F-VI only: the CUDA kernels, each timed
    /// block of `--iters` steps one CUDA-graph replay).
    Fused,
    /// `GraphTrainer::step_block`: the libtorch step with a device-side
    /// Adam; on CUDA each timed block of `--iters` steps is one CUDA-graph
    /// replay (the warm-up is two blocks: one eager, one captured).
    Graph,
}

/// Time avi's training iteration for one model × method; prints JSON.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The model.
    #[arg(long, value_enum)]
    model: ModelName,
    /// The method.
    #[arg(long, value_enum)]
    method: MethodName,
    /// The device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceName,
    /// libtorch intra-op threads (and the fused engine's threads); 0 keeps
    /// libtorch's default (all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The engine timed (`--dump` always uses `torch`).
    #[arg(long, value_enum, default_value = "torch")]
    engine: EngineName,
    /// Untimed steps before the first timed block.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Steps per timed block.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Timed blocks; the median block gives `ms_per_iteration`.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Monte Carlo draws per step.
    #[arg(long, default_value_t = 100)]
    draws: usize,
    /// Seed of libtorch's generator (initialisation and draws).
    #[arg(long, default_value_t = 1954)]
    seed: u64,
    /// Batched seeds: time `BatchedTrainer::step` for this many seeds
    /// (seed, seed + 1, …) as one optimisation (F-VI only; `--engine` is
    /// then ignored). `ms_per_iteration` is the batch's.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Write the problem and the initial parameters to this JSON file, with
    /// avi's ELBO estimate there, instead of timing.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// With `--dump`: steps taken from the initial parameters to the
    /// parameters of the objective check (a region where the ELBO estimate
    /// has a small variance, unlike the initial point).
    #[arg(long, default_value_t = 500)]
    check_steps: usize,
    /// Draws of the ELBO estimate written by `--dump` (at the check
    /// parameters).
    #[arg(long, default_value_t = 10_000)]
    check_draws: usize,
    /// Observations N (default: the paper's size, 10,000 for linear and
    /// nonlinear, 1,000 for saw); for the N sweep of `just bench-sweep`.
    #[arg(long)]
    n: Option<usize>,
}

/// One model × method (at the paper's sizes unless `--n` says otherwise).
struct Problem {
    model: Box<dyn Model>,
    /// The same model for the fused engine.
    fused: FusedModel,
    /// The model's settings as the peers read them.
    settings: Value,
    x: Vec<f64>,
    method: MethodConfig,
    /// Short description of the inference function (table label).
    function: &'static str,
    lr: f64,
}

fn avi(function: FunctionConfig, window: [usize; 2]) -> MethodConfig {
    MethodConfig::Avi {
        function,
        standardize: true,
        window,
        edges: Edges::Pad,
    }
}

fn mlp(width: usize, heads: Heads) -> FunctionConfig {
    FunctionConfig::Mlp {
        width,
        depth: 2,
        activation: Activation::Relu,
        heads,
    }
}

/// The configurations of `benches/compare/models.py` (keep in step).
fn problem(model: ModelName, method: MethodName, n: Option<usize>) -> Result<Problem> {
    let fvi = method == MethodName::Fvi;
    Ok(match model {
        ModelName::Linear => {
            let (tau, sigma) = (1.155, 2.43);
            let m = LinearModel::new(tau, sigma)?;
            Problem {
                x: m.simulate(n.unwrap_or(10_000), 7, None)?,
                model: Box::new(m),
                fused: (&m).into(),
                settings: json!({"tau": tau, "sigma": sigma}),
                method: if fvi {
                    MethodConfig::Fvi
                } else {
                    avi(FunctionConfig::Poly { degree: 1 }, [0, 0])
                },
                function: if fvi { "free" } else { "poly1" },
                lr: if fvi { 1e-3 } else { 1e-2 },
            }
        }
        ModelName::Nonlinear => {
            let m = NonlinearModel::new(NonlinearSim::Model);
            Problem {
                x: m.simulate(n.unwrap_or(10_000), 1789, None)?,
                model: Box::new(m),
                fused: (&m).into(),
                settings: json!({}),
                method: if fvi {
                    MethodConfig::Fvi
                } else {
                    avi(mlp(16, Heads::Separate), [0, 0])
                },
                function: if fvi { "free" } else { "mlp16-separate" },
                lr: 1e-2,
            }
        }
        ModelName::Saw => {
            let (alpha, x0) = (0.75, 0.0);
            let m = SawModel::new(alpha, x0)?;
            Problem {
                x: m.simulate(n.unwrap_or(1_000), 2012, Some(3.4159))?,
                model: Box::new(m),
                fused: (&m).into(),
                settings: json!({"alpha": alpha, "x0": x0}),
                method: if fvi {
                    MethodConfig::Fvi
                } else {
                    avi(mlp(10, Heads::Shared), [1, 0])
                },
                function: if fvi { "free" } else { "mlp10-shared-w1-0" },
                lr: 1e-3,
            }
        }
    })
}

/// Peak resident set size of this process in MiB (`VmHWM`, the value
/// `getrusage`'s `ru_maxrss` reports on Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// GPU memory held by this process according to `nvidia-smi` (CUDA context
/// plus the caching allocator's reserve, which libtorch keeps at its peak),
/// in MiB. tch exposes no allocator statistics, so this is the GPU figure
/// avi can report.
fn gpu_process_mib() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split(',').map(str::trim);
        (f.next()? == me).then(|| f.next()?.parse().ok())?
    })
}

/// Every variable of the store by name: `{"shape": [...], "values": [...]}`
/// (values row-major, as f64).
fn params_json(var: &Variational) -> Result<Value> {
    let mut vars: Vec<_> = var.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut params = serde_json::Map::new();
    for (name, t) in vars {
        params.insert(
            name,
            json!({"shape": t.size(), "values": avi_inference::host_vec(&t)?}),
        );
    }
    Ok(Value::Object(params))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let k = s.len();
    if k % 2 == 1 {
        s[k / 2]
    } else {
        0.5 * (s[k / 2 - 1] + s[k / 2])
    }
}

/// The timed trainer.
enum Engine<'a> {
    Torch(Trainer<'a>),
    Fused(FusedTrainer),
    Graph(GraphTrainer<'a>),
    CudaFused(CudaFviTrainer),
    Batched(BatchedTrainer<'a>),
}

impl Engine<'_> {
    /// `iters` iterations (one block for the graph engine, whose block has
    /// `iters` steps); nothing is read back from the device.
    fn steps(&mut self, iters: usize) -> Result<()> {
        match self {
            Self::Torch(t) => {
                for _ in 0..iters {
                    let _elbo = t.step()?;
                }
            }
            Self::Fused(t) => {
                for _ in 0..iters {
                    let _elbo = t.step()?;
                }
            }
            Self::Graph(g) => {
                let _elbo = g.step_block()?;
            }
            Self::CudaFused(g) => {
                let _elbo = g.step_block()?;
            }
            Self::Batched(t) => {
                for _ in 0..iters {
                    let _elbo = t.step()?;
                }
            }
        }
        Ok(())
    }

    /// One more iteration (a whole block for the graph engine), returning
    /// the last ELBO estimate on the host.
    fn step_value(&mut self) -> Result<f64> {
        Ok(match self {
            Self::Torch(t) => t.step()?.double_value(&[]),
            Self::Fused(t) => t.step()?,
            Self::Graph(g) => g.step_block()?.double_value(&[-1]),
            Self::CudaFused(g) => g.step_block()?.double_value(&[-1]),
            Self::Batched(t) => t.step()?.double_value(&[0]),
        })
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = match args.device {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda => {
            anyhow::ensure!(
                tch::Cuda::is_available(),
                "--device cuda: libtorch sees no CUDA device"
            );
            Device::Cuda(0)
        }
    };
    anyhow::ensure!(
        args.iters > 0 && args.repeats > 0,
        "--iters and --repeats must be at least 1"
    );
    if args.threads > 0 {
        tch::set_num_threads(args.threads as i32);
    }
    let p = problem(args.model, args.method, args.n)?;
    let opts = FitOptions {
        lr: p.lr,
        draws: args.draws,
        seed: args.seed,
        engine: match args.engine {
            EngineName::Graph => avi_inference::Engine::Graph,
            _ => avi_inference::Engine::Torch,
        },
        ..FitOptions::default()
    };
    let x = Tensor::from_slice(&p.x);
    anyhow::ensure!(
        args.dump.is_none() || args.engine == EngineName::Torch,
        "--dump uses the torch engine; leave out --engine"
    );
    let mut trainer = Trainer::new(p.model.as_ref(), &x, &p.method, None, &opts, device)
        .context("building the trainer")?;
    let mut num_parameters = trainer.variational().num_parameters();
    let mut threads = tch::get_num_threads() as usize;
    let model = format!("{:?}", args.model).to_lowercase();
    let method = format!("{:?}", args.method).to_lowercase();
    let mut out = json!({
        "framework": "avi",
        "model": model,
        "method": method,
        "function": p.function,
        "n": p.x.len(),
        "draws": args.draws,
        "num_parameters": num_parameters,
        "threads": threads,
        "engine": if args.runs > 1 { "batched".to_string() } else { format!("{:?}", args.engine).to_lowercase() },
        "runs": args.runs,
        "device": format!("{device:?}").to_lowercase(),
    });

    if let Some(path) = &args.dump {
        let init = params_json(trainer.variational())?;
        for _ in 0..args.check_steps {
            let _elbo = trainer.step()?;
        }
        let var = trainer.variational();
        let (elbo, se) = evaluate_elbo(
            p.model.as_ref(),
            var,
            trainer.data(),
            args.check_draws,
            Entropy::Mc,
        )?;
        let estimate = json!({"mean": elbo, "se": se, "draws": args.check_draws});
        let dump = json!({
            "model": model,
            "method": method,
            "settings": p.settings,
            "method_config": serde_json::to_value(&p.method)?,
            "lr": p.lr,
            "draws": args.draws,
            "seed": args.seed,
            "x": avi_inference::host_vec(trainer.data())?,
            "params": init,
            "num_parameters": num_parameters,
            "check": {
                "steps": args.check_steps,
                "params": params_json(var)?,
                "elbo_estimate": estimate,
            },
        });
        std::fs::write(path, serde_json::to_string(&dump)?)
            .with_context(|| format!("writing {}", path.display()))?;
        out["dump"] = json!(path.display().to_string());
        out["check_steps"] = json!(args.check_steps);
        out["elbo_estimate"] = estimate;
        println!("{out}");
        return Ok(());
    }

    let seeds: Vec<u64> = (0..args.runs as u64).map(|r| args.seed + r).collect();
    let mut engine = match args.engine {
        _ if args.runs > 1 => {
            drop(trainer);
            anyhow::ensure!(args.method == MethodName::Fvi, "--runs batches F-VI only");
            let t = BatchedTrainer::new(p.model.as_ref(), &x, &p.method, &seeds, &opts, device)
                .context("building the batched trainer")?;
            num_parameters *= args.runs;
            Engine::Batched(t)
        }
        EngineName::Torch => Engine::Torch(trainer),
        EngineName::Fused if device.is_cuda() => {
            drop(trainer);
            let t = CudaFviTrainer::new(&p.fused, &p.x, &p.method, &opts, device, args.iters)
                .context("building the CUDA fused trainer")?;
            num_parameters = t.num_parameters();
            Engine::CudaFused(t)
        }
        EngineName::Fused => {
            drop(trainer);
            let mut fused = FusedTrainer::new(&p.fused, &p.x, &p.method, &opts, device)
                .context("building the fused trainer")?;
            if args.threads > 0 {
                fused = fused.with_threads(args.threads);
            }
            threads = fused.threads();
            num_parameters = fused.num_parameters();
            Engine::Fused(fused)
        }
        EngineName::Graph => Engine::Graph(GraphTrainer::new(trainer, args.iters)?),
    };
    out["threads"] = json!(threads);
    out["num_parameters"] = json!(num_parameters);
    if matches!(engine, Engine::Graph(_) | Engine::CudaFused(_)) {
        // an eager block on the graph's stream (which also captures the
        // next block), then one replay
        engine.steps(args.iters)?;
        engine.steps(args.iters)?;
    } else {
        engine.steps(args.warmup)?;
    }
    let mut ms = Vec::with_capacity(args.repeats);
    for _ in 0..args.repeats {
        synchronize(device);
        let start = Instant::now();
        engine.steps(args.iters)?;
        synchronize(device);
        ms.push(start.elapsed().as_secs_f64() * 1e3 / args.iters as f64);
    }
    // One host read after the clock stopped, reported so that a diverged run
    // (non-finite ELBO) shows.
    let last = engine.step_value()?;
    out["ms_per_iteration"] = json!(median(&ms));
    out["ms_repeats"] = json!(ms);
    out["warmup"] = json!(args.warmup);
    out["iters"] = json!(args.iters);
    out["repeats"] = json!(args.repeats);
    out["final_elbo"] = json!(last);
    out["peak_rss_mib"] = json!(peak_rss_mib());
    out["gpu_mib"] = json!(if device.is_cuda() {
        gpu_process_mib()
    } else {
        None
    });
    out["gpu_allocator_peak_mib"] = json!(if device.is_cuda() {
        avi_cuda::peak_allocated_bytes(device)
            .ok()
            .map(|b| b as f64 / 1048576.0)
    } else {
        None
    });
    println!("{out}");
    Ok(())
}
