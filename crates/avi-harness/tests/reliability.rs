//! Nothing lost, nothing half-checked: the data-loss, locking, resume,
//! output and signal guarantees of `avi reproduce`, `avi report` and
//! `avi fit` through the real binary (one regression test per defect of
//! the fault-testing report, plus crash and concurrency tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::tiny_definition;

const AVI: &str = env!("CARGO_BIN_EXE_avi");

fn reproduce_cmd(def: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(AVI);
    c.args(["--threads", "1", "reproduce"])
        .arg(def)
        .args(["--device", "cpu", "--out"])
        .arg(out)
        .args(extra);
    c
}

fn reproduce(def: &Path, out: &Path, extra: &[&str]) -> Output {
    reproduce_cmd(def, out, extra).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(o));
}

/// Exit 2 with one line containing every needle.
fn refused(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A run report without what may differ between two runs of the same
/// config: wall-clock times and the host's provenance.
fn comparable(mut r: Value) -> Value {
    r["seconds"] = Value::Null;
    r["trace"]["seconds"] = Value::Null;
    if r.get("mse").is_some() {
        r["mse"]["seconds"] = Value::Null;
    }
    r
}

fn run_reports(exp_dir: &Path) -> BTreeMap<String, Value> {
    std::fs::read_dir(exp_dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                comparable(read(&p)),
            )
        })
        .collect()
}

/// Nothing a kill or an interrupt may leave behind: temporary files and
/// claims.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    snapshot(dir)
        .into_keys()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(".avi-tmp-") || name.starts_with(".tmp") || name.ends_with(".lock")
        })
        .collect()
}

/// Processes whose command line mentions `needle` (the test's own folder),
/// other than zombies.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if cmd.contains(needle) && !zombie {
            found.push(format!("{name}: {cmd}"));
        }
    }
    found
}

