//! The latency chart: one deposit's latency against the stream length, log-log, PNG.

use std::error::Error;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::Latency;

/// The fonts tried for the labels, in order; the chart is drawn without text if none loads.
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the first font found as "sans-serif"; false when none is there.
fn load_font() -> bool {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Draws the chart to `path`; says whether it has text.
pub fn draw(
    path: &str,
    lengths: &[usize],
    latency: &Latency,
) -> Result<&'static str, Box<dyn Error>> {
    let text = load_font();
    let series: [(&str, &Vec<f64>, RGBColor); 4] = [
        (
            "cqrs-es 0.5 MemStore",
            &latency.cqrs_es,
            RGBColor(214, 39, 40),
        ),
        (
            "ours, without_state_cache (full replay)",
            &latency.ours_no_cache,
            RGBColor(31, 119, 180),
        ),
        (
            "ours, no cache, snapshots every 100",
            &latency.ours_snapshots,
            RGBColor(255, 127, 14),
        ),
        (
            "ours, default (state cache)",
            &latency.ours_default,
            RGBColor(44, 160, 44),
        ),
    ];
    let all = series.iter().flat_map(|(_, v, _)| v.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (lo.max(1e-3) / 2.0, hi * 2.0);
    let x_lo = lengths.first().copied().unwrap_or(1) as f64 / 1.5;
    let x_hi = lengths.last().copied().unwrap_or(10) as f64 * 1.5;

    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(
                "Latency of one deposit vs prior events on the aggregate (median, log-log)",
                ("sans-serif", 20),
            )
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d((x_lo..x_hi).log_scale(), (lo..hi).log_scale())?;
    if text {
        chart
            .configure_mesh()
            .x_desc("prior events on the aggregate (N)")
            .y_desc("microseconds per deposit")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if *y >= 1.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.2}")
                }
            })
            .draw()?;
    } else {
        chart.configure_mesh().disable_mesh().draw()?;
    }
    for (label, values, color) in series {
        let points: Vec<(f64, f64)> = lengths
            .iter()
            .zip(values.iter())
            .map(|(&n, &v)| (n as f64, v))
            .collect();
        let drawn = chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        if text {
            drawn.label(label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
    }
    root.present()?;
    Ok(if text {
        "with labels"
    } else {
        "no font found: drawn without text"
    })
}
