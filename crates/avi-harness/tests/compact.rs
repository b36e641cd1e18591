//! `avi compact DIR` through the real binary: a small grid's run reports
//! rewritten in compact form (`runs/*.json.gz`) rebuild the same
//! summary.json, byte for byte; `avi reproduce --resume` keeps them as
//! finished runs (nothing refitted, nothing rewritten); a folder with runs
//! claimed by a running grid, a second compaction, a missing folder and a
//! run stored in both forms are refused with exit 2 and one line.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use common::tiny_definition;

const AVI: &str = env!("CARGO_BIN_EXE_avi");

fn avi(args: &[&str], paths: &[&Path]) -> Output {
    let mut c = Command::new(AVI);
    c.args(["--threads", "1"]).args(args);
    for p in paths {
        c.arg(p);
    }
    c.output().unwrap()
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

/// Every file of `dir` by name, with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn compact_runs_rebuild_the_same_summary_and_resume_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    // 305 steps: each trace has 30 blocks and a raw tail of 5 entries.
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&def).unwrap()).unwrap();
    d["steps"] = 305.into();
    std::fs::write(&def, d.to_string()).unwrap();
    let out = dir.path().join("out");
    let reproduce = |extra: &[&str]| {
        let mut args = vec!["reproduce", def.to_str().unwrap()];
        args.extend(["--device", "cpu", "--quiet", "--jobs", "1", "--out"]);
        args.push(out.to_str().unwrap());
        args.extend(extra);
        avi(&args, &[])
    };
    ok(&reproduce(&[]));
    let exp = out.join("tiny");
    let runs = exp.join("runs");
    let full_summary = std::fs::read(exp.join("summary.json")).unwrap();
    let full = files(&runs);
    assert_eq!(full.len(), 9);
    assert!(full.keys().all(|n| n.ends_with(".json")));

    // A run claimed by a grid in progress (its lock file): refused,
    // nothing changed.
    let lock = runs.join("const-1954.lock");
    std::fs::write(&lock, "host 1 0").unwrap();
    refused(
        &avi(&["compact"], &[&exp]),
        &["claimed by a running grid", "const-1954.lock"],
    );
    std::fs::remove_file(&lock).unwrap();
    assert!(
        files(&runs) == full,
        "a refused compaction changed the runs"
    );

    ok(&avi(&["compact"], &[&exp]));
    let compact = files(&runs);
    let names: Vec<String> = full.keys().map(|n| format!("{n}.gz")).collect();
    assert_eq!(compact.keys().cloned().collect::<Vec<_>>(), names);
    let (before, after): (usize, usize) = (
        full.values().map(Vec::len).sum(),
        compact.values().map(Vec::len).sum(),
    );
    assert!(after * 4 < before, "{before} → {after} bytes");
    // The compact form keeps every field but the trace.
    let r = avi_harness::run_report::load(&runs.join("fvi-1954.json")).unwrap();
    assert_eq!((r.trace.len(), r.trace.blocks().tail.elbo.len()), (305, 5));
    assert!(r.trace.full().is_none());

    // The summary rebuilt from the compact runs is the full runs' one.
    ok(&avi(&["report"], &[&exp]));
    assert!(std::fs::read(exp.join("summary.json")).unwrap() == full_summary);

    // --resume keeps the compact runs as finished: nothing refitted or
    // rewritten, the same summary.
    ok(&reproduce(&["--resume"]));
    assert!(files(&runs) == compact, "the runs changed on --resume");
    assert!(std::fs::read(exp.join("summary.json")).unwrap() == full_summary);
    assert!(avi_harness::summary::missing_runs(&exp).unwrap().is_empty());

    // Refusals: nothing left to compact, no folder, a run in both forms.
    refused(&avi(&["compact"], &[&exp]), &["no full run report"]);
    refused(
        &avi(&["compact"], &[&dir.path().join("nowhere")]),
        &["nowhere"],
    );
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&compact["fvi-1954.json.gz"][..]),
        &mut text,
    )
    .unwrap();
    std::fs::write(runs.join("fvi-1954.json"), text).unwrap();
    refused(
        &avi(&["report"], &[&exp]),
        &["fvi-1954.json and", "fvi-1954.json.gz"],
    );
}
