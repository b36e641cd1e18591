//! The figures of an experiment's summary (paper figures 3–9).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use crate::experiment::{file_stem, Experiment, GapAxis};
use crate::figures::{self, BoxGroup, BoxPlot, LinePlot, Series};
use crate::run::prepare;

use super::runs::*;

/// Keep at most about `max` points of a curve, evenly spaced in log x
/// (for log-log figures) or in index.
pub(super) fn thin(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points;
    }
    let step = points.len() as f64 / max as f64;
    let mut out: Vec<(f64, f64)> = (0..max)
        .map(|i| points[((i as f64 * step) as usize).min(points.len() - 1)])
        .collect();
    if let Some(last) = points.last() {
        out.push(*last);
    }
    out
}

pub(super) fn draw_figures(
    dir: &Path,
    exp: &Experiment,
    runs: &[Run],
    summary: &Value,
) -> Result<()> {
    // The single-seed figures use the chosen seed when it ran, else the
    // first seed (a --quick or --seeds run may not include it).
    let seed = exp
        .figures
        .seed
        .filter(|s| exp.seeds.contains(s))
        .unwrap_or(exp.seeds[0]);
    let shown = |label: &str| {
        exp.figures
            .methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|l| l == label))
    };
    let mut by_time = Vec::new();
    let mut by_iter = Vec::new();
    for r in runs.iter().filter(|r| r.seed == seed && shown(&r.label)) {
        // The ELBO estimates are noisy: the curves show the 10-step block
        // means (the paper's convergence window), each at its block's
        // first step, then the raw last steps (full and compact runs alike).
        let points: Vec<_> = r.blocks.points().collect();
        by_time.push(Series {
            label: r.label.clone(),
            points: thin(points.iter().map(|&(_, t, e)| (t, -e)).collect(), 1500),
        });
        by_iter.push(Series {
            label: r.label.clone(),
            points: thin(
                points.iter().map(|&(i, _, e)| (i as f64, -e)).collect(),
                1500,
            ),
        });
    }
    let optimum = summary["optimal_elbo"]
        .as_f64()
        .map(|o| (-o, "−ELBO* (exact)".to_string()));
    if !by_time.is_empty() {
        figures::line_plot(
            &dir.join("fig3-elbo-vs-time.svg"),
            &LinePlot {
                title: format!(
                    "{}: −ELBO vs wall time (seed {seed}, 10-step block means)",
                    exp.name
                ),
                x_label: "wall time (s)".into(),
                y_label: "−ELBO".into(),
                log_x: true,
                log_y: true,
                series: by_time,
                reference: optimum.clone(),
            },
        )?;
        figures::line_plot(
            &dir.join("fig6-elbo-vs-iteration.svg"),
            &LinePlot {
                title: format!(
                    "{}: optimisation paths (seed {seed}, 10-step block means)",
                    exp.name
                ),
                x_label: "iteration".into(),
                y_label: "−ELBO".into(),
                log_x: true,
                log_y: true,
                series: by_iter,
                reference: optimum,
            },
        )?;
    }
    // Fig. 4: time (and iterations) to convergence over seeds.
    let longest = runs
        .iter()
        .map(|r| r.blocks.end_seconds)
        .filter(|s| s.is_finite())
        .fold(0.0, f64::max);
    let rows = summary["methods"].as_array().cloned().unwrap_or_default();
    let groups = |key: &str| -> Vec<BoxGroup> {
        rows.iter()
            .map(|m| BoxGroup {
                label: m["label"].as_str().unwrap_or("?").to_string(),
                values: m["seeds"]
                    .as_array()
                    .map(|s| s.iter().map(|r| r[key].as_f64()).collect())
                    .unwrap_or_default(),
            })
            .collect()
    };
    let criterion = match &exp.mse {
        Some(m) => format!("training MSE < {}", m.threshold),
        None => format!("within {}% of the target", 100.0 * exp.rel_tol),
    };
    figures::box_plot(
        &dir.join("fig4-time-to-converge.svg"),
        &BoxPlot {
            title: format!(
                "{}: wall time to {criterion} ({} seeds)",
                exp.name,
                exp.seeds.len()
            ),
            x_label: "wall time (s)".into(),
            log_x: true,
            groups: groups("seconds_to_converge"),
            never_at: longest.max(1e-3),
        },
    )?;
    figures::box_plot(
        &dir.join("fig4-iterations-to-converge.svg"),
        &BoxPlot {
            title: format!(
                "{}: iterations to {criterion} ({} seeds)",
                exp.name,
                exp.seeds.len()
            ),
            x_label: "iterations".into(),
            log_x: true,
            groups: groups("iterations_to_converge"),
            never_at: exp.steps as f64,
        },
    )?;
    if let Some(crit) = &exp.mse {
        let mut train = Vec::new();
        let mut test = Vec::new();
        for r in runs.iter().filter(|r| r.seed == seed && shown(&r.label)) {
            let mse = r.mse()?;
            let (secs, iters, tr) = (&mse.seconds, &mse.iteration, &mse.train);
            let every = mse.every as f64;
            let te = test_mse(mse);
            train.push(Series {
                label: r.label.clone(),
                points: secs
                    .iter()
                    .zip(tr)
                    .map(|(t, v)| (t.max(1e-3), *v))
                    .collect(),
            });
            if te.iter().any(|v| v.is_finite()) {
                test.push(Series {
                    label: r.label.clone(),
                    points: iters
                        .iter()
                        .zip(&te)
                        .map(|(i, v)| (*i as f64 / every, *v))
                        .collect(),
                });
            }
        }
        figures::line_plot(
            &dir.join("fig5-mse-vs-time.svg"),
            &LinePlot {
                title: format!("{}: training reconstruction MSE (seed {seed})", exp.name),
                x_label: "wall time (s)".into(),
                y_label: "MSE".into(),
                log_x: true,
                log_y: true,
                series: train,
                reference: Some((crit.threshold, format!("MSE {}", crit.threshold))),
            },
        )?;
        if !test.is_empty() {
            figures::line_plot(
                &dir.join("fig9-test-mse.svg"),
                &LinePlot {
                    title: format!("{}: test reconstruction MSE (seed {seed})", exp.name),
                    x_label: "epoch".into(),
                    y_label: "test MSE".into(),
                    log_x: false,
                    log_y: true,
                    series: test,
                    reference: Some((crit.threshold, format!("MSE {}", crit.threshold))),
                },
            )?;
        }
    }
    if let Some(axis) = exp.figures.gap_vs {
        draw_gap_figures(dir, exp, &rows, axis)?;
    }
    if exp.figures.fig8 {
        draw_fig8(dir, exp)?;
    }
    Ok(())
}

