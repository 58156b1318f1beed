//! Rules over the whole plan: no output left unread, and alerting as the floor of carbon-aware
//! operation.

use std::collections::BTreeSet;

use super::super::OperatorSpec;
use super::{Planner, SinkNode, StageNode, StreamRef};

impl Planner<'_> {
    /// Every stage output is read by a stage or a sink: nothing is dropped silently.
    pub(super) fn check_unread(&mut self, stages: &[StageNode], sinks: &[SinkNode]) {
        let raw = self.raw;
        // every stage output must be read by someone: nothing is dropped silently
        let consumed: BTreeSet<(String, usize)> = stages
            .iter()
            .flat_map(|s| s.inputs.iter())
            .chain(sinks.iter().flat_map(|s| s.inputs.iter().map(|(_, r)| r)))
            .map(|r| (r.node.clone(), r.port))
            .collect();
        for st in stages {
            for (p, out) in st.outputs.iter().enumerate() {
                if !consumed.contains(&(st.name.clone(), p)) {
                    let r = StreamRef { node: st.name.clone(), port: p, port_name: out.name.clone() };
                    self.ck.error(
                        raw.stages[&st.name].location,
                        format!("stages.{}", st.name),
                        format!("output `{r}` is not read by any stage or sink"),
                        Some(format!("route `{r}` to a sink table; citystream never drops rows silently")),
                    );
                }
            }
        }
    }

    /// A stage whose output reaches an `alert` stage may delay predictions or releases in the
    /// high-carbon mode by at most the alert floor and the rule's `stale_after`.
    pub(super) fn check_carbon_floor(&mut self, stages: &[StageNode]) {
        let raw = self.raw;
        // alerting is the floor of carbon-aware operation: a stage whose predictions reach an
        // `alert` stage (directly or through other stages) may thin calm keys to at most one
        // prediction per `alert_floor`, and never beyond a reading rule's `stale_after`
        let floor = raw.runtime.carbon_policy.as_ref().map_or(crate::energy::d_alert_floor(), |p| p.alert_floor);
        for st in stages {
            // what the high mode may delay, and the key it is set at
            let (delay, key, fix) = match &st.op {
                OperatorSpec::Infer(cfg) => match cfg.carbon.as_ref().and_then(|c| c.calm.as_ref()) {
                    Some(calm) => (calm.every, "carbon.calm.every", "shorten `every`"),
                    None => continue,
                },
                OperatorSpec::DpAggregate(cfg) => match &cfg.defer {
                    Some(d) => {
                        if raw.runtime.carbon_policy.is_none() {
                            self.ck.error(
                                raw.stages[&st.name].location,
                                format!("stages.{}.defer", st.name),
                                "deferred releases follow the carbon policy, and there is none",
                                Some("add `runtime.carbon_policy` (and `runtime.energy` for the grid), or remove `defer`".into()),
                            );
                        }
                        (d.max_delay, "defer.max_delay", "shorten `max_delay`")
                    }
                    None => continue,
                },
                _ => continue,
            };
            let mut reached: BTreeSet<&str> = BTreeSet::new();
            let mut frontier = vec![(st.name.as_str(), Some(0usize))];
            while let Some((node, port)) = frontier.pop() {
                for next in stages {
                    let reads = next.inputs.iter().any(|r| r.node == node && port.is_none_or(|p| r.port == p));
                    if reads && reached.insert(next.name.as_str()) {
                        frontier.push((next.name.as_str(), None));
                    }
                }
            }
            let every = delay.as_millis_i64();
            for a in stages.iter().filter(|a| reached.contains(a.name.as_str())) {
                let OperatorSpec::Alert(rule) = &a.op else { continue };
                let (limit, what) = if rule.stale_after.as_millis_i64() < floor.as_millis_i64() {
                    (rule.stale_after, format!("`stale_after` of alert stage `{}`", a.name))
                } else {
                    (floor, "the alert floor".to_owned())
                };
                if every > limit.as_millis_i64() {
                    self.ck.error(
                        raw.stages[&st.name].location,
                        format!("stages.{}.{key}", st.name),
                        format!(
                            "`{delay}` is longer than {what} ({limit}): alert stage `{}` reads this stage's output",
                            a.name
                        ),
                        Some(format!("{fix}, or raise `runtime.carbon_policy.alert_floor` deliberately")),
                    );
                }
            }
        }
    }
}
