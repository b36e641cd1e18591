//! `avi fit --save DIR` with `"checkpoint": {"every": S}`, and
//! `avi fit --resume DIR`, through the real binary: a fit killed with
//! SIGKILL after its first checkpoint and resumed writes the same report as
//! the uninterrupted fit, wall-clock times aside (every trace ELBO, q(θ),
//! q(z) and the final ELBO compared exactly: the resumed fit runs the same
//! operations on the same values), on the libtorch and the fused CPU
//! engines; damaged checkpoints and misuse are refused with exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const AVI: &str = env!("CARGO_BIN_EXE_avi");

/// A config of `engine` (`"torch"` or `"fused"`) and `method` on simulated
/// data, `steps` steps, a checkpoint every `every`.
fn config(
    dir: &Path,
    name: &str,
    model: &str,
    method: &str,
    engine: &str,
    steps: usize,
) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(
        &path,
        format!(
            r#"{{"model": {model},
                "data": {{"simulate": {{"n": 300, "seed": 5}}}},
                "method": {method},
                "steps": {steps}, "draws": 10, "eval_draws": 100, "lr": 0.01,
                "dtype": "f64", "engine": "{engine}",
                "lr_schedule": [{{"from": {}, "factor": 0.5}}],
                "checkpoint": {{"every": 500}}}}"#,
            steps / 2 + 1
        ),
    )
    .unwrap();
    path
}

fn avi(args: &[&str]) -> Command {
    let mut c = Command::new(AVI);
    c.args(["--threads", "1", "fit", "--device", "cpu", "--quiet"])
        .args(args);
    c
}

fn run(args: &[&str]) -> Output {
    avi(args).output().unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn refused(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

/// A report without its wall-clock times.
fn comparable(path: &Path) -> Value {
    let mut r: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    r["seconds"] = Value::Null;
    r["trace"]["seconds"] = Value::Null;
    if r["mse"].is_object() {
        r["mse"]["seconds"] = Value::Null;
    }
    r
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Kill the fit of `cfg` with SIGKILL once its first checkpoint is there,
/// resume it, and compare with the uninterrupted fit's report.
fn killed_fit_resumes_exactly(dir: &Path, cfg: &Path, name: &str) {
    let reference = dir.join(format!("{name}-reference.json"));
    let plain_save = dir.join(format!("{name}-plain"));
    ok(&run(&[
        "--config",
        p(cfg),
        "--out",
        p(&reference),
        "--save",
        p(&plain_save),
    ]));
    let save = dir.join(format!("{name}-save"));
    let out = dir.join(format!("{name}-resumed.json"));
    let mut child = avi(&["--config", p(cfg), "--out", p(&out), "--save", p(&save)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = save.join("checkpoint/latest.json");
    let start = Instant::now();
    while !latest.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name}: no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "{name}: the fit ended before the kill");
    assert!(!out.exists(), "{name}: a report of the killed fit");
    let at: Value = serde_json::from_str(&std::fs::read_to_string(&latest).unwrap()).unwrap();
    let step = at["step"].as_u64().unwrap();
    assert!(step >= 500, "{name}: {at}");
    let o = run(&["--resume", p(&save), "--out", p(&out)]);
    ok(&o);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains(&format!("resuming from step {step} of 8000")),
        "{said}"
    );
    let (want, got) = (comparable(&reference), comparable(&out));
    assert_eq!(
        want["trace"]["elbo"].as_array().unwrap().len(),
        got["trace"]["elbo"].as_array().unwrap().len()
    );
    assert_eq!(want, got, "{name}: resumed from step {step}");
}

#[test]
fn killed_fits_resume_to_the_uninterrupted_report() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fvi = r#"{"kind": "fvi"}"#;
    let linear = r#"{"kind": "linear", "tau": 1.155, "sigma": 2.43}"#;
    let cfg = config(dir, "torch", linear, fvi, "torch", 8000);
    killed_fit_resumes_exactly(dir, &cfg, "torch");
    let saw = r#"{"kind": "saw", "alpha": 0.75, "x0": 0}"#;
    let avi_mlp = r#"{"kind": "avi", "fn": {"kind": "mlp", "width": 8}, "window": [1, 0]}"#;
    let cfg = config(dir, "fused", saw, avi_mlp, "fused", 8000);
    killed_fit_resumes_exactly(dir, &cfg, "fused");
}

/// The BNN monitoring its training reconstruction MSE (every 100 steps)
/// with shuffled mini-batches: the MSE records travel in the
/// checkpoint, so the resumed report's `mse` equals the uninterrupted one
/// (wall-clock times aside; tolerance 0), as do its trace and q.
#[test]
fn a_killed_bnn_fit_resumes_with_its_mse_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = dir.join("bnn.json");
    std::fs::write(
        &cfg,
        r#"{"model": {"kind": "bnn", "latent": 2, "hidden": 3},
            "data": {"simulate": {"n": 40, "seed": 1, "dim": 5}},
            "method": {"kind": "avi", "fn": {"kind": "mlp", "width": 4, "activation": "leaky_relu"}},
            "steps": 8000, "lr": 0.001, "draws": 2, "eval_draws": 20,
            "batch_size": 16, "shuffle": true, "dtype": "f64", "engine": "torch",
            "report_q_z": false,
            "mse": {"every": 100},
            "checkpoint": {"every": 500}}"#,
    )
    .unwrap();
    killed_fit_resumes_exactly(dir, &cfg, "bnn");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bnn-resumed.json")).unwrap())
            .unwrap();
    assert_eq!(r["mse"]["train"].as_array().unwrap().len(), 81);
}

