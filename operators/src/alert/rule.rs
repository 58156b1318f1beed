//! The alert rule: per location idle → pending → open → resolved, with hysteresis, minimum
//! duration, suppression, cooldown, joining neighbours' alerts, storm limit, active hours and
//! staleness.

use crate::LiveChangeError;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int32Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, TimestampMillisecondType};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::common::as_f64;
use crate::{Collector, Counter, Gauge, Operator, OperatorError, OutputSpec};

use super::board::ThresholdBoard;
use super::config::{AlertConfig, Cols};
use super::state::{StateRows, alert_state_schema};
#[derive(Debug, Clone)]
pub(super) enum Phase {
    Idle,
    Pending {
        since: i64,
        peak: f64,
        /// With `open_after`: the times of its latest raising values (at most `raises`).
        raised: Vec<i64>,
        /// With `open_on_evidence`: the log-odds it has gathered over the raise level (at most
        /// the level that opens it).
        gathered: f64,
    },
    Open {
        id: String,
        opened_at: i64,
        peak: f64,
        /// the peak the last event reported
        reported: f64,
        last_emit: i64,
    },
    /// In the storm summary instead of an alert of its own.
    Storm {
        peak: f64,
    },
}

/// A row held until the watermark passes it (`storm.order: event_time`).
#[derive(Debug, Clone)]
pub(super) struct Held {
    t: i64,
    loc: String,
    v: Option<f64>,
    /// Whether `confirm.column` was true on it.
    confirm: bool,
    /// Its evidence as JSON, made when it is taken (or restored from a snapshot).
    evidence: Evidence,
}

#[derive(Debug, Clone)]
enum Evidence {
    Row(Arc<RecordBatch>, usize, f64),
    Json(String),
}

impl Evidence {
    fn json(&self, cols: &[usize], v: Option<f64>) -> String {
        match self {
            Evidence::Row(b, i, raise) => evidence_json(b, cols, *i, v, *raise),
            Evidence::Json(j) => j.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct LocState {
    pub(super) phase: Phase,
    pub(super) quiet_until: i64,
    pub(super) last_t: i64,
}

#[derive(Debug)]
pub(super) struct StormAlert {
    pub(super) id: String,
    pub(super) opened_at: i64,
    pub(super) members: BTreeSet<String>,
    pub(super) last_emit: i64,
    pub(super) reported: usize,
}

/// An alert of a rule with `join`: where it opened and the locations in it now.
#[derive(Debug)]
pub(super) struct JoinedAlert {
    /// The location it opened at: every event of the alert carries it (a topic keyed by
    /// location keeps the alert's events in order).
    pub(super) location: String,
    pub(super) opened_at: i64,
    pub(super) members: BTreeSet<String>,
}

#[derive(Default)]
pub(super) struct Events {
    pub(super) ts: Vec<i64>,
    pub(super) id: Vec<String>,
    pub(super) location: Vec<String>,
    pub(super) status: Vec<&'static str>,
    pub(super) opened_at: Vec<i64>,
    pub(super) value: Vec<Option<f64>>,
    pub(super) threshold: Vec<f64>,
    pub(super) peak: Vec<Option<f64>>,
    pub(super) locations: Vec<i32>,
    pub(super) evidence: Vec<String>,
}

/// The `alert` operator.
pub struct AlertRule {
    pub(super) cfg: AlertConfig,
    pub(super) cols: Cols,
    pub(super) outputs: Vec<OutputSpec>,
    pub(super) states: HashMap<String, LocState>,
    pub(super) open: usize,
    pub(super) storm: Option<StormAlert>,
    /// With `storm.order: event_time`, rows the watermark has not passed yet.
    pub(super) held: Vec<Held>,
    /// With `join`: per location, those within its reach on the road graph.
    pub(super) near: HashMap<String, Vec<String>>,
    /// With `join`: the open alerts by id.
    pub(super) alerts: HashMap<String, JoinedAlert>,
    /// At most the last row's time of every location not idle (`i64::MAX`: none).
    pub(super) stale_floor: i64,
    pub(super) out: Events,
    pub(super) opened: Counter,
    pub(super) updated: Counter,
    pub(super) resolved: Counter,
    pub(super) open_gauge: Gauge,
    pub(super) board: ThresholdBoard,
    pub(super) board_version: u64,
    /// This rule's live levels from the board, copied when its version moves.
    pub(super) live: BTreeMap<String, f64>,
    /// With `confirm`: per location, the latest time its value reached `confirm.after` and that
    /// value (those older than `confirm.within` behind the watermark are forgotten).
    pub(super) reached: HashMap<String, (i64, f64)>,
}

impl std::fmt::Debug for AlertRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertRule").field("rule", &self.cfg.rule).field("open", &self.open).finish_non_exhaustive()
    }
}

/// The log-odds of probability `p`, held within [1e-7, 1 - 1e-7] (a score of exactly 0 or 1
/// counts as that sure, not infinitely).
fn log_odds(p: f64) -> f64 {
    let p = p.clamp(LOG_ODDS_EDGE, 1.0 - LOG_ODDS_EDGE);
    (p / (1.0 - p)).ln()
}

/// How near 0 or 1 [`log_odds`] takes a probability.
const LOG_ODDS_EDGE: f64 = 1e-7;

/// Whether a rule that weighs probabilities (`open_on_evidence`) can use `level` as a raise
/// level: within the probabilities [`log_odds`] tells apart (beyond, a level weighs nothing
/// and silences its location).
pub fn weighable_level(level: f64) -> bool {
    level > LOG_ODDS_EDGE && level < 1.0 - LOG_ODDS_EDGE
}

/// Whether hour-of-day `h` (UTC) lies in `[from, to)`, wrapping midnight.
pub(super) fn in_hours(h: u8, [from, to]: [u8; 2]) -> bool {
    if from <= to { h >= from && h < to } else { h >= from || h < to }
}

impl AlertRule {
    /// The raise level at `location`: live (calibrated) level, else configured.
    fn raise_at(&self, location: &str) -> f64 {
        self.live.get(location).copied().unwrap_or_else(|| self.cfg.configured_raise(location))
    }

