//! The one training loop: every engine ([`crate::Engine`], and batched
//! seeds as an engine with R runs) is driven by [`drive`], which owns the
//! trace, the divergence rule, the learning-rate schedule, monitoring and
//! the observer; [`FitRequest`] is the one entry point.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use avi_models::Model;
use tch::{Device, Tensor};

use crate::checkpoint::{self, FitFacts, Resumed, Writer};
use crate::elbo::{evaluate_at, evaluate_from};
use crate::engine::batched::BatchedTrainer;
use crate::engine::cavi::CaviTrainer;
use crate::engine::fused::FusedTrainer;
use crate::engine::fused_cuda::CudaFviTrainer;
use crate::engine::graph::GraphTrainer;
use crate::engine::torch::Trainer;
use crate::engine::Stepper;
use crate::family::{host_vec, summarize, GaussianSummary};
use crate::forms::fused_form;
use crate::function::Output;
use crate::limits::check_data_size;
use crate::method::{LocalFactor, MethodConfig, ThetaFactor, Variational};
use crate::observer::{Observer, Silent};
use crate::options::{CheckedOptions, Engine, FitOptions, LocalUpdates};
use crate::result::{elbo_warnings, final_status, Clock, Fit, FitStatus, Trace};
use crate::rng::{global_guard, Draws};
use crate::stop::{not_converged_warning, verdict, StopState, Stopped};
use crate::{InferenceError, Result};

/// Start describing a fit of `method` to data `x` under `model`: set what
/// differs from the defaults on the returned [`FitRequest`] and call
/// [`FitRequest::run`].
///
/// ```no_run
/// # use avi_inference::{fit, FitOptions, MethodConfig};
/// # use avi_models::LinearModel;
/// # use tch::Tensor;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let model = LinearModel::new(1.155, 2.43)?;
/// let x = Tensor::from_slice(&model.simulate(1_000, 7, None)?);
/// let result = fit(&model, &x, &MethodConfig::Fvi)
///     .options(FitOptions { steps: 2_000, ..FitOptions::default() })
///     .run()?;
/// println!("{} by the {:?} engine", result.elbo, result.engine);
/// # Ok(())
/// # }
/// ```
pub fn fit<'a>(model: &'a dyn Model, x: &'a Tensor, method: &MethodConfig) -> FitRequest<'a> {
    FitRequest {
        model,
        x,
        method: method.clone(),
        options: FitOptions::default(),
        device: Device::Cpu,
        fixed_theta: None,
        start: None,
        init_theta: None,
        seeds: None,
        threads: 1,
        observer: None,
        interrupt: None,
        checkpoint: None,
        context: None,
        resume: None,
    }
}

/// One fit (or one per seed) described in full: the model, the data, the
/// method and everything else with a default ([`fit`] makes one). Every
/// setting is checked once, before anything is allocated: the options
/// ([`FitOptions::checked`]), the sizes and the memory a fit needs on its
/// device ([`crate::check_fit`]), the data.
pub struct FitRequest<'a> {
    model: &'a dyn Model,
    x: &'a Tensor,
    method: MethodConfig,
    options: FitOptions,
    device: Device,
    fixed_theta: Option<Vec<f64>>,
    start: Option<Variational>,
    init_theta: Option<(Vec<f64>, Vec<f64>)>,
    seeds: Option<Vec<u64>>,
    threads: usize,
    observer: Option<&'a mut dyn Observer>,
    interrupt: Option<&'a AtomicBool>,
    checkpoint: Option<(std::path::PathBuf, usize)>,
    context: Option<serde_json::Value>,
    resume: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for FitRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FitRequest")
            .field("model", &self.model.name())
            .field("method", &self.method)
            .field("options", &self.options)
            .field("device", &self.device)
            .field("fixed_theta", &self.fixed_theta)
            .field("seeds", &self.seeds)
            .field("threads", &self.threads)
            .field("checkpoint", &self.checkpoint)
            .field("resume", &self.resume)
            .finish()
    }
}