#[test]
fn misuse_and_damage_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fvi = r#"{"kind": "fvi"}"#;
    let linear = r#"{"kind": "linear", "tau": 1.155, "sigma": 2.43}"#;
    let cfg = config(dir, "c", linear, fvi, "torch", 1000);
    let out = dir.join("r.json");
    // a checkpoint needs a folder
    refused(&run(&["--config", p(&cfg), "--out", p(&out)]), &["--save"]);
    assert!(!out.exists());
    // the graph engine checkpoints on the CPU (its bit-exact resume:
    // tests/tests/checkpoint.rs)
    let text = std::fs::read_to_string(&cfg).unwrap();
    let graph = dir.join("graph.json");
    std::fs::write(&graph, text.replace("\"torch\"", "\"graph\"")).unwrap();
    ok(&run(&[
        "--config",
        p(&graph),
        "--out",
        p(&dir.join("g.json")),
        "--save",
        p(&dir.join("g")),
    ]));
    assert!(dir.join("g/state.safetensors").exists());
    // nothing to resume
    refused(
        &run(&["--resume", p(&dir.join("none")), "--out", p(&out)]),
        &["no checkpoint"],
    );
    let save = dir.join("s");
    let finished = || run(&["--config", p(&cfg), "--out", p(&out), "--save", p(&save)]);
    ok(&finished());
    // a finished fit's final state replaces its checkpoints, and the same
    // fit may be saved there again
    assert!(save.join("state.safetensors").exists());
    assert!(!save.join("checkpoint").exists());
    ok(&finished());
    // a fit stopped part-way leaves its checkpoints: a fresh fit does not
    // overwrite them
    let cfg = config(dir, "long", linear, fvi, "torch", 8000);
    let save = dir.join("interrupted");
    let step = interrupt_after_first_checkpoint(&cfg, &save, &dir.join("i.json"));
    refused(
        &run(&["--config", p(&cfg), "--out", p(&out), "--save", p(&save)]),
        &["--resume"],
    );
    // a tampered checkpoint is refused, naming the file; nothing written
    let state = save.join(format!("checkpoint/step-{step}/state.safetensors"));
    let mut bytes = std::fs::read(&state).unwrap();
    let i = bytes.len() - 3;
    bytes[i] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();
    let fresh = dir.join("r2.json");
    refused(
        &run(&["--resume", p(&save), "--out", p(&fresh)]),
        &["state.safetensors", "SHA-256"],
    );
    assert!(!fresh.exists());
}

/// Run `cfg` with `--save save`, send it SIGINT once its first checkpoint
/// is there, and check that it stopped cleanly (exit 130, an interrupted
/// report at `out`) leaving a checkpoint at the step it stopped at, which
/// is returned.
fn interrupt_after_first_checkpoint(cfg: &Path, save: &Path, out: &Path) -> u64 {
    let mut child = avi(&["--config", p(cfg), "--out", p(out), "--save", p(save)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = save.join("checkpoint/latest.json");
    let start = Instant::now();
    while !latest.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    assert_eq!(child.wait().unwrap().code(), Some(130), "exit 130");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    assert_eq!(report["status"], "interrupted", "{report}");
    let at = report["interrupted_at"].as_u64().unwrap();
    assert!(at < 8000, "stopped part-way: {at}");
    let latest: Value = serde_json::from_str(&std::fs::read_to_string(&latest).unwrap()).unwrap();
    assert_eq!(
        latest["step"].as_u64(),
        Some(at),
        "a checkpoint where it stopped"
    );
    assert!(!save.join("state.safetensors").exists(), "no final state");
    at
}

/// Ctrl-C with checkpoints configured leaves a checkpoint at the step the
/// fit stopped at (not only at the last multiple of `every`), and the fit
/// resumed from it writes the uninterrupted fit's report (times aside).
#[test]
fn an_interrupted_fit_resumes_exactly_from_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let linear = r#"{"kind": "linear", "tau": 1.155, "sigma": 2.43}"#;
    let avi_mlp = r#"{"kind": "avi", "fn": {"kind": "mlp", "width": 8}}"#;
    let cfg = config(dir, "c", linear, avi_mlp, "torch", 8000);
    let reference = dir.join("reference.json");
    ok(&run(&[
        "--config",
        p(&cfg),
        "--out",
        p(&reference),
        "--save",
        p(&dir.join("plain")),
    ]));
    let save = dir.join("s");
    let out = dir.join("resumed.json");
    let step = interrupt_after_first_checkpoint(&cfg, &save, &out);
    let o = run(&["--resume", p(&save), "--out", p(&out)]);
    ok(&o);
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains(&format!("resuming from step {step} of 8000")),
        "{said}"
    );
    assert_eq!(
        comparable(&reference),
        comparable(&out),
        "resumed from {step}"
    );
    assert!(save.join("state.safetensors").exists());
}

