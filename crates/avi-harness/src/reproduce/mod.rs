//! `avi reproduce`: the paper's experiments from their JSON definitions in
//! `data/experiments/` (digest §4, §8), and the experiments the paper only
//! argues for (HMM windows, mixtures).
//!
//! An experiment lists a model, data, run length, draws, seeds and the
//! methods to compare (each with its learning rate, and optionally its own
//! model and data). Every method × seed is fitted through the same path as
//! `avi fit`, in this process or (with `--jobs K`) in K child `avi fit`
//! processes; each run's report goes to `DIR/EXPERIMENT/runs/`. The
//! effective definition (after `--quick` and `--seeds`) is stored as
//! `DIR/EXPERIMENT/experiment.json`, so that [`crate::summary`] can rebuild
//! `summary.json`, the figures and `REPORT.md` from the stored runs alone
//! (`avi report DIR`).
//!
//! `--quick` applies the experiment's `quick` block (smaller N, fewer steps
//! and seeds, optionally one learning rate and a subset of methods) so that
//! the conclusions show in about a minute on 2 CPU cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use avi_inference::{MethodConfig, Observer};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tch::Device;

use crate::claim::{Claimed, Holder, RunClaim};
use crate::experiment::{Experiment, RunSpec};
use crate::report::{remove_stale_temp_files, write_json_atomic};
use crate::run::{diagnosis_section, prepare, run_prepared_checkpointed, Prepared};
use crate::run_report::{is_finished, RunReport, RunStatus};

mod heldout;
mod stored;
use stored::*;

/// The experiment schema's entry points, at their older path.
pub use crate::experiment::{
    effective, file_stem, load_experiment, load_experiment_file, plan, run_config,
};

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
    /// No progress bars and no per-run lines.
    pub quiet: bool,
    /// Runs at once: 1 fits in this process; K > 1 runs K child `avi fit`
    /// processes (each seeded by its config, so results do not depend on
    /// K), each with `cores / K` libtorch threads (at least 1).
    pub jobs: usize,
    /// Keep existing run reports whose config equals the one they would
    /// run with (resume an interrupted experiment), run the missing ones,
    /// skip runs claimed by another live process and take over stale
    /// claims. Without it, a folder holding finished runs is refused.
    pub resume: bool,
    /// Move the earlier contents of the experiment's folder aside into
    /// `previous-<UTC time>/` and start afresh (nothing is deleted).
    pub fresh: bool,
    /// Run only this slice of the runs (`--shard k/K`, or a launcher's
    /// environment). A sharded run keeps finished runs as with `resume`.
    pub shard: Option<Shard>,
    /// libtorch CPU threads of each fit (child processes get
    /// `min(threads, cores / jobs)`, at least 1).
    pub threads: usize,
    /// Fit the seeds of each F-VI or Const method (full batches, free θ) as
    /// one batched optimisation ([`avi_inference::FitRequest::seeds`]; the same
    /// results as separate runs with the graph engine). In this process
    /// only (`jobs` = 1).
    pub batch_seeds: bool,
    /// Write each run's checkpoints every this many steps into
    /// `NAME/checkpoints/LABEL-SEED/` (removed once its report is written);
    /// with `resume`, a run with a checkpoint continues from it (to the same
    /// bits) instead of starting again; with `jobs` > 1 in the child fits
    /// (`avi fit --checkpoint-dir`). Not with `batch_seeds`.
    pub checkpoint_every: Option<usize>,
    /// Keep each run's fitted state (`avi fit --save`) in
    /// `out/NAME/fitted/<run label>-<seed>/` (a diverged run's is not kept).
    pub save: bool,
}

/// Where `avi reproduce --save` keeps the fitted state of `run`: the
/// experiment folder's `fitted/<run label>-<seed>/`.
pub fn fitted_dir(experiment_dir: &Path, run: &RunSpec) -> PathBuf {
    experiment_dir
        .join("fitted")
        .join(format!("{}-{}", run.label, run.seed))
}

/// Save the state of a finished in-process run when `--save` asks for it.
fn save_run(
    opts: &ReproduceOptions,
    runs_dir: &Path,
    run: &RunSpec,
    prepared: &Prepared,
    fit: avi_inference::Fit,
) -> Result<()> {
    if !opts.save || fit.status != avi_inference::FitStatus::Ok {
        return Ok(());
    }
    let dir = fitted_dir(runs_dir.parent().unwrap_or(Path::new(".")), run);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    crate::fitted::save_fit(&run.config, prepared, fit, &dir)
}

