//! An SVG figure of a bench run: left, the distribution (CDF) of the pause per
//! checkpoint of each mode and tracking variant over every workload and program (one
//! colour per mode, one line style per variant; a program's pauses count as the
//! `kernel` variant's, which is how it keeps its pages); right, the wire bytes per
//! measured epoch of each workload and program, one bar per mode. Both value axes are
//! logarithmic.

use std::fmt::Write;

use crate::bench::result::{ProgramResult, RunResult};

/// The tracking variant a program's pauses are drawn as.
const PROGRAM_TRACKING: &str = "kernel";

/// What the figure draws of one run.
struct Entry<'a> {
    workload: &'a str,
    mode: &'a str,
    /// Pauses by tracking variant, microseconds.
    pauses: Vec<(&'a str, &'a [f64])>,
    kib_per_epoch: f64,
}

impl<'a> Entry<'a> {
    fn run(r: &'a RunResult) -> Self {
        Self {
            workload: &r.workload,
            mode: &r.mode,
            pauses: r
                .pause_by_tracking
                .iter()
                .map(|(t, f)| (*t, f.pause_samples_us.as_slice()))
                .collect(),
            kib_per_epoch: r.wire_bytes as f64 / r.epochs.max(1) as f64 / 1024.0,
        }
    }

    fn program(p: &'a ProgramResult) -> Self {
        Self {
            workload: &p.workload,
            mode: &p.mode,
            pauses: vec![(PROGRAM_TRACKING, p.pause_samples_us.as_slice())],
            kib_per_epoch: p.bytes_per_epoch / 1024.0,
        }
    }
}

const WIDTH: f64 = 1100.0;
const HEIGHT: f64 = 460.0;
/// Plot areas: (left, top, width, height).
const CDF: (f64, f64, f64, f64) = (70.0, 70.0, 400.0, 320.0);
const BARS: (f64, f64, f64, f64) = (600.0, 70.0, 470.0, 320.0);
/// One colour per mode, in the order modes first appear.
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// Line styles (`stroke-dasharray`) of the tracking variants, in the order they
/// first appear.
const DASHES: [&str; 3] = ["none", "7 4", "2 3"];

/// The SVG document for `results` and `programs`.
pub fn svg(results: &[RunResult], programs: &[ProgramResult]) -> String {
    let entries: Vec<Entry> = results
        .iter()
        .map(Entry::run)
        .chain(programs.iter().map(Entry::program))
        .collect();
    let results = entries.as_slice();
    let modes = unique(results.iter().map(|r| r.mode));
    let trackings = unique(results.iter().flat_map(|r| r.pauses.iter().map(|p| p.0)));
    let workloads = unique(results.iter().map(|r| r.workload));
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"#
    );
    legend(&mut out, &modes, &trackings);
    pause_cdf(&mut out, results, &modes, &trackings);
    bytes_per_epoch(&mut out, results, &modes, &workloads);
    out.push_str("</svg>\n");
    out
}

fn unique<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for name in names {
        if !seen.contains(&name) {
            seen.push(name);
        }
    }
    seen
}

fn colour(index: usize) -> &'static str {
    COLOURS[index % COLOURS.len()]
}

/// Text with the XML special characters escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn dash(index: usize) -> &'static str {
    DASHES[index % DASHES.len()]
}

fn legend(out: &mut String, modes: &[&str], trackings: &[&str]) {
    let _ = writeln!(out, r#"<g class="legend">"#);
    for (i, mode) in modes.iter().enumerate() {
        let x = 70.0 + i as f64 * 110.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="18" width="14" height="14" fill="{}"/><text x="{}" y="30">{}</text>"#,
            colour(i),
            x + 20.0,
            escape(mode)
        );
    }
    if trackings.len() > 1 {
        for (i, tracking) in trackings.iter().enumerate() {
            let x = 70.0 + (modes.len() + i) as f64 * 110.0;
            let _ = writeln!(
                out,
                r##"<line x1="{x}" y1="25" x2="{}" y2="25" stroke="#444" stroke-width="2" stroke-dasharray="{}"/><text x="{}" y="30">pause, {}</text>"##,
                x + 24.0,
                dash(i),
                x + 30.0,
                escape(tracking)
            );
        }
    }
    let _ = writeln!(out, "</g>");
}

/// Decades spanning `lo..=hi` (both positive): the axis limits as powers of ten.
fn decades(lo: f64, hi: f64) -> (i32, i32) {
    let lo = lo.max(1e-3).log10().floor() as i32;
    let hi = (hi.max(1e-3).log10().ceil() as i32).max(lo + 1);
    (lo, hi)
}

