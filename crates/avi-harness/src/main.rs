//! The `avi` command line (see the `avi_harness` crate docs for the contract).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use avi_harness::config::{DataConfig, FitConfig};
use avi_harness::report::write_json_atomic;
use avi_harness::reproduce::EXIT_WITH_PARENT;
use avi_harness::run::{
    check_output, prepare, resolve_device, run_prepared, run_prepared_checkpointed,
    CheckpointContext, CheckpointPlan, DeviceChoice,
};
use avi_harness::{demo, fitted, interrupt};
use avi_inference::FitStatus;
use clap::{Parser, Subcommand};

/// Amortized variational inference on libtorch.
#[derive(Debug, Parser)]
#[command(name = "avi", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// libtorch CPU threads of each fit, at most the number of cores
    /// (default 1: the fastest at the paper's sizes, and a fit does not
    /// collapse when other processes share the cores). The fused engine's
    /// sums, and so its last bits, depend on it; the report records it.
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fit one configuration and write its report.
    Fit {
        /// The JSON config (not with `--resume`, which takes the config
        /// from the checkpoint).
        #[arg(long, required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Where to write the JSON report (atomically).
        #[arg(long)]
        out: PathBuf,
        /// Device: auto (CUDA when available), cpu or cuda.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Validate only: check the config, its data and the output path,
        /// print the resolved config and the memory the fit would need, and
        /// exit 0 (valid) or 2; nothing is fitted or written.
        #[arg(long)]
        check: bool,
        /// No progress (by default a bar on a terminal, else a line on
        /// stdout at check blocks, at most one a second).
        #[arg(long)]
        quiet: bool,
        /// Save the fitted state (safetensors and fitted.json) to this
        /// folder after the fit, atomically (wins over the config's
        /// `"save"`); a folder holding another fit's state is refused. A
        /// config with `"checkpoint": {"every": S}` writes its checkpoints
        /// into `DIR/checkpoint/` (removed once the final state is saved).
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
        /// Continue the killed fit whose checkpoints are in
        /// `DIR/checkpoint/` (its config, data and options come from the
        /// checkpoint) and write its report to `--out`: the same report as
        /// the uninterrupted fit's, times aside.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "check", "save"])]
        resume: Option<PathBuf>,
        /// Write checkpoints every `--checkpoint-every` steps into DIR itself
        /// (not `SAVE/checkpoint/`), continuing from DIR's latest checkpoint
        /// when it holds one: how `avi reproduce --jobs K --checkpoint-every
        /// S` runs its child fits.
        #[arg(
            long,
            value_name = "DIR",
            requires = "checkpoint_every",
            conflicts_with = "resume"
        )]
        checkpoint_dir: Option<PathBuf>,
        /// Steps between the checkpoints of `--checkpoint-dir`.
        #[arg(long, value_name = "S", requires = "checkpoint_dir")]
        checkpoint_every: Option<usize>,
    },
    /// Encode new data with a saved fit (`avi fit --save`): q(z) of every
    /// new observation through the fitted inference function, q(θ) as
    /// fitted, the held-out ELBO and, with --refine, the amortization gap on
    /// the new data.
    Encode {
        /// The saved fit's folder.
        #[arg(long, value_name = "DIR")]
        fitted: PathBuf,
        /// The new data: a data file (JSON {"x": …}, CSV, .npy) or a JSON
        /// file holding a config `data` block ({"data": {…}}).
        #[arg(long)]
        data: PathBuf,
        /// Where to write the JSON report (atomically).
        #[arg(long)]
        out: PathBuf,
        /// Device: auto (CUDA when available), cpu or cuda.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Monte Carlo draws of the held-out ELBO.
        #[arg(long, default_value_t = 1000)]
        draws: usize,
        /// Seed of the draws (and of the refinement).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// F-VI steps on the new data's factors from the encoder's output,
        /// q(θ) held (0: none).
        #[arg(long, default_value_t = 0)]
        refine: usize,
        /// Adam's learning rate of the refinement.
        #[arg(long, default_value_t = 0.01)]
        refine_lr: f64,
    },
    /// Split a saved fit's gap to log p(x | θ) into the approximation gap
    /// and the amortization gap (Cremer et al. 2018), on its training data,
    /// at its fixed θ (or q(θ)'s mean): see docs/gap.md.
    Gap {
        /// The saved fit's folder (`avi fit --save`).
        #[arg(long, value_name = "DIR")]
        fitted: PathBuf,
        /// The training data: a data file (JSON {"x": …}, CSV, .npy) or a
        /// JSON file holding a config `data` block.
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        data: Option<PathBuf>,
        /// The config the fit was made with (its data are simulated or
        /// read as in `avi fit`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write the JSON report (atomically).
        #[arg(long)]
        out: PathBuf,
        /// Device: auto (CUDA when available), cpu or cuda.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Monte Carlo draws of each ELBO estimate.
        #[arg(long, default_value_t = 1000)]
        draws: usize,
        /// Importance-weighting draws K per observation (when log p(x | θ)
        /// is not by quadrature).
        #[arg(long, default_value_t = 1000)]
        iw_samples: usize,
        /// Use importance weighting even where quadrature applies.
        #[arg(long)]
        iw: bool,
        /// F-VI refinement steps to the F-VI optimum, θ held.
        #[arg(long, default_value_t = 5000)]
        refine_steps: usize,
        /// Adam's learning rate of the refinement.
        #[arg(long, default_value_t = 0.01)]
        refine_lr: f64,
        /// Monte Carlo draws per refinement step.
        #[arg(long, default_value_t = 100)]
        refine_draws: usize,
        /// Seed of the draws, the refinement and the IW draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
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
        /// No progress output.
        #[arg(long)]
        quiet: bool,
        /// Save the fitted (amortized) state to this folder, as `avi fit
        /// --save` does.
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
    },
    /// Run an experiment from data/experiments/ and write its runs,
    /// summary.json, figures and REPORT.md under OUT/EXPERIMENT/.
    Reproduce {
        /// linear | nonlinear | bnn | saw | hmm-window | mixture |
        /// hmm-counterexample | generalization | semi-amortized | all, or the
        /// path of a definition file.
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
        /// Keep the run reports already in OUT/EXPERIMENT/runs/ (each only
        /// when its config equals the one it would run with) and run only
        /// the missing ones; runs claimed by another live avi are left to
        /// it, stale claims taken over. Without --resume or --fresh a folder
        /// with finished runs is refused.
        #[arg(long)]
        resume: bool,
        /// Run only shard k of K of the runs (k = 1..K, a fixed slice);
        /// without it the shard comes from an MPI or Slurm launcher's
        /// environment when there is one. Shards keep finished runs (as
        /// --resume) and share the folder; the last one to finish writes
        /// the summary.
        #[arg(long, value_name = "k/K")]
        shard: Option<String>,
        /// Move the earlier contents of OUT/EXPERIMENT/ aside into
        /// OUT/EXPERIMENT/previous-TIME/ (TIME: the UTC time) and start afresh (nothing is
        /// deleted).
        #[arg(long, conflicts_with = "resume")]
        fresh: bool,
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
        /// Keep each run's fitted state in
        /// `OUT/EXPERIMENT/fitted/LABEL-SEED/` (see `avi encode`).
        #[arg(long)]
        save: bool,
        /// Write each run's checkpoints every S steps into
        /// OUT/EXPERIMENT/checkpoints/LABEL-SEED/ (removed when its report
        /// is written); with --resume an unfinished run continues from its
        /// checkpoint instead of starting again, to the same bits (with --jobs
        /// in its child fits). Not with --batch-seeds.
        #[arg(long, value_name = "S")]
        checkpoint_every: Option<usize>,
    },
    /// Rewrite the full run reports of an experiment folder (or of each
    /// experiment folder in DIR) as compact ones, runs/LABEL-SEED.json.gz
    /// (gzip, the trace as 10-step block means), after checking that
    /// `avi report` gives the same summary.json from them; nothing is
    /// changed otherwise.
    Compact {
        /// The folder.
        dir: PathBuf,
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
        /// Report an incomplete grid without exit code 4 (its claims with
        /// missing runs read "not checked" either way).
        #[arg(long)]
        partial: bool,
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
    /// The fastest engine that supports the model, method, options and
    /// device (the report names the one that ran).
    Auto,
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
    /// Ctrl-C stopped the fit at this step; its report is written.
    Interrupted(usize, PathBuf),
    /// `avi report` on a grid with missing runs (without `--partial`).
    Incomplete(String),
}