fn wait_until_gone(needle: &str) -> Vec<String> {
    let start = Instant::now();
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() || start.elapsed() > Duration::from_secs(20) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Defect 1: a second `avi reproduce` into a folder with finished runs is
/// refused (exit 2 naming --resume and --fresh) and changes nothing;
/// `--fresh` moves every earlier file aside, byte for byte, and starts
/// afresh.
#[test]
fn finished_runs_are_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let out = dir.path().join("out");
    ok(&reproduce(&def, &out, &["--quiet"]));
    let exp = out.join("tiny");
    let before = snapshot(&exp);
    assert_eq!(run_reports(&exp).len(), 9);
    for extra in [&["--quiet"][..], &["--quiet", "--quick"][..]] {
        let o = reproduce(&def, &out, extra);
        refused(&o, &["9 finished run report", "--resume", "--fresh"]);
        assert_eq!(snapshot(&exp), before, "{extra:?} changed the folder");
    }
    ok(&reproduce(&def, &out, &["--quiet", "--fresh"]));
    let previous: Vec<PathBuf> = std::fs::read_dir(&exp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("previous-")
        })
        .collect();
    assert_eq!(previous.len(), 1, "{previous:?}");
    assert_eq!(snapshot(&previous[0]), before);
    assert_eq!(run_reports(&exp).len(), 9);
    // Same configs, same seeds: the new runs equal the old ones.
    assert_eq!(run_reports(&exp), run_reports(&previous[0]));
    let o = reproduce(&def, &out, &["--quiet", "--fresh", "--resume"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// Defect 4: `--resume` keeps a stored run only when its config equals the
/// one it would run with: a quick run or another engine into a full
/// grid's folder is refused, naming the run and the differing field.
#[test]
fn resume_never_mixes_configs() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let out = dir.path().join("out");
    ok(&reproduce(&def, &out, &["--quiet", "--seeds", "1"]));
    let exp = out.join("tiny");
    let before = snapshot(&exp.join("runs"));
    let o = reproduce(&def, &out, &["--quiet", "--resume", "--quick"]);
    refused(&o, &["fvi-1954.json", "config.steps", "--fresh"]);
    let o = reproduce(&def, &out, &["--quiet", "--resume", "--engine", "fused"]);
    refused(&o, &["-1954.json", "config.engine"]);
    assert_eq!(snapshot(&exp.join("runs")), before);
    // The same options resume: the two missing seeds are added.
    ok(&reproduce(&def, &out, &["--quiet", "--resume"]));
    assert_eq!(run_reports(&exp).len(), 9);
}

/// Defect 3: claims. A run claimed by a live process is refused without
/// --resume and left to it with --resume (its claims then read "not
/// checked", never reproduced); a stale claim (its process is gone) is
/// refused without --resume and taken over with it. `avi report` on a grid
/// with a method's runs deleted says "not checked: N of M runs present"
/// and exits 4 unless --partial.
#[test]
fn claims_and_partial_grids() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let out = dir.path().join("out");
    let runs = out.join("tiny/runs");
    std::fs::create_dir_all(&runs).unwrap();
    // This test process is alive: its claim is live.
    let me = std::fs::read_to_string("/proc/self/stat").unwrap();
    let start: u64 = me[me.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let holder = |proc_start: u64| {
        serde_json::json!({"host": host, "pid": std::process::id(), "proc_start": proc_start, "since": 0})
            .to_string()
    };
    let lock = runs.join("const-1955.lock");
    std::fs::write(&lock, holder(start)).unwrap();
    let o = reproduce(&def, &out, &["--quiet"]);
    refused(
        &o,
        &["const-1955.json", "being run by another avi", "--resume"],
    );
    let o = reproduce(&def, &out, &["--quiet", "--resume"]);
    ok(&o);
    assert!(lock.is_file(), "a live claim was removed");
    assert!(!runs.join("const-1955.json").exists());
    let s = read(&out.join("tiny/summary.json"));
    let never = s["claims"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"].as_str().unwrap().starts_with("Const never"))
        .unwrap();
    assert_eq!(never["status"], "not checked", "{never}");
    assert_eq!(never["reproduced"], Value::Null);
    assert!(
        never["detail"]
            .as_str()
            .unwrap()
            .contains("2 of 3 runs present"),
        "{never}"
    );
    let md = std::fs::read_to_string(out.join("tiny/REPORT.md")).unwrap();
    // The claims table: the claim, then its verdict on every seed and on
    // the median, both not checked.
    let row = md
        .lines()
        .find(|l| l.starts_with("| Const never"))
        .unwrap_or_else(|| panic!("{md}"));
    assert_eq!(
        row.matches("**Not checked:** not checked: 2 of 3 runs present")
            .count(),
        2,
        "{row}"
    );
    // The same claim left by a process that is gone: stale.
    std::fs::write(&lock, holder(start + 1)).unwrap();
    let o = reproduce(&def, &out, &["--quiet", "--resume"]);
    ok(&o);
    assert!(!lock.exists());
    assert!(runs.join("const-1955.json").is_file());
    let s = read(&out.join("tiny/summary.json"));
    for c in s["claims"].as_array().unwrap() {
        assert_ne!(c["status"], "not checked", "{c}");
        assert!(c["reproduced"].is_boolean(), "{c}");
    }
    // A stale claim without --resume is refused (after --fresh there is
    // nothing finished, only the claim).
    let out2 = dir.path().join("out2");
    std::fs::create_dir_all(out2.join("tiny/runs")).unwrap();
    std::fs::write(out2.join("tiny/runs/fvi-1954.lock"), holder(start + 1)).unwrap();
    let o = reproduce(&def, &out2, &["--quiet"]);
    refused(&o, &["--resume"]);
    // Deleting a method's runs: `avi report` says not checked, exit 4.
    for seed in [1954, 1955] {
        std::fs::remove_file(runs.join(format!("const-{seed}.json"))).unwrap();
    }
    let o = Command::new(AVI).arg("report").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("const-1954.json"), "{}", stderr(&o));
    let s = read(&out.join("tiny/summary.json"));
    let never = s["claims"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"].as_str().unwrap().starts_with("Const never"))
        .unwrap();
    assert!(
        never["detail"]
            .as_str()
            .unwrap()
            .contains("1 of 3 runs present"),
        "{never}"
    );
    let o = Command::new(AVI)
        .arg("report")
        .arg(&out)
        .arg("--partial")
        .output()
        .unwrap();
    ok(&o);
}

/// A quick run that leaves out methods lists the definition's claims about
/// them as "not checked", with the reason.
#[test]
fn quick_runs_list_the_claims_they_do_not_check() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let mut d = read(&def);
    d["quick"]["methods"] = serde_json::json!(["fvi", "d=1"]);
    std::fs::write(&def, d.to_string()).unwrap();
    let out = dir.path().join("out");
    ok(&reproduce(&def, &out, &["--quiet", "--quick"]));
    let s = read(&out.join("tiny/summary.json"));
    let never = s["claims"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"].as_str().unwrap().starts_with("Const never"))
        .unwrap();
    assert_eq!(never["status"], "not checked");
    assert!(
        never["detail"]
            .as_str()
            .unwrap()
            .contains("leaves out const"),
        "{never}"
    );
}

/// Defect 10: `avi report` removes the temporary files a killed writer
/// left.
#[test]
fn report_removes_stale_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let out = dir.path().join("out");
    ok(&reproduce(&def, &out, &["--quiet", "--seeds", "1"]));
    // Left by writers that are gone (an hour old: a writer on another host
    // or of an older version cannot be asked whether it still runs).
    let old = std::time::SystemTime::now() - Duration::from_secs(7200);
    for p in [
        out.join("tiny/.avi-tmp-Xy12ab"),
        out.join("tiny/runs/.tmpAb12Cd"),
        out.join(".tmpZz99Zz"),
    ] {
        std::fs::write(&p, "{\"half").unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(old).unwrap();
    }
    ok(&Command::new(AVI).arg("report").arg(&out).output().unwrap());
    assert_eq!(leftovers(&out), Vec::<PathBuf>::new());
}

/// Crash test (defects 1, 3, 10, 11): `avi reproduce` with `--jobs 1` and
/// `--jobs 2` killed with SIGKILL at pseudo-random moments leaves no
/// truncated report and no orphan process (children exit when their
/// parent's pipe closes); `--resume` then completes a grid whose every
/// report equals the uninterrupted grid's (all fields but wall-clock
/// times), and no temporary file or claim is left.
#[test]
fn killed_grids_resume_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let reference = dir.path().join("reference");
    ok(&reproduce(&def, &reference, &["--quiet"]));
    let want = run_reports(&reference.join("tiny"));
    // Deterministic pseudo-random kill times in [0.3, 2.3) s.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        300 + state % 2000
    };
    for (k, jobs) in ["1", "2", "1", "2"].into_iter().enumerate() {
        let out = dir.path().join(format!("killed{k}"));
        let mut child: Child = reproduce_cmd(&def, &out, &["--quiet", "--jobs", jobs])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(next()));
        let _ = child.kill();
        let _ = child.wait();
        let needle = out.display().to_string();
        let left = wait_until_gone(&needle);
        assert!(left.is_empty(), "jobs {jobs}: orphans {left:?}");
        if out.join("tiny/runs").is_dir() {
            // Every report there is whole.
            for (name, r) in run_reports(&out.join("tiny")) {
                assert!(r["elbo"].is_number() || r["status"] == "diverged", "{name}");
            }
        }
        let o = reproduce(&def, &out, &["--quiet", "--resume", "--jobs", jobs]);
        ok(&o);
        assert_eq!(run_reports(&out.join("tiny")), want, "jobs {jobs}, try {k}");
        assert_eq!(leftovers(&out), Vec::<PathBuf>::new(), "jobs {jobs}");
    }
}

