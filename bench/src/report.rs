//! The results document: JSON (every raw number), a markdown table, the
//! targets with met/missed, and the latency-vs-RTT plot.

use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One target and whether this run met it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Target {
    pub section: String,
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
    /// An extra, informative goal the bench set itself (not from the issue).
    #[serde(default)]
    pub ours: bool,
}

impl Target {
    /// A target as the issue states it.
    pub fn new(section: &str, what: &str, target: String, measured: String, met: bool) -> Target {
        Target { section: section.into(), what: what.into(), target, measured, met, ours: false }
    }

    /// An informative goal proposed by the bench, marked as such in the table.
    pub fn ours(section: &str, what: &str, target: String, measured: String, met: bool) -> Target {
        Target { ours: true, ..Target::new(section, what, target, measured, met) }
    }
}

/// Output of one section.
#[derive(Debug, Default)]
pub struct Section {
    pub json: Value,
    pub markdown: String,
    pub targets: Vec<Target>,
}

/// A point of the latency plot: injected RTT and QD1 write p50 latencies.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyPoint {
    pub rtt_ms: f64,
    pub metro_ms: f64,
    pub baseline_ms: f64,
    pub limit_ms: f64,
}

/// Markdown table of targets: the first, then the bench's own
/// (informative) goals, each row saying which it is.
pub fn targets_markdown(ts: &[Target]) -> String {
    let mut s =
        String::from("| section | target | goal | measured | result | source |\n|---|---|---|---|---|---|\n");
    for t in ts.iter().filter(|t| !t.ours).chain(ts.iter().filter(|t| t.ours)) {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            t.section,
            t.what,
            t.target,
            t.measured,
            if t.met { "met" } else { "**missed**" },
            if t.ours { "ours (informative)" } else { "issue" }
        );
    }
    s
}

/// Bitmap plot of write p50 latency vs injected RTT: metro, baseline, limit.
pub fn plot(points: &[LatencyPoint], out: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes: &'static [u8] = Box::leak(std::fs::read(FONT)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("bad font {FONT}"))?;
    let max_x = points.iter().map(|p| p.rtt_ms).fold(1.0, f64::max);
    let max_y = points.iter().flat_map(|p| [p.metro_ms, p.baseline_ms, p.limit_ms]).fold(1.0, f64::max) * 1.2;
    let root = BitMapBackend::new(out, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("4 KiB randwrite QD1 p50 latency vs injected dc-a<->dc-b RTT", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y)?;
    chart.configure_mesh().x_desc("injected RTT (ms)").y_desc("write latency p50 (ms)").draw()?;
    type Pick = fn(&LatencyPoint) -> f64;
    let series: [(&str, RGBColor, Pick); 3] = [
        ("metro", RED, |p| p.metro_ms),
        ("baseline (qemu-nbd, unreplicated)", BLUE, |p| p.baseline_ms),
        ("limit (baseline + RTT)", BLACK, |p| p.limit_ms),
    ];
    for (name, color, f) in series {
        let pts: Vec<(f64, f64)> = points.iter().map(|p| (p.rtt_ms, f(p))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