impl<'a> FitRequest<'a> {
    /// The fit's settings (default [`FitOptions::default`]).
    pub fn options(mut self, options: impl std::borrow::Borrow<FitOptions>) -> Self {
        self.options = options.borrow().clone();
        self
    }

    /// The device the fit runs on (default the CPU); the data may live
    /// anywhere and are moved there.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Hold θ fixed at these values (q(θ) a point mass; the ELBO then
    /// bounds log p(x | θ)); `None` (the default) fits q(θ).
    pub fn fixed_theta(mut self, theta: Option<&[f64]>) -> Self {
        self.fixed_theta = theta.map(<[f64]>::to_vec);
        self
    }

    /// Start from these variational parameters (a warm start, e.g. a
    /// [`Fit::variational`] of the same family, or [`Variational::to_free`]
    /// of an A-VI fit) instead of the family's initialisation; Adam's state
    /// starts afresh and the draws come from `seed`. The libtorch engine
    /// takes them ([`Engine::Auto`] chooses it).
    pub fn start_from(mut self, start: Variational) -> Self {
        self.start = Some(start);
        self
    }

    /// Start q(θ) at these means and log-sds, one per coordinate of θ,
    /// instead of the model's default initialisation (the rest of the
    /// family is initialised as usual). The libtorch and graph engines
    /// take them ([`Engine::Auto`] chooses the libtorch one); with a warm
    /// start ([`FitRequest::start_from`]) they are refused, not ignored.
    pub fn init_theta(mut self, mean: &[f64], log_sd: &[f64]) -> Self {
        self.init_theta = Some((mean.to_vec(), log_sd.to_vec()));
        self
    }

    /// Fit once per seed ([`FitRequest::run_all`]); `options.seed` is then
    /// not used. With [`Engine::Graph`] the runs are one batched
    /// optimisation (R runs in one engine) whose every run equals the
    /// separate fit with its seed: F-VI or Const with Gaussian local
    /// factors, a free θ and full batches (anything else is refused); with
    /// other engines, separate fits one after the other.
    pub fn seeds(mut self, seeds: &[u64]) -> Self {
        self.seeds = Some(seeds.to_vec());
        self
    }

    /// libtorch's CPU threads (and the fused engine's) during the fit
    /// (default 1, the fastest at the paper's sizes and robust when other
    /// processes share the cores: libtorch's own default, one per core,
    /// measured 45× slower on a loaded 2-core machine). libtorch's count is
    /// process-wide: the fit sets it. The fused engine's sums, and so its
    /// last bits, depend on it.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Write a checkpoint into the folder `dir` every `every` steps (see
    /// [`crate::checkpoint`] for the format and its atomicity): the fit
    /// killed at any moment can continue from the latest one
    /// ([`FitRequest::resume`]) and end with the same bits as without the
    /// interruption. Every engine on the CPU can checkpoint (on CUDA the
    /// graph engine and the fused kernels refuse). Batched seeds keep one
    /// checkpoint of the whole batch; several seeds fitted one after
    /// another keep one each, in `dir/seed-<seed>/`. The observer's records
    /// ([`Observer::state`]) travel with it. `dir` must be new, empty or a
    /// checkpoint folder already: old checkpoints in it are removed. A
    /// checkpoint step ends a block of the loop; writing is off the
    /// trace's clock.
    pub fn checkpoint(mut self, dir: impl Into<std::path::PathBuf>, every: usize) -> Self {
        self.checkpoint = Some((dir.into(), every));
        self
    }

    /// Anything the caller wants stored in every checkpoint (the `avi`
    /// binary stores its resolved config), read back by
    /// [`crate::latest_checkpoint`].
    pub fn checkpoint_context(mut self, context: serde_json::Value) -> Self {
        self.context = Some(context);
        self
    }

    /// Continue the fit from the latest checkpoint in the folder `dir`
    /// (written by [`FitRequest::checkpoint`]) instead of starting afresh.
    /// The request must describe the same fit (model, data, method,
    /// options, engine, threads, device; checked, as is every file's
    /// SHA-256); the engine is built as for a fresh fit, then given the
    /// checkpoint's state, trace and step count. Checkpointing, if also
    /// asked for, continues.
    pub fn resume(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.resume = Some(dir.into());
        self
    }