/// SIGINT: `avi reproduce` exits 130, releases its claims, leaves no
/// temporary file, and every report present is whole; `--resume` completes
/// the grid.
#[test]
fn interrupt_exits_130_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    // Runs long enough (1,500 steps each) to be interrupted mid-grid.
    let mut d = read(&def);
    d["steps"] = 1500.into();
    std::fs::write(&def, d.to_string()).unwrap();
    for jobs in ["1", "2"] {
        let out = dir.path().join(format!("int{jobs}"));
        let child = reproduce_cmd(&def, &out, &["--quiet", "--jobs", jobs])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Interrupt once the grid has started (its definition written: the
        // handler is installed by then; loading libtorch can take seconds
        // on a busy machine, and a signal before main is the default one).
        let started = Instant::now();
        while !out.join("tiny/experiment.json").is_file() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "jobs {jobs}: never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        let k = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(k.success());
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(130), "jobs {jobs}: {}", stderr(&o));
        assert_eq!(
            wait_until_gone(&out.display().to_string()),
            Vec::<String>::new()
        );
        assert_eq!(leftovers(&out), Vec::<PathBuf>::new(), "jobs {jobs}");
        let o = reproduce(&def, &out, &["--quiet", "--resume", "--jobs", jobs]);
        ok(&o);
        assert_eq!(run_reports(&out.join("tiny")).len(), 9);
    }
}

