//! `avi-amortization`: the payoff of amortization (`just bench-amortization`).
//!
//! Loads a saw A-VI encoder saved by `avi fit --save` (window [1, 0]),
//! simulates N' new observations from the same saw (same α, x0 and θ,
//! another seed) and measures, on one device:
//!
//! - **forward**: the encoder applied to the N' new observations
//!   ([`Variational::predict_raw`]: windows, standardisation, the MLP, one
//!   batched pass), the median of `--repeats` timed passes after one
//!   warm-up, each from a device synchronisation to a device
//!   synchronisation; with observations and elements (inputs read +
//!   outputs written) per second, beside the time of copying the output
//!   tensor once (a memory-speed yardstick on the same device);
//! - **encode**: [`avi_inference::encode`] (forward pass, range check and
//!   the held-out ELBO from `--draws` draws), once;
//! - **F-VI**: a fresh F-VI fit of the N' observations (`--fvi-steps` steps
//!   at `--fvi-lr`, ×0.1 from `--fvi-decay-from`, with `--fvi-draws` draws
//!   per step, on the fused engine by default), its wall time, and
//!   the step (and seconds) at which it first comes within 1 % of the exact
//!   optimum by the paper's windowed metric (10-step half-window).
//!
//! Like with like: the full ELBO (θ's prior and q(θ)'s entropy included,
//! 1,000 fresh draws) of the encoder's factors on the new data, with the
//! encoder's q(θ) as fitted on the training data, and of F-VI's fit, both
//! beside the exact optimal mean-field ELBO of the new data (closed form);
//! and `encode`'s held-out ELBO (θ terms left out). Prints one JSON object
//! (also written to `--out`).
//!
//! ```text
//! avi-amortization --fitted out/bench-amortization/encoder --n-new 100000 --device cpu
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use avi_benches::synchronize;
use avi_inference::convergence::first_within;
use avi_inference::{
    encode, evaluate_elbo, fit, EncodeOptions, Engine, Entropy, Expect, FitOptions, FitStatus,
    Fitted, LocalFactor, LrStep, MethodConfig, ThetaFactor, Variational,
};
use avi_models::{ExactReference, SawModel};
use clap::{Parser, ValueEnum};
use serde_json::json;
use tch::{nn, Device, Tensor};

/// Where everything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceName {
    Cpu,
    Cuda,
}

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(about = "Encoding new data vs fitting F-VI to them (saw, window [1, 0])")]
struct Args {
    /// The saved encoder (`avi fit --save DIR` of a saw A-VI fit).
    #[arg(long)]
    fitted: PathBuf,
    /// New observations N'.
    #[arg(long, default_value_t = 100_000)]
    n_new: usize,
    /// Seed of the new observations' simulation.
    #[arg(long, default_value_t = 1_002_012)]
    seed: u64,
    /// θ of the simulation (the saw experiment's).
    #[arg(long, default_value_t = 3.4159)]
    theta: f64,
    /// The saw's α and x0 (the saw experiment's).
    #[arg(long, default_value_t = 0.75)]
    alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    x0: f64,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceName::Cpu)]
    device: DeviceName,
    /// libtorch CPU threads (and the fused engine's).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Timed forward passes (the median is reported).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Draws of encode's held-out ELBO and of both full ELBOs.
    #[arg(long, default_value_t = 1000)]
    draws: usize,
    /// F-VI steps on the new data.
    #[arg(long, default_value_t = 10000)]
    fvi_steps: usize,
    /// F-VI's learning rate.
    #[arg(long, default_value_t = 0.01)]
    fvi_lr: f64,
    /// F-VI's draws per step.
    #[arg(long, default_value_t = 10)]
    fvi_draws: usize,
    /// F-VI's rate is ×0.1 from this step on (0: constant), so that its
    /// final ELBO is not held down by Adam's noise at the larger rate.
    #[arg(long, default_value_t = 6001)]
    fvi_decay_from: usize,
    /// F-VI's engine (`fused`: the fused CPU engine, or F-VI's CUDA
    /// kernels on CUDA; `torch`: libtorch).
    #[arg(long, default_value = "fused")]
    fvi_engine: String,
    /// Write the JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Write `text` to `path` through a temporary file in the same folder