    /// Hooks called during the fit (progress, monitoring).
    pub fn observer(mut self, observer: &'a mut dyn Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Stop cleanly when `flag` becomes true (e.g. set by a Ctrl-C
    /// handler): the loop looks at it between blocks of steps (at most
    /// `check_every` steps apart; no extra host synchronisation), and a fit
    /// that has not taken all its steps ends there with
    /// [`FitStatus::Interrupted`], evaluated and summarised as usual; with
    /// several seeds, the seeds after it are not fitted. Default: none.
    pub fn interrupt(mut self, flag: &'a AtomicBool) -> Self {
        self.interrupt = Some(flag);
        self
    }

    /// The engine [`FitRequest::run`] would use (resolves [`Engine::Auto`]).
    pub fn engine(&self) -> Engine {
        match self.options.engine {
            Engine::Auto => self.auto_engine(),
            e => e,
        }
    }

    fn auto_engine(&self) -> Engine {
        let fused = self.device == Device::Cpu
            && fused_form(self.model).is_some()
            && self.fixed_theta.is_none()
            && self.options.batch_size.is_none()
            && self.start.is_none()
            && self.init_theta.is_none()
            && self.options.local_updates == LocalUpdates::Gradient
            && !matches!(
                self.method,
                MethodConfig::Markov(_) | MethodConfig::Semi { .. }
            );
        if fused {
            Engine::Fused
        } else {
            Engine::Torch
        }
    }

    /// Run the fit. Non-finite ELBO estimates or parameters stop it with
    /// [`FitStatus::Diverged`]; the result is still returned. A final ELBO
    /// that may not be trusted is described in [`Fit::warnings`].
    pub fn run(self) -> Result<Fit> {
        if self.seeds.as_ref().is_some_and(|s| s.len() != 1) {
            return Err(InferenceError::config(
                "seeds",
                "run fits one seed; use run_all for several",
            ));
        }
        let mut fits = self.run_all()?;
        Ok(fits.remove(0))
    }

    /// Run one fit per seed of [`FitRequest::seeds`] (or the one of the
    /// options), in order.
    pub fn run_all(mut self) -> Result<Vec<Fit>> {
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(InferenceError::config(
                "threads",
                format!("{} must be in 1..={MAX_THREADS}", self.threads),
            ));
        }
        // Always, in this thread: libtorch's OpenMP count is per thread
        // (and its first parallel op in a thread may reset it from the
        // global default), so a count set by another thread is no promise.
        tch::set_num_threads(self.threads as i32);
        let engine = self.engine();
        crate::semi::check(self.model, &self.method, &self.options, engine)?;
        let opts = self.options.clone().checked()?.with_engine(engine);
        let batched = engine == Engine::Graph && self.seeds.is_some();
        let seeds = self.seeds.take().unwrap_or_else(|| vec![opts.seed]);
        if seeds.is_empty() {
            return Err(InferenceError::config("seeds", "at least one seed"));
        }
        // Seeds fitted one after another keep a checkpoint folder each.
        let per_seed = !batched && seeds.len() > 1;
        if let (Some(dir), true) = (&self.resume, per_seed) {
            let any = seeds
                .iter()
                .any(|s| dir.join(seed_folder(*s)).join("latest.json").is_file());
            if !any {
                return Err(InferenceError::checkpoint(
                    dir.join(seed_folder(seeds[0])).join("latest.json"),
                    "no checkpoint to resume from (none of the seeds has one)",
                ));
            }
        }
        let mut silent = Silent;
        let observer: &mut dyn Observer = match self.observer.take() {
            Some(o) => o,
            None => &mut silent,
        };
        if batched {
            if self.fixed_theta.is_some() || self.start.is_some() {
                return Err(InferenceError::config(
                    "seeds",
                    "batched seeds need a free θ and the family's initialisation",
                ));
            }
            let stepper =
                BatchedTrainer::new(self.model, self.x, &self.method, &seeds, &opts, self.device)?;
            return self.drive_and_finish(Box::new(stepper), &opts, observer, &seeds, None);
        }
        let mut fits = Vec::with_capacity(seeds.len());
        for seed in seeds {
            let mut o = opts.clone().into_inner();
            o.seed = seed;
            let opts = o.checked()?;
            let stepper = self.stepper(&opts, observer.monitor_every())?;
            let sub = per_seed.then(|| seed_folder(seed));
            fits.extend(self.drive_and_finish(stepper, &opts, observer, &[seed], sub)?);
            if fits
                .last()
                .is_some_and(|f| matches!(f.status, FitStatus::Interrupted { .. }))
            {
                break;
            }
        }
        Ok(fits)
    }