/// Concurrency: two `avi reproduce --resume` on one folder share the runs,
/// never fit one twice and never delete each other's; two plain ones: one
/// finishes the grid, the other is refused (exit 2) without touching it.
#[test]
fn two_processes_on_one_folder() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let out = dir.path().join("shared");
    let start = |extra: &[&str]| {
        reproduce_cmd(&def, &out, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(&["--resume"]), start(&["--resume"]));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    ok(&a);
    ok(&b);
    // Each process prints one line per run it fitted: no run twice.
    let mut fitted: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .into_owned()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|l| l.starts_with("tiny ") && l.contains(" seed "))
        .map(|l| l.split(':').next().unwrap().to_string())
        .collect();
    let total = fitted.len();
    fitted.sort();
    fitted.dedup();
    assert_eq!(fitted.len(), total, "a run was fitted twice: {fitted:?}");
    assert_eq!(total, 9, "{fitted:?}");
    assert_eq!(run_reports(&out.join("tiny")).len(), 9);
    assert_eq!(leftovers(&out), Vec::<PathBuf>::new());
    // Two plain runs on a fresh folder.
    let out = dir.path().join("plain");
    let start = || {
        reproduce_cmd(&def, &out, &["--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    let codes = [
        a.wait_with_output().unwrap().status.code(),
        b.wait_with_output().unwrap().status.code(),
    ];
    let mut sorted = codes;
    sorted.sort();
    assert_eq!(sorted, [Some(0), Some(2)], "{codes:?}");
    assert_eq!(run_reports(&out.join("tiny")).len(), 9);
    assert_eq!(leftovers(&out), Vec::<PathBuf>::new());
}

fn fit_config(dir: &Path, steps: u64) -> PathBuf {
    std::fs::write(dir.join("x.json"), r#"{"x": [0.5, -1.0, 2.0, 0.1, 0.3]}"#).unwrap();
    let cfg = dir.join("c.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"model": {{"kind": "linear", "tau": 1.155, "sigma": 2.43}},
                "data": {{"file": "x.json"}}, "method": {{"kind": "fvi"}},
                "steps": {steps}, "draws": 5, "eval_draws": 50}}"#
        ),
    )
    .unwrap();
    cfg
}

fn fit(dir: &Path, out: &str, extra: &[&str]) -> Output {
    Command::new(AVI)
        .args(["fit", "--config", "c.json", "--out", out, "--device", "cpu"])
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Defects 2 and 7: a report path that is an input (the config, its data
/// file, by any spelling) or that cannot be written is refused before the
/// fit (a fit of 10^7 steps would take minutes), and the inputs are unchanged.
#[test]
fn fit_refuses_outputs_that_are_inputs_or_unwritable() {
    let dir = tempfile::tempdir().unwrap();
    fit_config(dir.path(), 10_000_000);
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let before = snapshot(dir.path());
    let long = format!("{}.json", "r".repeat(300));
    for (out, needle) in [
        ("c.json", "is an input"),
        ("./sub/../c.json", "is an input"),
        ("x.json", "is an input"),
        ("sub", "is a folder"),
        ("sub/", "not a file path"),
        ("/", "not a file path"),
        ("x.json/r.json", "is a file, not a folder"),
        ("nowhere/r.json", "does not exist"),
        ("/proc/r.json", "cannot write in /proc"),
        (long.as_str(), "cannot write in"),
    ] {
        let o = fit(dir.path(), out, &[]);
        refused(&o, &[needle]);
        let o = fit(dir.path(), out, &["--check"]);
        refused(&o, &[needle]);
    }
    assert_eq!(snapshot(dir.path()), before);
}

/// `avi fit --check` validates and writes nothing; a valid config prints
/// its resolved form.
#[test]
fn check_mode_fits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fit_config(dir.path(), 10_000_000);
    let before = snapshot(dir.path());
    let o = fit(dir.path(), "r.json", &["--check"]);
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("\"steps\": 10000000") && text.contains("valid: 5 observations"),
        "{text}"
    );
    assert_eq!(snapshot(dir.path()), before);
}

