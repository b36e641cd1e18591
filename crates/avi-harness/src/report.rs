//! Building the `avi fit` report ([`RunReport`]) and atomic file writing.
//!
//! JSON has no NaN or infinity: every non-finite number is written as
//! `null`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use avi_inference::{Fit, FitStatus, GaussianSummary};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::FitConfig;
use crate::run_report::{
    Gaussian, Provenance, QTheta, ReferenceSection, RunReport, RunStatus, Trace, TraceSection,
    Values, QZ,
};

/// A float as JSON, `null` when not finite.
pub fn num(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// A float slice as a JSON array (non-finite values become `null`).
pub fn nums(v: &[f64]) -> Value {
    Value::Array(v.iter().copied().map(num).collect())
}

/// A row-major array as JSON: flat when each row has one value, else an
/// array of rows of `width` values.
pub fn rows(v: &[f64], width: usize) -> Value {
    if width <= 1 {
        nums(v)
    } else {
        Value::Array(v.chunks(width).map(nums).collect())
    }
}

fn gaussian(s: &GaussianSummary) -> Gaussian {
    // [D] for q(θ), [N, L] for q(z): N values when L = 1, else N rows of L.
    let width = if s.shape.len() == 2 { s.shape[1] } else { 1 };
    Gaussian {
        mean: Values::from_rows(&s.mean, width),
        sd: Values::from_rows(&s.sd, width),
    }
}

/// Exact reference quantities reported next to the fit (when the model has
/// a closed-form optimum).
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    /// The optimal mean-field ELBO.
    pub elbo: f64,
}

/// A config part as JSON (as `json!` does: its types always serialise).
fn value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("configs serialise to JSON")
}

/// Build the report of one fit (its `provenance` names the engine that
/// ran, `auto` resolved).
pub fn fit_report(
    cfg: &FitConfig,
    n: usize,
    device: &str,
    fit: &Fit,
    reference: Option<Reference>,
) -> RunReport {
    let q_z = match &fit.q_z_probs {
        _ if !cfg.report_q_z => None,
        Some(p) => Some(QZ::Probs {
            probs: Values::from_rows(p, p.len() / n.max(1)),
        }),
        None => Some(QZ::Gaussian(gaussian(&fit.q_z))),
    };
    let (status, diverged_at, interrupted_at) = match fit.status {
        FitStatus::Ok => (RunStatus::Ok, None, None),
        FitStatus::Diverged { at } => (RunStatus::Diverged, Some(at), None),
        FitStatus::Interrupted { at } => (RunStatus::Interrupted, None, Some(at)),
    };
    let engine = value(&fit.engine);
    RunReport {
        batched_seeds: None,
        config: value(cfg),
        convergence: fit.convergence.clone(),
        device: device.to_string(),
        diagnosis: None,
        diverged_at,
        elbo: fit.elbo,
        elbo_se: fit.elbo_se,
        interrupted_at,
        heldout: None,
        iterations: fit.iterations,
        method: value(&cfg.method),
        model: value(&cfg.model),
        mse: None,
        n,
        num_parameters: fit.num_parameters,
        provenance: Some(Provenance::here(engine.as_str().unwrap_or("?"))),
        q_theta: fit.q_theta.as_ref().map(|q| QTheta::Gaussian(gaussian(q))),
        q_z,
        reference: reference.map(|r| ReferenceSection {
            elbo: r.elbo,
            exact_elbo: None,
            exact_gap: None,
            gap: r.elbo - fit.elbo,
        }),
        seconds: fit.seconds,
        semi: fit.semi.as_ref().map(value),
        status,
        stop_reason: fit.stop_reason.clone(),
        stopped_at: fit.stopped_at,
        threads: Some(tch::get_num_threads()),
        trace: Trace::Full(TraceSection {
            elbo: fit.trace.elbo.clone(),
            iteration: fit.trace.iteration.clone(),
            seconds: fit.trace.seconds.clone(),
            clock: Some(fit.trace.clock),
        }),
        warnings: fit.warnings.clone(),
    }
}

/// The prefix of the temporary files of [`write_atomic`], which are named
/// `.avi-tmp-PID-HOST-XXXXXX` (HOST: 8 hex digits of the host name's hash),
/// so that [`remove_stale_temp_files`] removes only those of processes that
/// are gone, never a file another process is writing.
pub const TEMP_PREFIX: &str = ".avi-tmp-";

/// Temporary files of another host, or of an unknown writer, are removed
/// only when they are at least this old (a write takes seconds at most).
const FOREIGN_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// 8 hex digits of the FNV-1a hash of this host's name.
fn host_tag() -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in crate::claim::host_name().bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// The prefix of this process's temporary files.
fn own_temp_prefix() -> String {
    format!("{TEMP_PREFIX}{}-{}-", std::process::id(), host_tag())
}

