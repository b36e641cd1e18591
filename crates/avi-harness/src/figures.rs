//! SVG figures: line charts (ELBO traces, error against data size) and
//! horizontal box plots (wall time to convergence per method, one value per
//! seed), drawn with `plotters`' SVG backend.
//!
//! # Text and fonts
//!
//! `plotters` is built without its `ttf` and `ab_glyph` features, so it links
//! no font library and reads no font file: text is written as SVG `<text>`
//! elements with the generic family `sans-serif`, and the viewer picks the
//! actual font. Layout (label areas, legend boxes) uses `plotters`' built-in
//! estimate of 0.7 em per character instead of font metrics. Drawing a figure
//! therefore works on a machine with no fonts and no fontconfig at all; the
//! test `renders_without_fonts` checks this in a child process whose
//! fontconfig sees nothing, and `text_is_measured_without_a_font` fails if a
//! font feature of `plotters` is ever switched on.
//!
//! # Axes
//!
//! Axis ranges come from the data, padded by 5 % of the span on each side
//! (half a decade on a log axis, or 10 % of the magnitude when all values are
//! equal). Log axes are drawn as linear axes over `log10(value)` with their
//! own tick marks at 1, 2 and 5 × 10^k (or only powers of ten when the range
//! covers three decades or more), labelled with the original values.
//!
//! # Writing
//!
//! A figure is rendered into memory first; only a complete SVG is written to a
//! temporary file in the destination folder and renamed over the target, so a
//! failure never leaves a half-written file. Parent folders are not created.
//!
//! ```no_run
//! use avi_harness::figures::{line_plot, LinePlot, Series};
//! # fn main() -> Result<(), avi_harness::figures::FigureError> {
//! let plot = LinePlot {
//!     title: "ELBO".into(),
//!     x_label: "iteration".into(),
//!     y_label: "ELBO".into(),
//!     log_x: false,
//!     log_y: false,
//!     series: vec![Series { label: "F-VI".into(), points: vec![(0.0, -9.0), (1.0, -5.0)] }],
//!     reference: Some((-4.0, "optimum".into())),
//! };
//! line_plot(std::path::Path::new("elbo.svg"), &plot)?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Generic font family written into every `<text>` element; the viewer
/// chooses the face, so no font is needed to draw.
const FONT: &str = "sans-serif";

/// Line chart size in pixels.
const LINE_SIZE: (u32, u32) = (800, 500);

/// Box plot width in pixels; the height grows with the number of groups.
const BOX_WIDTH: u32 = 800;

/// Margin around the chart in pixels.
const MARGIN: u32 = 15;

/// Tableau 10: distinct series colours, reused in order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Colour of the "did not converge" markers.
const NEVER_COLOR: RGBColor = RGBColor(214, 39, 40);

