//! `avi fit --save`, `"init_from"` and `avi encode` through the real binary.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod common;

const AVI: &str = env!("CARGO_BIN_EXE_avi");

fn avi(args: &[&str], cwd: &Path) -> Output {
    Command::new(AVI)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("avi runs")
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Exit 2 with one line on stderr naming `want`.
fn refused(o: &Output, want: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(want), "{err}\nwanted {want}");
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn config(method: &str, steps: usize, extra: &str) -> String {
    format!(
        r#"{{ "model": {{"kind": "linear", "tau": 1.155, "sigma": 2.43}},
             "data": {{"simulate": {{"n": 200, "seed": 7, "theta": [1.0]}}}}, "method": {method},
             "steps": {steps}, "lr": 0.02, "draws": 10, "seed": 3, "eval_draws": 200,
             "dtype": "f64"{extra} }}"#
    )
}

const POLY: &str = r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}}"#;

/// Fit with `--save`, encode a fresh data set (another seed) with
/// `--refine 50`: the report has the fit report's shapes and a held-out
/// gap of zero within Monte Carlo error (the linear model's ideal encoder
/// is linear); a config's `"save"` and `"init_from"` work too.
#[test]
fn fit_save_then_encode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c.json"), config(POLY, 2000, "")).unwrap();
    let o = avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu", "--save", "state",
        ],
        d,
    );
    ok(&o);
    assert!(d.join("state/fitted.json").is_file());
    assert!(d.join("state/state.safetensors").is_file());
    let manifest = read(&d.join("state/fitted.json"));
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["model"], "linear");
    assert_eq!(manifest["method"]["kind"], "avi");
    assert_eq!(manifest["n"], 200);
    assert_eq!(
        manifest["git_commit"].is_string(),
        option_env!("AVI_GIT_COMMIT").is_some()
    );

    std::fs::write(
        d.join("new.json"),
        r#"{"data": {"simulate": {"n": 80, "seed": 8, "theta": [1.0]}}}"#,
    )
    .unwrap();
    let o = avi(
        &[
            "encode",
            "--fitted",
            "state",
            "--data",
            "new.json",
            "--out",
            "q.json",
            "--device",
            "cpu",
            "--draws",
            "2000",
            "--seed",
            "5",
            "--refine",
            "50",
            "--refine-lr",
            "0.02",
        ],
        d,
    );
    ok(&o);
    let q = read(&d.join("q.json"));
    assert_eq!(q["n"], 80);
    assert_eq!(q["q_z"]["mean"].as_array().unwrap().len(), 80);
    assert_eq!(q["q_z"]["sd"].as_array().unwrap().len(), 80);
    assert_eq!(q["q_theta"]["mean"].as_array().unwrap().len(), 1);
    assert!(q["heldout_elbo_excludes"]
        .as_str()
        .unwrap()
        .contains("log p(θ)"));
    assert!(q["outside_training_range"]["count"].as_u64().is_some());
    let (a, a_se) = (
        q["heldout_elbo"].as_f64().unwrap(),
        q["heldout_elbo_se"].as_f64().unwrap(),
    );
    let (r, r_se) = (
        q["refined_heldout_elbo"].as_f64().unwrap(),
        q["refined_heldout_elbo_se"].as_f64().unwrap(),
    );
    let gap = q["heldout_gap"].as_f64().unwrap();
    // The same draws for both estimates: the difference is r − a exactly
    // (to rounding, 1e-9), and zero within 4 combined standard errors plus
    // 0.1 nats of optimisation noise (50 Adam steps from the encoder's
    // output at a decaying rate).
    assert!((gap - (r - a)).abs() < 1e-9);
    // The paired standard error: the refined factors start at the
    // amortized ones, so the per-draw differences vary far less than
    // either estimate (below the combined error).
    let gap_se = q["heldout_gap_se"].as_f64().unwrap();
    assert!(
        gap_se >= 0.0 && gap_se < (a_se * a_se + r_se * r_se).sqrt(),
        "{gap_se}"
    );
    assert!(
        gap.abs() <= 4.0 * (a_se * a_se + r_se * r_se).sqrt() + 0.1,
        "{gap}"
    );
    assert_eq!(q["refine"]["iterations"], 50);

    // The config's "save" (relative to its folder) and "init_from": a warm
    // start of the same fit from the saved state continues from it (its
    // first ELBO is the saved fit's level, not the initialisation's).
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(
        d.join("sub/c2.json"),
        config(POLY, 10, r#", "init_from": "../state", "save": "again""#),
    )
    .unwrap();
    let o = avi(
        &[
            "fit",
            "--config",
            "sub/c2.json",
            "--out",
            "r2.json",
            "--device",
            "cpu",
        ],
        d,
    );
    ok(&o);
    assert!(d.join("sub/again/fitted.json").is_file());
    let first = read(&d.join("r.json"));
    let warm = read(&d.join("r2.json"));
    let elbo = first["elbo"].as_f64().unwrap();
    let warm_first = warm["trace"]["elbo"][0].as_f64().unwrap();
    // The cold fit's first ELBO is far below its end (thousands of nats
    // at a random start); the warm one starts within 5 nats of the end
    // (10-draw estimates of an ELBO of about −500 have sd ≈ 2).
    assert!((warm_first - elbo).abs() < 5.0, "{warm_first} vs {elbo}");
    let cold_first = first["trace"]["elbo"][0].as_f64().unwrap();
    assert!(elbo - cold_first > 20.0, "{cold_first} vs {elbo}");
}