pub(super) fn draw_gap_figures(
    dir: &Path,
    exp: &Experiment,
    rows: &[Value],
    axis: GapAxis,
) -> Result<()> {
    let mut by_group: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in rows {
        let g = r["group"].as_str().unwrap_or(&exp.name).to_string();
        by_group.entry(g).or_default().push(r);
    }
    for (group, rs) in by_group {
        // One curve per width (gap vs window) or per window (gap vs width).
        let mut curves: BTreeMap<String, Vec<(f64, Option<f64>)>> = BTreeMap::new();
        let mut flat = Vec::new();
        for r in &rs {
            let g = r["gap"]["median"].as_f64();
            let (x, curve) = match axis {
                GapAxis::Window => (
                    r["window"].as_f64(),
                    r["width"].as_u64().map(|k| format!("A-VI k = {k}")),
                ),
                GapAxis::Width => (
                    r["width"].as_f64(),
                    r["window"].as_u64().map(|w| format!("A-VI window {w}")),
                ),
            };
            match (x, curve) {
                (Some(x), Some(c)) => {
                    if let Some(g) = g {
                        curves.entry(c).or_default().push((x, Some(g)));
                    }
                }
                _ => {
                    if let Some(g) = g {
                        flat.push((r["label"].as_str().unwrap_or("?").to_string(), g));
                    }
                }
            }
        }
        let mut series: Vec<Series> = curves
            .into_iter()
            .map(|(label, mut pts)| {
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series {
                    label,
                    points: pts.iter().filter_map(|(x, g)| g.map(|g| (*x, g))).collect(),
                }
            })
            .collect();
        series.sort_by(|a, b| {
            let n = |s: &str| {
                s.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            n(&a.label).total_cmp(&n(&b.label))
        });
        // Methods without a window or width (F-VI, Const) as flat lines
        // across the range.
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
        if lo.is_finite() {
            for (label, g) in flat {
                series.push(Series {
                    label,
                    points: vec![(lo, g), (hi, g)],
                });
            }
        }
        let name = match axis {
            GapAxis::Window => "window",
            GapAxis::Width => "width",
        };
        figures::line_plot(
            &dir.join(format!("gap-vs-{name}-{}.svg", file_stem(&group))),
            &LinePlot {
                title: format!("{group}: amortization gap vs {name} (median over seeds)"),
                x_label: match axis {
                    GapAxis::Window => "window length (observations seen by f)".into(),
                    GapAxis::Width => "MLP width k".into(),
                },
                y_label: "gap to the reference (nats)".into(),
                log_x: false,
                log_y: false,
                series,
                reference: Some((0.0, "no gap".into())),
            },
        )?;
    }
    Ok(())
}

pub(super) fn draw_fig8(dir: &Path, exp: &Experiment) -> Result<()> {
    let cfg = crate::experiment::run_config(exp, &exp.methods[0], exp.seeds[0]);
    let prepared = prepare(&cfg, Path::new("."))?;
    let Some(r) = &prepared.reference else {
        bail!("fig8: the experiment's model has no closed-form F-VI optimum");
    };
    let n = r.z_mean.len();
    let wrong = avi_models::gaussian_hmm::paper_fig8_erroneous_means(n);
    let idx = |v: &[f64]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, m)| ((i + 1) as f64, *m))
            .collect()
    };
    figures::line_plot(
        &dir.join("fig8-hmm-counterexample.svg"),
        &LinePlot {
            title: format!("HMM counterexample (N = {n}, x ≡ 1): F-VI optimal means ν*_n"),
            x_label: "n".into(),
            y_label: "mean of q*(z_n)".into(),
            log_x: false,
            log_y: false,
            series: vec![
                Series {
                    label: "corrected: proper p(z_1) = N(0, 1), exact".into(),
                    points: idx(&r.z_mean),
                },
                Series {
                    label: "paper's Fig. 8 (ERRONEOUS: indefinite precision, μ = −2Ψ⁻¹x)".into(),
                    points: idx(&wrong),
                },
            ],
            reference: None,
        },
    )?;
    Ok(())
}