/// Axes of a plot area: a frame, the title, axis labels, and ticks at every decade
/// of the logarithmic axis (`horizontal`: x is logarithmic; else y is).
fn axes(
    out: &mut String,
    area: (f64, f64, f64, f64),
    title: &str,
    x_label: &str,
    y_label: &str,
    (lo, hi): (i32, i32),
    horizontal: bool,
) {
    let (left, top, width, height) = area;
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#444"/>
<text x="{}" y="{}" text-anchor="middle" font-size="14" font-weight="bold">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">{}</text>"##,
        left + width / 2.0,
        top - 12.0,
        escape(title),
        left + width / 2.0,
        top + height + 40.0,
        escape(x_label),
        left - 50.0,
        top + height / 2.0,
        left - 50.0,
        top + height / 2.0,
        escape(y_label)
    );
    for decade in lo..=hi {
        let f = f64::from(decade - lo) / f64::from(hi - lo);
        let label = tick_label(decade);
        if horizontal {
            let x = left + f * width;
            let _ = writeln!(
                out,
                r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
                top + height,
                top + height + 16.0
            );
        } else {
            let y = top + height - f * height;
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
                left + width,
                left - 6.0,
                y + 4.0
            );
        }
    }
}

fn tick_label(decade: i32) -> String {
    if decade >= 0 {
        format!("{}", 10f64.powi(decade))
    } else {
        format!("1e{decade}")
    }
}

fn pause_cdf(out: &mut String, results: &[Entry], modes: &[&str], trackings: &[&str]) {
    // One series per mode and tracking variant: (mode index, variant index, pauses).
    let mut series: Vec<(usize, usize, Vec<f64>)> = Vec::new();
    for (m, mode) in modes.iter().enumerate() {
        for (t, tracking) in trackings.iter().enumerate() {
            let mut all: Vec<f64> = results
                .iter()
                .filter(|r| r.mode == *mode)
                .flat_map(|r| r.pauses.iter().filter(|p| p.0 == *tracking))
                .flat_map(|p| p.1.iter().copied())
                .filter(|v| *v > 0.0)
                .collect();
            if !all.is_empty() {
                all.sort_by(f64::total_cmp);
                series.push((m, t, all));
            }
        }
    }
    let samples: Vec<&Vec<f64>> = series.iter().map(|s| &s.2).collect();
    let lo = samples
        .iter()
        .filter_map(|s| s.first())
        .fold(f64::MAX, |a, &b| a.min(b));
    let hi = samples
        .iter()
        .filter_map(|s| s.last())
        .fold(0.0, |a: f64, &b| a.max(b));
    let range = if hi > 0.0 { decades(lo, hi) } else { (0, 1) };
    axes(
        out,
        CDF,
        "Type II downtime: pause per checkpoint",
        "pause (microseconds, log scale)",
        "share of checkpoints",
        range,
        true,
    );
    let (left, top, width, height) = CDF;
    for share in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = top + height - share * height;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{share}</text>"#,
            left - 6.0,
            y + 4.0
        );
    }
    let span = f64::from(range.1 - range.0);
    for (m, t, values) in &series {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let x = left + (v.log10() - f64::from(range.0)) / span * width;
                let y = top + height - (k + 1) as f64 / values.len() as f64 * height;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<g class="series pause" data-mode="{}" data-tracking="{}"><polyline fill="none" stroke="{}" stroke-width="2" stroke-dasharray="{}" points="{}"/></g>"#,
            escape(modes[*m]),
            escape(trackings[*t]),
            colour(*m),
            dash(*t),
            points.join(" ")
        );
    }
}

fn bytes_per_epoch(out: &mut String, results: &[Entry], modes: &[&str], workloads: &[&str]) {
    let values: Vec<f64> = results
        .iter()
        .map(|r| r.kib_per_epoch)
        .filter(|v| *v > 0.0)
        .collect();
    let lo = values.iter().fold(f64::MAX, |a, &b| a.min(b));
    let hi = values.iter().fold(0.0, |a: f64, &b| a.max(b));
    let range = if hi > 0.0 { decades(lo, hi) } else { (0, 1) };
    axes(
        out,
        BARS,
        "Wire bytes per epoch",
        "workload",
        "KiB per epoch (log scale)",
        range,
        false,
    );
    let (left, top, width, height) = BARS;
    let group = width / workloads.len().max(1) as f64;
    let bar = group * 0.8 / modes.len().max(1) as f64;
    for (w, workload) in workloads.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            left + (w as f64 + 0.5) * group,
            top + height + 16.0,
            escape(short(workload))
        );
    }
    let span = f64::from(range.1 - range.0);
    for (i, mode) in modes.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<g class="series bytes" data-mode="{}" fill="{}">"#,
            escape(mode),
            colour(i)
        );
        for (w, workload) in workloads.iter().enumerate() {
            let Some(r) = results
                .iter()
                .find(|r| r.mode == *mode && r.workload == *workload)
            else {
                continue;
            };
            let v = r.kib_per_epoch;
            let f = if v > 0.0 {
                ((v.log10() - f64::from(range.0)) / span).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let x = left + w as f64 * group + group * 0.1 + i as f64 * bar;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}"><title>{} {}: {v:.1} KiB per epoch</title></rect>"#,
                top + height - f * height,
                bar,
                f * height,
                escape(workload),
                escape(mode)
            );
        }
        let _ = writeln!(out, "</g>");
    }
}

/// A workload's name as a bar label: a trace's file name without its directory.
fn short(workload: &str) -> &str {
    workload.rsplit('/').next().unwrap_or(workload)
}
