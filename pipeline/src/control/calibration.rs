//! Calibration from operators' verdicts: per rule and location, a bounded proposal of a new
//! raise level (`alert::calibrate`); applied live to the pipeline's [`ThresholdBoard`] as one
//! numbered change, kept with its history in `calibration_file` (replayed at start) and
//! revertible.

use super::ControlError;
use std::collections::BTreeMap;

use citystream_operators::alert::{CalibrationSpec, Judged, Proposal, ThresholdBoard, calibrate, weighable_level};
use serde::{Deserialize, Serialize};

use super::book::Book;

/// One level a calibration changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LevelChange {
    /// The rule.
    pub rule: String,
    /// The location.
    pub location: String,
    /// The level before (the configured one when there was no live level).
    pub old: f64,
    /// The level after.
    pub new: f64,
    /// The precision the proposal reported (`alert::Proposal::precision`).
    pub precision: f64,
    /// Alerts judged.
    pub judged: usize,
    /// Whether a live level was set before (a revert removes it again when not).
    pub had_live: bool,
}

/// One applied calibration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibrationChange {
    /// Its number.
    pub id: u64,
    /// When (processing time, ms).
    pub ts: i64,
    /// Who applied it (the token's name).
    pub operator: String,
    /// The precision it aimed at.
    pub target_precision: f64,
    /// What it changed.
    pub changes: Vec<LevelChange>,
    /// When and by whom it was reverted.
    pub reverted: Option<(i64, String)>,
}

/// Every change, and the file they are kept in.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Calibrations {
    pub(crate) history: Vec<CalibrationChange>,
    #[serde(skip)]
    pub(crate) file: Option<std::path::PathBuf>,
}

