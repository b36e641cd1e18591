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

fn run(cli: Cli) -> Result<Outcome> {
    match cli.command {
        Command::Fit {
            config,
            out,
            device,
        } => fit_command(&config, &out, device),
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
