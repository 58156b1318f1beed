//! Watermark alignment: which partitions to pause while catching up.

use std::time::{Duration, Instant};

/// One partition as watermark alignment sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlignInput {
    /// Its watermark on the event clock (`None`: no valid event seen yet).
    pub watermark: Option<i64>,
    /// Whether it holds the stream's watermark back (assigned, and not caught up and idle).
    pub holding: bool,
    /// Whether it has messages left to read (position below its log end).
    pub backlog: bool,
    /// Whether it is paused now.
    pub paused: bool,
}

/// Watermark alignment (Flink's FLIP-182, on rdkafka's pause/resume): while partitions catch
/// up, one whose event time runs more than `max_drift` ahead of the slowest partition that
/// holds the watermark back is paused, so windows and deduplication do not fill with the
/// events of the fast ones; it resumes once the slowest is within `max_drift / 2` of it. A
/// partition with a backlog that has not spoken yet counts as the slowest of all. Only
/// partitions with a backlog are paused: a caught-up one has nothing to read.
#[derive(Debug, Clone, Copy)]
pub struct Alignment {
    /// The largest lead in event time, ms.
    pub max_drift_ms: i64,
}

impl Alignment {
    /// The partition the others are aligned to (an index into `parts`): the slowest that holds
    /// the watermark back. A caught-up partition that has not spoken has nothing to read:
    /// waiting for it would not make it speak sooner.
    pub fn slowest(parts: &[AlignInput]) -> Option<usize> {
        parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.holding && (p.backlog || p.watermark.is_some()))
            .min_by_key(|(_, p)| p.watermark.unwrap_or(i64::MIN))
            .map(|(i, _)| i)
    }

    /// Which of `parts` to pause and which to resume (indices into `parts`).
    pub fn decide(&self, parts: &[AlignInput]) -> (Vec<usize>, Vec<usize>) {
        let slowest = Self::slowest(parts).map(|i| parts[i].watermark.unwrap_or(i64::MIN));
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for (i, p) in parts.iter().enumerate() {
            let lead = match (slowest, p.watermark) {
                (Some(s), Some(w)) => w.saturating_sub(s),
                _ => 0,
            };
            if !p.paused && p.backlog && lead > self.max_drift_ms {
                pause.push(i);
            } else if p.paused && (!p.backlog || lead <= self.max_drift_ms / 2) {
                resume.push(i);
            }
        }
        (pause, resume)
    }
}

/// How long watermark alignment has waited on a partition that does not move: partitions are
/// paused for the slowest one, and it has neither been read on nor had its watermark move
/// since. Alignment is meant to wait for a partition that is behind and reading; one that does
/// not move (its broker stalled, its leader gone) holds every paused partition until it does,
/// and this is what makes that visible (`citystream_kafka_alignment_stalled_seconds`, and a
/// warning naming the partition).
#[derive(Debug)]
pub struct AlignmentWait<K, P> {
    /// The partition waited on, how far it had come (its watermark and position), since when
    /// it has stood there, and when it was last looked at.
    on: Option<(K, P, Instant, Instant)>,
    /// Whether the current wait has been warned about.
    pub warned: bool,
}

impl<K, P> Default for AlignmentWait<K, P> {
    fn default() -> Self {
        AlignmentWait { on: None, warned: false }
    }
}