/// A deterministic slice of an experiment's runs: shard `index` of `count`
/// (1-based) takes the runs `i` of [`plan`] with `i mod count = index − 1`,
/// so that every shard gets a mix of methods and seeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// 1..=count.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
    /// Where it came from (`--shard`, or the launcher's variables).
    pub source: String,
}

impl Shard {
    /// Parse `k/K` (1 ≤ k ≤ K).
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let parsed = text.split_once('/').and_then(|(k, n)| {
            Some((
                k.trim().parse::<usize>().ok()?,
                n.trim().parse::<usize>().ok()?,
            ))
        });
        match parsed {
            Some((index, count)) if index >= 1 && index <= count => Ok(Self {
                index,
                count,
                source: source.to_string(),
            }),
            _ => bail!("{source} `{text}`: expected k/K with 1 ≤ k ≤ K"),
        }
    }

    /// The shard a launcher gives this process, from its environment
    /// (`var` reads a variable): OpenMPI (`OMPI_COMM_WORLD_RANK/SIZE`),
    /// MPICH and other PMI launchers (`PMI_RANK/SIZE`), a Slurm step of
    /// several tasks (`SLURM_PROCID/SLURM_NTASKS`), or a Slurm job array
    /// (`SLURM_ARRAY_TASK_ID` counted from `SLURM_ARRAY_TASK_MIN` over
    /// `SLURM_ARRAY_TASK_COUNT`). `None` when none is set or the launcher
    /// runs one process.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    anyhow::anyhow!("environment variable {name}=`{v}` is not a count")
                }),
            }
        };
        let pairs = [
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
            ("PMI_RANK", "PMI_SIZE"),
            ("SLURM_PROCID", "SLURM_NTASKS"),
        ];
        for (rank, size) in pairs {
            if let (Some(r), Some(n)) = (num(rank)?, num(size)?) {
                if n > 1 {
                    if r >= n {
                        bail!("environment: {rank}={r} is not below {size}={n}");
                    }
                    return Ok(Some(Self {
                        index: r + 1,
                        count: n,
                        source: format!("{rank}/{size}"),
                    }));
                }
            }
        }
        if let (Some(id), Some(n)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            if n > 1 {
                let k = id.checked_sub(min).filter(|k| *k < n).ok_or_else(|| {
                    anyhow::anyhow!(
                        "environment: SLURM_ARRAY_TASK_ID={id} is not within SLURM_ARRAY_TASK_MIN={min} + SLURM_ARRAY_TASK_COUNT={n} (use a contiguous array, e.g. --array=0-{})",
                        n - 1
                    )
                })?;
                return Ok(Some(Self {
                    index: k + 1,
                    count: n,
                    source: "SLURM_ARRAY_TASK_ID".into(),
                }));
            }
        }
        Ok(None)
    }

    /// Keep this shard's runs of a plan.
    pub fn slice(&self, runs: Vec<RunSpec>) -> Vec<RunSpec> {
        runs.into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index - 1)
            .map(|(_, r)| r)
            .collect()
    }
}

/// Progress of the runs: an overall bar with ETA and, in this process, a
/// bar per run; hidden with `--quiet` or when stderr is not a terminal.
struct Progress {
    multi: MultiProgress,
    overall: ProgressBar,
    quiet: bool,
}

impl Progress {
    fn new(total: usize, name: &str, quiet: bool) -> Self {
        let multi = MultiProgress::with_draw_target(if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        let overall = multi.add(ProgressBar::new(total as u64));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} runs, {elapsed} elapsed, ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        overall.set_prefix(name.to_string());
        Self {
            multi,
            overall,
            quiet,
        }
    }

    fn run_bar(&self, steps: usize, label: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(steps as u64));
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix:>16} [{bar:30}] {pos}/{len} steps, ETA {eta}, ELBO {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(label.to_string());
        bar
    }

    fn line(&self, text: String) {
        if !self.quiet {
            // Printed above the bars (or plainly when they are hidden).
            if self.multi.is_hidden() {
                println!("{text}");
            } else {
                let _ = self.multi.println(text);
            }
        }
    }
}

struct BarObserver(ProgressBar);

