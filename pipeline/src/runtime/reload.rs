//! Live tuning: a new configuration for a running pipeline is validated as a whole, then its
//! tunable parameters are applied to the running stages between messages, so nothing in flight
//! is lost or repeated. Anything that cannot change live (the graph, sources, sinks, runtime
//! settings, parameters that shape operator state) rejects the whole reload, with every reason,
//! and the running configuration stays.

use std::collections::BTreeMap;
use std::sync::Arc;

use citystream_operators::{Counter, Metrics};
use tokio::sync::{mpsc, watch};

use crate::config::{OperatorSpec, PipelinePlan};

/// The outcome of comparing a running plan with a new one.
#[derive(Debug, Clone, PartialEq)]
pub enum ReloadOutcome {
    /// Nothing changed.
    Unchanged,
    /// These stages get new parameters.
    Apply(Vec<String>),
    /// The new configuration cannot be applied live, for these reasons.
    Rejected(Vec<String>),
}

/// Compares `current` with `new`.
pub fn compare(current: &PipelinePlan, new: &PipelinePlan) -> ReloadOutcome {
    let mut reasons = Vec::new();
    let fingerprint = |p: &PipelinePlan| {
        (
            without_locations(&format!("{:?}", p.sources.iter().map(|s| (&s.name, &s.config)).collect::<Vec<_>>())),
            without_locations(&format!("{:?}", p.sinks)),
            format!("{:?}", p.runtime),
        )
    };
    let (a, b) = (fingerprint(current), fingerprint(new));
    if a.0 != b.0 {
        reasons.push("sources changed: they need a restart".to_owned());
    }
    if a.1 != b.1 {
        reasons.push("sinks changed: they need a restart".to_owned());
    }
    if a.2 != b.2 {
        reasons.push("runtime settings changed: they need a restart".to_owned());
    }
    if current.name != new.name {
        reasons.push("the pipeline name changed: it labels metrics and needs a restart".to_owned());
    }
    let old: BTreeMap<&str, _> = current.stages.iter().map(|s| (s.name.as_str(), s)).collect();
    let fresh: BTreeMap<&str, _> = new.stages.iter().map(|s| (s.name.as_str(), s)).collect();
    if !old.keys().eq(fresh.keys()) {
        reasons.push("stages were added or removed: the graph needs a restart".to_owned());
    }
    let mut apply = Vec::new();
    for (name, o) in &old {
        let Some(n) = fresh.get(name) else { continue };
        if o.inputs != n.inputs {
            reasons.push(format!("stage `{name}`: its inputs changed, which needs a restart"));
            continue;
        }
        match o.op.live_change(&n.op) {
            Ok(true) => apply.push((*name).to_owned()),
            Ok(false) => {}
            Err(e) => reasons.push(format!("stage `{name}`: {e}")),
        }
    }
    if !reasons.is_empty() {
        ReloadOutcome::Rejected(reasons)
    } else if apply.is_empty() {
        ReloadOutcome::Unchanged
    } else {
        ReloadOutcome::Apply(apply)
    }
}

/// A configuration's debug text without the file positions it records (`Location { … }`), so
/// comments and layout do not count as changes. Secret values substituted from the
/// environment print hidden, so a changed secret alone is not seen as a change.
fn without_locations(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("Location {") {
        out.push_str(&rest[..i]);
        match rest[i..].find('}') {
            Some(j) => rest = &rest[i + j + 1..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Applies reloads from `rx` to the stages behind `senders` until `rx` closes.
pub(crate) async fn reloader(
    mut current: PipelinePlan,
    mut rx: mpsc::Receiver<PipelinePlan>,
    senders: BTreeMap<String, watch::Sender<Option<Arc<OperatorSpec>>>>,
    metrics: Metrics,
) {
    let outcome = |o: &str| -> Counter {
        metrics.counter("citystream_config_reloads_total", "Configuration reloads, per outcome.", &[("outcome", o)])
    };
    let (applied, unchanged, rejected) = (outcome("applied"), outcome("unchanged"), outcome("rejected"));
    while let Some(new) = rx.recv().await {
        match compare(&current, &new) {
            ReloadOutcome::Unchanged => {
                unchanged.inc();
                tracing::info!("configuration reloaded: nothing to change");
            }
            ReloadOutcome::Rejected(reasons) => {
                rejected.inc();
                tracing::error!(
                    "configuration reload rejected, the running configuration stays:\n  - {}",
                    reasons.join("\n  - ")
                );
            }
            ReloadOutcome::Apply(stages) => {
                for st in &new.stages {
                    if stages.contains(&st.name)
                        && let Some(tx) = senders.get(&st.name)
                    {
                        let _ = tx.send(Some(Arc::new(st.op.clone())));
                    }
                }
                applied.inc();
                tracing::info!(?stages, "configuration reloaded: new parameters applied live");
                current = new;
            }
        }
    }
}

/// Counts a configuration that failed to load or plan (reported by the caller).
pub fn count_invalid(metrics: &Metrics) {
    metrics
        .counter("citystream_config_reloads_total", "Configuration reloads, per outcome.", &[("outcome", "invalid")])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, plan::plan};

    const YAML: &str = "\
sources:
  city: {type: simulator, duration: 1h}
stages:
  traffic: {type: decode, input: city.traffic, kind: traffic}
  slow:
    type: filter
    input: traffic
    where: [{column: speed_kmh, op: lt, value: 20}]
  w:
    type: window
    input: traffic
    size: 5m
    aggregates: [{fn: count}]
sinks:
  lake:
    type: parquet
    path: /tmp/x
    tables: {t: slow, d: traffic.dead_letters, w: w, l: [traffic.late_events, w.late_events]}
";

    fn p(text: &str) -> PipelinePlan {
        plan(load_str(text, "x.yaml").unwrap(), "x.yaml").unwrap()
    }

    #[test]
    fn tunable_changes_apply_and_the_rest_is_rejected_with_reasons() {
        assert_eq!(compare(&p(YAML), &p(YAML)), ReloadOutcome::Unchanged);
        // comments and layout do not matter
        assert_eq!(compare(&p(YAML), &p(&format!("# a comment\n{YAML}"))), ReloadOutcome::Unchanged);
        assert_eq!(
            compare(&p(YAML), &p(&YAML.replace("value: 20", "value: 25"))),
            ReloadOutcome::Apply(vec!["slow".into()])
        );
        match compare(&p(YAML), &p(&YAML.replace("size: 5m", "size: 10m").replace("op: lt", "op: gt"))) {
            ReloadOutcome::Rejected(r) => {
                assert_eq!(r.len(), 2, "{r:?}");
                assert!(r[0].starts_with("stage `slow`: the values of a filter's conditions change live"), "{r:?}");
                assert!(r[1].starts_with("stage `w`: only `allowed_lateness`"), "{r:?}");
            }
            other => panic!("{other:?}"),
        }
        match compare(&p(YAML), &p(&YAML.replace("/tmp/x", "/tmp/y"))) {
            ReloadOutcome::Rejected(r) => assert_eq!(r, ["sinks changed: they need a restart"]),
            other => panic!("{other:?}"),
        }
    }
}
