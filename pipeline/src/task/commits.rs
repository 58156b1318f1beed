//! The positions committing sources (Kafka, files) have committed: written by the source at
//! every checkpoint, read by compaction (which merges only files wholly before them) and by
//! the carbon policy.

use std::collections::BTreeMap;

/// What a Kafka source has committed so far.
#[derive(Debug, Default)]
pub struct Commits {
    /// Per (topic, partition): the next offset to read, as last committed.
    pub offsets: BTreeMap<(String, i32), i64>,
    /// The newest committed checkpoint epoch: files of derived tables named after an epoch
    /// (with operator state checkpoints) may be merged up to it.
    pub epoch: u64,
}

impl Commits {
    /// Records that checkpoint `epoch` committed `positions` (next offset per topic and
    /// partition).
    pub fn record(&mut self, epoch: u64, positions: impl IntoIterator<Item = ((String, i32), i64)>) {
        self.offsets.extend(positions);
        self.epoch = self.epoch.max(epoch);
    }
}

/// Shared record of commits (the source writes, compaction reads).
pub type CommitLog = std::sync::Arc<std::sync::Mutex<Commits>>;
