//! Deciding an experiment's claims from the summary rows.

use serde_json::{json, Value};

use crate::experiment::Claim;

use super::runs::*;

pub(super) fn row<'a>(rows: &'a [Value], label: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["label"] == label)
}

/// Decide a claim from the summary rows: `{text, reproduced, status,
/// detail, median, paper_verdicts}` (`reproduced` and `detail`: the check
/// on every seed, as written; `median`: `{reproduced, detail}` of the same
/// claim on the median over seeds, [`check_claim_median`];
/// `paper_verdicts`: copied from the definition, where it has them).
///
/// A claim whose methods have fewer runs than the definition's `seeds` (a
/// grid stopped part-way, runs deleted, a shard not finished) is "not
/// checked" (`reproduced: null`, on both rules), never decided on the runs
/// that happen to be there.
pub(super) fn decide_claim(claim: &Claim, rows: &[Value], seeds: usize) -> Value {
    let mut labels = claim.labels();
    labels.sort();
    labels.dedup();
    let present: Vec<usize> = labels
        .iter()
        .map(|l| {
            row(rows, l)
                .and_then(|r| r["runs"].as_u64())
                .map_or(0, |n| n as usize)
        })
        .collect();
    let (have, want) = (present.iter().sum::<usize>(), labels.len() * seeds);
    if have < want {
        let short: Vec<String> = labels
            .iter()
            .zip(&present)
            .filter(|(_, &n)| n < seeds)
            .map(|(l, n)| format!("{l} {n}/{seeds}"))
            .collect();
        let detail = format!(
            "not checked: {have} of {want} runs present; {}",
            short.join(", ")
        );
        let mut v = json!({
            "text": claim.text(),
            "reproduced": null,
            "status": "not checked",
            "median": { "reproduced": null, "detail": detail },
            "detail": detail,
        });
        add_paper_verdicts(&mut v, claim);
        return v;
    }
    let mut v = check_claim(claim, rows);
    v["status"] = json!(if v["reproduced"] == true {
        "reproduced"
    } else {
        "not reproduced"
    });
    v["median"] = check_claim_median(claim, rows);
    add_paper_verdicts(&mut v, claim);
    v
}

/// Copies the definition's `paper_verdicts` of a claim, if any, into its
/// summary entry.
pub(super) fn add_paper_verdicts(v: &mut Value, claim: &Claim) {
    if let Some(p) = claim.paper_verdicts() {
        v["paper_verdicts"] = json!(p);
    }
}