/// Bad input through the binary: exit 2, one line naming the problem,
/// nothing written.
#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c.json"), config(POLY, 20, "")).unwrap();
    ok(&avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu", "--save", "state",
        ],
        d,
    ));
    std::fs::write(d.join("new.json"), r#"{"x": [0.5, 1.5, 2.5]}"#).unwrap();
    let encode = |fitted: &str, data: &str| {
        avi(
            &[
                "encode", "--fitted", fitted, "--data", data, "--out", "q.json", "--device", "cpu",
                "--draws", "20",
            ],
            d,
        )
    };
    // A data file of the JSON {"x": …} form encodes.
    ok(&encode("state", "new.json"));
    std::fs::remove_file(d.join("q.json")).unwrap();

    refused(&encode("missing", "new.json"), "missing");
    refused(&encode("state", "absent.json"), "absent.json");
    // Observations of two values for a scalar model.
    std::fs::write(d.join("wide.json"), r#"{"x": [[1, 2], [3, 4]]}"#).unwrap();
    refused(&encode("state", "wide.json"), "wide.json");

    // A tampered state: checksum mismatch.
    std::fs::create_dir(d.join("bad")).unwrap();
    std::fs::copy(d.join("state/fitted.json"), d.join("bad/fitted.json")).unwrap();
    let mut bytes = std::fs::read(d.join("state/state.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(d.join("bad/state.safetensors"), &bytes).unwrap();
    refused(&encode("bad", "new.json"), "checksum mismatch");
    // A newer format.
    let mut m = read(&d.join("state/fitted.json"));
    m["format_version"] = 9.into();
    std::fs::create_dir(d.join("newer")).unwrap();
    std::fs::copy(
        d.join("state/state.safetensors"),
        d.join("newer/state.safetensors"),
    )
    .unwrap();
    std::fs::write(d.join("newer/fitted.json"), m.to_string()).unwrap();
    refused(&encode("newer", "new.json"), "format version 9");
    assert!(!d.join("q.json").exists());

    // F-VI cannot encode.
    std::fs::write(d.join("f.json"), config(r#"{"kind": "fvi"}"#, 20, "")).unwrap();
    ok(&avi(
        &[
            "fit", "--config", "f.json", "--out", "rf.json", "--device", "cpu", "--save", "fvi",
        ],
        d,
    ));
    refused(&encode("fvi", "new.json"), "no function for new data");
    assert!(!d.join("q.json").exists());

    // Saving over another fit's state is refused before the fit: nothing
    // written, the state kept.
    let before = std::fs::read(d.join("state/state.safetensors")).unwrap();
    let o = avi(
        &[
            "fit", "--config", "f.json", "--out", "r3.json", "--device", "cpu", "--save", "state",
        ],
        d,
    );
    refused(&o, "another fit");
    assert!(!d.join("r3.json").exists());
    assert_eq!(
        std::fs::read(d.join("state/state.safetensors")).unwrap(),
        before
    );

    // A warm start from another method's state is refused.
    std::fs::write(d.join("w.json"), config(POLY, 5, r#", "init_from": "fvi""#)).unwrap();
    let o = avi(
        &[
            "fit", "--config", "w.json", "--out", "r4.json", "--device", "cpu",
        ],
        d,
    );
    refused(&o, "method");
    assert!(!d.join("r4.json").exists());
}

/// `avi reproduce --save` keeps every run's state in
/// OUT/EXPERIMENT/fitted/<label>-<seed>/, in this process and in child
/// processes (`--jobs 2`), and a kept state encodes.
#[test]
fn reproduce_saves_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let def = common::tiny_definition(d);
    for (out, jobs) in [("here", "1"), ("children", "2")] {
        let o = avi(
            &[
                "--threads",
                "1",
                "reproduce",
                def.to_str().unwrap(),
                "--quick",
                "--quiet",
                "--device",
                "cpu",
                "--save",
                "--jobs",
                jobs,
                "--out",
                out,
            ],
            d,
        );
        ok(&o);
        let fitted = d.join(out).join("tiny/fitted");
        let mut names: Vec<String> = std::fs::read_dir(&fitted)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // The quick grid: one seed (1954) of fvi, const and d=1.
        assert_eq!(names, ["const-1954", "d=1-1954", "fvi-1954"], "{out}");
        for n in &names {
            let m = read(&fitted.join(n).join("fitted.json"));
            assert_eq!(m["model"], "linear", "{out} {n}");
        }
    }
    std::fs::write(d.join("new.json"), r#"{"x": [0.5, 1.5, 2.5]}"#).unwrap();
    ok(&avi(
        &[
            "encode",
            "--fitted",
            "here/tiny/fitted/d=1-1954",
            "--data",
            "new.json",
            "--out",
            "q.json",
            "--device",
            "cpu",
            "--draws",
            "20",
        ],
        d,
    ));
}
