//! The HTTP surface under a slow disk and concurrent requests.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;

use super::alerts::{ListQuery, decide, list};
use super::*;
use crate::control::ControlError;

/// A disk that takes `delay` to make a decision durable.
struct SlowDisk {
    delay: Duration,
    stored: AtomicUsize,
}

impl DecisionStore for SlowDisk {
    fn store(&self, _: &RecordBatch, _: &RecordBatch) -> Result<(), ControlError> {
        std::thread::sleep(self.delay);
        self.stored.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn alert(id: &str, status: &str, t: i64) -> RecordBatch {
    use arrow::array::{Float64Array, Int32Array, StringArray, TimestampMillisecondArray};
    let ts =
        || -> Arc<dyn arrow::array::Array> { Arc::new(TimestampMillisecondArray::from(vec![t]).with_timezone("UTC")) };
    let s = |v: &str| -> Arc<dyn arrow::array::Array> { Arc::new(StringArray::from(vec![v])) };
    RecordBatch::try_new(
        citystream_operators::alert::alert_schema(),
        vec![
            ts(),
            s(id),
            s("r"),
            s("incident"),
            s("critical"),
            s("seg-1"),
            s(status),
            ts(),
            Arc::new(Float64Array::from(vec![Some(0.99)])),
            Arc::new(Float64Array::from(vec![0.9])),
            Arc::new(Float64Array::from(vec![Some(0.99)])),
            Arc::new(Int32Array::from(vec![1])),
            s("{}"),
            ts(),
            s("rule"),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_holds_up_the_decision_but_not_the_alerts_or_other_requests() {
    let disk = Arc::new(SlowDisk { delay: Duration::from_secs(2), stored: AtomicUsize::new(0) });
    let tokens = super::super::parse_tokens("operator op.anna operator-token-0123456789").unwrap();
    let book = Arc::new(Mutex::new(Book::new(86_400_000, 1000)));
    book.lock().unwrap().apply(&alert("a1", "open", 0)).unwrap();
    let app = App {
        book: book.clone(),
        calibrations: Arc::default(),
        calibrating: Arc::default(),
        lake: Some(disk.clone()),
        events: broadcast::channel(16).0,
        guard: Guard::new(tokens, NonZeroU32::new(1000).unwrap()),
        map: Arc::new(serde_json::json!({})),
        metrics: Metrics::new(),
        board: ThresholdBoard::default(),
        outbox: None,
        streams: Arc::default(),
        max_streams: 1,
        deciding: Arc::default(),
        replica: None,
    };
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_static("Bearer operator-token-0123456789"));
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let t0 = Instant::now();
    let decision = tokio::spawn(decide(
        State(app.clone()),
        ConnectInfo(peer),
        headers.clone(),
        Path(("a1".into(), "acknowledge".into())),
        axum::body::Bytes::from_static(br#"{"comment": "on it"}"#),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // the decision is being written: alerts still flow into the book, and it is read
    let t1 = Instant::now();
    book.lock().unwrap().apply(&alert("a2", "open", 60_000)).unwrap();
    let r = list(
        State(app.clone()),
        ConnectInfo(peer),
        headers.clone(),
        Ok(Query(ListQuery { state: None, alert_type: None, location: None, limit: None })),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(t1.elapsed() < Duration::from_millis(500), "blocked for {:?} behind the disk", t1.elapsed());
    // a second decision on the same alert meanwhile is refused, not queued behind the lock
    let again = decide(
        State(app.clone()),
        ConnectInfo(peer),
        headers.clone(),
        Path(("a1".into(), "acknowledge".into())),
        axum::body::Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let done = decision.await.unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    assert!(t0.elapsed() >= Duration::from_secs(2), "the answer waited for the disk");
    assert_eq!(disk.stored.load(Ordering::Relaxed), 1);
    {
        let b = book.lock().unwrap();
        assert_eq!(
            (b.alerts["a1"].state.as_str(), b.alerts["a1"].decisions[0].operator.as_str()),
            ("acknowledged", "op.anna")
        );
    }
    // a request its client gave up on while the disk writes: the decision is still made (the
    // lake never holds one the book lacks), and the alert is free again afterwards
    let gone = tokio::spawn(decide(
        State(app.clone()),
        ConnectInfo(peer),
        headers.clone(),
        Path(("a2".into(), "acknowledge".into())),
        axum::body::Bytes::from_static(b"{}"),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    gone.abort();
    let _ = gone.await;
    let t2 = Instant::now();
    while !app.deciding.lock().unwrap().is_empty() {
        assert!(t2.elapsed() < Duration::from_secs(10), "the reservation outlived the decision");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(disk.stored.load(Ordering::Relaxed), 2);
    assert_eq!(book.lock().unwrap().alerts["a2"].state, "acknowledged", "stored, so applied");
}

#[tokio::test]
async fn every_response_carries_the_security_headers_and_the_page_passes_its_own_policy() {
    let policy = content_security_policy();
    assert!(policy.contains("script-src 'sha256-") && policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    // the page has exactly one script and one style element, and no inline style or handler
    // attributes, which a hash-based policy would block
    assert_eq!((PAGE.matches("<script").count(), PAGE.matches("<style").count()), (1, 1));
    assert!(!PAGE.contains(" style=\"") && !PAGE.contains(" onclick=\""), "inline attributes in the page");
}
