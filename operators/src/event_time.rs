//! Event time per source partition.
//!
//! A source knows its partitions — which are assigned, which have a backlog, which are idle,
//! which it may pause — but not the time of the events it reads: that is in the payload, which
//! the `decode` stage parses. An [`EventClock`] joins the two. One clock serves one source
//! stream (a Kafka topic, a simulator stream): every `decode` stage reading the stream
//! publishes, per partition, the newest valid event time it has seen minus the source's
//! `max_out_of_orderness` (the partition's watermark); the source reads the clock to emit the
//! stream's watermark (the minimum over the partitions that hold it back) and to pause
//! partitions that run ahead.
//!
//! The clock is only ever behind what `decode` knows, never ahead: a watermark computed from it
//! is safe. Lateness is not decided with it but inside `decode`, in the order of each
//! partition's own events (see [`PartitionTime`]), so which events are late depends on the
//! content of the partitions, not on how their reading interleaved.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The per-partition event-time watermarks of one source stream (see the module docs).
#[derive(Debug, Clone)]
pub struct EventClock {
    lag_ms: i64,
    watermarks: Arc<Mutex<BTreeMap<i32, i64>>>,
    idle: Arc<AtomicBool>,
}

impl EventClock {
    /// A clock for a stream whose events may arrive up to `max_out_of_orderness_ms` behind the
    /// newest event of their partition.
    pub fn new(max_out_of_orderness_ms: i64) -> Self {
        Self { lag_ms: max_out_of_orderness_ms.max(0), watermarks: Arc::default(), idle: Arc::default() }
    }

