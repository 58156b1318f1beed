//! Bad configs, each with the exact location and message a user sees.

use super::{load_str, plan::plan};

const GOOD: &str = "\
sources:
  city:
    type: simulator
    duration: 1h
stages:
  traffic:
    type: decode
    input: city.traffic
    kind: traffic
sinks:
  lake:
    type: parquet
    path: /tmp/x
    tables:
      traffic: traffic
      dead_letters: traffic.dead_letters
      late: traffic.late_events
";

/// Loads and plans `text`; returns the single error as `line:col: path: message` (+ help).
fn error_of(text: &str) -> String {
    let errs = match load_str(text, "bad.yaml") {
        Err(e) => e,
        Ok(raw) => match plan(raw, "bad.yaml") {
            Err(e) => e,
            Ok(_) => panic!("config was accepted:\n{text}"),
        },
    };
    errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
}

#[test]
fn the_good_config_plans() {
    let raw = load_str(GOOD, "good.yaml").unwrap();
    let p = plan(raw, "good.yaml").unwrap();
    assert_eq!(
        p.describe(),
        "pipeline citystream\n  source city (simulator) -> traffic, camera, environment\n  stage traffic (decode) <- city.traffic -> main [12 cols], dead_letters [9 cols], late_events [12 cols]\n  sink lake table dead_letters <- traffic.dead_letters\n  sink lake table late <- traffic.late_events\n  sink lake table traffic <- traffic\n"
    );
}

#[test]
fn unknown_key_with_suggestion() {
    let text = GOOD.replace("    duration: 1h\n", "    duraton: 1h\n");
    assert_eq!(
        error_of(&text),
        "bad.yaml:4:5: sources.city: unknown field `duraton`, expected one of seed, start, duration, speed, batch_rows, traffic_interval, max_out_of_orderness, thumbnail_rate, plate_read_rate, city, faults, ground_truth\n  help: did you mean `duration`?"
    );
}

#[test]
fn unknown_stage_type() {
    let text = GOOD.replace("type: decode", "type: decoder");
    assert_eq!(
        error_of(&text),
        "bad.yaml:7:5: stages.traffic: unknown variant `decoder`, expected one of decode, filter, project, dedup, window, compress, admit, sensor_health, zstd, dp_aggregate, features, infer, california7, alert\n  help: did you mean `decode`?"
    );
}

#[test]
fn type_must_come_first() {
    let text =
        GOOD.replace("    type: decode\n    input: city.traffic\n", "    input: city.traffic\n    type: decode\n");
    assert_eq!(error_of(&text), "bad.yaml:7:5: stages.traffic: the first key of a stage must be `type`, found `input`");
}

#[test]
fn unknown_event_kind() {
    let text = GOOD.replace("kind: traffic", "kind: trafic");
    assert_eq!(
        error_of(&text),
        "bad.yaml:9:11: stages.traffic.kind: unknown variant `trafic`, expected one of traffic, camera, environment\n  help: did you mean `traffic`?"
    );
}

#[test]
fn bad_duration() {
    let text = GOOD.replace("duration: 1h", "duration: 1 hour");
    assert_eq!(
        error_of(&text),
        "bad.yaml:4:15: sources.city.duration: invalid duration `1 hour`: expected an integer followed by ms, s, m, h or d (e.g. `30s`, `5m`)"
    );
}

#[test]
fn compression_level_out_of_range() {
    let text = GOOD.replace("    path: /tmp/x\n", "    path: /tmp/x\n    compression_level: 40\n");
    assert_eq!(
        error_of(&text),
        "bad.yaml:14:24: sinks.lake.compression_level: zstd compression level 40 is outside 1..=22"
    );
}

#[test]
fn wrong_type_for_a_number() {
    let text = GOOD.replace("    duration: 1h\n", "    duration: 1h\n    batch_rows: lots\n");
    assert_eq!(error_of(&text), "bad.yaml:5:17: sources.city.batch_rows: expected a non-negative integer");
}

#[test]
fn unknown_input_stream_with_suggestion() {
    let text = GOOD.replace("input: city.traffic", "input: cty.traffic");
    assert_eq!(
        error_of(&text),
        "bad.yaml:8:12: stages.traffic.input: unknown stream `cty.traffic`: no source or stage is named `cty`\n  help: did you mean `city`?"
    );
}

#[test]
fn unknown_output_port() {
    let text = GOOD.replace("input: city.traffic", "input: city.trafic");
    assert_eq!(
        error_of(&text),
        "bad.yaml:8:12: stages.traffic.input: `city` has no output `trafic`\n  help: its outputs are traffic, camera, environment"
    );
}

#[test]
fn source_needs_a_port() {
    let text = GOOD.replace("input: city.traffic", "input: city");
    assert_eq!(
        error_of(&text),
        "bad.yaml:8:12: stages.traffic.input: source `city` has several outputs; name one\n  help: one of `city.traffic`, `city.camera`, `city.environment`"
    );
}

