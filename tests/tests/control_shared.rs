//! Two control centers serving one book through the alerts topic (`citystream control` with
//! `deploy/control.yaml`), against a real broker: both show the same alerts, a decision made on
//! one is seen on the other, two rooms deciding on one alert at once get one answer each way,
//! killing one loses no decision, and a new instance rebuilds the same book from the topic.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use citystream_operators::{EnvString, Metrics};
use citystream_pipeline::kafka::KafkaWriter;
use common::alerts::{alert_events, http_at, string_columns};
use rdkafka::producer::{FutureProducer, FutureRecord};

const VIEWER: &str = "viewer-token-0123456789";
const ANNA: &str = "operator-token-anna-0123456789";
const BEN: &str = "operator-token-ben-0123456789";

/// A `citystream control` process.
struct Instance {
    child: Child,
    addr: SocketAddr,
    data: PathBuf,
    log: PathBuf,
}

impl Instance {
    fn start(config: &Path, dir: &Path, name: &str) -> Instance {
        let data = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(common::citystream_bin())
            .args(["control", "--config"])
            .arg(config)
            .current_dir(common::repo_root())
            .env("CITYSTREAM_CONTROL_ADDR", "127.0.0.1:0")
            .env("CITYSTREAM_DATA", &data)
            .env("KAFKA_BROKERS", common::brokers())
            .env(
                "CITYSTREAM_CONTROL_TOKENS",
                format!("viewer vic {VIEWER}; operator op.anna {ANNA}; operator op.ben {BEN}"),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start citystream control");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("control center on http://")
            .unwrap_or_else(|| panic!("first line `{line}`; log:\n{}", std::fs::read_to_string(&log).unwrap()))
            .parse()
            .unwrap();
        Instance { child, addr, data, log }
    }

    async fn get(&self, path: &str) -> serde_json::Value {
        let (code, body) = http_at(self.addr, "GET", path, Some(VIEWER), None).await;
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn decide(&self, id: &str, action: &str, token: &str) -> (u16, String) {
        http_at(self.addr, "POST", &format!("/api/alerts/{id}/{action}"), Some(token), Some(r#"{"comment": "seen"}"#))
            .await
    }

    /// Waits until `/api/ready` says yes.
    async fn ready(&self) {
        let t0 = Instant::now();
        loop {
            let (code, _) = http_at(self.addr, "GET", "/api/ready", None, None).await;
            if code == 200 {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "not ready; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `check` holds for the book, within 20 s.
    async fn until(&self, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let book = self.get("/api/alerts?limit=5000").await;
            if check(&book) {
                return book;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "{what}: {book}\nlog:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The alert `id` of a book, if there.
fn alert<'a>(book: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    book["alerts"].as_array().unwrap().iter().find(|a| a["alert_id"] == id)
}

fn state_of(book: &serde_json::Value, id: &str) -> String {
    alert(book, id).map(|a| a["state"].as_str().unwrap().to_owned()).unwrap_or_default()
}

/// The book as a map by id (the list's order depends on nothing but the alerts, but a map
/// says what differs).
fn by_id(book: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    book["alerts"].as_array().unwrap().iter().map(|a| (a["alert_id"].as_str().unwrap().to_owned(), a.clone())).collect()
}

async fn create_topic(name: &str, partitions: i32) {
    let topics = std::collections::BTreeSet::from([name.to_owned()]);
    let (created, _) = citystream_pipeline::kafka::ensure_topics(&common::brokers(), &topics, &topics, partitions, 1)
        .await
        .expect("topic");
    assert_eq!(created, [name]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_centers_serve_one_book_and_losing_one_loses_no_decision() {
    let dir = tempfile::tempdir().unwrap();
    let (alerts_topic, feedback_topic) = (common::unique("cc.alerts"), common::unique("cc.feedback"));
    create_topic(&alerts_topic, 3).await;
    create_topic(&feedback_topic, 1).await;
    // the shipped file, on this test's topics
    let text = std::fs::read_to_string(common::repo_root().join("deploy/control.yaml")).unwrap();
    assert!(text.contains("alerts_topic: city.alerts") && text.contains("feedback_topic: city.feedback"));
    let config = dir.path().join("control.yaml");
    std::fs::write(
        &config,
        text.replace("alerts_topic: city.alerts", &format!("alerts_topic: {alerts_topic}"))
            .replace("feedback_topic: city.feedback", &format!("feedback_topic: {feedback_topic}")),
    )
    .unwrap();

    // rule events from a real alert rule, produced as the pipeline's Kafka sink does; and what
    // an outsider might put on the topic: not JSON, not an alert, a decision on no alert
    let brokers = EnvString::literal(common::brokers());
    let mut rules = KafkaWriter::for_topics("rules", &brokers, &BTreeMap::new(), &[&alerts_topic], &Metrics::new())
        .expect("producer");
    let events = alert_events(&[("seg-00-03", 10, 0.97), ("seg-01-02", 11, 0.95), ("seg-02-05", 12, 0.99)]);
    rules.write(&alerts_topic, Some("location"), &events).await.unwrap();
    rules.flush().await.unwrap();
    let raw: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", common::brokers()).create().expect("producer");
    for junk in [
        "not json".to_owned(),
        r#"{"alert_id": 3}"#.to_owned(),
        r#"{"ts":"2026-03-02T08:00:00Z","alert_id":"nowhere","rule":"r","alert_type":"incident","severity":"critical","location":"x","status":"acknowledged","opened_at":"2026-03-02T08:00:00Z","threshold":0.9,"locations":1,"evidence":"{\"decision\":\"acknowledged\",\"operator\":\"mallory\"}","emitted_at":"2026-03-02T08:00:00Z","actor":"operator"}"#.to_owned(),
    ] {
        raw.send(FutureRecord::<str, str>::to(&alerts_topic).payload(&junk), Duration::from_secs(10)).await.unwrap();
    }
    let (a1, a2, a3) =
        ("incident_model:seg-00-03:600000", "incident_model:seg-01-02:660000", "incident_model:seg-02-05:720000");

    let a = Instance::start(&config, dir.path(), "a");
    let b = Instance::start(&config, dir.path(), "b");
    a.ready().await;
    b.ready().await;
    let book_a = a.until("three alerts", |bk| by_id(bk).len() == 3).await;
    assert_eq!(by_id(&book_a), by_id(&b.get("/api/alerts").await), "one book");

    // a decision on one is seen on the other
    let t0 = Instant::now();
    let (code, body) = a.decide(a1, "acknowledge", ANNA).await;
    let answered = t0.elapsed();
    assert_eq!(code, 200, "{body}");
    let seen = b.until("a's decision on b", |bk| state_of(bk, a1) == "acknowledged").await;
    eprintln!("a decision: answered after {answered:?}, seen on the other instance after {:?}", t0.elapsed());
    assert_eq!(alert(&seen, a1).unwrap()["decisions"][0]["operator"], "op.anna");

    // two rooms acknowledge one alert at once: the topic orders them, one wins everywhere
    let (on_a, on_b) = tokio::join!(a.decide(a2, "acknowledge", ANNA), b.decide(a2, "acknowledge", BEN));
    let mut codes = [on_a.0, on_b.0];
    codes.sort_unstable();
    assert_eq!(codes, [200, 409], "a: {on_a:?}\nb: {on_b:?}");
    // refused by the topic's order (both passed their own book's check) or by the loser's book
    // (the winner's decision had already come back to it)
    let loser = if on_a.0 == 409 { &on_a.1 } else { &on_b.1 };
    let by_topic = loser.contains("another decision came first");
    assert!(by_topic || loser.contains("cannot become acknowledged"), "{loser}");
    eprintln!("the race was settled by {}", if by_topic { "the topic's order" } else { "the loser's book" });
    let winner = if on_a.0 == 200 { "op.anna" } else { "op.ben" };
    for i in [&a, &b] {
        let bk = i.until("the race settled", |bk| state_of(bk, a2) == "acknowledged").await;
        let d = alert(&bk, a2).unwrap()["decisions"].as_array().unwrap().clone();
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0]["operator"], winner);
    }

    // a decision answered, then its control center killed: nothing lost
    let (code, body) = a.decide(a1, "resolve", ANNA).await;
    assert_eq!(code, 200, "{body}");
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    b.until("the killed one's last decision", |bk| state_of(bk, a1) == "resolved").await;

    // a replacement rebuilds the same book from the topic
    let c = Instance::start(&config, dir.path(), "c");
    c.ready().await;
    assert_eq!(by_id(&c.get("/api/alerts").await), by_id(&b.get("/api/alerts").await), "the rebuilt book");
    // new rule events and decisions reach both
    let (code, body) = c.decide(a3, "false_alarm", BEN).await;
    assert_eq!(code, 200, "{body}");
    rules.write(&alerts_topic, Some("location"), &alert_events(&[("seg-00-07", 20, 0.98)])).await.unwrap();
    rules.flush().await.unwrap();
    for i in [&b, &c] {
        i.until("the last decision and the new alert", |bk| state_of(bk, a3) == "false_alarm" && by_id(bk).len() == 4)
            .await;
    }
    let (final_b, final_c) = (by_id(&b.get("/api/alerts").await), by_id(&c.get("/api/alerts").await));
    assert_eq!(final_b, final_c);

    // each decision is in the lake of the control center that made it, once; the refused one
    // and the outsider's are nowhere
    let mut stored: Vec<Vec<String>> = [&a.data, &b.data, &c.data]
        .iter()
        .map(|d| d.join("lake/feedback"))
        .filter(|d| d.exists())
        .flat_map(|d| string_columns(&d, &["alert_id", "decision", "operator"]))
        .collect();
    stored.sort();
    let mut made: Vec<Vec<String>> = final_b
        .values()
        .flat_map(|a| {
            a["decisions"].as_array().unwrap().iter().map(|d| {
                vec![
                    a["alert_id"].as_str().unwrap().to_owned(),
                    d["decision"].as_str().unwrap().to_owned(),
                    d["operator"].as_str().unwrap().to_owned(),
                ]
            })
        })
        .collect();
    made.sort();
    assert_eq!(stored, made);
    assert_eq!(made.len(), 4, "{made:?}");
    let skipped = b.log_text();
    assert!(skipped.contains("not an alert event") && skipped.contains("no alert `nowhere`"), "{skipped}");
}
