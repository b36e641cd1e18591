//! Held-out data in a summary (experiments with a `heldout` block,
//! [`crate::experiment::HeldoutEntry`]): per run the training gap (the
//! exact optimal ELBO minus the method's where the model has one, else
//! F-VI's ELBO of the same seed, model and data) beside the held-out
//! gap (refined − amortized held-out ELBO), their statistics per method,
//! the two held-out claims and the REPORT.md table.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::experiment::Claim;
use crate::report::num;
use crate::run_report::HeldoutSection;

use super::claims::row;
use super::runs::{fmt, stats};

/// The per-seed entry of a run: its held-out section (or `null`) and its
/// training gap (`null` without an F-VI run of the same seed).
pub(super) fn seed_entry(h: Option<&HeldoutSection>, training_gap: Option<f64>) -> Value {
    json!({
        "training_gap": training_gap.map(num),
        "heldout": h.map(|h| json!({
            "n": h.n,
            "amortized_elbo": num(h.amortized_elbo),
            "amortized_elbo_se": num(h.amortized_elbo_se),
            "refined_elbo": num(h.refined_elbo),
            "refined_elbo_se": num(h.refined_elbo_se),
            "gap": num(h.gap),
            "gap_se": num(h.gap_se),
            "refine_status": h.refine_status,
            "outside_training_range": h.outside_training_range,
        })),
    })
}

/// The method's statistics over its per-seed entries.
pub(super) fn row_entry(per_seed: &[Value]) -> Value {
    let get = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<f64> {
        per_seed.iter().map(|s| f(s).unwrap_or(f64::NAN)).collect()
    };
    let held = |k: &'static str| move |s: &Value| s["generalization"]["heldout"][k].as_f64();
    json!({
        "training_gap": stats(&get(&|s| s["generalization"]["training_gap"].as_f64())),
        "heldout_gap": stats(&get(&held("gap"))),
        "heldout_gap_se": stats(&get(&held("gap_se"))),
        "amortized_elbo": stats(&get(&held("amortized_elbo"))),
        "refined_elbo": stats(&get(&held("refined_elbo"))),
        "outside_training_range": stats(&get(&held("outside_training_range"))),
        "encoded": per_seed.iter().filter(|s| !s["generalization"]["heldout"].is_null()).count(),
    })
}

