//! The Prometheus text exposition format (version 0.0.4), from a `Send` snapshot of values.
//!
//! A shard builds its [`Family`]s on its own thread (copies of its counters, no references
//! into its state) and hands them over; [`render`] merges the families of every shard by name,
//! so each metric gets its `# HELP` and `# TYPE` lines once, followed by every shard's samples.

use std::fmt::Write as _;

use crate::metrics::histogram::Histogram;

/// The metric type, as written in `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One sample line: `name{suffix}{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `""`, or `_bucket` / `_sum` / `_count` for a histogram's series.
    pub suffix: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// A metric: its name, help text, type and samples (of one shard, or of the whole node).
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

impl Family {
    pub fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    pub fn counter(name: &'static str, help: &'static str) -> Family {
        Family::new(name, Kind::Counter, help)
    }

    pub fn gauge(name: &'static str, help: &'static str) -> Family {
        Family::new(name, Kind::Gauge, help)
    }

    pub fn histogram(name: &'static str, help: &'static str) -> Family {
        Family::new(name, Kind::Histogram, help)
    }

    /// Adds a sample with `labels`.
    pub fn with(mut self, labels: &[(&'static str, &str)], value: f64) -> Family {
        self.push(labels, value);
        self
    }

    pub fn push(&mut self, labels: &[(&'static str, &str)], value: f64) {
        self.samples.push(Sample {
            suffix: "",
            labels: owned(labels),
            value,
        });
    }

    /// Adds a histogram's `_bucket` (cumulative, with `le`), `_sum` and `_count` series. Each
    /// bound and the sum are divided by `unit` (1e6 turns µs into seconds, 1.0 keeps bytes).
    pub fn push_histogram(&mut self, labels: &[(&'static str, &str)], h: &Histogram, unit: f64) {
        for (bound, count) in h.cumulative() {
            let mut l = owned(labels);
            l.push(("le", format_value(bound as f64 / unit)));
            self.samples.push(Sample {
                suffix: "_bucket",
                labels: l,
                value: count as f64,
            });
        }
        let mut l = owned(labels);
        l.push(("le", "+Inf".to_string()));
        self.samples.push(Sample {
            suffix: "_bucket",
            labels: l,
            value: h.count() as f64,
        });
        self.samples.push(Sample {
            suffix: "_sum",
            labels: owned(labels),
            value: h.sum() as f64 / unit,
        });
        self.samples.push(Sample {
            suffix: "_count",
            labels: owned(labels),
            value: h.count() as f64,
        });
    }
}

fn owned(labels: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    labels.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// Integers as integers (counters stay exact up to 2^53), the rest as Rust prints an `f64`
/// (never an exponent), and the special values as Prometheus spells them.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 9_007_199_254_740_992.0 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped, as the format requires.
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The text of `families`: those sharing a name (one per shard) are merged under one
/// `# HELP` / `# TYPE` header, in the order names first appear. The help text and type of the
/// first family of a name win (every shard declares the same ones).
pub fn render<'a>(families: impl IntoIterator<Item = &'a Family>) -> String {
    let mut order: Vec<&'a str> = Vec::new();
    let mut by_name: std::collections::HashMap<&'a str, Vec<&'a Family>> = Default::default();
    for f in families {
        let entry = by_name.entry(f.name).or_default();
        if entry.is_empty() {
            order.push(f.name);
        }
        entry.push(f);
    }
    let mut out = String::new();
    for name in order {
        let fams = &by_name[name];
        let first = fams[0];
        let _ = writeln!(out, "# HELP {name} {}", first.help.replace('\n', " "));
        let _ = writeln!(out, "# TYPE {name} {}", first.kind.name());
        for s in fams.iter().flat_map(|f| &f.samples) {
            out.push_str(name);
            out.push_str(s.suffix);
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(k);
                    out.push_str("=\"");
                    escape(v, &mut out);
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            out.push_str(&format_value(s.value));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_of_several_shards_share_one_header() {
        let a = Family::counter("ringmq_x_total", "X.").with(&[("shard", "0")], 3.0);
        let b = Family::counter("ringmq_x_total", "X.").with(&[("shard", "1")], 4.0);
        let text = render([&a, &b]);
        assert_eq!(
            text,
            "# HELP ringmq_x_total X.\n# TYPE ringmq_x_total counter\n\
             ringmq_x_total{shard=\"0\"} 3\nringmq_x_total{shard=\"1\"} 4\n"
        );
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_inf_sum_and_count_in_its_unit() {
        let mut h = Histogram::new(&[100, 1000]);
        h.record(50);
        h.record(500);
        h.record(5000);
        let mut f = Family::histogram("ringmq_t_seconds", "T.");
        f.push_histogram(&[("shard", "0")], &h, 1e6);
        let text = render([&f]);
        assert!(
            text.contains("ringmq_t_seconds_bucket{shard=\"0\",le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ringmq_t_seconds_bucket{shard=\"0\",le=\"0.001\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("ringmq_t_seconds_bucket{shard=\"0\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("ringmq_t_seconds_sum{shard=\"0\"} 0.00555\n"),
            "{text}"
        );
        assert!(
            text.contains("ringmq_t_seconds_count{shard=\"0\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let f = Family::gauge("ringmq_g", "G.").with(&[("topic", "a\"b\\c\nd")], 1.5);
        assert!(render([&f]).contains("ringmq_g{topic=\"a\\\"b\\\\c\\nd\"} 1.5\n"));
    }
}
