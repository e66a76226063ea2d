//! The SVG chart, written by hand: latency percentile curves of every mode on one plot (x =
//! 1/(1-p) on a log axis, like HdrHistogram's plotter; y = latency on a log axis) and, below,
//! throughput per second for every mode.

use std::fmt::Write as _;

use crate::hist::Hist;
use crate::report::{fmt_us, Report};
use crate::runner::ModeRun;

const WIDTH: f64 = 980.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 230.0;
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
const P1_TOP: f64 = 100.0;
const P1_H: f64 = 360.0;
const P2_TOP: f64 = P1_TOP + P1_H + 80.0;
const P2_H: f64 = 220.0;
const HEIGHT: f64 = P2_TOP + P2_H + 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// (log10(1/(1-q)), latency µs) points of a histogram, the q = 1 point left out.
fn percentile_points(h: &Hist) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_quantiles(5)
        .filter(|v| v.quantile_iterated_to() < 1.0)
        .map(|v| {
            let q = v.quantile_iterated_to();
            (
                (1.0 / (1.0 - q)).log10(),
                v.value_iterated_to().max(1) as f64,
            )
        })
        .collect()
}

fn percent_label(decade: u32) -> String {
    match decade {
        0 => "0%".into(),
        d => {
            let nines = 100.0 - 100.0 / 10f64.powi(d as i32);
            format!("{nines:.*}%", (d as usize).saturating_sub(2))
        }
    }
}

/// `1 µs`, `10 µs`, ... `1 ms`, ... `1 s` for 10^e microseconds.
fn decade_label(e: i32) -> String {
    let units = ["µs", "ms", "s"];
    let e = e.max(0) as usize;
    let unit = (e / 3).min(2);
    format!("{} {}", 10u64.pow((e - unit * 3) as u32), units[unit])
}

/// 1, 2 or 5 times a power of ten, at least `x`.
/// The horizontal grid lines and labels of a log latency axis, one per decade from 10^y_lo to
/// 10^y_hi µs; `py` maps µs to the plot's y.
fn decade_grid(s: &mut String, y_lo: f64, y_hi: f64, py: impl Fn(f64) -> f64) {
    let mut e = y_lo as i32;
    while f64::from(e) <= y_hi {
        let y = py(10f64.powi(e));
        line(s, LEFT, y, LEFT + PLOT_W, y, r##"stroke="#ddd""##);
        text(s, LEFT - 6.0, y + 4.0, "end", 11, &decade_label(e));
        e += 1;
    }
}

fn nice(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= x {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn polyline(s: &mut String, points: &[(f64, f64)], color: &str, dashed: bool) {
    if points.is_empty() {
        return;
    }
    let pts: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline fill="none" stroke="{color}" stroke-width="2"{} points="{}"/>"#,
        if dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        },
        pts.join(" ")
    );
}

fn text(s: &mut String, x: f64, y: f64, anchor: &str, size: u32, body: &str) {
    let _ = writeln!(
        s,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}">{}</text>"#,
        esc(body)
    );
}

fn line(s: &mut String, x1: f64, y1: f64, x2: f64, y2: f64, style: &str) {
    let _ = writeln!(
        s,
        r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" {style}/>"#
    );
}

