//! End-to-end tests of the `avi fit` contract through the real binary.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const AVI: &str = env!("CARGO_BIN_EXE_avi");
const LINEAR: &str = r#""kind": "linear", "tau": 1.155, "sigma": 2.43"#;

fn avi(args: &[&str], cwd: &Path) -> Output {
    Command::new(AVI)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("avi runs")
}

fn config(method: &str, data: &str, extra: &str) -> String {
    format!(
        r#"{{ "model": {{"kind": "linear", "tau": 1.155, "sigma": 2.43}},
             "data": {data}, "method": {method},
             "steps": 300, "lr": 0.05, "draws": 20, "seed": 3, "eval_draws": 200{extra} }}"#
    )
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn fit_writes_the_contract_report() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.json");
    for (method, n_params) in [
        (r#"{"kind": "fvi"}"#, 2 + 2 * 50),
        (r#"{"kind": "const"}"#, 4),
        (
            r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 2}}"#,
            2 + 4,
        ),
    ] {
        std::fs::write(
            &cfg,
            config(method, r#"{"simulate": {"n": 50, "seed": 7}}"#, ""),
        )
        .unwrap();
        let out = dir.path().join("r.json");
        let o = avi(
            &[
                "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu",
            ],
            dir.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = read(&out);
        for key in [
            "model",
            "method",
            "n",
            "device",
            "elbo",
            "elbo_se",
            "q_theta",
            "q_z",
            "trace",
            "iterations",
            "seconds",
            "status",
        ] {
            assert!(r.get(key).is_some(), "missing {key}");
        }
        assert_eq!(r["status"], "ok");
        assert_eq!(r["n"], 50);
        assert_eq!(r["device"], "cpu");
        assert_eq!(r["iterations"], 300);
        assert_eq!(r["num_parameters"], n_params);
        assert_eq!(r["model"]["kind"], "linear");
        assert_eq!(r["q_z"]["mean"].as_array().unwrap().len(), 50);
        assert_eq!(r["q_z"]["sd"].as_array().unwrap().len(), 50);
        assert_eq!(r["q_theta"]["mean"].as_array().unwrap().len(), 1);
        assert!(r["elbo"].as_f64().unwrap().is_finite());
        assert!(r["elbo_se"].as_f64().unwrap() > 0.0);
        // The trace has at least one entry every 10 iterations, with times.
        let it: Vec<u64> = r["trace"]["iteration"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(it.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= 10));
        assert!(*it.last().unwrap() == 300 && it[0] <= 10);
        assert_eq!(r["trace"]["elbo"].as_array().unwrap().len(), it.len());
        assert_eq!(r["trace"]["seconds"].as_array().unwrap().len(), it.len());
        // The linear model reports its closed-form optimum and the gap.
        let opt = r["reference"]["elbo"].as_f64().unwrap();
        assert!(r["elbo"].as_f64().unwrap() <= opt + 4.0 * r["elbo_se"].as_f64().unwrap());
    }
}

#[test]
fn same_seed_same_report() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.json"),
        config(
            r#"{"kind": "fvi"}"#,
            r#"{"simulate": {"n": 30, "seed": 1}}"#,
            "",
        ),
    )
    .unwrap();
    let mut reports = Vec::new();
    for name in ["a.json", "b.json"] {
        let o = avi(
            &[
                "fit", "--config", "c.json", "--out", name, "--device", "cpu",
            ],
            dir.path(),
        );
        assert!(o.status.success());
        let mut r = read(&dir.path().join(name));
        r["seconds"] = Value::Null;
        r["trace"]["seconds"] = Value::Null;
        reports.push(r);
    }
    assert_eq!(reports[0], reports[1]);
}

