//! The markdown `REPORT.md` of an experiment.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::experiment::Experiment;

use super::runs::*;

pub(super) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    crate::report::write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub(super) fn cell_range(v: &Value, digits: usize, neg: bool) -> String {
    let s = if neg { -1.0 } else { 1.0 };
    match (v["median"].as_f64(), v["min"].as_f64(), v["max"].as_f64()) {
        (Some(m), Some(a), Some(b)) => {
            let (lo, hi) = if neg { (s * b, s * a) } else { (a, b) };
            if (hi - lo).abs() < 10f64.powi(-(digits as i32)) {
                fmt(Some(s * m), digits)
            } else {
                format!(
                    "{} ({}–{})",
                    fmt(Some(s * m), digits),
                    fmt(Some(lo), digits),
                    fmt(Some(hi), digits)
                )
            }
        }
        _ => "n/a".into(),
    }
}

pub(super) fn iter_cell(r: &Value, key: &str, digits: usize) -> String {
    let median = r[key]["median"].as_f64();
    let conv = &r[key]["converged"];
    let n = format!("{}/{}", r["converged"], r["runs"]);
    match median {
        None if r["converged"] == 0 => "never".into(),
        None => format!(
            "never in median ({n} converged, {}–{})",
            fmt(conv["min"].as_f64(), digits),
            fmt(conv["max"].as_f64(), digits)
        ),
        Some(m) => format!(
            "{} ({}–{}{})",
            fmt(Some(m), digits),
            fmt(conv["min"].as_f64(), digits),
            fmt(conv["max"].as_f64(), digits),
            if r["converged"] == r["runs"] {
                String::new()
            } else {
                format!("; {n} converged")
            }
        ),
    }
}

