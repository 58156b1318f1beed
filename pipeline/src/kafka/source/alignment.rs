//! Watermark alignment: which partitions to pause while catching up.

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
    /// Which of `parts` to pause and which to resume (indices into `parts`).
    pub fn decide(&self, parts: &[AlignInput]) -> (Vec<usize>, Vec<usize>) {
        // a caught-up partition that has not spoken has nothing to read: waiting for it
        // would not make it speak sooner
        let slowest = parts
            .iter()
            .filter(|p| p.holding && (p.backlog || p.watermark.is_some()))
            .map(|p| p.watermark.unwrap_or(i64::MIN))
            .min();
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
}
