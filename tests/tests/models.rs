//! The models in the stream, end to end: the simulator through decode, dedup and one-minute
//! windows into the `features`, `infer` and `california7` stages, then the Python training
//! code recomputes the features and the California #7 alarms from the same window rows and
//! compares (`models/train/compare.py`, run with the project's `.venv`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit, TimestampMillisecondType};
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use citystream_pipeline::sql;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn python() -> PathBuf {
    let p = std::env::var_os("CITYSTREAM_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(p.exists(), "no Python at {} (run scripts/setup-python.sh, or set CITYSTREAM_PYTHON)", p.display());
    p
}

const T: (f64, f64, f64) = (0.01, 0.1, 0.1); // models/incident.md

fn yaml(data: &Path) -> String {
    let r = root();
    format!(
        "\
name: models
sources:
  city:
    type: simulator
    seed: 5
    start: 2026-03-06T04:00:00Z
    duration: 10h
    city: {{segments: 24, segments_per_corridor: 8, incidents_per_day: 24}}
    faults: {{duplicate_rate: 0.01, out_of_order_rate: 0.02, late_rate: 0.002, malformed_rate: 0.003}}
    ground_truth: {data}/truth
stages:
  traffic: {{type: decode, input: city.traffic, kind: traffic}}
  unique: {{type: dedup, input: traffic, horizon: 10m}}
  traffic_minutes:
    type: window
    input: unique
    key: [segment_id]
    size: 1m
    allowed_lateness: 1m
    aggregates:
      - {{fn: count, as: readings}}
      - {{fn: sum, column: flow, as: vehicles}}
      - {{fn: mean, column: speed_kmh, as: mean_speed_kmh}}
      - {{fn: mean, column: occupancy, as: mean_occupancy}}
  features: {{type: features, input: traffic_minutes, road_graph: {graph}}}
  congestion:
    type: infer
    input: features
    model: {r}/models/onnx/congestion_small.onnx
    features: features
    outputs: {{speed_kmh: [speed_15m_kmh, speed_30m_kmh, speed_60m_kmh]}}
    keep: [segment_id, window_end]
    providers: [cuda, cpu]
    shadow: {{model: {r}/models/onnx/congestion_fp32.onnx}}
  incidents:
    type: infer
    input: features
    model: {r}/models/onnx/incident_fp32.onnx
    features: features
    outputs: {{incident_prob: [incident_prob]}}
    keep: [segment_id, window_end]
  california: {{type: california7, input: features, t1: {t1}, t2: {t2}, t3: {t3}}}
sinks:
  lake:
    type: parquet
    path: {data}/lake
    tables:
      traffic_minutes: traffic_minutes
      features: features
      predictions: congestion
      predictions_shadow: congestion.shadow
      incident_scores: incidents
      california7: california
      unmatched: features.unmatched
      dead_letters: traffic.dead_letters
      late: [traffic.late_events, unique.late_events, traffic_minutes.late_events]
runtime: {{status_interval: null}}
",
        data = data.display(),
        graph = graph(data).display(),
        r = r.display(),
        t1 = T.0,
        t2 = T.1,
        t3 = T.2,
    )
}

/// The simulated city's road graph, written by `citystream simulate` for the same city.
fn graph(data: &Path) -> PathBuf {
    data.join("graph/road_graph.csv")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_features_and_california7_match_the_python_training_code() {
    let dir = tempfile::tempdir().unwrap();
    // the graph first (the simulator writes its ground truth at the end of a run)
    let gdir = dir.path().join("graph");
    let sim =
        config::load_str(&yaml(dir.path()).replace(&graph(dir.path()).display().to_string(), "/dev/null"), "m.yaml")
            .unwrap();
    let citystream_pipeline::config::SourceConfig::Simulator(s) = sim.sources.values().next().unwrap().clone() else {
        panic!("a simulator source")
    };
    let city = citystream_pipeline::simulator::Simulation::new(*s, 0);
    city.write_ground_truth(&gdir).unwrap();

    let text = yaml(dir.path());
    let p = plan(config::load_str(&text, "models.yaml").unwrap(), "models.yaml").unwrap();
    let (_stop, rx) = StopHandle::new();
    let metrics = Metrics::new();
    runtime::run(p, metrics.clone(), rx).await.unwrap();
    let lake = dir.path().join("lake");

    let count = |t: &'static str| {
        let lake = lake.clone();
        async move {
            let r = sql::query(&lake, &format!("SELECT COUNT(*) FROM {t}")).await.unwrap();
            r[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0)
        }
    };
    let minutes = count("traffic_minutes").await;
    assert!(minutes > 24 * 500, "{minutes} minute rows");
    for t in ["features", "predictions", "predictions_shadow", "incident_scores", "california7"] {
        assert_eq!(count(t).await, minutes, "{t}: one row per segment-minute");
    }
    assert!(!lake.join("unmatched").exists(), "every segment is in the road graph");

    // predictions are plausible speeds, stamped with the model and its checksum
    let r = sql::query(
        &lake,
        "SELECT MIN(speed_30m_kmh), MAX(speed_30m_kmh), COUNT(DISTINCT model_sha256), MIN(model) = 'congestion_small' AND MAX(model) = 'congestion_small' FROM predictions",
    )
    .await
    .unwrap();
    let f = |i: usize| r[0].column(i).as_primitive::<arrow::datatypes::Float32Type>().value(0);
    assert!(f(0) >= 0.0 && f(1) < 140.0, "speeds {}..{}", f(0), f(1));
    assert_eq!(r[0].column(2).as_primitive::<arrow::datatypes::Int64Type>().value(0), 1);
    assert!(r[0].column(3).as_boolean().value(0), "every row names the model");
    // the incident model scores incident minutes far above the others
    let r = sql::query(
        &lake,
        "SELECT AVG(incident_prob) FROM incident_scores s WHERE EXISTS (SELECT 1 FROM california7 c WHERE c.segment_id = s.segment_id AND c.window_end = s.window_end AND c.incident)",
    )
    .await
    .unwrap();
    let on_alarm = r[0].column(0).as_primitive::<arrow::datatypes::Float64Type>().value(0);
    let r = sql::query(&lake, "SELECT AVG(incident_prob) FROM incident_scores").await.unwrap();
    let overall = r[0].column(0).as_primitive::<arrow::datatypes::Float64Type>().value(0);
    assert!(on_alarm > 3.0 * overall, "mean score where California #7 fires {on_alarm} vs overall {overall}");

    let out = Command::new(python())
        .arg(root().join("models/train/compare.py"))
        .arg(&lake)
        .arg(graph(dir.path()))
        .args([T.0.to_string(), T.1.to_string(), T.2.to_string()])
        .current_dir(root().join("models/train"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Python disagrees with the stream:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["rows"].as_i64().unwrap(), minutes);
    assert!(report["california7_alarm_minutes"].as_i64().unwrap() > 0, "{report}");
}

#[test]
fn the_committed_road_graph_is_the_embedded_defaults_city() {
    let cfg = config::load_file(&root().join("deploy/local.yaml")).unwrap();
    let citystream_pipeline::config::SourceConfig::Simulator(s) = cfg.sources.values().next().unwrap().clone() else {
        panic!("a simulator source")
    };
    let dir = tempfile::tempdir().unwrap();
    citystream_pipeline::simulator::Simulation::new(*s, 0).write_ground_truth(dir.path()).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("road_graph.csv")).unwrap(),
        std::fs::read_to_string(root().join("deploy/road_graph.csv")).unwrap(),
        "deploy/road_graph.csv is stale: `citystream simulate -c deploy/local.yaml --duration 1m --out DIR` writes the current one"
    );
    // deploy/sites.csv: the segment of each camera and station (cameras.csv, stations.csv)
    let segments: Vec<String> = std::fs::read_to_string(dir.path().join("road_graph.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect();
    let mut sites = String::from("location,segment_id\n");
    for f in ["cameras.csv", "stations.csv"] {
        for l in std::fs::read_to_string(dir.path().join(f)).unwrap().lines().skip(1) {
            let c: Vec<&str> = l.split(',').collect();
            sites.push_str(&format!("{},{}\n", c[0], segments[c[1].parse::<usize>().unwrap()]));
        }
    }
    assert_eq!(
        sites,
        std::fs::read_to_string(root().join("deploy/sites.csv")).unwrap(),
        "deploy/sites.csv is stale: cameras.csv and stations.csv of the ground truth give the current one"
    );
}

#[test]
fn alerting_is_the_floor_a_stage_alerts_read_may_thin_calm_segments_only_down_to_the_alert_floor() {
    let r = root();
    let local = std::fs::read_to_string(r.join("deploy/local.yaml"))
        .unwrap()
        .replace("models/onnx/", &format!("{}/models/onnx/", r.display()))
        .replace("deploy/road_graph.csv", &format!("{}/deploy/road_graph.csv", r.display()));
    let with = |every: &str, floor: Option<&str>| {
        let mut y = local.replace(
            "    shadow: {model: ",
            &format!(
                "    carbon: {{calm: {{column: speed_30m_kmh, above: 40, every: {every}}}}}\n    shadow: {{model: "
            ),
        );
        if let Some(f) = floor {
            y = y.replace(
                "  shutdown_timeout: 30s\n",
                &format!("  shutdown_timeout: 30s\n  carbon_policy: {{high_g_per_kwh: 300, alert_floor: {f}}}\n"),
            );
        }
        plan(config::load_str(&y, "local.yaml").unwrap(), "local.yaml")
    };
    // congestion_alerts reads the congestion stage: 10 minutes between predictions is past the 5 minute floor
    let err = with("10m", None).expect_err("refused").to_string();
    assert!(err.contains("stages.congestion.carbon.calm.every") && err.contains("alert floor"), "{err}");
    assert!(with("5m", None).is_ok());
    assert!(with("10m", Some("15m")).is_ok(), "a deliberately raised floor");
    let err = with("10m", Some("2m")).expect_err("refused").to_string();
    assert!(err.contains("alert floor (2m)"), "{err}");
}

/// The alerts `deploy/local.yaml`'s `incident_alerts` stage opens on one unseen road's scores
/// (`models/testdata/incident_alerts.json`, written by train.py), against those train.py's
/// `alert_rule` opened on them (less the alarms `joined_onsets` adds to a neighbour's alert): the
/// model card's `, alert rule` rows count what the deployed rule does, California #7's alarms
/// (`confirm`) included. The run is one where the rule without that confirmation and the rule
/// before `open_on_evidence` (`open_after` 3 within 4 minutes, `open_at_once`) open other
/// alerts, so the comparison tells them apart.
#[test]
fn the_deployed_incident_rule_opens_what_the_model_card_counted() {
    use citystream_operators::alert::{AlertConfig, JoinConfig, StormOrder};
    use citystream_operators::{BuildContext, Collector, EnvString, OperatorConfig};
    use std::io::Write;
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("models/testdata/incident_alerts.json")).unwrap())
            .unwrap();
    let cfg = config::load_file(&root().join("deploy/local.yaml")).unwrap();
    let mut deployed = cfg.stages["incident_alerts"].op.as_any().downcast_ref::<AlertConfig>().unwrap().clone();
    assert_eq!(deployed.raise, fx["raise"].as_f64().unwrap(), "deploy/local.yaml's raise is the card's threshold");
    assert_eq!(deployed.open_on_evidence, fx["rule"]["open_on_evidence"].as_f64(), "and its open_on_evidence");
    assert_eq!(deployed.clear, fx["rule"]["clear"].as_f64(), "and its clear level");
    assert_eq!(deployed.cooldown.as_millis(), fx["rule"]["cooldown_min"].as_u64().unwrap() * 60_000, "and cooldown");
    assert!(deployed.open_after.is_none() && deployed.open_at_once.is_none(), "one persistence test");
    let confirm = deployed.confirm.as_ref().expect("California #7 confirms the deployed rule's scores");
    assert_eq!(confirm.after, fx["confirm"]["after"].as_f64().unwrap(), "and the level it confirms after");
    assert_eq!(confirm.within.as_millis(), fx["confirm"]["within_min"].as_u64().unwrap() * 60_000, "and within");
    // the deployed reach on the scored road's graph
    let within = deployed.join.as_ref().expect("the deployed rule joins neighbours' alarms").within;
    assert_eq!(within as u64, fx["join_within"].as_u64().unwrap(), "deploy/local.yaml's join.within is the card's");
    let mut graph = tempfile::NamedTempFile::new().unwrap();
    writeln!(graph, "segment_id,upstream,downstream,free_speed_kmh").unwrap();
    for g in fx["graph"].as_array().unwrap() {
        let name = |i: usize| g[i].as_str().unwrap_or_default();
        writeln!(graph, "{},{},{},0", name(0), name(1), name(2)).unwrap();
    }
    deployed.join = Some(JoinConfig { road_graph: EnvString::literal(graph.path().display().to_string()), within });
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("segment_id", DataType::Utf8, false),
        Field::new("window_end", ts(), false),
        Field::new("incident_prob", DataType::Float64, true),
        Field::new(&confirm.column, DataType::Boolean, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("model_sha256", DataType::Utf8, false),
    ]));
    let rows = fx["rows"].as_array().unwrap();
    let opens = |rule: &AlertConfig| -> Vec<(String, i64)> {
        let mut op = rule.build(&schema, &BuildContext::default()).unwrap();
        let mut got = Vec::new();
        let mut out = Collector::new(1);
        let mut opened = |out: &mut Collector| {
            for (_, b) in out.drain() {
                let loc = b.column_by_name("location").unwrap().as_string::<i32>();
                let status = b.column_by_name("status").unwrap().as_string::<i32>();
                let at = b.column_by_name("ts").unwrap().as_primitive::<TimestampMillisecondType>();
                for i in (0..b.num_rows()).filter(|&i| status.value(i) == "open") {
                    got.push((loc.value(i).to_owned(), at.value(i)));
                }
            }
        };
        // a batch per minute, as the infer stage hands on a minute's scores, then the watermark
        // that closed that minute (a rule that joins takes rows in event-time order)
        for minute in rows.chunk_by(|a, b| a[1] == b[1]) {
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(minute.iter().map(|r| r[0].as_str().unwrap()))),
                    Arc::new(
                        TimestampMillisecondArray::from_iter_values(minute.iter().map(|r| r[1].as_i64().unwrap()))
                            .with_timezone("UTC"),
                    ),
                    Arc::new(Float64Array::from_iter_values(minute.iter().map(|r| r[2].as_f64().unwrap()))),
                    Arc::new(BooleanArray::from(minute.iter().map(|r| r[3].as_bool().unwrap()).collect::<Vec<_>>())),
                    Arc::new(StringArray::from_iter_values(minute.iter().map(|_| "incident_fp32"))),
                    Arc::new(StringArray::from_iter_values(minute.iter().map(|_| "sha"))),
                ],
            )
            .unwrap();
            op.process_batch(batch, &mut out).unwrap();
            opened(&mut out);
            op.on_watermark(minute[0][1].as_i64().unwrap(), &mut out).unwrap();
            opened(&mut out);
        }
        op.on_end(&mut out).unwrap();
        opened(&mut out);
        got
    };
    let expected = |key: &str| -> Vec<(String, i64)> {
        fx[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o[0].as_str().unwrap().to_owned(), o[1].as_i64().unwrap()))
            .collect()
    };
    let now = opens(&deployed);
    assert!(!now.is_empty(), "{}: the deployed rule opens alerts", fx["source"]);
    assert_eq!(now, expected("opens"), "{}: the deployed rule against train.py's alert_rule", fx["source"]);
    let mut alone = deployed.clone();
    alone.join = None;
    // open_on_evidence takes rows in event-time order, which join gave (the storm limit never
    // acts on the run: models/train/mirror_check.py)
    alone.storm.as_mut().expect("the deployed rule has a storm limit").order = StormOrder::EventTime;
    assert_eq!(opens(&alone), expected("opens_without_join"), "the rule without join");
    assert_ne!(expected("opens"), expected("opens_without_join"), "an alarm in the run joins a neighbour's alert");
    let mut unconfirmed = deployed.clone();
    unconfirmed.confirm = None;
    assert_eq!(opens(&unconfirmed), expected("opens_without_confirm"), "the rule without California #7's confirmation");
    assert_ne!(expected("opens"), expected("opens_without_confirm"), "California #7 confirms a score in the run");
    let mut before = unconfirmed.clone();
    let card = &fx["rule_before"];
    before.open_on_evidence = None;
    before.open_after = Some(citystream_operators::alert::OpenAfter {
        raises: card["open_after"][0].as_u64().unwrap() as usize,
        within: citystream_operators::Duration::from_secs(card["open_after"][1].as_u64().unwrap() * 60),
    });
    before.open_at_once = card["open_at_once"].as_f64();
    assert_eq!(opens(&before), expected("opens_before"), "the rule before open_on_evidence");
    assert_ne!(expected("opens"), expected("opens_before"), "the run tells the two rules apart");
}
