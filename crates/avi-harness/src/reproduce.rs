//! `avi reproduce`: the paper's experiments from their JSON definitions in
//! `data/experiments/` (digest §4, §8).
//!
//! An experiment lists a model, data, run length, draws, seeds and the
//! methods to compare (each with its learning rate). Every method × seed is
//! fitted through the same path as `avi fit`; each run's report goes to
//! `DIR/EXPERIMENT/runs/`, and `summary.json` aggregates over seeds:
//! final ELBO (mean of the last `final_window` step estimates, digest
//! §4.1.1), the gap to the closed-form optimum where one exists, and the
//! iterations and wall time to come within `rel_tol` of the target (the
//! paper's windowed metric with the NaN bug fixed: a non-finite window never
//! counts; a diverged run never converges). The target is the closed-form
//! optimal ELBO when the model has one, else the final-window ELBO of the
//! F-VI run with the same seed (the authors' oracle).
//!
//! `--quick` applies the experiment's `quick` block (smaller N, fewer steps
//! and seeds, optionally one learning rate and a subset of methods) so that
//! the conclusions show in about a minute on 2 CPU cores.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use avi_inference::convergence::first_within;
use avi_inference::{Dtype, MethodConfig, Silent};
use serde::Deserialize;
use serde_json::{json, Value};
use tch::Device;

use crate::config::{DataConfig, FitConfig, ModelConfig};
use crate::report::{num, write_json_atomic};
use crate::run::{device_name, prepare, run_prepared};

/// One method of an experiment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodEntry {
    /// Label used in tables and file names.
    pub label: String,
    /// The variational family.
    pub method: MethodConfig,
    /// Its learning rate.
    pub lr: f64,
}

/// The `quick` block of an experiment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuickEntry {
    /// Number of observations.
    pub n: usize,
    /// Steps per run.
    pub steps: usize,
    /// Number of seeds (the first ones of the list).
    pub seeds: usize,
    /// One learning rate for every method (default: each method's own).
    #[serde(default)]
    pub lr: Option<f64>,
    /// The labels of the methods to run (default: all).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
}

/// An experiment definition (`data/experiments/NAME.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Its name.
    pub name: String,
    /// What it shows.
    pub description: String,
    /// The model.
    pub model: ModelConfig,
    /// The data (simulated in the paper's experiments).
    pub data: DataConfig,
    /// Steps per run.
    pub steps: usize,
    /// Monte Carlo draws per step.
    pub draws: usize,
    /// Fresh draws for each run's final ELBO.
    pub eval_draws: usize,
    /// Precision.
    pub dtype: Dtype,
    /// The seeds (the paper's lists).
    pub seeds: Vec<u64>,
    /// Relative tolerance of the convergence metric (0.01 in the paper).
    pub rel_tol: f64,
    /// Steps averaged for the final ELBO (the paper: the last 1,000, i.e.
    /// a window of half-width 500).
    pub final_window: usize,
    /// The methods compared.
    pub methods: Vec<MethodEntry>,
    /// The reduced setting of `--quick`.
    pub quick: QuickEntry,
}

/// The experiments `avi reproduce` knows.
pub const EXPERIMENTS: [&str; 2] = ["linear", "saw"];

/// The project's experiment folder.
pub fn default_experiments_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/experiments")
}

/// Read an experiment definition.
pub fn load_experiment(dir: &Path, name: &str) -> Result<Experiment> {
    let path = dir.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read experiment {}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        anyhow::anyhow!(
            "experiment {}: field `{field}`: {}",
            path.display(),
            e.into_inner()
        )
    })
}

/// Settings of one `avi reproduce` invocation.
#[derive(Debug, Clone)]
pub struct ReproduceOptions {
    /// Use the experiment's `quick` block.
    pub quick: bool,
    /// Use only the first this many seeds.
    pub seeds: Option<usize>,
    /// Output folder (the experiment's results go to `out/NAME/`).
    pub out: PathBuf,
    /// Device.
    pub device: Device,
    /// No per-run lines.
    pub quiet: bool,
}

fn stats(values: &[f64]) -> Value {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        0.5 * (v[v.len() / 2 - 1] + v[v.len() / 2])
    };
    json!({ "median": median, "min": v[0], "max": v[v.len() - 1] })
}

/// Median of optional values where `None` ("never") counts as +∞; `None`
/// when more than half never converged.
fn median_never(values: &[Option<f64>]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().map(|x| x.unwrap_or(f64::INFINITY)).collect();
    v.sort_by(f64::total_cmp);
    let m = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        0.5 * (v[v.len() / 2 - 1] + v[v.len() / 2])
    };
    m.is_finite().then_some(m)
}

