//! The figures' inputs (series, groups, titles), their errors and the
//! shared style (font, sizes, palette).

use std::path::PathBuf;

use plotters::prelude::*;

/// Generic font family written into every `<text>` element; the viewer
/// chooses the face, so no font is needed to draw.
pub(super) const FONT: &str = "sans-serif";

/// Line chart size in pixels.
pub(super) const LINE_SIZE: (u32, u32) = (800, 500);

/// Box plot width in pixels; the height grows with the number of groups.
pub(super) const BOX_WIDTH: u32 = 800;

/// Margin around the chart in pixels.
pub(super) const MARGIN: u32 = 15;

/// Tableau 10: distinct series colours, reused in order.
pub(super) const PALETTE: [RGBColor; 10] = [
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
pub(super) const NEVER_COLOR: RGBColor = RGBColor(214, 39, 40);

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
