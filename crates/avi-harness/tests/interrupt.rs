//! Stopping through the real binary. Ctrl-C (SIGINT): `avi fit` and
//! `avi reproduce --jobs 2` stop at the next block, write their reports
//! with status `interrupted` (whole: written atomically), exit 130, and an
//! interrupted run is never counted as finished. A config's stopping rule:
//! the report says where and why.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use avi_harness::run_report::{load, RunStatus};

mod common;
use common::tiny_definition;

const AVI: &str = env!("CARGO_BIN_EXE_avi");

/// Send SIGINT to `target` (a pid, or `-PGID` for a process group).
fn sigint(target: &str) {
    let k = Command::new("kill")
        .args(["-INT", "--", target])
        .status()
        .unwrap();
    assert!(k.success(), "kill -INT {target}");
}

/// Whether process `pid` catches SIGINT (its handler is installed: a
/// signal before that would kill it the default way).
fn catches_sigint(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (2 - 1)) != 0)
}

/// The pids of the `avi` children of `parent`.
fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// `avi fit` of 10⁶ steps of a 5-value linear problem, interrupted once it
/// reports progress: exit 130, one line naming the report, and the report
/// parses with status interrupted, fewer steps than asked and its trace
/// that long.
#[test]
fn fit_interrupted_writes_its_report_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("x.json"),
        r#"{"x": [0.5, -1.0, 2.0, 0.1, 0.3]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.json"),
        r#"{"model": {"kind": "linear", "tau": 1.155, "sigma": 2.43},
            "data": {"file": "x.json"}, "method": {"kind": "fvi"},
            "steps": 1000000, "draws": 5, "eval_draws": 50}"#,
    )
    .unwrap();
    let mut child = Command::new(AVI)
        .args(["fit", "--config", "c.json", "--out", "r.json"])
        .args(["--device", "cpu"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The first progress line ("step 100/1000000: …") comes after the
    // handlers are installed and the fit has started.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("step "), "{line}");
    sigint(&child.id().to_string());
    let started = Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted after step"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "no clean stop: {err}"
    );
    let report = load(&dir.path().join("r.json")).unwrap();
    assert_eq!(report.status, RunStatus::Interrupted);
    assert!(!report.finished());
    let at = report.interrupted_at.unwrap();
    assert!(at < 1_000_000 && at % 100 == 0, "{at}");
    assert_eq!(report.iterations, at);
    assert_eq!(report.trace.len(), at);
    assert!(report.elbo.is_finite());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".avi-tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Ctrl-C at a terminal signals the whole process group: `avi reproduce
/// --jobs 2` and its two children, each in the middle of a run of 10⁶
/// steps. The children write interrupted reports; the parent waits for
/// them, writes no summary and exits 130; those runs count as missing, and
/// `--resume` (here with the grid shortened to 300 steps) runs them again
/// and completes the grid.
#[test]
fn reproduce_jobs_interrupted_writes_interrupted_reports_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&def).unwrap()).unwrap();
    d["steps"] = 1_000_000.into();
    std::fs::write(&def, d.to_string()).unwrap();
    let out = dir.path().join("out");
    let reproduce = |extra: &[&str]| {
        let mut c = Command::new(AVI);
        c.args(["--threads", "1", "reproduce"])
            .arg(&def)
            .args(["--device", "cpu", "--quiet", "--jobs", "2", "--out"])
            .arg(&out)
            .args(extra);
        c
    };
    let child = reproduce(&[])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Both children started and catching SIGINT.
    let started = Instant::now();
    loop {
        let kids = children(pid);
        if kids.len() == 2 && kids.iter().all(|&k| catches_sigint(k)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "children never started: {kids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let their fits start (past the data and the engine set-up).
    std::thread::sleep(Duration::from_millis(1500));
    sigint(&format!("-{pid}"));
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    let exp = out.join("tiny");
    assert!(!exp.join("summary.json").exists());
    let mut interrupted = Vec::new();
    for e in std::fs::read_dir(exp.join("runs")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".lock") && !name.starts_with(".avi-tmp-"),
            "left behind: {name}"
        );
        let r = load(&p).unwrap();
        assert_eq!(r.status, RunStatus::Interrupted, "{name}");
        assert!(r.iterations < 1_000_000, "{name}");
        assert!(!avi_harness::run_report::is_finished(&p));
        interrupted.push(name);
    }
    assert_eq!(interrupted.len(), 2, "{interrupted:?}: {err}");
    let missing = avi_harness::summary::missing_runs(&exp).unwrap();
    for name in &interrupted {
        assert!(missing.contains(name), "{name} not missing: {missing:?}");
    }
    // A plain run is refused, naming the interrupted runs.
    let o = reproduce(&[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("0 finished run report(s) and 2 interrupted one(s)"),
        "{err}"
    );
    // Resume (a shorter grid: the interrupted runs are not checked against
    // a config, they are run again).
    d["steps"] = 300.into();
    std::fs::write(&def, d.to_string()).unwrap();
    let o = reproduce(&["--resume"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(exp.join("summary.json").is_file());
    assert!(avi_harness::summary::missing_runs(&exp).unwrap().is_empty());
    for name in &interrupted {
        let r = load(&exp.join("runs").join(name)).unwrap();
        assert_eq!((r.status, r.iterations), (RunStatus::Ok, 300), "{name}");
    }
}

/// A config's `"stop": {}` (the default rule) through `avi fit`: the
/// report says where and why the fit stopped, and that it converged; a bad
/// rule is one line naming its field, exit 2; without `stop` the report
/// has no stop fields and its config no `stop` key (reports unchanged).
#[test]
fn fit_with_a_stop_rule_reports_where_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, stop: &str| {
        std::fs::write(
            dir.path().join(name),
            format!(
                r#"{{"model": {{"kind": "linear", "tau": 1.155, "sigma": 2.43}},
                    "data": {{"simulate": {{"n": 200, "seed": 3}}}}, "method": {{"kind": "fvi"}},
                    "steps": 4000, "lr": 0.03, "draws": 20, "eval_draws": 200{stop}}}"#
            ),
        )
        .unwrap();
    };
    write("stop.json", r#", "stop": {}"#);
    write("bad.json", r#", "stop": {"window": 1}"#);
    write("plain.json", "");
    let fit = |cfg: &str, out: &str| {
        Command::new(AVI)
            .args([
                "fit", "--config", cfg, "--out", out, "--device", "cpu", "--quiet",
            ])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let o = fit("stop.json", "stop-r.json");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = load(&dir.path().join("stop-r.json")).unwrap();
    let s = r.stopped_at.expect("the rule stopped the fit");
    assert!(s < 4000 && s % 300 == 0, "{s}");
    assert_eq!((r.iterations, r.trace.len()), (s, s));
    assert!(r.stop_reason.unwrap().contains("windows of 300 steps"));
    assert!(r.convergence.unwrap().converged);
    assert_eq!(r.config["stop"]["window"], 300);
    let o = fit("bad.json", "bad-r.json");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("stop.window"), "{err}");
    assert!(!dir.path().join("bad-r.json").exists());
    let o = fit("plain.json", "plain-r.json");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(dir.path().join("plain-r.json")).unwrap();
    assert!(!text.contains("\"stop"), "{}", &text[..text.len().min(400)]);
    let r = load(&dir.path().join("plain-r.json")).unwrap();
    assert_eq!((r.stopped_at, r.iterations), (None, 4000));
}
