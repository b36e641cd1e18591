//! Box plots (iterations or time to convergence, one box per method).

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::axis::*;
use super::plot::*;

/// The `p`-quantile of sorted, non-empty `x` by linear interpolation between
/// order statistics (Hyndman & Fan type 7).
pub(super) fn quantile(x: &[f64], p: f64) -> f64 {
    let h = (x.len() - 1) as f64 * p;
    let i = h.floor() as usize;
    match x.get(i + 1) {
        Some(next) => x[i] + (h - i as f64) * (next - x[i]),
        None => x[i],
    }
}

/// Vertical offset (in rows) of seed `j` of `n`, spreading seeds over the box.
pub(super) fn jitter(j: usize, n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        -0.18 + 0.36 * j as f64 / (n - 1) as f64
    }
}

/// The SVG text of a box plot.
pub(super) fn render_box_plot(plot: &BoxPlot) -> Result<String, FigureError> {
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