/// (fsynced, then renamed over `path`).
fn write_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The full ELBO of q(θ) (copied, as fitted) and local rows `raw` on `x`.
fn full_elbo(
    model: &SawModel,
    fitted: &Fitted,
    raw: &Tensor,
    x: &Tensor,
    draws: usize,
) -> Result<(f64, f64)> {
    let var = &fitted.variational;
    let vs = nn::VarStore::new(raw.device());
    let theta = match &var.theta {
        ThetaFactor::Free(q) => ThetaFactor::Free(avi_inference::GaussianParams {
            mean: vs.root().add("theta_mean", q.mean.detach().copy(), false),
            log_sd: vs
                .root()
                .add("theta_log_sd", q.log_sd.detach().copy(), false),
        }),
        ThetaFactor::Fixed(t) => ThetaFactor::Fixed(t.shallow_clone()),
    };
    let local = vs.root().add("z", raw.detach().copy(), false);
    let v = Variational {
        vs,
        theta,
        local: LocalFactor::Free(local),
        output: var.output,
        n: raw.size()[0] as usize,
        local_dim: var.local_dim,
    };
    tch::manual_seed(0);
    Ok(evaluate_elbo(model, &v, x, draws, Entropy::Mc)?)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = match args.device {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: no CUDA device");
            }
            Device::Cuda(0)
        }
    };
    tch::set_num_threads(args.threads as i32);
    let fvi_engine = match args.fvi_engine.as_str() {
        "fused" => Engine::Fused,
        "torch" => Engine::Torch,
        e => bail!("--fvi-engine {e}: fused or torch"),
    };
    let model = SawModel::new(args.alpha, args.x0)?;
    let fitted = Fitted::load(&args.fitted, &Expect::model(&model), device)
        .with_context(|| format!("--fitted {}", args.fitted.display()))?;
    let kind = fitted.dtype().kind();
    let values = model.simulate(args.n_new, args.seed, Some(args.theta))?;
    let optimum = model
        .reference_elbo(&values, None)?
        .context("the saw has a closed-form optimum")?
        .elbo;
    let x = Tensor::from_slice(&values).to_kind(kind).to_device(device);
    let var = &fitted.variational;

    // The forward pass alone.
    let raw = var.predict_raw(&x)?.context("an encoder")?;
    synchronize(device);
    let mut times = Vec::with_capacity(args.repeats);
    for _ in 0..args.repeats.max(1) {
        synchronize(device);
        let t = Instant::now();
        let r = var.predict_raw(&x)?.context("an encoder")?;
        synchronize(device);
        times.push(t.elapsed().as_secs_f64());
        drop(r);
    }
    let forward = median(times);
    let mut copies = Vec::new();
    for _ in 0..args.repeats.max(1) {
        synchronize(device);
        let t = Instant::now();
        let c = raw.copy();
        synchronize(device);
        copies.push(t.elapsed().as_secs_f64());
        drop(c);
    }
    let copy = median(copies);
    let window = match &fitted.method {
        MethodConfig::Avi { window, .. } => window[0] + window[1] + 1,
        _ => 1,
    };
    let out_cols = raw.size()[1] as usize;
    let elements = args.n_new * (window + out_cols);

    // encode: forward pass, range check, held-out ELBO.
    let t = Instant::now();
    let e = encode(
        &model,
        &fitted,
        &x,
        &EncodeOptions {
            draws: args.draws,
            ..EncodeOptions::default()
        },
    )?;
    synchronize(device);
    let encode_seconds = t.elapsed().as_secs_f64();
    let (enc_elbo, enc_se) = full_elbo(&model, &fitted, &raw, &x, args.draws)?;

    // F-VI on the new data.
    let t = Instant::now();
    let f = fit(&model, &x, &MethodConfig::Fvi)
        .options(FitOptions {
            steps: args.fvi_steps,
            lr: args.fvi_lr,
            draws: args.fvi_draws,
            seed: 1,
            eval_draws: args.draws,
            dtype: fitted.dtype(),
            engine: fvi_engine,
            lr_schedule: if (2..=args.fvi_steps).contains(&args.fvi_decay_from) {
                vec![LrStep {
                    from: args.fvi_decay_from,
                    factor: 0.1,
                }]
            } else {
                vec![]
            },
            ..FitOptions::default()
        })
        .device(device)
        .threads(args.threads)
        .run()?;
    let fvi_wall = t.elapsed().as_secs_f64();
    if f.status != FitStatus::Ok {
        bail!("the F-VI fit diverged: {:?}", f.status);
    }
    let conv = first_within(&f.trace.elbo, optimum, 0.01, 10);
    let conv_seconds = conv.and_then(|c| f.trace.seconds.get(c.saturating_sub(1)).copied());

    let report = json!({
        "device": format!("{device:?}"),
        "threads": args.threads,
        "encoder": {
            "fitted": args.fitted.display().to_string(),
            "method": fitted.method,
            "dtype": format!("{:?}", fitted.dtype()),
        },
        "n_new": args.n_new,
        "simulation": { "seed": args.seed, "theta": args.theta, "alpha": args.alpha, "x0": args.x0 },
        "exact_optimum_elbo": optimum,
        "forward": {
            "seconds_median": forward,
            "repeats": args.repeats,
            "observations_per_second": args.n_new as f64 / forward,
            "elements": elements,
            "elements_per_second": elements as f64 / forward,
            "elements_are": format!("{window} inputs read + {out_cols} outputs written per observation"),
            "output_copy_seconds_median": copy,
            "output_copy_elements_per_second": (args.n_new * out_cols) as f64 / copy,
        },
        "encode": {
            "seconds": encode_seconds,
            "heldout_elbo": e.heldout_elbo,
            "heldout_elbo_se": e.heldout_elbo_se,
            "heldout_elbo_excludes": avi_inference::HELDOUT_EXCLUDES,
            "draws": args.draws,
            "outside_training_range": e.outside_training_range.count,
            "full_elbo": enc_elbo,
            "full_elbo_se": enc_se,
            "gap_to_optimum": optimum - enc_elbo,
        },
        "fvi": {
            "steps": args.fvi_steps,
            "lr": args.fvi_lr,
            "lr_times_0.1_from": (args.fvi_decay_from >= 2 && args.fvi_decay_from <= args.fvi_steps).then_some(args.fvi_decay_from),
            "draws": args.fvi_draws,
            "engine": format!("{:?}", f.engine),
            "seconds": f.seconds,
            "wall_seconds": fvi_wall,
            "iterations_to_1pct": conv,
            "seconds_to_1pct": conv_seconds,
            "full_elbo": f.elbo,
            "full_elbo_se": f.elbo_se,
            "gap_to_optimum": optimum - f.elbo,
        },
        "ratio": {
            "fvi_seconds_over_forward": f.seconds / forward,
            "fvi_seconds_over_encode": f.seconds / encode_seconds,
            "fvi_seconds_to_1pct_over_forward": conv_seconds.map(|s| s / forward),
        },
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(p) = &args.out {
        write_atomic(p, &format!("{text}\n"))?;
    }
    Ok(())
}