#[test]
fn data_file_is_resolved_against_the_config_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("exp");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("x.json"), r#"{"x": [0.5, -1.0, 2.0, 0.1, 3.3]}"#).unwrap();
    std::fs::write(
        sub.join("c.json"),
        config(r#"{"kind": "fvi"}"#, r#"{"file": "x.json"}"#, ""),
    )
    .unwrap();
    let o = avi(
        &[
            "fit",
            "--config",
            "exp/c.json",
            "--out",
            "r.json",
            "--device",
            "cpu",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read(&dir.path().join("r.json"))["n"], 5);
}

/// Every bad input: exit code 2, exactly one line on stderr that says what
/// is wrong, and no report file.
#[test]
fn bad_input_exits_2_with_one_line_and_writes_nothing() {
    let sim = r#"{"simulate": {"n": 20, "seed": 1}}"#;
    let fvi = r#"{"kind": "fvi"}"#;
    let cases: Vec<(&str, String, Option<&str>, &str)> = vec![
        ("missing config", String::new(), None, "cannot read config"),
        ("malformed json", "{ not json".into(), None, "config"),
        (
            "unknown field",
            config(fvi, sim, r#", "stepz": 3"#),
            None,
            "stepz",
        ),
        (
            "unknown model kind",
            config(fvi, sim, "").replace("linear", "cubic"),
            None,
            "cubic",
        ),
        (
            "unknown method kind",
            config(r#"{"kind": "magic"}"#, sim, ""),
            None,
            "magic",
        ),
        (
            "tau <= 0",
            config(fvi, sim, "").replace("1.155", "0"),
            None,
            "tau",
        ),
        (
            "sigma <= 0",
            config(fvi, sim, "").replace("2.43", "-1"),
            None,
            "sigma",
        ),
        (
            "negative steps",
            config(fvi, sim, "").replace("\"steps\": 300", "\"steps\": -5"),
            None,
            "steps",
        ),
        (
            "zero draws",
            config(fvi, sim, "").replace("\"draws\": 20", "\"draws\": 0"),
            None,
            "draws",
        ),
        (
            "missing data file",
            config(fvi, r#"{"file": "nope.json"}"#, ""),
            None,
            "nope.json",
        ),
        (
            "empty data",
            config(fvi, r#"{"file": "x.json"}"#, ""),
            Some(r#"{"x": []}"#),
            "empty",
        ),
        (
            "non-finite data",
            config(fvi, r#"{"file": "x.json"}"#, ""),
            Some(r#"{"x": [1, 1e999]}"#),
            "x.json",
        ),
        (
            "non-numeric data",
            config(fvi, r#"{"file": "x.json"}"#, ""),
            Some(r#"{"x": [1, "a"]}"#),
            "x.json",
        ),
        (
            "empty simulation",
            config(fvi, r#"{"simulate": {"n": 0, "seed": 1}}"#, ""),
            None,
            "n",
        ),
        (
            "transition rows not summing to 1",
            config(fvi, sim, "").replace(LINEAR,
                r#""kind": "discrete_hmm", "init": [0.5, 0.5], "transition": [[0.9, 0.2], [0.5, 0.5]], "emission_sd": 1, "prior_sd": 1"#),
            None,
            "transition",
        ),
        (
            "mixture with k = 0",
            config(fvi, sim, "").replace(LINEAR, r#""kind": "mixture", "k": 0, "prior_sd": 1, "noise_sd": 1"#),
            None,
            "`k`",
        ),
        (
            "vector data for a scalar model",
            config(fvi, r#"{"file": "x.json"}"#, ""),
            Some(r#"{"x": [[1, 2], [3, 4]]}"#),
            "scalar",
        ),
        (
            "ragged vector data",
            config(fvi, r#"{"file": "x.json"}"#, ""),
            Some(r#"{"x": [[1, 2], [3]]}"#),
            "x[1]",
        ),
        (
            "missing Fashion-MNIST files",
            config(fvi, r#"{"fashion_mnist": {"split": "test", "n": 5, "dir": "nowhere"}}"#, "")
                .replace(LINEAR, r#""kind": "bnn""#),
            None,
            "nowhere",
        ),
        (
            "fixed_theta of the wrong length",
            config(fvi, sim, "").replace(
                "\"sigma\": 2.43",
                "\"sigma\": 2.43, \"fixed_theta\": [1, 2]",
            ),
            None,
            "fixed_theta",
        ),
    ];
    for (what, cfg, data, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        if !cfg.is_empty() {
            std::fs::write(dir.path().join("c.json"), &cfg).unwrap();
        }
        if let Some(d) = data {
            std::fs::write(dir.path().join("x.json"), d).unwrap();
        }
        let o = avi(
            &[
                "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu",
            ],
            dir.path(),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
        assert!(err.contains(needle), "{what}: `{needle}` not in: {err}");
        assert!(
            !dir.path().join("r.json").exists(),
            "{what}: a report was written"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.len() <= 2, "{what}: stray files {left:?}");
    }
}

#[test]
fn cuda_without_a_device_is_an_error() {
    if tch::Cuda::is_available() {
        return; // covered on GPU machines by `just bench-gpu`
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.json"),
        config(
            r#"{"kind": "fvi"}"#,
            r#"{"simulate": {"n": 10, "seed": 1}}"#,
            "",
        ),
    )
    .unwrap();
    let o = avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cuda",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("CUDA"));
    assert!(!dir.path().join("r.json").exists());
}

#[test]
fn divergence_is_reported_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    // The largest accepted learning rate (1e6; 1e30 is now refused as bad
    // input) sends the log-sds to ±1e6: exp overflows.
    let cfg = config(
        r#"{"kind": "fvi"}"#,
        r#"{"simulate": {"n": 20, "seed": 1}}"#,
        "",
    )
    .replace("\"lr\": 0.05", "\"lr\": 1e6");
    std::fs::write(dir.path().join("c.json"), cfg).unwrap();
    let o = avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu",
        ],
        dir.path(),
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = read(&dir.path().join("r.json"));
    assert_eq!(r["status"], "diverged");
    let at = r["diverged_at"].as_u64().unwrap();
    assert!((1..=100).contains(&at), "diverged_at = {at}");
    assert_eq!(r["iterations"].as_u64(), Some(at));
    assert!(
        r["elbo"].is_null(),
        "a non-finite ELBO must be null, got {}",
        r["elbo"]
    );
    assert_eq!(r["trace"]["iteration"].as_array().unwrap().len() as u64, at);
}

#[test]
fn saw_with_an_expanded_domain_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = r#"{ "model": {"kind": "saw", "alpha": 0.75, "x0": 0},
        "data": {"simulate": {"n": 60, "seed": 2012, "theta": [3.4159]}},
        "method": {"kind": "avi", "fn": {"kind": "mlp", "width": 4, "depth": 2,
                   "activation": "relu", "heads": "shared"},
                   "window": [1, 0], "edges": "free", "standardize": true},
        "steps": 200, "lr": 0.03, "draws": 10, "seed": 2013, "eval_draws": 100,
        "entropy": "analytic", "dtype": "f64" }"#;
    std::fs::write(dir.path().join("c.json"), cfg).unwrap();
    let o = avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = read(&dir.path().join("r.json"));
    assert_eq!(r["model"]["kind"], "saw");
    assert_eq!(r["method"]["window"], serde_json::json!([1, 0]));
    // MLP 2→4→4→(1,1) = 12 + 20 + 10 parameters, q(θ) 2, one free edge factor 2.
    assert_eq!(r["num_parameters"], 12 + 20 + 10 + 2 + 2);
    assert!(r["reference"]["elbo"].as_f64().is_some());
}

#[test]
fn fashion_mnist_checksum_mismatch_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fm");
    std::fs::create_dir(&data).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist");
    for f in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        std::fs::copy(src.join(f), data.join(f)).unwrap();
    }
    let labels = data.join("t10k-labels-idx1-ubyte.gz");
    let mut bytes = std::fs::read(&labels).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    std::fs::write(&labels, bytes).unwrap();
    let cfg = r#"{"model": {"kind": "bnn"}, "data": {"fashion_mnist": {"split": "test", "n": 5, "dir": "fm"}},
                  "method": {"kind": "fvi"}, "steps": 1, "draws": 1, "eval_draws": 2}"#;
    std::fs::write(dir.path().join("c.json"), cfg).unwrap();
    let o = avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.to_lowercase().contains("checksum"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1);
    assert!(!dir.path().join("r.json").exists());
}

#[test]
fn mixture_and_bnn_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.json"),
        r#"{"x": [[-4.1, 0.2], [-3.9, -0.3], [4.2, 0.1], [3.8, 0.4], [-4.0, 0.0], [4.1, -0.2]]}"#,
    )
    .unwrap();
    let cfg = r#"{"model": {"kind": "mixture", "k": 2, "prior_sd": 5, "noise_sd": 1, "fixed_theta": [-4, 0, 4, 0]},
                  "data": {"file": "x.json"}, "method": {"kind": "fvi"},
                  "steps": 300, "lr": 0.1, "draws": 1, "eval_draws": 10, "dtype": "f64"}"#;
    std::fs::write(dir.path().join("c.json"), cfg).unwrap();
    let o = avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = read(&dir.path().join("r.json"));
    assert!(r["q_theta"].is_null());
    // probs: N rows of K.
    let probs = r["q_z"]["probs"].as_array().unwrap();
    assert_eq!(probs.len(), 6);
    assert!(probs.iter().all(|row| row.as_array().unwrap().len() == 2));
    // Points near (−4, 0) belong to component 1 with probability > 0.99.
    assert!(probs[0][0].as_f64().unwrap() > 0.99 && probs[4][0].as_f64().unwrap() > 0.99);
    // θ fixed: the exact F-VI optimum is log p(x | μ); 300 steps get within
    // 0.5 nats (measured 0.14: saturating softmax rows converge slowly).
    let gap = r["reference"]["gap"].as_f64().unwrap();
    assert!((-1e-9..0.5).contains(&gap), "gap {gap}");

    let cfg = r#"{"model": {"kind": "bnn", "latent": 2, "hidden": 3},
                  "data": {"simulate": {"n": 8, "seed": 1, "dim": 5}},
                  "method": {"kind": "avi", "fn": {"kind": "mlp", "width": 4, "activation": "leaky_relu"}},
                  "steps": 20, "lr": 0.001, "draws": 1, "eval_draws": 5, "batch_size": 3, "shuffle": true,
                  "report_q_z": false}"#;
    std::fs::write(dir.path().join("b.json"), cfg).unwrap();
    let o = avi(
        &[
            "fit",
            "--config",
            "b.json",
            "--out",
            "b-report.json",
            "--device",
            "cpu",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = read(&dir.path().join("b-report.json"));
    assert!(r["q_z"].is_null());
    // θ: W1 3×2, W2 3×3, W3 5×3 and biases 3 + 3 + 5.
    assert_eq!(
        r["q_theta"]["mean"].as_array().unwrap().len(),
        6 + 9 + 15 + 11
    );
}

#[test]
fn diagnose_adds_a_diagnosis() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}}"#,
        r#"{"simulate": {"n": 50, "seed": 7}}"#,
        "",
    );
    std::fs::write(dir.path().join("c.json"), cfg).unwrap();
    let o = avi(
        &[
            "diagnose",
            "--config",
            "c.json",
            "--out",
            "r.json",
            "--fvi-steps",
            "50",
            "--gradient-draws",
            "100",
            "--device",
            "cpu",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = read(&dir.path().join("r.json"));
    for key in [
        "amortized_elbo",
        "refined_elbo",
        "gain",
        "gain_se",
        "gradient_norm",
    ] {
        assert!(r["diagnosis"][key].as_f64().is_some(), "missing {key}");
    }
    assert_eq!(r["diagnosis"]["fvi_steps"], 50);
    // An F-VI config is refused: there is nothing amortized to diagnose.
    std::fs::write(
        dir.path().join("f.json"),
        config(
            r#"{"kind": "fvi"}"#,
            r#"{"simulate": {"n": 50, "seed": 7}}"#,
            "",
        ),
    )
    .unwrap();
    let o = avi(
        &["diagnose", "--config", "f.json", "--out", "f-r.json"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(!dir.path().join("f-r.json").exists());
    // Nor is a Gauss–Markov family (its F-VI steps are not the diagnostic's).
    std::fs::write(
        dir.path().join("m.json"),
        r#"{"model": {"kind": "gaussian_hmm", "rho": 0.9, "q": 0.3, "r": 1.0, "s0": 1.0},
            "data": {"simulate": {"n": 30, "seed": 5}},
            "method": {"kind": "avi", "fn": {"kind": "mlp", "width": 4}, "window": [1, 1],
                       "structure": "markov"},
            "steps": 20, "draws": 2, "eval_draws": 10}"#,
    )
    .unwrap();
    let o = avi(
        &["diagnose", "--config", "m.json", "--out", "m-r.json"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("markov"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!dir.path().join("m-r.json").exists());
}

/// `avi demo` (small N): the fused engine on the CPU, a line per finished
/// fit, and at the end where the REPORT.md, figures and summary are; the
/// closed-form gap of A-VI (d = 1) is far below Const's (the paper's
/// ordering; N = 300, 600 steps).
#[test]
fn demo_says_where_its_report_is() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = Command::new(AVI)
        .args([
            "demo", "--n", "300", "--steps", "600", "--device", "cpu", "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.matches("(fused engine)").count(), 4, "{text}");
    assert!(
        text.contains(&out.join("REPORT.md").display().to_string()),
        "{text}"
    );
    for f in [
        "REPORT.md",
        "summary.json",
        "elbo-vs-iteration.svg",
        "elbo-vs-time.svg",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let s = read(&out.join("summary.json"));
    let gap = |m: &str| {
        s["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["method"] == m)
            .unwrap()["gap"]
            .as_f64()
            .unwrap()
    };
    assert!(gap("avi-poly1") < 0.5 * gap("const"), "{s}");
}

/// `avi fit` off a terminal prints progress lines on stdout at check
/// blocks (at most one a second, and the last); `--quiet` prints nothing.
#[test]
fn fit_shows_progress_unless_quiet() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.json"),
        config(
            r#"{"kind": "fvi"}"#,
            r#"{"simulate": {"n": 30, "seed": 1}}"#,
            "",
        ),
    )
    .unwrap();
    let go = |extra: &[&str]| {
        let o = avi(
            &[
                &[
                    "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu",
                ],
                extra,
            ]
            .concat(),
            dir.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // A line at the first check, then at most one a second, and the last.
    let lines = go(&[]);
    let steps: Vec<&str> = lines.lines().filter(|l| l.starts_with("step ")).collect();
    assert!((2..=3).contains(&steps.len()), "{lines}");
    assert!(steps[0].starts_with("step 100/300: ELBO "), "{lines}");
    assert!(
        steps.last().unwrap().starts_with("step 300/300: ELBO "),
        "{lines}"
    );
    assert_eq!(go(&["--quiet"]), "");
}

/// The same observations as JSON, CSV (with a header) and NumPy `.npy`
/// (float64, written by hand) give the same fit, bit for bit; a ragged CSV
/// is refused naming the file.
#[test]
fn csv_and_npy_data_files() {
    let dir = tempfile::tempdir().unwrap();
    let x = [0.5f64, -1.25, 2.0, 0.125, 3.5, -0.75];
    std::fs::write(
        dir.path().join("x.json"),
        serde_json::json!({ "x": x }).to_string(),
    )
    .unwrap();
    let csv: String = std::iter::once("x".to_string())
        .chain(x.iter().map(|v| v.to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("x.csv"), csv).unwrap();
    let mut header = format!(
        "{{'descr': '<f8', 'fortran_order': False, 'shape': ({},), }}",
        x.len()
    );
    while (11 + header.len()) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend((header.len() as u16).to_le_bytes());
    npy.extend(header.as_bytes());
    npy.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(dir.path().join("x.npy"), npy).unwrap();
    let mut elbos = Vec::new();
    for file in ["x.json", "x.csv", "x.npy"] {
        std::fs::write(
            dir.path().join("c.json"),
            config(
                r#"{"kind": "fvi"}"#,
                &format!(r#"{{"file": "{file}"}}"#),
                "",
            ),
        )
        .unwrap();
        let o = avi(
            &[
                "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu", "--quiet",
            ],
            dir.path(),
        );
        assert!(
            o.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r = read(&dir.path().join("r.json"));
        assert_eq!(r["n"], 6, "{file}");
        elbos.push(r["trace"]["elbo"].clone());
    }
    assert_eq!(elbos[0], elbos[1]);
    assert_eq!(elbos[0], elbos[2]);
    std::fs::write(dir.path().join("x.csv"), "1\n2,3\n").unwrap();
    std::fs::write(
        dir.path().join("c.json"),
        config(r#"{"kind": "fvi"}"#, r#"{"file": "x.csv"}"#, ""),
    )
    .unwrap();
    let o = avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu",
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("x.csv"));
}
