//! `avi demo`: the paper's linear experiment in one command (digest §4.2).
//!
//! Fits the linear model (τ = 1.155, σ = 2.43, N = 10,000 simulated with seed
//! 7) with F-VI, Const and A-VI with polynomial inference functions of degree
//! 1 and 2, using the authors' learning rates (F-VI 1e-3, the others 1e-2),
//! 100 draws and 5,000 steps; prints a table against the closed-form optimum
//! and writes every config, report and a summary to the output folder.

use std::path::Path;

use anyhow::{Context, Result};
use avi_inference::convergence::first_within;
use avi_inference::{Dtype, Entropy, FunctionConfig, MethodConfig, Silent};
use serde_json::{json, Value};
use tch::Device;

use crate::config::{DataConfig, FitConfig, ModelConfig, SimulateConfig};
use crate::report::{num, write_json_atomic};
use crate::run::{device_name, prepare, run_prepared};

/// The demo's configurations: (file label, config).
pub fn demo_configs(n: usize, steps: usize) -> Vec<(&'static str, FitConfig)> {
    let base = |method: MethodConfig, lr: f64| FitConfig {
        model: ModelConfig::Linear {
            tau: 1.155,
            sigma: 2.43,
            fixed_theta: None,
        },
        data: DataConfig::Simulate(SimulateConfig {
            n,
            seed: 7,
            theta: None,
            dim: None,
        }),
        method,
        steps,
        lr,
        draws: 100,
        seed: 1954,
        eval_draws: 1000,
        entropy: Entropy::Mc,
        dtype: Dtype::F32,
        report_q_z: true,
        batch_size: None,
        shuffle: false,
        lr_schedule: Vec::new(),
        mse: None,
        engine: Default::default(),
    };
    let avi = |degree| MethodConfig::Avi {
        function: FunctionConfig::Poly { degree },
        standardize: true,
        window: [0, 0],
        edges: Default::default(),
    };
    vec![
        ("fvi", base(MethodConfig::Fvi, 1e-3)),
        ("const", base(MethodConfig::Const, 1e-2)),
        ("avi-poly1", base(avi(1), 1e-2)),
        ("avi-poly2", base(avi(2), 1e-2)),
    ]
}

/// Run the demo, print its table and write `out/{configs,reports}/*.json` and
/// `out/summary.json`.
pub fn run_demo(out: &Path, device: Device, n: usize, steps: usize) -> Result<Value> {
    let configs = out.join("configs");
    let reports = out.join("reports");
    for d in [&configs, &reports] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    println!(
        "linear model, N = {n}, tau = 1.155, sigma = 2.43, {steps} steps, 100 draws, device {}",
        device_name(device)
    );
    let mut rows = Vec::new();
    let mut optimum = f64::NAN;
    for (label, cfg) in demo_configs(n, steps) {
        write_json_atomic(
            &configs.join(format!("{label}.json")),
            &serde_json::to_value(&cfg)?,
        )?;
        let prepared = prepare(&cfg, out)?;
        let reference = prepared
            .reference_elbo
            .context("the linear model has a closed-form optimum")?;
        optimum = reference;
        let (fit, report) = run_prepared(&cfg, &prepared, device, &mut Silent)?;
        write_json_atomic(&reports.join(format!("{label}.json")), &report)?;
        let conv = first_within(&fit.trace.elbo, reference, 0.01, 10);
        let conv_seconds = conv.and_then(|c| {
            fit.trace
                .seconds
                .get(c.min(fit.trace.seconds.len() - 1))
                .copied()
        });
        rows.push(json!({
            "method": label,
            "lr": cfg.lr,
            "num_parameters": fit.num_parameters,
            "elbo": num(fit.elbo),
            "elbo_se": num(fit.elbo_se),
            "exact_elbo": report["reference"]["exact_elbo"],
            "gap": num(reference - fit.elbo),
            "iterations_to_1pct": conv,
            "seconds_to_1pct": conv_seconds.map(num),
            "seconds": num(fit.seconds),
            "ms_per_iteration": num(1e3 * fit.seconds / fit.iterations.max(1) as f64),
            "status": report["status"],
        }));
    }
    println!("closed-form optimal ELBO: {optimum:.3}");
    println!(
        "{:<10} {:>7} {:>22} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "method",
        "params",
        "ELBO ± se (1000 draws)",
        "gap",
        "iters→1%",
        "secs→1%",
        "total s",
        "ms/it"
    );
    for r in &rows {
        let f = |v: &Value, p: usize| {
            v.as_f64()
                .map_or("never".to_string(), |x| format!("{x:.p$}"))
        };
        println!(
            "{:<10} {:>7} {:>22} {:>10} {:>10} {:>10} {:>9} {:>7}",
            r["method"].as_str().unwrap_or(""),
            r["num_parameters"].as_u64().unwrap_or(0),
            format!("{} ± {}", f(&r["elbo"], 2), f(&r["elbo_se"], 2)),
            f(&r["gap"], 2),
            r["iterations_to_1pct"]
                .as_u64()
                .map_or("never".into(), |v| v.to_string()),
            f(&r["seconds_to_1pct"], 2),
            f(&r["seconds"], 2),
            f(&r["ms_per_iteration"], 2),
        );
    }
    let summary = json!({
        "experiment": "linear demo",
        "n": n,
        "steps": steps,
        "device": device_name(device),
        "optimal_elbo": num(optimum),
        "runs": rows,
    });
    write_json_atomic(&out.join("summary.json"), &summary)?;
    println!("wrote {}", out.join("summary.json").display());
    Ok(summary)
}