    /// Says whether no partition of the stream holds its watermark back any more (each is
    /// caught up and silent, or the reader has none): the source sets it, a reader downstream
    /// that combines several readers' watermarks (the global task) may then leave this one out.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Relaxed);
    }

    /// Whether the stream is idle (see [`set_idle`](Self::set_idle)); false until a source says.
    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    /// The out-of-orderness bound of the stream, ms.
    pub fn lag_ms(&self) -> i64 {
        self.lag_ms
    }

    /// Raises the watermark of each `(partition, watermark)` (never lowers one).
    pub fn publish(&self, updates: impl IntoIterator<Item = (i32, i64)>) {
        let mut w = self.watermarks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (p, wm) in updates {
            let e = w.entry(p).or_insert(wm);
            *e = (*e).max(wm);
        }
    }

    /// The watermark of `partition`, if a decoder has seen a valid event of it.
    pub fn watermark(&self, partition: i32) -> Option<i64> {
        self.watermarks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&partition).copied()
    }

    /// Every partition's watermark.
    pub fn watermarks(&self) -> BTreeMap<i32, i64> {
        self.watermarks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// A stream's watermark from its inputs' `(holding, watermark)` — a source's partitions, or the
/// global task's tasks: the minimum over the inputs that hold it back, none while one of them
/// has not spoken (`None`). When none holds it (each caught up and silent), the minimum over
/// those that spoke: each one's own events already respect its watermark, so this makes
/// nothing late, and a stream whose inputs all went idle closes its windows up to what was
/// read, whatever the order they went idle in (a sparse topic read in one fetch goes idle
/// before `decode` published its event times).
pub fn stream_watermark(inputs: impl IntoIterator<Item = (bool, Option<i64>)>) -> Option<i64> {
    let (mut holding, mut silent, mut held, mut idle) = (false, false, None::<i64>, None::<i64>);
    for (holds, wm) in inputs {
        holding |= holds;
        match (holds, wm) {
            (true, None) => silent = true,
            (true, Some(w)) => held = Some(held.map_or(w, |m| m.min(w))),
            (false, Some(w)) => idle = Some(idle.map_or(w, |m| m.min(w))),
            (false, None) => {}
        }
    }
    match (holding, silent) {
        (true, true) => None,
        (true, false) => held,
        (false, _) => idle,
    }
}

/// The newest event time per partition as one reader sees it, in each partition's own order:
/// the basis of a deterministic lateness rule. An event is late when its time is at or before
/// its partition's watermark (newest earlier event minus the lag), or at or before the
/// stream's watermark as it reached the reader (only possible for a partition that was idle:
/// see `docs/ARCHITECTURE.md`).
#[derive(Debug, Clone, Default)]
pub struct PartitionTime {
    newest: BTreeMap<i32, i64>,
    changed: BTreeMap<i32, i64>,
}

impl PartitionTime {
    /// Whether an event at `ts` on `partition` is late, given `lag_ms` and the stream watermark
    /// `stream_wm`; an event that is not late advances its partition's time.
    pub fn admit(&mut self, partition: i32, ts: i64, lag_ms: i64, stream_wm: i64) -> bool {
        let newest = self.newest.get(&partition).copied();
        let own_wm = newest.map_or(i64::MIN, |n| n.saturating_sub(lag_ms));
        if ts <= own_wm.max(stream_wm) {
            return false;
        }
        if newest.is_none_or(|n| ts > n) {
            self.newest.insert(partition, ts);
            self.changed.insert(partition, ts.saturating_sub(lag_ms));
        }
        true
    }

    /// The partitions whose watermark moved since the last call, with their watermark.
    pub fn take_changes(&mut self) -> BTreeMap<i32, i64> {
        std::mem::take(&mut self.changed)
    }

    /// The newest event time per partition.
    pub fn newest(&self) -> &BTreeMap<i32, i64> {
        &self.newest
    }

    /// Restores the newest event time per partition (from a snapshot).
    pub fn restore(&mut self, newest: impl IntoIterator<Item = (i32, i64)>, lag_ms: i64) {
        self.newest = newest.into_iter().collect();
        self.changed = self.newest.iter().map(|(p, t)| (*p, t.saturating_sub(lag_ms))).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_waits_for_holding_inputs_and_leaves_idle_ones_out() {
        // the minimum over the inputs that hold it back; an idle one behind them is left out
        assert_eq!(stream_watermark([(true, Some(50)), (true, Some(40)), (false, Some(10))]), Some(40));
        // one that holds it back and has not spoken: no watermark yet
        assert_eq!(stream_watermark([(true, Some(50)), (true, None), (false, Some(90))]), None);
        // no input at all
        assert_eq!(stream_watermark([]), None);
    }

    #[test]
    fn a_stream_whose_inputs_all_went_idle_moves_up_to_the_slowest_that_spoke() {
        // a sparse topic read in one fetch: every partition caught up and silent before decode
        // published its event times; once it has, the stream's windows close up to them
        assert_eq!(stream_watermark([(false, None), (false, None)]), None);
        assert_eq!(stream_watermark([(false, Some(70)), (false, None), (false, Some(30))]), Some(30));
    }

    #[test]
    fn an_event_is_late_behind_its_own_partition_whatever_the_others_do() {
        let mut t = PartitionTime::default();
        let lag = 10;
        assert!(t.admit(0, 100, lag, i64::MIN));
        assert!(t.admit(1, 5, lag, i64::MIN), "another partition far behind is on time");
        assert!(t.admit(0, 91, lag, i64::MIN), "within the lag of its partition's newest");
        assert!(!t.admit(0, 90, lag, i64::MIN), "at the partition's watermark: late");
        assert!(t.admit(1, 6, lag, i64::MIN));
        assert_eq!(t.take_changes(), BTreeMap::from([(0, 90), (1, -4)]));
        assert!(t.take_changes().is_empty());
        // the stream watermark (only ahead of a partition that was idle) also bounds
        assert!(!t.admit(1, 20, lag, 25));
    }

    #[test]
    fn the_clock_only_moves_forward() {
        let c = EventClock::new(120_000);
        assert_eq!(c.watermark(3), None);
        c.publish([(3, 50), (4, 7)]);
        c.publish([(3, 40)]);
        assert_eq!(c.watermark(3), Some(50));
        assert_eq!(c.watermarks(), BTreeMap::from([(3, 50), (4, 7)]));
        assert_eq!(c.lag_ms(), 120_000);
    }
}