impl Observer for BarObserver {
    fn on_check(&mut self, done: usize, _total: usize, elbo: f64) {
        self.0.set_position(done as u64);
        self.0.set_message(format!("{elbo:.2}"));
    }
}

/// Run an experiment: writes `experiment.json`, `runs/*.json`, and then
/// `summary.json`, the figures and `REPORT.md` (see [`crate::summary`]).
/// Returns the summary.
pub fn reproduce(exp: &Experiment, opts: &ReproduceOptions) -> Result<Value> {
    let exp = effective(exp, opts.quick, opts.seeds)?;
    if opts.shard.is_some() && opts.fresh {
        bail!("--fresh with a shard: shards of one grid share its folder; move earlier runs aside before starting them");
    }
    // A shard keeps finished runs and shares the folder, as --resume does.
    let resumed;
    let opts = if opts.shard.is_some() && !opts.resume {
        resumed = ReproduceOptions {
            resume: true,
            ..opts.clone()
        };
        &resumed
    } else {
        opts
    };
    // The held-out encoding after each fit needs the fit in this process:
    // one fit at a time, no batched seeds (so that `reproduce all --jobs K`
    // still runs every experiment; the results do not depend on K).
    let in_process;
    let opts = if exp.heldout.is_some() && (opts.jobs > 1 || opts.batch_seeds) {
        if !opts.quiet {
            println!(
                "{}: the held-out encoding after each fit runs in this process: one fit at a time (--jobs and --batch-seeds do not apply)",
                exp.name
            );
        }
        in_process = ReproduceOptions {
            jobs: 1,
            batch_seeds: false,
            ..opts.clone()
        };
        &in_process
    } else {
        opts
    };
    if opts.batch_seeds && opts.jobs > 1 {
        bail!("--batch-seeds fits in this process: leave out --jobs");
    }
    if let Some(every) = opts.checkpoint_every {
        if every == 0 {
            bail!("--checkpoint-every must be at least 1");
        }
    }
    if opts.fresh && opts.resume {
        bail!("--fresh and --resume exclude each other");
    }
    let dir = opts.out.join(&exp.name);
    let runs_dir = dir.join("runs");
    std::fs::create_dir_all(&runs_dir)
        .with_context(|| format!("cannot create {}", runs_dir.display()))?;
    for d in [&dir, &runs_dir, &dir.join("configs")] {
        remove_stale_temp_files(d).with_context(|| format!("cannot clean {}", d.display()))?;
    }
    let progress = Progress::new(0, &exp.name, opts.quiet);
    let mut runs = plan(&exp);
    if let Some(shard) = &opts.shard {
        let total = runs.len();
        runs = shard.slice(runs);
        progress.line(format!(
            "{}: shard {}/{} (from {}): {} of the {total} runs",
            exp.name,
            shard.index,
            shard.count,
            shard.source,
            runs.len()
        ));
    }
    let finished = finished_reports(&runs_dir)?;
    let claims = crate::claim::claims_in(&runs_dir)?;
    if let Some((lock, holder)) = claims.iter().find(|(_, h)| !h.is_stale()) {
        if !opts.resume {
            bail!(
                "{} is being run by another avi ({}): wait for it, or pass --resume to share the remaining runs",
                lock.with_extension("json").display(),
                holder.describe()
            );
        }
    }
    let earlier = !(finished.is_empty() && claims.is_empty());
    if earlier && !opts.resume {
        if !opts.fresh {
            let interrupted = finished.iter().filter(|p| !is_finished(p)).count();
            bail!(
                "{} holds {} finished run report(s){}{}: pass --resume to keep them and run only the missing ones, or --fresh to move them aside into {}/previous-<time>/ (nothing was changed)",
                runs_dir.display(),
                finished.len() - interrupted,
                if interrupted == 0 {
                    String::new()
                } else {
                    format!(" and {interrupted} interrupted one(s) (run again by --resume)")
                },
                if claims.is_empty() {
                    String::new()
                } else {
                    format!(" and {} claim(s) of processes that no longer run", claims.len())
                },
                dir.display()
            );
        }
        let old = move_aside(&dir)?;
        progress.line(format!(
            "moved the earlier runs of {} aside into {}",
            exp.name,
            old.display()
        ));
        std::fs::create_dir_all(&runs_dir)
            .with_context(|| format!("cannot create {}", runs_dir.display()))?;
    }
    if opts.resume {
        // A claimant killed after writing its report and before releasing
        // its claim: the run is finished, the claim is stale.
        for (lock, holder) in &claims {
            if holder.is_stale()
                && matches!(
                    crate::run_report::locate(&lock.with_extension("json")),
                    Ok(Some(_))
                )
            {
                std::fs::remove_file(lock)
                    .with_context(|| format!("cannot remove {}", lock.display()))?;
            }
        }
        // An interrupted run's report is no finished run: it runs again.
        for r in &runs {
            let path = runs_dir.join(&r.file);
            if is_finished(&path) {
                check_stored_run(&path, &r.config, opts.batch_seeds)?;
                heldout::check_stored(&exp, r, &path)?;
            }
        }
        runs.retain(|r| !is_finished(&runs_dir.join(&r.file)));
    }
    write_json_atomic(&dir.join("experiment.json"), &serde_json::to_value(&exp)?)?;
    progress.overall.set_length(runs.len() as u64);
    if opts.jobs <= 1 {
        run_here(&exp, &runs, &runs_dir, opts, &progress)?;
    } else {
        run_children(&exp, &runs, &dir, opts, &progress)?;
    }
    progress.overall.finish_and_clear();
    if opts.shard.is_some() {
        // The last shard to finish builds the summary.
        let missing = crate::summary::missing_runs(&dir)?;
        if !missing.is_empty() {
            progress.line(format!(
                "{}: this shard is done; {} run(s) of other shards are not finished yet: the last shard to finish (or `avi report {}`) writes the summary",
                exp.name,
                missing.len(),
                dir.display()
            ));
            return Ok(Value::Null);
        }
    }
    let summary = crate::summary::rebuild(&dir)?;
    progress.line(format!("wrote {}", dir.join("summary.json").display()));
    Ok(summary)
}

