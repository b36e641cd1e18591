//! Line charts (ELBO or MSE against iterations or time).

use plotters::prelude::*;

use super::axis::*;
use super::plot::*;

/// The SVG text of a line chart.
pub(super) fn render_line_plot(plot: &LinePlot) -> Result<String, FigureError> {
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