#[test]
fn dead_letters_must_be_routed() {
    let text = GOOD.replace("      dead_letters: traffic.dead_letters\n", "");
    assert_eq!(
        error_of(&text),
        "bad.yaml:7:11: stages.traffic: output `traffic.dead_letters` is not read by any stage or sink\n  help: route `traffic.dead_letters` to a sink table; citystream never drops rows silently"
    );
}

#[test]
fn schema_flow_is_checked_before_running() {
    let text = GOOD.replace(
        "sinks:\n",
        "  slow:\n    type: filter\n    input: traffic\n    where:\n      - {column: sped_kmh, op: lt, value: 20}\nsinks:\n",
    );
    let text = text.replace("      traffic: traffic\n", "      traffic: traffic\n      slow: slow\n");
    assert_eq!(
        error_of(&text),
        "bad.yaml:11:11: stages.slow.where[0].column: no column `sped_kmh` in the input\n  help: did you mean `speed_kmh`?"
    );
}

#[test]
fn decode_needs_raw_input() {
    let text = GOOD
        .replace("sinks:\n", "  again:\n    type: decode\n    input: traffic\n    kind: traffic\nsinks:\n")
        .replace(
            "      traffic: traffic\n",
            "      traffic: traffic\n      again: again\n      dl2: again.dead_letters\n",
        );
    assert_eq!(
        error_of(&text),
        "bad.yaml:11:11: stages.again.input: `decode` needs a raw message stream (a source output), but its input carries typed rows\n  help: point `input` at a source output such as `city.traffic`"
    );
}

#[test]
fn cycles_are_reported() {
    let text = GOOD.replace(
        "sinks:\n",
        "  a:\n    type: project\n    input: b\n    columns: [flow]\n  b:\n    type: project\n    input: a\n    columns: [flow]\nsinks:\n",
    );
    let e = error_of(&text);
    assert!(e.starts_with("bad.yaml:11:11: stages.a: stages form a cycle: a -> b"), "{e}");
}

#[test]
fn missing_env_var_names_the_place() {
    let text = GOOD.replace("path: /tmp/x", "path: ${CITYSTREAM_TEST_SURELY_UNSET}/x");
    assert_eq!(
        error_of(&text),
        "bad.yaml:13:11: sinks.lake.path: environment variable `CITYSTREAM_TEST_SURELY_UNSET` is not set (referenced as `${CITYSTREAM_TEST_SURELY_UNSET}`; use `${CITYSTREAM_TEST_SURELY_UNSET:-default}` for a fallback)"
    );
}

#[test]
fn yaml_syntax_error() {
    let text = GOOD.replace("      traffic: traffic\n", "      traffic: [traffic\n");
    let e = error_of(&text);
    assert!(e.starts_with("bad.yaml:16:"), "{e}");
}

#[test]
fn several_problems_are_reported_together() {
    let text = GOOD
        .replace("input: city.traffic", "input: nowhere")
        .replace("dead_letters: traffic.dead_letters", "dead_letters: traffic.dead_lettres");
    let e = error_of(&text);
    let lines: Vec<_> = e.lines().filter(|l| l.starts_with("bad.yaml")).collect();
    assert_eq!(lines.len(), 1, "the stage fails to resolve, so its outputs are not reported again: {e}");
    let text = GOOD
        .replace("dead_letters: traffic.dead_letters", "dead_letters: traffic.dead_lettres")
        .replace("    path: /tmp/x\n", "    path: /tmp/x\n    tables_x: 1\n");
    assert!(error_of(&text).contains("unknown field `tables_x`"));
    let text = GOOD.replace("dead_letters: traffic.dead_letters", "dead_letters: [traffic.dead_lettres, nope]");
    let e = error_of(&text);
    let lines: Vec<_> = e.lines().filter(|l| l.starts_with("bad.yaml")).collect();
    assert_eq!(lines.len(), 3, "{e}");
    // sorted by position in the file
    assert!(lines[0].starts_with("bad.yaml:7:11: stages.traffic: output `traffic.dead_letters` is not read"), "{e}");
    assert!(
        lines[1]
            .starts_with("bad.yaml:16:22: sinks.lake.tables.dead_letters[0]: `traffic` has no output `dead_lettres`"),
        "{e}"
    );
    assert!(lines[2].starts_with("bad.yaml:16:44: sinks.lake.tables.dead_letters[1]: unknown stream `nope`"), "{e}");
}

