//! Checkpoints and bit-exact resumption (`FitRequest::checkpoint`,
//! `FitRequest::resume`).
//!
//! For each engine that can checkpoint (libtorch: F-VI and A-VI with an
//! MLP; fused CPU: F-VI and A-VI with an MLP) three fits of the same
//! problem are compared: a plain fit, the same fit writing a checkpoint
//! every 100 steps (copies of the checkpoints at steps 100 and 200 are kept
//! by an observer), and the fit resumed from each copy. A resumed fit runs
//! the same operations on the same values as the uninterrupted one, so
//! every ELBO estimate of the trace, every variational parameter and the
//! final ELBO must be equal exactly (tolerance 0: a single lost bit of
//! Adam's moments, the generator's state, the step count or the
//! learning-rate schedule changes the following estimates by far more).
//! The schedule changes the rate at step 151, between the two copies.

use std::path::{Path, PathBuf};

use avi_inference::{
    fit, latest_checkpoint, Dtype, Engine, Fit, FitOptions, InferenceError, LocalUpdates, LrStep,
    MethodConfig, Observer, Variational,
};
use avi_models::{DiscreteHmm, LinearModel, Model, NonlinearModel, NonlinearSim, SawModel};
use avi_tests::mlp;
use tch::Tensor;

fn options(engine: Engine, dtype: Dtype) -> FitOptions {
    FitOptions {
        steps: 300,
        lr: 0.02,
        draws: 10,
        seed: 17,
        eval_draws: 200,
        dtype,
        check_every: 50,
        engine,
        lr_schedule: vec![LrStep {
            from: 151,
            factor: 0.5,
        }],
        ..FitOptions::default()
    }
}

/// Keeps a copy of the checkpoint folder once the checkpoints of the steps
/// in `at` are complete (monitoring runs right after a checkpoint of the
/// same step was handed to its writing thread; the copy waits until
/// `latest.json` points to it).
struct Snapshots {
    dir: PathBuf,
    at: Vec<usize>,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

impl Observer for Snapshots {
    fn monitor_every(&self) -> usize {
        100
    }

