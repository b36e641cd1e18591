//! `avi compact DIR`: rewrite an experiment folder's full run reports
//! (`runs/LABEL-SEED.json`) as compact ones (`runs/LABEL-SEED.json.gz`:
//! gzip-compressed, the trace as 10-step block means,
//! [`crate::run_report::BlockTrace`]), after checking that the folder's
//! summary is the same, as JSON, over the compact reports as over the full
//! ones. Nothing is changed when it is not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::report::write_atomic;
use crate::run_report::{compact_path, RunReport};

/// What [`compact`] did in one experiment folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// The experiment folder.
    pub dir: PathBuf,
    /// Full reports rewritten in compact form.
    pub runs: usize,
    /// Interrupted runs' reports, left full (`avi reproduce --resume` runs
    /// them again and writes a full report in their place).
    pub interrupted: usize,
    /// Bytes of the full reports rewritten.
    pub bytes_before: u64,
    /// Bytes of their compact forms.
    pub bytes_after: u64,
}

/// The experiment folders of `dir`: `dir` itself when it holds
/// `experiment.json`, else its subfolders that do.
fn experiment_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join("experiment.json").is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let p = e?.path();
        if p.join("experiment.json").is_file() {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        bail!(
            "{}: no experiment folder (with experiment.json) found",
            dir.display()
        );
    }
    Ok(out)
}

/// Compact every experiment folder of `dir` (`dir` itself, or its
/// subfolders holding `experiment.json`).
///
/// In each, every finished full report `runs/*.json` is converted in
/// memory; the summary `avi report` would write is built twice, from the
/// full reports and from the compact bytes about to be written (read back
/// through the reader every command uses), and the folder is refused,
/// unchanged, unless both are equal as JSON. Then each compact report is
/// written atomically (temporary file, fsync, rename) and its full report
/// removed. Interrupted runs stay full. Nothing else (summary, figures,
/// REPORT.md) is rewritten. A folder with no full report, or with runs
/// claimed by a running grid (lock files), is an error.
pub fn compact(dir: &Path) -> Result<Vec<Compacted>> {
    let folders = experiment_folders(dir)?;
    let mut out = Vec::new();
    for f in &folders {
        out.push(compact_folder(f)?);
    }
    Ok(out)
}

/// The names of `runs_dir`'s lock files (`*.lock`), sorted; none when the
/// folder does not exist.
fn lock_files(runs_dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if runs_dir.is_dir() {
        for e in std::fs::read_dir(runs_dir)
            .with_context(|| format!("cannot read {}", runs_dir.display()))?
        {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "lock") {
                out.push(
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    Ok(out)
}

fn compact_folder(dir: &Path) -> Result<Compacted> {
    let runs_dir = dir.join("runs");
    let mut full = Vec::new();
    if runs_dir.is_dir() {
        for e in std::fs::read_dir(&runs_dir)
            .with_context(|| format!("cannot read {}", runs_dir.display()))?
        {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") && p.is_file() {
                full.push(p);
            }
        }
    }
    full.sort();
    // A grid in progress claims its runs with lock files: its folder is
    // not compacted under it (compact a copy, or after the grid).
    let locks = lock_files(&runs_dir)?;
    if let Some(first) = locks.first() {
        bail!(
            "{}: {} run(s) are claimed by a running grid ({first}{}): compact after it has finished (`avi reproduce --resume` clears stale locks), or compact a copy",
            dir.display(),
            locks.len(),
            if locks.len() > 1 { ", …" } else { "" }
        );
    }
    if full.is_empty() {
        bail!(
            "{}: no full run report (runs/*.json) to compact",
            dir.display()
        );
    }
    let mut compacted: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    let mut interrupted = 0;
    let mut bytes_before = 0;
    for p in &full {
        let report = crate::run_report::load(p)?;
        if !report.finished() {
            interrupted += 1;
            continue;
        }
        bytes_before += std::fs::metadata(p)?.len();
        compacted.insert(p.clone(), report.compact_bytes()?);
    }
    if compacted.is_empty() {
        bail!(
            "{}: its full run reports are all of interrupted runs (left as they are)",
            dir.display()
        );
    }
    let before = crate::summary::summary_with(dir, &|p| crate::run_report::load(p))?;
    let after = crate::summary::summary_with(dir, &|p| match compacted.get(p) {
        Some(bytes) => RunReport::from_compact_bytes(bytes)
            .with_context(|| format!("the compact form of {}", p.display())),
        None => crate::run_report::load(p),
    })?;
    if before != after {
        bail!(
            "{}: its summary over the compact run reports differs from the one over the full reports: nothing was changed",
            dir.display()
        );
    }
    let mut bytes_after = 0;
    for (p, bytes) in &compacted {
        let gz = compact_path(p);
        write_atomic(&gz, bytes).with_context(|| format!("cannot write {}", gz.display()))?;
        std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
        bytes_after += bytes.len() as u64;
    }
    Ok(Compacted {
        dir: dir.to_path_buf(),
        runs: compacted.len(),
        interrupted,
        bytes_before,
        bytes_after,
    })
}
