//! `avi demo`: the paper's linear experiment in one command (digest §4.2).
//!
//! Fits the linear model (τ = 1.155, σ = 2.43, N = 10,000 simulated with seed
//! 7) with F-VI, Const and A-VI with polynomial inference functions of degree
//! 1 and 2, using the authors' learning rates (F-VI 1e-3, the others 1e-2),
//! 100 draws and 5,000 steps, on the fastest engine that runs them (the
//! fused engine on the CPU, CUDA graphs on a GPU); prints a line per
//! finished fit and a table against the closed-form optimum, and writes
//! every config and report, a summary, two figures and REPORT.md to the
//! output folder.

use std::path::Path;

use anyhow::{Context, Result};
use avi_inference::convergence::first_within;
use avi_inference::{Dtype, Entropy, FunctionConfig, MethodConfig, Silent};
use serde_json::{json, Value};
use tch::Device;

use crate::config::{DataConfig, FitConfig, ModelConfig, ModelKind, SimulateConfig};
use crate::models::LinearConfig;
use crate::report::{num, write_json_atomic};
use crate::run::{device_name, prepare, run_prepared};

/// The demo's configurations: (file label, config).
pub fn demo_configs(n: usize, steps: usize, device: Device) -> Vec<(&'static str, FitConfig)> {
    // The fastest engine for the linear model's four methods: the fused
    // CPU engine (5-8x the libtorch engine there), CUDA graphs on a GPU
    // (the fused CUDA kernels run F-VI only).
    let engine = match device {
        Device::Cpu => avi_inference::Engine::Fused,
        _ => avi_inference::Engine::Graph,
    };
    let base = |method: MethodConfig, lr: f64| FitConfig {
        model: ModelConfig::new(ModelKind::Linear(LinearConfig {
            tau: 1.155,
            sigma: 2.43,
        })),
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
        checkpoint: None,
        engine,
        local_updates: Default::default(),
        save: None,
        init_from: None,
        stop: None,
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
    let mut traces = Vec::new();
    let mut optimum = f64::NAN;
    for (label, cfg) in demo_configs(n, steps, device) {
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
        println!(
            "{label}: ELBO {:.2} ± {:.2}, {:.2} below the optimum, {} in {:.1} s ({} engine)",
            fit.elbo,
            fit.elbo_se,
            reference - fit.elbo,
            conv.map_or("never within 1%".to_string(), |c| format!(
                "within 1% after {c} iterations"
            )),
            fit.seconds,
            serde_json::to_value(cfg.engine)?.as_str().unwrap_or("?")
        );
        traces.push((
            label,
            fit.trace.iteration.clone(),
            fit.trace.elbo.clone(),
            fit.trace.seconds.clone(),
        ));
        rows.push(json!({
            "method": label,
            "engine": cfg.engine,
            "lr": cfg.lr,
            "num_parameters": fit.num_parameters,
            "elbo": num(fit.elbo),
            "elbo_se": num(fit.elbo_se),
            "exact_elbo": report.reference.as_ref().and_then(|r| r.exact_elbo).map(num),
            "gap": num(reference - fit.elbo),
            "iterations_to_1pct": conv,
            "seconds_to_1pct": conv_seconds.map(num),
            "seconds": num(fit.seconds),
            "ms_per_iteration": num(1e3 * fit.seconds / fit.iterations.max(1) as f64),
            "status": report.status.as_str(),
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
        let f = or_never;
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
    draw(out, &traces, optimum)?;
    crate::report::write_atomic(&out.join("REPORT.md"), report_markdown(&summary).as_bytes())
        .with_context(|| format!("cannot write {}", out.join("REPORT.md").display()))?;
    println!(
        "report: {} (the table, with the figures {} and {}); numbers: {}; each fit's report: {}",
        out.join("REPORT.md").display(),
        out.join(FIG_ITERATION).display(),
        out.join(FIG_TIME).display(),
        out.join("summary.json").display(),
        reports.display()
    );
    Ok(summary)
}

/// A number with `p` decimals, or `never` when absent.
fn or_never(v: &Value, p: usize) -> String {
    v.as_f64()
        .map_or("never".to_string(), |x| format!("{x:.p$}"))
}

const FIG_ITERATION: &str = "elbo-vs-iteration.svg";
const FIG_TIME: &str = "elbo-vs-time.svg";

/// (label, iterations, ELBO trace, seconds) of each fit.
type DemoTrace = (&'static str, Vec<usize>, Vec<f64>, Vec<f64>);

/// The gap to the optimum against iterations and seconds (log scales).
fn draw(out: &Path, traces: &[DemoTrace], optimum: f64) -> Result<()> {
    use crate::figures::{line_plot, LinePlot, Series};
    for (file, by_time) in [(FIG_ITERATION, false), (FIG_TIME, true)] {
        let series = traces
            .iter()
            .map(|(label, it, elbo, secs)| Series {
                label: label.to_string(),
                points: it
                    .iter()
                    .zip(elbo)
                    .zip(secs)
                    .map(|((&i, &e), &s)| (if by_time { s } else { i as f64 }, optimum - e))
                    .filter(|(x, g)| *x > 0.0 && *g > 0.0 && g.is_finite())
                    .collect(),
            })
            .collect();
        let plot = LinePlot {
            title: "linear model: gap to the closed-form optimum".into(),
            x_label: if by_time { "seconds" } else { "iteration" }.into(),
            y_label: "optimal ELBO − ELBO estimate (nats)".into(),
            log_x: true,
            log_y: true,
            series,
            reference: None,
        };
        line_plot(&out.join(file), &plot)
            .with_context(|| format!("cannot draw {}", out.join(file).display()))?;
    }
    Ok(())
}

/// REPORT.md of the demo: the table and the figures.
fn report_markdown(s: &Value) -> String {
    let f = or_never;
    let mut md = format!(
        "# The linear model demo\n\nN = {}, {} steps, 100 draws, device {}; closed-form optimal ELBO {}. Numbers from `summary.json`.\n\n| method | engine | ELBO ± se | gap | iterations to 1% | seconds to 1% | total s |\n|---|---|---|---|---|---|---|\n",
        s["n"], s["steps"], s["device"].as_str().unwrap_or("?"), f(&s["optimal_elbo"], 3)
    );
    for r in s["runs"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} ± {} | {} | {} | {} | {} |\n",
            r["method"].as_str().unwrap_or(""),
            r["engine"].as_str().unwrap_or(""),
            f(&r["elbo"], 2),
            f(&r["elbo_se"], 2),
            f(&r["gap"], 2),
            r["iterations_to_1pct"]
                .as_u64()
                .map_or("never".into(), |v| v.to_string()),
            f(&r["seconds_to_1pct"], 2),
            f(&r["seconds"], 2),
        ));
    }
    md.push_str(&format!(
        "\n![gap against iterations]({FIG_ITERATION})\n\n![gap against seconds]({FIG_TIME})\n"
    ));
    md
}