    fn on_monitor(
        &mut self,
        done: usize,
        _seconds: f64,
        _var: &Variational,
    ) -> avi_inference::Result<()> {
        if self.at.contains(&done) {
            let start = std::time::Instant::now();
            while latest_checkpoint(&self.dir).ok().flatten().map(|c| c.step) != Some(done) {
                assert!(
                    start.elapsed().as_secs() < 30,
                    "no checkpoint of step {done}"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // The pointer and the folder it names (the writing thread may
            // still be removing older folders).
            let to = self.dir.with_extension(format!("at{done}"));
            let folder = format!("step-{done}");
            copy_dir(&self.dir.join(&folder), &to.join(&folder));
            std::fs::copy(self.dir.join("latest.json"), to.join("latest.json")).unwrap();
        }
        Ok(())
    }
}

/// Everything a fit returns that must not change, as bits.
fn bits(f: &Fit) -> Vec<u64> {
    let mut out: Vec<u64> = f.trace.elbo.iter().map(|v| v.to_bits()).collect();
    out.extend(f.trace.iteration.iter().map(|&i| i as u64));
    for v in [&f.q_z.mean, &f.q_z.sd] {
        out.extend(v.iter().map(|x| x.to_bits()));
    }
    if let Some(q) = &f.q_theta {
        out.extend(q.mean.iter().chain(&q.sd).map(|x| x.to_bits()));
    }
    out.extend([f.elbo.to_bits(), f.elbo_se.to_bits(), f.iterations as u64]);
    out
}

fn check_resumes_exactly(
    name: &str,
    model: &dyn Model,
    x: &Tensor,
    method: &MethodConfig,
    opts: &FitOptions,
) {
    check_resumes_exactly_with(name, model, x, method, opts, None);
}

/// [`check_resumes_exactly`] with θ held at `fixed_theta`.
fn check_resumes_exactly_with(
    name: &str,
    model: &dyn Model,
    x: &Tensor,
    method: &MethodConfig,
    opts: &FitOptions,
    fixed_theta: Option<&[f64]>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let fit = |model, x, method| fit(model, x, method).fixed_theta(fixed_theta);
    let plain = fit(model, x, method).options(opts).run().unwrap();
    assert_eq!(plain.engine, opts.engine, "{name}");
    let mut snaps = Snapshots {
        dir: dir.clone(),
        at: vec![100, 200],
    };
    let checkpointed = fit(model, x, method)
        .options(opts)
        .checkpoint(&dir, 100)
        .observer(&mut snaps)
        .run()
        .unwrap();
    assert_eq!(
        bits(&plain),
        bits(&checkpointed),
        "{name}: checkpointing changed the fit"
    );
    // The last checkpoint is the final step's; older ones were removed
    // (what remains: it, the pointer and the folder's mark).
    let info = latest_checkpoint(&dir).unwrap().unwrap();
    assert_eq!((info.step, info.steps), (300, 300), "{name}");
    let mut folders: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    folders.sort();
    assert_eq!(
        folders,
        [".avi-checkpoints", "latest.json", "step-300"],
        "{name}"
    );
    for at in [100, 200] {
        let snap = dir.with_extension(format!("at{at}"));
        assert_eq!(latest_checkpoint(&snap).unwrap().unwrap().step, at);
        let resumed = fit(model, x, method)
            .options(opts)
            .resume(&snap)
            .run()
            .unwrap();
        assert_eq!(
            bits(&plain),
            bits(&resumed),
            "{name}: resumed at step {at} differs"
        );
        assert_eq!(resumed.trace.seconds.len(), 300);
    }
}

#[test]
fn torch_engine_resumes_exactly() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let xl = Tensor::from_slice(&linear.simulate(200, 1, None).unwrap());
    check_resumes_exactly(
        "torch F-VI linear f64",
        &linear,
        &xl,
        &MethodConfig::Fvi,
        &options(Engine::Torch, Dtype::F64),
    );
    let nl = NonlinearModel::new(NonlinearSim::Model);
    let xn = Tensor::from_slice(&nl.simulate(200, 3, None).unwrap());
    check_resumes_exactly(
        "torch A-VI MLP nonlinear f32",
        &nl,
        &xn,
        &mlp(8, [0, 0]),
        &options(Engine::Torch, Dtype::F32),
    );
}

#[test]
fn fused_engine_resumes_exactly() {
    let saw = SawModel::new(0.75, 0.0).unwrap();
    let xs = Tensor::from_slice(&saw.simulate(200, 2012, Some(3.4159)).unwrap());
    check_resumes_exactly(
        "fused A-VI MLP saw f64",
        &saw,
        &xs,
        &mlp(10, [1, 0]),
        &options(Engine::Fused, Dtype::F64),
    );
    let nl = NonlinearModel::new(NonlinearSim::Model);
    let xn = Tensor::from_slice(&nl.simulate(200, 3, None).unwrap());
    check_resumes_exactly(
        "fused F-VI nonlinear f32",
        &nl,
        &xn,
        &MethodConfig::Fvi,
        &options(Engine::Fused, Dtype::F32),
    );
}

fn short(engine: Engine) -> FitOptions {
    FitOptions {
        steps: 40,
        ..options(engine, Dtype::F64)
    }
}

/// A checkpoint whose file was changed or truncated, or one of another fit,
/// is refused with an error naming the file, before any step.
#[test]
fn damaged_or_foreign_checkpoints_are_refused() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&linear.simulate(50, 1, None).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let opts = short(Engine::Torch);
    fit(&linear, &x, &MethodConfig::Fvi)
        .options(&opts)
        .checkpoint(&dir, 20)
        .run()
        .unwrap();
    let folder = latest_checkpoint(&dir).unwrap().unwrap().path;
    let resume = |o: &FitOptions, x: &Tensor| {
        fit(&linear, x, &MethodConfig::Fvi)
            .options(o)
            .resume(&dir)
            .run()
            .unwrap_err()
    };
    // another fit: options, data
    let mut other = opts.clone();
    other.lr = 0.03;
    let e = resume(&other, &x).to_string();
    assert!(e.contains("options differ"), "{e}");
    let e = resume(&opts, &(&x + 1.0)).to_string();
    assert!(e.contains("data differs"), "{e}");
    // truncated tensors; a changed byte of the metadata
    for (file, damage) in [("state.safetensors", 0usize), ("meta.json", 1)] {
        let path = folder.join(file);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        if damage == 0 {
            bytes.truncate(bytes.len() / 2);
        } else {
            let i = bytes.len() / 2;
            bytes[i] ^= 1;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = resume(&opts, &x);
        assert!(matches!(e, InferenceError::Checkpoint { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(file) && msg.contains("SHA-256"), "{msg}");
        std::fs::write(&path, &original).unwrap();
    }
    // a garbled pointer
    std::fs::write(dir.join("latest.json"), b"{\"step\": ").unwrap();
    let e = resume(&opts, &x).to_string();
    assert!(e.contains("latest.json"), "{e}");
    // nothing to resume from
    let e = fit(&linear, &x, &MethodConfig::Fvi)
        .options(&opts)
        .resume(tmp.path().join("none"))
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
}

/// The writer removes old `step-…` folders in its folder, so it refuses a
/// folder that holds anything and is not a checkpoint folder (no
/// `latest.json`, no mark), before any step, and leaves it as it was.
#[test]
fn a_folder_of_other_files_is_refused() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&linear.simulate(50, 1, None).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let users = tmp.path().join("mine");
    std::fs::create_dir_all(users.join("step-1")).unwrap();
    std::fs::write(users.join("step-1").join("notes.txt"), b"keep").unwrap();
    let e = fit(&linear, &x, &MethodConfig::Fvi)
        .options(short(Engine::Torch))
        .checkpoint(&users, 20)
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a checkpoint folder"), "{e}");
    assert_eq!(
        std::fs::read(users.join("step-1").join("notes.txt")).unwrap(),
        b"keep"
    );
    assert_eq!(std::fs::read_dir(&users).unwrap().count(), 1);
    // An empty folder is taken (and marked); a second fit may write there.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for _ in 0..2 {
        fit(&linear, &x, &MethodConfig::Fvi)
            .options(short(Engine::Torch))
            .checkpoint(&empty, 20)
            .run()
            .unwrap();
    }
    assert!(empty.join(".avi-checkpoints").is_file());
}

/// Sets `flag` at the `at`-th monitoring call (an interruption at a known
/// step of a known run).
struct InterruptAt<'f> {
    flag: &'f std::sync::atomic::AtomicBool,
    calls: usize,
    at: usize,
    every: usize,
}

impl Observer for InterruptAt<'_> {
    fn monitor_every(&self) -> usize {
        self.every
    }