/// Run an experiment; writes `runs/*.json` and `summary.json` and returns
/// the summary.
pub fn reproduce(exp: &Experiment, opts: &ReproduceOptions) -> Result<Value> {
    let mut data = exp.data.clone();
    let mut steps = exp.steps;
    let mut seeds = exp.seeds.clone();
    let mut methods = exp.methods.clone();
    if opts.quick {
        let q = &exp.quick;
        if let DataConfig::Simulate(s) = &mut data {
            s.n = q.n;
        }
        steps = q.steps;
        seeds.truncate(q.seeds);
        if let Some(lr) = q.lr {
            for m in &mut methods {
                m.lr = lr;
            }
        }
        if let Some(keep) = &q.methods {
            methods.retain(|m| keep.contains(&m.label));
        }
    }
    if let Some(k) = opts.seeds {
        if k == 0 || k > exp.seeds.len() {
            bail!(
                "--seeds {k}: the experiment lists {} seeds",
                exp.seeds.len()
            );
        }
        seeds = exp.seeds[..k].to_vec();
    }
    if methods.is_empty() || seeds.is_empty() {
        bail!("experiment {}: no method or no seed to run", exp.name);
    }
    let dir = opts.out.join(&exp.name);
    let runs_dir = dir.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .with_context(|| format!("cannot create {}", runs_dir.display()))?;
    let base = |method: &MethodEntry, seed: u64| FitConfig {
        model: exp.model.clone(),
        data: data.clone(),
        method: method.method.clone(),
        steps,
        lr: method.lr,
        draws: exp.draws,
        seed,
        eval_draws: exp.eval_draws,
        entropy: Default::default(),
        dtype: exp.dtype,
        report_q_z: false,
        batch_size: None,
        shuffle: false,
    };
    let prepared = prepare(&base(&methods[0], seeds[0]), &opts.out)?;
    let optimum = prepared.reference_elbo;
    let half = exp.final_window;
    let final_elbo = |trace: &[f64]| -> f64 {
        let k = trace.len().min(2 * half).max(1);
        let tail = &trace[trace.len().saturating_sub(k)..];
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    // F-VI's final window per seed: the target when there is no closed form.
    let mut fvi_target: Vec<Option<f64>> = vec![None; seeds.len()];
    let mut rows = Vec::new();
    let total = methods.len() * seeds.len();
    let mut done = 0;
    // Run F-VI first so that its targets exist.
    let mut order: Vec<&MethodEntry> = methods.iter().collect();
    order.sort_by_key(|m| !matches!(m.method, MethodConfig::Fvi));
    for method in order {
        let mut per_seed = Vec::new();
        for (si, &seed) in seeds.iter().enumerate() {
            let cfg = base(method, seed);
            let (fit, report) = run_prepared(&cfg, &prepared, opts.device, &mut Silent)?;
            let file = format!("{}-{seed}.json", method.label.replace([' ', '='], "_"));
            write_json_atomic(&runs_dir.join(&file), &report)?;
            let fin = final_elbo(&fit.trace.elbo);
            let diverged = !matches!(fit.status, avi_inference::FitStatus::Ok);
            if matches!(method.method, MethodConfig::Fvi) && !diverged {
                fvi_target[si] = Some(fin);
            }
            let target = optimum.or(fvi_target[si]);
            let conv = match (target, diverged) {
                (Some(t), false) => first_within(&fit.trace.elbo, t, exp.rel_tol, 10),
                _ => None,
            };
            let secs = conv.map(|c| fit.trace.seconds[c.min(fit.trace.seconds.len() - 1)]);
            done += 1;
            if !opts.quiet {
                println!(
                    "[{done}/{total}] {} {} seed {seed}: final ELBO {fin:.2}, converged at {}, {:.1} s",
                    exp.name,
                    method.label,
                    conv.map_or("never".to_string(), |c| c.to_string()),
                    fit.seconds
                );
            }
            per_seed.push(json!({
                "seed": seed,
                "final_elbo": num(fin),
                "elbo": num(fit.elbo),
                "elbo_se": num(fit.elbo_se),
                "gap": optimum.map(|o| num(o - fit.elbo)),
                "iterations_to_converge": conv,
                "seconds_to_converge": secs.map(num),
                "seconds": num(fit.seconds),
                "ms_per_iteration": num(1e3 * fit.seconds / fit.iterations.max(1) as f64),
                "status": report["status"],
                "run": format!("runs/{file}"),
            }));
        }
        let get = |k: &str| -> Vec<f64> {
            per_seed
                .iter()
                .map(|r| r[k].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let iters: Vec<Option<f64>> = per_seed
            .iter()
            .map(|r| r["iterations_to_converge"].as_f64())
            .collect();
        let secs: Vec<Option<f64>> = per_seed
            .iter()
            .map(|r| r["seconds_to_converge"].as_f64())
            .collect();
        rows.push(json!({
            "label": method.label,
            "method": method.method,
            "lr": method.lr,
            "converged": iters.iter().filter(|i| i.is_some()).count(),
            "runs": per_seed.len(),
            "final_elbo": stats(&get("final_elbo")),
            "gap": if optimum.is_some() { stats(&get("gap")) } else { Value::Null },
            "iterations_to_converge": { "median": median_never(&iters), "converged": stats(&iters.iter().flatten().copied().collect::<Vec<_>>()) },
            "seconds_to_converge": { "median": median_never(&secs), "converged": stats(&secs.iter().flatten().copied().collect::<Vec<_>>()) },
            "ms_per_iteration": stats(&get("ms_per_iteration")),
            "seeds": per_seed,
        }));
    }
    let summary = json!({
        "experiment": exp.name,
        "description": exp.description,
        "quick": opts.quick,
        "device": device_name(opts.device),
        "n": prepared.x.len(),
        "steps": steps,
        "draws": exp.draws,
        "seeds": seeds,
        "rel_tol": exp.rel_tol,
        "target": if optimum.is_some() { "closed-form optimal ELBO" } else { "final-window ELBO of the F-VI run with the same seed" },
        "optimal_elbo": optimum.map(num),
        "methods": rows,
    });
    write_json_atomic(&dir.join("summary.json"), &summary)?;
    if !opts.quiet {
        println!("wrote {}", dir.join("summary.json").display());
    }
    Ok(summary)
}