    /// The engine of `opts.engine` for this problem, validated and
    /// initialised.
    fn stepper(
        &mut self,
        opts: &CheckedOptions,
        monitor_every: usize,
    ) -> Result<Box<dyn Stepper + 'a>> {
        let (model, x, method, device) = (self.model, self.x, &self.method, self.device);
        check_data_size(model, x, method, opts, device)?;
        if matches!(method, MethodConfig::Markov(_)) && opts.engine != Engine::Torch {
            return Err(InferenceError::config(
                "engine",
                format!(
                    "the {:?} engine does not support \"structure\": \"markov\" (it runs on the libtorch engine: \"torch\" or \"auto\")",
                    opts.engine
                )
                .to_lowercase(),
            ));
        }
        let fixed = self.fixed_theta.as_deref();
        if matches!(method, MethodConfig::Semi { .. })
            && (self.start.is_some() || opts.local_updates != LocalUpdates::Gradient)
        {
            return Err(InferenceError::config(
                "method",
                "a semi-amortized method starts from its own initialisation and takes gradient steps \
                 (no warm start, no CAVI updates)",
            ));
        }
        if let Some(start) = self.start.take() {
            if self.init_theta.is_some() {
                return Err(InferenceError::config(
                    "init_theta",
                    "a warm start brings its own q(θ): set it on the starting parameters",
                ));
            }
            if opts.engine != Engine::Torch {
                return Err(InferenceError::config(
                    "engine",
                    "a warm start runs on the libtorch engine (\"torch\" or \"auto\")",
                ));
            }
            let trainer = Trainer::starting_at(model, x, start, opts, device)?;
            if opts.local_updates != LocalUpdates::Gradient {
                return Ok(Box::new(CaviTrainer::new(model, trainer)?));
            }
            return Ok(Box::new(trainer));
        }
        let init = self.init_theta.clone();
        let trainer = || -> Result<Trainer<'a>> {
            let mut start = crate::forms::init_hint(model);
            if init.is_some() {
                start.theta = init.clone();
            }
            Trainer::with_init(model, x, method, fixed, opts, device, start)
        };
        if init.is_some() && !matches!(opts.engine, Engine::Torch | Engine::Graph) {
            return Err(InferenceError::config(
                "init_theta",
                "initial values of q(θ) are taken by the libtorch and graph engines",
            ));
        }
        if opts.local_updates != LocalUpdates::Gradient {
            // Coordinate ascent on F-VI's categorical factors, θ fixed:
            // the libtorch trainer initialises, the CAVI engine sweeps.
            if opts.engine != Engine::Torch {
                return Err(InferenceError::config(
                    "local_updates",
                    "CAVI updates run on the libtorch engine (\"torch\" or \"auto\")",
                ));
            }
            return Ok(Box::new(CaviTrainer::new(model, trainer()?)?));
        }
        match opts.engine {
            Engine::Auto | Engine::Torch => match method.switch_at() {
                Some(at) => Ok(Box::new(crate::semi::Switch::new(trainer()?, at))),
                None => Ok(Box::new(trainer()?)),
            },
            Engine::Graph => {
                // Monitoring happens between blocks: a block must end at
                // every monitoring step and at every check.
                let block = match monitor_every {
                    0 => opts.check_every,
                    every => gcd(opts.check_every, every),
                };
                opts.check_schedule_blocks(block, "graph engine")?;
                Ok(Box::new(GraphTrainer::new(trainer()?, block)?))
            }
            Engine::Fused => {
                let Some(form) = fused_form(model) else {
                    return Err(InferenceError::config(
                        "engine",
                        format!(
                            "the fused engine covers the linear, nonlinear and saw models, not {}",
                            model.name()
                        ),
                    ));
                };
                if fixed.is_some() {
                    return Err(InferenceError::config(
                        "engine",
                        "the fused engine needs a free q(θ) (no fixed_theta)",
                    ));
                }
                let host = host_vec(x)?;
                if device.is_cuda() {
                    if !opts.lr_schedule.is_empty() {
                        return Err(InferenceError::config(
                            "lr_schedule",
                            "the fused CUDA kernels take one learning rate (use the graph engine)",
                        ));
                    }
                    if monitor_every > 0 && monitor_every % opts.check_every != 0 {
                        return Err(InferenceError::config(
                            "check_every",
                            format!(
                                "blocks of {} steps do not end at every monitoring step ({monitor_every})",
                                opts.check_every
                            ),
                        ));
                    }
                    return Ok(Box::new(CudaFviTrainer::new(
                        &form,
                        &host,
                        method,
                        opts,
                        device,
                        opts.check_every,
                    )?));
                }
                // libtorch's thread count, but no more threads than blocks
                // of FUSED_WORK_PER_THREAD elements (N × draws): below that
                // a second thread does not pay for its wake-up and the final
                // sums (saw, N = 1,000, 100 draws, 2-core VM: 0.29–0.40 ms
                // per step on 2 pooled threads, 0.30–0.40 on 1; linear,
                // N = 10⁴: 2.7–2.9 vs 3.5–3.9).
                const FUSED_WORK_PER_THREAD: usize = 250_000;
                let work = host.len().saturating_mul(opts.draws);
                let threads = self.threads.clamp(1, (work / FUSED_WORK_PER_THREAD).max(1));
                Ok(Box::new(
                    FusedTrainer::new(&form, &host, method, opts, device)?.with_threads(threads),
                ))
            }
        }
    }

    /// Drive `stepper` (the runs of `seeds`) and finish its fits;
    /// checkpoints, when asked for, go to the subfolder `sub` of the
    /// checkpoint and resume folders when given.
    fn drive_and_finish(
        &self,
        stepper: Box<dyn Stepper + 'a>,
        opts: &FitOptions,
        observer: &mut dyn Observer,
        seeds: &[u64],
        sub: Option<String>,
    ) -> Result<Vec<Fit>> {
        let mut stepper = stepper;
        let x = stepper
            .data()
            .unwrap_or_else(|| self.x.to_device(self.device).to_kind(opts.dtype.kind()));
        let (mut writer, resumed) =
            self.checkpoints(stepper.as_mut(), opts, seeds, sub.as_deref())?;
        let (traces, status, stopped, seconds) = {
            let _capture = stepper.exclusive().then(global_guard);
            drive(
                stepper.as_mut(),
                opts,
                observer,
                self.interrupt,
                writer.as_mut(),
                resumed,
            )?
        };
        if let Some(w) = &mut writer {
            w.wait()?;
        }
        let runs = stepper.finish()?;
        let mut fits = Vec::with_capacity(runs.len());
        for (((run, trace), status), stopped) in
            runs.into_iter().zip(traces).zip(status).zip(stopped)
        {
            fits.push(finish(
                self.model,
                run,
                &x,
                (trace, status, stopped),
                seconds,
                opts,
                self.threads,
                &self.method,
            )?);
        }
        Ok(fits)
    }
}