    fn on_monitor(
        &mut self,
        _done: usize,
        _seconds: f64,
        _var: &Variational,
    ) -> avi_inference::Result<()> {
        self.calls += 1;
        if self.calls == self.at {
            self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Several seeds fitted one after another keep a checkpoint folder each
/// (`DIR/seed-<seed>/`). Interrupted during the second seed (at step 150,
/// between checkpoints: the interrupted step is checkpointed), the request
/// resumed gives every seed's fit bit for bit (tolerance 0, as above): the
/// first from its final checkpoint, the second from step 150, the third
/// afresh.
#[test]
fn several_seeds_in_turn_resume_exactly() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&linear.simulate(120, 1, None).unwrap());
    let seeds = [3, 4, 5];
    let opts = options(Engine::Torch, Dtype::F64);
    let plain = fit(&linear, &x, &MethodConfig::Fvi)
        .options(&opts)
        .seeds(&seeds)
        .run_all()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let flag = std::sync::atomic::AtomicBool::new(false);
    // Monitoring every 50 steps: calls at steps 0, 50, …, 300 (7) per
    // seed; the 11th is the second seed's step 150.
    let mut stop = InterruptAt {
        flag: &flag,
        calls: 0,
        at: 11,
        every: 50,
    };
    let cut = fit(&linear, &x, &MethodConfig::Fvi)
        .options(&opts)
        .seeds(&seeds)
        .checkpoint(&dir, 100)
        .interrupt(&flag)
        .observer(&mut stop)
        .run_all()
        .unwrap();
    assert_eq!(cut.len(), 2, "the third seed is not started");
    assert_eq!(bits(&cut[0]), bits(&plain[0]));
    for (seed, step) in [(3, 300), (4, 150)] {
        let info = latest_checkpoint(&dir.join(format!("seed-{seed}")))
            .unwrap()
            .unwrap();
        assert_eq!(info.step, step, "seed {seed}");
    }
    assert!(!dir.join("seed-5").exists());
    let resumed = fit(&linear, &x, &MethodConfig::Fvi)
        .options(&opts)
        .seeds(&seeds)
        .checkpoint(&dir, 100)
        .resume(&dir)
        .run_all()
        .unwrap();
    assert_eq!(resumed.len(), 3);
    for ((p, r), seed) in plain.iter().zip(&resumed).zip(seeds) {
        assert_eq!(bits(p), bits(r), "seed {seed}");
    }
}

/// Batched seeds (the graph engine's R runs as one problem, on the CPU)
/// keep every run's trace, status, generator and Adam state in one
/// checkpoint: interrupted at step 150 and resumed, every run ends with the
/// bits of the uninterrupted batch (tolerance 0); the checkpoint refuses a
/// batch of other seeds.
#[test]
fn batched_seeds_resume_exactly() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&linear.simulate(120, 1, None).unwrap());
    let seeds = [3, 4, 5];
    for method in [MethodConfig::Fvi, MethodConfig::Const] {
        let opts = options(Engine::Graph, Dtype::F64);
        let plain = fit(&linear, &x, &method)
            .options(&opts)
            .seeds(&seeds)
            .run_all()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let flag = std::sync::atomic::AtomicBool::new(false);
        // Monitoring every 50 steps (from step 0), once per run: the calls
        // of step 150 are the 10th to 12th.
        let mut stop = InterruptAt {
            flag: &flag,
            calls: 0,
            at: 10,
            every: 50,
        };
        let cut = fit(&linear, &x, &method)
            .options(&opts)
            .seeds(&seeds)
            .checkpoint(&dir, 100)
            .interrupt(&flag)
            .observer(&mut stop)
            .run_all()
            .unwrap();
        assert!(cut.iter().all(|f| f.iterations == 150), "{method:?}");
        assert_eq!(latest_checkpoint(&dir).unwrap().unwrap().step, 150);
        let resumed = fit(&linear, &x, &method)
            .options(&opts)
            .seeds(&seeds)
            .resume(&dir)
            .run_all()
            .unwrap();
        for ((p, r), seed) in plain.iter().zip(&resumed).zip(seeds) {
            assert_eq!(bits(p), bits(r), "{method:?} seed {seed}");
        }
        let e = fit(&linear, &x, &method)
            .options(&opts)
            .seeds(&[3, 4, 6])
            .resume(&dir)
            .run_all()
            .unwrap_err()
            .to_string();
        assert!(e.contains("seeds differ"), "{e}");
    }
}