/// Errors from drawing or writing a figure.
#[derive(Debug, thiserror::Error)]
pub enum FigureError {
    /// Nothing in the input can be drawn on the requested axes.
    #[error("figure {title:?}: nothing to draw ({reason})")]
    Empty {
        /// Title of the figure.
        title: String,
        /// What was missing.
        reason: &'static str,
    },
    /// `never_at` of a box plot cannot be placed on its x axis.
    #[error("figure {title:?}: never_at = {value} cannot be placed on the {scale} x axis (it must be finite, and positive on a log axis)")]
    NeverAt {
        /// Title of the figure.
        title: String,
        /// The offending value.
        value: f64,
        /// `"linear"` or `"log"`.
        scale: &'static str,
    },
    /// The data span more than an `f64` can hold.
    #[error("figure {title:?}: the {axis} axis range [{lo}, {hi}] is too wide to draw")]
    Range {
        /// Title of the figure.
        title: String,
        /// `"x"` or `"y"`.
        axis: &'static str,
        /// Smallest value on the axis (log10 of it on a log axis).
        lo: f64,
        /// Largest value on the axis (log10 of it on a log axis).
        hi: f64,
    },
    /// `plotters` failed while drawing.
    #[error("figure {title:?}: drawing failed: {message}")]
    Render {
        /// Title of the figure.
        title: String,
        /// The drawing error.
        message: String,
    },
    /// The folder that should hold the figure does not exist.
    #[error("cannot write {}: the folder {} does not exist", path.display(), dir.display())]
    NoFolder {
        /// The figure's path.
        path: PathBuf,
        /// Its missing parent folder.
        dir: PathBuf,
    },
    /// Writing the file failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The figure's path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// One named curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry (no entry when empty).
    pub label: String,
    /// `(x, y)` points, drawn joined in the given order.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
///
/// Points that are not finite, or not positive on a log axis, are dropped; a
/// series left with no points is skipped. Series get distinct colours from a
/// ten-colour palette (reused beyond ten) and a legend, placed in the corner
/// of the plot that covers the fewest points. Series with at most 50 points
/// also get a dot at each point, so short curves (and single points) show.
#[derive(Debug, Clone, PartialEq)]
pub struct LinePlot {
    /// Title above the chart.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Log-scale x axis.
    pub log_x: bool,
    /// Log-scale y axis.
    pub log_y: bool,
    /// The curves.
    pub series: Vec<Series>,
    /// Optional dashed horizontal reference line (value, label), e.g. the
    /// closed-form optimum or MSE 0.03. It is included in the y range and
    /// listed in the legend; it is left out when it cannot be placed on the
    /// y axis (not finite, or not positive on a log axis).
    pub reference: Option<(f64, String)>,
}

/// One group of a box plot: a value per seed; `None` = "did not converge".
#[derive(Debug, Clone, PartialEq)]
pub struct BoxGroup {
    /// Row label.
    pub label: String,
    /// One value per seed; `None` when that seed did not converge.
    pub values: Vec<Option<f64>>,
}

/// Horizontal box plots, one row per group (like Fig. 4 of Margossian & Blei
/// 2024: methods on the y axis, wall time to convergence on the x axis).
///
/// Rows run top to bottom in the order of `groups`, labelled with the group
/// labels. In each row:
/// - the box spans the first to the third quartile of the converged values and
///   a vertical line marks the median. Quartiles use linear interpolation
///   between order statistics (Hyndman & Fan type 7, the default of numpy and
///   R): with the `n` sorted values `x[0..n]`, the `p`-quantile is
///   `x[⌊h⌋] + (h − ⌊h⌋)(x[⌊h⌋+1] − x[⌊h⌋])` for `h = (n − 1)p`, computed on
///   the values themselves even on a log axis;
/// - whiskers reach the smallest and the largest converged value;
/// - every converged seed is also drawn as a small dot, spread vertically by
///   seed index so that equal values stay visible;
/// - every seed that did not converge is drawn as a red cross at `never_at`,
///   with the count (`k/n`) above; a group whose values are all `None` is thus
///   a collapsed column of crosses at `never_at`.
///
/// Converged values that cannot be placed on the axis (not finite, or not
/// positive on a log axis) are dropped. The legend explains the dots and the
/// crosses.
#[derive(Debug, Clone, PartialEq)]
pub struct BoxPlot {
    /// Title above the chart.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Log-scale x axis.
    pub log_x: bool,
    /// The rows, top to bottom.
    pub groups: Vec<BoxGroup>,
    /// Where "did not converge" values are drawn (e.g. the longest run's
    /// total time): they are drawn collapsed at this right edge with a
    /// distinct marker (a red cross), and the legend says "did not converge".
    /// Must be finite (and positive on a log axis) when any value is `None`.
    pub never_at: f64,
}

/// Draw `plot` as an 800 × 500 SVG at `path`, written atomically.
///
/// Errors when no series has a drawable point ([`FigureError::Empty`]), when
/// the data span more than an `f64` holds, when the parent folder is missing
/// or when writing fails; `path` is then left as it was.
pub fn line_plot(path: &Path, plot: &LinePlot) -> Result<(), FigureError> {
    let svg = render_line_plot(plot)?;
    write_atomic(path, &svg)
}

/// Draw `plot` as an SVG at `path` (800 pixels wide, about 45 pixels per
/// group high), written atomically.
///
/// Errors when there are no groups or no seed at all can be drawn
/// ([`FigureError::Empty`]), when some seed did not converge and `never_at`
/// cannot be placed ([`FigureError::NeverAt`]), when the parent folder is
/// missing or when writing fails; `path` is then left as it was.
pub fn box_plot(path: &Path, plot: &BoxPlot) -> Result<(), FigureError> {
    let svg = render_box_plot(plot)?;
    write_atomic(path, &svg)
}

/// Position of `v` on an axis: `log10(v)` on a log axis, `v` otherwise;
/// `None` when it cannot be drawn.
fn place(v: f64, log: bool) -> Option<f64> {
    if !v.is_finite() {
        None
    } else if log {
        (v > 0.0).then(|| v.log10())
    } else {
        Some(v)
    }
}

/// One axis in plot space (`log10` of the values on a log axis).
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// An axis covering plot-space values `min..=max`, padded.
    fn new(
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
    fn label(&self, t: f64) -> String {
        if self.log {
            format_number(10f64.powf(t))
        } else {
            format_number(t)
        }
    }

    /// Where plot-space value `t` lies, 0 at the low end and 1 at the high end.
    fn fraction(&self, t: f64) -> f64 {
        (t - self.lo) / (self.hi - self.lo)
    }
}

/// A linear `plotters` coordinate with tick marks exactly at `ticks` (and
/// no light grid lines). Tick labels come from the mesh's label formatter.
struct TickedCoord {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl TickedCoord {
    fn new(lo: f64, hi: f64, ticks: Vec<f64>) -> Self {
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
fn linear_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
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
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
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
fn format_number(v: f64) -> String {
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
fn render_error<E: std::fmt::Display>(title: &str) -> impl Fn(E) -> FigureError + '_ {
    move |e| FigureError::Render {
        title: title.to_owned(),
        message: e.to_string(),
    }
}

/// Width in pixels that `plotters` reserves for `chars` characters at
/// `size` (its 0.7 em per character estimate), rounded up.
fn text_width(chars: usize, size: f64) -> u32 {
    (size / 1.24 / 1.24 * 0.7 * chars as f64).ceil() as u32
}

/// The legend corner covering the fewest of `points` (plot-space fractions
/// of the axes in `[0, 1]`); `legend` is the legend's size as fractions of
/// the plot area. Ties go to upper right, upper left, lower right, lower left.
fn legend_corner(points: &[(f64, f64)], legend: (f64, f64)) -> SeriesLabelPosition {
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

/// The SVG text of a line chart.
fn render_line_plot(plot: &LinePlot) -> Result<String, FigureError> {
    let title = plot.title.as_str();
    /// A series with its palette index and its points in plot space.
    struct Drawn<'a> {
        color: usize,
        label: &'a str,
        points: Vec<(f64, f64)>,
    }
    let series: Vec<Drawn> = plot
        .series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter_map(|&(x, y)| Some((place(x, plot.log_x)?, place(y, plot.log_y)?)))
                .collect();
            Drawn {
                color: i,
                label: s.label.as_str(),
                points: pts,
            }
        })
        .filter(|d| !d.points.is_empty())
        .collect();
    if series.is_empty() {
        return Err(FigureError::Empty {
            title: title.to_owned(),
            reason: "no series has a finite point that fits the axes",
        });
    }
    let reference = plot
        .reference
        .as_ref()
        .and_then(|(v, label)| Some((place(*v, plot.log_y)?, label.as_str())));