    /// Copies this rule's live levels when the board changed. A rule that weighs probabilities
    /// (`open_on_evidence`) takes no live level outside (0, 1), which would silence the
    /// location (a calibration file from before calibration held them below 1): the configured
    /// level stays there, and a warning says so.
    fn refresh_levels(&mut self) {
        let v = self.board.version();
        if v != self.board_version {
            self.board_version = v;
            self.live = self.board.rule(&self.cfg.rule);
            if self.cfg.open_on_evidence.is_some() {
                self.live.retain(|location, level| {
                    let usable = weighable_level(*level);
                    if !usable {
                        tracing::warn!(
                            rule = %self.cfg.rule, %location, level = *level,
                            "a live raise level outside (0, 1) is no probability's: the configured level stays"
                        );
                    }
                    usable
                });
            }
        }
    }

    /// `v` at or beyond `level` in the rule's direction.
    fn beyond(&self, v: f64, level: f64) -> bool {
        if self.cfg.below { v <= level } else { v >= level }
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        ts: i64,
        id: &str,
        location: &str,
        status: &'static str,
        opened_at: i64,
        value: Option<f64>,
        threshold: f64,
        peak: Option<f64>,
        locations: i32,
        evidence: String,
    ) {
        match status {
            "open" => self.opened.inc(),
            "update" => self.updated.inc(),
            _ => self.resolved.inc(),
        }
        let e = &mut self.out;
        e.ts.push(ts);
        e.id.push(id.to_owned());
        e.location.push(location.to_owned());
        e.status.push(status);
        e.opened_at.push(opened_at);
        e.value.push(value);
        e.threshold.push(threshold);
        e.peak.push(peak);
        e.locations.push(locations);
        e.evidence.push(evidence);
    }

    fn storm_evidence(&self, s: &StormAlert) -> String {
        serde_json::json!({"storm": true, "members": s.members.iter().collect::<Vec<_>>()}).to_string()
    }

    fn storm_join(&mut self, location: &str, t: i64) {
        let rule = self.cfg.rule.clone();
        let s = self.storm.get_or_insert_with(|| StormAlert {
            id: format!("{rule}:*:{t}"),
            opened_at: t,
            members: BTreeSet::new(),
            last_emit: i64::MIN,
            reported: 0,
        });
        s.members.insert(location.to_owned());
        let (first, due) = (s.reported == 0, t.saturating_sub(s.last_emit) >= self.cfg.update_every.as_millis_i64());
        if first || due {
            let s = self.storm.as_mut().expect("just inserted");
            s.last_emit = t;
            s.reported = s.members.len();
            let (id, opened_at, n) = (s.id.clone(), s.opened_at, s.members.len() as i32);
            let ev = self.storm_evidence(self.storm.as_ref().expect("present"));
            self.emit(t, &id, "*", if first { "open" } else { "update" }, opened_at, None, self.cfg.raise, None, n, ev);
        }
    }

    fn storm_leave(&mut self, location: &str, t: i64) {
        let Some(s) = self.storm.as_mut() else { return };
        s.members.remove(location);
        if s.members.is_empty() {
            let s = self.storm.take().expect("present");
            let ev = serde_json::json!({"storm": true, "members": []}).to_string();
            self.emit(t, &s.id, "*", "resolved", s.opened_at, None, self.cfg.raise, None, 0, ev);
        }
    }