/// Claim `run` in `runs_dir` before fitting it. `None`: skip it (another
/// live process runs it, with `--resume`, or its report appeared
/// meanwhile); without `--resume` a live or stale claim of another process
/// is an error.
fn claim_run(
    runs_dir: &Path,
    run: &RunSpec,
    opts: &ReproduceOptions,
    progress: &Progress,
) -> Result<Option<RunClaim>> {
    let lock = runs_dir.join(&run.file).with_extension("lock");
    let report = runs_dir.join(&run.file);
    let before = crate::claim::read_holder(&lock)?;
    match RunClaim::acquire(&lock, opts.resume)? {
        Claimed::Ours(claim) => {
            if is_finished(&report) {
                if opts.resume {
                    return Ok(None);
                }
                bail!(
                    "{} appeared while this run started: another avi writes to this folder (pass --resume to share the runs)",
                    report.display()
                );
            }
            if let Some(h) = before.filter(Holder::is_stale) {
                progress.line(format!(
                    "took over the stale claim on {} ({}, no longer running)",
                    run.file,
                    h.describe()
                ));
            }
            Ok(Some(claim))
        }
        Claimed::Held(h) if opts.resume => {
            progress.line(format!("skipped {}: another avi runs it ({})", run.file, h.describe()));
            Ok(None)
        }
        Claimed::Held(h) => bail!(
            "{} is being run by another avi ({}): wait for it, or pass --resume to share the remaining runs",
            report.display(),
            h.describe()
        ),
        Claimed::Stale(h) => bail!(
            "{} was claimed by a process that no longer runs ({}): pass --resume to take it over",
            report.display(),
            h.describe()
        ),
    }
}

fn done_line(exp: &str, run: &RunSpec, report: &RunReport) -> String {
    format!(
        "{exp} {} seed {}: ELBO {:.2} ± {:.2}, {} steps in {:.1} s{}",
        run.label,
        run.seed,
        report.elbo,
        report.elbo_se,
        report.iterations,
        report.seconds,
        if report.status == RunStatus::Ok {
            String::new()
        } else {
            format!(", {}", report.status.as_str())
        } + &match report.warnings.len() {
            0 => String::new(),
            k => format!(", {k} warning(s) in its report"),
        }
    )
}

/// The experiment's diagnostic settings: F-VI steps and gradient draws.
const DIAGNOSE_STEPS: usize = 1000;
const DIAGNOSE_DRAWS: usize = 1000;

