//! One metrics scheme for every Tessera process (gateway, `tessera server`, services on
//! the SDK), so one dashboard reads them all:
//!
//! - every duration is a histogram in seconds over the same [`BUCKETS`];
//! - every request count is split by status class (`status="2xx"`), or `status="error"`
//!   when no answer came; rates and error ratios come from the counts, durations from
//!   the histogram ([`Red`]);
//! - names are `tessera_<component>_<what>[_<unit>][_total]`, and every family has
//!   `# HELP` and `# TYPE` ([`Text`]), which `promtool check metrics` accepts.
//!
//! Counters live in atomics on the path that counts them; nothing is locked or allocated
//! per observation once a label set exists ([`Family`]).

use std::collections::BTreeMap;
use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds, in seconds, of every duration histogram: from half a millisecond (a
/// proxied request on loopback) to ten seconds (a slow saga step), roughly 1-2.5-5 per
/// decade.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A duration histogram over [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    #[inline]
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Status classes a [`Red`] counts: `1xx`..`5xx`, then `error` (no answer).
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Rate, errors and duration of one kind of request: counts by status class and a
/// duration histogram.
#[derive(Debug, Default)]
pub struct Red {
    by_class: [AtomicU64; CLASSES.len()],
    pub duration: Histogram,
}

impl Red {
    /// One answered request (`status` is its HTTP status).
    #[inline]
    pub fn record(&self, status: u16, d: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(d);
    }

    /// One request that got no answer (refused, reset, timed out).
    pub fn record_error(&self, d: Duration) {
        self.by_class[CLASSES.len() - 1].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(d);
    }

    /// `{total}{labels, status}` for the classes seen, and always `2xx`.
    pub fn samples(&self, out: &mut Text, total: &str, labels: &[(&str, &str)]) {
        for (i, class) in CLASSES.iter().enumerate() {
            let n = self.by_class[i].load(Ordering::Relaxed);
            if n == 0 && *class != "2xx" {
                continue;
            }
            let mut l = labels.to_vec();
            l.push(("status", class));
            out.sample(total, &l, n);
        }
    }
}

/// Metrics of one kind per label set (a route, an upstream, a service), created on first
/// use. Label values must come from a bounded set: route patterns, not paths.
#[derive(Debug)]
pub struct Family<T> {
    labels: &'static [&'static str],
    members: RwLock<BTreeMap<Vec<String>, Arc<T>>>,
}

impl<T: Default> Family<T> {
    pub fn new(labels: &'static [&'static str]) -> Family<T> {
        Family {
            labels,
            members: RwLock::new(BTreeMap::new()),
        }
    }

    /// The member for `values` (one per label, in order), made on first use.
    pub fn get(&self, values: &[&str]) -> Arc<T> {
        debug_assert_eq!(values.len(), self.labels.len());
        {
            let m = self.members.read().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = m
                .iter()
                .find(|(k, _)| k.iter().map(String::as_str).eq(values.iter().copied()))
            {
                return t.1.clone();
            }
        }
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        m.entry(values.iter().map(|v| (*v).to_owned()).collect())
            .or_default()
            .clone()
    }

    /// Every member with its label pairs, in label order.
    pub fn each(&self, mut f: impl FnMut(&[(&str, &str)], &T)) {
        let m = self.members.read().unwrap_or_else(|p| p.into_inner());
        for (values, t) in m.iter() {
            let pairs: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            f(&pairs, t);
        }
    }
}

impl Family<Red> {
    /// `{name}_requests_total` (by status class) and `{name}_request_duration_seconds`
    /// for every member; `what` says what was counted ("Requests served").
    pub fn render(&self, out: &mut Text, name: &str, what: &str) {
        let total = format!("{name}_requests_total");
        out.family(
            &total,
            Kind::Counter,
            &format!("{what}, by status class (error: no answer)."),
        );
        self.each(|l, red| red.samples(out, &total, l));
        let duration = format!("{name}_request_duration_seconds");
        out.family(
            &duration,
            Kind::Histogram,
            &format!("{what}: time to answer."),
        );
        self.each(|l, red| out.histogram(&duration, l, &red.duration));
    }
}

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A Prometheus text exposition being written: families (`# HELP`, `# TYPE`) and their
/// samples, with label values escaped.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

impl Text {
    pub fn new() -> Text {
        Text::default()
    }

    /// Starts a family: its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Text {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Text {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        self.family(name, kind, help).sample(name, &[], value);
    }

    /// A family with one sample per value of one label (`status`, `result`).
    pub fn by<V: Display>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'static str, V)>,
    ) {
        self.family(name, kind, help);
        for (value, n) in samples {
            self.sample(name, &[(label, value)], n);
        }
    }

    /// A histogram's samples (its family started with [`Kind::Histogram`]).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += h.buckets[i].load(Ordering::Relaxed);
            self.out.push_str(name);
            self.out.push_str("_bucket");
            self.labels(labels, Some(&b.to_string()));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let count = h.count.load(Ordering::Relaxed);
        self.out.push_str(name);
        self.out.push_str("_bucket");
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.out, " {count}");
        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, count);
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le.map(|v| ("le", v))) {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_in_seconds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut t = Text::new();
        t.family("x_seconds", Kind::Histogram, "X.");
        t.histogram("x_seconds", &[("route", "/a")], &h);
        let s = t.finish();
        assert!(
            s.contains("x_seconds_bucket{route=\"/a\",le=\"0.0005\"} 1\n"),
            "{s}"
        );
        assert!(
            s.contains("x_seconds_bucket{route=\"/a\",le=\"0.005\"} 2\n"),
            "{s}"
        );
        assert!(
            s.contains("x_seconds_bucket{route=\"/a\",le=\"10\"} 2\n"),
            "{s}"
        );
        assert!(
            s.contains("x_seconds_bucket{route=\"/a\",le=\"+Inf\"} 3\n"),
            "{s}"
        );
        assert!(s.contains("x_seconds_sum{route=\"/a\"} 60.0033\n"), "{s}");
        assert!(s.contains("x_seconds_count{route=\"/a\"} 3\n"), "{s}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut t = Text::new();
        t.sample("x", &[("a", "q\"b\\s\nn")], 1);
        assert_eq!(t.finish(), "x{a=\"q\\\"b\\\\s\\nn\"} 1\n");
    }

    #[test]
    fn a_family_member_is_made_once_and_counted_by_class() {
        let f: Family<Red> = Family::new(&["route"]);
        f.get(&["/a"]).record(204, Duration::from_millis(1));
        f.get(&["/a"]).record(503, Duration::from_millis(1));
        f.get(&["/b"]).record_error(Duration::from_millis(1));
        let mut t = Text::new();
        f.render(&mut t, "svc", "Requests served");
        let s = t.finish();
        assert!(s.contains("# TYPE svc_requests_total counter\n"), "{s}");
        assert!(
            s.contains("svc_requests_total{route=\"/a\",status=\"5xx\"} 1\n"),
            "{s}"
        );
        assert!(
            s.contains("svc_requests_total{route=\"/b\",status=\"error\"} 1\n"),
            "{s}"
        );
        assert!(
            s.contains("svc_requests_total{route=\"/b\",status=\"2xx\"} 0\n"),
            "{s}"
        );
        assert!(
            s.contains("svc_request_duration_seconds_count{route=\"/a\"} 2\n"),
            "{s}"
        );
    }
}