    let all = || series.iter().flat_map(|d| d.points.iter());
    let (mut x_min, mut x_max) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y_min, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all() {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if let Some((r, _)) = reference {
        y_min = y_min.min(r);
        y_max = y_max.max(r);
    }
    let x_axis = Axis::new(title, "x", plot.log_x, x_min, x_max)?;
    let y_axis = Axis::new(title, "y", plot.log_y, y_min, y_max)?;

    let y_tick_chars = y_axis
        .ticks
        .iter()
        .map(|t| y_axis.label(*t).chars().count())
        .max()
        .unwrap_or(1);
    let y_area = (text_width(y_tick_chars, 14.0) + 45).clamp(60, 200);
    let x_area = 50;

    // Legend placement: entries and their widest label, against the plot area.
    let labels: Vec<&str> = series
        .iter()
        .map(|d| d.label)
        .chain(reference.map(|(_, l)| l))
        .filter(|l| !l.is_empty())
        .collect();
    let plot_w = f64::from(LINE_SIZE.0 - 2 * MARGIN - y_area);
    let plot_h = f64::from(LINE_SIZE.1 - 2 * MARGIN - x_area - 35);
    let legend_w = f64::from(
        text_width(
            labels.iter().map(|l| l.chars().count()).max().unwrap_or(0),
            14.0,
        ) + 50,
    );
    let legend_h = 20.0 * labels.len() as f64 + 20.0;
    let mut occupied: Vec<(f64, f64)> = all()
        .map(|&(x, y)| (x_axis.fraction(x), y_axis.fraction(y)))
        .collect();
    if let Some((r, _)) = reference {
        let v = y_axis.fraction(r);
        occupied.extend((0..=20).map(|i| (f64::from(i) / 20.0, v)));
    }
    let corner = legend_corner(&occupied, (legend_w / plot_w, legend_h / plot_h));

    let mut svg = String::new();
    {
        let err = render_error(title);
        let root = SVGBackend::with_string(&mut svg, LINE_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(MARGIN)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area)
            .build_cartesian_2d(
                TickedCoord::new(x_axis.lo, x_axis.hi, x_axis.ticks.clone()),
                TickedCoord::new(y_axis.lo, y_axis.hi, y_axis.ticks.clone()),
            )
            .map_err(&err)?;
        let x_fmt = |t: &f64| x_axis.label(*t);
        let y_fmt = |t: &f64| y_axis.label(*t);
        chart
            .configure_mesh()
            .x_desc(plot.x_label.as_str())
            .y_desc(plot.y_label.as_str())
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .bold_line_style(BLACK.mix(0.1))
            .draw()
            .map_err(&err)?;

        for d in &series {
            let (color, pts) = (PALETTE[d.color % PALETTE.len()], &d.points);
            let style = color.stroke_width(2);
            let mut line = LineSeries::new(pts.iter().copied(), style);
            if pts.len() <= 50 {
                line = line.point_size(3);
            }
            let anno = chart.draw_series(line).map_err(&err)?;
            if !d.label.is_empty() {
                anno.label(d.label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        if let Some((r, label)) = reference {
            let style = BLACK.mix(0.7).stroke_width(2);
            let anno = chart
                .draw_series(DashedLineSeries::new(
                    vec![(x_axis.lo, r), (x_axis.hi, r)],
                    8,
                    5,
                    style,
                ))
                .map_err(&err)?;
            if !label.is_empty() {
                anno.label(label).legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (7, 0)], style)
                        + PathElement::new(vec![(12, 0), (20, 0)], style)
                });
            }
        }
        if !labels.is_empty() {
            chart
                .configure_series_labels()
                .position(corner)
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(&err)?;
        }
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// The `p`-quantile of sorted, non-empty `x` by linear interpolation between
/// order statistics (Hyndman & Fan type 7).
fn quantile(x: &[f64], p: f64) -> f64 {
    let h = (x.len() - 1) as f64 * p;
    let i = h.floor() as usize;
    match x.get(i + 1) {
        Some(next) => x[i] + (h - i as f64) * (next - x[i]),
        None => x[i],
    }
}

/// Vertical offset (in rows) of seed `j` of `n`, spreading seeds over the box.
fn jitter(j: usize, n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        -0.18 + 0.36 * j as f64 / (n - 1) as f64
    }
}

/// The SVG text of a box plot.
fn render_box_plot(plot: &BoxPlot) -> Result<String, FigureError> {
    let title = plot.title.as_str();
    let n_groups = plot.groups.len();
    if n_groups == 0 {
        return Err(FigureError::Empty {
            title: title.to_owned(),
            reason: "no groups",
        });
    }
    let any_never = plot
        .groups
        .iter()
        .any(|g| g.values.iter().any(Option::is_none));
    let never_t = if any_never {
        Some(
            place(plot.never_at, plot.log_x).ok_or_else(|| FigureError::NeverAt {
                title: title.to_owned(),
                value: plot.never_at,
                scale: if plot.log_x { "log" } else { "linear" },
            })?,
        )
    } else {
        None
    };
    // Row `r` (0 at the top) sits at y = n_groups - 1 - r.
    let row_y = |r: usize| (n_groups - 1 - r) as f64;

    struct Row {
        y: f64,
        /// Sorted converged values (raw, not log10), for the quartiles.
        sorted: Vec<f64>,
        /// (x, y) of each converged seed's dot.
        dots: Vec<(f64, f64)>,
        /// (x, y) of each non-converged seed's cross.
        crosses: Vec<(f64, f64)>,
        seeds: usize,
    }
    let rows: Vec<Row> = plot
        .groups
        .iter()
        .enumerate()
        .map(|(r, g)| {
            let y = row_y(r);
            let n = g.values.len();
            let mut row = Row {
                y,
                sorted: Vec::new(),
                dots: Vec::new(),
                crosses: Vec::new(),
                seeds: n,
            };
            for (j, v) in g.values.iter().enumerate() {
                let dy = y + jitter(j, n);
                match v {
                    Some(v) => {
                        if let Some(t) = place(*v, plot.log_x) {
                            row.sorted.push(*v);
                            row.dots.push((t, dy));
                        }
                    }
                    None => row.crosses.extend(never_t.map(|t| (t, dy))),
                }
            }
            row.sorted.sort_by(f64::total_cmp);
            row
        })
        .collect();

    let xs = || {
        rows.iter()
            .flat_map(|r| r.dots.iter().chain(r.crosses.iter()))
            .map(|p| p.0)
    };
    if xs().next().is_none() {
        return Err(FigureError::Empty {
            title: title.to_owned(),
            reason: "no seed has a value that fits the axis",
        });
    }
    let x_min = xs().fold(f64::INFINITY, f64::min);
    let x_max = xs().fold(f64::NEG_INFINITY, f64::max);
    let x_axis = Axis::new(title, "x", plot.log_x, x_min, x_max)?;
    // 1.6 spare rows at the bottom hold the legend.
    let (y_lo, y_hi) = (-2.1, n_groups as f64 - 0.4);
    let y_ticks: Vec<f64> = (0..n_groups).map(|r| r as f64).collect();

    let label_chars = plot
        .groups
        .iter()
        .map(|g| g.label.chars().count())
        .max()
        .unwrap_or(1);
    let y_area = (text_width(label_chars, 14.0) + 20).clamp(60, 320);
    // About 45 pixels per row: caption, x axis and margins take 115.
    let height = (115.0 + 45.0 * (y_hi - y_lo)).round().max(260.0) as u32;

    let mut svg = String::new();
    {
        let err = render_error(title);
        let root = SVGBackend::with_string(&mut svg, (BOX_WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(MARGIN)
            .x_label_area_size(50)
            .y_label_area_size(y_area)
            .build_cartesian_2d(
                TickedCoord::new(x_axis.lo, x_axis.hi, x_axis.ticks.clone()),
                TickedCoord::new(y_lo, y_hi, y_ticks),
            )
            .map_err(&err)?;
        let x_fmt = |t: &f64| x_axis.label(*t);
        let y_fmt = |t: &f64| {
            let r = t.round();
            if r >= 0.0 && r < n_groups as f64 {
                plot.groups[n_groups - 1 - r as usize].label.clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_desc(plot.x_label.as_str())
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .bold_line_style(BLACK.mix(0.1))
            .disable_y_mesh()
            .draw()
            .map_err(&err)?;

        let color = PALETTE[0];
        let half = 0.25;
        for row in rows.iter().filter(|r| !r.sorted.is_empty()) {
            let s = &row.sorted;
            let at = |v: f64| place(v, plot.log_x).unwrap_or(x_axis.lo);
            let (lo, q1, med, q3, hi) = (
                at(s[0]),
                at(quantile(s, 0.25)),
                at(quantile(s, 0.5)),
                at(quantile(s, 0.75)),
                at(s[s.len() - 1]),
            );
            let y = row.y;
            let line = color.stroke_width(2);
            chart
                .draw_series([
                    Rectangle::new([(q1, y - half), (q3, y + half)], color.mix(0.2).filled()),
                    Rectangle::new([(q1, y - half), (q3, y + half)], line),
                ])
                .map_err(&err)?;
            chart
                .draw_series([
                    PathElement::new(vec![(lo, y), (q1, y)], line),
                    PathElement::new(vec![(q3, y), (hi, y)], line),
                    PathElement::new(vec![(lo, y - 0.12), (lo, y + 0.12)], line),
                    PathElement::new(vec![(hi, y - 0.12), (hi, y + 0.12)], line),
                    PathElement::new(
                        vec![(med, y - half), (med, y + half)],
                        BLACK.stroke_width(3),
                    ),
                ])
                .map_err(&err)?;
        }

        let dot_style = BLACK.mix(0.6).filled();
        chart
            .draw_series(
                rows.iter()
                    .flat_map(|r| r.dots.iter())
                    .map(|&p| Circle::new(p, 3, dot_style)),
            )
            .map_err(&err)?
            .label("one seed (converged)")
            .legend(move |p| Circle::new(p, 3, dot_style));

        if any_never {
            let cross = NEVER_COLOR.stroke_width(2);
            let at = format_number(plot.never_at);
            chart
                .draw_series(
                    rows.iter()
                        .flat_map(|r| r.crosses.iter())
                        .map(|&p| Cross::new(p, 5, cross)),
                )
                .map_err(&err)?
                .label(format!("did not converge (drawn at {at})"))
                .legend(move |p| Cross::new(p, 5, cross));
            let count_style = TextStyle::from((FONT, 13).into_font())
                .color(&NEVER_COLOR)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .draw_series(rows.iter().filter(|r| !r.crosses.is_empty()).map(|r| {
                    let x = r.crosses[0].0;
                    Text::new(
                        format!("{}/{}", r.crosses.len(), r.seeds),
                        (x, r.y + 0.3),
                        count_style.clone(),
                    )
                }))
                .map_err(&err)?;
        }

        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(&err)?;
        root.present().map_err(&err)?;
    }
    Ok(svg)
}

/// Write `svg` to `path` atomically: a temporary file in the same folder is
/// written, flushed and renamed over `path`.
fn write_atomic(path: &Path, svg: &str) -> Result<(), FigureError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(FigureError::NoFolder {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        });
    }
    let io = |source| FigureError::Io {
        path: path.to_path_buf(),
        source,
    };
    crate::report::write_atomic(path, svg.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace_plot() -> LinePlot {
        LinePlot {
            title: "ELBO trace".into(),
            x_label: "wall time (s)".into(),
            y_label: "ELBO".into(),
            log_x: false,
            log_y: false,
            series: vec![
                Series {
                    label: "F-VI".into(),
                    points: (0..200)
                        .map(|i| (f64::from(i) * 0.01, -100.0 / f64::from(i + 1)))
                        .collect(),
                },
                Series {
                    label: "A-VI".into(),
                    points: vec![(0.0, -80.0), (0.5, -20.0), (1.5, -3.0)],
                },
            ],
            reference: Some((-1.0, "closed-form optimum".into())),
        }
    }

    fn time_plot() -> BoxPlot {
        BoxPlot {
            title: "Time to convergence".into(),
            x_label: "wall time (s)".into(),
            log_x: true,
            groups: vec![
                BoxGroup {
                    label: "F-VI".into(),
                    values: vec![Some(3.0), Some(4.5), Some(2.0), Some(6.0), Some(3.3)],
                },
                BoxGroup {
                    label: "A-VI, k = 10".into(),
                    values: vec![Some(1.0), None, Some(1.4), Some(0.9), None],
                },
                BoxGroup {
                    label: "Const".into(),
                    values: vec![None, None, None],
                },
            ],
            never_at: 20.0,
        }
    }

    fn assert_svg(svg: &str, texts: &[&str]) {
        assert!(
            svg.starts_with("<svg"),
            "not an SVG: {}",
            &svg[..svg.len().min(80)]
        );
        assert!(svg.trim_end().ends_with("</svg>"), "SVG not closed");
        assert!(svg.contains(r#"font-family="sans-serif""#));
        for t in texts {
            assert!(svg.contains(t), "{t:?} missing from the SVG");
        }
    }

    /// Files in `dir` (to check that no temporary file is left behind).
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_line_plot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.svg");
        line_plot(&path, &trace_plot()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_svg(
            &svg,
            &[
                "ELBO trace",
                "wall time (s)",
                "ELBO",
                "F-VI",
                "A-VI",
                "closed-form optimum",
            ],
        );
        assert_eq!(files(dir.path()), vec![path]);
    }

    #[test]
    fn writes_box_plot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("time.svg");
        box_plot(&path, &time_plot()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_svg(
            &svg,
            &[
                "Time to convergence",
                "wall time (s)",
                "F-VI",
                "A-VI, k = 10",
                "Const",
                "did not converge",
                "2/5",
                "3/3",
            ],
        );
        assert_eq!(files(dir.path()), vec![path]);
    }

    #[test]
    fn text_is_escaped() {
        let mut plot = trace_plot();
        plot.title = "a < b & \"c\"".into();
        let svg = render_line_plot(&plot).unwrap();
        assert!(svg.contains("a &lt; b &amp; &quot;c&quot;"));
    }

    #[test]
    fn overwrites_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.svg");
        std::fs::write(&path, "old").unwrap();
        line_plot(&path, &trace_plot()).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("<svg"));
        assert_eq!(files(dir.path()), vec![path]);
    }

    #[test]
    fn nothing_drawable_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.svg");
        let mut plot = trace_plot();
        plot.series.clear();
        assert!(matches!(
            line_plot(&path, &plot),
            Err(FigureError::Empty { .. })
        ));
        plot.series = vec![
            Series {
                label: "nan".into(),
                points: vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)],
            },
            Series {
                label: "none".into(),
                points: vec![],
            },
        ];
        assert!(matches!(
            line_plot(&path, &plot),
            Err(FigureError::Empty { .. })
        ));
        plot.log_y = true;
        plot.series = vec![Series {
            label: "non-positive".into(),
            points: vec![(1.0, 0.0), (2.0, -3.0)],
        }];
        assert!(matches!(
            line_plot(&path, &plot),
            Err(FigureError::Empty { .. })
        ));

        let mut boxes = time_plot();
        boxes.groups.clear();
        assert!(matches!(
            box_plot(&path, &boxes),
            Err(FigureError::Empty { .. })
        ));
        boxes.groups = vec![
            BoxGroup {
                label: "no seeds".into(),
                values: vec![],
            },
            BoxGroup {
                label: "bad".into(),
                values: vec![Some(f64::NAN), Some(-1.0)],
            },
        ];
        assert!(matches!(
            box_plot(&path, &boxes),
            Err(FigureError::Empty { .. })
        ));
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn bad_never_at_is_an_error() {
        let mut plot = time_plot();
        plot.never_at = 0.0;
        assert!(matches!(
            render_box_plot(&plot),
            Err(FigureError::NeverAt { .. })
        ));
        plot.log_x = false;
        plot.never_at = f64::NAN;
        assert!(matches!(
            render_box_plot(&plot),
            Err(FigureError::NeverAt { .. })
        ));
        // Not needed when every seed converged.
        plot.groups.truncate(1);
        render_box_plot(&plot).unwrap();
    }

    #[test]
    fn missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/folder/f.svg");
        assert!(matches!(
            line_plot(&path, &trace_plot()),
            Err(FigureError::NoFolder { .. })
        ));
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn log_axes_drop_non_positive_points() {
        let mut plot = trace_plot();
        plot.log_x = true;
        plot.log_y = true;
        plot.series = vec![
            Series {
                label: "mixed".into(),
                points: vec![
                    (0.0, 1.0),
                    (-1.0, 2.0),
                    (10.0, 0.0),
                    (100.0, 0.5),
                    (1e3, 0.03),
                ],
            },
            Series {
                label: "all negative".into(),
                points: vec![(-1.0, -1.0), (0.0, 0.0)],
            },
        ];
        plot.reference = Some((0.03, "MSE 0.03".into()));
        let svg = render_line_plot(&plot).unwrap();
        assert_svg(&svg, &["mixed", "MSE 0.03"]);
        assert!(
            !svg.contains("all negative"),
            "an empty series got a legend entry"
        );
        // A reference that cannot be placed is left out, not an error.
        plot.reference = Some((-1.0, "negative reference".into()));
        let svg = render_line_plot(&plot).unwrap();
        assert!(!svg.contains("negative reference"));
    }

    #[test]
    fn degenerate_ranges_do_not_panic() {
        for (log_x, log_y) in [(false, false), (true, true)] {
            for points in [
                vec![(1.0, 1.0)],
                vec![(0.5, 2.0), (0.5, 2.0)],
                vec![(1.0, 3.0), (2.0, 3.0)],
                vec![(1e-300, 1e300), (2e-300, 1e300)],
                vec![(1.0, 1.0), (1.0 + 1e-15, 1.0 + 1e-15)],
                vec![(5e-324, 5e-324)],
            ] {
                let plot = LinePlot {
                    log_x,
                    log_y,
                    series: vec![Series {
                        label: "s".into(),
                        points: points.clone(),
                    }],
                    reference: None,
                    ..trace_plot()
                };
                let svg = render_line_plot(&plot)
                    .unwrap_or_else(|e| panic!("{points:?} log={log_x}: {e}"));
                assert_svg(&svg, &["s"]);
            }
        }
        let mut plot = trace_plot();
        plot.series = vec![Series {
            label: "huge".into(),
            points: vec![(0.0, -1e308), (1.0, 1e308)],
        }];
        plot.reference = None;
        assert!(matches!(
            render_line_plot(&plot),
            Err(FigureError::Range { axis: "y", .. })
        ));
    }

    #[test]
    fn box_plot_all_none_and_single_values() {
        let mut plot = time_plot();
        plot.groups = vec![
            BoxGroup {
                label: "never".into(),
                values: vec![None; 4],
            },
            BoxGroup {
                label: "never either".into(),
                values: vec![None],
            },
        ];
        let svg = render_box_plot(&plot).unwrap();
        assert_svg(
            &svg,
            &["never", "never either", "did not converge", "4/4", "1/1"],
        );
        plot.log_x = false;
        plot.groups.push(BoxGroup {
            label: "one seed".into(),
            values: vec![Some(20.0)],
        });
        let svg = render_box_plot(&plot).unwrap();
        assert_svg(&svg, &["one seed"]);
    }

    #[test]
    fn output_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.svg"), dir.path().join("b.svg"));
        line_plot(&a, &trace_plot()).unwrap();
        line_plot(&b, &trace_plot()).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        box_plot(&a, &time_plot()).unwrap();
        box_plot(&b, &time_plot()).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn quartiles_follow_type_7() {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12;
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!(close(quantile(&x, 0.25), 1.75));
        assert!(close(quantile(&x, 0.5), 2.5));
        assert!(close(quantile(&x, 0.75), 3.25));
        assert!(close(quantile(&x, 0.0), 1.0));
        assert!(close(quantile(&x, 1.0), 4.0));
        assert!(close(quantile(&[7.0], 0.25), 7.0));
    }

    #[test]
    fn ticks_and_labels() {
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-9)
        };
        let t = linear_ticks(-0.05, 1.05, 8);
        assert!(close(&t, &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]), "{t:?}");
        // Three or more decades: powers of ten only.
        assert!(close(&log_ticks(-0.2, 3.1), &[0.0, 1.0, 2.0, 3.0]));
        // Fewer: 1, 2, 5 × 10^k.
        let t: Vec<String> = log_ticks(0.1, 1.5)
            .iter()
            .map(|t| format_number(10f64.powf(*t)))
            .collect();
        assert_eq!(t, ["2", "5", "10", "20"]);
        // Within a factor of two: ticks of the values themselves.
        assert!(log_ticks(0.1, 0.25).len() >= 2);
        for (v, s) in [
            (0.0, "0"),
            (0.30000000000000004, "0.3"),
            (-2.5, "-2.5"),
            (1e5, "1e5"),
            (2.5e-4, "2.5e-4"),
            (123456.0, "1.235e5"),
            (0.001, "0.001"),
        ] {
            assert_eq!(format_number(v), s);
        }
    }

