//! Sinks: each table, topic or alert stream resolved and checked — one schema per table, keys
//! that exist, alert streams for a control center, raw camera messages never, and positioned
//! rows filed by one source stream.

use std::collections::BTreeMap;

use arrow::datatypes::{DataType, SchemaRef};
use citystream_operators::did_you_mean;
use citystream_schemas::EventKind;
use serde_saphyr::Location;

use super::super::SinkConfig;
use super::{Planner, SinkNode, SourceNode, StageNode, any_committing, origin_of, valid_name};

impl Planner<'_> {
    /// Plans every sink.
    pub(super) fn plan_sinks(&mut self, sources: &[SourceNode], stages: &[StageNode]) -> Vec<SinkNode> {
        let raw = self.raw;
        let nowhere = Location::UNKNOWN;
        let committing = any_committing(sources);
        let mut sinks = Vec::new();
        let alerts_table = String::from("alerts");
        for (name, cfg) in &raw.sinks {
            // (table or topic, its inputs, its key column)
            let routes: Vec<(&String, &super::super::Inputs, Option<&str>)> = match cfg {
                SinkConfig::Parquet(p) => {
                    if p.tables.is_empty() {
                        self.ck.error(
                            nowhere,
                            format!("sinks.{name}.tables"),
                            "a parquet sink needs at least one table",
                            None,
                        );
                    }
                    for (i, d) in p.daily.iter().enumerate() {
                        if !p.tables.contains_key(d) {
                            let help = did_you_mean(d, p.tables.keys().map(String::as_str)).map_or_else(
                                || format!("its tables: {}", p.tables.keys().cloned().collect::<Vec<_>>().join(", ")),
                                |s| format!("did you mean `{s}`?"),
                            );
                            self.ck.error(
                                nowhere,
                                format!("sinks.{name}.daily[{i}]"),
                                format!("no table `{d}` in this sink"),
                                Some(help),
                            );
                        }
                    }
                    // the control center writes its decisions hourly into `alerts` and `feedback`
                    for (other, c) in &raw.sinks {
                        let SinkConfig::ControlCenter(c) = c else { continue };
                        if c.feedback_path.as_ref().map(|f| f.as_str()) != Some(p.path.as_str()) {
                            continue;
                        }
                        for t in p.daily.iter().filter(|t| *t == "alerts" || *t == "feedback") {
                            self.ck.error(
                                nowhere,
                                format!("sinks.{name}.daily"),
                                format!("`{t}` is shared with control center `{other}`, which partitions it by hour"),
                                Some(format!("keep `{t}` hourly")),
                            );
                        }
                    }
                    p.tables.iter().map(|(t, i)| (t, i, None)).collect()
                }
                #[cfg(feature = "kafka")]
                SinkConfig::Kafka(k) => {
                    if k.topics.is_empty() {
                        self.ck.error(
                            nowhere,
                            format!("sinks.{name}.topics"),
                            "a kafka sink needs at least one topic",
                            None,
                        );
                    }
                    k.topics.iter().map(|(t, r)| (t, &r.input, r.key.as_deref())).collect()
                }
                SinkConfig::ControlCenter(c) => {
                    if c.alerts.0.is_empty() {
                        self.ck.error(
                            nowhere,
                            format!("sinks.{name}.alerts"),
                            "a control center in a pipeline needs the alert streams it shows",
                            Some(
                                "list `alert` stages, e.g. `alerts: [incident_alerts]`; a control center fed by \
                                 the alerts topic runs alone: `citystream control --config FILE`"
                                    .into(),
                            ),
                        );
                    }
                    vec![(&alerts_table, &c.alerts, None)]
                }
                // made by the planner from a plan, never read from YAML
                #[cfg(feature = "kafka")]
                SinkConfig::Global(_) => Vec::new(),
            };
            let section = match cfg {
                SinkConfig::Parquet(_) => "tables",
                #[cfg(feature = "kafka")]
                SinkConfig::Kafka(_) => "topics",
                SinkConfig::ControlCenter(_) => "alerts",
                #[cfg(feature = "kafka")]
                SinkConfig::Global(_) => "streams",
            };
            let mut inputs = Vec::new();
            let mut tables = BTreeMap::new();
            for (table, refs, key) in routes {
                let first = refs.0.first().map_or(nowhere, |r| r.referenced);
                if section == "tables" && !valid_name(table) {
                    self.ck.error(
                        first,
                        format!("sinks.{name}.tables.{table}"),
                        format!("`{table}` is not a valid table name"),
                        Some("table names use lower-case letters, digits and `_`".into()),
                    );
                }
                for (i, r) in refs.0.iter().enumerate() {
                    let path = if section == "tables" {
                        format!("sinks.{name}.tables.{table}[{i}]")
                    } else if section == "alerts" {
                        format!("sinks.{name}.alerts[{i}]")
                    } else {
                        format!("sinks.{name}.topics.{table}.input[{i}]")
                    };
                    if let Some((sref, schema)) = self.resolve(&r.value, r.referenced, &path) {
                        if sources.iter().any(|s| s.name == sref.node) && sref.port_name == EventKind::Camera.as_str() {
                            // raw camera payloads carry plates and track ids; only `decode` may read them
                            self.ck.error(
                                r.referenced,
                                &path,
                                format!("`{sref}` is raw camera messages, which carry plates: they never reach a sink"),
                                Some("decode them first (`type: decode, kind: camera`), which pseudonymizes or drops identifiers".into()),
                            );
                        }
                        if let Some(k) = key
                            && schema.index_of(k).is_err()
                        {
                            let help = did_you_mean(k, schema.fields().iter().map(|f| f.name().as_str()))
                                .map(|s| format!("did you mean `{s}`?"));
                            self.ck.error(
                                r.referenced,
                                format!("sinks.{name}.topics.{table}.key"),
                                format!("`{sref}` has no column `{k}` to key messages by"),
                                help,
                            );
                        }
                        if section == "alerts" && schema != citystream_operators::alert::alert_schema() {
                            self.ck.error(
                                r.referenced,
                                &path,
                                format!("`{sref}` is not an alert stream"),
                                Some("a control center reads the outputs of `type: alert` stages".into()),
                            );
                        }
                        match tables.get(table) {
                            Some(prev) if prev != &schema => self.ck.error(
                                r.referenced,
                                &path,
                                format!("`{sref}` does not have the schema of `{table}`'s other inputs"),
                                Some("route streams of different shapes to different tables".into()),
                            ),
                            _ => {
                                tables.insert(table.clone(), schema);
                            }
                        }
                        inputs.push((table.clone(), sref));
                    }
                }
            }
            // the sink files rows by these columns and encodes them as positions
            for (table, schema) in &tables {
                for (column, want) in [("src_partition", DataType::Int32), ("src_offset", DataType::Int64)] {
                    if let Ok(f) = schema.field_with_name(column)
                        && f.data_type() != &want
                    {
                        self.ck.error(
                            nowhere,
                            format!("sinks.{name}.tables.{table}"),
                            format!(
                                "`{column}` names a row's source position ({want}), but in `{table}` it is {}",
                                f.data_type()
                            ),
                            Some("give the column another name (a `project` rename, or an aggregate's `as`)".into()),
                        );
                    }
                }
            }
            let mut origins = Vec::new();
            for (table, r) in &inputs {
                let origin = origin_of(sources, stages, r);
                let positioned = tables.get(table).is_some_and(|s: &SchemaRef| s.index_of("src_partition").is_ok());
                if origin.is_none() && positioned && committing {
                    // files are named after the topic and offsets they hold, which is how a restart
                    // finds what was written after the last commit; merged streams have no one topic
                    self.ck.error(
                        nowhere,
                        format!("sinks.{name}.tables.{table}"),
                        format!("`{r}` merges several source streams, so its rows cannot be filed by topic and offset"),
                        Some("route each topic's rows to the table through single-input stages".into()),
                    );
                }
                origins.push(origin.unwrap_or_else(|| r.node.clone()));
            }
            sinks.push(SinkNode { name: name.clone(), config: cfg.clone(), inputs, tables, origins });
        }
        sinks
    }
}