mod common;

fn reproduce(def: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(AVI);
    c.args(["--threads", "1", "reproduce"])
        .arg(def)
        .args(["--device", "cpu", "--seeds", "1", "--out"])
        .arg(out)
        .args(extra);
    c
}

/// The run reports of an experiment folder, without wall-clock times.
fn run_reports(exp_dir: &Path) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(exp_dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                comparable(&p),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `avi reproduce --checkpoint-every S`, killed with SIGKILL once a run has
/// a checkpoint, then `--resume`: the unfinished run continues from its
/// checkpoint (it says so) and every run report equals the uninterrupted
/// grid's, times aside; no checkpoint is left once the reports are written.
#[test]
fn reproduce_resumes_unfinished_runs_from_their_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let def = common::tiny_definition(dir);
    let mut d: Value = serde_json::from_str(&std::fs::read_to_string(&def).unwrap()).unwrap();
    d["steps"] = 3000.into();
    std::fs::write(&def, d.to_string()).unwrap();
    let reference = dir.join("reference");
    ok(&reproduce(&def, &reference, &["--quiet"]).output().unwrap());
    // in this process, then with two child `avi fit` processes (killed
    // with their parent: they exit when its pipe closes)
    for (name, jobs) in [("killed", "1"), ("killed-jobs", "2")] {
        let out = dir.join(name);
        let args = ["--jobs", jobs, "--checkpoint-every", "500"];
        let mut child = reproduce(&def, &out, &[&["--quiet"][..], &args[..]].concat())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let checkpoints = out.join("tiny/checkpoints");
        let start = Instant::now();
        let has_checkpoint = || {
            std::fs::read_dir(&checkpoints).is_ok_and(|mut d| {
                d.any(|e| e.is_ok_and(|e| e.path().join("latest.json").exists()))
            })
        };
        while !has_checkpoint() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{name}: no checkpoint"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        assert!(
            !child.wait().unwrap().success(),
            "{name}: the grid ended before the kill"
        );
        let o = reproduce(&def, &out, &[&["--resume"][..], &args[..]].concat())
            .output()
            .unwrap();
        ok(&o);
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(
            said.contains("resumes from its checkpoint"),
            "{name}: {said}"
        );
        assert_eq!(
            run_reports(&out.join("tiny")),
            run_reports(&reference.join("tiny")),
            "{name}"
        );
        let left: Vec<_> = std::fs::read_dir(&checkpoints).unwrap().collect();
        assert!(left.is_empty(), "{name}: {left:?}");
    }
}

/// `avi reproduce --batch-seeds --checkpoint-every S` (each method's seeds
/// as one batched fit, here two seeds): killed once the batch has a
/// checkpoint and resumed, it writes the uninterrupted batched grid's run
/// reports (times aside) and leaves no checkpoint.
#[test]
fn a_batched_grid_resumes_from_its_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let def = common::tiny_definition(dir);
    let mut d: Value = serde_json::from_str(&std::fs::read_to_string(&def).unwrap()).unwrap();
    d["steps"] = 3000.into();
    std::fs::write(&def, d.to_string()).unwrap();
    let grid = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(AVI);
        c.args(["--threads", "1", "reproduce"])
            .arg(&def)
            .args(["--device", "cpu", "--seeds", "2", "--batch-seeds", "--out"])
            .arg(out)
            .args(extra);
        c
    };
    let reference = dir.join("reference");
    ok(&grid(&reference, &["--quiet"]).output().unwrap());
    let out = dir.join("killed");
    let mut child = grid(&out, &["--quiet", "--checkpoint-every", "500"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = out.join("tiny/checkpoints");
    let start = Instant::now();
    let has_checkpoint = || {
        std::fs::read_dir(&checkpoints)
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.path().join("latest.json").exists())))
    };
    while !has_checkpoint() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    assert!(
        !child.wait().unwrap().success(),
        "the grid ended before the kill"
    );
    let o = grid(&out, &["--resume", "--checkpoint-every", "500"])
        .output()
        .unwrap();
    ok(&o);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("resume from their checkpoint"), "{said}");
    assert_eq!(
        run_reports(&out.join("tiny")),
        run_reports(&reference.join("tiny"))
    );
    let left: Vec<_> = std::fs::read_dir(&checkpoints).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