/// (held-out gap, its SE, training gap) of every seed of a method; `None`
/// where a run has no held-out section.
fn seeds(r: &Value) -> Vec<(Option<f64>, Option<f64>, Option<f64>)> {
    r["seeds"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let g = &s["generalization"];
                    (
                        g["heldout"]["gap"].as_f64(),
                        g["heldout"]["gap_se"].as_f64(),
                        g["training_gap"].as_f64(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Decide a held-out claim on every seed (`median` false) or on the
/// medians over seeds; `None` for the other claim kinds.
pub(super) fn check(claim: &Claim, rows: &[Value], median: bool) -> Option<(bool, String)> {
    let med = |r: &Value, k: &str| r["generalization"][k]["median"].as_f64();
    match claim {
        Claim::HeldoutGapZero {
            labels,
            k_se,
            slack,
            ..
        } => {
            let within = |g: Option<f64>, se: Option<f64>| matches!((g, se), (Some(g), Some(se)) if g.abs() <= k_se * se + slack);
            let mut ok = true;
            let mut parts = vec![];
            for l in labels {
                let Some(r) = row(rows, l) else {
                    ok = false;
                    parts.push(format!("{l}: no runs"));
                    continue;
                };
                if median {
                    let (g, se) = (med(r, "heldout_gap"), med(r, "heldout_gap_se"));
                    ok &= within(g, se);
                    parts.push(format!(
                        "{l}: median held-out gap {} (median SE {})",
                        fmt(g, 2),
                        fmt(se, 2)
                    ));
                } else {
                    let s = seeds(r);
                    let bad: Vec<String> = s
                        .iter()
                        .filter(|(g, se, _)| !within(*g, *se))
                        .map(|(g, se, _)| format!("{} ± {}", fmt(*g, 2), fmt(*se, 2)))
                        .collect();
                    ok &= !s.is_empty() && bad.is_empty();
                    let worst = s
                        .iter()
                        .filter_map(|(g, _, _)| *g)
                        .map(f64::abs)
                        .fold(f64::NAN, f64::max);
                    parts.push(if bad.is_empty() {
                        format!("{l}: largest |held-out gap| {}", fmt(Some(worst), 2))
                    } else {
                        format!("{l}: outside the bound {}", bad.join(", "))
                    });
                }
            }
            Some((
                ok,
                format!(
                    "{} (bound |gap| ≤ {k_se} SE + {slack} nats)",
                    parts.join("; ")
                ),
            ))
        }
        Claim::HeldoutGapLikeTraining { labels, factor, .. } => {
            let like = |h: Option<f64>, t: Option<f64>| matches!((h, t), (Some(h), Some(t)) if t > 0.0 && h > 0.0 && h <= t * factor && h >= t / factor);
            let ratio = |h: Option<f64>, t: Option<f64>| h.zip(t).map(|(h, t)| h / t);
            let mut ok = true;
            let mut parts = vec![];
            for l in labels {
                let Some(r) = row(rows, l) else {
                    ok = false;
                    parts.push(format!("{l}: no runs"));
                    continue;
                };
                if median {
                    let (h, t) = (med(r, "heldout_gap"), med(r, "training_gap"));
                    ok &= like(h, t);
                    parts.push(format!(
                        "{l}: median held-out gap {} vs training gap {} (ratio {})",
                        fmt(h, 2),
                        fmt(t, 2),
                        fmt(ratio(h, t), 2)
                    ));
                } else {
                    let s = seeds(r);
                    ok &= !s.is_empty() && s.iter().all(|(h, _, t)| like(*h, *t));
                    let ratios: Vec<f64> = s
                        .iter()
                        .map(|(h, _, t)| ratio(*h, *t).unwrap_or(f64::NAN))
                        .collect();
                    let r = stats(&ratios);
                    parts.push(format!(
                        "{l}: held-out / training gap {}–{} over {} seeds",
                        fmt(r["min"].as_f64(), 2),
                        fmt(r["max"].as_f64(), 2),
                        s.len()
                    ));
                }
            }
            Some((
                ok,
                format!(
                    "{} (bound: ratio within ×{factor} either way)",
                    parts.join("; ")
                ),
            ))
        }
        _ => None,
    }
}

/// The REPORT.md section: one line per amortized method.
pub(super) fn markdown(md: &mut String, rows: &[Value]) {
    let rows: Vec<&Value> = rows
        .iter()
        .filter(|r| r["generalization"]["encoded"].as_u64().unwrap_or(0) > 0)
        .collect();
    if rows.is_empty() {
        return;
    }
    let cell = |v: &Value| super::markdown::cell_range(v, 2, false);
    let _ = writeln!(
        md,
        "\n## Held-out data\n\nEach amortized fit encodes a second data set (simulated with another seed and the same θ, or Fashion-MNIST test images). \
         Training gap: the exact optimal ELBO minus the method's ELBO where the model has one (linear, saw, mixture), else F-VI's ELBO of the same seed minus the method's (BNN). \
         Held-out gap: the held-out ELBO after F-VI steps on the encoder's factors with q(θ) held, minus the encoder's (same draws; log p(θ) and q(θ)'s entropy left out of both); \
         SE: its Monte Carlo standard error, from the per-draw differences. Medians over seeds (range).\n"
    );
    let _ = writeln!(
        md,
        "| method | group | training gap | held-out gap | SE | amortized held-out ELBO | refined | outside training range |\n|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let g = &r["generalization"];
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r["label"].as_str().unwrap_or("?"),
            r["group"].as_str().unwrap_or(""),
            cell(&g["training_gap"]),
            cell(&g["heldout_gap"]),
            cell(&g["heldout_gap_se"]),
            cell(&g["amortized_elbo"]),
            cell(&g["refined_elbo"]),
            fmt(g["outside_training_range"]["median"].as_f64(), 0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A summary row of `label` whose seeds have these (held-out gap, its
    /// SE, training gap).
    fn row_of(label: &str, seeds: &[(f64, f64, f64)]) -> Value {
        let per_seed: Vec<Value> = seeds
            .iter()
            .map(|&(g, se, t)| {
                json!({ "generalization": {
                    "training_gap": t,
                    "heldout": { "gap": g, "gap_se": se },
                }})
            })
            .collect();
        json!({
            "label": label,
            "generalization": row_entry(&per_seed),
            "seeds": per_seed,
        })
    }

    fn zero(k_se: f64, slack: f64) -> Claim {
        Claim::HeldoutGapZero {
            text: "t".into(),
            paper_verdicts: None,
            labels: vec!["a".into()],
            k_se,
            slack,
        }
    }

    fn like(factor: f64) -> Claim {
        Claim::HeldoutGapLikeTraining {
            text: "t".into(),
            paper_verdicts: None,
            labels: vec!["a".into()],
            factor,
        }
    }

    fn verdicts(claim: &Claim, rows: &[Value]) -> (bool, bool) {
        (
            check(claim, rows, false).unwrap().0,
            check(claim, rows, true).unwrap().0,
        )
    }

    /// HeldoutGapZero: |gap| ≤ k·SE + slack on every seed (inclusive, both
    /// signs); the median rule compares the median gap with the median SE.
    #[test]
    fn heldout_gap_zero_bound_is_inclusive_and_two_sided() {
        // 2·0.125 + 0.25 = 0.5 exactly (binary fractions): at the bound of
        // either sign it holds, a hair beyond it fails.
        let c = zero(2.0, 0.25);
        for (g, ok) in [
            (0.5, true),
            (-0.5, true),
            (0.0, true),
            (0.5 + 1e-12, false),
            (-0.5 - 1e-12, false),
        ] {
            assert_eq!(
                verdicts(&c, &[row_of("a", &[(g, 0.125, 0.0)])]),
                (ok, ok),
                "gap {g}"
            );
        }
        // One seed of three far out: every seed fails, the median holds.
        let rows = [row_of(
            "a",
            &[(0.1, 0.125, 0.0), (0.2, 0.125, 0.0), (50.0, 0.125, 0.0)],
        )];
        assert_eq!(verdicts(&c, &rows), (false, true));
        // A seed without a held-out section (NaN) fails; so does a missing
        // method.
        let rows = [row_of("a", &[(f64::NAN, 0.125, 0.0)])];
        assert_eq!(verdicts(&c, &rows), (false, false));
        assert_eq!(
            verdicts(&c, &[row_of("b", &[(0.0, 0.125, 0.0)])]),
            (false, false)
        );
    }

    /// HeldoutGapLikeTraining: held-out within ×factor of training either
    /// way, both positive; the median rule uses the two medians.
    #[test]
    fn heldout_gap_like_training_is_a_two_sided_ratio() {
        let c = like(2.0);
        for (g, t, ok) in [
            (200.0, 100.0, true),
            (50.0, 100.0, true),
            (100.0, 100.0, true),
            (200.5, 100.0, false),
            (49.5, 100.0, false),
            // A zero held-out gap (the encoder generalises) is not "as large".
            (0.0, 100.0, false),
            // No training gap to compare with.
            (0.0, 0.0, false),
            (-5.0, -5.0, false),
        ] {
            let rows = [row_of("a", &[(g, 0.1, t)])];
            assert_eq!(verdicts(&c, &rows), (ok, ok), "held-out {g} training {t}");
        }
        // One seed of three outside: every seed fails, the medians hold.
        let rows = [row_of(
            "a",
            &[(100.0, 0.1, 100.0), (110.0, 0.1, 100.0), (1.0, 0.1, 100.0)],
        )];
        assert_eq!(verdicts(&c, &rows), (false, true));
    }

    /// Other claim kinds are not decided here.
    #[test]
    fn other_claims_are_left_to_the_general_checks() {
        let c = Claim::Never {
            text: "t".into(),
            paper_verdicts: None,
            labels: vec!["a".into()],
        };
        assert!(check(&c, &[], false).is_none());
    }
}