/// The CAVI engine (F-VI's categorical factors by coordinate ascent, θ
/// fixed) resumes exactly too: its sweep count (the annealing schedule's
/// position) and its current ELBO travel with the factors. Plain and
/// annealed sweeps on a discrete HMM (K = 3, N = 120), f64; sweeps ignore
/// the learning rate, so the schedule's change is a no-op here.
#[test]
fn cavi_engine_resumes_exactly() {
    let mu = [-1.5, 0.5, 2.0];
    let a = [0.9, 0.05, 0.05, 0.05, 0.9, 0.05, 0.05, 0.05, 0.9];
    let hmm = DiscreteHmm::new(&[1.0 / 3.0; 3], &a, 0.9, 2.0).unwrap();
    let x = Tensor::from_slice(&hmm.simulate(120, 5, Some(&mu)).unwrap());
    for updates in [LocalUpdates::Cavi, LocalUpdates::AnnealedCavi] {
        let opts = FitOptions {
            local_updates: updates,
            ..options(Engine::Torch, Dtype::F64)
        };
        check_resumes_exactly_with(
            &format!("{updates:?} discrete HMM f64"),
            &hmm,
            &x,
            &MethodConfig::Fvi,
            &opts,
            Some(&mu),
        );
    }
}

/// The graph engine on the CPU (its device-side Adam, blocks run eagerly)
/// resumes exactly too: its Adam's moments and f32 step counts travel with
/// the parameters. (On CUDA it refuses: its captured blocks draw from the
/// default generator, and no device was available to test a resume there.)
#[test]
fn graph_engine_on_the_cpu_resumes_exactly() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let xl = Tensor::from_slice(&linear.simulate(200, 1, None).unwrap());
    check_resumes_exactly(
        "graph F-VI linear f64",
        &linear,
        &xl,
        &MethodConfig::Fvi,
        &options(Engine::Graph, Dtype::F64),
    );
    let nl = NonlinearModel::new(NonlinearSim::Model);
    let xn = Tensor::from_slice(&nl.simulate(200, 3, None).unwrap());
    check_resumes_exactly(
        "graph A-VI MLP nonlinear f32",
        &nl,
        &xn,
        &mlp(8, [0, 0]),
        &options(Engine::Graph, Dtype::F32),
    );
}