fn run_here(
    exp: &Experiment,
    runs: &[RunSpec],
    runs_dir: &Path,
    opts: &ReproduceOptions,
    progress: &Progress,
) -> Result<()> {
    // Model and data are built once per distinct (model, data, mse).
    let mut prepared: BTreeMap<String, Prepared> = BTreeMap::new();
    let mut batched: std::collections::BTreeSet<String> = Default::default();
    let mut heldout_data = heldout::HeldoutData::default();
    for run in runs {
        if crate::interrupt::requested() {
            return Err(crate::interrupt::Interrupted.into());
        }
        if batched.contains(&run.label) {
            continue;
        }
        let key = serde_json::to_string(&(&run.config.model, &run.config.data, &run.config.mse))?;
        if !prepared.contains_key(&key) {
            let p = prepare(&run.config, Path::new("."))
                .with_context(|| format!("experiment {}, method {}", exp.name, run.label))?;
            prepared.insert(key.clone(), p);
        }
        let p = &prepared[&key];
        // Every seed of this method at once (the diagnostic, which draws
        // after each fit, keeps Const runs separate).
        let diagnosed = exp.diagnose && !matches!(run.config.method, MethodConfig::Fvi);
        if opts.batch_seeds && !diagnosed && crate::run::batchable(&run.config, p) {
            batched.insert(run.label.clone());
            let mut group = Vec::new();
            for r in runs.iter().filter(|r| r.label == run.label) {
                if let Some(claim) = claim_run(runs_dir, r, opts, progress)? {
                    group.push((r, claim));
                }
            }
            if group.is_empty() {
                continue;
            }
            let seeds: Vec<u64> = group.iter().map(|(r, _)| r.seed).collect();
            // One checkpoint folder for the batch, named by its seeds (a
            // resumed grid whose batch has other seeds starts it afresh).
            let plan = match opts.checkpoint_every {
                Some(every) => {
                    let names: Vec<String> = seeds.iter().map(u64::to_string).collect();
                    let mut spec = run.clone();
                    spec.file = format!("{}-seeds-{}.json", file_stem(&run.label), names.join("-"));
                    Some(checkpoint_plan(runs_dir, &spec, every, opts.resume)?)
                }
                None => None,
            };
            if let Some(dir) = plan.as_ref().filter(|p| p.resume).map(|p| &p.dir) {
                progress.line(format!(
                    "{}: {} seeds {} resume from their checkpoint in {}",
                    exp.name,
                    run.label,
                    seeds
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    dir.display()
                ));
            }
            let bar =
                progress.run_bar(run.config.steps, &format!("{} ×{}", run.label, seeds.len()));
            let mut observer = BarObserver(bar.clone());
            let results = crate::run::run_prepared_batched(
                &run.config,
                p,
                &seeds,
                opts.device,
                &mut observer,
                plan.as_ref(),
            )?;
            bar.finish_and_clear();
            progress.multi.remove(&bar);
            let mut interrupted = false;
            for ((spec, claim), (fit, mut report)) in group.into_iter().zip(results) {
                slim(&mut report);
                write_json_atomic(&runs_dir.join(&spec.file), &report)?;
                save_run(opts, runs_dir, spec, p, fit)?;
                drop(claim);
                interrupted |= report.status == RunStatus::Interrupted;
                if !interrupted {
                    progress.overall.inc(1);
                }
                progress.line(done_line(&exp.name, spec, &report));
            }
            if interrupted {
                return Err(crate::interrupt::Interrupted.into());
            }
            // The reports are written: the batch's checkpoints are done with.
            if let Some(p) = &plan {
                std::fs::remove_dir_all(&p.dir)
                    .with_context(|| format!("cannot remove {}", p.dir.display()))?;
            }
            continue;
        }
        let Some(claim) = claim_run(runs_dir, run, opts, progress)? else {
            progress.overall.inc(1);
            continue;
        };
        let plan = match opts.checkpoint_every {
            Some(every) => Some(checkpoint_plan(runs_dir, run, every, opts.resume)?),
            None => None,
        };
        if let Some(info) = plan.as_ref().filter(|p| p.resume).map(|p| &p.dir) {
            progress.line(format!(
                "{}: {} seed {} resumes from its checkpoint in {}",
                exp.name,
                run.label,
                run.seed,
                info.display()
            ));
        }
        let bar = progress.run_bar(run.config.steps, &format!("{} {}", run.label, run.seed));
        let mut observer = BarObserver(bar.clone());
        let (fit, mut report) =
            run_prepared_checkpointed(&run.config, p, opts.device, &mut observer, plan.as_ref())?;
        bar.finish_and_clear();
        progress.multi.remove(&bar);
        if report.status == RunStatus::Interrupted {
            // Written (as not finished: --resume runs it again), then stop.
            slim(&mut report);
            write_json_atomic(&runs_dir.join(&run.file), &report)?;
            drop(claim);
            progress.line(done_line(&exp.name, run, &report));
            return Err(crate::interrupt::Interrupted.into());
        }
        if exp.diagnose
            && !matches!(run.config.method, MethodConfig::Fvi)
            && report.status == RunStatus::Ok
        {
            report.diagnosis = Some(diagnosis_section(
                &run.config,
                p,
                &fit,
                DIAGNOSE_STEPS,
                DIAGNOSE_DRAWS,
            )?);
        }
        if heldout::wanted(exp, run) {
            let (section, fitted) = heldout::encode_run(exp, run, p, fit, &mut heldout_data)?;
            report.heldout = section;
            slim(&mut report);
            write_json_atomic(&runs_dir.join(&run.file), &report)?;
            if opts.save && report.status == RunStatus::Ok {
                let dir = fitted_dir(runs_dir.parent().unwrap_or(Path::new(".")), run);
                if let Some(parent) = dir.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                crate::fitted::save_variational(&run.config, p, fitted.variational, &dir)?;
            }
        } else {
            slim(&mut report);
            write_json_atomic(&runs_dir.join(&run.file), &report)?;
            save_run(opts, runs_dir, run, p, fit)?;
        }
        if let Some(p) = &plan {
            // The report (and the state) are written: the run's checkpoints
            // are done with.
            std::fs::remove_dir_all(&p.dir)
                .with_context(|| format!("cannot remove {}", p.dir.display()))?;
        }
        drop(claim);
        progress.overall.inc(1);
        progress.line(done_line(&exp.name, run, &report));
    }
    Ok(())
}

