//! The control-center service over real HTTP: alert events made by a real `alert` rule, bearer
//! tokens and roles, input validation, the lifecycle with its conflicts, the feedback table, the
//! live event stream, rate limits and the page.

mod common;

use std::time::Duration;

use citystream_operators::Metrics;
use citystream_pipeline::control::{ControlCenter, ControlConfig, ControlError, TokensError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::alerts::{alert_events, string_columns};

const VIEWER: &str = "viewer-token-0123456789";
/// op.anna's token
const OPERATOR: &str = "operator-token-0123456789";
/// op.ben's token
const BEN: &str = "operator-token-ben-0123456789";

fn config(feedback: &std::path::Path, env: &str, rate: u32) -> ControlConfig {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    serde_saphyr::from_str(&format!(
        "addr: 127.0.0.1:0\nalerts: [x]\ntokens_env: {env}\nfeedback_path: {}\nroad_graph: {}\nsites: {}\nrequests_per_minute: {rate}\ncalibration_file: {}\n",
        feedback.display(),
        root.join("deploy/road_graph.csv").display(),
        root.join("deploy/sites.csv").display(),
        feedback.join("calibration.json").display()
    ))
    .unwrap()
}

/// One HTTP/1.1 request; returns the status and the body.
async fn http(c: &ControlCenter, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    common::alerts::http_at(c.addr, method, path, token, body).await
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_act_on_alerts_over_an_authenticated_api_and_their_feedback_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: set before the service reads it; this test binary's tests use distinct variables
    unsafe {
        std::env::set_var(
            "CC_TOKENS_A",
            format!("viewer vic {VIEWER}; operator op.anna {OPERATOR}; operator op.ben {BEN}"),
        )
    };
    let c = ControlCenter::start("control", &config(dir.path(), "CC_TOKENS_A", 1000), &Metrics::new()).unwrap();
    let first = alert_events(&[("seg-00-03", 10, 0.97), ("seg-01-02", 11, 0.95)]);
    c.apply(&first).unwrap();

    // authentication and roles
    assert_eq!(http(&c, "GET", "/api/alerts", None, None).await.0, 401);
    assert_eq!(http(&c, "GET", "/api/alerts", Some("not-a-token-at-all-xx"), None).await.0, 401);
    let (code, body) = http(&c, "GET", "/api/alerts?state=open", Some(VIEWER), None).await;
    assert_eq!(code, 200, "{body}");
    let list = json(&body);
    assert_eq!(list["alerts"].as_array().unwrap().len(), 2);
    let id = "incident_model:seg-00-03:600000";
    assert!(
        list["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alert_id"] == id && a["evidence"]["model"] == "incident_fp32")
    );
    let ack = format!("/api/alerts/{id}/acknowledge");
    let good = r#"{"comment": "crew dispatched"}"#;
    let (code, body) = http(&c, "POST", &ack, Some(VIEWER), Some(good)).await;
    assert_eq!((code, json(&body)["error"].as_str().unwrap().contains("read-only")), (403, true));

    // input validation
    assert_eq!(http(&c, "GET", "/api/alerts?state=bogus", Some(VIEWER), None).await.0, 400);
    assert_eq!(http(&c, "GET", "/api/alerts?limit=many", Some(VIEWER), None).await.0, 400);
    // the decision is made under the token's name: a body naming someone else is refused
    for bad in [r#"{"operator": "op.ben"}"#, r#"{"operator": "a b"}"#, "not json", r#"{"comment": "x", "extra": 1}"#] {
        let (code, body) = http(&c, "POST", &ack, Some(OPERATOR), Some(bad)).await;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(json(&body)["error"].is_string());
    }
    let long = format!(r#"{{"comment": "{}"}}"#, "c".repeat(1001));
    assert_eq!(http(&c, "POST", &ack, Some(OPERATOR), Some(&long)).await.0, 400);
    assert_eq!(http(&c, "POST", "/api/alerts/nope/acknowledge", Some(OPERATOR), Some(good)).await.0, 404);
    assert_eq!(http(&c, "POST", &format!("/api/alerts/{id}/delete"), Some(OPERATOR), Some(good)).await.0, 404);

    // the lifecycle: open -> acknowledged -> resolved -> false alarm, with conflicts refused
    let (code, body) = http(&c, "POST", &ack, Some(OPERATOR), Some(good)).await;
    assert_eq!((code, json(&body)["state"].as_str().unwrap()), (200, "acknowledged"), "{body}");
    assert_eq!(http(&c, "POST", &ack, Some(OPERATOR), Some(good)).await.0, 409);
    let resolve = format!("/api/alerts/{id}/resolve");
    assert_eq!(http(&c, "POST", &resolve, Some(OPERATOR), Some(r#"{"operator": "op.anna"}"#)).await.0, 200);
    let fa = format!("/api/alerts/{id}/false_alarm");
    let (code, body) = http(&c, "POST", &fa, Some(BEN), Some(r#"{"comment": "a parked truck"}"#)).await;
    assert_eq!(code, 200);
    assert_eq!(json(&body)["decisions"].as_array().unwrap().len(), 3);
    assert_eq!(http(&c, "POST", &fa, Some(OPERATOR), Some(good)).await.0, 409);
    let (_, body) = http(&c, "GET", "/api/alerts?state=false_alarm", Some(VIEWER), None).await;
    assert_eq!(json(&body)["alerts"][0]["alert_id"], id);

    // the rule resolving it does not undo the operator's false alarm
    let second = alert_events(&[("seg-00-03", 10, 0.97), ("seg-00-03", 12, 0.1)]);
    c.apply(&second).unwrap();
    let (_, body) = http(&c, "GET", &format!("/api/alerts/{id}"), Some(VIEWER), None).await;
    assert_eq!(
        (json(&body)["state"].as_str().unwrap(), json(&body)["active"].as_bool().unwrap()),
        ("false_alarm", false)
    );

    // every decision is a row of the feedback table, and a lifecycle event in the alerts table
    let mut rows = string_columns(&dir.path().join("feedback"), &["decision", "operator"]);
    let mut events = string_columns(&dir.path().join("alerts"), &["status", "alert_id", "evidence", "actor"]);
    assert!(events.iter().all(|e| e[3] == "operator"), "decision events say who made them");
    events.sort();
    assert_eq!(
        events.iter().map(|e| (e[0].as_str(), e[1].as_str())).collect::<Vec<_>>(),
        [("acknowledged", id), ("false_alarm", id), ("resolved", id)]
    );
    assert_eq!(json(&events[1][2])["comment"], "a parked truck");
    rows.sort();
    assert_eq!(
        rows,
        [["acknowledged", "op.anna"], ["false_alarm", "op.ben"], ["resolved", "op.anna"]].map(|r| r.map(String::from))
    );

    // calibration: the operator rejected the only judged alert at seg-00-03 (one is too little
    // feedback by default); with min_judged 1 the proposal raises its threshold, bounded
    let (code, body) = http(&c, "GET", "/api/calibration?target_precision=0.8", Some(VIEWER), None).await;
    assert_eq!((code, json(&body)["rules"].as_object().unwrap().len()), (200, 0), "{body}");
    let (code, body) = http(&c, "GET", "/api/calibration?target_precision=0.8&min_judged=1", Some(VIEWER), None).await;
    let p = &json(&body)["rules"]["incident_model"]["seg-00-03"];
    assert_eq!(code, 200, "{body}");
    assert!(p["new"].as_f64().unwrap() > 0.9 && p["new"].as_f64().unwrap() <= 0.945 + 1e-9, "{body}");
    assert_eq!(http(&c, "GET", "/api/calibration?target_precision=2", Some(VIEWER), None).await.0, 400);
    let proposed = p["new"].as_f64().unwrap();

    // applying it moves the live level the rules read, without a config edit; reverting undoes it
    let apply = r#"{"operator": "op.anna", "target_precision": 0.8, "min_judged": 1}"#;
    assert_eq!(http(&c, "POST", "/api/calibration/apply", Some(VIEWER), Some(apply)).await.0, 403);
    assert_eq!(http(&c, "POST", "/api/calibration/apply", Some(OPERATOR), Some(r#"{"operator": "x"}"#)).await.0, 400);
    let tight = r#"{"operator": "op.anna", "target_precision": 0.8}"#;
    assert_eq!(http(&c, "POST", "/api/calibration/apply", Some(OPERATOR), Some(tight)).await.0, 409);
    let (code, body) = http(&c, "POST", "/api/calibration/apply", Some(OPERATOR), Some(apply)).await;
    assert_eq!(code, 200, "{body}");
    let change = json(&body);
    assert_eq!((change["id"].as_u64(), change["changes"][0]["old"].as_f64()), (Some(1), Some(0.9)));
    // (JSON numbers are compared to a tolerance: serde_json's parse may be an ulp off)
    let near = |v: Option<f64>| v.is_some_and(|v| (v - proposed).abs() < 1e-12);
    assert!(near(c.thresholds().get("incident_model", "seg-00-03")));
    let (_, body) = http(&c, "GET", "/api/calibration/history", Some(VIEWER), None).await;
    assert!(near(json(&body)["live"]["incident_model"]["seg-00-03"].as_f64()), "{body}");
    // without new verdicts the same evidence does not move the level again
    assert_eq!(http(&c, "POST", "/api/calibration/apply", Some(OPERATOR), Some(apply)).await.0, 409);
    // the live level survives a restart through the calibration file
    let again = ControlCenter::start("control2", &config(dir.path(), "CC_TOKENS_A", 1000), &Metrics::new()).unwrap();
    assert!(near(again.thresholds().get("incident_model", "seg-00-03")));
    drop(again);
    let revert = "{}";
    assert_eq!(http(&c, "POST", "/api/calibration/7/revert", Some(BEN), Some(revert)).await.0, 404);
    assert_eq!(http(&c, "POST", "/api/calibration/x/revert", Some(BEN), Some(revert)).await.0, 400);
    let (code, body) = http(&c, "POST", "/api/calibration/1/revert", Some(BEN), Some(revert)).await;
    assert_eq!((code, json(&body)["reverted"][1].as_str()), (200, Some("op.ben")), "{body}");
    assert_eq!(c.thresholds().get("incident_model", "seg-00-03"), None);
    assert_eq!(http(&c, "POST", "/api/calibration/1/revert", Some(BEN), Some(revert)).await.0, 409);
    let again = ControlCenter::start("control3", &config(dir.path(), "CC_TOKENS_A", 1000), &Metrics::new()).unwrap();
    assert_eq!(again.thresholds().get("incident_model", "seg-00-03"), None);

    // a restart rebuilds the book from the lake: here only the decision events were stored
    // (the lake sink writes the rule events); with the rule events there too, the alert and
    // its decisions come back as operators left them
    let (_, restored) = http(&again, "GET", "/api/alerts", Some(VIEWER), None).await;
    assert_eq!(
        json(&restored)["alerts"].as_array().unwrap().len(),
        0,
        "decisions without their alert are not invented"
    );
    drop(again);
    let lake_sink =
        format!("path: {}\ntables: {{alerts: a}}\n", serde_json::to_string(dir.path().to_str().unwrap()).unwrap());
    let pc: citystream_pipeline::sink::parquet::ParquetSinkConfig = serde_saphyr::from_str(&lake_sink).unwrap();
    let tables = std::collections::BTreeMap::from([("alerts".to_owned(), citystream_operators::alert::alert_schema())]);
    let mut w =
        citystream_pipeline::sink::parquet::ParquetWriter::try_new("lake", &pc, &tables, &Metrics::new()).unwrap();
    // the rule events as the lake sink wrote them while the test ran (before and after the decisions)
    w.write("alerts", "a", &second).unwrap();
    w.write("alerts", "a", &first).unwrap();
    w.flush().unwrap();
    drop(w);
    let again = ControlCenter::start("control4", &config(dir.path(), "CC_TOKENS_A", 1000), &Metrics::new()).unwrap();
    let (_, body) = http(&again, "GET", &format!("/api/alerts/{id}"), Some(VIEWER), None).await;
    let a = json(&body);
    assert_eq!((a["state"].as_str(), a["active"].as_bool()), (Some("false_alarm"), Some(false)), "{body}");
    let who: Vec<&str> = a["decisions"].as_array().unwrap().iter().map(|d| d["operator"].as_str().unwrap()).collect();
    assert_eq!(who, ["op.anna", "op.anna", "op.ben"]);
    let (_, body) = http(&again, "GET", "/api/alerts?state=open", Some(VIEWER), None).await;
    assert_eq!(json(&body)["alerts"][0]["location"], "seg-01-02");

    // the map, health and the page
    let (code, body) = http(&c, "GET", "/api/map", Some(VIEWER), None).await;
    assert_eq!((code, json(&body)["segments"].as_array().unwrap().len()), (200, 24));
    assert_eq!(json(&body)["sites"]["cam-000"], "seg-00-00", "cameras and stations are placed on their segment");
    assert_eq!(http(&c, "GET", "/api/health", Some(VIEWER), None).await.0, 200);
    let (code, page) = http(&c, "GET", "/", None, None).await;
    assert!(code == 200 && page.contains("citystream control center") && page.contains("EventSource"));
    assert!(!page.contains("__seen"), "no test hook in the page");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_pushes_new_alerts_and_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: as above, a variable of this test only
    unsafe { std::env::set_var("CC_TOKENS_B", format!("viewer {VIEWER}")) };
    let c = ControlCenter::start("control", &config(dir.path(), "CC_TOKENS_B", 1000), &Metrics::new()).unwrap();
    assert_eq!(http(&c, "GET", "/api/stream", None, None).await.0, 401);
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    s.write_all(format!("GET /api/stream?token={VIEWER} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    got.push_str(&String::from_utf8_lossy(&buf[..n]));
    assert!(got.starts_with("HTTP/1.1 200") && got.contains("text/event-stream"), "{got}");
    c.apply(&alert_events(&[("seg-02-05", 30, 0.99)])).unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !got.contains("incident_model:seg-02-05:1800000") {
        let n = tokio::time::timeout_at(until, s.read(&mut buf)).await.expect("an event within 10 s").unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("data: {"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_rate_limit_are_refused_and_tokens_never_come_from_yaml() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: as above
    unsafe { std::env::set_var("CC_TOKENS_C", format!("viewer {VIEWER}")) };
    let c = ControlCenter::start("control", &config(dir.path(), "CC_TOKENS_C", 3), &Metrics::new()).unwrap();
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(http(&c, "GET", "/api/alerts", Some(VIEWER), None).await.0);
    }
    assert_eq!(codes, [200, 200, 200, 429, 429]);
    // guessing tokens is limited per client address too
    let mut codes = Vec::new();
    for i in 0..5 {
        codes.push(http(&c, "GET", "/api/alerts", Some(&format!("guess-{i}-0000000000000")), None).await.0);
    }
    assert_eq!(codes, [401, 401, 401, 429, 429]);
    // no token source, or both, is a startup error
    let mut cfg = config(dir.path(), "CC_TOKENS_C", 3);
    cfg.tokens_env = None;
    let e = ControlCenter::start("control", &cfg, &Metrics::new()).err().unwrap();
    assert!(matches!(e, ControlError::Tokens(TokensError::NoSource)), "{e:?}");
    assert!(e.to_string().contains("never go in the YAML"), "{e}");
    let e = citystream_pipeline::control::parse_tokens("admin short").unwrap_err();
    assert!(matches!(&e, TokensError::Role { entry: 1, role } if role == "admin"), "{e:?}");
    assert!(e.to_string().contains("unknown role"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_queues_per_task_and_held_dp_releases() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: as above, a variable of this test only
    unsafe { std::env::set_var("CC_TOKENS_H", format!("viewer {VIEWER}")) };
    let m = Metrics::new();
    m.gauge("citystream_queue_depth", "", &[("stage", "traffic")]).set(3.0);
    m.gauge("citystream_dp_windows_held", "", &[("stage", "dp"), ("release", "r")]).set(2.0);
    m.gauge("citystream_carbon_high_mode", "", &[]).set(1.0);
    let c = ControlCenter::start("control", &config(dir.path(), "CC_TOKENS_H", 1000), &m).unwrap();
    let (code, body) = http(&c, "GET", "/api/health", Some(VIEWER), None).await;
    assert_eq!(code, 200, "{body}");
    let h = json(&body);
    assert_eq!(h["queue_depth"], serde_json::json!([["stage=\"traffic\"", 3.0]]), "{body}");
    assert_eq!((h["dp_windows_held"].as_f64(), h["carbon_high_mode"].as_f64()), (Some(2.0), Some(1.0)), "{body}");
}

/// The raw response head of a request (status line and headers).
async fn head(c: &ControlCenter, path: &str) -> String {
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    text.split_once("\r\n\r\n").map(|(h, _)| h.to_lowercase()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_api_send_security_headers_and_event_streams_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: as above, a variable of this test only
    unsafe { std::env::set_var("CC_TOKENS_S", format!("viewer vic {VIEWER}")) };
    let mut cfg = config(dir.path(), "CC_TOKENS_S", 1000);
    cfg.max_streams = 2;
    let c = ControlCenter::start("control", &cfg, &Metrics::new()).unwrap();
    for path in ["/", "/api/alerts"] {
        let h = head(&c, path).await;
        assert!(h.contains("content-security-policy: default-src 'none'; script-src 'sha256-"), "{path}: {h}");
        assert!(h.contains("x-frame-options: deny") && h.contains("x-content-type-options: nosniff"), "{path}: {h}");
    }
    assert!(head(&c, "/").await.contains("content-type: text/html"));
    // two streams open, a third is refused until one closes
    let open = || async {
        let mut s = TcpStream::connect(c.addr).await.unwrap();
        s.write_all(format!("GET /api/stream?token={VIEWER} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        (String::from_utf8_lossy(&buf[..n]).to_string(), s)
    };
    let (a, _sa) = open().await;
    let (b, sb) = open().await;
    assert!(a.starts_with("HTTP/1.1 200") && b.starts_with("HTTP/1.1 200"), "{a}\n{b}");
    let (third, _) = open().await;
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    drop(sb);
    let t0 = std::time::Instant::now();
    loop {
        let (again, s) = open().await;
        if again.starts_with("HTTP/1.1 200") {
            drop(s);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "a closed stream frees its place: {again}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_away_a_decision_waits_a_bounded_time_and_the_next_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: as above, a variable of this test only
    unsafe { std::env::set_var("CC_TOKENS_K", format!("operator op.anna {OPERATOR}")) };
    let mut cfg = config(dir.path(), "CC_TOKENS_K", 1000);
    // nothing listens on port 1
    cfg.kafka = Some(
        serde_saphyr::from_str(
            "brokers: 127.0.0.1:1\nalerts_topic: a\nfeedback_topic: f\npublish_timeout: 1s\nproperties: {message.timeout.ms: \"60000\"}\n",
        )
        .unwrap(),
    );
    let c = ControlCenter::start("control", &cfg, &Metrics::new()).unwrap();
    c.apply(&alert_events(&[("seg-00-03", 10, 0.97), ("seg-01-02", 11, 0.95)])).unwrap();
    let t0 = std::time::Instant::now();
    let path = "/api/alerts/incident_model:seg-00-03:600000/acknowledge";
    let text = common::alerts::http_raw(c.addr, "POST", path, Some(OPERATOR), Some(r#"{"comment": "x"}"#))
        .await
        .to_lowercase();
    let waited = t0.elapsed();
    assert!(text.starts_with("http/1.1 200") && text.contains("x-citystream-kafka: pending"), "{text}");
    assert!(waited < Duration::from_secs(4), "the answer waited {waited:?}, not the broker's 60 s");
    // stored and in the book, but not published: the next decision is refused clearly
    let (code, body) = http(
        &c,
        "POST",
        "/api/alerts/incident_model:seg-01-02:660000/acknowledge",
        Some(OPERATOR),
        Some(r#"{"comment": "y"}"#),
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("Kafka is unreachable"), "{body}");
    assert_eq!(string_columns(&dir.path().join("feedback"), &["decision"]).len(), 1, "the first one is stored");
}