    /// Resolves `loc`, silent for `stale_after`, at the moment it went stale (its last row
    /// plus `stale_after`): an event time that does not depend on when the watermark moved or
    /// whether a newer row arrived first.
    fn resolve_stale(&mut self, loc: &str) {
        let stale = self.cfg.stale_after.as_millis_i64();
        let cooldown = self.cfg.cooldown.as_millis_i64();
        let Some(st) = self.states.get_mut(loc) else { return };
        let (phase, last_t) = (std::mem::replace(&mut st.phase, Phase::Idle), st.last_t);
        let at = last_t.saturating_add(stale);
        if matches!(phase, Phase::Open { .. } | Phase::Storm { .. }) {
            // a stale resolve is a resolve: the cooldown applies
            st.quiet_until = at.saturating_add(cooldown);
        }
        let ev = serde_json::json!({"stale": true, "last_seen": last_t}).to_string();
        match phase {
            Phase::Open { id, opened_at, peak, .. } => {
                let raise = self.raise_at(loc);
                self.leave(&id, loc, at, opened_at, None, raise, Some(peak), ev);
            }
            Phase::Storm { .. } => self.storm_leave(loc, at),
            _ => {}
        }
    }

    /// Holds every pending alert's evidence at or below `open_on_evidence`, as each row does
    /// (after a restore or a live change of the level).
    fn cap_evidence(&mut self) {
        let Some(h) = self.cfg.open_on_evidence else { return };
        for st in self.states.values_mut() {
            if let Phase::Pending { gathered, .. } = &mut st.phase {
                *gathered = gathered.min(h);
            }
        }
    }

    /// Resolves the locations silent for `stale_after` before `t` (their last row plus
    /// `stale_after` is before it), in the order they went stale. Called before each row taken
    /// in event-time order and at each watermark, so that a location goes stale between the
    /// same two rows whenever watermarks come: which alert a neighbour joins, when a joined
    /// alert or the storm summary loses a location, and how many alerts count towards the
    /// storm limit do not depend on it. `stale_floor` (a lower bound of the active locations'
    /// last rows) skips the scan while none can be stale.
    fn resolve_stale_before(&mut self, t: i64) {
        let stale = self.cfg.stale_after.as_millis_i64();
        if t.saturating_sub(self.stale_floor) <= stale {
            return;
        }
        let mut gone: Vec<(i64, String)> = self
            .states
            .iter()
            .filter(|(_, s)| t.saturating_sub(s.last_t) > stale && !matches!(s.phase, Phase::Idle))
            .map(|(k, s)| (s.last_t, k.clone()))
            .collect();
        gone.sort_unstable();
        for (_, loc) in gone {
            self.resolve_stale(&loc);
        }
        self.stale_floor = self
            .states
            .values()
            .filter(|s| !matches!(s.phase, Phase::Idle))
            .map(|s| s.last_t)
            .min()
            .unwrap_or(i64::MAX);
    }

    /// With `join`: the alert `loc` joins, of those open at a location within its reach the
    /// earliest opened (then the least id).
    fn join_target(&self, loc: &str) -> Option<(String, i64)> {
        let near = self.near.get(loc)?;
        near.iter()
            .filter_map(|n| match &self.states.get(n)?.phase {
                Phase::Open { id, opened_at, .. } if self.alerts.contains_key(id) => Some((*opened_at, id)),
                _ => None,
            })
            .min()
            .map(|(at, id)| (id.clone(), at))
    }

    /// The location events of alert `id` carry and how many locations it has (without
    /// `join`: `loc`'s own alert).
    fn alert_of(&self, id: &str, loc: &str) -> (String, i32) {
        match self.alerts.get(id) {
            Some(a) => (a.location.clone(), a.members.len() as i32),
            None => (loc.to_owned(), 1),
        }
    }

    /// With `join`, `evidence` (a JSON object) with the location whose row made the event and
    /// the alert's locations after it; without, `evidence` itself.
    fn with_members(&self, id: &str, loc: &str, evidence: String) -> String {
        if self.cfg.join.is_none() {
            return evidence;
        }
        let members: Vec<&String> = self.alerts.get(id).map(|a| a.members.iter().collect()).unwrap_or_default();
        with_keys(evidence, [("location", loc.into()), ("members", serde_json::json!(members))])
    }

    /// `loc` leaves alert `id` at `t` (its value cleared, or it went stale): the alert resolves
    /// with its last location, else it is updated with the locations it has left.
    #[allow(clippy::too_many_arguments)]
    fn leave(
        &mut self,
        id: &str,
        loc: &str,
        t: i64,
        opened_at: i64,
        value: Option<f64>,
        raise: f64,
        peak: Option<f64>,
        evidence: String,
    ) {
        if let Some(a) = self.alerts.get_mut(id) {
            a.members.remove(loc);
        }
        let (at, left) = self.alert_of(id, loc);
        let evidence = self.with_members(id, loc, evidence);
        if self.alerts.get(id).is_none_or(|a| a.members.is_empty()) {
            self.alerts.remove(id);
            self.open -= 1;
            self.emit(t, id, &at, "resolved", opened_at, value, raise, peak, 1, evidence);
        } else {
            self.emit(t, id, &at, "update", opened_at, value, raise, peak, left, evidence);
        }
    }

