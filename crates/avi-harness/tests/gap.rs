//! `avi gap` through the real binary: the split of a saved fit's gap on
//! the linear model (log p(x | θ) in closed form, mean-field exact at a
//! known θ) and on the nonlinear model (quadrature against importance
//! weighting).

use std::path::Path;
use std::process::{Command, Output};

use avi_models::LinearModel;
use serde_json::Value;

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

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for p in path {
        v = &v[p];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number: {v}"))
}

fn linear_config(seed: u64) -> String {
    format!(
        r#"{{ "model": {{"kind": "linear", "tau": 1.155, "sigma": 2.43, "fixed_theta": [1.0]}},
             "data": {{"simulate": {{"n": 200, "seed": {seed}, "theta": [1.0]}}}},
             "method": {{"kind": "avi", "fn": {{"kind": "poly", "degree": 1}}}},
             "steps": 2000, "lr": 0.02, "draws": 10, "seed": 3, "eval_draws": 200,
             "dtype": "f64" }}"#
    )
}

/// A linear A-VI fit (a degree-1 polynomial encoder, which can represent
/// the exact posterior) with θ fixed at 1: `avi gap --config` reports
/// log p(x | θ) equal to the closed form Σ log N(x_n; θ, σ² + τ²) (1e-9
/// relative: quadrature in f64), an approximation gap of 0 within 4 SE +
/// 0.05 nats (at a known θ the posterior factorises and is Gaussian, so
/// mean-field VI is exact; 0.05: the refinement's Adam noise floor), a
/// small amortization gap (below 4 SE + 0.2 nats: the fitted encoder is
/// near the exact one after 2,000 steps), and total = approximation +
/// amortization (1e-9 relative, an identity). `--data` with the same data
/// gives the same split; another data set, or no data, is refused with
/// one line.
#[test]
fn linear_gap_against_closed_form() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c.json"), linear_config(7)).unwrap();
    ok(&avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu", "--save", "state",
        ],
        d,
    ));
    let o = avi(
        &[
            "gap",
            "--fitted",
            "state",
            "--config",
            "c.json",
            "--out",
            "gap.json",
            "--device",
            "cpu",
            "--refine-steps",
            "1000",
            "--draws",
            "500",
        ],
        d,
    );
    ok(&o);
    let g = read(&d.join("gap.json"));
    let s = &g["split"];
    assert_eq!(g["model"], "linear");
    assert_eq!(s["theta_source"], "fixed");
    assert_eq!(s["theta"][0].as_f64(), Some(1.0));
    let m = LinearModel::new(1.155, 2.43).unwrap();
    let xs = m.simulate(200, 7, Some(1.0)).unwrap();
    let exact = m.log_marginal(1.0, &xs);
    let lp = num(s, &["log_marginal", "value"]);
    assert!((lp - exact).abs() < 1e-9 * exact.abs(), "{lp} vs {exact}");
    assert!(s["marginal"]["quadrature"].is_object(), "{s}");
    let (a, a_se) = (
        num(s, &["approximation_gap", "value"]),
        num(s, &["approximation_gap", "se"]),
    );
    assert!(a.abs() < 4.0 * a_se + 0.05, "{s}");
    let (g_am, g_se) = (
        num(s, &["amortization_gap", "value"]),
        num(s, &["amortization_gap", "se"]),
    );
    assert!(g_am.abs() < 4.0 * g_se + 0.2, "{s}");
    let total = num(s, &["total_gap", "value"]);
    assert!((total - (a + g_am)).abs() < 1e-9 * exact.abs(), "{s}");
    assert!(g["warnings"].as_array().unwrap().is_empty(), "{g}");

    // The same data as a file (CSV: Rust's exact float parsing): the same
    // split (same seed, same draws).
    let data: Vec<String> = xs.iter().map(|v| format!("{v:?}")).collect();
    std::fs::write(d.join("x.csv"), format!("x\n{}\n", data.join("\n"))).unwrap();
    ok(&avi(
        &[
            "gap",
            "--fitted",
            "state",
            "--data",
            "x.csv",
            "--out",
            "gap2.json",
            "--device",
            "cpu",
            "--refine-steps",
            "1000",
            "--draws",
            "500",
        ],
        d,
    ));
    let g2 = read(&d.join("gap2.json"));
    assert_eq!(g2["split"], g["split"]);

    // Another data set: refused (its SHA-256 is not the fit's).
    std::fs::write(d.join("other.json"), linear_config(8)).unwrap();
    let o = avi(
        &[
            "gap",
            "--fitted",
            "state",
            "--config",
            "other.json",
            "--out",
            "g3.json",
        ],
        d,
    );
    refused(&o, "training data");
    assert!(!d.join("g3.json").exists());
}

/// A small nonlinear A-VI fit with θ fixed (N = 100): log p(x | θ) by
/// quadrature (its doubling error estimate below 1e-8 nats) lies above the
/// importance-weighted bound of `--iw` less 3 of its SEs (K = 2,000 draws
/// from the refined factors: a lower bound in expectation), both ELBOs lie
/// below it, and both gaps are non-negative within 3 SE.
#[test]
fn nonlinear_gap_quadrature_and_iw() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = r#"{ "model": {"kind": "nonlinear", "fixed_theta": [0.5]},
        "data": {"simulate": {"n": 100, "seed": 11, "theta": [0.5]}},
        "method": {"kind": "avi", "fn": {"kind": "mlp", "width": 4, "heads": "separate"}},
        "steps": 500, "lr": 0.02, "draws": 10, "seed": 3, "eval_draws": 100 }"#;
    std::fs::write(d.join("c.json"), cfg).unwrap();
    ok(&avi(
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "cpu", "--save", "state",
        ],
        d,
    ));
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "gap",
            "--fitted",
            "state",
            "--config",
            "c.json",
            "--out",
            out,
            "--device",
            "cpu",
            "--refine-steps",
            "1000",
            "--draws",
            "500",
        ];
        args.extend_from_slice(extra);
        ok(&avi(&args, d));
        read(&d.join(out))
    };
    let q = run("quad.json", &[]);
    let iw = run("iw.json", &["--iw", "--iw-samples", "2000"]);
    let s = &q["split"];
    assert!(
        num(s, &["marginal", "quadrature", "error_estimate"]) < 1e-8,
        "{s}"
    );
    let lp = num(s, &["log_marginal", "value"]);
    let (lp_iw, iw_se) = (
        num(&iw["split"], &["log_marginal", "value"]),
        num(&iw["split"], &["log_marginal", "se"]),
    );
    assert!(
        lp_iw < lp + 3.0 * iw_se,
        "IW {lp_iw} ± {iw_se} vs quadrature {lp}"
    );
    for e in ["elbo_fitted", "elbo_fvi"] {
        let (v, se) = (num(s, &[e, "value"]), num(s, &[e, "se"]));
        assert!(v < lp + 3.0 * se, "{e} {v} ± {se} vs {lp}");
    }
    for gap in ["approximation_gap", "amortization_gap"] {
        let (v, se) = (num(s, &[gap, "value"]), num(s, &[gap, "se"]));
        assert!(v > -3.0 * se, "{gap} {v} ± {se}");
    }
}