#[test]
fn every_shipped_config_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            // the configs name repository files relative to the repository root, where they run
            let repo = root.parent().unwrap().display().to_string();
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("deploy/road_graph.csv", &format!("{repo}/deploy/road_graph.csv"))
                .replace("models/onnx/", &format!("{repo}/models/onnx/"));
            seen += 1;
            if path.file_name().is_some_and(|n| n == "control.yaml") {
                // not a pipeline: the file of `citystream control`
                let c: crate::control::ControlConfig =
                    super::parse_str(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
                assert!(c.alerts.0.is_empty() && c.kafka.and_then(|k| k.alerts_topic).is_some());
                continue;
            }
            let raw = super::load_str(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
            plan(raw, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert!(seen >= 1);
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_pipelines_have_one_source_and_file_rows_by_topic() {
    let kafka = "  bus:\n    type: kafka\n    brokers: x:1\n    group_id: g\n    topics: {traffic: t, camera: c}\n";
    let text = GOOD.replace("sources:\n", &format!("sources:\n{kafka}"));
    let e = error_of(&text);
    assert!(
        e.contains("sources: a pipeline with a kafka or files source must have exactly one source (it has 2)"),
        "{e}"
    );

    // a stage merging two topics cannot feed a table filed by topic and offset
    let text = GOOD
        .replace("  city:\n    type: simulator\n    duration: 1h\n", kafka)
        .replace("input: city.traffic", "input: [bus.traffic, bus.camera]")
        .replace("kind: traffic", "kind: traffic\n");
    let e = error_of(&text);
    assert!(e.contains("`traffic` merges several source streams"), "{e}");
}

#[test]
fn raw_camera_messages_never_reach_a_sink() {
    let text = GOOD.replace("      traffic: traffic\n", "      traffic: traffic\n      raw_cam: city.camera\n");
    let e = error_of(&text);
    assert!(e.contains("`city.camera` is raw camera messages, which carry plates: they never reach a sink"), "{e}");
}

#[test]
fn a_missing_pseudonym_secret_is_a_startup_error() {
    let text = GOOD.replace(
        "    kind: traffic\n",
        "    kind: traffic\n  cam:\n    type: decode\n    input: city.camera\n    kind: camera\n    pseudonymize: {secret_env: CITYSTREAM_TEST_NO_SUCH_SECRET}\n",
    )
    .replace("      traffic: traffic\n", "      traffic: traffic\n      camera: cam\n      cam_dl: cam.dead_letters\n");
    let e = error_of(&text);
    assert!(
        e.contains(
            "stages.cam.pseudonymize.secret_env: the environment variable `CITYSTREAM_TEST_NO_SUCH_SECRET` is not set"
        ),
        "{e}"
    );
}

#[test]
fn a_fixed_dp_noise_seed_is_refused_outside_tests() {
    // (this test binary never sets CITYSTREAM_ALLOW_INSECURE_DP_SEED)
    let text = GOOD.replace(
        "    kind: traffic\n",
        "    kind: traffic\n  dp:\n    type: dp_aggregate\n    input: traffic\n    release: r\n    privacy_unit: event_id\n    partition: segment_id\n    aggregate: count\n    window: 1h\n    mechanism: laplace\n    epsilon: 1\n    budget: {epsilon: 10}\n    budget_dir: /tmp/b\n    partitions: {public: [a]}\n    insecure_seed: 3\n",
    )
    .replace("      traffic: traffic\n", "      traffic: traffic\n      dp: dp\n      dp_late: dp.late_events\n");
    let e = error_of(&text);
    assert!(
        e.contains("stages.dp.insecure_seed: a fixed noise seed makes the noise predictable and is for tests only"),
        "{e}"
    );
}

#[test]
fn state_checkpoints_need_a_kafka_source() {
    let text = format!("{GOOD}runtime:\n  state_dir: /tmp/state\n");
    let e = error_of(&text);
    assert!(e.contains("runtime.state_dir: state checkpoints need a kafka or files source"), "{e}");
    assert!(e.contains("help: remove `state_dir`"), "{e}");
}

#[test]
fn a_files_source_names_its_kinds_a_sane_rate_and_needs_a_state_dir() {
    let text = "
sources:
  archive:
    type: files
    paths: {traffic: /archive/traffic}
    rate: 0
stages:
  env:
    type: decode
    input: archive.environment
    kind: environment
sinks:
  lake:
    type: parquet
    path: /tmp/lake
    tables: {env: env, dead: env.dead_letters, late: env.late_events}
";
    let e = error_of(text);
    assert!(e.contains("sources.archive.rate: `rate` must be a positive number of lines per second"), "{e}");
    assert!(e.contains("sources.archive: a files source needs `runtime.state_dir`"), "{e}");
    assert!(
        e.contains("stages.env.input: `archive.environment` has no path: source `archive` reads only the kinds its `paths` names"),
        "{e}"
    );
    assert!(e.contains("help: add `environment: <path>` to `sources.archive.paths`"), "{e}");
    let fixed =
        text.replace("rate: 0", "rate: 1000").replace("{traffic: /archive/traffic}", "{environment: /archive/env}")
            + "runtime:\n  state_dir: /tmp/state\n";
    plan(load_str(&fixed, "files.yaml").unwrap(), "files.yaml").unwrap();
    // the state may be given as a URL instead, local or on S3, but not both ways
    let on_s3 = fixed.replace("state_dir: /tmp/state", "state_url: s3://city-state/north");
    let p = plan(load_str(&on_s3, "files.yaml").unwrap(), "files.yaml").unwrap();
    assert_eq!(
        p.runtime.state().unwrap(),
        Some(crate::task::StateUrl::S3 { bucket: "city-state".into(), prefix: "north".into() })
    );
    let e = error_of(&format!("{fixed}  state_url: file:///tmp/state\n"));
    assert!(e.contains("runtime.state_url: give `state_dir` or `state_url`, not both"), "{e}");
    let e = error_of(&fixed.replace("state_dir: /tmp/state", "state_url: gs://bucket/x"));
    assert!(e.contains("runtime.state_url: `gs://bucket/x`: state URLs are `file:///absolute/dir` or `s3://"), "{e}");
    assert!(e.contains("help: `state_url: s3://bucket/prefix`"), "{e}");
}

/// A Kafka pipeline with a DP release that may be deferred.
fn deferred_dp(defer: &str, policy: &str) -> String {
    format!(
        "\
sources:
  k: {{type: kafka, brokers: 127.0.0.1:1, group_id: g, topics: {{traffic: t, camera: null, environment: null}}}}
stages:
  traffic: {{type: decode, input: k.traffic, kind: traffic}}
  dp:
    type: dp_aggregate
    input: traffic
    release: r
    privacy_unit: event_id
    partition: segment_id
    aggregate: count
    window: 1h
    mechanism: laplace
    epsilon: 1.0
    budget: {{epsilon: 10}}
    budget_dir: /tmp/b
    partitions: {{public: [a]}}
    {defer}
  hot: {{type: filter, input: dp, where: [{{column: value, op: gt, value: 100}}]}}
  alarm: {{type: alert, input: hot, rule: r, alert_type: crowd, severity: warning, value: value, raise: 1, location: segment_id}}
sinks:
  lake: {{type: parquet, path: /tmp/x, tables: {{t: traffic, d: traffic.dead_letters, dp: dp, late: [traffic.late_events, dp.late_events], a: alarm}}}}
runtime:
  energy: {{path: /tmp/x, carbon_g_per_kwh: 300}}
{policy}"
    )
}

#[test]
fn deferred_dp_releases_need_the_carbon_policy_and_respect_the_alert_floor() {
    let policy = "  carbon_policy: {high_g_per_kwh: 200}\n";
    let raw = load_str(&deferred_dp("defer: {max_delay: 5m}", policy), "ok.yaml").unwrap();
    plan(raw, "ok.yaml").unwrap();
    let e = error_of(&deferred_dp("defer: {max_delay: 6h}", ""));
    assert!(e.contains("stages.dp.defer: deferred releases follow the carbon policy, and there is none"), "{e}");
    // an alert rule reads the release (through a filter): 6 h would delay it past the floor
    let e = error_of(&deferred_dp("defer: {max_delay: 6h}", policy));
    assert!(
        e.contains("stages.dp.defer.max_delay: `6h` is longer than the alert floor (5m): alert stage `alarm` reads"),
        "{e}"
    );
}

#[test]
fn daily_tables_must_be_tables_of_the_sink() {
    let text = GOOD
        .replace("      late: traffic.late_events\n", "      late: traffic.late_events\n    daily: [dead_leters]\n");
    let e = error_of(&text);
    assert!(e.contains("sinks.lake.daily[0]: no table `dead_leters` in this sink"), "{e}");
    assert!(e.contains("did you mean `dead_letters`?"), "{e}");
}

#[test]
fn a_kafka_source_reads_only_the_topics_it_names() {
    let text = "\
sources:
  k: {type: kafka, brokers: 127.0.0.1:1, topics: {traffic: t}}
stages:
  traffic: {type: decode, input: k.traffic, kind: traffic}
  camera: {type: decode, input: k.camera, kind: camera}
sinks:
  lake: {type: parquet, path: /tmp/x, tables: {t: traffic, c: camera, d: [traffic.dead_letters, camera.dead_letters], tl: traffic.late_events, cl: camera.late_events}}
";
    let e = error_of(text);
    assert!(
        e.contains("stages.camera.input: `k.camera` has no topic: source `k` reads only the kinds its `topics` names"),
        "{e}"
    );
    assert!(e.contains("help: add `camera: <topic>` to `sources.k.topics`"), "{e}");
    // without `topics`, the three default topics
    let raw = load_str(&text.replace(", topics: {traffic: t}", ""), "ok.yaml").unwrap();
    let p = plan(raw, "ok.yaml").unwrap();
    let crate::config::SourceConfig::Kafka(k) = &p.sources[0].config else { panic!("a kafka source") };
    assert_eq!(k.topics, crate::kafka::KafkaTopics::default());
    let e = error_of(&text.replace("topics: {traffic: t}", "topics: {}"));
    assert!(e.contains("sources.k.topics: a kafka source needs at least one topic"), "{e}");
}

/// `GOOD` with a dedup stage after decode whose `content` line is `content`.
fn with_dedup(content: &str) -> String {
    GOOD.replace(
        "sinks:\n",
        &format!("  dd:\n    type: dedup\n    input: traffic\n    horizon: 10m\n    {content}\nsinks:\n"),
    )
    .replace("      traffic: traffic\n", "      traffic: dd\n      dd_late: dd.late_events\n")
}

#[test]
fn documented_content_modes_parse_even_where_yaml_reads_a_boolean() {
    for content in ["content: off", "content: \"off\"", "content: false", "content: auto", "content: [speed_kmh]"] {
        let text = with_dedup(content);
        let raw = load_str(&text, "good.yaml").unwrap_or_else(|e| panic!("{content}: {e:?}"));
        plan(raw, "good.yaml").unwrap_or_else(|e| panic!("{content}: {e:?}"));
    }
}

#[test]
fn a_content_mode_of_the_wrong_form_names_the_accepted_forms() {
    let err = error_of(&with_dedup("content: 3"));
    assert!(err.contains("stages.dd.content") && err.contains("`auto`, `off`, or a list of column names"), "{err}");
    let err = error_of(&with_dedup("content: sometimes"));
    assert!(err.contains("`sometimes` is not a content mode") && err.contains("use `auto`, `off`"), "{err}");
}

/// The operator registry's contract: every registered `type` is recognised (a stage of that type
/// reaches its own config, which refuses a key it does not know, naming the stage) and has a
/// row in the README's table of stage types.
#[test]
fn every_registered_type_is_recognised_refuses_unknown_keys_and_is_documented() {
    let readme = include_str!("../../../README.md");
    let mut seen = std::collections::BTreeSet::new();
    for (t, summary) in super::OperatorSpec::SUMMARIES {
        assert!(seen.insert(*t), "`{t}` is registered twice");
        assert!(!summary.is_empty());
        let text = GOOD.replace(
            "sinks:\n",
            &format!("  probe:\n    type: {t}\n    input: traffic\n    no_such_option_anywhere: 1\nsinks:\n"),
        );
        let err = error_of(&text);
        assert!(err.contains("stages.probe") && err.contains("no_such_option_anywhere"), "{t}: {err}");
        assert!(readme.contains(&format!("| `{t}` |")), "`{t}` has no row in the README's table of stage types");
    }
}

/// A Kafka pipeline whose traffic topic is keyed by `keys` and whose stages (after `decode`)
/// are `stages`, every output routed to the lake.
#[cfg(feature = "kafka")]
fn keyed(keys: &str, stages: &str, tables: &str) -> String {
    format!(
        "\
sources:
  k: {{type: kafka, brokers: 127.0.0.1:1, topics: {{traffic: t}}, keys: {{traffic: {keys}}}}}
stages:
  traffic: {{type: decode, input: k.traffic, kind: traffic}}
{stages}sinks:
  lake: {{type: parquet, path: /tmp/x, tables: {{t: traffic, d: traffic.dead_letters, tl: traffic.late_events{tables}}}}}
"
    )
}

#[cfg(feature = "kafka")]
fn road_graph() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/road_graph.csv").display().to_string()
}

/// Co-partitioning: a keyed stage whose key does not determine the topic's key is refused with
/// the columns that would; a key that does, a declared `determined_by`, and `dedup`'s `within`
/// are accepted; a `project` that renames the key column loses the proof.
#[cfg(feature = "kafka")]
#[test]
fn keyed_stages_must_keep_each_key_on_one_partition() {
    let by_corridor = format!("{{column: segment_id, lookup: {}, group: corridor}}", road_graph());
    let window = |key: &str| {
        format!("  w: {{type: window, input: traffic, key: [{key}], size: 1m, aggregates: [{{fn: count, as: n}}]}}\n")
    };
    let tables = ", w: w, wl: w.late_events";
    let e = error_of(&keyed(&by_corridor, &window("sensor_id"), tables));
    assert!(e.contains("stages.w: `w` keeps state per [sensor_id], which does not determine its topic's key (`corridor` of `segment_id`"), "{e}");
    assert!(e.contains("sources.k.keys.traffic"), "{e}");
    assert!(e.contains("help: add one of `segment_id` to the stage's key"), "{e}");
    for ok in [window("segment_id"), window("lane, segment_id")] {
        plan(load_str(&keyed(&by_corridor, &ok, tables), "ok.yaml").unwrap(), "ok.yaml").unwrap();
    }
    // a detector lies on one segment: declared, a stage keyed by it is accepted
    let declared = by_corridor.replace('}', ", determined_by: [sensor_id]}");
    plan(load_str(&keyed(&declared, &window("sensor_id"), tables), "ok.yaml").unwrap(), "ok.yaml").unwrap();

    // dedup: ids match across the stream unless scoped `within` a determining column
    let dedup = |extra: &str| format!("  u: {{type: dedup, input: traffic, horizon: 10m{extra}}}\n");
    let e = error_of(&keyed(&by_corridor, &dedup(""), ", u: u, ul: u.late_events"));
    assert!(e.contains("`u` keeps state per [event_id]") && e.contains("`within: [segment_id]`"), "{e}");
    let ok = keyed(&by_corridor, &dedup(", within: [segment_id]"), ", u: u, ul: u.late_events");
    plan(load_str(&ok, "ok.yaml").unwrap(), "ok.yaml").unwrap();

    // a column a stage makes under a determining name holds other values
    let counted = "  w: {type: window, input: traffic, key: [lane], size: 1m, aggregates: [{fn: count, as: segment_id}]}\n  w2: {type: window, input: w, key: [segment_id], size: 1m, time_column: window_end, aggregates: [{fn: count, as: n}]}\n";
    let e = error_of(&keyed(&by_corridor, counted, ", w: w, wl: w.late_events, w2: w2, w2l: w2.late_events"));
    assert!(e.contains("`w` keeps state per [lane]") && e.contains("`w2` keeps state per [segment_id]"), "{e}");

    // the key is read from the decoded rows: a text column of the kind
    let e = error_of(&keyed("{column: lane}", "", ""));
    assert!(e.contains("sources.k.keys.traffic: `lane` of `traffic`'s rows is Int32, not text"), "{e}");
    let e = error_of(&keyed("{column: plate}", "", ""));
    assert!(e.contains("`plate` of `traffic`'s rows is not a column"), "{e}");

    // a rename hides which values the column holds
    let renamed = "  p: {type: project, input: traffic, columns: [segment_id, ts, flow], rename: {segment_id: road}}\n  w: {type: window, input: p, key: [road], size: 1m, aggregates: [{fn: count, as: n}]}\n";
    let e = error_of(&keyed(&by_corridor, renamed, ", w: w, wl: w.late_events"));
    assert!(e.contains("`w` keeps state per [road]") && e.contains("no column that determines"), "{e}");
}

/// `features` reads a segment's neighbours: keying by segment splits neighbours, by corridor
/// keeps them together; a road graph whose neighbours cross corridors is refused with the pairs.
#[cfg(feature = "kafka")]
#[test]
fn a_stage_reading_neighbours_needs_them_under_one_key() {
    let graph = road_graph();
    let stages = format!(
        "  m: {{type: window, input: traffic, key: [segment_id], size: 1m, aggregates: [{{fn: count, as: readings}}, {{fn: sum, column: flow, as: vehicles}}, {{fn: mean, column: speed_kmh, as: mean_speed_kmh}}, {{fn: mean, column: occupancy, as: mean_occupancy}}]}}\n  f: {{type: features, input: m, road_graph: {graph}}}\n"
    );
    let tables = ", m: m, ml: m.late_events, f: f, fu: f.unmatched";
    let by_corridor = format!("{{column: segment_id, lookup: {graph}, group: corridor}}");
    plan(load_str(&keyed(&by_corridor, &stages, tables), "ok.yaml").unwrap(), "ok.yaml").unwrap();
    let e = error_of(&keyed("{column: segment_id}", &stages, tables));
    assert!(e.contains("`f` reads each `segment_id` with its neighbours, and the topic's key (`segment_id`) puts 42 neighbour pair(s) on different keys: seg-00-00 (seg-00-00) next to seg-00-01 (seg-00-01)"), "{e}");
    // zones group segments too, but each corridor spans two zones: the links between them split
    let by_zone = format!("{{column: segment_id, lookup: {graph}, group: zone_id}}");
    let e = error_of(&keyed(&by_zone, &stages, tables));
    assert!(
        e.contains("puts 6 neighbour pair(s) on different keys: seg-00-03 (zone-00) next to seg-00-04 (zone-01)"),
        "{e}"
    );
    // keyed by another column, neighbours cannot be compared through the topic's key
    let by_sensor = "{column: sensor_id, determined_by: [segment_id]}";
    let e = error_of(&keyed(by_sensor, &stages, tables));
    assert!(
        e.contains("`f` reads each `segment_id` with its neighbours, and its topic is keyed by `sensor_id`"),
        "{e}"
    );
    // a key that does not load names its place
    let e = error_of(&keyed(&format!("{{column: segment_id, lookup: {graph}, group: district}}"), "", ""));
    assert!(e.contains("sources.k.keys.traffic: ") && e.contains("has no column `district`"), "{e}");
}

/// City-wide state (a storm limit, a DP budget) reading a keyed topic is not refused: `validate`
/// and the run's log name it, since each instance applies it to its own partitions.
#[cfg(feature = "kafka")]
#[test]
fn city_wide_state_on_a_keyed_topic_is_named() {
    let by_corridor = format!("{{column: segment_id, lookup: {}, group: corridor}}", road_graph());
    let stages = "  a: {type: alert, input: traffic, rule: slow, alert_type: congestion, severity: warning, value: speed_kmh, location: segment_id, time: ts, raise: 10, below: true, storm: {max_open: 3}}\n";
    let p = plan(load_str(&keyed(&by_corridor, stages, ", a: a"), "ok.yaml").unwrap(), "ok.yaml").unwrap();
    assert_eq!(p.city_wide_state, vec![("a".to_owned(), "`storm` limits the alerts open city-wide".to_owned())]);
    let p = plan(
        load_str(&keyed(&by_corridor, &stages.replace(", storm: {max_open: 3}", ""), ", a: a"), "ok.yaml").unwrap(),
        "ok.yaml",
    )
    .unwrap();
    assert!(p.city_wide_state.is_empty());
    // a DP release bounds each privacy unit over all its rows: the unit must keep to one
    // partition too, and public partitions are released by every instance
    let dp = |unit: &str, public: &str| {
        format!(
            "  s: {{type: dp_aggregate, input: traffic, release: s, privacy_unit: {unit}, partition: segment_id, aggregate: count, window: 1h, mechanism: laplace, epsilon: 1, budget: {{epsilon: 10, period: 1d}}, budget_dir: /tmp/b{public}}}\n"
        )
    };
    let e =
        error_of(&keyed(&by_corridor, &dp("sensor_id", ", partitions: {private: true}"), ", s: s, sl: s.late_events"));
    assert!(e.contains("`s` keeps state per [sensor_id]"), "{e}");
    let declared = by_corridor.replace('}', ", determined_by: [sensor_id]}");
    let text = keyed(&declared, &dp("sensor_id", ", partitions: {public: [seg-00-00]}"), ", s: s, sl: s.late_events");
    let p = plan(load_str(&text, "ok.yaml").unwrap(), "ok.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.city_wide_state.len(), 1, "{:?}", p.city_wide_state);
}

/// `src_partition` and `src_offset` are a row's source position in every table (files are named
/// and encoded by them): a stage's column under either name of another type is refused.
#[test]
fn position_columns_keep_their_types() {
    let text = GOOD
        .replace(
            "    kind: traffic\n",
            "    kind: traffic\n  w:\n    type: window\n    input: traffic\n    key: [segment_id]\n    size: 1m\n    aggregates: [{fn: mean, column: speed_kmh, as: src_offset}]\n",
        )
        .replace("      traffic: traffic\n", "      traffic: traffic\n      w: w\n      wl: w.late_events\n");
    let e = error_of(&text);
    assert!(
        e.contains("sinks.lake.tables.w: `src_offset` names a row's source position (Int64), but in `w` it is Float64"),
        "{e}"
    );
}

#[cfg(feature = "kafka")]
#[test]
fn partition_tasks_need_one_kafka_source_a_shared_state_url_and_no_control_center() {
    let kafka = "\
sources:
  k: {type: kafka, brokers: 127.0.0.1:1, topics: {traffic: t}}
stages:
  traffic: {type: decode, input: k.traffic, kind: traffic}
sinks:
  lake: {type: parquet, path: /tmp/x, tables: {t: traffic, d: traffic.dead_letters, l: traffic.late_events}}
runtime:
  tasks: partition
";
    let good = format!("{kafka}  state_url: s3://city-state/north\n");
    let p = plan(load_str(&good, "ok.yaml").unwrap(), "ok.yaml").unwrap();
    assert_eq!(p.runtime.tasks, crate::config::TaskMode::Partition);
    // task 3's plan: its partition, its state and its DP budgets of its own
    let t = p.task_plan(3).unwrap();
    assert_eq!(t.runtime.state_url.as_ref().unwrap().as_str(), "s3://city-state/north/task-3");
    let crate::config::SourceConfig::Kafka(k) = &t.sources[0].config else { panic!("a kafka source") };
    assert_eq!(k.task, Some(3));
    assert_eq!(t.runtime.tasks, crate::config::TaskMode::Process);

    let e = error_of(kafka);
    assert!(
        e.contains("runtime.tasks: `tasks: partition` needs `runtime.state_url`, the same for every instance"),
        "{e}"
    );
    let e = error_of(&format!("{kafka}  state_dir: /tmp/state\n"));
    assert!(e.contains("needs `runtime.state_url`"), "a state_dir of each machine's own is refused: {e}");
    let e = error_of(&format!("{GOOD}runtime:\n  tasks: partition\n"));
    assert!(e.contains("runtime.tasks: `tasks: partition` runs one task per partition of a Kafka source"), "{e}");
    let control = good.replace(
        "runtime:",
        "  control: {type: control_center, addr: 127.0.0.1:0, alerts: [], tokens_env: T, feedback_path: /tmp/f}\nruntime:",
    );
    let e = error_of(&control);
    assert!(e.contains("sinks.control: a control center serves one book per process"), "{e}");
    let e = error_of(&format!("{good}  tasks: partitions\n").replace("  tasks: partition\n  state_url", "  state_url"));
    assert!(e.contains("tasks"), "{e}");
}

/// With per-partition tasks, stages holding city-wide state and what reads them form the
/// global task: the tasks publish the streams it reads, its source hands them to its stages,
/// and each sink gets the rows of its own part (a table fed by both gets files from each).
#[cfg(feature = "kafka")]
#[test]
fn city_wide_stages_and_their_readers_form_the_global_task() {
    let yaml = "\
sources:
  k: {type: kafka, brokers: 127.0.0.1:1, group_id: city, topics: {traffic: t}, keys: {traffic: {column: segment_id, determined_by: [sensor_id]}}}
stages:
  traffic: {type: decode, input: k.traffic, kind: traffic}
  health: {type: sensor_health, input: traffic, key: [sensor_id], values: [flow], keep: [segment_id]}
  alerts:
    type: alert
    input: health.health
    rule: sensor_health
    alert_type: sensor_health
    severity: warning
    value: faulty
    location: sensor_id
    time: ts
    raise: 1
    clear: 0.5
    storm: {max_open: 2}
  slow: {type: filter, input: alerts, where: [{column: severity, op: eq, value: warning}]}
  dp:
    type: dp_aggregate
    input: traffic
    release: speed
    privacy_unit: event_id
    partition: segment_id
    aggregate: count
    window: 1h
    mechanism: laplace
    epsilon: 1.0
    budget: {epsilon: 30, period: 1d}
    budget_dir: /tmp/privacy
    partitions: {public: [a, b]}
sinks:
  lake:
    type: parquet
    path: /tmp/x
    tables: {t: traffic, d: traffic.dead_letters, h: health.health, r: health, st: health.stuck, a: alerts, s: slow, p: dp, late: [traffic.late_events, dp.late_events]}
runtime:
  tasks: partition
  global_task: true
  state_url: s3://city-state/north
";
    let Ok(p) = plan(load_str(yaml, "g.yaml").unwrap(), "g.yaml") else {
        panic!("{}", error_of(yaml));
    };
    let global: Vec<String> = p.global_stages().into_iter().collect();
    assert_eq!(global, ["alerts", "dp", "slow"], "storm-limited alerts, public DP partitions, and what reads them");

    let t = p.task_plan(2).unwrap();
    let names = |v: &[crate::config::plan::StageNode]| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&t.stages), ["traffic", "health"]);
    let publish = t.sinks.iter().find(|s| s.name == "_global").expect("the tasks' publisher");
    let crate::config::SinkConfig::Global(c) = &publish.config else { panic!("a publisher") };
    assert_eq!((c.topic.as_str(), c.task), ("city.global", 2));
    assert_eq!(publish.inputs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["traffic", "health.health"]);
    let lake = t.sinks.iter().find(|s| s.name == "lake").unwrap();
    assert_eq!(lake.tables.keys().collect::<Vec<_>>(), ["d", "h", "late", "r", "st", "t"], "the tasks' tables");
    assert!(t.city_wide_state.is_empty());

    let g = p.global_plan().unwrap().expect("a global task");
    assert_eq!(g.runtime.state_url.as_ref().unwrap().as_str(), "s3://city-state/north/global");
    let mut stages = names(&g.stages);
    stages.sort();
    assert_eq!(stages, ["alerts", "dp", "slow"]);
    let port_of =
        |stage: &str| g.stages.iter().find(|s| s.name == stage).map(|s| (s.inputs[0].node.as_str(), s.inputs[0].port));
    assert_eq!((port_of("dp"), port_of("alerts")), (Some(("_global", 0)), Some(("_global", 1))));
    assert_eq!(g.sources.len(), 1);
    assert!(matches!(g.sources[0].config, crate::config::SourceConfig::Global(_)));
    assert_eq!(g.sources[0].outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["traffic", "health.health"]);
    let health = p.stages.iter().find(|s| s.name == "health").unwrap();
    let port = health.outputs.iter().find(|o| o.name == "health").unwrap();
    assert_eq!(g.sources[0].outputs[1].schema, port.schema, "the global source's port has the stream's schema");
    let lake = &g.sinks[0];
    assert_eq!(lake.tables.keys().collect::<Vec<_>>(), ["a", "late", "p", "s"], "the global task's tables");
    assert_eq!(lake.inputs.iter().filter(|(t, _)| t == "late").count(), 1);

    // the global task reads every partition: its stages' keys need not follow the topic's
    // (`dp`'s privacy unit `event_id` does not), as they must with one whole graph per process
    let process = yaml.replace("  tasks: partition\n  global_task: true\n", "");
    let e = error_of(&process);
    assert!(e.contains("`dp` keeps state per [event_id], which does not determine its topic's key"), "{e}");
    let p = plan(load_str(&process.replace("[sensor_id]}", "[sensor_id, event_id]}"), "p.yaml").unwrap(), "p.yaml")
        .unwrap();
    assert!(p.global_plan().unwrap().is_none(), "one task per process: no global task");
}