    /// Takes the held rows at or before `watermark`, by event time, then location (rows of one
    /// location and time keep their arrival order).
    fn take_held(&mut self, watermark: i64) {
        if self.held.is_empty() {
            return;
        }
        let (mut ready, rest): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| h.t <= watermark);
        self.held = rest;
        ready.sort_by(|a, b| (a.t, &a.loc).cmp(&(b.t, &b.loc)));
        let cols = self.cols.evidence.clone();
        for h in ready {
            self.resolve_stale_before(h.t);
            self.step(&h.loc, h.t, h.v, h.confirm, || h.evidence.json(&cols, h.v));
        }
    }

    /// With `confirm`: notes that `loc` reached `confirm.after` at `t` if value `v` does, then
    /// whether row (`loc`, `t`) is confirmed: `alarm` (its `confirm.column`) and the value
    /// reached the level less than `confirm.within` before it, or on it. The value it reached.
    fn confirmed(&mut self, loc: &str, t: i64, v: f64, alarm: bool) -> Option<f64> {
        let c = self.cfg.confirm.as_ref()?;
        let within = c.within.as_millis_i64();
        if v >= c.after {
            match self.reached.get_mut(loc) {
                Some(r) if r.0 > t => {}
                Some(r) => *r = (t, v),
                None => {
                    self.reached.insert(loc.to_owned(), (t, v));
                }
            }
        }
        let &(r, reached) = self.reached.get(loc)?;
        (alarm && r <= t && t - r < within).then_some(reached)
    }