impl<K: PartialEq, P: PartialEq> AlignmentWait<K, P> {
    /// After a flush: the partition the paused ones wait on and how far it has come (`None`
    /// when none is paused). Returns how long it has stood still with partitions paused for
    /// it. A look more than `max_gap` after the last starts the wait afresh: the source itself
    /// stood still in between (a full pipeline), not only the partition.
    pub fn observe(&mut self, waited_on: Option<(K, P)>, now: Instant, max_gap: Duration) -> Duration {
        let Some((key, progress)) = waited_on else {
            self.on = None;
            self.warned = false;
            return Duration::ZERO;
        };
        if let Some((k, p, since, seen)) = &mut self.on
            && *k == key
            && *p == progress
            && now.saturating_duration_since(*seen) <= max_gap
        {
            *seen = now;
            return now.saturating_duration_since(*since);
        }
        self.on = Some((key, progress, now, now));
        self.warned = false;
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn part(wm: Option<i64>, backlog: bool, paused: bool) -> AlignInput {
        AlignInput { watermark: wm, holding: true, backlog, paused }
    }

    #[test]
    fn a_partition_an_hour_ahead_is_paused_and_resumed_when_the_others_catch_up() {
        let a = Alignment { max_drift_ms: 10 * 60_000 };
        // partition 1 runs an hour ahead of partitions 0 and 2
        let mut parts = vec![part(Some(0), true, false), part(Some(H), true, false), part(Some(60_000), true, false)];
        let (pause, resume) = a.decide(&parts);
        assert_eq!((pause, resume), (vec![1], vec![]));
        parts[1].paused = true;
        // the others move up, but not yet within half the drift
        parts[0].watermark = Some(H - 6 * 60_000);
        parts[2].watermark = Some(H - 5 * 60_000);
        assert_eq!(a.decide(&parts), (vec![], vec![]), "still 6 minutes behind: stays paused");
        parts[0].watermark = Some(H - 4 * 60_000);
        assert_eq!(a.decide(&parts), (vec![], vec![1]), "within half the drift: resumed");
    }

    #[test]
    fn a_silent_partition_holds_the_others_and_a_caught_up_one_is_never_paused() {
        let a = Alignment { max_drift_ms: 60_000 };
        // partition 0 has not spoken yet: the others wait for it
        let parts = [part(None, true, false), part(Some(H), true, false), part(Some(2 * H), false, false)];
        assert_eq!(a.decide(&parts), (vec![1], vec![]), "the one without a backlog has nothing to pause");
        // an empty partition (caught up, silent) does not stop the others while it waits to be idle
        let parts = [part(None, false, false), part(Some(H), true, false), part(Some(H + 1000), true, false)];
        assert_eq!(a.decide(&parts), (vec![], vec![]));
        // an idle partition does not hold anyone back
        let parts = [
            AlignInput { watermark: Some(0), holding: false, backlog: false, paused: false },
            part(Some(H), true, false),
            part(Some(H + 1000), true, false),
        ];
        assert_eq!(a.decide(&parts), (vec![], vec![]));
        // a paused partition whose backlog is gone is resumed
        let parts = [part(Some(0), true, false), part(Some(H), false, true)];
        assert_eq!(a.decide(&parts), (vec![], vec![1]));
    }

    #[test]
    fn a_wait_counts_while_the_partition_waited_on_stands_still() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let gap = s(5);
        let mut w = AlignmentWait::default();
        assert_eq!(w.observe(None, t0, gap), s(0), "nothing paused: no wait");
        assert_eq!(w.observe(Some((2, (Some(10), 100))), t0, gap), s(0));
        assert_eq!(w.observe(Some((2, (Some(10), 100))), t0 + s(4), gap), s(4));
        assert_eq!(w.observe(Some((2, (Some(10), 100))), t0 + s(7), gap), s(7), "standing still for 7 s");
        w.warned = true;
        assert_eq!(w.observe(Some((2, (Some(10), 101))), t0 + s(8), gap), s(0), "read on: the wait starts again");
        assert!(!w.warned, "a new wait is warned about afresh");
        assert_eq!(w.observe(Some((2, (Some(11), 101))), t0 + s(9), gap), s(0), "its watermark moved");
        assert_eq!(w.observe(Some((2, (Some(11), 101))), t0 + s(10), gap), s(1));
        assert_eq!(w.observe(Some((3, (Some(11), 101))), t0 + s(12), gap), s(0), "another is the slowest now");
        assert_eq!(w.observe(Some((3, (Some(11), 101))), t0 + s(18), gap), s(0), "6 s unlooked at: afresh");
        assert_eq!(w.observe(None, t0 + s(19), gap), s(0), "resumed");
        assert_eq!(w.observe(Some((3, (Some(11), 101))), t0 + s(20), gap), s(0), "paused again: a new wait");
    }

    #[test]
    fn the_slowest_is_the_partition_decide_aligns_to() {
        let parts = [part(Some(5), true, false), part(None, false, false), part(Some(3), true, false)];
        assert_eq!(Alignment::slowest(&parts), Some(2), "the silent caught-up one is not waited on");
        let parts = [part(Some(5), true, false), part(None, true, false)];
        assert_eq!(Alignment::slowest(&parts), Some(1), "a silent one with a backlog is the slowest of all");
        let idle = AlignInput { watermark: Some(0), holding: false, backlog: false, paused: false };
        assert_eq!(Alignment::slowest(&[idle]), None);
    }
}