impl Calibrations {
    /// Reads the history and replays it into `board`.
    pub(crate) fn load(path: &std::path::Path, board: &ThresholdBoard) -> Result<Self, ControlError> {
        let bad = |problem: String| ControlError::Config { key: "calibration_file", problem };
        let mut c = match std::fs::read(path) {
            Ok(b) => {
                serde_json::from_slice::<Calibrations>(&b).map_err(|e| bad(format!("`{}`: {e}", path.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Calibrations::default(),
            Err(source) => return Err(ControlError::Calibrations { path: path.to_owned(), source }),
        };
        // replay applies and reverts in the order they happened: the live levels are what
        // they left (a revert may come long after later changes were applied and reverted)
        let mut steps: Vec<(i64, u64, bool, &CalibrationChange)> = Vec::new();
        for ch in &c.history {
            steps.push((ch.ts, ch.id, false, ch));
            if let Some((at, _)) = &ch.reverted {
                steps.push((*at, ch.id, true, ch));
            }
        }
        steps.sort_by_key(|(ts, id, revert, _)| (*ts, *revert, *id));
        for (_, _, revert, ch) in steps {
            if revert {
                undo(board, ch);
            } else {
                for l in &ch.changes {
                    board.set(&l.rule, &l.location, Some(l.new));
                }
            }
        }
        c.file = Some(path.to_owned());
        Ok(c)
    }

    /// Writes the history (write, fsync, rename, fsync of the directory): blocking.
    pub(crate) fn save(&self) -> Result<(), ControlError> {
        let Some(path) = &self.file else { return Ok(()) };
        let body = serde_json::to_vec_pretty(self).expect("calibrations serialize");
        crate::atomic_file::write_atomic(path, &body)
            .map_err(|source| ControlError::Calibrations { path: path.clone(), source })
    }

    /// The change applying `proposals` would make, as change `id + 1` of the history.
    pub(crate) fn plan_apply(
        &self,
        board: &ThresholdBoard,
        operator: &str,
        target_precision: f64,
        proposals: Vec<(String, String, Proposal)>,
    ) -> CalibrationChange {
        let changes = proposals
            .into_iter()
            .map(|(rule, location, p)| LevelChange {
                had_live: board.get(&rule, &location).is_some(),
                rule,
                location,
                old: p.old,
                new: p.new,
                precision: p.precision,
                judged: p.judged,
            })
            .collect();
        CalibrationChange {
            id: self.history.last().map_or(1, |c| c.id + 1),
            ts: citystream_operators::common::wall_clock_ms(),
            operator: operator.to_owned(),
            target_precision,
            changes,
            reverted: None,
        }
    }

    /// The history with change `n` reverted by `operator`, or why not (a status and a text).
    pub(crate) fn plan_revert(&self, n: u64, operator: &str) -> Result<(usize, CalibrationChange), (u16, String)> {
        let Some(i) = self.history.iter().position(|c| c.id == n) else {
            return Err((404, format!("no calibration change {n}")));
        };
        if self.history[i].reverted.is_some() {
            return Err((409, format!("calibration change {n} is already reverted")));
        }
        // a later change of the same level would be undone silently: refuse, revert that first
        let later = self.history[i + 1..].iter().filter(|c| c.reverted.is_none()).find(|c| {
            c.changes
                .iter()
                .any(|l| self.history[i].changes.iter().any(|m| m.rule == l.rule && m.location == l.location))
        });
        if let Some(c) = later {
            return Err((409, format!("change {} moved the same levels later: revert it first", c.id)));
        }
        let mut change = self.history[i].clone();
        change.reverted = Some((citystream_operators::common::wall_clock_ms(), operator.to_owned()));
        Ok((i, change))
    }
}

/// Puts back the levels `change` replaced (in reverse order, so nested changes unwind).
pub(crate) fn undo(board: &ThresholdBoard, change: &CalibrationChange) {
    for l in change.changes.iter().rev() {
        board.set(&l.rule, &l.location, l.had_live.then_some(l.old));
    }
}

/// What a proposal is asked for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CalibrationQuery {
    pub(crate) target_precision: f64,
    pub(crate) max_step: Option<f64>,
    pub(crate) min_judged: Option<usize>,
}

impl CalibrationQuery {
    pub(crate) fn spec(&self) -> Result<CalibrationSpec, &'static str> {
        if !(0.0..=1.0).contains(&self.target_precision) || self.max_step.is_some_and(|s| !(0.0..=0.5).contains(&s)) {
            return Err("target_precision is in 0..1 and max_step in 0..0.5");
        }
        Ok(CalibrationSpec {
            target_precision: self.target_precision,
            max_step: self.max_step.unwrap_or(0.05),
            min_judged: self.min_judged.unwrap_or(5),
            slack: 0.1,
        })
    }
}

type Group = (i64, f64, i32, Vec<Judged>);

/// Per rule and location, the proposal from the judged alerts; the current level is the live
/// one when calibration set it, else the threshold of the latest alert.
pub(crate) fn proposals(
    book: &Book,
    calibrations: &Calibrations,
    board: &ThresholdBoard,
    spec: &CalibrationSpec,
) -> Vec<(String, String, Proposal)> {
    // (rule, location) -> (time of the latest alert, its threshold, below-rule votes, judged alerts)
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    let mut newest_verdict: BTreeMap<(String, String), i64> = BTreeMap::new();
    for a in book.alerts.values().filter(|a| a.location != "*") {
        let Some(last) = a.decisions.last() else { continue };
        let true_alarm = last.decision != "false_alarm";
        // a rejected alert judges every location that joined it (`join`) too, each by its own
        // peak and level; a confirmed one only the location it opened at: the verdict does not
        // say which location the incident was on, and a queue's locations are no incident
        let members = a.joined.iter().filter(|_| !true_alarm).map(|(l, m)| (l, Some(m.peak), m.threshold));
        for (location, value, threshold) in
            std::iter::once((&a.location, a.peak.or(a.value), a.threshold)).chain(members)
        {
            let v = newest_verdict.entry((a.rule.clone(), location.clone())).or_insert(i64::MIN);
            *v = (*v).max(last.ts);
            let Some(v) = value else { continue };
            let g = groups.entry((a.rule.clone(), location.clone())).or_insert((i64::MIN, threshold, 0, Vec::new()));
            if a.updated_at > g.0 {
                (g.0, g.1) = (a.updated_at, threshold);
            }
            g.2 += if v < threshold { 1 } else { -1 };
            g.3.push(Judged { value: v, true_alarm });
        }
    }
    // a level an applied change moved is proposed again only after new verdicts: without them
    // the same evidence would move it another step at every apply
    let mut moved: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for ch in calibrations.history.iter().filter(|c| c.reverted.is_none()) {
        for l in &ch.changes {
            let m = moved.entry((l.rule.as_str(), l.location.as_str())).or_insert(i64::MIN);
            *m = (*m).max(ch.ts);
        }
    }
    groups
        .into_iter()
        .filter(|((rule, loc), _)| {
            moved.get(&(rule.as_str(), loc.as_str())).is_none_or(|m| newest_verdict[&(rule.clone(), loc.clone())] > *m)
        })
        .filter_map(|((rule, loc), (_, latest, below, judged))| {
            // a live level that a probability's rule leaves out (at 1 or above: an older
            // calibration file) is not the one in use: the alerts' own level is
            let usable = |l: &f64| !weighable_level(latest) || weighable_level(*l);
            let current = board.get(&rule, &loc).filter(usable).unwrap_or(latest);
            calibrate(current, below > 0, &judged, spec).map(|p| (rule, loc, p))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::RecordBatch;

    /// An alert `id` of rule `r` that opened at `at` (peak 0.9, level 0.5) and that `member`
    /// joined with its own peak `member_peak` and level `member_level`.
    fn joined_alert(id: &str, at: &str, member: &str, member_peak: f64, member_level: f64) -> RecordBatch {
        use super::super::book::tests::{JoinedEvent, joined_events};
        let ev = |location, peak, level, members| JoinedEvent { location, value: peak, peak, level, members };
        joined_events(id, at, 60_000, &[ev(at, 0.9, 0.5, &[at]), ev(member, member_peak, member_level, &[at, member])])
    }

    /// With `join`, a rejected alert is a false alarm of every location in it, each judged by
    /// its own peak against its own level; a confirmed one judges only where it opened.
    #[test]
    fn a_rejected_joined_alert_judges_its_members_and_a_confirmed_one_only_where_it_opened() {
        let mut book = Book::new(86_400_000, 100);
        for (id, at, member_peak, verdict) in
            [("a1", "x", 0.6, "false_alarm"), ("a2", "x", 0.62, "false_alarm"), ("a3", "y", 0.95, "resolved")]
        {
            book.apply(&joined_alert(id, at, "m", member_peak, 0.55)).unwrap();
            let decision = super::super::decisions::decision_event(120_000, &book.alerts[id], verdict, "op", "", id);
            book.apply_log(&decision).unwrap();
            assert_eq!(book.alerts[id].state, verdict);
        }
        let a1 = &book.alerts["a1"];
        assert_eq!((a1.peak, a1.joined["m"].peak, a1.joined["m"].threshold), (Some(0.9), 0.6, 0.55));
        let spec = CalibrationSpec { target_precision: 0.8, max_step: 0.05, min_judged: 2, slack: 0.1 };
        let props = proposals(&book, &Calibrations::default(), &ThresholdBoard::default(), &spec);
        let of = |loc: &str| props.iter().find(|(r, l, _)| r == "r" && l == loc).map(|(_, _, p)| p);
        // m: two rejections it joined (not a3's confirmation), from its own level 0.55 up a step
        let m = of("m").expect("a proposal for the member");
        assert_eq!((m.judged, m.precision, m.old), (2, 0.0, 0.55), "{props:?}");
        assert!((m.new - 0.55 * 1.05).abs() < 1e-12, "{m:?}");
        // x: its two rejected alerts, by their own peak; y: one verdict, too few
        assert_eq!(of("x").map(|p| (p.judged, p.old)), Some((2, 0.5)));
        assert!(of("y").is_none(), "{props:?}");
        // a live level a probability's rule leaves out (1.05, from an older file) is not the
        // current one; one it takes (0.52) is
        let board = ThresholdBoard::default();
        for (level, current) in [(1.05, 0.5), (0.52, 0.52)] {
            board.set("r", "x", Some(level));
            let props = proposals(&book, &Calibrations::default(), &board, &spec);
            let x = props.iter().find(|(_, l, _)| l == "x").map(|(_, _, p)| p.old);
            assert_eq!(x, Some(current), "{props:?}");
        }
    }

    #[test]
    fn calibration_history_replays_applies_and_reverts_in_the_order_they_happened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibration.json");
        let level = |old: f64, new: f64, had_live: bool| LevelChange {
            rule: "r".into(),
            location: "a".into(),
            old,
            new,
            precision: 0.5,
            judged: 5,
            had_live,
        };
        let change = |id: u64, ts: i64, l: LevelChange, reverted: Option<i64>| CalibrationChange {
            id,
            ts,
            operator: "op".into(),
            target_precision: 0.8,
            changes: vec![l],
            reverted: reverted.map(|t| (t, "op".to_owned())),
        };
        // 1 sets 0.93 (no live level before), 2 moves it to 0.96; 2 is reverted, then 1
        let mut c = Calibrations {
            history: vec![
                change(1, 10, level(0.90, 0.93, false), Some(40)),
                change(2, 20, level(0.93, 0.96, true), Some(30)),
            ],
            file: Some(path.clone()),
        };
        c.save().unwrap();
        let board = ThresholdBoard::default();
        Calibrations::load(&path, &board).unwrap();
        assert_eq!(board.get("r", "a"), None, "both reverted: the configured level applies");
        // only 2 reverted: 1's level stands
        c.history[0].reverted = None;
        c.save().unwrap();
        let board = ThresholdBoard::default();
        Calibrations::load(&path, &board).unwrap();
        assert_eq!(board.get("r", "a"), Some(0.93));
    }
}