    /// One row: value `v` (None: no reading) at `t` for `loc`; `alarm`: its `confirm.column`.
    fn step(&mut self, loc: &str, t: i64, v: Option<f64>, alarm: bool, evidence: impl Fn() -> String) {
        let raise = self.raise_at(loc);
        // a location's own (calibrated) raise level may sit beyond the shared clear level
        let clear = self.cfg.clear.unwrap_or(raise);
        let clear = if self.cfg.below { clear.max(raise) } else { clear.min(raise) };
        let hours_ok =
            self.cfg.active_hours.is_none_or(|h| in_hours(((t.div_euclid(3_600_000)).rem_euclid(24)) as u8, h));
        let Some(v) = v.filter(|v| !v.is_nan()) else { return };
        // a confirmed row weighs as a sure value; its events still carry its own value, and the
        // peak is at least the value it was confirmed by and the raise level, which it raised
        // against (calibration judges an alert by its peak: a row's own low score, or a reach
        // below a level calibrated past `confirm.after`, would look like a `below` rule's)
        // (outside the active hours a row counts as clear, confirmed or not)
        let by = self.confirmed(loc, t, v, alarm).filter(|_| hours_ok);
        let weighed = if by.is_some() { 1.0 } else { v };
        let peak_v = by.map_or(v, |r| r.max(v).max(raise));
        let confirmed_by = by.and(self.cfg.confirm.as_ref()).map(|c| c.column.clone());
        let evidence = move || match &confirmed_by {
            Some(column) => with_keys(evidence(), [("confirmed_by", column.as_str().into())]),
            None => evidence(),
        };
        // a row after a silence longer than `stale_after`: the location went stale first
        if self.states.get(loc).is_some_and(|s| {
            t.saturating_sub(s.last_t) > self.cfg.stale_after.as_millis_i64() && !matches!(s.phase, Phase::Idle)
        }) {
            self.resolve_stale(loc);
        }
        let holds = hours_ok && self.beyond(weighed, clear);
        let raises = hours_ok && self.beyond(weighed, raise);
        let better = |a: f64, b: f64| if self.cfg.below { a.min(b) } else { a.max(b) };
        let mut st =
            self.states.remove(loc).unwrap_or(LocState { phase: Phase::Idle, quiet_until: i64::MIN, last_t: t });
        st.last_t = st.last_t.max(t);
        // a value that raises starts a pending alert, which may open on this very row
        let phase = match st.phase {
            Phase::Idle if raises => Phase::Pending { since: t, peak: peak_v, raised: Vec::new(), gathered: 0.0 },
            p => p,
        };
        let (open_after, on_evidence) = (self.cfg.open_after, self.cfg.open_on_evidence);
        // the tests that count raises or gather evidence keep a pending alert through a dip
        let keeps_pending = open_after.is_some() || on_evidence.is_some();
        st.phase = match phase {
            Phase::Idle => Phase::Idle,
            Phase::Pending { .. } if !holds && !keeps_pending => Phase::Idle,
            Phase::Pending { mut since, peak, mut raised, mut gathered } => {
                let mut peak = better(peak, peak_v);
                // only a level strictly beyond this location's own raise level (calibration may
                // have moved it up to or past `open_at_once`): there every raising value would
                // be "sure", and `min_duration` would never apply
                let sure =
                    self.cfg.open_at_once.is_some_and(|l| l != raise && self.beyond(l, raise) && self.beyond(v, l));
                let persisted = match (open_after, on_evidence) {
                    (_, Some(enough)) => {
                        if hours_ok {
                            // the step first, as train.py's alert_rule adds it (the same sums);
                            // never past `enough`: evidence gathered while the alert may not
                            // open (the cooldown) does not open it later on a weaker value
                            gathered = (gathered + (log_odds(weighed) - log_odds(raise))).max(0.0).min(enough);
                        }
                        gathered >= enough
                    }
                    (None, None) => t - since >= self.cfg.min_duration.as_millis_i64(),
                    (Some(p), None) => {
                        let from = t.saturating_sub(p.within.as_millis_i64());
                        raised.retain(|&r| r > from);
                        if raised.is_empty() && raises {
                            // the earlier raises lapsed: this value starts the pending alert afresh
                            (since, peak) = (t, v);
                        }
                        if raises {
                            // in time order, whatever the arrival order
                            let at = raised.partition_point(|&r| r <= t);
                            raised.insert(at, t);
                        }
                        // raises in (t - within, t]: a later row's raise does not count for a late row
                        let counted = raised.iter().filter(|&&r| r <= t).count();
                        // then the oldest beyond `raises` can no longer decide anything for rows in order
                        let extra = raised.len().saturating_sub(p.raises);
                        raised.drain(..extra);
                        counted >= p.raises
                    }
                };
                if (open_after.is_some() && raised.is_empty()) || (on_evidence.is_some() && gathered <= 0.0) {
                    // its latest raising value is `within` old, or its evidence is spent: it lapsed
                    Phase::Idle
                } else if holds && (sure || persisted) && t >= st.quiet_until {
                    // (with `open_after` a pending alert outlives values below clear and rows
                    // outside the active hours: such a row never opens it)
                    if let Some((id, opened_at)) = self.join_target(loc) {
                        // an alert open within reach: this location joins it
                        if let Some(a) = self.alerts.get_mut(&id) {
                            a.members.insert(loc.to_owned());
                        }
                        let (at, n) = self.alert_of(&id, loc);
                        let ev = self.with_members(&id, loc, evidence());
                        self.emit(t, &id, &at, "update", opened_at, Some(v), raise, Some(peak), n, ev);
                        Phase::Open { id, opened_at, peak, reported: peak, last_emit: t }
                    } else if self.cfg.storm.as_ref().is_some_and(|s| self.open >= s.max_open) {
                        self.storm_join(loc, t);
                        Phase::Storm { peak }
                    } else {
                        let id = format!("{}:{loc}:{t}", self.cfg.rule);
                        self.open += 1;
                        if self.cfg.join.is_some() {
                            let members = BTreeSet::from([loc.to_owned()]);
                            self.alerts
                                .insert(id.clone(), JoinedAlert { location: loc.to_owned(), opened_at: t, members });
                        }
                        let ev = self.with_members(&id, loc, evidence());
                        self.emit(t, &id, loc, "open", t, Some(v), raise, Some(peak), 1, ev);
                        Phase::Open { id, opened_at: t, peak, reported: peak, last_emit: t }
                    }
                } else {
                    Phase::Pending { since, peak, raised, gathered }
                }
            }
            Phase::Open { id, opened_at, peak, .. } if !holds => {
                st.quiet_until = t + self.cfg.cooldown.as_millis_i64();
                self.leave(&id, loc, t, opened_at, Some(v), raise, Some(peak), evidence());
                Phase::Idle
            }
            Phase::Open { id, opened_at, peak, reported, last_emit } => {
                // a peak reached within `update_every` of the last event is reported once the
                // throttle allows, even if the value has come down since
                let peak = better(peak, peak_v);
                if peak != reported && t - last_emit >= self.cfg.update_every.as_millis_i64() {
                    let (at, n) = self.alert_of(&id, loc);
                    let ev = self.with_members(&id, loc, evidence());
                    self.emit(t, &id, &at, "update", opened_at, Some(v), raise, Some(peak), n, ev);
                    Phase::Open { id, opened_at, peak, reported: peak, last_emit: t }
                } else {
                    Phase::Open { id, opened_at, peak, reported, last_emit }
                }
            }
            Phase::Storm { .. } if !holds => {
                st.quiet_until = t + self.cfg.cooldown.as_millis_i64();
                self.storm_leave(loc, t);
                Phase::Idle
            }
            Phase::Storm { peak } => Phase::Storm { peak: better(peak, peak_v) },
        };
        if !matches!(st.phase, Phase::Idle) {
            self.stale_floor = self.stale_floor.min(st.last_t);
        }
        self.states.insert(loc.to_owned(), st);
    }