/// Text safe inside a markdown table cell.
fn cell_text(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// `**Reproduced:** detail` (or not reproduced, not checked) of a verdict
/// `{reproduced, detail}`.
fn verdict_cell(v: &Value) -> String {
    format!(
        "**{}** {}",
        match v["reproduced"].as_bool() {
            Some(true) => "Reproduced:",
            Some(false) => "Not reproduced:",
            None => "Not checked:",
        },
        cell_text(v["detail"].as_str().unwrap_or(""))
    )
}

/// The markdown report of one experiment.
pub(super) fn report_markdown(exp: &Experiment, s: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# {}{}\n",
        exp.name,
        if exp.quick_run { " (quick)" } else { "" }
    );
    let _ = writeln!(md, "{}\n", exp.description);
    let _ = writeln!(
        md,
        "Device: {}. {} steps, {} draws, seeds {:?}. Convergence: {}{}. \
         Final −ELBO = mean of the last {} step estimates; the gap uses the ELBO of {} fresh draws at the final parameters.\n",
        s["device"].as_str().unwrap_or("?"),
        exp.steps,
        exp.draws,
        exp.seeds,
        s["target"].as_str().unwrap_or("?"),
        if exp.mse.is_some() { String::new() } else { format!(", within {}% (10-step window, NaN never converges)", 100.0 * exp.rel_tol) },
        2 * exp.final_window,
        exp.eval_draws
    );
    if let (true, Some(note)) = (exp.quick_run, &exp.quick.note) {
        let _ = writeln!(md, "**Quick run:** {note}\n");
    }
    if let Some(o) = s["optimal_elbo"].as_f64() {
        let _ = writeln!(md, "Exact reference ELBO: {o:.2}.\n");
    }
    let rows = s["methods"].as_array().cloned().unwrap_or_default();
    let has_gap = rows.iter().any(|r| !r["gap"].is_null());
    let has_mse = exp.mse.is_some();
    let has_diag = rows.iter().any(|r| !r["diagnosis_gain"].is_null());
    let has_bound = rows.iter().any(|r| r.get("best_window_gap").is_some());
    let mut header = vec!["method", "final −ELBO median (min–max)"];
    if has_gap {
        header.push("gap (nats)");
    }
    if has_bound {
        header.push("best possible f on this window: exact gap");
    }
    if has_mse {
        header.extend(["final train MSE", "final test MSE"]);
    }
    header.extend([
        "iterations to converge, median (range of converged)",
        "seconds to converge",
        "ms / iteration",
    ]);
    if has_diag {
        header.push("§5 diagnostic gain");
    }
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
    for r in &rows {
        let mut cells = vec![
            format!("{}", r["label"].as_str().unwrap_or("?")),
            cell_range(&r["final_elbo"], 1, true),
        ];
        if has_gap {
            cells.push(cell_range(&r["gap"], 2, false));
        }
        if has_bound {
            cells.push(
                r.get("best_window_gap")
                    .and_then(Value::as_f64)
                    .map_or(String::new(), |g| format!("{g:.3e}")),
            );
        }
        if has_mse {
            cells.push(cell_range(&r["mse"]["final_train"], 4, false));
            cells.push(cell_range(&r["mse"]["final_test"], 4, false));
        }
        cells.push(iter_cell(r, "iterations_to_converge", 0));
        cells.push(iter_cell(r, "seconds_to_converge", 1));
        cells.push(fmt(r["ms_per_iteration"]["median"].as_f64(), 2));
        if has_diag {
            cells.push(cell_range(&r["diagnosis_gain"], 2, false));
        }
        let _ = writeln!(md, "| {} |", cells.join(" | "));
    }
    // Relative wall time: A-VI against F-VI on the same device.
    if let Some(fvi) = rows.iter().find(|r| r["method"]["kind"] == "fvi") {
        if let Some(f) = fvi["seconds_to_converge"]["median"].as_f64() {
            let ratios: Vec<String> = rows
                .iter()
                .filter(|r| r["method"]["kind"] == "avi")
                .filter_map(|r| {
                    r["seconds_to_converge"]["median"]
                        .as_f64()
                        .map(|a| format!("{} {:.2}×", r["label"].as_str().unwrap_or("?"), a / f))
                })
                .collect();
            if !ratios.is_empty() {
                let _ = writeln!(
                    md,
                    "\nMedian wall time to converge relative to F-VI (same device, same run): {}.",
                    ratios.join(", ")
                );
            }
        }
    }
    let shortfalls = s["fvi_not_at_optimum"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !shortfalls.is_empty() {
        let _ = writeln!(
            md,
            "\n**F-VI below A-VI.** At F-VI's optimum no A-VI run ends above it (Prop. 2.1); \
             these did, by more than {} combined standard errors, so F-VI stopped short \
             (for categorical local factors try `\"local_updates\": \"annealed_cavi\"`, \
             docs/engines.md):\n\n{}",
            super::optimum::SHORTFALL_SES,
            super::optimum::shortfall_markdown(&shortfalls)
        );
    }
    if exp.heldout.is_some() {
        if let Some(rows) = s["methods"].as_array() {
            super::generalization::markdown(&mut md, rows);
        }
    }
    if !exp.paper.is_empty() {
        let _ = writeln!(
            md,
            "\n## The paper's values (digest §4, recomputed from the authors' stored results)\n"
        );
        let _ = writeln!(
            md,
            "The authors' losses leave out normalising constants and their runs use their own data draws, so compare ranks, gaps and iteration counts, not −ELBO levels. Their wall times are from an RTX A6000 in PyTorch eager mode.\n"
        );
        let _ = writeln!(
            md,
            "| method | final −ELBO | iterations to converge | note |\n|---|---|---|---|"
        );
        for p in &exp.paper {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                p.label,
                p.final_neg_elbo.as_deref().unwrap_or(""),
                p.iterations.as_deref().unwrap_or(""),
                p.note.as_deref().unwrap_or("")
            );
        }
    }
    if let Some(claims) = s["claims"].as_array().filter(|c| !c.is_empty()) {
        let _ = writeln!(md, "\n## The paper's claims\n");
        let _ = writeln!(
            md,
            "Each claim is decided two ways: **on every seed** (the check as written, e.g. \
             every run converges) and **on the median** over seeds (e.g. the median run \
             converges). A summary written before the median verdict existed shows n/a there.\n"
        );
        let has_paper = claims.iter().any(|c| !c["paper_verdicts"].is_null());
        let mut header = vec!["claim", "on every seed", "on the median"];
        if has_paper {
            header.push("the paper's own numbers (digest)");
        }
        let _ = writeln!(md, "| {} |", header.join(" | "));
        let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
        for c in claims {
            let mut cells = vec![
                cell_text(c["text"].as_str().unwrap_or("")),
                verdict_cell(c),
                if c["median"].is_null() {
                    "n/a".to_string()
                } else {
                    verdict_cell(&c["median"])
                },
            ];
            if has_paper {
                let p = &c["paper_verdicts"];
                let word = |v: &Value| match v.as_bool() {
                    Some(true) => "passes",
                    Some(false) => "fails",
                    None => "?",
                };
                cells.push(if p.is_null() {
                    "not in the paper's runs".to_string()
                } else {
                    cell_text(&format!(
                        "every seed: {}; median: {} ({})",
                        word(&p["every_seed"]),
                        word(&p["median"]),
                        p["why"].as_str().unwrap_or("")
                    ))
                });
            }
            let _ = writeln!(md, "| {} |", cells.join(" | "));
        }
    }
    let _ = writeln!(md, "\n## Figures\n");
    for (file, what) in [
        ("fig3-elbo-vs-time.svg", "Fig. 3 analogue: −ELBO vs wall time, one seed"),
        ("fig4-time-to-converge.svg", "Fig. 4 analogue: wall time to convergence over seeds (crosses at the right edge: did not converge)"),
        ("fig4-iterations-to-converge.svg", "the same in iterations"),
        ("fig6-elbo-vs-iteration.svg", "Fig. 6 analogue: optimisation paths, one seed"),
        ("fig5-mse-vs-time.svg", "Fig. 5 analogue: training MSE vs wall time"),
        ("fig9-test-mse.svg", "Fig. 9 analogue: test MSE per epoch"),
        ("fig8-hmm-counterexample.svg", "Fig. 8 corrected, beside the paper's erroneous curve"),
    ] {
        if exp.mse.is_none() && (file.starts_with("fig5") || file.starts_with("fig9")) {
            continue;
        }
        if file.starts_with("fig8") && !exp.figures.fig8 {
            continue;
        }
        let _ = writeln!(md, "- [{file}]({file}): {what}");
    }
    if exp.figures.gap_vs.is_some() {
        let _ = writeln!(
            md,
            "- gap-vs-*.svg: the amortization gap against the window or width, per model"
        );
    }
    md
}