impl FitRequest<'_> {
    /// The checkpoint writer, and the state restored into `stepper` from
    /// the checkpoint to resume from, as the request asks.
    fn checkpoints(
        &self,
        stepper: &mut dyn Stepper,
        opts: &FitOptions,
        seeds: &[u64],
        sub: Option<&str>,
    ) -> Result<(Option<Writer>, Option<Resumed>)> {
        if self.checkpoint.is_none() && self.resume.is_none() {
            return Ok((None, None));
        }
        let facts = FitFacts {
            model: self.model,
            x: self.x,
            method: &self.method,
            options: opts,
            threads: self.threads,
            device: self.device,
            seeds,
        };
        let folder = |dir: &std::path::Path| match sub {
            Some(s) => dir.join(s),
            None => dir.to_path_buf(),
        };
        let writer = match &self.checkpoint {
            Some((dir, every)) => {
                // Refuse an engine that cannot save before any step is taken.
                stepper.state()?;
                Some(Writer::new(
                    &folder(dir),
                    *every,
                    self.context.clone(),
                    &facts,
                )?)
            }
            None => None,
        };
        // Seeds fitted one after another: a seed without a checkpoint of
        // its own (not reached before the interruption) starts afresh.
        let resume = self
            .resume
            .as_deref()
            .map(folder)
            .filter(|d| sub.is_none() || d.join("latest.json").is_file());
        let resumed = match &resume {
            Some(dir) => {
                let (state, resumed) = checkpoint::load(dir, &facts)?;
                stepper.restore(&state)?;
                Some(resumed)
            }
            None => None,
        };
        Ok((writer, resumed))
    }
}