/// The checkpoints of `run` (`--checkpoint-every`): into
/// `NAME/checkpoints/LABEL-SEED/`; resumed from there with `resume` when
/// there is one, otherwise started afresh (an earlier folder removed).
fn checkpoint_plan(
    runs_dir: &Path,
    run: &RunSpec,
    every: usize,
    resume: bool,
) -> Result<crate::run::CheckpointPlan> {
    let stem = Path::new(&run.file).with_extension("");
    let dir = runs_dir
        .parent()
        .unwrap_or(Path::new("."))
        .join("checkpoints")
        .join(stem);
    let found = avi_inference::latest_checkpoint(&dir)?.is_some();
    if !resume && dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let config_dir = Path::new(".")
        .canonicalize()
        .context("cannot resolve the working folder")?;
    Ok(crate::run::CheckpointPlan {
        dir,
        every,
        resume: resume && found,
        context: crate::run::CheckpointContext {
            config: run.config.clone(),
            config_dir,
        },
    })
}

fn run_children(
    exp: &Experiment,
    runs: &[RunSpec],
    dir: &Path,
    opts: &ReproduceOptions,
    progress: &Progress,
) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the avi executable")?;
    let configs = dir.join("configs");
    std::fs::create_dir_all(&configs)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = opts.threads.min(cores / opts.jobs).max(1);
    let device = match opts.device {
        Device::Cuda(_) => "cuda",
        _ => "cpu",
    };
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.min(runs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= runs.len() || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                let run = &runs[i];
                let child = Child {
                    exe: &exe,
                    device,
                    threads,
                    save: opts.save,
                    checkpoint_every: opts.checkpoint_every,
                    resume: opts.resume,
                };
                let result =
                    claim_run(&dir.join("runs"), run, opts, progress).and_then(
                        |claim| match claim {
                            None => {
                                progress.overall.inc(1);
                                Ok(())
                            }
                            Some(claim) => {
                                let r = run_child(exp, run, dir, &configs, &child, progress);
                                drop(claim);
                                r
                            }
                        },
                    );
                if let Err(e) = result {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(format!("{e:#}"));
                    }
                    break;
                }
            });
        }
    });
    if crate::interrupt::requested() {
        return Err(crate::interrupt::Interrupted.into());
    }
    if let Some(e) = failure.into_inner().unwrap_or(None) {
        bail!(e);
    }
    Ok(())
}

