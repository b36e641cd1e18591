//! Axes: placing values (linear or log), ticks and their labels, text
//! widths and the legend's corner.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::plot::*;

/// Position of `v` on an axis: `log10(v)` on a log axis, `v` otherwise;
/// `None` when it cannot be drawn.
pub(super) fn place(v: f64, log: bool) -> Option<f64> {
    if !v.is_finite() {
        None
    } else if log {
        (v > 0.0).then(|| v.log10())
    } else {
        Some(v)
    }
}

/// One axis in plot space (`log10` of the values on a log axis).
pub(super) struct Axis {
    pub(super) log: bool,
    pub(super) lo: f64,
    pub(super) hi: f64,
    pub(super) ticks: Vec<f64>,
}

impl Axis {
    /// An axis covering plot-space values `min..=max`, padded.
    pub(super) fn new(
        title: &str,
        name: &'static str,
        log: bool,
        min: f64,
        max: f64,
    ) -> Result<Self, FigureError> {
        let span = max - min;
        let mag = min.abs().max(max.abs());
        let (lo, hi) = if span.is_finite() && span > 0.0 && span > mag * 1e-9 {
            (min - 0.05 * span, max + 0.05 * span)
        } else if log {
            (min - 0.5, max + 0.5)
        } else if mag > 1e-200 {
            (min - 0.1 * mag, max + 0.1 * mag)
        } else {
            (min - 1.0, max + 1.0)
        };
        if !(lo.is_finite() && hi.is_finite() && (hi - lo).is_finite() && hi > lo) {
            return Err(FigureError::Range {
                title: title.to_owned(),
                axis: name,
                lo: min,
                hi: max,
            });
        }
        let ticks = if log {
            log_ticks(lo, hi)
        } else {
            linear_ticks(lo, hi, 8)
        };
        Ok(Self { log, lo, hi, ticks })
    }

    /// The tick label of plot-space position `t`.
    pub(super) fn label(&self, t: f64) -> String {
        if self.log {
            format_number(10f64.powf(t))
        } else {
            format_number(t)
        }
    }

    /// Where plot-space value `t` lies, 0 at the low end and 1 at the high end.
    pub(super) fn fraction(&self, t: f64) -> f64 {
        (t - self.lo) / (self.hi - self.lo)
    }
}

/// A linear `plotters` coordinate with tick marks exactly at `ticks` (and
/// no light grid lines). Tick labels come from the mesh's label formatter.
pub(super) struct TickedCoord {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl TickedCoord {
    pub(super) fn new(lo: f64, hi: f64, ticks: Vec<f64>) -> Self {
        Self {
            inner: (lo..hi).into(),
            ticks,
        }
    }
}

impl Ranged for TickedCoord {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

/// About `target` ticks 1, 2 or 5 × 10^k apart inside `[lo, hi]`; the two
/// ends when no such ticks can be formed (degenerate or extreme ranges).
pub(super) fn linear_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = hi - lo;
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    if !(span.is_finite() && span > 0.0 && mag.is_finite() && mag > 0.0) {
        return vec![lo, hi];
    }
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let (k0, k1) = ((lo / step).ceil(), (hi / step).floor());
    if !(k0.abs() < 1e15 && k1.abs() < 1e15 && k1 >= k0 && k1 - k0 <= 100.0) {
        return vec![lo, hi];
    }
    let ticks: Vec<f64> = (k0 as i64..=k1 as i64)
        .map(|k| k as f64 * step)
        .filter(|t| *t >= lo && *t <= hi)
        .collect();
    if ticks.is_empty() {
        vec![lo, hi]
    } else {
        ticks
    }
}

/// Ticks for a log axis over plot-space `[lo, hi]` (log10 units): powers of
/// ten when three or more fit (thinned to at most about eight), else
/// 1, 2, 5 × 10^k, else linear ticks of the values themselves.
pub(super) fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (e0, e1) = (lo.ceil(), hi.floor());
    if e1 - e0 >= 2.0 && e1 - e0 < 1000.0 {
        let stride = ((e1 - e0 + 1.0) / 8.0).ceil().max(1.0) as usize;
        return (e0 as i64..=e1 as i64)
            .step_by(stride)
            .map(|e| e as f64)
            .collect();
    }
    let mut ticks = Vec::new();
    if hi - lo < 1000.0 {
        for e in lo.floor() as i64..=hi.ceil() as i64 {
            for m in [1.0f64, 2.0, 5.0] {
                let t = e as f64 + m.log10();
                if t >= lo && t <= hi {
                    ticks.push(t);
                }
            }
        }
    }
    if ticks.len() >= 2 {
        return ticks;
    }
    let raw: Vec<f64> = linear_ticks(10f64.powf(lo), 10f64.powf(hi), 5)
        .into_iter()
        .filter(|v| *v > 0.0)
        .map(f64::log10)
        .filter(|t| t.is_finite())
        .collect();
    if raw.is_empty() {
        vec![lo, hi]
    } else {
        raw
    }
}

/// A short tick label: plain decimals for magnitudes in `[1e-3, 1e5)`,
/// otherwise scientific (`2.5e-4`), trailing zeros removed.
pub(super) fn format_number(v: f64) -> String {
    fn trim(s: &str) -> &str {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s
        }
    }
    if v == 0.0 || !v.is_finite() {
        return if v.is_finite() {
            "0".to_owned()
        } else {
            v.to_string()
        };
    }
    if (1e-3..1e5).contains(&v.abs()) {
        trim(&format!("{v:.6}")).to_owned()
    } else {
        let s = format!("{v:.3e}");
        match s.split_once('e') {
            Some((mantissa, exp)) => format!("{}e{exp}", trim(mantissa)),
            None => s,
        }
    }
}

/// Maps a `plotters` error to [`FigureError::Render`] for figure `title`.
pub(super) fn render_error<E: std::fmt::Display>(title: &str) -> impl Fn(E) -> FigureError + '_ {
    move |e| FigureError::Render {
        title: title.to_owned(),
        message: e.to_string(),
    }
}

/// Width in pixels that `plotters` reserves for `chars` characters at
/// `size` (its 0.7 em per character estimate), rounded up.
pub(super) fn text_width(chars: usize, size: f64) -> u32 {
    (size / 1.24 / 1.24 * 0.7 * chars as f64).ceil() as u32
}

/// The legend corner covering the fewest of `points` (plot-space fractions
/// of the axes in `[0, 1]`); `legend` is the legend's size as fractions of
/// the plot area. Ties go to upper right, upper left, lower right, lower left.
pub(super) fn legend_corner(points: &[(f64, f64)], legend: (f64, f64)) -> SeriesLabelPosition {
    let (w, h) = (legend.0.min(1.0), legend.1.min(1.0));
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let covered = |right: bool, upper: bool| {
        points
            .iter()
            .filter(|(u, v)| {
                let in_x = if right { *u >= 1.0 - w } else { *u <= w };
                let in_y = if upper { *v >= 1.0 - h } else { *v <= h };
                in_x && in_y
            })
            .count()
    };
    let mut best = (SeriesLabelPosition::UpperRight, usize::MAX);
    for (pos, right, upper) in corners {
        let n = covered(right, upper);
        if n < best.1 {
            best = (pos, n);
        }
    }
    best.0
}