/// `avi fit --check` of a simulated data set sizes it without drawing it
/// (10⁸ observations took 6–13 s to draw): it says so, writes nothing, and
/// still refuses what the fit would refuse (here N = 0).
#[test]
fn check_mode_does_not_draw_simulated_data() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |n: u64| {
        format!(
            r#"{{"model": {{"kind": "nonlinear"}}, "data": {{"simulate": {{"n": {n}, "seed": 1}}}},
                "method": {{"kind": "fvi"}}, "steps": 10, "engine": "fused"}}"#
        )
    };
    std::fs::write(dir.path().join("c.json"), cfg(100_000_000)).unwrap();
    let before = snapshot(dir.path());
    let o = fit(dir.path(), "r.json", &["--check"]);
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("valid: 100000000 observations (to be simulated)"),
        "{text}"
    );
    assert_eq!(snapshot(dir.path()), before);
    std::fs::write(dir.path().join("c.json"), cfg(0)).unwrap();
    let o = fit(dir.path(), "r.json", &["--check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("data.simulate.n"));
}

/// Defects 6 and 8: command-line errors are one line with the `avi:
/// error:` prefix and exit 2; the thread count is bounded by the cores.
#[test]
fn command_line_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    fit_config(dir.path(), 10);
    for args in [
        &[
            "fit", "--config", "c.json", "--out", "r.json", "--device", "gpu",
        ][..],
        &[
            "fit",
            "--config",
            "c.json",
            "--out",
            "r.json",
            "--threads",
            "abc",
        ][..],
        &["fit", "--out", "r.json"][..],
        &[
            "fit",
            "--config",
            "c.json",
            "--out",
            "r.json",
            "--threads",
            "1000",
        ][..],
        &[
            "fit",
            "--config",
            "c.json",
            "--out",
            "r.json",
            "--threads",
            "2147483647",
        ][..],
        &[
            "fit",
            "--config",
            "c.json",
            "--out",
            "r.json",
            "--threads",
            "0",
        ][..],
        &["nosuch"][..],
    ] {
        let o = Command::new(AVI)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("avi: error: "), "{args:?}: {err}");
    }
    assert!(!dir.path().join("r.json").exists());
    let o = Command::new(AVI).arg("--help").output().unwrap();
    ok(&o);
}