/// Decide a claim on the median over seeds: `{reproduced, detail}`, the
/// `median` entry beside the per-seed verdict of [`check_claim`].
///
/// - Converge: the median run of each method converges (its median
///   iterations to converge, a run that never converges counting as +∞, is
///   finite); Never: the median run of each method never converges.
/// - GapBelow: each method's median gap ≤ max; GapAbove: each method's
///   median gap ≥ min, or ≥ than's median gap + min.
/// - Faster, MseRatio and GapShrinks already compare medians, and
///   WindowBound exact values: the same verdict as [`check_claim`].
pub(super) fn check_claim_median(claim: &Claim, rows: &[Value]) -> Value {
    if let Some((ok, detail)) = super::generalization::check(claim, rows, true) {
        return json!({ "reproduced": ok, "detail": detail });
    }
    let median = |r: &Value| r["iterations_to_converge"]["median"].as_f64();
    let gap = |l: &str| row(rows, l).and_then(|r| r["gap"]["median"].as_f64());
    let (ok, detail): (bool, String) = match claim {
        Claim::Converge { labels, .. } | Claim::Never { labels, .. } => {
            let want_converged = matches!(claim, Claim::Converge { .. });
            let mut ok = true;
            let mut parts = vec![];
            for l in labels {
                let m = row(rows, l).map(median);
                ok &= match m {
                    Some(m) => m.is_some() == want_converged,
                    None => false,
                };
                parts.push(match m {
                    None => format!("{l}: no runs"),
                    Some(Some(m)) => format!("{l}: median {m:.0}"),
                    Some(None) => format!("{l}: median never"),
                });
            }
            (
                ok,
                format!(
                    "the median run {}: iterations to converge {}",
                    if want_converged {
                        "converges"
                    } else {
                        "never converges"
                    },
                    parts.join(", ")
                ),
            )
        }
        Claim::GapBelow { labels, max, .. } => {
            let mut ok = true;
            let mut parts = vec![];
            for l in labels {
                let v = gap(l);
                parts.push(format!("{l}: median gap {}", fmt(v, 2)));
                ok &= v.is_some_and(|v| v <= *max);
            }
            (ok, format!("{} (bound ≤ {max} nats)", parts.join(", ")))
        }
        Claim::GapAbove {
            labels, min, than, ..
        } => {
            let base = match than {
                None => Some(0.0),
                Some(t) => gap(t),
            };
            let mut ok = base.is_some();
            let mut parts = vec![];
            if let Some(t) = than {
                parts.push(format!("{t}: median gap {}", fmt(base, 2)));
            }
            for l in labels {
                let v = gap(l);
                parts.push(format!("{l}: median gap {}", fmt(v, 2)));
                ok &= matches!((v, base), (Some(v), Some(b)) if v >= b + min);
            }
            (
                ok,
                format!(
                    "{} (bound ≥ {}{min} nats)",
                    parts.join(", "),
                    than.as_ref().map_or(String::new(), |t| format!("{t}'s + "))
                ),
            )
        }
        Claim::HeldoutGapZero { .. } | Claim::HeldoutGapLikeTraining { .. } => {
            unreachable!("decided by summary::generalization")
        }
        Claim::Faster { .. }
        | Claim::MseRatio { .. }
        | Claim::GapShrinks { .. }
        | Claim::WindowBound { .. } => {
            let v = check_claim(claim, rows);
            return json!({
                "reproduced": v["reproduced"],
                "detail": if matches!(claim, Claim::WindowBound { .. }) {
                    "exact values, no per-seed statistic: the same verdict"
                } else {
                    "the check already compares medians: the same verdict"
                },
            });
        }
    };
    json!({ "reproduced": ok, "detail": detail })
}