/// Held while a file is written and renamed: the interrupt handler takes it
/// before it exits, so that Ctrl-C never leaves a half-written temporary
/// file ([`exit_between_writes`]).
static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Write `bytes` to `path` atomically: a temporary file in the same folder
/// (named [`TEMP_PREFIX`]…) is written in one call, synced and renamed over
/// `path` (mode 0644 on Unix), so readers never see a half-written file.
/// Every output of the harness (reports, summaries, REPORT.md, figures)
/// goes through here.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let _writing = WRITING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut tmp = tempfile::Builder::new()
        .prefix(&own_temp_prefix())
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    // NamedTempFile is created private (0600); an output is an ordinary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Exit the process with `code` once no file is being written (the
/// interrupt handler's exit: every output is either complete or absent).
pub fn exit_between_writes(code: i32) -> ! {
    let _writing = WRITING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::process::exit(code)
}

/// Remove the temporary files that a killed process left in `dir`: those
/// of [`TEMP_PREFIX`] written on this host by a process that no longer runs,
/// and, once older than an hour, those of other hosts and the `.tmpXXXXXX`
/// files of older versions (a file another process is writing right now is
/// never removed). Returns how many were removed. Not recursive.
pub fn remove_stale_temp_files(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let here = host_tag();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let legacy = name.len() == 10
            && name.starts_with(".tmp")
            && name[4..].chars().all(|c| c.is_ascii_alphanumeric());
        let ours = name.strip_prefix(TEMP_PREFIX);
        if !(legacy || ours.is_some()) || !entry.file_type()?.is_file() {
            continue;
        }
        let writer = ours.and_then(|rest| {
            let mut parts = rest.splitn(3, '-');
            let pid: u32 = parts.next()?.parse().ok()?;
            let host = parts.next()?;
            Some((pid, host == here))
        });
        let stale = match writer {
            Some((pid, true)) => {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            }
            _ => entry
                .metadata()?
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age >= FOREIGN_TEMP_AGE),
        };
        if stale {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Write `value` (a [`Value`], a [`RunReport`], …) as pretty JSON to
/// `path` atomically ([`write_atomic`]); non-finite floats become `null`.
/// The JSON is built in memory first: a report of a BNN run holds millions
/// of numbers, and writing them straight to the file costs a system call
/// each.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_becomes_null() {
        assert_eq!(
            nums(&[1.0, f64::NAN, f64::INFINITY]),
            json!([1.0, null, null])
        );
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write_json_atomic(&p, &json!({"a": 1})).unwrap();
        write_json_atomic(&p, &json!({"a": 2})).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["a"], 2);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Temporary files of a killed writer on this host are removed; those of
    /// a live writer (this process), of other hosts and of older versions
    /// stay until they are an hour old; other files, including
    /// look-alikes, stay.
    #[test]
    fn stale_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let tag = host_tag();
        // pid 2^22 + 1 is above Linux's largest pid: no such process.
        let dead = format!(".avi-tmp-4194305-{tag}-abc123");
        let live = format!("{}abc123", own_temp_prefix());
        let foreign = ".avi-tmp-4194305-0badf00d-abc123".to_string();
        let names = [
            dead.as_str(),
            live.as_str(),
            foreign.as_str(),
            ".tmpAb12Cd",
            "r.json",
            ".tmpnotatemp",
            "tmpAb12Cd",
        ];
        for name in names {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let listing = || {
            let mut left: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            left
        };
        assert_eq!(remove_stale_temp_files(dir.path()).unwrap(), 1);
        let mut want: Vec<String> = names[1..].iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(listing(), want);
        // An hour later the foreign and legacy ones go too.
        let old = std::time::SystemTime::now() - FOREIGN_TEMP_AGE;
        for name in [foreign.as_str(), ".tmpAb12Cd", "r.json"] {
            let f = std::fs::File::options()
                .write(true)
                .open(dir.path().join(name))
                .unwrap();
            f.set_modified(old).unwrap();
        }
        assert_eq!(remove_stale_temp_files(dir.path()).unwrap(), 2);
        let mut want = vec![
            live.clone(),
            "r.json".into(),
            ".tmpnotatemp".into(),
            "tmpAb12Cd".into(),
        ];
        want.sort();
        assert_eq!(listing(), want);
        assert_eq!(
            remove_stale_temp_files(&dir.path().join("none")).unwrap(),
            0
        );
    }
}