    fn finish(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.open_gauge.set((self.open + usize::from(self.storm.is_some())) as f64);
        if self.out.ts.is_empty() {
            return Ok(());
        }
        let e = std::mem::take(&mut self.out);
        let n = e.ts.len();
        let now = crate::common::wall_clock_ms();
        let ts = |v: Vec<i64>| -> ArrayRef { Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC")) };
        let repeat = |s: &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(std::iter::repeat_n(s, n))) };
        let cols: Vec<ArrayRef> = vec![
            ts(e.ts),
            Arc::new(StringArray::from(e.id)),
            repeat(&self.cfg.rule),
            repeat(&self.cfg.alert_type),
            repeat(self.cfg.severity.name()),
            Arc::new(StringArray::from(e.location)),
            Arc::new(StringArray::from(e.status)),
            ts(e.opened_at),
            Arc::new(Float64Array::from(e.value)),
            Arc::new(Float64Array::from(e.threshold)),
            Arc::new(Float64Array::from(e.peak)),
            Arc::new(Int32Array::from(e.locations)),
            Arc::new(StringArray::from(e.evidence)),
            ts(vec![now; n]),
            repeat("rule"),
        ];
        out.emit(0, RecordBatch::try_new(self.outputs[0].schema.clone(), cols)?);
        Ok(())
    }
}

/// Evidence `json` (an object; anything else counts as an empty one) with `keys` set.
fn with_keys<'a>(json: String, keys: impl IntoIterator<Item = (&'a str, serde_json::Value)>) -> String {
    let mut m = match serde_json::from_str::<serde_json::Value>(&json) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    m.extend(keys.into_iter().map(|(k, v)| (k.to_owned(), v)));
    serde_json::Value::Object(m).to_string()
}

/// JSON of the evidence columns of row `i` (values as displayed by Arrow), plus the value.
pub(super) fn evidence_json(batch: &RecordBatch, cols: &[usize], i: usize, value: Option<f64>, raise: f64) -> String {
    let mut m = serde_json::Map::new();
    m.insert("value".into(), value.map_or(serde_json::Value::Null, serde_json::Value::from));
    m.insert("threshold".into(), raise.into());
    let opts = FormatOptions::default();
    for &c in cols {
        let name = batch.schema().field(c).name().clone();
        let v = match ArrayFormatter::try_new(batch.column(c).as_ref(), &opts) {
            Ok(f) if batch.column(c).is_valid(i) => serde_json::Value::from(f.value(i).to_string()),
            _ => serde_json::Value::Null,
        };
        m.insert(name, v);
    }
    serde_json::Value::Object(m).to_string()
}

