//! The `avi` command line (see the `avi_harness` crate docs for the contract).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use avi_harness::config::FitConfig;
use avi_harness::demo;
use avi_harness::report::write_json_atomic;
use avi_harness::run::{prepare, resolve_device, run_prepared, DeviceChoice};
use avi_inference::{FitStatus, Silent};
use clap::{Parser, Subcommand};

/// Amortized variational inference on libtorch.
#[derive(Debug, Parser)]
#[command(name = "avi", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// libtorch CPU threads (default: libtorch's choice, one per core). One
    /// thread is often fastest at the paper's sizes and on a loaded machine.
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fit one configuration and write its report.
    Fit {
        /// The JSON config.
        #[arg(long)]
        config: PathBuf,
        /// Where to write the JSON report (atomically).
        #[arg(long)]
        out: PathBuf,
        /// Device: auto (CUDA when available), cpu or cuda.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Fit a config, then run F-VI from its solution (the paper's §5
    /// diagnostic): the report gains a `diagnosis` section.
    Diagnose {
        /// The JSON config (an A-VI or Const method).
        #[arg(long)]
        config: PathBuf,
        /// Where to write the JSON report (atomically).
        #[arg(long)]
        out: PathBuf,
        /// F-VI steps from the amortized solution.
        #[arg(long, default_value_t = 1000)]
        fvi_steps: usize,
        /// Monte Carlo draws for the F-VI gradient norm.
        #[arg(long, default_value_t = 1000)]
        gradient_draws: usize,
        /// Device: auto, cpu or cuda.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Run an experiment from data/experiments/ and write its runs,
    /// summary.json, figures and REPORT.md under OUT/EXPERIMENT/.
    Reproduce {
        /// linear | nonlinear | bnn | saw | hmm-window | mixture |
        /// hmm-counterexample | all, or the path of a definition file.
        experiment: String,
        /// Only the first N seeds of the experiment.
        #[arg(long)]
        seeds: Option<usize>,
        /// Smaller N, fewer steps and seeds (about a minute on 2 CPU cores).
        #[arg(long)]
        quick: bool,
        /// Device: auto, cpu or cuda.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Output folder; results go to OUT/EXPERIMENT/.
        #[arg(long, default_value = "out/reproduce")]
        out: PathBuf,
        /// Folder of the experiment definitions.
        #[arg(long)]
        experiments: Option<PathBuf>,
        /// No progress bars and no per-run lines.
        #[arg(long)]
        quiet: bool,
        /// Runs at once (child processes sharing the CPU threads; results
        /// do not depend on it).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Keep the run reports already in OUT/EXPERIMENT/runs/ and run only
        /// the missing ones.
        #[arg(long)]
        resume: bool,
        /// Override the definition's engine: torch, fused (the fused CPU
        /// engine of the linear, nonlinear and saw models), or graph (CUDA
        /// graphs of the libtorch step; mini-batches in a fixed order).
        #[arg(long, value_enum)]
        engine: Option<EngineChoice>,
        /// Fit the seeds of each F-VI and Const method (full batches, free
        /// θ) as one batched optimisation: the results of separate runs with
        /// the graph engine's Adam, one set of kernels for all seeds. Not
        /// with --jobs.
        #[arg(long)]
        batch_seeds: bool,
    },
    /// Rebuild summary.json, the figures and REPORT.md from stored runs
    /// (no refitting): DIR is an `avi reproduce --out` folder or one
    /// experiment's folder in it.
    Report {
        /// The folder.
        dir: PathBuf,
        /// Only the first N seeds of each experiment (for a grid stopped
        /// part-way): its experiment.json is rewritten to list them.
        #[arg(long)]
        seeds: Option<usize>,
    },
    /// The linear model (N = 10,000) with F-VI, Const and A-VI (d = 1, 2).
    Demo {
        /// Output folder for configs, reports and the summary.
        #[arg(long, default_value = "out/demo")]
        out: PathBuf,
        /// Device: auto, cpu or cuda.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Number of observations.
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// Adam steps per method.
        #[arg(long, default_value_t = 5_000)]
        steps: usize,
    },
}

/// The `--engine` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EngineChoice {
    /// libtorch kernels and autograd.
    Torch,
    /// The fused CPU engine (linear, nonlinear, saw).
    Fused,
    /// libtorch kernels with a device-side Adam; on CUDA each block of
    /// `check_every` steps (or whole epochs between two MSE records) is one
    /// CUDA-graph replay.
    Graph,
}

/// What a successful command ended with.
enum Outcome {
    Done,
    Diverged(usize, PathBuf),
}

fn check_out_dir(out: &Path) -> Result<()> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!("output folder {} does not exist", dir.display());
    }
    Ok(())
}

fn fit_command(config: &Path, out: &Path, device: DeviceChoice) -> Result<Outcome> {
    let cfg = FitConfig::load(config)?;
    let device = resolve_device(device)?;
    check_out_dir(out)?;
    let dir = config.parent().unwrap_or(Path::new("."));
    let prepared = prepare(&cfg, dir).with_context(|| format!("config {}", config.display()))?;
    let (fit, report) = run_prepared(&cfg, &prepared, device, &mut Silent)?;
    write_json_atomic(out, &report)?;
    Ok(match fit.status {
        FitStatus::Ok => Outcome::Done,
        FitStatus::Diverged { at } => Outcome::Diverged(at, out.to_path_buf()),
    })
}

