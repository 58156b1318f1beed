//! The Prometheus endpoint and the periodic status line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use citystream_operators::{Metrics, label_value};

/// Serves `GET /metrics` (Prometheus text format) on `addr` until the task is dropped.
pub async fn metrics_endpoint(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // the bound address: with port 0 the system picks one
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    axum::serve(listener, app).await
}

/// Totals the status line is computed from.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    events_in: f64,
    rows_out: f64,
    dead: f64,
}

fn totals(m: &Metrics) -> Totals {
    Totals {
        events_in: m.sum("citystream_source_events_total"),
        rows_out: m.sum("citystream_sink_rows_total"),
        dead: m.sum("citystream_dead_letters_total"),
    }
}

/// One status line: rates since the previous line, totals, and queue depths.
pub fn status_line(m: &Metrics, prev: &mut (Instant, f64, f64)) -> String {
    let t = totals(m);
    let now = Instant::now();
    let dt = now.duration_since(prev.0).as_secs_f64().max(1e-9);
    let rate_in = (t.events_in - prev.1) / dt;
    let rate_out = (t.rows_out - prev.2) / dt;
    *prev = (now, t.events_in, t.rows_out);
    let mut s = format!(
        "in {:.0} ev/s, out {:.0} rows/s | total in {} out {} dead letters {}",
        rate_in, rate_out, t.events_in as u64, t.rows_out as u64, t.dead as u64
    );
    // the share of each stage's input it routed late: a spike shows at once
    let late: Vec<(String, f64)> =
        m.series("citystream_late_events_total").into_iter().filter(|(_, v)| *v > 0.0).collect();
    if !late.is_empty() {
        s.push_str(" | late");
        for (labels, v) in late {
            let stage = label_value(&labels, "stage").unwrap_or(&labels);
            let rows = m.value("citystream_stage_rows_in_total", &[("stage", stage)]).unwrap_or(0.0).max(1.0);
            let _ = write!(s, " {stage}={:.2}%", 100.0 * v / rows);
        }
    }
    let lag = m.series("citystream_kafka_consumer_lag");
    if !lag.is_empty() {
        let _ = write!(s, " | kafka lag {:.0}", lag.iter().map(|(_, v)| v).sum::<f64>());
    }
    // per stage, summed over the tasks running it
    let mut queues: BTreeMap<String, f64> = BTreeMap::new();
    for (labels, v) in m.series("citystream_queue_depth") {
        *queues.entry(label_value(&labels, "stage").unwrap_or(&labels).to_owned()).or_default() += v;
    }
    if !queues.is_empty() {
        s.push_str(" | queues");
        for (stage, v) in queues {
            let _ = write!(s, " {stage}={v:.0}");
        }
    }
    s
}

/// Prints a status line every `every` until the task is dropped.
pub async fn status_loop(metrics: Metrics, every: Duration) {
    let mut prev = (Instant::now(), 0.0, 0.0);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        eprintln!("[citystream] {}", status_line(&metrics, &mut prev));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_reports_rates_totals_lag_and_queues() {
        let m = Metrics::new();
        m.counter("citystream_source_events_total", "", &[("source", "k")]).inc_by(100);
        m.counter("citystream_sink_rows_total", "", &[("table", "t")]).inc_by(90);
        m.counter("citystream_dead_letters_total", "", &[("reason", "bad_json")]).inc_by(10);
        m.gauge("citystream_kafka_consumer_lag", "", &[("partition", "0")]).set(7.0);
        m.gauge("citystream_kafka_consumer_lag", "", &[("partition", "1")]).set(5.0);
        m.gauge("citystream_queue_depth", "", &[("stage", "traffic")]).set(3.0);
        m.for_task("1").gauge("citystream_queue_depth", "", &[("stage", "camera")]).set(1.0);
        m.for_task("2").gauge("citystream_queue_depth", "", &[("stage", "camera")]).set(4.0);
        m.counter("citystream_stage_rows_in_total", "", &[("stage", "traffic")]).inc_by(400);
        m.counter("citystream_late_events_total", "", &[("stage", "traffic")]).inc_by(3);
        m.counter("citystream_late_events_total", "", &[("stage", "windows")]);
        let mut prev = (Instant::now() - Duration::from_secs(2), 0.0, 0.0);
        let line = status_line(&m, &mut prev);
        assert!(
            line.contains(
                "| total in 100 out 90 dead letters 10 | late traffic=0.75% | kafka lag 12 | queues camera=5 traffic=3"
            ),
            "{line}"
        );
        assert!(line.starts_with("in ") && line.contains(" ev/s, out "), "{line}");
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_prometheus_text() {
        let m = Metrics::new();
        m.counter("citystream_source_events_total", "Messages read.", &[("source", "x")]).inc_by(3);
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let server = tokio::spawn(metrics_endpoint(addr, m));
        let mut body = String::new();
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
                s.read_to_string(&mut body).await.unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.abort();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("text/plain; version=0.0.4"), "{body}");
        assert!(body.contains("citystream_source_events_total{source=\"x\"} 3"), "{body}");
    }
}