/// The checkpoint subfolder of one of several seeds fitted one after
/// another.
fn seed_folder(seed: u64) -> String {
    format!("seed-{seed}")
}

/// The most threads a fit asks libtorch for.
pub const MAX_THREADS: usize = 4096;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The one training loop. Blocks of steps start at multiples of the
/// engine's block and end at every check (`check_every`), every monitoring
/// step, every change of the learning rate and the last step; after each
/// block every run's estimates go into its trace, a run is marked diverged
/// at its first non-finite estimate (or, at a check, at non-finite
/// parameters), the observer hears of the check, and monitoring runs off
/// the clock. Between blocks the stopping rule ([`crate::stop`]) and the
/// interrupt flag are looked at. Returns the traces, statuses and early
/// stops of the runs and the wall time.
#[allow(clippy::type_complexity)]
fn drive(
    stepper: &mut dyn Stepper,
    opts: &FitOptions,
    observer: &mut dyn Observer,
    interrupt: Option<&AtomicBool>,
    mut checkpoints: Option<&mut Writer>,
    resumed: Option<Resumed>,
) -> Result<(Vec<Trace>, Vec<FitStatus>, Vec<Option<Stopped>>, f64)> {
    let runs = stepper.runs();
    let block = stepper.block().min(opts.check_every).max(1);
    let every = observer.monitor_every();
    let mut traces = vec![Trace::default(); runs];
    // A resumed fit continues its traces, statuses, step count and clock.
    let (mut done, mut last_time) = (0, 0.0);
    let offset = resumed.as_ref().map_or(0.0, |r| r.last_time);
    let mut status = vec![FitStatus::Ok; runs];
    let mut monitored = false;
    if let Some(r) = resumed {
        (done, last_time, traces, status) = (r.step, r.last_time, r.traces, r.status);
        if let Some(state) = &r.observer {
            observer.restore(state)?;
        }
        monitored = r.monitored;
    }
    let mut rules: Vec<StopState> = match &opts.stop {
        Some(rule) => vec![StopState::new(rule); runs],
        None => Vec::new(),
    };
    let mut stopped = vec![None; runs];
    let monitor = |stepper: &mut dyn Stepper, observer: &mut dyn Observer, done, now| {
        (0..runs)
            .try_for_each(|r| stepper.monitor(r, &mut |var| observer.on_monitor(done, now, var)))
    };
    if every > 0 && !monitored {
        monitor(stepper, observer, done, last_time)?;
    }
    let mut paused = Duration::ZERO;
    let start = Instant::now();
    let clock = |at: Instant, paused: Duration| {
        (at.duration_since(start).saturating_sub(paused)).as_secs_f64() + offset
    };
    while done < opts.steps {
        let mut end = ((done / block + 1) * block).min(opts.steps);
        if let Some(c) = &checkpoints {
            end = end.min(c.next_stop(done));
        }
        if let Some(k) = done.checked_div(every) {
            end = end.min((k + 1) * every);
        }
        if let Some(change) = opts
            .lr_schedule
            .iter()
            .map(|s| s.from - 1)
            .find(|&f| f > done)
        {
            end = end.min(change);
        }
        if let Some(lr) = opts.lr_change_at(done + 1) {
            stepper.set_lr(lr)?;
        }
        let out = stepper.steps(end - done)?;
        let now = clock(Instant::now(), paused);
        let len = out.values.len() / runs;
        let first = done + 1;
        done += len;
        let seconds: Vec<f64> = match &out.stamps {
            Some(stamps) => {
                let mut s: Vec<f64> = stamps.iter().map(|&t| clock(t, paused)).collect();
                // The last stamp after the read: the device has caught up.
                if let Some(t) = s.last_mut() {
                    *t = now;
                }
                s
            }
            None => (1..=len)
                .map(|i| last_time + (now - last_time) * i as f64 / len as f64)
                .collect(),
        };
        last_time = now;
        let check = done % opts.check_every == 0 || done == opts.steps;
        let finite = if check {
            stepper.params_finite()?
        } else {
            vec![true; runs]
        };
        let mut any_diverged = false;
        for r in 0..runs {
            if status[r] != FitStatus::Ok {
                continue;
            }
            let mine: Vec<f64> = (0..len).map(|i| out.values[i * runs + r]).collect();
            traces[r].clock = if out.stamps.is_some() {
                Clock::Step
            } else {
                Clock::Block
            };
            any_diverged |= record_block(
                &mut traces[r],
                &mut status[r],
                first,
                &mine,
                &seconds,
                finite[r],
            );
        }
        if check || any_diverged {
            observer.on_check(done, opts.steps, out.values[(len.max(1) - 1) * runs]);
        }
        if status.iter().all(|s| *s != FitStatus::Ok) {
            break;
        }
        if let Some(c) = checkpoints.as_deref_mut().filter(|c| c.due(done)) {
            let t0 = Instant::now();
            c.write(
                done,
                stepper,
                &traces,
                &status,
                now,
                observer.state(),
                false,
            )?;
            paused += t0.elapsed();
        }
        if every > 0 && done % every == 0 {
            let t0 = Instant::now();
            monitor(stepper, observer, done, now)?;
            paused += t0.elapsed();
        }
        // After the monitoring of this step: a fit that ends here has its
        // last record.
        if done < opts.steps
            && crate::stop::all_met(&mut rules, &traces, &status, done, &mut stopped)
        {
            break;
        }
        if done < opts.steps && interrupt.is_some_and(|f| f.load(Ordering::SeqCst)) {
            // A checkpointed fit leaves a checkpoint at the step it stopped
            // at (unless one was just written): resuming loses nothing.
            if let Some(c) = checkpoints.as_deref_mut().filter(|c| !c.due(done)) {
                let monitored = every > 0 && done % every == 0;
                c.write(
                    done,
                    stepper,
                    &traces,
                    &status,
                    now,
                    observer.state(),
                    monitored,
                )?;
            }
            for s in status.iter_mut().filter(|s| **s == FitStatus::Ok) {
                *s = FitStatus::Interrupted { at: done };
            }
            break;
        }
    }
    Ok((traces, status, stopped, clock(Instant::now(), paused)))
}

