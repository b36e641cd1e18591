//! Summaries, figures and `REPORT.md` rebuilt from stored runs (`avi report
//! DIR`, and the end of every `avi reproduce`).
//!
//! Everything here reads `DIR/EXPERIMENT/experiment.json` and the run
//! reports in `runs/` (full or compact: every trace metric is computed on
//! its 10-step blocks, [`crate::run_report::BlockTrace`], so both forms
//! give the same summary); nothing is refitted. Per run: the final ELBO
//! (mean of the last `2 · final_window` step estimates, digest §4.1.1,
//! [`BlockTrace::final_window`](crate::run_report::BlockTrace::final_window)), the ELBO
//! from many fresh draws, the gap to the exact reference where one exists,
//! and the iterations and wall time to convergence. The convergence target
//! is, in order: the closed-form optimal ELBO (linear, saw, Gaussian HMM),
//! `log p(x | θ)` (mixture with θ fixed), the mean-field CAVI optimum
//! (discrete HMM with θ fixed), else the final-window ELBO of the F-VI run
//! with the same seed and model (the authors' oracle). The metric is the
//! paper's windowed one with the NaN bug fixed: a non-finite window never
//! counts and a diverged run never converges. For the BNN a run converges
//! when its training MSE first falls below the experiment's threshold.

mod claims;
mod generalization;
mod markdown;
mod optimum;
mod plots;
mod runs;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use avi_inference::MethodConfig;
use serde_json::{json, Value};

use crate::config::FitConfig;
use crate::experiment::{file_stem, load_experiment_file, Experiment};
use crate::report::{num, write_json_atomic};
use crate::run::prepare;
use crate::run_report::RunReport;

use claims::*;
use markdown::*;
use optimum::fvi_shortfalls;
use plots::*;
use runs::*;
/// The exact (or best available) F-VI reference ELBO of a run's model and
/// data, with its name.
fn reference(cfg: &FitConfig) -> Result<Option<(f64, &'static str)>> {
    let prepared = prepare(cfg, Path::new("."))?;
    let (x, fixed) = (&prepared.x.values, cfg.model.fixed_theta());
    let model = prepared.model.model();
    if let Some(r) = model.reference_elbo(x, fixed)? {
        return Ok(Some((r.elbo, r.what)));
    }
    if let Some(r) = model.iterated_reference(x, fixed)? {
        return Ok(Some((r.elbo, r.what)));
    }
    Ok(None)
}

/// Rebuild `summary.json`, the figures and `REPORT.md` of one experiment
/// folder from its stored runs; returns the summary.
pub fn rebuild(dir: &Path) -> Result<Value> {
    let exp = load_experiment_file(&dir.join("experiment.json"))?;
    let runs = load_runs(dir, &exp)?;
    let summary = summarize(&exp, &runs)?;
    write_json_atomic(&dir.join("summary.json"), &summary)?;
    draw_figures(dir, &exp, &runs, &summary)?;
    write_atomic(&dir.join("REPORT.md"), &report_markdown(&exp, &summary))?;
    Ok(summary)
}

/// The summary `avi report` would write for the experiment folder `dir`,
/// each run report read by `read` from where it is stored (nothing is
/// written). `avi compact` compares it over the full and the compact
/// reports.
pub fn summary_with(dir: &Path, read: &dyn Fn(&Path) -> Result<RunReport>) -> Result<Value> {
    let exp = load_experiment_file(&dir.join("experiment.json"))?;
    let runs = load_runs_with(dir, &exp, read)?;
    summarize(&exp, &runs)
}

