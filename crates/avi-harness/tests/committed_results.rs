//! Every committed result still loads into its type: the run reports under
//! `data/results/` into [`RunReport`] (and written back as the older
//! `json!` report wrote it), every
//! `experiment.json` into its experiment, every `summary.json` as JSON; and
//! a report with a renamed key fails with an error naming the file and key.

use std::path::{Path, PathBuf};

use avi_harness::experiment::load_experiment_file;
use avi_harness::run_report::{self, RunReport};

fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/results")
}

/// Every file named `name` (or, with `runs`, every JSON file in a `runs`
/// folder) under `dir`.
fn files(dir: &Path, accept: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, accept, out);
        } else if accept(&p) {
            out.push(p);
        }
    }
}

fn run_reports() -> Vec<PathBuf> {
    let mut out = Vec::new();
    files(
        &results_dir(),
        &|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.parent()
                    .and_then(Path::file_name)
                    .is_some_and(|d| d == "runs" || d == "reports")
        },
        &mut out,
    );
    out
}

#[test]
fn committed_run_reports_load_and_write_back_identically() {
    let reports = run_reports();
    assert!(
        reports.len() >= 60,
        "expected the committed run reports, found {}",
        reports.len()
    );
    for path in &reports {
        let report = run_report::load(path).unwrap_or_else(|e| panic!("{e:#}"));
        // The file as the older writer wrote it (`json!` maps sort their
        // keys) and the typed report written back agree byte for byte.
        // (Both hold the numbers as serde_json parsed them; its parser is
        // not correctly rounded in the last bit, so the file's own bytes
        // are compared through the same parse.)
        let text = std::fs::read_to_string(path).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Reports older than the fit's warnings had none.
        if value.get("warnings").is_none() {
            value["warnings"] = serde_json::json!([]);
        }
        let old = serde_json::to_string_pretty(&value).unwrap();
        let new = serde_json::to_string_pretty(&report).unwrap();
        assert!(old == new, "{} is written back differently", path.display());
    }
}

#[test]
fn committed_experiments_and_summaries_load() {
    let mut experiments = Vec::new();
    files(
        &results_dir(),
        &|p| p.file_name().is_some_and(|n| n == "experiment.json"),
        &mut experiments,
    );
    assert!(!experiments.is_empty());
    for path in &experiments {
        load_experiment_file(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    }
    let mut summaries = Vec::new();
    files(
        &results_dir(),
        &|p| p.file_name().is_some_and(|n| n == "summary.json"),
        &mut summaries,
    );
    assert!(!summaries.is_empty());
    for path in &summaries {
        let text = std::fs::read_to_string(path).unwrap();
        let s = serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The per-seed verdict is always there; the median one (added
        // later) is optional, and well-formed where present.
        for c in s["claims"].as_array().into_iter().flatten() {
            assert!(
                c["reproduced"].is_boolean() || c["reproduced"].is_null(),
                "{}: {c}",
                path.display()
            );
            if let Some(m) = c.get("median") {
                assert!(
                    (m["reproduced"].is_boolean() || m["reproduced"].is_null())
                        && m["detail"].is_string(),
                    "{}: {c}",
                    path.display()
                );
            }
        }
    }
}

/// A renamed required key (`trace.elbo` → `trace.elbos`, `elbo_se` →
/// `se`) is an error naming the file and the key path, not a NaN.
#[test]
fn a_renamed_key_names_the_file_and_the_key() {
    let original = std::fs::read_to_string(&run_reports()[0]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (from, to, key) in [
        ("\"elbo_se\":", "\"se\":", "elbo_se"),
        ("\"iteration\":", "\"iterations_\":", "trace"),
    ] {
        assert!(original.contains(from));
        let path = dir.path().join("renamed.json");
        std::fs::write(&path, original.replacen(from, to, 1)).unwrap();
        let err = format!("{:#}", run_report::load(&path).unwrap_err());
        assert!(err.contains("renamed.json"), "{err}");
        assert!(err.contains(key), "{err}");
        assert!(err.contains("missing field"), "{err}");
    }
    // A committed report's content, typed, is what the file says.
    let r: RunReport = RunReport::from_json(&original).unwrap();
    assert_eq!(r.trace.elbo.len(), r.trace.iteration.len());
}