/// Progress of `avi fit`: a bar on stderr when it is a terminal, else a
/// line on stdout at the end of a check block (the training loop reads its
/// trace back there anyway, so this adds no host synchronisation), at most
/// one a second and always the last (a write per block of 100 fast steps
/// measurably slowed the loop); nothing with `--quiet`.
enum FitProgress {
    Quiet,
    Bar(indicatif::ProgressBar),
    /// Start of the fit and time of the last line.
    Lines(std::time::Instant, Option<std::time::Instant>),
}

/// Least time between two progress lines.
const LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl FitProgress {
    fn new(quiet: bool, steps: usize) -> Self {
        use std::io::IsTerminal;
        if quiet {
            Self::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(steps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "[{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta}, ELBO {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Self::Bar(bar)
        } else {
            Self::Lines(std::time::Instant::now(), None)
        }
    }

    fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

impl avi_inference::Observer for FitProgress {
    fn on_check(&mut self, done: usize, total: usize, elbo: f64) {
        match self {
            Self::Quiet => {}
            Self::Bar(bar) => {
                bar.set_position(done as u64);
                bar.set_message(format!("{elbo:.2}"));
            }
            Self::Lines(start, last) => {
                let now = std::time::Instant::now();
                if done == total || last.is_none_or(|t| now - t >= LINE_EVERY) {
                    *last = Some(now);
                    println!(
                        "step {done}/{total}: ELBO {elbo:.3} ({:.1} s)",
                        (now - *start).as_secs_f64()
                    );
                }
            }
        }
    }
}

/// The input files of a config: the config itself, its data file and its
/// held-out data file (relative paths resolved against the config's folder).
fn inputs_of(config: &Path, cfg: &FitConfig) -> Vec<PathBuf> {
    let dir = config.parent().unwrap_or(Path::new("."));
    let mut files = vec![config.to_path_buf()];
    let mut add = |d: &DataConfig| {
        if let DataConfig::File(p) = d {
            files.push(dir.join(p));
        }
    };
    add(&cfg.data);
    if let Some(t) = cfg.mse.as_ref().and_then(|m| m.test.as_ref()) {
        add(t);
    }
    files
}

/// The checkpoint folder inside a save folder.
fn checkpoint_dir(save: &Path) -> PathBuf {
    save.join(avi_inference::CHECKPOINT_FOLDER)
}

/// `avi fit --resume DIR`: the config and plan stored in DIR's latest
/// checkpoint.
fn resume_plan(save: &Path) -> Result<(FitConfig, PathBuf, CheckpointPlan)> {
    let dir = checkpoint_dir(save);
    let info = avi_inference::latest_checkpoint(&dir)?.with_context(|| {
        format!(
            "--resume {}: no checkpoint in {}",
            save.display(),
            dir.display()
        )
    })?;
    let context: CheckpointContext = info
        .context
        .context("the checkpoint holds no config")
        .and_then(|c| Ok(serde_json::from_value(c)?))
        .with_context(|| format!("checkpoint {}", info.path.display()))?;
    let every = context
        .config
        .checkpoint
        .with_context(|| {
            format!(
                "checkpoint {}: its config has no `checkpoint`",
                info.path.display()
            )
        })?
        .every;
    eprintln!(
        "avi: resuming from step {} of {} ({})",
        info.step,
        info.steps,
        info.path.display()
    );
    let plan = CheckpointPlan {
        dir,
        every,
        resume: true,
        context: context.clone(),
    };
    Ok((context.config, context.config_dir, plan))
}

/// Where `avi fit`'s checkpoints come from (the flags exclude each other).
enum Checkpoints<'a> {
    /// As the config says (`"checkpoint"` with the save folder).
    Config,
    /// `--resume DIR`: continue DIR's killed fit.
    Resume(&'a Path),
    /// `--checkpoint-dir DIR --checkpoint-every S`.
    Into(&'a Path, usize),
}

fn fit_command(
    config: Option<&Path>,
    out: &Path,
    device: DeviceChoice,
    check: bool,
    quiet: bool,
    save: Option<&Path>,
    checkpoints: Checkpoints<'_>,
) -> Result<Outcome> {
    let (resume, run_checkpoints) = match checkpoints {
        Checkpoints::Config => (None, None),
        Checkpoints::Resume(dir) => (Some(dir), None),
        Checkpoints::Into(dir, every) => (None, Some((dir, every))),
    };
    let (cfg, dir, plan) = match (config, resume) {
        (_, Some(save)) => {
            let (cfg, dir, plan) = resume_plan(save)?;
            (cfg, dir, Some(plan))
        }
        (Some(config), None) => {
            let cfg = FitConfig::load(config)?;
            let dir = config.parent().unwrap_or(Path::new(".")).to_path_buf();
            (cfg, dir, None)
        }
        (None, None) => anyhow::bail!("give --config FILE or --resume DIR"),
    };
    let device = resolve_device(device)?;
    // A resumed config's own file is not an input (it is in the checkpoint).
    let config_path = config.map_or_else(|| dir.join("config.json"), Path::to_path_buf);
    check_output(out, &inputs_of(&config_path, &cfg))?;
    // `--check` of simulated data sizes them without drawing them (unless
    // a save folder exists already: checking it needs the data's hash).
    let save_exists = save
        .map(Path::to_path_buf)
        .or_else(|| cfg.save.as_ref().map(|p| fitted::resolve(p, &dir)))
        .is_some_and(|p| p.exists());
    if check && resume.is_none() && !save_exists {
        let checked = avi_harness::run::check_simulated(&cfg, device)
            .with_context(|| format!("config {}", config_path.display()))?;
        if let Some((n, bytes)) = checked {
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            println!(
                "valid: {n} observations (to be simulated); the fit would need about {} of memory on {} (libtorch engine estimate)",
                avi_harness::run::human_bytes(bytes),
                avi_harness::run::device_name(device)
            );
            return Ok(Outcome::Done);
        }
    }
    let prepared =
        prepare(&cfg, &dir).with_context(|| format!("config {}", config_path.display()))?;
    // The saved state's folder: the resumed fit's own, else --save, else
    // the config's "save".
    let save: Option<PathBuf> = match resume {
        Some(dir) => Some(dir.to_path_buf()),
        None => save
            .map(Path::to_path_buf)
            .or_else(|| cfg.save.as_ref().map(|p| fitted::resolve(p, &dir))),
    };
    if let Some(save) = &save {
        fitted::check_save(&cfg, &prepared, save)?;
    }
    // `--checkpoint-dir DIR --checkpoint-every S` (reproduce's children):
    // checkpoints in DIR itself, continued from there when DIR holds one.
    let plan = match run_checkpoints {
        Some((ckpt, every)) if !check => {
            if every == 0 {
                anyhow::bail!("--checkpoint-every must be at least 1");
            }
            let found = avi_inference::latest_checkpoint(ckpt)?.is_some();
            let config_dir = dir
                .canonicalize()
                .with_context(|| format!("cannot resolve the config's folder {}", dir.display()))?;
            Some(CheckpointPlan {
                dir: ckpt.to_path_buf(),
                every,
                resume: found,
                context: CheckpointContext {
                    config: cfg.clone(),
                    config_dir,
                },
            })
        }
        _ => plan,
    };
    let plan = match (plan, &cfg.checkpoint) {
        (Some(plan), _) => Some(plan),
        (None, None) => None,
        (None, Some(_)) if check => None,
        (None, Some(c)) => {
            let Some(save) = &save else {
                anyhow::bail!(
                    "field `checkpoint` needs a folder for the checkpoints: --save DIR or \"save\": \"DIR\" in the config"
                )
            };
            let ckpt = checkpoint_dir(save);
            if avi_inference::latest_checkpoint(&ckpt).is_ok_and(|c| c.is_some())
                || ckpt.join("latest.json").exists()
            {
                anyhow::bail!(
                    "{} holds the checkpoints of a fit: continue it with `avi fit --resume {}`, or save into another folder",
                    ckpt.display(),
                    save.display()
                );
            }
            let config_dir = dir
                .canonicalize()
                .with_context(|| format!("cannot resolve the config's folder {}", dir.display()))?;
            Some(CheckpointPlan {
                dir: ckpt,
                every: c.every,
                resume: false,
                context: CheckpointContext {
                    config: cfg.clone(),
                    config_dir,
                },
            })
        }
    };
    if check {
        let bytes = avi_harness::run::check_prepared(&cfg, &prepared, device)?;
        let resolved = serde_json::to_string_pretty(&cfg)?;
        println!("{resolved}");
        println!(
            "valid: {} observations; the fit would need about {} of memory on {} (libtorch engine estimate)",
            prepared.x.len(),
            avi_harness::run::human_bytes(bytes),
            avi_harness::run::device_name(device)
        );
        return Ok(Outcome::Done);
    }
    let mut progress = FitProgress::new(quiet, cfg.steps);
    let (fit, report) =
        run_prepared_checkpointed(&cfg, &prepared, device, &mut progress, plan.as_ref())?;
    progress.finish();
    for w in &fit.warnings {
        eprintln!("avi: warning: {w}");
    }
    let status = fit.status;
    match (&save, status) {
        // The state first, then the report: a failed save leaves no report.
        (Some(save), FitStatus::Ok) => fitted::save_fit(&cfg, &prepared, fit, save)?,
        (Some(save), FitStatus::Diverged { .. }) => {
            eprintln!(
                "avi: the fit diverged: its state is not saved to {}",
                save.display()
            );
        }
        (Some(save), FitStatus::Interrupted { .. }) => match &plan {
            Some(_) => eprintln!(
                "avi: the fit was interrupted: continue it with `avi fit --resume {} --out {}`",
                save.display(),
                out.display()
            ),
            None => eprintln!(
                "avi: the fit was interrupted: its state is not saved to {}",
                save.display()
            ),
        },
        (None, _) => {}
    }
    write_json_atomic(out, &report)?;
    Ok(match status {
        FitStatus::Ok => Outcome::Done,
        FitStatus::Diverged { at } => Outcome::Diverged(at, out.to_path_buf()),
        FitStatus::Interrupted { at } => Outcome::Interrupted(at, out.to_path_buf()),
    })
}

fn diagnose_command(
    config: &Path,
    out: &Path,
    fvi_steps: usize,
    gradient_draws: usize,
    device: DeviceChoice,
    quiet: bool,
    save: Option<PathBuf>,
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
    check_output(out, &inputs_of(config, &cfg))?;
    let dir = config.parent().unwrap_or(Path::new("."));
    let prepared = prepare(&cfg, dir).with_context(|| format!("config {}", config.display()))?;
    let save = save.or_else(|| cfg.save.as_ref().map(|p| fitted::resolve(p, dir)));
    if let Some(save) = &save {
        fitted::check_save(&cfg, &prepared, save)?;
    }
    let mut progress = FitProgress::new(quiet, cfg.steps);
    let (fit, mut report) = run_prepared(&cfg, &prepared, device, &mut progress)?;
    progress.finish();
    match fit.status {
        FitStatus::Ok => {}
        FitStatus::Diverged { at } => {
            write_json_atomic(out, &report)?;
            return Ok(Outcome::Diverged(at, out.to_path_buf()));
        }
        FitStatus::Interrupted { at } => {
            write_json_atomic(out, &report)?;
            return Ok(Outcome::Interrupted(at, out.to_path_buf()));
        }
    }
    let d = avi_harness::run::diagnosis_section(&cfg, &prepared, &fit, fvi_steps, gradient_draws)?;
    println!(
        "amortized ELBO {:.3} ± {:.3}; after {} F-VI steps {:.3} ± {:.3}; gain {:.3} ± {:.3}; F-VI gradient norm {:.4}",
        d.amortized_elbo, d.amortized_se, fvi_steps, d.refined_elbo, d.refined_se, d.gain, d.gain_se, d.gradient_norm
    );
    report.diagnosis = Some(d);
    if let Some(save) = &save {
        fitted::save_fit(&cfg, &prepared, fit, save)?;
    }
    write_json_atomic(out, &report)?;
    Ok(Outcome::Done)
}

fn run(cli: Cli) -> Result<Outcome> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cli.threads.unwrap_or(1);
    if threads == 0 || threads > cores {
        anyhow::bail!("--threads {threads}: must be in 1..={cores} (the cores of this machine)");
    }
    tch::set_num_threads(i32::try_from(threads).unwrap_or(1));
    match cli.command {
        Command::Fit {
            config,
            out,
            device,
            check,
            quiet,
            save,
            resume,
            checkpoint_dir,
            checkpoint_every,
        } => fit_command(
            config.as_deref(),
            &out,
            device,
            check,
            quiet,
            save.as_deref(),
            match (
                resume.as_deref(),
                checkpoint_dir.as_deref().zip(checkpoint_every),
            ) {
                (Some(dir), _) => Checkpoints::Resume(dir),
                (None, Some((dir, every))) => Checkpoints::Into(dir, every),
                (None, None) => Checkpoints::Config,
            },
        ),
        Command::Encode {
            fitted,
            data,
            out,
            device,
            draws,
            seed,
            refine,
            refine_lr,
        } => {
            let device = resolve_device(device)?;
            let args = avi_harness::encode::EncodeArgs {
                fitted,
                data,
                out,
                device,
                options: avi_inference::EncodeOptions {
                    draws,
                    seed,
                    refine_steps: refine,
                    refine_lr,
                    ..avi_inference::EncodeOptions::default()
                },
            };
            avi_harness::encode::encode_command(&args)?;
            Ok(Outcome::Done)
        }
        Command::Gap {
            fitted,
            data,
            config,
            out,
            device,
            draws,
            iw_samples,
            iw,
            refine_steps,
            refine_lr,
            refine_draws,
            seed,
        } => {
            let device = resolve_device(device)?;
            let data = match (data, config) {
                (Some(d), _) => avi_harness::gap::GapData::File(d),
                (None, Some(c)) => avi_harness::gap::GapData::Config(c),
                (None, None) => anyhow::bail!("give --data FILE or --config C"),
            };
            let args = avi_harness::gap::GapArgs {
                fitted,
                data,
                out,
                device,
                options: avi_inference::GapOptions {
                    draws,
                    seed,
                    refine_steps,
                    refine_lr,
                    refine_draws,
                    iw_samples,
                    marginal: if iw {
                        avi_inference::MarginalMethod::ImportanceWeighted
                    } else {
                        avi_inference::MarginalMethod::Auto
                    },
                    ..avi_inference::GapOptions::default()
                },
            };
            avi_harness::gap::gap_command(&args)?;
            Ok(Outcome::Done)
        }
        Command::Diagnose {
            config,
            out,
            fvi_steps,
            gradient_draws,
            device,
            quiet,
            save,
        } => diagnose_command(
            &config,
            &out,
            fvi_steps,
            gradient_draws,
            device,
            quiet,
            save,
        ),
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
            shard,
            fresh,
            engine,
            batch_seeds,
            save,
            checkpoint_every,
        } => {
            use avi_harness::reproduce::Shard;
            let shard = match shard {
                Some(text) => Some(Shard::parse(&text, "--shard")?),
                None => Shard::from_env(|k| std::env::var(k).ok())?,
            };
            use avi_harness::experiment::{
                default_experiments_dir, load_experiment, load_experiment_file, EXPERIMENTS,
            };
            use avi_harness::reproduce::{reproduce, ReproduceOptions};
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
                        EngineChoice::Auto => avi_inference::Engine::Auto,
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
                fresh,
                shard,
                threads,
                batch_seeds,
                save,
                checkpoint_every,
            };
            let mut complete = true;
            for exp in &defs {
                complete &= !reproduce(exp, &opts)?.is_null();
            }
            // With shards, the last one to finish gathers the reports.
            if defs.len() > 1 && complete {
                avi_harness::summary::report_all(&out, None)?;
            }
            Ok(Outcome::Done)
        }
        Command::Compact { dir } => {
            for c in avi_harness::compact::compact(&dir)? {
                println!(
                    "{}: {} run report(s) compacted, {:.1} MB → {:.1} MB{}",
                    c.dir.display(),
                    c.runs,
                    c.bytes_before as f64 / 1e6,
                    c.bytes_after as f64 / 1e6,
                    if c.interrupted > 0 {
                        format!("; {} interrupted run(s) left full", c.interrupted)
                    } else {
                        String::new()
                    }
                );
            }
            Ok(Outcome::Done)
        }
        Command::Report {
            dir,
            seeds,
            partial,
        } => {
            let folders = avi_harness::summary::report_all(&dir, seeds)?;
            let mut missing = Vec::new();
            for f in &folders {
                println!("rebuilt {}", f.join("REPORT.md").display());
                for run in avi_harness::summary::missing_runs(f)? {
                    missing.push(f.join("runs").join(run).display().to_string());
                }
            }
            if missing.is_empty() || partial {
                return Ok(Outcome::Done);
            }
            let shown = missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            Ok(Outcome::Incomplete(format!(
                "the grid is incomplete: {} run(s) missing ({shown}{}); its claims on them read \"not checked\"; pass --partial to report it with exit 0",
                missing.len(),
                if missing.len() > 5 { ", …" } else { "" }
            )))
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

/// A command-line error as one line: clap's message without its usage and
/// help hints, its lines joined.
fn one_line(e: &clap::Error) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Ctrl-C (SIGINT) and SIGTERM request a stop ([`interrupt`]): the fit
/// ends at its next block with status interrupted, its report is written,
/// and the command exits 130 with its claims released and no file
/// half-written. A child of `avi reproduce --jobs K`
/// (told by [`EXIT_WITH_PARENT`]) also stops when its parent's pipe closes,
/// so killing the parent never leaves fits running.
fn install_handlers() {
    let grace = std::time::Duration::from_secs(10);
    let _ = ctrlc::set_handler(move || interrupt::request(grace));
    if std::env::var_os(EXIT_WITH_PARENT).is_some() {
        std::thread::spawn(move || {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            // Returns 0 at end of file: the parent is gone.
            while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            interrupt::request(grace)
        });
    }
}

fn main() -> ExitCode {
    install_handlers();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: clap's own output, exit 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("avi: error: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Diverged(at, out)) => {
            eprintln!(
                "avi: the fit diverged at iteration {at} (non-finite ELBO or parameters); report written to {}",
                out.display()
            );
            ExitCode::from(3)
        }
        Ok(Outcome::Interrupted(at, out)) => {
            eprintln!(
                "avi: interrupted after step {at}; report (status interrupted) written to {}",
                out.display()
            );
            ExitCode::from(130)
        }
        Ok(Outcome::Incomplete(line)) => {
            eprintln!("avi: {line}");
            ExitCode::from(4)
        }
        Err(e) if e.downcast_ref::<interrupt::Interrupted>().is_some() => {
            eprintln!("avi: interrupted");
            ExitCode::from(130)
        }
        Err(e) => {
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("avi: error: {line}");
            ExitCode::from(2)
        }
    }
}