/// How child `avi fit` processes are started.
struct Child<'a> {
    exe: &'a Path,
    device: &'a str,
    threads: usize,
    /// Pass `--save` (the run's [`fitted_dir`]).
    save: bool,
    /// `--checkpoint-every S`: each child fit checkpoints into its run's
    /// folder under `NAME/checkpoints/`, continuing from there with
    /// `resume` (see [`checkpoint_plan`]).
    checkpoint_every: Option<usize>,
    /// `--resume`.
    resume: bool,
}

/// The environment variable that tells a child `avi` to exit when its
/// standard input closes (the parent died: no orphan keeps fitting).
pub const EXIT_WITH_PARENT: &str = "AVI_EXIT_WITH_PARENT";

fn run_child(
    exp: &Experiment,
    run: &RunSpec,
    dir: &Path,
    configs: &Path,
    child: &Child<'_>,
    progress: &Progress,
) -> Result<()> {
    let cfg_path = configs.join(&run.file);
    write_json_atomic(&cfg_path, &serde_json::to_value(&run.config)?)?;
    let out = dir.join("runs").join(&run.file);
    let diagnose = exp.diagnose && !matches!(run.config.method, MethodConfig::Fvi);
    let mut cmd = Command::new(child.exe);
    cmd.arg(if diagnose { "diagnose" } else { "fit" })
        .arg("--config")
        .arg(&cfg_path)
        .arg("--out")
        .arg(&out)
        .args([
            "--device",
            child.device,
            "--threads",
            &child.threads.to_string(),
            "--quiet",
        ])
        .env("OMP_NUM_THREADS", child.threads.to_string())
        .env(EXIT_WITH_PARENT, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if child.save {
        let fitted = fitted_dir(dir, run);
        if let Some(parent) = fitted.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        cmd.arg("--save").arg(fitted);
    }
    // Checkpoints (not for `avi diagnose` children: its F-VI refinement
    // after the fit has no checkpoints; those runs start again).
    let plan = match child.checkpoint_every.filter(|_| !diagnose) {
        Some(every) => Some(checkpoint_plan(
            &dir.join("runs"),
            run,
            every,
            child.resume,
        )?),
        None => None,
    };
    if let Some(plan) = &plan {
        if plan.resume {
            progress.line(format!(
                "{}: {} seed {} resumes from its checkpoint in {}",
                exp.name,
                run.label,
                run.seed,
                plan.dir.display()
            ));
        }
        cmd.arg("--checkpoint-dir")
            .arg(&plan.dir)
            .args(["--checkpoint-every", &plan.every.to_string()]);
    }
    if diagnose {
        cmd.args([
            "--fvi-steps",
            &DIAGNOSE_STEPS.to_string(),
            "--gradient-draws",
            &DIAGNOSE_DRAWS.to_string(),
        ]);
    }
    let mut process = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", child.exe.display()))?;
    // Held open while the child runs: it stops when this end closes, i.e.
    // when this process ends, however it ends, or is interrupted.
    let mut parent_alive = process.stdin.take();
    let mut stderr = process.stderr.take();
    // The child's error line, read while it runs (a full pipe would block it).
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = std::io::Read::read_to_string(s, &mut text);
        }
        text
    });
    let status = loop {
        if let Some(status) = process
            .try_wait()
            .with_context(|| format!("cannot wait for {}", child.exe.display()))?
        {
            break status;
        }
        if crate::interrupt::requested() && parent_alive.is_some() {
            // The child notices the closed pipe at its next check.
            parent_alive = None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(parent_alive);
    let err = reader.join().unwrap_or_default();
    if status.code() == Some(130) {
        // The child was interrupted (its report, if any, says
        // `interrupted`): the whole command stops.
        crate::interrupt::set();
    }
    if crate::interrupt::requested() {
        return Err(crate::interrupt::Interrupted.into());
    }
    // Exit 3 is a diverged fit: its report is written and counts as a run.
    if !(status.success() || status.code() == Some(3)) {
        bail!(
            "{} {} seed {}: {}",
            exp.name,
            run.label,
            run.seed,
            err.trim()
        );
    }
    let mut report = crate::run_report::load(&out)?;
    if slim(&mut report) {
        write_json_atomic(&out, &report)?;
    }
    if let Some(plan) = &plan {
        // The report is written: the run's checkpoints are done with.
        if plan.dir.exists() {
            std::fs::remove_dir_all(&plan.dir)
                .with_context(|| format!("cannot remove {}", plan.dir.display()))?;
        }
    }
    progress.overall.inc(1);
    progress.line(done_line(&exp.name, run, &report));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::*;

    fn shipped(name: &str) -> Experiment {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/experiments");
        load_experiment(&dir, name).unwrap()
    }

    /// Every shipped experiment and variant (`data/experiments/variants/`)
    /// loads, and its quick form keeps only claims about methods the quick
    /// run runs.
    #[test]
    fn shipped_quick_claims_name_only_methods_that_run() {
        let variants = default_experiments_dir().join("variants");
        let mut all: Vec<(String, Experiment)> = EXPERIMENTS
            .iter()
            .map(|name| (name.to_string(), shipped(name)))
            .collect();
        for entry in std::fs::read_dir(&variants).unwrap() {
            let path = entry.unwrap().path();
            let exp = load_experiment_file(&path).unwrap();
            all.push((path.display().to_string(), exp));
        }
        assert!(all.len() > EXPERIMENTS.len(), "no variant in {variants:?}");
        for (name, exp) in &all {
            let q = effective(exp, true, None).unwrap();
            let run: Vec<&String> = q.methods.iter().map(|m| &m.label).collect();
            for c in &q.claims {
                for l in c.labels() {
                    assert!(run.contains(&l), "{name}: quick claim names {l}");
                }
            }
        }
    }

    /// A quick claim list replaces the experiment's claims, and naming a
    /// method the quick run leaves out is an error, not a silent skip.
    /// `k/K` parses; a launcher's environment gives the shard (OpenMPI,
    /// PMI, a multi-task Slurm step, a Slurm job array counted from its
    /// minimum); one process or no launcher is no shard; bad values are
    /// errors naming the variable.
    #[test]
    fn shards_from_the_flag_and_the_launchers() {
        assert_eq!(Shard::parse("2/3", "--shard").unwrap().index, 2);
        for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
            assert!(Shard::parse(bad, "--shard").is_err(), "{bad}");
        }
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let get = |pairs: &'static [(&'static str, &'static str)]| {
            Shard::from_env(env(pairs))
                .unwrap()
                .map(|s| (s.index, s.count))
        };
        assert_eq!(
            get(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "3")]),
            Some((3, 3))
        );
        assert_eq!(get(&[("PMI_RANK", "0"), ("PMI_SIZE", "4")]), Some((1, 4)));
        assert_eq!(
            get(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]),
            Some((2, 2))
        );
        // A job array's task runs one process: its array index counts.
        assert_eq!(
            get(&[
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "1"),
                ("SLURM_ARRAY_TASK_ID", "7"),
                ("SLURM_ARRAY_TASK_MIN", "5"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ]),
            Some((3, 4))
        );
        assert_eq!(
            get(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "1")]),
            None
        );
        assert_eq!(get(&[]), None);
        assert!(Shard::from_env(env(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])).is_err());
        assert!(Shard::from_env(env(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")])).is_err());
        // Slices: every run in exactly one shard.
        let exp = shipped("linear");
        let all = plan(&exp);
        let mut seen: Vec<String> = (1..=3)
            .flat_map(|k| {
                Shard {
                    index: k,
                    count: 3,
                    source: String::new(),
                }
                .slice(plan(&exp))
                .into_iter()
                .map(|r| r.file)
            })
            .collect();
        seen.sort();
        let mut want: Vec<String> = all.into_iter().map(|r| r.file).collect();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn quick_claim_list_replaces_the_claims() {
        let exp = shipped("bnn");
        let q = effective(&exp, true, None).unwrap();
        let QuickClaims::List(list) = &exp.quick.claims else {
            panic!("the bnn quick block lists its own claims");
        };
        assert_eq!(q.claims.len(), list.len());
        assert!(!q.claims.is_empty());
        let full = effective(&exp, false, None).unwrap();
        assert_eq!(full.claims.len(), exp.claims.len());
        let mut bad = exp.clone();
        bad.quick.claims = QuickClaims::List(vec![Claim::Never {
            text: "k = 256 never converges".into(),
            paper_verdicts: None,
            labels: vec!["k=256".into()],
        }]);
        let err = effective(&bad, true, None).unwrap_err().to_string();
        assert!(err.contains("k=256"), "{err}");
    }
}