/// Defect 9: data that f32 cannot hold is named as an f32 overflow.
#[test]
fn f32_overflow_is_named() {
    let dir = tempfile::tempdir().unwrap();
    fit_config(dir.path(), 10);
    std::fs::write(dir.path().join("x.json"), r#"{"x": [1e150, 1]}"#).unwrap();
    let o = fit(dir.path(), "r.json", &[]);
    refused(&o, &["1e150", "overflows f32", "f64"]);
}

/// Defect 5 through the binary: sizes that used to panic, abort or
/// allocate for minutes are refused by `avi fit --check` (and the fit)
/// with one line naming the field, before anything is simulated.
#[test]
fn extreme_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let base = |model: &str, data: &str, method: &str, extra: &str| {
        format!(
            r#"{{"model": {model}, "data": {{"simulate": {data}}}, "method": {method}{extra}}}"#
        )
    };
    let linear = r#"{"kind": "linear", "tau": 1, "sigma": 1}"#;
    let fvi = r#"{"kind": "fvi"}"#;
    let small = r#"{"n": 100, "seed": 7}"#;
    for (cfg, needle) in [
        (
            base(linear, r#"{"n": 1000000000, "seed": 7}"#, fvi, ""),
            "GiB",
        ),
        (
            base(linear, r#"{"n": 4294967296, "seed": 7}"#, fvi, ""),
            "data",
        ),
        (base(linear, small, fvi, r#", "lr": 3e38"#), "lr"),
        (
            base(linear, small, fvi, r#", "steps": 4294967297"#),
            "steps",
        ),
        (
            base(linear, small, fvi, r#", "draws": 18446744073709551615"#),
            "draws",
        ),
        (
            base(linear, small, fvi, r#", "eval_draws": 4294967296"#),
            "eval_draws",
        ),
        (
            base(
                linear,
                small,
                r#"{"kind": "avi", "fn": {"kind": "mlp", "width": 8}, "window": [18446744073709551615, 1]}"#,
                "",
            ),
            "method.window",
        ),
        (
            base(
                linear,
                small,
                r#"{"kind": "fvi", "structure": "markov"}"#,
                "",
            ),
            "structure",
        ),
        (
            base(
                r#"{"kind": "mixture", "k": 18446744073709551615, "prior_sd": 1, "noise_sd": 1}"#,
                small,
                fvi,
                "",
            ),
            "k",
        ),
        (
            base(
                r#"{"kind": "bnn", "latent": 2, "hidden": 18446744073709551615}"#,
                r#"{"n": 5, "seed": 7, "dim": 5}"#,
                fvi,
                "",
            ),
            "hidden",
        ),
        (
            base(
                r#"{"kind": "bnn", "latent": 2, "hidden": 8}"#,
                r#"{"n": 5, "seed": 7, "dim": 5}"#,
                fvi,
                r#", "batch_size": 9223372036854775808"#,
            ),
            "batch_size",
        ),
    ] {
        std::fs::write(dir.path().join("c.json"), &cfg).unwrap();
        for extra in [&["--check"][..], &[][..]] {
            let o = fit(dir.path(), "r.json", extra);
            refused(&o, &[needle]);
        }
        assert!(!dir.path().join("r.json").exists());
    }
}

/// Defects 8 and 12 through the binary: a bad value inside `method` names
/// its inner field path; a fit without `--threads` runs one libtorch
/// thread and its report says so.
#[test]
fn inner_field_paths_and_the_default_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |method: &str| {
        format!(
            r#"{{"model": {{"kind": "linear", "tau": 1, "sigma": 1}}, "data": {{"simulate": {{"n": 20, "seed": 7}}}},
                "method": {method}, "steps": 20, "draws": 2, "eval_draws": 10}}"#
        )
    };
    for (method, path) in [
        (
            r#"{"kind": "avi", "fn": {"kind": "mlp", "width": "x"}}"#,
            "method.fn.width",
        ),
        (
            r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "window": [1]}"#,
            "method.window",
        ),
        (
            r#"{"kind": "avi", "fn": {"kind": "mlp", "width": 4, "activation": "tanh"}}"#,
            "method.fn.activation",
        ),
        (
            r#"{"kind": "avi", "fn": {"kind": "poly", "degree": 1}, "edges": "wrap"}"#,
            "method.edges",
        ),
        (r#"{"kind": "const", "x": 1}"#, "`x`"),
    ] {
        std::fs::write(dir.path().join("c.json"), cfg(method)).unwrap();
        refused(&fit(dir.path(), "r.json", &[]), &[path]);
    }
    std::fs::write(dir.path().join("c.json"), cfg(r#"{"kind": "fvi"}"#)).unwrap();
    ok(&fit(dir.path(), "r.json", &["--quiet"]));
    assert_eq!(read(&dir.path().join("r.json"))["threads"], 1);
    // `--threads` reaches the fit (the library's own default is 1 too: the
    // binary passes its choice on).
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        let o = Command::new(AVI)
            .args([
                "--threads",
                "2",
                "fit",
                "--config",
                "c.json",
                "--out",
                "r2.json",
            ])
            .args(["--device", "cpu", "--quiet"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        ok(&o);
        assert_eq!(read(&dir.path().join("r2.json"))["threads"], 2);
    }
}