fn diagnose_command(
    config: &Path,
    out: &Path,
    fvi_steps: usize,
    gradient_draws: usize,
    device: DeviceChoice,
) -> Result<Outcome> {
    let cfg = FitConfig::load(config)?;
    if matches!(cfg.method, avi_inference::MethodConfig::Fvi) {
        anyhow::bail!(
            "config {}: the diagnostic starts from an amortized (avi or const) solution, not fvi",
            config.display()
        );
    }
    if cfg.batch_size.is_some() {
        anyhow::bail!(
            "config {}: the diagnostic needs full batches (remove batch_size)",
            config.display()
        );
    }
    if gradient_draws == 0 {
        anyhow::bail!("--gradient-draws must be at least 1");
    }
    let device = resolve_device(device)?;
    check_out_dir(out)?;
    let dir = config.parent().unwrap_or(Path::new("."));
    let prepared = prepare(&cfg, dir).with_context(|| format!("config {}", config.display()))?;
    let (fit, mut report) = run_prepared(&cfg, &prepared, device, &mut Silent)?;
    if let FitStatus::Diverged { at } = fit.status {
        write_json_atomic(out, &report)?;
        return Ok(Outcome::Diverged(at, out.to_path_buf()));
    }
    report["diagnosis"] =
        avi_harness::run::diagnosis_section(&cfg, &prepared, &fit, fvi_steps, gradient_draws)?;
    let d = &report["diagnosis"];
    let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
    write_json_atomic(out, &report)?;
    println!(
        "amortized ELBO {:.3} ± {:.3}; after {} F-VI steps {:.3} ± {:.3}; gain {:.3} ± {:.3}; F-VI gradient norm {:.4}",
        f("amortized_elbo"), f("amortized_se"), fvi_steps, f("refined_elbo"), f("refined_se"), f("gain"), f("gain_se"), f("gradient_norm")
    );
    Ok(Outcome::Done)
}

fn run(cli: Cli) -> Result<Outcome> {
    if let Some(t) = cli.threads {
        if t == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        tch::set_num_threads(i32::try_from(t).unwrap_or(i32::MAX));
    }
    match cli.command {
        Command::Fit {
            config,
            out,
            device,
        } => fit_command(&config, &out, device),
        Command::Diagnose {
            config,
            out,
            fvi_steps,
            gradient_draws,
            device,
        } => diagnose_command(&config, &out, fvi_steps, gradient_draws, device),
        Command::Reproduce {
            experiment,
            seeds,
            quick,
            device,
            out,
            experiments,
            quiet,
            jobs,
            resume,
            engine,
            batch_seeds,
        } => {
            use avi_harness::reproduce::{
                default_experiments_dir, load_experiment, load_experiment_file, reproduce,
                ReproduceOptions, EXPERIMENTS,
            };
            let dir = experiments.unwrap_or_else(default_experiments_dir);
            let mut defs = if experiment == "all" {
                EXPERIMENTS
                    .iter()
                    .map(|name| load_experiment(&dir, name))
                    .collect::<Result<Vec<_>>>()?
            } else if EXPERIMENTS.contains(&experiment.as_str()) {
                vec![load_experiment(&dir, &experiment)?]
            } else if experiment.ends_with(".json") {
                vec![load_experiment_file(Path::new(&experiment))?]
            } else {
                anyhow::bail!(
                    "unknown experiment `{experiment}` (one of {}, all, or a definition file NAME.json)",
                    EXPERIMENTS.join(", ")
                );
            };
            if jobs == 0 {
                anyhow::bail!("--jobs must be at least 1");
            }
            if let Some(e) = engine {
                for d in &mut defs {
                    d.engine = match e {
                        EngineChoice::Torch => avi_inference::Engine::Torch,
                        EngineChoice::Fused => avi_inference::Engine::Fused,
                        EngineChoice::Graph => avi_inference::Engine::Graph,
                    };
                }
            }
            let device = resolve_device(device)?;
            let opts = ReproduceOptions {
                quick,
                seeds,
                out: out.clone(),
                device,
                quiet,
                jobs,
                resume,
                batch_seeds,
            };
            for exp in &defs {
                reproduce(exp, &opts)?;
            }
            if defs.len() > 1 {
                avi_harness::summary::report_all(&out, None)?;
            }
            Ok(Outcome::Done)
        }
        Command::Report { dir, seeds } => {
            let folders = avi_harness::summary::report_all(&dir, seeds)?;
            for f in folders {
                println!("rebuilt {}", f.join("REPORT.md").display());
            }
            Ok(Outcome::Done)
        }
        Command::Demo {
            out,
            device,
            n,
            steps,
        } => {
            let device = resolve_device(device)?;
            demo::run_demo(&out, device, n, steps)?;
            Ok(Outcome::Done)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Diverged(at, out)) => {
            eprintln!(
                "avi: the fit diverged at iteration {at} (non-finite ELBO or parameters); report written to {}",
                out.display()
            );
            ExitCode::from(3)
        }
        Err(e) => {
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("avi: error: {line}");
            ExitCode::from(2)
        }
    }
}