/// An observer that keeps the steps it was shown, keeps them in
/// checkpoints, and sets `flag` at its `at`-th monitoring call.
struct Recorder<'f> {
    flag: &'f std::sync::atomic::AtomicBool,
    at: usize,
    seen: Vec<usize>,
}

impl Observer for Recorder<'_> {
    fn monitor_every(&self) -> usize {
        50
    }

    fn on_monitor(
        &mut self,
        done: usize,
        _seconds: f64,
        _var: &Variational,
    ) -> avi_inference::Result<()> {
        self.seen.push(done);
        if self.seen.len() == self.at {
            self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!(self.seen))
    }

    fn restore(&mut self, state: &serde_json::Value) -> avi_inference::Result<()> {
        self.seen = serde_json::from_value(state.clone()).unwrap();
        Ok(())
    }
}

/// An observer's records travel in the checkpoint and the resumed fit's
/// observer continues them without a gap or a repeat, whether the fit
/// stopped between checkpoints (step 150: its monitoring had run when the
/// checkpoint was written) or at one (step 200: the checkpoint is written
/// before that step's monitoring).
#[test]
fn observer_records_continue_across_a_resume() {
    let linear = LinearModel::new(1.155, 2.43).unwrap();
    let x = Tensor::from_slice(&linear.simulate(60, 1, None).unwrap());
    let opts = options(Engine::Torch, Dtype::F64);
    let all: Vec<usize> = (0..=300).step_by(50).collect();
    for (at, step) in [(4, 150), (5, 200)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let flag = std::sync::atomic::AtomicBool::new(false);
        let mut first = Recorder {
            flag: &flag,
            at,
            seen: vec![],
        };
        let cut = fit(&linear, &x, &MethodConfig::Fvi)
            .options(&opts)
            .checkpoint(&dir, 100)
            .interrupt(&flag)
            .observer(&mut first)
            .run()
            .unwrap();
        assert_eq!(cut.iterations, step);
        let never = std::sync::atomic::AtomicBool::new(false);
        let mut second = Recorder {
            flag: &never,
            at: 0,
            seen: vec![],
        };
        fit(&linear, &x, &MethodConfig::Fvi)
            .options(&opts)
            .resume(&dir)
            .observer(&mut second)
            .run()
            .unwrap();
        assert_eq!(second.seen, all, "stopped at {step}");
    }
}
