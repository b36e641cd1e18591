//! Every committed result still loads into its type: the run reports under
//! `data/results/` (full `.json` and compact `.json.gz`) into [`RunReport`]
//! (and written back as the older `json!` report wrote it), every
//! `experiment.json` into its experiment, every `summary.json` as JSON; a
//! report with a renamed key fails with an error naming the file and key;
//! and every committed summary either rebuilds from its committed runs to
//! the same summary.json or says in its REPORT.md that it cannot.

use std::io::Read;
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

/// A report file's JSON text (gunzipped when compact).
fn read_text(path: &Path) -> String {
    let mut text = String::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
    } else {
        text = std::fs::read_to_string(path).unwrap();
    }
    text
}

fn run_reports() -> Vec<PathBuf> {
    let mut out = Vec::new();
    files(
        &results_dir(),
        &|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            (name.ends_with(".json") || name.ends_with(".json.gz"))
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
        // The file as its writer wrote it (the older `json!` report, the
        // typed one, or `avi compact`) and the typed report written back
        // hold the same keys and numbers (serde_json parses with
        // `float_roundtrip`: each number reads back to the bits written).
        let text = read_text(path);
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Reports older than the fit's warnings had none.
        if value.get("warnings").is_none() {
            value["warnings"] = serde_json::json!([]);
        }
        // Compared as JSON values: key order aside (the held-out section's
        // fields are not in alphabetical order), every key and number.
        let back = serde_json::to_value(&report).unwrap();
        let (old, new) = (
            serde_json::to_string_pretty(&value).unwrap(),
            serde_json::to_string_pretty(&back).unwrap(),
        );
        let first = old
            .lines()
            .zip(new.lines())
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("{a} / {b}"));
        assert!(
            value == back,
            "{} is written back differently: {first:?}",
            path.display()
        );
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
    // A linear run's (the BNN's reports also hold an `mse.iteration`).
    let first = run_reports()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("linear/runs/"))
        .unwrap();
    let original = read_text(&first);
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
    let b = r.trace.blocks();
    assert_eq!(b.elbo.len(), b.iteration.len());
    assert_eq!(r.trace.len(), r.iterations);
}

/// The line that marks a committed summary whose run reports were not
/// kept.
const MARKER: &str = "> **Cannot be rebuilt:**";

/// Every `summary.json` under `data/results/`: when its folder holds
/// `experiment.json` and run reports (`runs/`, full or compact), `avi
/// report` rebuilds it, in a temporary copy of the definition and the
/// runs, into a summary.json equal as JSON to the committed one (and its
/// REPORT.md has no marker); otherwise its REPORT.md carries the marker
/// line saying why and how to regenerate it. (Folders without
/// `experiment.json`, such as `demo/`, are summaries of other commands:
/// they are marked too.)
#[test]
fn every_committed_summary_rebuilds_or_says_it_cannot() {
    let mut summaries = Vec::new();
    files(
        &results_dir(),
        &|p| p.file_name().is_some_and(|n| n == "summary.json"),
        &mut summaries,
    );
    let (mut rebuilt, mut marked) = (Vec::new(), Vec::new());
    for path in &summaries {
        let dir = path.parent().unwrap();
        let report = std::fs::read_to_string(dir.join("REPORT.md"))
            .unwrap_or_else(|e| panic!("{}: REPORT.md: {e}", dir.display()));
        let has_marker = report.lines().any(|l| l.starts_with(MARKER));
        let runs = dir.join("runs");
        let has_runs = runs.is_dir()
            && std::fs::read_dir(&runs).unwrap().any(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.ends_with(".json") || n.ends_with(".json.gz")
            });
        if !(has_runs && dir.join("experiment.json").is_file()) {
            assert!(
                has_marker,
                "{} has no run reports and its REPORT.md no `{MARKER}` line",
                dir.display()
            );
            marked.push(dir.to_path_buf());
            continue;
        }
        assert!(!has_marker, "{} rebuilds but is marked", dir.display());
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join(dir.file_name().unwrap());
        std::fs::create_dir_all(copy.join("runs")).unwrap();
        std::fs::copy(dir.join("experiment.json"), copy.join("experiment.json")).unwrap();
        for e in std::fs::read_dir(&runs).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, copy.join("runs").join(p.file_name().unwrap())).unwrap();
        }
        let got = avi_harness::summary::rebuild(&copy)
            .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(
            got == want,
            "{}: the summary rebuilt from its runs differs from the committed one",
            dir.display()
        );
        rebuilt.push(dir.to_path_buf());
    }
    // linear, generalization and the two GPU quick-saw folders at least.
    assert!(rebuilt.len() >= 4, "rebuilt {rebuilt:?}");
    assert!(!marked.is_empty());
}