    /// `plotters`' font-free layout measures every character as 0.7 em; a
    /// real font (the `ttf` or `ab_glyph` features, e.g. switched on by
    /// another crate through feature unification) would measure "iiii" and
    /// "MMMM" differently and need font files at run time.
    #[test]
    fn text_is_measured_without_a_font() {
        let font = FontDesc::new(FontFamily::SansSerif, 20.0, FontStyle::Normal);
        let narrow = font.box_size("iiii").unwrap();
        let wide = font.box_size("MMMM").unwrap();
        assert_eq!(
            narrow, wide,
            "plotters measures text with a real font: keep its `ttf` and `ab_glyph` features off"
        );
        // `text_width` rounds up where plotters rounds to nearest.
        assert!(text_width(4, 20.0).abs_diff(narrow.0) <= 1, "{narrow:?}");
    }

    /// Draws both figures in a child process whose fontconfig, home and XDG
    /// folders hold nothing, as on a bare CI machine.
    #[test]
    fn renders_without_fonts() {
        let empty = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["figures::tests::writes_", "--test-threads=1"])
            .env("FONTCONFIG_FILE", "/dev/null")
            .env("FONTCONFIG_PATH", empty.path())
            .env("HOME", empty.path())
            .env("XDG_DATA_HOME", empty.path())
            .env("XDG_DATA_DIRS", empty.path())
            .env("XDG_CONFIG_HOME", empty.path())
            .env("XDG_CACHE_HOME", empty.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("2 passed"),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
