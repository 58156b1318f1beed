//! `alert`: an alert rule over a stream of values per location, emitting alert lifecycle events.
//!
//! Per location a rule moves through idle → pending → open → resolved:
//! - **hysteresis**: a value at or beyond `raise` (the location's own threshold from
//!   `thresholds` when there is one) starts a pending alert; it stays pending (and later open)
//!   while the value stays at or beyond `clear` (a pending alert with `open_after`: until its
//!   raises lapse; with `open_on_evidence`: until its evidence is spent); `below: true` flips
//!   the comparisons (a speed below a limit);
//! - **minimum duration**: a pending alert opens once it has lasted `min_duration` (event time),
//!   or at once on a value at or beyond `open_at_once` (a very sure value needs no persistence);
//!   with `open_after: {raises, within}` instead, once that many raising values fall within
//!   that window (a pending alert then outlives values below `clear` between them: a
//!   flickering score; it opens on a row at or beyond `clear` only); or, for a probability,
//!   with `open_on_evidence: h` instead, once the log-odds of its values over the raise level
//!   sum to `h` (Page's CUSUM: per row `ln(v / (1 - v)) - ln(r / (1 - r))`, the sum never
//!   below 0, where the pending alert lapses, nor above `h`; one very sure value opens at
//!   once, middling ones in a row open later; rows are taken in event-time order, which the
//!   rule needs); with `confirm` too, a row on which a second detector alarms (a boolean
//!   column) counts as a sure value while the location's value reached `confirm.after` within
//!   `confirm.within` (this row included);
//! - **suppression**: one open alert per location and rule; while open, a new peak is an
//!   `update` of the same alert (at most one per `update_every` and location), never a new
//!   alert;
//! - **cooldown**: after a location's alert resolves (or the location leaves a joined alert),
//!   it cannot open another for `cooldown`;
//! - **joining**: with `join: {road_graph, within}`, a location whose alert would open while
//!   one of the rule is open at most `within` segments up- or downstream joins that alert (an
//!   `update` with the alert's location and id, the count in `locations`, and `location` and
//!   `members` in the evidence) instead of opening its own; a location leaving it (clear or
//!   stale) is an `update` too, so an alert of several locations may change more often than
//!   `update_every`, and each event's value and peak are those of the location that made it;
//!   the alert resolves when its last location clears or goes stale, and counts once towards
//!   the storm limit (a neighbour in the storm summary is joined by nobody);
//! - **storm limit**: with `storm.max_open`, once that many alerts are open, further locations
//!   join one summarized alert (location `*`, with the count and the member list) instead of
//!   opening their own; it resolves when its last member clears;
//! - **active hours**: with `active_hours: [from, to]` (UTC hours, may wrap midnight), rows
//!   outside them count as clear (noise at night);
//! - **staleness**: a location silent for `stale_after` is resolved, at its last row's time
//!   plus `stale_after` (found when the watermark passes that time or when the location's next
//!   row comes first; taking rows in event-time order, before the first row of any location
//!   after that time, so that joined alerts and the storm summary lose it between the same two
//!   rows whenever watermarks come).
//!
//! Rows are taken per location in the order they arrive. For rows derived by windows (the
//! model scores) that order is fixed by event time, so the events are the same however the
//! input was read; the storm summary, which joins locations, sees locations in arrival order,
//! which across the partitions of a raw event stream can differ between runs, unless
//! `storm.order: event_time` (always with `join`): then rows are held until the watermark
//! passes them and taken by event time, then location (held rows are part of the snapshot).
//!
//! A location's raise level is, first, the live level on the pipeline's [`ThresholdBoard`]
//! (set by calibration in the control center, without a config edit), then its entry in
//! `thresholds`, then `raise`.
//!
//! Every event carries the triggering value, the threshold, the peak and the `evidence` columns
//! of the row that caused it (model name and checksum, for instance) as JSON, and the processing
//!
//! One file per job: [`config`] (the YAML, the `alerts` table schema, planning),
//! [`board`] (live per-location thresholds), [`rule`] (the per-location state machine, the
//! operator), [`state`] (its snapshot), [`calibration`] (threshold proposals from operators'
//! verdicts).

mod board;
mod calibration;
mod config;
mod rule;
mod state;

pub use board::ThresholdBoard;
pub use calibration::{CalibrationSpec, Judged, Proposal, calibrate};
pub use config::{AlertConfig, ConfirmConfig, JoinConfig, OpenAfter, Severity, StormConfig, StormOrder, alert_schema};
pub use rule::{AlertRule, weighable_level};