/// One point of a rate sweep: the rate reached and its latency percentiles (µs).
pub struct SweepPoint {
    pub achieved: f64,
    pub percentiles: [(&'static str, u64); 3],
}

/// A rate sweep as an SVG document: latency (log scale) against the rate reached (linear),
/// one line per percentile, so a reader sees where the mode saturates.
pub fn sweep_chart(title: &str, points: &[SweepPoint]) -> String {
    let (top, h) = (P1_TOP, P1_H + 120.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{:.0}" font-family="sans-serif">"#,
        top + h + 70.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    text(&mut s, WIDTH / 2.0, 30.0, "middle", 15, title);
    text(
        &mut s,
        LEFT + PLOT_W / 2.0,
        top - 4.0,
        "middle",
        13,
        "Latency against the rate reached (open loop, one run per target rate)",
    );
    let x_hi = nice(points.iter().map(|p| p.achieved).fold(1.0, f64::max));
    let lat = points
        .iter()
        .flat_map(|p| p.percentiles.iter().map(|q| q.1.max(1) as f64));
    let (lo, hi) = lat.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let y_lo = if lo == f64::MAX {
        0.0
    } else {
        lo.log10().floor()
    };
    let y_hi = hi.log10().ceil().max(y_lo + 1.0);
    let px = |x: f64| LEFT + x / x_hi * PLOT_W;
    let py = |us: f64| top + h - (us.log10() - y_lo) / (y_hi - y_lo) * h;
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{h}" fill="none" stroke="#333"/>"##
    );
    for i in 0..=5 {
        let v = x_hi * f64::from(i) / 5.0;
        let x = px(v);
        line(&mut s, x, top, x, top + h, r##"stroke="#ddd""##);
        text(&mut s, x, top + h + 16.0, "middle", 11, &fmt_count(v));
    }
    text(
        &mut s,
        LEFT + PLOT_W / 2.0,
        top + h + 34.0,
        "middle",
        12,
        "msgs/s reached",
    );
    decade_grid(&mut s, y_lo, y_hi, py);
    for (i, color) in COLORS.iter().take(3).enumerate() {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (px(p.achieved), py(p.percentiles[i].1.max(1) as f64)))
            .collect();
        polyline(&mut s, &pts, color, false);
        for &(x, y) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
            );
        }
        let Some(first) = points.first() else {
            continue;
        };
        let ly = top + 14.0 + i as f64 * 24.0;
        let lx = LEFT + PLOT_W + 14.0;
        line(
            &mut s,
            lx,
            ly,
            lx + 26.0,
            ly,
            &format!(r#"stroke="{color}" stroke-width="2""#),
        );
        text(
            &mut s,
            lx + 32.0,
            ly + 4.0,
            "start",
            12,
            first.percentiles[i].0,
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The whole chart as an SVG document.
pub fn chart(report: &Report, runs: &[ModeRun]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">
<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let modes: Vec<String> = runs.iter().map(|r| r.result.mode.clone()).collect();
    text(
        &mut s,
        WIDTH / 2.0,
        22.0,
        "middle",
        15,
        &format!("RingMQ: {}", modes.join(" vs ")),
    );
    text(
        &mut s,
        WIDTH / 2.0,
        38.0,
        "middle",
        11,
        &report.workload_description,
    );
    text(
        &mut s,
        WIDTH / 2.0,
        52.0,
        "middle",
        11,
        &format!(
            "kernel {}; commit {}",
            report.machine.kernel,
            report
                .git_commit
                .as_deref()
                .map_or("unknown", |c| &c[..c.len().min(12)])
        ),
    );
    // The flush modes and the replication modes split the cores differently: one line each.
    let mut splits: Vec<String> = Vec::new();
    for r in runs {
        let d = r.result.core_split.describe();
        if !splits.contains(&d) {
            splits.push(d);
        }
    }
    for (i, split) in splits.iter().take(2).enumerate() {
        text(
            &mut s,
            WIDTH / 2.0,
            66.0 + 14.0 * i as f64,
            "middle",
            11,
            split,
        );
    }
    latency_panel(&mut s, runs);
    throughput_panel(&mut s, runs);
    s.push_str("</svg>\n");
    s
}

fn latency_panel(s: &mut String, runs: &[ModeRun]) {
    // (label, colour, dashed, points, max)
    let mut curves = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        curves.push((
            r.result.mode.clone(),
            color,
            false,
            percentile_points(&r.ack_hist),
            r.ack_hist.max(),
        ));
        if let Some(e2e) = &r.e2e_hist {
            curves.push((
                format!("{} end to end", r.result.mode),
                color,
                true,
                percentile_points(e2e),
                e2e.max(),
            ));
        }
    }
    let decades = curves
        .iter()
        .filter_map(|c| c.3.last().map(|p| p.0))
        .fold(2.0f64, f64::max)
        .ceil()
        .clamp(2.0, 6.0) as u32;
    let values = curves.iter().flat_map(|c| c.3.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let y_lo = if lo == f64::MAX {
        0.0
    } else {
        lo.log10().floor()
    };
    let y_hi = hi.log10().ceil().max(y_lo + 1.0);
    let px = |x: f64| LEFT + x / f64::from(decades) * PLOT_W;
    let py = |us: f64| P1_TOP + P1_H - (us.log10() - y_lo) / (y_hi - y_lo) * P1_H;

    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{P1_TOP}" width="{PLOT_W}" height="{P1_H}" fill="none" stroke="#333"/>"##
    );
    text(
        s,
        LEFT + PLOT_W / 2.0,
        P1_TOP - 4.0,
        "middle",
        13,
        "Latency by percentile (log scales)",
    );
    for d in 0..=decades {
        let x = px(f64::from(d));
        line(s, x, P1_TOP, x, P1_TOP + P1_H, r##"stroke="#ddd""##);
        text(s, x, P1_TOP + P1_H + 16.0, "middle", 11, &percent_label(d));
    }
    text(
        s,
        LEFT + PLOT_W / 2.0,
        P1_TOP + P1_H + 34.0,
        "middle",
        12,
        "percentile",
    );
    decade_grid(s, y_lo, y_hi, py);
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 20 {:.1})">latency</text>"#,
        P1_TOP + P1_H / 2.0,
        P1_TOP + P1_H / 2.0
    );
    for (i, (label, color, dashed, points, max)) in curves.iter().enumerate() {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.0 <= f64::from(decades))
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        polyline(s, &pts, color, *dashed);
        let ly = P1_TOP + 14.0 + i as f64 * 34.0;
        let lx = LEFT + PLOT_W + 14.0;
        let dash = if *dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        line(
            s,
            lx,
            ly,
            lx + 26.0,
            ly,
            &format!(r#"stroke="{color}" stroke-width="2"{dash}"#),
        );
        text(s, lx + 32.0, ly + 4.0, "start", 12, label);
        text(
            s,
            lx + 32.0,
            ly + 18.0,
            "start",
            10,
            &format!("max {}", fmt_us(*max)),
        );
    }
}

fn throughput_panel(s: &mut String, runs: &[ModeRun]) {
    let last_second = runs
        .iter()
        .filter_map(|r| r.result.timeline.last().map(|p| p.second))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let peak = runs
        .iter()
        .flat_map(|r| r.result.timeline.iter().map(|p| p.msgs as f64))
        .fold(0.0, f64::max);
    let step = nice(peak.max(1.0) / 4.0);
    let y_max = (peak / step).ceil().max(1.0) * step;
    let px = |sec: f64| LEFT + sec / last_second * PLOT_W;
    let py = |v: f64| P2_TOP + P2_H - v / y_max * P2_H;

    let warm = runs
        .iter()
        .flat_map(|r| {
            r.result
                .timeline
                .iter()
                .filter(|p| p.warmup)
                .map(|p| p.second)
        })
        .max()
        .unwrap_or(0) as f64;
    if warm > 0.0 {
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{P2_TOP}" width="{:.1}" height="{P2_H}" fill="#eee"/>"##,
            px(warm) - LEFT
        );
        text(s, LEFT + 4.0, P2_TOP + 14.0, "start", 10, "warm-up");
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{P2_TOP}" width="{PLOT_W}" height="{P2_H}" fill="none" stroke="#333"/>"##
    );
    text(
        s,
        LEFT + PLOT_W / 2.0,
        P2_TOP - 6.0,
        "middle",
        13,
        "Throughput per second",
    );
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let y = py(v);
        line(s, LEFT, y, LEFT + PLOT_W, y, r##"stroke="#ddd""##);
        text(s, LEFT - 6.0, y + 4.0, "end", 11, &fmt_count(v));
        v += step;
    }
    let x_step = nice(last_second / 10.0).max(1.0);
    let mut t = 0.0;
    while t <= last_second + 1e-9 {
        text(
            s,
            px(t),
            P2_TOP + P2_H + 16.0,
            "middle",
            11,
            &format!("{t:.0}"),
        );
        t += x_step;
    }
    text(
        s,
        LEFT + PLOT_W / 2.0,
        P2_TOP + P2_H + 34.0,
        "middle",
        12,
        "seconds since start",
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 20 {:.1})">msgs/s</text>"#,
        P2_TOP + P2_H / 2.0,
        P2_TOP + P2_H / 2.0
    );
    for (i, r) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts = vec![(px(0.0), py(0.0))];
        pts.extend(
            r.result
                .timeline
                .iter()
                .map(|p| (px(p.second as f64 - 0.5), py(p.msgs as f64))),
        );
        polyline(s, &pts, color, false);
        let ly = P2_TOP + 14.0 + i as f64 * 34.0;
        let lx = LEFT + PLOT_W + 14.0;
        line(
            s,
            lx,
            ly,
            lx + 26.0,
            ly,
            &format!(r#"stroke="{color}" stroke-width="2""#),
        );
        text(s, lx + 32.0, ly + 4.0, "start", 12, &r.result.mode);
        text(
            s,
            lx + 32.0,
            ly + 18.0,
            "start",
            10,
            &format!("{:.0} msg/s measured", r.result.msgs_per_sec),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::{sample_report, sample_run};
    use quick_xml::events::Event;
    use quick_xml::Reader;

    /// Parses the document and checks every start tag has its end tag.
    fn assert_well_formed(doc: &str) -> Vec<String> {
        let mut reader = Reader::from_str(doc);
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        loop {
            match reader.read_event() {
                Ok(Event::Start(e)) => {
                    let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                    seen.push(name.clone());
                    stack.push(name);
                }
                Ok(Event::Empty(e)) => {
                    seen.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap());
                }
                Ok(Event::End(e)) => {
                    let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                    assert_eq!(stack.pop().as_deref(), Some(name.as_str()), "unbalanced");
                }
                Ok(Event::Text(t)) => {
                    t.unescape().expect("valid entities");
                }
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("not well formed at {}: {e}", reader.buffer_position()),
            }
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        seen
    }

    #[test]
    fn chart_is_well_formed_with_a_curve_per_mode() {
        let runs = vec![
            sample_run("sync-flush", 4, true),
            sample_run("async <flush> & co", 1, false),
        ];
        let report = sample_report(&runs);
        let doc = chart(&report, &runs);
        let tags = assert_well_formed(&doc);
        assert_eq!(tags[0], "svg");
        // 3 latency curves (2 ack + 1 e2e) and 2 throughput lines.
        assert_eq!(tags.iter().filter(|t| *t == "polyline").count(), 5);
        assert!(doc.contains("99.99%"));
        assert!(doc.contains("async &lt;flush&gt; &amp; co"));
    }

    #[test]
    fn chart_of_empty_runs_is_still_well_formed() {
        let mut run = sample_run("x", 1, false);
        run.ack_hist = crate::hist::new_hist();
        run.result.timeline.clear();
        let report = sample_report(std::slice::from_ref(&run));
        assert_well_formed(&chart(&report, &[run]));
    }

    #[test]
    fn percent_labels() {
        let l: Vec<String> = (0..=5).map(percent_label).collect();
        assert_eq!(l, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]);
        assert_eq!(nice(3.0), 5.0);
        let d: Vec<String> = (0..=7).map(decade_label).collect();
        assert_eq!(
            d,
            ["1 µs", "10 µs", "100 µs", "1 ms", "10 ms", "100 ms", "1 s", "10 s"]
        );
        assert_eq!(nice(120.0), 200.0);
    }
}
