//! Calibration: a proposed raise level from the alerts operators judged, moving at most
//! `max_step` at a time and only with enough verdicts.

use serde::Deserialize;

/// The highest level calibration sets for a probability: a level nearer 1 would open nothing
/// but the surest scores (and `open_on_evidence` takes log-odds within [1e-7, 1 - 1e-7]).
const SUREST_LEVEL: f64 = 0.9999;

/// One alert an operator judged: the value that raised it (its peak) and the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    /// The alert's peak value.
    pub value: f64,
    /// Acknowledged or resolved: a true alarm; marked false alarm: not.
    pub true_alarm: bool,
}

/// How thresholds follow operator feedback.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    /// The share of alerts operators should confirm.
    pub target_precision: f64,
    /// Largest move per calibration, as a share of the threshold's magnitude. Default 0.05.
    #[serde(default = "d_max_step")]
    pub max_step: f64,
    /// Fewer judged alerts than this leave a location alone. Default 5.
    #[serde(default = "d_min_judged")]
    pub min_judged: usize,
    /// Above `target_precision + slack` the threshold is lowered (half a step) to catch more.
    /// Default 0.1.
    #[serde(default = "d_slack")]
    pub slack: f64,
}

fn d_max_step() -> f64 {
    0.05
}
fn d_min_judged() -> usize {
    5
}
fn d_slack() -> f64 {
    0.1
}

/// A proposed threshold for one location, with why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Proposal {
    /// The threshold now.
    pub old: f64,
    /// The proposed one (bounded by `max_step`).
    pub new: f64,
    /// Share of judged alerts confirmed.
    pub precision: f64,
    /// How many were judged.
    pub judged: usize,
}

/// Moves a location's raise level toward the precision target from operator verdicts: when too
/// many alerts are false alarms, up to the least level at which the judged alerts beyond it reach
/// the target (at most `max_step`); when nearly all are confirmed, down half a step. `below`
/// rules move the other way. A probability's level (one in (0, 1), every judged value in
/// [0, 1]) stays below 1: it moves up at most half its distance to 1, and to 0.9999 at most,
/// since at 1 or above a rule would never raise there (and `open_on_evidence` could weigh
/// nothing). `None` when there is too little feedback or nothing to change.
pub fn calibrate(current: f64, below: bool, judged: &[Judged], spec: &CalibrationSpec) -> Option<Proposal> {
    if judged.len() < spec.min_judged.max(1) {
        return None;
    }
    let confirmed = judged.iter().filter(|j| j.true_alarm).count();
    let precision = confirmed as f64 / judged.len() as f64;
    let step = spec.max_step * current.abs().max(1e-9);
    // in "above" terms: a higher level is stricter
    let (dir, cur) = if below { (-1.0, -current) } else { (1.0, current) };
    let target = if precision < spec.target_precision {
        let mut vals: Vec<(f64, bool)> = judged.iter().map(|j| (dir * j.value, j.true_alarm)).collect();
        vals.sort_by(|a, b| a.0.total_cmp(&b.0));
        // the least level whose alerts at or beyond it reach the target
        let reach = (0..vals.len()).find(|&i| {
            let rest = &vals[i..];
            rest.iter().filter(|v| v.1).count() as f64 / rest.len() as f64 >= spec.target_precision
        });
        let level = reach.map_or(cur + step, |i| vals[i].0.max(cur));
        let probability =
            !below && current > 0.0 && current < 1.0 && judged.iter().all(|j| (0.0..=1.0).contains(&j.value));
        if probability {
            level.min(cur + step.min((1.0 - cur) / 2.0)).min(SUREST_LEVEL.max(cur))
        } else {
            level.min(cur + step)
        }
    } else if precision >= spec.target_precision + spec.slack {
        cur - step / 2.0
    } else {
        return None;
    };
    let new = dir * target;
    (new != current).then_some(Proposal { old: current, new, precision, judged: judged.len() })
}
