//! A small metrics registry: counters and gauges with labels, rendered in the Prometheus text
//! exposition format. Handles are cheap clones of atomics, so the hot path never locks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds 1.
    pub fn inc(&self) {
        self.inc_by(1);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as `f64` bits).
#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Debug, Clone)]
enum Handle {
    Counter(Counter),
    Gauge(Gauge),
}

#[derive(Debug, Default)]
struct Family {
    help: &'static str,
    series: BTreeMap<String, Handle>,
}

/// The registry. Clone it freely: clones share the same series.
///
/// A handle may be scoped to a task ([`for_task`](Self::for_task)): the gauges made through
/// it carry a `task` label, so the tasks of one process (`runtime.tasks: partition`) each show
/// their own watermarks, queues and open alerts instead of whichever task set them last.
/// Counters stay without it: they add up across tasks, as one process's totals. Process-wide
/// signals (the carbon mode, the energy account) are made through the unscoped handle, and a
/// task still reads them: [`value`](Self::value) falls back to the series without `task`.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
    /// The task whose gauges this handle makes (`task` label).
    task: Option<Arc<str>>,
}

fn label_text(labels: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s
}

/// The value of label `key` in a series' label text as [`Metrics::series`] gives it
/// (`stage="traffic",task="3"`), still escaped as rendered; `None` if it has no such label.
pub fn label_value<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    loop {
        let (k, after) = rest.split_once("=\"")?;
        // the value ends at the first quote not escaped by a backslash
        let mut escaped = false;
        let end = after.char_indices().find_map(|(i, c)| {
            let close = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            close.then_some(i)
        })?;
        if k == key {
            return Some(&after[..end]);
        }
        rest = after[end + 1..].strip_prefix(',')?;
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle on the same registry whose gauges carry the label `task="{task}"` (see the
    /// type's documentation).
    pub fn for_task(&self, task: &str) -> Metrics {
        Metrics { families: self.families.clone(), task: Some(task.into()) }
    }

    /// Removes the gauges of task `task` (made through [`for_task`](Self::for_task)): a task
    /// that stopped here, or moved to another process, no longer shows its last values.
    pub fn forget_task(&self, task: &str) {
        let label = label_text(&[("task", task)]);
        let tail = format!(",{label}");
        let mut fams = self.families.lock().expect("metrics lock poisoned");
        for fam in fams.values_mut() {
            fam.series.retain(|l, h| !(matches!(h, Handle::Gauge(_)) && (*l == label || l.ends_with(&tail))));
        }
    }

    /// `labels`, with this handle's task label unless they name a task already.
    fn scoped<'a>(&'a self, labels: &[(&'a str, &'a str)]) -> Option<Vec<(&'a str, &'a str)>> {
        let task = self.task.as_deref()?;
        if labels.iter().any(|(k, _)| *k == "task") {
            return None;
        }
        Some(labels.iter().copied().chain([("task", task)]).collect())
    }

    fn handle(&self, name: &str, help: &'static str, labels: &[(&str, &str)], make: fn() -> Handle) -> Handle {
        let mut fams = self.families.lock().expect("metrics lock poisoned");
        let fam = fams.entry(name.to_owned()).or_insert_with(|| Family { help, series: BTreeMap::new() });
        fam.series.entry(label_text(labels)).or_insert_with(make).clone()
    }

    /// The counter `name{labels}`, created at 0 on first use.
    ///
    /// # Panics
    /// If `name{labels}` was registered as a gauge — a bug in the caller.
    pub fn counter(&self, name: &str, help: &'static str, labels: &[(&str, &str)]) -> Counter {
        match self.handle(name, help, labels, || Handle::Counter(Counter::default())) {
            Handle::Counter(c) => c,
            Handle::Gauge(_) => panic!("metric {name} is a gauge, not a counter"),
        }
    }

    /// The gauge `name{labels}`, created at 0 on first use.
    ///
    /// # Panics
    /// If `name{labels}` was registered as a counter — a bug in the caller.
    pub fn gauge(&self, name: &str, help: &'static str, labels: &[(&str, &str)]) -> Gauge {
        let scoped = self.scoped(labels);
        let labels = scoped.as_deref().unwrap_or(labels);
        match self.handle(name, help, labels, || Handle::Gauge(Gauge::default())) {
            Handle::Gauge(g) => g,
            Handle::Counter(_) => panic!("metric {name} is a counter, not a gauge"),
        }
    }

    /// The current value of `name{labels}`, if registered: through a task's handle, its own
    /// gauge's first, else the series without the task label (a counter, a process-wide gauge).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let fams = self.families.lock().expect("metrics lock poisoned");
        let series = &fams.get(name)?.series;
        let own = self.scoped(labels).and_then(|l| series.get(&label_text(&l)));
        own.or_else(|| series.get(&label_text(labels))).map(|h| match h {
            Handle::Counter(c) => c.get() as f64,
            Handle::Gauge(g) => g.get(),
        })
    }

    /// The sum of every series of `name`, whatever its labels (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        let fams = self.families.lock().expect("metrics lock poisoned");
        fams.get(name).map_or(0.0, |f| {
            f.series
                .values()
                .map(|h| match h {
                    Handle::Counter(c) => c.get() as f64,
                    Handle::Gauge(g) => g.get(),
                })
                .sum()
        })
    }

    /// Every series of `name` as `(labels, value)`, labels in their rendered form.
    pub fn series(&self, name: &str) -> Vec<(String, f64)> {
        let fams = self.families.lock().expect("metrics lock poisoned");
        fams.get(name).map_or_else(Vec::new, |f| {
            f.series
                .iter()
                .map(|(l, h)| {
                    let v = match h {
                        Handle::Counter(c) => c.get() as f64,
                        Handle::Gauge(g) => g.get(),
                    };
                    (l.clone(), v)
                })
                .collect()
        })
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let fams = self.families.lock().expect("metrics lock poisoned");
        let mut out = String::new();
        for (name, fam) in fams.iter() {
            let kind = match fam.series.values().next() {
                Some(Handle::Counter(_)) => "counter",
                _ => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, h) in &fam.series {
                let v = match h {
                    Handle::Counter(c) => c.get().to_string(),
                    Handle::Gauge(g) => g.get().to_string(),
                };
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_share_series_and_render() {
        let m = Metrics::new();
        let a = m.counter("citystream_rows_total", "Rows.", &[("stage", "decode \"x\"")]);
        let b = m.counter("citystream_rows_total", "Rows.", &[("stage", "decode \"x\"")]);
        a.inc_by(3);
        b.inc();
        m.gauge("citystream_queue_depth", "Queued.", &[]).set(2.5);
        assert_eq!(m.value("citystream_rows_total", &[("stage", "decode \"x\"")]), Some(4.0));
        assert_eq!(m.sum("citystream_rows_total"), 4.0);
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE citystream_rows_total counter\ncitystream_rows_total{stage=\"decode \\\"x\\\"\"} 4\n"
            ),
            "{text}"
        );
        assert!(text.contains("citystream_queue_depth 2.5\n"), "{text}");
    }

    #[test]
    fn label_values_are_read_back_from_the_rendered_labels() {
        let text = label_text(&[("stage", "a,b"), ("task", "3"), ("why", "say \"hi\"")]);
        assert_eq!(label_value(&text, "stage"), Some("a,b"));
        assert_eq!(label_value(&text, "task"), Some("3"));
        assert_eq!(label_value(&text, "why"), Some("say \\\"hi\\\""), "escaped as rendered");
        // a key is matched whole, not as the end of another
        assert_eq!(label_value("substage=\"x\",stage=\"y\"", "stage"), Some("y"));
        assert_eq!(label_value(&text, "provider"), None);
        assert_eq!(label_value("", "stage"), None);
    }

    /// Two tasks of one process: each its own gauge, one counter for both, and the process's
    /// gauges still readable from a task.
    #[test]
    fn a_tasks_gauges_carry_its_label_and_its_counters_add_up() {
        let m = Metrics::new();
        let (t0, t3) = (m.for_task("0"), m.for_task("3"));
        t0.gauge("citystream_watermark_ms", "W.", &[("stage", "w")]).set(10.0);
        t3.gauge("citystream_watermark_ms", "W.", &[("stage", "w")]).set(30.0);
        t0.counter("citystream_rows_total", "Rows.", &[("stage", "w")]).inc_by(2);
        t3.counter("citystream_rows_total", "Rows.", &[("stage", "w")]).inc_by(5);
        m.gauge("citystream_carbon_high_mode", "Mode.", &[]).set(1.0);
        assert_eq!(t0.value("citystream_watermark_ms", &[("stage", "w")]), Some(10.0));
        assert_eq!(t3.value("citystream_watermark_ms", &[("stage", "w")]), Some(30.0));
        assert_eq!(m.value("citystream_watermark_ms", &[("stage", "w"), ("task", "3")]), Some(30.0));
        assert_eq!(t3.value("citystream_rows_total", &[("stage", "w")]), Some(7.0));
        assert_eq!(t3.value("citystream_carbon_high_mode", &[]), Some(1.0));
        // a label named `task` already is kept as it is
        t3.gauge("citystream_x", "X.", &[("task", "mine")]).set(1.0);
        let text = m.render();
        // task 3 stops: its gauges go, task 0's and the counters stay
        m.forget_task("3");
        let left = m.render();
        assert!(!left.contains("task=\"3\""), "{left}");
        assert!(left.contains("citystream_rows_total{stage=\"w\"} 7\n") && left.contains("task=\"0\""), "{left}");
        for line in [
            "citystream_watermark_ms{stage=\"w\",task=\"0\"} 10\n",
            "citystream_watermark_ms{stage=\"w\",task=\"3\"} 30\n",
            "citystream_rows_total{stage=\"w\"} 7\n",
            "citystream_carbon_high_mode 1\n",
            "citystream_x{task=\"mine\"} 1\n",
        ] {
            assert!(text.contains(line), "{line}in\n{text}");
        }
    }
}