impl Operator for AlertRule {
    fn kind(&self) -> &'static str {
        "alert"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        self.refresh_levels();
        let col = batch.column(self.cols.value);
        let (values, nulls) = if col.data_type() == &DataType::Boolean {
            let b = col.as_boolean();
            ((0..b.len()).map(|i| if b.value(i) { 1.0 } else { 0.0 }).collect(), b.nulls().cloned())
        } else {
            as_f64(col)?
        };
        let locs = batch.column(self.cols.location).as_string::<i32>();
        let times = batch.column(self.cols.time).as_primitive::<TimestampMillisecondType>();
        let ev_cols = self.cols.evidence.clone();
        let alarms = self.cols.confirm.map(|c| batch.column(c).as_boolean().clone());
        let hold = self.cfg.in_event_time_order();
        if !hold && !self.held.is_empty() {
            // rows a snapshot held (of this rule when it took rows in event-time order): they
            // came before this batch
            self.take_held(i64::MAX);
        }
        let shared = hold.then(|| Arc::new(batch.clone()));
        for (i, &value) in values.iter().enumerate() {
            if locs.is_null(i) || times.is_null(i) {
                continue;
            }
            let v = nulls.as_ref().is_none_or(|n| n.is_valid(i)).then_some(value);
            let loc = locs.value(i);
            let raise = self.raise_at(loc);
            let confirm = alarms.as_ref().is_some_and(|a| a.is_valid(i) && a.value(i));
            if let Some(b) = &shared {
                let evidence = Evidence::Row(b.clone(), i, raise);
                self.held.push(Held { t: times.value(i), loc: loc.to_owned(), v, confirm, evidence });
            } else {
                self.step(loc, times.value(i), v, confirm, || evidence_json(&batch, &ev_cols, i, v, raise));
            }
        }
        self.finish(out)
    }

    fn on_end(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.take_held(i64::MAX);
        self.finish(out)
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        self.refresh_levels();
        self.take_held(watermark);
        // in the order they went stale: the storm summary's membership follows it
        self.resolve_stale_before(watermark);
        // forget idle locations whose cooldown is over: the map holds active locations only
        self.states.retain(|_, s| !matches!(s.phase, Phase::Idle) || s.quiet_until > watermark);
        // and levels reached too long ago to confirm a row after the watermark
        if let Some(c) = &self.cfg.confirm {
            let within = c.within.as_millis_i64();
            self.reached.retain(|_, r| watermark.saturating_sub(r.0) < within);
        }
        self.finish(out)
    }

    fn is_stateful(&self) -> bool {
        true
    }

    /// One row per location (phase `0` idle in cooldown, `1` pending (with `open_after`, its
    /// raising times in `id`; with `open_on_evidence`, its sum in `reported`), `2` open, `3` in
    /// the storm summary), one per held row (`8`; `reported` 1 where `confirm.column` was
    /// true), with `join` one per open alert (`10`: where it opened), with `confirm` one per
    /// location that reached its level lately (`11`: the time in `last_t`, the score in
    /// `peak`) and, while a storm summary is open, one row without a location (`9`).
    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let mut r = StateRows::default();
        let mut locs: Vec<(&String, &LocState)> = self.states.iter().collect();
        locs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (loc, st) in locs {
            let (phase, id, since, peak, reported, last_emit) = match &st.phase {
                Phase::Idle => (0, None, None, None, None, None),
                // with `open_after`, its raising values' times as a JSON array in `id`; with
                // `open_on_evidence`, its evidence in `reported`
                Phase::Pending { since, peak, raised, gathered } => {
                    let raised = (!raised.is_empty()).then(|| serde_json::Value::from(raised.clone()).to_string());
                    let gathered = self.cfg.open_on_evidence.map(|_| *gathered);
                    (1, raised, Some(*since), Some(*peak), gathered, None)
                }
                Phase::Open { id, opened_at, peak, reported, last_emit } => {
                    (2, Some(id.clone()), Some(*opened_at), Some(*peak), Some(*reported), Some(*last_emit))
                }
                Phase::Storm { peak } => (3, None, None, Some(*peak), None, None),
            };
            r.push(Some(loc.clone()), phase, st.quiet_until, st.last_t, id, since, peak, reported, last_emit);
        }
        // held rows: phase 8, their time in `last_t`, value in `peak`, evidence in `id`
        let cols = &self.cols.evidence;
        for h in &self.held {
            let confirm = h.confirm.then_some(1.0);
            r.push(Some(h.loc.clone()), 8, 0, h.t, Some(h.evidence.json(cols, h.v)), None, h.v, confirm, None);
        }
        let mut reached: Vec<(&String, &(i64, f64))> = self.reached.iter().collect();
        reached.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (loc, &(t, v)) in reached {
            r.push(Some(loc.clone()), 11, 0, t, None, None, Some(v), None, None);
        }
        // with `join`, each open alert: where it opened (`location`), its id and opening time
        let mut alerts: Vec<(&String, &JoinedAlert)> = self.alerts.iter().collect();
        alerts.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (id, a) in alerts {
            r.push(Some(a.location.clone()), 10, 0, 0, Some(id.clone()), Some(a.opened_at), None, None, None);
        }
        if let Some(s) = &self.storm {
            r.push(
                None,
                9,
                0,
                0,
                Some(s.id.clone()),
                Some(s.opened_at),
                None,
                Some(s.reported as f64),
                Some(s.last_emit),
            );
        }
        Ok(Some(r.finish()?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let bad = |detail: String| OperatorError::State { operator: "alert", detail };
        crate::common::check_state_schema("alert", &state, &alert_state_schema())?;
        let loc = state.column(0).as_string::<i32>();
        let phase = state.column(1).as_primitive::<arrow::datatypes::UInt8Type>();
        let i64s = |c: usize| state.column(c).as_primitive::<arrow::datatypes::Int64Type>().clone();
        let f64s = |c: usize| state.column(c).as_primitive::<arrow::datatypes::Float64Type>().clone();
        let (quiet, last_t, since, last_emit) = (i64s(2), i64s(3), i64s(5), i64s(8));
        let (peak, reported) = (f64s(6), f64s(7));
        let id = state.column(4).as_string::<i32>();
        let opt_i = |a: &arrow::array::Int64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        let opt_f = |a: &Float64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        let missing = |what: &str, i: usize| bad(format!("row {i}: phase {} without {what}", phase.value(i)));
        // a string of row `i` that its phase needs
        let text = |a: &arrow::array::StringArray, i: usize, what: &str| {
            a.is_valid(i).then(|| a.value(i).to_owned()).ok_or_else(|| missing(what, i))
        };
        self.states.clear();
        self.storm = None;
        self.open = 0;
        self.held.clear();
        self.alerts.clear();
        self.reached.clear();
        // the restored locations are scanned at the next row or watermark
        self.stale_floor = i64::MIN;
        let mut members = BTreeSet::new();
        let mut opened_at_location = HashMap::new();
        for i in 0..state.num_rows() {
            let p = match phase.value(i) {
                0 => Phase::Idle,
                1 => {
                    let since = opt_i(&since, i).ok_or_else(|| missing("since", i))?;
                    let mut raised: Vec<i64> = match id.is_valid(i) {
                        true => serde_json::from_str(id.value(i))
                            .map_err(|e| bad(format!("row {i}: raising times {:?}: {e}", id.value(i))))?,
                        false => Vec::new(),
                    };
                    raised.sort_unstable();
                    // a snapshot of the rule with the other persistence test (a config changed
                    // across a restart): with `open_after` the raise that started the pending
                    // alert is its one raising time; with `min_duration` it holds from its
                    // latest raise (it may have outlived a dip before)
                    let since = match self.cfg.open_after {
                        Some(_) if raised.is_empty() => {
                            raised.push(since);
                            since
                        }
                        Some(_) => since,
                        None => std::mem::take(&mut raised).last().copied().unwrap_or(since),
                    };
                    // evidence: none in a snapshot of a rule without `open_on_evidence` (it starts
                    // from nothing: the next row below the raise level lapses it); capped below
                    let gathered = opt_f(&reported, i).filter(|e| e.is_finite()).unwrap_or(0.0).max(0.0);
                    let peak = opt_f(&peak, i).ok_or_else(|| missing("peak", i))?;
                    Phase::Pending { since, peak, raised, gathered }
                }
                2 => {
                    self.open += 1;
                    Phase::Open {
                        id: text(id, i, "id")?,
                        opened_at: opt_i(&since, i).ok_or_else(|| missing("opened_at", i))?,
                        peak: opt_f(&peak, i).ok_or_else(|| missing("peak", i))?,
                        reported: opt_f(&reported, i).ok_or_else(|| missing("reported", i))?,
                        last_emit: opt_i(&last_emit, i).ok_or_else(|| missing("last_emit", i))?,
                    }
                }
                3 => {
                    members.insert(loc.value(i).to_owned());
                    Phase::Storm { peak: opt_f(&peak, i).ok_or_else(|| missing("peak", i))? }
                }
                8 => {
                    self.held.push(Held {
                        t: last_t.value(i),
                        loc: text(loc, i, "location")?,
                        v: opt_f(&peak, i),
                        confirm: opt_f(&reported, i).is_some_and(|c| c > 0.0),
                        evidence: Evidence::Json(text(id, i, "evidence")?),
                    });
                    continue;
                }
                11 => {
                    let at = text(loc, i, "location")?;
                    // (a rule restored without `confirm` has no use for them)
                    if let Some(c) = &self.cfg.confirm {
                        self.reached.insert(at, (last_t.value(i), opt_f(&peak, i).unwrap_or(c.after)));
                    }
                    continue;
                }
                10 => {
                    let at = text(loc, i, "location")?;
                    opened_at_location.insert(text(id, i, "id")?, at);
                    continue;
                }
                9 => {
                    self.storm = Some(StormAlert {
                        id: text(id, i, "id")?,
                        opened_at: opt_i(&since, i).ok_or_else(|| missing("opened_at", i))?,
                        members: BTreeSet::new(),
                        last_emit: opt_i(&last_emit, i).ok_or_else(|| missing("last_emit", i))?,
                        reported: opt_f(&reported, i).ok_or_else(|| missing("reported", i))? as usize,
                    });
                    continue;
                }
                p => return Err(bad(format!("row {i}: unknown phase {p}"))),
            };
            if loc.is_null(i) {
                return Err(missing("location", i));
            }
            self.states.insert(
                loc.value(i).to_owned(),
                LocState { phase: p, quiet_until: quiet.value(i), last_t: last_t.value(i) },
            );
        }
        if self.cfg.join.is_some() || !opened_at_location.is_empty() {
            // the open alerts from their locations (a snapshot from before `join` was set has
            // one location per alert, where it opened; one of a rule with `join` restored without
            // it keeps its alerts whole until their last location leaves)
            let mut locs: Vec<(&String, &LocState)> = self.states.iter().collect();
            locs.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (loc, st) in locs {
                if let Phase::Open { id, opened_at, .. } = &st.phase {
                    let at = opened_at_location.get(id).unwrap_or(loc);
                    let a = self.alerts.entry(id.clone()).or_insert_with(|| JoinedAlert {
                        location: at.clone(),
                        opened_at: *opened_at,
                        members: BTreeSet::new(),
                    });
                    a.members.insert(loc.clone());
                }
            }
            self.open = self.alerts.len();
        }
        match (&mut self.storm, members.is_empty()) {
            (Some(s), _) => s.members = members,
            (None, false) => return Err(bad("locations in a storm summary, but no summary".into())),
            (None, true) => {}
        }
        // a snapshot of a higher level, or of a version that did not cap the sum, may hold more
        self.cap_evidence();
        self.open_gauge.set((self.open + usize::from(self.storm.is_some())) as f64);
        Ok(())
    }

    fn retune(&mut self, config: &dyn std::any::Any) -> Result<(), LiveChangeError> {
        let c = config.downcast_ref::<AlertConfig>().ok_or(LiveChangeError::WrongConfig("alert"))?;
        self.cfg.live_change(c)?;
        self.cfg = c.clone();
        // a lower level caps the evidence pending alerts hold
        self.cap_evidence();
        Ok(())
    }
}