/// The summary of an experiment's runs.
fn summarize(exp: &Experiment, runs: &[Run]) -> Result<Value> {
    // References per distinct model and data.
    let mut references: BTreeMap<String, Option<(f64, &'static str)>> = BTreeMap::new();
    let key_of = |m: &crate::experiment::MethodEntry| {
        serde_json::to_string(&(
            m.model.as_ref().unwrap_or(&exp.model),
            m.data.as_ref().unwrap_or(&exp.data),
        ))
        .unwrap_or_default()
    };
    for m in &exp.methods {
        let key = key_of(m);
        if let std::collections::btree_map::Entry::Vacant(e) = references.entry(key) {
            let cfg = crate::experiment::run_config(exp, m, exp.seeds[0]);
            e.insert(reference(&cfg)?);
        }
    }
    // F-VI's final window per (model and data, seed): the target without an
    // exact reference.
    let mut fvi_final: BTreeMap<(String, u64), f64> = BTreeMap::new();
    // F-VI's ELBO (fresh draws) per (model and data, seed): the reference
    // of the training gap beside the held-out gap without an exact one.
    let mut fvi_elbo: BTreeMap<(String, u64), f64> = BTreeMap::new();
    for r in runs {
        let m = exp
            .methods
            .iter()
            .find(|m| m.label == r.label)
            .context("run of an unknown method")?;
        if matches!(m.method, MethodConfig::Fvi) && r.ok() {
            fvi_final.insert((key_of(m), r.seed), r.blocks.final_window(exp.final_window));
            fvi_elbo.insert((key_of(m), r.seed), r.report.elbo);
        }
    }
    let mut rows = Vec::new();
    let mut devices = std::collections::BTreeSet::new();
    for m in &exp.methods {
        let key = key_of(m);
        let exact = references[&key];
        let mut per_seed = Vec::new();
        for r in runs.iter().filter(|r| r.label == m.label) {
            devices.insert(r.report.device.clone());
            let ok = r.ok();
            let fin = r.blocks.final_window(exp.final_window);
            let elbo = r.report.elbo;
            let target = exact
                .map(|e| e.0)
                .or_else(|| fvi_final.get(&(key.clone(), r.seed)).copied());
            let (conv, mse) = match &exp.mse {
                Some(crit) => {
                    let mse = r.mse()?;
                    let (train, iters, secs) = (&mse.train, &mse.iteration, &mse.seconds);
                    let test = test_mse(mse);
                    let at = train
                        .iter()
                        .position(|v| v.is_finite() && *v < crit.threshold);
                    let conv = at.filter(|_| ok).map(|i| (iters[i] as f64, secs[i]));
                    (
                        conv,
                        json!({
                            "final_train": train.last().copied().map(num),
                            "final_test": test.last().copied().map(num),
                            "first_train": train.first().copied().map(num),
                        }),
                    )
                }
                None => {
                    let conv = match (target, ok) {
                        (Some(t), true) => r.blocks.first_within(t, exp.rel_tol),
                        _ => None,
                    };
                    let conv = conv.map(|c| (c as f64, r.blocks.seconds_at(c).unwrap_or(f64::NAN)));
                    (conv, Value::Null)
                }
            };
            let run_seconds = r.report.seconds;
            let iterations = r.report.iterations as f64;
            let held =
                (exp.heldout.is_some() && !matches!(m.method, MethodConfig::Fvi)).then(|| {
                    let training_gap = exact
                        .map(|e| e.0)
                        .or_else(|| fvi_elbo.get(&(key.clone(), r.seed)).copied())
                        .map(|f| f - elbo)
                        .filter(|g| g.is_finite());
                    generalization::seed_entry(r.report.heldout.as_ref(), training_gap)
                });
            per_seed.push(json!({
                "seed": r.seed,
                "final_elbo": num(fin),
                "elbo": num(elbo),
                "elbo_se": num(r.report.elbo_se),
                "gap": exact.map(|e| num(e.0 - elbo)),
                "target": target.map(num),
                "iterations_to_converge": conv.map(|c| c.0),
                "seconds_to_converge": conv.map(|c| num(c.1)),
                "seconds": num(run_seconds),
                "ms_per_iteration": num(1e3 * run_seconds / iterations.max(1.0)),
                "status": r.report.effective_status().as_str(),
                "mse": mse,
                "diagnosis": serde_json::to_value(&r.report.diagnosis)?,
                // The full form's name whichever form is stored, so that
                // compacting the runs leaves the summary as it was.
                "run": format!("runs/{}-{}.json", file_stem(&m.label), r.seed),
            }));
            if let Some(h) = held {
                if let Some(last) = per_seed.last_mut() {
                    last["generalization"] = h;
                }
            }
        }
        let get = |k: &str| -> Vec<f64> {
            per_seed
                .iter()
                .map(|r| r[k].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let opt =
            |k: &str| -> Vec<Option<f64>> { per_seed.iter().map(|r| r[k].as_f64()).collect() };
        let iters = opt("iterations_to_converge");
        let secs = opt("seconds_to_converge");
        let sub = |k: &str, f: &str| -> Vec<f64> {
            per_seed
                .iter()
                .map(|r| r[k][f].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let held = (exp.heldout.is_some() && !matches!(m.method, MethodConfig::Fvi))
            .then(|| generalization::row_entry(&per_seed));
        rows.push(json!({
            "label": m.label,
            "group": m.group,
            "method": m.method,
            "lr": m.lr,
            "window": window_of(&m.method),
            "width": width_of(&m.method),
            "reference_elbo": exact.map(|e| num(e.0)),
            "reference": exact.map(|e| e.1),
            "converged": iters.iter().filter(|i| i.is_some()).count(),
            "runs": per_seed.len(),
            "diverged": per_seed.iter().filter(|r| r["status"] != "ok").count(),
            "final_elbo": stats(&get("final_elbo")),
            "elbo": stats(&get("elbo")),
            "gap": if exact.is_some() { stats(&get("gap")) } else { Value::Null },
            "iterations_to_converge": {
                "median": median_never(&iters),
                "converged": stats(&iters.iter().flatten().copied().collect::<Vec<_>>()),
            },
            "seconds_to_converge": {
                "median": median_never(&secs),
                "converged": stats(&secs.iter().flatten().copied().collect::<Vec<_>>()),
            },
            "ms_per_iteration": stats(&get("ms_per_iteration")),
            "mse": if exp.mse.is_some() {
                json!({ "final_train": stats(&sub("mse", "final_train")), "final_test": stats(&sub("mse", "final_test")) })
            } else { Value::Null },
            "diagnosis_gain": stats(&sub("diagnosis", "gain")),
            "seeds": per_seed,
        }));
        if let (Some(h), Some(last)) = (held, rows.last_mut()) {
            last["generalization"] = h;
        }
    }
    if exp.figures.fig8 {
        add_window_bounds(exp, &mut rows)?;
    }
    let mut claims: Vec<Value> = exp
        .claims
        .iter()
        .map(|c| decide_claim(c, &rows, exp.seeds.len()))
        .collect();
    claims.extend(exp.unchecked.iter().map(|u| {
        let detail = format!("not checked: {}", u.why);
        let mut v = json!({
            "text": u.claim.text(),
            "reproduced": null,
            "status": "not checked",
            "median": { "reproduced": null, "detail": detail },
            "detail": detail,
        });
        add_paper_verdicts(&mut v, &u.claim);
        v
    }));
    let single_reference = {
        let distinct: Vec<_> = references.values().collect();
        match distinct.as_slice() {
            [Some((e, name))] => Some((*e, *name)),
            _ => None,
        }
    };
    Ok(json!({
        "experiment": exp.name,
        "description": exp.description,
        "quick": exp.quick_run,
        "device": devices.into_iter().collect::<Vec<_>>().join(", "),
        "steps": exp.steps,
        "draws": exp.draws,
        "seeds": exp.seeds,
        "rel_tol": exp.rel_tol,
        "target": match (&exp.mse, single_reference) {
            (Some(m), _) => format!("training reconstruction MSE below {}", m.threshold),
            (None, Some((_, name))) => name.to_string(),
            (None, None) if references.values().all(Option::is_some) => "each method's exact reference (see `reference`)".to_string(),
            _ => "final-window ELBO of the F-VI run with the same seed".to_string(),
        },
        "optimal_elbo": single_reference.map(|r| num(r.0)),
        "fvi_not_at_optimum": fvi_shortfalls(&rows),
        "methods": rows,
        "claims": claims,
    }))
}

/// For the HMM counterexample: the exact gap of the best possible inference
/// function on each A-VI method's window (indices with identical windows
/// must share a factor; [`avi_models::GaussianHmm::tied_optimum_elbo`]).
fn add_window_bounds(exp: &Experiment, rows: &mut [Value]) -> Result<()> {
    let cfg = crate::experiment::run_config(exp, &exp.methods[0], exp.seeds[0]);
    let prepared = prepare(&cfg, Path::new("."))?;
    let (Some(m), Some(&[theta]), Some(r)) = (
        prepared.model.downcast_ref::<avi_models::GaussianHmm>(),
        cfg.model.fixed_theta(),
        &prepared.reference,
    ) else {
        bail!("fig8 needs a gaussian_hmm with one fixed θ");
    };
    for (row, method) in rows.iter_mut().zip(&exp.methods) {
        if let MethodConfig::Avi { window, .. } = &method.method {
            let groups = avi_models::gaussian_hmm::window_groups(&prepared.x.values, *window, 0.0);
            let best = m.tied_optimum_elbo(&prepared.x.values, theta, &groups)?;
            row["best_window_gap"] = num(r.elbo - best);
        }
    }
    Ok(())
}

/// The run reports an experiment folder's definition asks for that are
/// not there, or only as an interrupted run (`runs/LABEL-SEED.json`
/// names).
pub fn missing_runs(dir: &Path) -> Result<Vec<String>> {
    let exp = load_experiment_file(&dir.join("experiment.json"))?;
    Ok(crate::experiment::plan(&exp)
        .into_iter()
        .map(|r| r.file)
        .filter(|f| !crate::run_report::is_finished(&dir.join("runs").join(f)))
        .collect())
}

/// `avi report DIR [--seeds K]`: rebuild every experiment folder under
/// `dir` (or `dir` itself when it holds `experiment.json`) and write
/// `dir/REPORT.md` gathering them. With `seeds`, each folder's
/// `experiment.json` is first rewritten to list only its first `seeds`
/// seeds (all folders are checked before any is rewritten), so that a grid
/// stopped part-way is reported on the seeds it finished, and a later
/// `avi report` or `avi reproduce --resume --seeds N` starts from what the
/// folder says. Returns the folders rebuilt.
pub fn report_all(dir: &Path, seeds: Option<usize>) -> Result<Vec<PathBuf>> {
    let mut folders = Vec::new();
    if dir.join("experiment.json").is_file() {
        folders.push(dir.to_path_buf());
    } else {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for e in entries {
            let p = e?.path();
            if p.join("experiment.json").is_file() {
                folders.push(p);
            }
        }
        folders.sort_by_key(|p| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            (
                crate::experiment::EXPERIMENTS
                    .iter()
                    .position(|e| *e == name)
                    .unwrap_or(99),
                name,
            )
        });
    }
    if folders.is_empty() {
        bail!(
            "{}: no experiment folder (with experiment.json) found",
            dir.display()
        );
    }
    if let Some(k) = seeds {
        let mut kept = Vec::new();
        for f in &folders {
            let path = f.join("experiment.json");
            let mut exp = load_experiment_file(&path)?;
            if k == 0 || k > exp.seeds.len() {
                bail!(
                    "--seeds {k}: {} lists {} seeds",
                    path.display(),
                    exp.seeds.len()
                );
            }
            exp.seeds.truncate(k);
            kept.push((path, exp));
        }
        for (path, exp) in kept {
            write_json_atomic(&path, &serde_json::to_value(&exp)?)?;
        }
    }
    for f in &folders {
        for d in [f.clone(), f.join("runs"), f.join("configs")] {
            crate::report::remove_stale_temp_files(&d)
                .with_context(|| format!("cannot clean {}", d.display()))?;
        }
    }
    if !dir.join("experiment.json").is_file() {
        crate::report::remove_stale_temp_files(dir)
            .with_context(|| format!("cannot clean {}", dir.display()))?;
    }
    let mut index = String::from("# avi reproduction report\n\nRebuilt by `avi report` from the stored runs; each experiment's own REPORT.md has its figures.\n");
    for f in &folders {
        rebuild(f)?;
        if f != dir {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("?");
            let text = std::fs::read_to_string(f.join("REPORT.md"))?;
            // Links into the experiment's folder; headings one level down.
            let text = text
                .replace("](fig", &format!("]({name}/fig"))
                .replace("](gap", &format!("]({name}/gap"))
                .replace("\n## ", "\n### ");
            let text = text
                .strip_prefix("# ")
                .map(|t| format!("## {t}"))
                .unwrap_or(text);
            let _ = write!(index, "\n{text}");
        }
    }
    if folders.len() > 1 || folders[0] != dir {
        write_atomic(&dir.join("REPORT.md"), &index)?;
    }
    Ok(folders)
}

#[cfg(test)]
mod tests {
    use super::markdown::cell_range;
    use super::runs::fmt;
    use crate::run_report::{RunReport, RunStatus};
    use serde_json::json;

    /// A finished run without a final ELBO (written by older binaries) reads
    /// as diverged; finished and diverged runs keep their status. A report
    /// without a status or an ELBO no longer loads (it named no status
    /// before reports were typed).
    #[test]
    fn a_run_without_a_final_elbo_reads_as_diverged() {
        let report = |status: Option<&str>, elbo: Option<Option<f64>>| {
            let mut r = json!({
                "config": {}, "device": "cpu", "elbo_se": 0.1, "iterations": 1,
                "method": {}, "model": {}, "n": 1, "num_parameters": 1,
                "q_theta": null, "q_z": null, "seconds": 1.0,
                "trace": {"iteration": [], "elbo": [], "seconds": []},
            });
            if let Some(s) = status {
                r["status"] = json!(s);
            }
            if let Some(e) = elbo {
                r["elbo"] = json!(e);
            }
            RunReport::from_json(&r.to_string()).map(|r| r.effective_status())
        };
        assert_eq!(report(Some("ok"), Some(Some(-5.0))).unwrap(), RunStatus::Ok);
        assert_eq!(report(Some("ok"), Some(None)).unwrap(), RunStatus::Diverged);
        assert!(report(Some("ok"), None).is_err());
        assert_eq!(
            report(Some("diverged"), Some(Some(-5.0))).unwrap(),
            RunStatus::Diverged
        );
        assert!(report(None, Some(Some(-5.0))).is_err());
    }

    /// Ordinary values keep their decimals; diverged ones are written in
    /// scientific notation (in the median-and-range cells too); missing ones
    /// are `n/a`.
    #[test]
    fn report_numbers_stay_short() {
        let diverged = json!({"median": 5.4e39, "min": 23728.94, "max": 1.08e40});
        assert_eq!(
            cell_range(&diverged, 1, false),
            "5.400e39 (23728.9–1.080e40)"
        );
        let elbo = json!({"median": -23728.94, "min": -23729.1, "max": -23728.9});
        assert_eq!(cell_range(&elbo, 1, true), "23728.9 (23728.9–23729.1)");
        assert_eq!(fmt(Some(23728.94), 1), "23728.9");
        assert_eq!(fmt(Some(-999_999_999.0), 0), "-999999999");
        assert_eq!(fmt(Some(5.401_217_9e39), 1), "5.401e39");
        assert_eq!(fmt(Some(-1.2e9), 2), "-1.200e9");
        assert_eq!(fmt(None, 1), "n/a");
    }
    // The claim checker, from small hand-made summary rows (the keys
    // `summarize` writes). Every boundary is tested on both sides with
    // dyadic values (0.25, 0.5, 1.5, 2.0 …) that f64 holds exactly, so the
    // comparisons at a bound are exact (tolerance zero, on purpose: the
    // tests pin whether the bound itself passes), and "just beyond" is the
    // next f64 (one ulp), the smallest possible violation. The semantics:
    //
    // - Converge: converged > 0 and converged ≥ ⌈min_fraction · runs⌉
    //   (default fraction 1: all runs); Never: converged = 0.
    // - Faster: median iterations strictly below (<) the reference's; equal
    //   fails; a reference that never converges in median counts as +∞, a
    //   method that never converges in median fails.
    // - GapBelow: largest gap ≤ max (inclusive).
    // - GapAbove: smallest gap ≥ min, or ≥ than's largest gap + min
    //   (inclusive).
    // - MseRatio: median final training MSE / than's ≤ max and ≥ min
    //   (both inclusive).
    // - WindowBound: every best-window gap > 0 (strict) and each one
    //   strictly below (<) the one before.
    // - GapShrinks: each step rises by at most slack (≤, inclusive) and the
    //   last median gap is strictly below (<) the first.
    // - decide_claim: "not checked" when the named methods hold fewer runs
    //   than labels × seeds.
    // - The median verdict (`median`, check_claim_median): Converge / Never
    //   on the median iterations to converge (finite: the median run
    //   converges), GapBelow / GapAbove on the median gaps; the checks that
    //   already compare medians or exact values give the per-seed verdict.

    use super::claims::{check_claim, decide_claim};
    use crate::experiment::Claim;
    use serde_json::Value;

    /// The next f64 above a positive `x` (one ulp beyond).
    fn above(x: f64) -> f64 {
        assert!(x > 0.0);
        f64::from_bits(x.to_bits() + 1)
    }

    /// The next f64 below a positive `x`.
    fn below(x: f64) -> f64 {
        assert!(x > 0.0);
        f64::from_bits(x.to_bits() - 1)
    }

    fn names(labels: &[&str]) -> Vec<String> {
        labels.iter().map(|l| l.to_string()).collect()
    }

    /// A row as `summarize` writes it, for the convergence claims: `median`
    /// is the median iterations to converge (`None`: never, in median).
    fn conv_row(label: &str, converged: u64, runs: u64, median: Option<f64>) -> Value {
        json!({
            "label": label,
            "converged": converged,
            "runs": runs,
            "iterations_to_converge": { "median": median },
        })
    }

    /// A row with gap statistics (3 runs).
    fn gap_row(label: &str, min: f64, median: f64, max: f64) -> Value {
        json!({
            "label": label,
            "runs": 3,
            "gap": { "min": min, "median": median, "max": max },
        })
    }

    /// A row of a method without an exact reference: `summarize` writes
    /// `"gap": null`.
    fn no_gap_row(label: &str) -> Value {
        json!({ "label": label, "runs": 3, "gap": null })
    }

    fn mse_row(label: &str, median: f64) -> Value {
        json!({
            "label": label,
            "runs": 3,
            "mse": { "final_train": { "median": median, "min": median, "max": median } },
        })
    }

    fn window_row(label: &str, best: Option<f64>) -> Value {
        let mut r = json!({ "label": label, "runs": 3 });
        if let Some(b) = best {
            r["best_window_gap"] = json!(b);
        }
        r
    }

    /// `(reproduced, detail)` of a claim checked on `rows`.
    fn check(claim: &Claim, rows: &[Value]) -> (Option<bool>, String) {
        let v = check_claim(claim, rows);
        assert_eq!(v["text"], claim.text());
        (
            v["reproduced"].as_bool(),
            v["detail"].as_str().expect("detail").to_string(),
        )
    }

    /// Asserts the claim fails and its detail names `offender`.
    fn fails_naming(claim: &Claim, rows: &[Value], offender: &str) {
        let (ok, detail) = check(claim, rows);
        assert_eq!(ok, Some(false), "should fail: {detail}");
        assert!(
            detail.contains(offender),
            "detail should name {offender:?}: {detail}"
        );
    }

    fn passes(claim: &Claim, rows: &[Value]) {
        let (ok, detail) = check(claim, rows);
        assert_eq!(ok, Some(true), "should pass: {detail}");
    }

    fn converge(labels: &[&str], min_fraction: Option<f64>) -> Claim {
        Claim::Converge {
            text: "they converge".into(),
            paper_verdicts: None,
            labels: names(labels),
            min_fraction,
        }
    }

    /// Converge: all runs by default; with a fraction, at least
    /// ⌈fraction · runs⌉ and never zero.
    #[test]
    fn converge_needs_every_run_or_the_stated_fraction() {
        let all = converge(&["a", "b"], None);
        passes(
            &all,
            &[
                conv_row("a", 3, 3, Some(10.0)),
                conv_row("b", 3, 3, Some(20.0)),
            ],
        );
        fails_naming(
            &all,
            &[
                conv_row("a", 3, 3, Some(10.0)),
                conv_row("b", 2, 3, Some(20.0)),
            ],
            "b: 2/3 converged",
        );
        // ⌈0.5 · 3⌉ = 2 runs must converge: 2 passes, 1 fails.
        let half = converge(&["a"], Some(0.5));
        passes(&half, &[conv_row("a", 2, 3, Some(10.0))]);
        fails_naming(&half, &[conv_row("a", 1, 3, None)], "a: 1/3 converged");
        // A fraction of zero still needs one converged run.
        let none = converge(&["a"], Some(0.0));
        passes(&none, &[conv_row("a", 1, 3, None)]);
        fails_naming(&none, &[conv_row("a", 0, 3, None)], "a: 0/3 converged");
        // A method without a row fails. (Its detail lists only the rows
        // present; `decide_claim` reports the missing method, as "not
        // checked", before `check_claim` is reached: see
        // `a_claim_with_runs_missing_is_not_checked`.)
        let (ok, _) = check(&all, &[conv_row("a", 3, 3, Some(10.0))]);
        assert_eq!(ok, Some(false));
    }

    /// Never: a single converged run of any method fails the claim.
    #[test]
    fn never_fails_on_one_converged_run() {
        let never = Claim::Never {
            text: "they never converge".into(),
            paper_verdicts: None,
            labels: names(&["a", "b"]),
        };
        passes(
            &never,
            &[conv_row("a", 0, 3, None), conv_row("b", 0, 3, None)],
        );
        fails_naming(
            &never,
            &[conv_row("a", 0, 3, None), conv_row("b", 1, 3, None)],
            "b: 1/3 converged",
        );
        let (ok, _) = check(&never, &[conv_row("a", 0, 3, None)]);
        assert_eq!(ok, Some(false), "a missing method fails");
    }

    /// Faster: strictly fewer median iterations than the reference; equal
    /// is not faster; a reference that never converges counts as +∞.
    #[test]
    fn faster_is_strictly_below_the_reference() {
        let faster = Claim::Faster {
            text: "a is faster than f".into(),
            paper_verdicts: None,
            labels: names(&["a"]),
            than: "f".into(),
        };
        passes(
            &faster,
            &[
                conv_row("a", 3, 3, Some(199.0)),
                conv_row("f", 3, 3, Some(200.0)),
            ],
        );
        fails_naming(
            &faster,
            &[
                conv_row("a", 3, 3, Some(200.0)),
                conv_row("f", 3, 3, Some(200.0)),
            ],
            "a: median 200",
        );
        fails_naming(
            &faster,
            &[
                conv_row("a", 3, 3, Some(201.0)),
                conv_row("f", 3, 3, Some(200.0)),
            ],
            "a: median 201",
        );
        // The method never converges (in median): not faster than anything.
        fails_naming(
            &faster,
            &[conv_row("a", 1, 3, None), conv_row("f", 3, 3, Some(200.0))],
            "a: median never",
        );
        // A reference that never converges is beaten by any method that
        // does, but not by one that never converges either.
        passes(
            &faster,
            &[conv_row("a", 3, 3, Some(5000.0)), conv_row("f", 0, 3, None)],
        );
        fails_naming(
            &faster,
            &[conv_row("a", 0, 3, None), conv_row("f", 0, 3, None)],
            "a: median never",
        );
        // A missing reference row is not a reference that never converges:
        // the claim fails (its detail shows it as "never").
        fails_naming(&faster, &[conv_row("a", 3, 3, Some(10.0))], "f: median");
        fails_naming(
            &faster,
            &[conv_row("f", 3, 3, Some(200.0))],
            "a: median never",
        );
    }

    /// GapBelow: the largest gap at most `max`, inclusive.
    #[test]
    fn gap_below_holds_at_the_bound_and_fails_one_ulp_beyond() {
        let below_half = Claim::GapBelow {
            text: "small gaps".into(),
            paper_verdicts: None,
            labels: names(&["a", "b"]),
            max: 0.5,
        };
        passes(
            &below_half,
            &[gap_row("a", 0.0, 0.25, 0.5), gap_row("b", 0.0, 0.0, 0.25)],
        );
        fails_naming(
            &below_half,
            &[
                gap_row("a", 0.0, 0.25, 0.5),
                gap_row("b", 0.0, 0.25, above(0.5)),
            ],
            "b: largest gap",
        );
        fails_naming(
            &below_half,
            &[gap_row("a", 0.0, 0.25, 0.5)],
            "b: largest gap n/a",
        );
        // No exact reference, no gap: not a small gap.
        fails_naming(
            &below_half,
            &[gap_row("a", 0.0, 0.25, 0.5), no_gap_row("b")],
            "b: largest gap n/a",
        );
    }

    /// GapAbove without `than`: the smallest gap at least `min`, inclusive.
    #[test]
    fn gap_above_holds_at_the_bound_and_fails_one_ulp_short() {
        let above_one = Claim::GapAbove {
            text: "large gaps".into(),
            paper_verdicts: None,
            labels: names(&["a", "b"]),
            min: 1.0,
            than: None,
        };
        passes(
            &above_one,
            &[gap_row("a", 1.0, 2.0, 4.0), gap_row("b", 1.5, 2.0, 2.5)],
        );
        fails_naming(
            &above_one,
            &[
                gap_row("a", 1.0, 2.0, 4.0),
                gap_row("b", below(1.0), 2.0, 2.5),
            ],
            "b: smallest gap",
        );
        fails_naming(
            &above_one,
            &[gap_row("a", 1.0, 2.0, 4.0)],
            "b: smallest gap n/a",
        );
        fails_naming(
            &above_one,
            &[gap_row("a", 1.0, 2.0, 4.0), no_gap_row("b")],
            "b: smallest gap n/a",
        );
    }

    /// GapAbove with `than`: every gap of the method at least `min` above
    /// the reference's largest gap (not its smallest), inclusive.
    #[test]
    fn gap_above_than_clears_the_reference_largest_gap() {
        let above_ref = Claim::GapAbove {
            text: "a's gap is larger than f's".into(),
            paper_verdicts: None,
            labels: names(&["a"]),
            min: 0.5,
            than: Some("f".into()),
        };
        // f's largest gap 1.0 + margin 0.5: a's smallest must be ≥ 1.5.
        passes(
            &above_ref,
            &[gap_row("a", 1.5, 2.0, 3.0), gap_row("f", 0.25, 0.5, 1.0)],
        );
        fails_naming(
            &above_ref,
            &[
                gap_row("a", below(1.5), 2.0, 3.0),
                gap_row("f", 0.25, 0.5, 1.0),
            ],
            "a: smallest gap",
        );
        // Clearing f's smallest gap (0.25 + 0.5) but not its largest fails.
        fails_naming(
            &above_ref,
            &[gap_row("a", 1.25, 2.0, 3.0), gap_row("f", 0.25, 0.5, 1.0)],
            "a: smallest gap 1.25",
        );
        // Without the reference's row (or its gap) there is nothing to
        // clear: the claim fails.
        fails_naming(
            &above_ref,
            &[gap_row("a", 1.5, 2.0, 3.0)],
            "f: largest gap n/a",
        );
        fails_naming(
            &above_ref,
            &[gap_row("a", 1.5, 2.0, 3.0), no_gap_row("f")],
            "f: largest gap n/a",
        );
    }

    fn mse_ratio(max: Option<f64>, min: Option<f64>) -> Claim {
        Claim::MseRatio {
            text: "mse ratio".into(),
            paper_verdicts: None,
            labels: names(&["a", "b"]),
            than: "f".into(),
            max,
            min,
        }
    }

    /// MseRatio: median final training MSE over the reference's, at most
    /// `max` and at least `min`, both inclusive.
    #[test]
    fn mse_ratio_bounds_are_inclusive() {
        // 0.5 / 0.25 = 2 exactly.
        let f = mse_row("f", 0.25);
        let at_most_2 = mse_ratio(Some(2.0), None);
        passes(
            &at_most_2,
            &[mse_row("a", 0.5), mse_row("b", 0.25), f.clone()],
        );
        fails_naming(
            &at_most_2,
            &[mse_row("a", 0.5), mse_row("b", above(0.5)), f.clone()],
            "b: 0.5000 (ratio 2.00)",
        );
        let at_least_2 = mse_ratio(None, Some(2.0));
        passes(
            &at_least_2,
            &[mse_row("a", 0.5), mse_row("b", 1.0), f.clone()],
        );
        fails_naming(
            &at_least_2,
            &[mse_row("a", 0.5), mse_row("b", below(0.5)), f.clone()],
            "b: 0.5000 (ratio 2.00)",
        );
        // Both bounds: the ratio in [1, 2].
        let between = mse_ratio(Some(2.0), Some(1.0));
        passes(
            &between,
            &[mse_row("a", 0.25), mse_row("b", 0.5), f.clone()],
        );
        fails_naming(
            &between,
            &[mse_row("a", 0.125), mse_row("b", 0.5), f.clone()],
            "a: 0.1250 (ratio 0.50)",
        );
        fails_naming(
            &between,
            &[mse_row("a", 0.25), mse_row("b", 1.0), f.clone()],
            "b: 1.0000 (ratio 4.00)",
        );
        // A missing method, or a missing reference: fails.
        fails_naming(
            &between,
            &[mse_row("a", 0.25), f.clone()],
            "b: n/a (ratio n/a)",
        );
        fails_naming(&between, &[mse_row("a", 0.25), mse_row("b", 0.5)], "f: n/a");
    }

    /// WindowBound: each best-window gap positive and strictly below the
    /// previous one.
    #[test]
    fn window_bound_is_positive_and_strictly_decreasing() {
        let bound = Claim::WindowBound {
            text: "the best gap shrinks with the window".into(),
            paper_verdicts: None,
            labels: names(&["w1", "w3", "w5"]),
        };
        let rows = |a: Option<f64>, b: Option<f64>, c: Option<f64>| {
            vec![
                window_row("w1", a),
                window_row("w3", b),
                window_row("w5", c),
            ]
        };
        passes(&bound, &rows(Some(0.5), Some(0.25), Some(0.125)));
        // Equal is not decreasing.
        fails_naming(
            &bound,
            &rows(Some(0.5), Some(0.25), Some(0.25)),
            "w5 2.500e-1",
        );
        fails_naming(
            &bound,
            &rows(Some(0.5), Some(0.25), Some(above(0.25))),
            "w5 2.500e-1",
        );
        // Decreasing, but down to zero or below: not positive.
        fails_naming(
            &bound,
            &rows(Some(0.5), Some(0.25), Some(0.0)),
            "w5 0.000e0",
        );
        fails_naming(
            &bound,
            &rows(Some(0.5), Some(0.25), Some(-0.125)),
            "w5 -1.250e-1",
        );
        // A method without a bound (not an A-VI method, or no row).
        fails_naming(&bound, &rows(Some(0.5), None, Some(0.125)), "w3 n/a");
        fails_naming(
            &bound,
            &[window_row("w1", Some(0.5)), window_row("w5", Some(0.125))],
            "w3 n/a",
        );
    }

    fn gap_shrinks(series: &[&[&str]], slack: f64) -> Claim {
        Claim::GapShrinks {
            text: "the gap shrinks".into(),
            paper_verdicts: None,
            series: series.iter().map(|s| names(s)).collect(),
            slack,
        }
    }

    /// GapShrinks: a rise of at most `slack` between neighbours is allowed
    /// (inclusive), but the last median gap must be strictly below the
    /// first, in every series.
    #[test]
    fn gap_shrinks_allows_slack_but_needs_a_net_drop() {
        let claim = gap_shrinks(&[&["k1", "k2", "k3"]], 0.5);
        let rows = |a: f64, b: f64, c: f64| {
            vec![
                gap_row("k1", 0.0, a, 8.0),
                gap_row("k2", 0.0, b, 8.0),
                gap_row("k3", 0.0, c, 8.0),
            ]
        };
        passes(&claim, &rows(1.0, 1.5, 0.5));
        fails_naming(&claim, &rows(1.0, above(1.5), 0.5), "k2 1.50");
        // No net drop: last equal to first fails.
        fails_naming(&claim, &rows(1.0, 0.5, 1.0), "k3 1.00");
        // A missing median gap in the series fails.
        fails_naming(
            &claim,
            &[
                gap_row("k1", 0.0, 1.0, 8.0),
                no_gap_row("k2"),
                gap_row("k3", 0.0, 0.5, 8.0),
            ],
            "k2 n/a",
        );
        fails_naming(
            &claim,
            &[gap_row("k1", 0.0, 1.0, 8.0), gap_row("k3", 0.0, 0.5, 8.0)],
            "k2 n/a",
        );
        // Two series: one that shrinks does not excuse one that does not.
        let two = gap_shrinks(&[&["k1", "k3"], &["w1", "w2"]], 0.0);
        let mut both = rows(1.0, 1.0, 0.5);
        both.extend([gap_row("w1", 0.0, 1.0, 8.0), gap_row("w2", 0.0, 0.5, 8.0)]);
        passes(&two, &both);
        let mut one = rows(1.0, 1.0, 0.5);
        one.extend([gap_row("w1", 0.0, 1.0, 8.0), gap_row("w2", 0.0, 2.0, 8.0)]);
        fails_naming(&two, &one, "w2 2.00");
        let two = gap_shrinks(&[&["w1", "w2"], &["k1", "k3"]], 0.0);
        passes(&two, &both);
        fails_naming(&two, &one, "w2 2.00");
    }

    /// decide_claim: fewer runs than the definition's seeds (a method short,
    /// or no row at all) leaves the claim "not checked" with
    /// `reproduced: null`, naming the methods short of runs; with every run
    /// present the check decides.
    #[test]
    fn a_claim_with_runs_missing_is_not_checked() {
        let faster = Claim::Faster {
            text: "a is faster than f".into(),
            paper_verdicts: None,
            labels: names(&["a"]),
            than: "f".into(),
        };
        let complete = [
            conv_row("a", 3, 3, Some(10.0)),
            conv_row("f", 3, 3, Some(20.0)),
        ];
        let v = decide_claim(&faster, &complete, 3);
        assert_eq!(v["reproduced"], true);
        assert_eq!(v["status"], "reproduced");
        assert_eq!(v["text"], "a is faster than f");
        let slower = [
            conv_row("a", 3, 3, Some(30.0)),
            conv_row("f", 3, 3, Some(20.0)),
        ];
        let v = decide_claim(&faster, &slower, 3);
        assert_eq!(v["reproduced"], false);
        assert_eq!(v["status"], "not reproduced");

        let not_checked = |v: &Value, text: &str, names: &str| {
            assert!(v["reproduced"].is_null(), "{v}");
            assert_eq!(v["status"], "not checked", "{v}");
            assert_eq!(v["text"], text);
            let detail = v["detail"].as_str().unwrap();
            assert!(detail.starts_with("not checked: "), "{detail}");
            assert!(detail.contains(names), "{detail} should name {names}");
        };
        // The reference has one run short: 5 of 6 present, f named. The
        // check alone would call the claim reproduced.
        let short = [
            conv_row("a", 3, 3, Some(10.0)),
            conv_row("f", 2, 2, Some(20.0)),
        ];
        assert_eq!(check_claim(&faster, &short)["reproduced"], true);
        let v = decide_claim(&faster, &short, 3);
        not_checked(&v, "a is faster than f", "5 of 6 runs present; f 2/3");
        assert!(!v["detail"].as_str().unwrap().contains("a 3/3"), "{v}");
        // No row for the method at all: 0 runs.
        let missing = [conv_row("f", 3, 3, Some(20.0))];
        not_checked(
            &decide_claim(&faster, &missing, 3),
            "a is faster than f",
            "3 of 6 runs present; a 0/3",
        );
        // A label named twice counts once (a GapShrinks claim whose series
        // share a method).
        let shrinks = Claim::GapShrinks {
            text: "the gap shrinks".into(),
            paper_verdicts: None,
            series: vec![names(&["k1", "k2"]), names(&["k1", "k3"])],
            slack: 0.0,
        };
        let rows = [
            gap_row("k1", 0.0, 1.0, 8.0),
            gap_row("k2", 0.0, 0.5, 8.0),
            json!({ "label": "k3", "runs": 1, "gap": { "median": 0.5 } }),
        ];
        not_checked(
            &decide_claim(&shrinks, &rows, 3),
            "the gap shrinks",
            "7 of 9 runs present; k3 1/3",
        );
    }

    /// `(every seed, median)` verdicts of a claim decided on 10-run rows.
    fn both(claim: &Claim, rows: &[Value]) -> (Value, Value) {
        let v = decide_claim(claim, rows, 10);
        assert!(v["median"]["detail"].is_string(), "{v}");
        (v["reproduced"].clone(), v["median"]["reproduced"].clone())
    }

    /// Converge / Never on ten seeds: one seed of ten the wrong way fails
    /// the per-seed verdict but not the median one; all right or all wrong,
    /// the two agree. Half converged is "never in median" (`median_never`).
    #[test]
    fn median_verdict_tolerates_one_bad_seed_of_ten() {
        let conv = converge(&["a"], None);
        let nine = [conv_row("a", 9, 10, Some(500.0))];
        assert_eq!(both(&conv, &nine), (json!(false), json!(true)));
        let v = decide_claim(&conv, &nine, 10);
        assert!(
            v["median"]["detail"]
                .as_str()
                .unwrap()
                .contains("a: median 500"),
            "{v}"
        );
        assert_eq!(
            v["detail"], "a: 9/10 converged",
            "per-seed detail unchanged"
        );
        let all = [conv_row("a", 10, 10, Some(500.0))];
        assert_eq!(both(&conv, &all), (json!(true), json!(true)));
        let none = [conv_row("a", 0, 10, None)];
        assert_eq!(both(&conv, &none), (json!(false), json!(false)));
        let half = [conv_row("a", 5, 10, None)];
        assert_eq!(both(&conv, &half), (json!(false), json!(false)));

        let never = Claim::Never {
            text: "a never converges".into(),
            paper_verdicts: None,
            labels: names(&["a"]),
        };
        let one = [conv_row("a", 1, 10, None)];
        assert_eq!(both(&never, &one), (json!(false), json!(true)));
        assert_eq!(both(&never, &none), (json!(true), json!(true)));
        assert_eq!(both(&never, &all), (json!(false), json!(false)));
        // Two methods: the median verdict needs both.
        let conv2 = converge(&["a", "b"], None);
        let rows = [
            conv_row("a", 9, 10, Some(500.0)),
            conv_row("b", 4, 10, None),
        ];
        assert_eq!(both(&conv2, &rows), (json!(false), json!(false)));
    }

    /// GapBelow / GapAbove on the median gap; the claims that already
    /// compare medians give the same verdict on both rules.
    #[test]
    fn median_verdict_of_gap_and_median_claims() {
        let gap10 = |label: &str, min: f64, median: f64, max: f64| {
            let mut r = gap_row(label, min, median, max);
            r["runs"] = json!(10);
            r
        };
        let below = Claim::GapBelow {
            text: "small gap".into(),
            paper_verdicts: None,
            labels: names(&["a"]),
            max: 0.5,
        };
        // One seed's gap (the max) beyond the bound, the median within.
        assert_eq!(
            both(&below, &[gap10("a", 0.0, 0.25, 2.0)]),
            (json!(false), json!(true))
        );
        assert_eq!(
            both(&below, &[gap10("a", 0.0, 0.25, 0.5)]),
            (json!(true), json!(true))
        );
        assert_eq!(
            both(&below, &[gap10("a", 1.0, 1.5, 2.0)]),
            (json!(false), json!(false))
        );
        let above = Claim::GapAbove {
            text: "big gap".into(),
            paper_verdicts: None,
            labels: names(&["a"]),
            min: 1.0,
            than: Some("f".into()),
        };
        let rows = [gap10("a", 0.5, 2.0, 3.0), gap10("f", 0.0, 0.25, 0.5)];
        assert_eq!(both(&above, &rows), (json!(false), json!(true)));
        let faster = Claim::Faster {
            text: "a is faster".into(),
            paper_verdicts: None,
            labels: names(&["a"]),
            than: "f".into(),
        };
        for (a, ok) in [(10.0, true), (30.0, false)] {
            let rows = [
                conv_row("a", 9, 10, Some(a)),
                conv_row("f", 10, 10, Some(20.0)),
            ];
            assert_eq!(both(&faster, &rows), (json!(ok), json!(ok)));
        }
        // Not checked: both rules are null.
        let v = decide_claim(&faster, &[conv_row("f", 10, 10, Some(20.0))], 10);
        assert!(v["reproduced"].is_null() && v["median"]["reproduced"].is_null());
    }

    /// The definition's `paper_verdicts` travel into the summary entry;
    /// without them there is no key.
    #[test]
    fn paper_verdicts_are_copied_into_the_summary() {
        let exp = crate::experiment::load_experiment(
            &crate::experiment::default_experiments_dir(),
            "nonlinear",
        )
        .unwrap();
        let rows = [conv_row("k=4", 9, 10, Some(500.0))];
        let claim = Claim::Converge {
            text: "k=4 converges".into(),
            paper_verdicts: exp.claims[0].paper_verdicts().cloned(),
            labels: names(&["k=4"]),
            min_fraction: None,
        };
        let v = decide_claim(&claim, &rows, 10);
        assert_eq!(v["paper_verdicts"]["every_seed"], false, "{v}");
        assert_eq!(v["paper_verdicts"]["median"], true, "{v}");
        let v = decide_claim(&converge(&["k=4"], None), &rows, 10);
        assert!(v.get("paper_verdicts").is_none(), "{v}");
    }

    /// REPORT.md shows the claims as a table with both verdicts, and the
    /// paper's column where the definition has verdicts; a committed summary
    /// written before the median verdict renders with n/a there.
    #[test]
    fn report_shows_both_verdicts_and_reads_old_summaries() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/results/cpu/nonlinear");
        let exp = crate::experiment::load_experiment_file(&dir.join("experiment.json")).unwrap();
        let mut old: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap())
                .unwrap();
        // A summary as written before the median verdict and the paper's
        // verdicts existed (the committed one is rebuilt with both).
        for c in old["claims"].as_array_mut().unwrap() {
            let c = c.as_object_mut().unwrap();
            for k in ["median", "paper_verdicts", "status"] {
                c.remove(k);
            }
        }
        let md = super::markdown::report_markdown(&exp, &old);
        assert!(
            md.contains("| claim | on every seed | on the median |"),
            "{md}"
        );
        assert!(md.contains("| n/a |"), "{md}");
        assert!(!md.contains("the paper's own numbers"), "{md}");

        let mut new = old.clone();
        let claim = &mut new["claims"][0];
        claim["median"] = json!({ "reproduced": true, "detail": "the median run converges" });
        claim["paper_verdicts"] =
            json!({ "every_seed": false, "median": true, "why": "digest §4.3" });
        let md = super::markdown::report_markdown(&exp, &new);
        assert!(
            md.contains("| on the median | the paper's own numbers (digest) |"),
            "{md}"
        );
        assert!(
            md.contains("**Reproduced:** the median run converges | every seed: fails; median: passes (digest §4.3) |"),
            "{md}"
        );
        assert!(md.contains("not in the paper's runs"), "{md}");
    }
}
