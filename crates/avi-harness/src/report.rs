//! The `avi fit` report (JSON) and atomic file writing.
//!
//! JSON has no NaN or infinity: every non-finite number is written as
//! `null`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use avi_inference::{Fit, FitStatus, GaussianSummary};
use serde_json::{json, Value};

use crate::config::FitConfig;

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

fn gaussian(s: &GaussianSummary) -> Value {
    // [D] for q(θ), [N, L] for q(z): N values when L = 1, else N rows of L.
    let width = if s.shape.len() == 2 { s.shape[1] } else { 1 };
    json!({ "mean": rows(&s.mean, width), "sd": rows(&s.sd, width) })
}

/// Exact reference quantities reported next to the fit (when the model has
/// a closed-form optimum).
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    /// The optimal mean-field ELBO.
    pub elbo: f64,
}

/// Build the report object of one fit.
pub fn fit_report(
    cfg: &FitConfig,
    n: usize,
    device: &str,
    fit: &Fit,
    reference: Option<Reference>,
) -> Value {
    let mut r = json!({
        "model": cfg.model,
        "method": cfg.method,
        "n": n,
        "device": device,
        "elbo": num(fit.elbo),
        "elbo_se": num(fit.elbo_se),
        "q_theta": fit.q_theta.as_ref().map(gaussian),
        "q_z": match &fit.q_z_probs {
            Some(p) => json!({ "probs": rows(p, p.len() / n.max(1)) }),
            None => gaussian(&fit.q_z),
        },
        "trace": {
            "iteration": fit.trace.iteration,
            "elbo": nums(&fit.trace.elbo),
            "seconds": nums(&fit.trace.seconds),
        },
        "iterations": fit.iterations,
        "seconds": num(fit.seconds),
        "num_parameters": fit.num_parameters,
        "config": cfg,
        "threads": tch::get_num_threads(),
        "status": "ok",
    });
    if !cfg.report_q_z {
        r["q_z"] = Value::Null;
    }
    if let Some(reference) = reference {
        r["reference"] = json!({
            "elbo": num(reference.elbo),
            "gap": num(reference.elbo - fit.elbo),
        });
    }
    if let FitStatus::Diverged { at } = fit.status {
        r["status"] = json!("diverged");
        r["diverged_at"] = json!(at);
    }
    r
}

/// The prefix of the temporary files of [`write_atomic`]; a file of this
/// name left by a killed process is removed by [`remove_stale_temp_files`].
pub const TEMP_PREFIX: &str = ".avi-tmp-";

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
        .prefix(TEMP_PREFIX)
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

/// Remove the temporary files that a killed process left in `dir` (its
/// own [`TEMP_PREFIX`] files and the `.tmpXXXXXX` files of older
/// versions); returns how many were removed. Not recursive.
pub fn remove_stale_temp_files(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let legacy = name.len() == 10
            && name.starts_with(".tmp")
            && name[4..].chars().all(|c| c.is_ascii_alphanumeric());
        if (name.starts_with(TEMP_PREFIX) || legacy) && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Write `value` as pretty JSON to `path` atomically ([`write_atomic`]).
/// The JSON is built in memory first: a report of a BNN run holds millions
/// of numbers, and writing them straight to the file costs a system call
/// each.
pub fn write_json_atomic(path: &Path, value: &Value) -> Result<()> {
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

    /// Temporary files of a killed writer (ours and the older `.tmpXXXXXX`
    /// ones) are removed; other files, including look-alikes, stay.
    #[test]
    fn stale_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            ".avi-tmp-abc123",
            ".tmpAb12Cd",
            "r.json",
            ".tmpnotatemp",
            "tmpAb12Cd",
        ] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        assert_eq!(remove_stale_temp_files(dir.path()).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".tmpnotatemp", "r.json", "tmpAb12Cd"]);
        assert_eq!(
            remove_stale_temp_files(&dir.path().join("none")).unwrap(),
            0
        );
    }
}