/// Appends the steps `first ..= first + values.len() − 1` (ELBO estimates
/// `values`, clock `seconds`) to `trace`, and marks the run diverged at the
/// first non-finite estimate, or at the block's last step when
/// `params_finite` is false; a diverged trace is truncated there. Returns
/// whether the run has diverged (the one divergence rule, applied by
/// [`drive`] to every run of every engine).
pub(crate) fn record_block(
    trace: &mut Trace,
    status: &mut FitStatus,
    first: usize,
    values: &[f64],
    seconds: &[f64],
    params_finite: bool,
) -> bool {
    let last = first + values.len().saturating_sub(1);
    trace.iteration.extend(first..first + values.len());
    trace.elbo.extend(values);
    trace.seconds.extend(seconds);
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        *status = FitStatus::Diverged { at: first + i };
    } else if !params_finite {
        *status = FitStatus::Diverged { at: last };
    }
    if let FitStatus::Diverged { at } = *status {
        trace.truncate(at);
        true
    } else {
        false
    }
}

/// Evaluate and summarise fitted parameters.
#[allow(clippy::too_many_arguments)]
fn finish(
    model: &dyn Model,
    (var, rng): (Variational, Draws),
    x: &Tensor,
    (trace, status, stopped): (Trace, FitStatus, Option<Stopped>),
    seconds: f64,
    opts: &FitOptions,
    threads: usize,
    method: &MethodConfig,
) -> Result<Fit> {
    let iterations = match status {
        FitStatus::Ok => stopped.as_ref().map_or(opts.steps, |s| s.at),
        FitStatus::Diverged { at } | FitStatus::Interrupted { at } => at,
    };
    // A semi-amortized fit with `refine` is judged at its refined factors:
    // K more inner steps from the final encoder's output.
    let refined = match method.refine() {
        Some(r) if matches!(var.local, LocalFactor::Amortized { .. }) => {
            Some(crate::semi::refine_rows(
                model,
                &var,
                x,
                var.local_raw().detach(),
                r,
                opts.draws,
                opts.entropy,
                &rng,
            )?)
        }
        _ => None,
    };
    let ((elbo, elbo_se), encoder_elbo) = {
        // The default generator is drawn from under the lock only.
        let _lock = matches!(rng, Draws::Default).then(global_guard);
        let at = evaluate_at(
            model,
            &var,
            refined.as_ref(),
            x,
            opts.eval_draws,
            opts.entropy,
            &rng,
        )?;
        let encoder = match &refined {
            Some(_) => Some(evaluate_from(
                model,
                &var,
                x,
                opts.eval_draws,
                opts.entropy,
                &rng,
            )?),
            None => None,
        };
        (at, encoder)
    };
    let semi = matches!(method, MethodConfig::Semi { .. }).then(|| crate::result::SemiReport {
        inner_steps: method.refine().map_or(0, |r| r.steps * iterations),
        refine_steps: method.refine().map(|r| r.steps),
        switched_at: method
            .switch_at()
            .filter(|&s| iterations >= s && matches!(var.local, LocalFactor::Free(_))),
        encoder_elbo,
    });
    rng.hand_back()?;
    let status = final_status(status, elbo, iterations);
    let q_theta = match &var.theta {
        ThetaFactor::Free(q) => Some(summarize(q)?),
        ThetaFactor::Fixed(_) => None,
    };
    let raw = match &refined {
        Some(rows) => rows.shallow_clone(),
        None => var.local_raw().detach(),
    };
    let (q_z, q_z_probs) = match var.output {
        Output::Gaussian { .. } | Output::Markov => {
            (summarize(&var.output.gaussian(&raw).detach())?, None)
        }
        Output::Categorical { .. } => (
            GaussianSummary {
                mean: vec![],
                sd: vec![],
                shape: vec![var.n, 0],
            },
            Some(host_vec(&raw.log_softmax(1, raw.kind()).exp())?),
        ),
    };
    let converged = match status {
        FitStatus::Ok | FitStatus::Interrupted { .. } => {
            verdict(&trace, elbo_se, opts.stop.as_ref())
        }
        FitStatus::Diverged { .. } => None,
    };
    let warnings = match status {
        FitStatus::Ok => {
            let mut w = elbo_warnings(elbo, elbo_se, &trace, x.numel(), &q_z);
            w.extend(converged.as_ref().and_then(not_converged_warning));
            w
        }
        FitStatus::Diverged { .. } | FitStatus::Interrupted { .. } => Vec::new(),
    };
    Ok(Fit {
        q_theta,
        q_z,
        q_z_probs,
        trace,
        elbo,
        elbo_se,
        iterations,
        seconds,
        status,
        stopped_at: stopped.as_ref().map(|s| s.at),
        stop_reason: stopped.map(|s| s.reason),
        convergence: converged,
        num_parameters: var.num_parameters(),
        engine: opts.engine,
        threads,
        variational: var,
        warnings,
        semi,
    })
}
