//! The positions committing sources (Kafka, files) have committed: written by the source at
//! every checkpoint, read by compaction (which merges only files wholly before them) and by
//! the carbon policy.

use std::collections::BTreeMap;

/// What committing sources have committed so far (one per pipeline, or one per task of
/// `runtime.tasks: partition`, all recording here).
#[derive(Debug, Default)]
pub struct Commits {
    /// Per (topic, partition): the next offset to read, as last committed.
    pub offsets: BTreeMap<(String, i32), i64>,
    /// The newest committed checkpoint epoch of any state: files of derived tables named after
    /// an epoch (with operator state checkpoints) may be merged up to it.
    pub epoch: u64,
    /// The newest committed epoch per state lineage (each task has a state of its own, whose
    /// epochs count on their own).
    pub epochs: BTreeMap<String, u64>,
}

impl Commits {
    /// Records that checkpoint `epoch` of state `lineage` (empty without state) committed
    /// `positions` (next offset per topic and partition).
    pub fn record(&mut self, lineage: &str, epoch: u64, positions: impl IntoIterator<Item = ((String, i32), i64)>) {
        self.offsets.extend(positions);
        self.epoch = self.epoch.max(epoch);
        let e = self.epochs.entry(lineage.to_owned()).or_default();
        *e = (*e).max(epoch);
    }

    /// The newest committed epoch of state `lineage`; 0 (none) for a lineage no source here
    /// committed: another process's, whose files its own compaction merges.
    pub fn committed_epoch(&self, lineage: &str) -> u64 {
        self.epochs.get(lineage).copied().unwrap_or(0)
    }
}

/// Shared record of commits (the source writes, compaction reads).
pub type CommitLog = std::sync::Arc<std::sync::Mutex<Commits>>;

#[cfg(test)]
mod tests {
    use super::Commits;

    #[test]
    fn each_state_lineage_keeps_its_own_committed_epoch() {
        let mut c = Commits::default();
        c.record("aa", 5, [(("t".to_owned(), 0), 10)]);
        c.record("bb", 9, []);
        assert_eq!((c.committed_epoch("aa"), c.committed_epoch("bb")), (5, 9));
        assert_eq!(c.committed_epoch("cc"), 0, "a lineage no source here committed: nothing of it");
        c.record("aa", 3, [(("t".to_owned(), 1), 4)]);
        assert_eq!(c.committed_epoch("aa"), 5, "an epoch never goes back");
        assert_eq!(c.epoch, 9);
        assert_eq!(c.offsets.len(), 2);
    }
}
