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

mod axis;
mod boxes;
mod lines;
mod plot;

use std::path::Path;

use boxes::render_box_plot;
use lines::render_line_plot;
pub use plot::{BoxGroup, BoxPlot, FigureError, LinePlot, Series};

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
    use super::axis::*;
    use super::boxes::*;
    use super::plot::*;
    use super::*;
    use plotters::prelude::*;
    use std::path::PathBuf;

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