/// Decide a claim from the summary rows: `{text, reproduced, detail}`.
pub(super) fn check_claim(claim: &Claim, rows: &[Value]) -> Value {
    if let Some((ok, detail)) = super::generalization::check(claim, rows, false) {
        return json!({ "text": claim.text(), "reproduced": ok, "detail": detail });
    }
    let median = |r: &Value| r["iterations_to_converge"]["median"].as_f64();
    let conv = |r: &Value| {
        format!(
            "{}: {}/{} converged",
            r["label"].as_str().unwrap_or("?"),
            r["converged"],
            r["runs"]
        )
    };
    let gap = |r: &Value, k: &str| r["gap"][k].as_f64();
    let fmt_opt = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.0}"));
    let (ok, detail): (bool, String) = match claim {
        Claim::Converge { labels, .. } | Claim::Never { labels, .. } => {
            let rs: Vec<&Value> = labels.iter().filter_map(|l| row(rows, l)).collect();
            let fraction = match claim {
                Claim::Converge { min_fraction, .. } => Some(min_fraction.unwrap_or(1.0)),
                _ => None,
            };
            let ok = rs.len() == labels.len()
                && rs.iter().all(|r| {
                    let c = r["converged"].as_u64().unwrap_or(0) as f64;
                    let runs = r["runs"].as_u64().unwrap_or(0) as f64;
                    match fraction {
                        Some(f) => c > 0.0 && c >= (f * runs).ceil(),
                        None => c == 0.0,
                    }
                });
            (
                ok,
                rs.iter().map(|r| conv(r)).collect::<Vec<_>>().join("; "),
            )
        }
        Claim::Faster { labels, than, .. } => {
            // A reference that never converges (in median) counts as +∞.
            let reference = row(rows, than).and_then(median);
            let mut parts = vec![format!("{than}: median {}", fmt_opt(reference))];
            let mut ok = row(rows, than).is_some();
            for l in labels {
                let m = row(rows, l).and_then(median);
                parts.push(format!("{l}: median {}", fmt_opt(m)));
                ok &= m.is_some_and(|a| reference.is_none_or(|b| a < b));
            }
            (ok, format!("iterations to converge: {}", parts.join(", ")))
        }
        Claim::GapBelow { labels, max, .. } => {
            let mut ok = true;
            let mut parts = vec![];
            for l in labels {
                let v = row(rows, l).and_then(|r| gap(r, "max"));
                parts.push(format!("{l}: largest gap {}", fmt(v, 2)));
                ok &= v.is_some_and(|v| v <= *max);
            }
            (ok, format!("{} (bound ≤ {max} nats)", parts.join(", ")))
        }
        Claim::GapAbove {
            labels, min, than, ..
        } => {
            let base = match than {
                None => Some(0.0),
                Some(t) => row(rows, t).and_then(|r| gap(r, "max")),
            };
            let mut ok = base.is_some();
            let mut parts = vec![];
            if let Some(t) = than {
                parts.push(format!("{t}: largest gap {}", fmt(base, 2)));
            }
            for l in labels {
                let v = row(rows, l).and_then(|r| gap(r, "min"));
                parts.push(format!("{l}: smallest gap {}", fmt(v, 2)));
                ok &= matches!((v, base), (Some(v), Some(b)) if v >= b + min);
            }
            (
                ok,
                format!(
                    "{} (bound ≥ {}{min} nats)",
                    parts.join(", "),
                    than.as_ref().map_or(String::new(), |t| format!("{t}'s + "))
                ),
            )
        }
        Claim::MseRatio {
            labels,
            than,
            max,
            min,
            ..
        } => {
            let mse =
                |l: &str| row(rows, l).and_then(|r| r["mse"]["final_train"]["median"].as_f64());
            let base = mse(than);
            let mut ok = base.is_some();
            let mut parts = vec![format!("{than}: {}", fmt(base, 4))];
            for l in labels {
                let ratio = mse(l).zip(base).map(|(a, b)| a / b);
                parts.push(format!("{l}: {} (ratio {})", fmt(mse(l), 4), fmt(ratio, 2)));
                ok &=
                    ratio.is_some_and(|r| max.is_none_or(|m| r <= m) && min.is_none_or(|m| r >= m));
            }
            (
                ok,
                format!("median final training MSE: {}", parts.join(", ")),
            )
        }
        Claim::WindowBound { labels, .. } => {
            let b: Vec<Option<f64>> = labels
                .iter()
                .map(|l| row(rows, l).and_then(|r| r["best_window_gap"].as_f64()))
                .collect();
            let v: Vec<f64> = b.iter().flatten().copied().collect();
            let ok = v.len() == labels.len()
                && v.iter().all(|g| *g > 0.0)
                && v.windows(2).all(|w| w[1] < w[0]);
            let parts: Vec<String> = labels
                .iter()
                .zip(&b)
                .map(|(l, g)| format!("{l} {}", g.map_or("n/a".into(), |g| format!("{g:.3e}"))))
                .collect();
            (
                ok,
                format!(
                    "exact gap of the best function on each window: {}",
                    parts.join(" → ")
                ),
            )
        }
        Claim::GapShrinks { series, slack, .. } => {
            let mut ok = true;
            let mut parts = vec![];
            for s in series {
                let gaps: Vec<Option<f64>> = s
                    .iter()
                    .map(|l| row(rows, l).and_then(|r| gap(r, "median")))
                    .collect();
                let g: Vec<f64> = gaps.iter().flatten().copied().collect();
                let good = g.len() == s.len()
                    && g.windows(2).all(|w| w[1] <= w[0] + slack)
                    && g.last() < g.first();
                ok &= good;
                parts.push(
                    s.iter()
                        .zip(&gaps)
                        .map(|(l, g)| format!("{l} {}", fmt(*g, 2)))
                        .collect::<Vec<_>>()
                        .join(" → "),
                );
            }
            (ok, format!("median gaps: {}", parts.join("; ")))
        }
        Claim::HeldoutGapZero { .. } | Claim::HeldoutGapLikeTraining { .. } => {
            unreachable!("decided by summary::generalization")
        }
    };
    json!({ "text": claim.text(), "reproduced": ok, "detail": detail })
}
