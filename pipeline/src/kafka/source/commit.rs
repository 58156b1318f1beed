//! Taking a checkpoint (hand on what was read, send a barrier, wait until every sink made it
//! durable) and committing it (state manifest first, then the offsets).

use std::sync::{Arc, Mutex};

use citystream_operators::{Barrier, Message};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::Positions;
use super::bounded_commit::Earlier;
use super::context::{Ctx, Shared, lock};
use super::handoff::{park, send_parked};

/// Starts a checkpoint: parks what was read, then a barrier on every port, to be handed on
/// after what is parked already ([`super::handoff`]). Returns its epoch, the positions it
/// covers, and whether it parked data.
pub(super) fn park_checkpoint(s: &mut Shared) -> (u64, Positions, bool) {
    s.epoch += 1;
    let epoch = s.epoch;
    let batches = s.take_batches();
    let had_data = !batches.is_empty();
    let barrier = Message::Barrier(Barrier { epoch });
    let barriers = (0..s.outputs.ports.len()).map(|p| (p, barrier.clone()));
    park(s, batches.into_iter().map(|(p, b)| (p, Message::Batch(b))).chain(barriers));
    (epoch, s.positions(), had_data)
}

/// Hands on what was read and a barrier, waits until every sink made it durable, and returns
/// the positions to commit. Blocks the calling (consumer) thread: a rebalance callback, or the
/// final checkpoint.
pub(super) fn checkpoint(shared: &Arc<Mutex<Shared>>) -> Option<(u64, Positions)> {
    let (epoch, positions, mut acks, rt) = {
        let mut s = lock(shared);
        let (epoch, positions, _) = park_checkpoint(&mut s);
        (epoch, positions, s.acks.clone(), s.runtime.clone())
    };
    // after what the consumer thread was handing on when the rebalance came: read before
    send_parked(shared).ok()?;
    rt.block_on(acks.wait(epoch)).then_some((epoch, positions))
}

/// Why a checkpoint could not be committed.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommitError {
    /// The state manifest could not be written: the operators' state in memory is ahead of
    /// every durable record.
    #[error("writing the state manifest: {0}")]
    Manifest(crate::task::StateError),
    /// The broker did not take the offsets (the manifest, if any, is written).
    #[error("{0}")]
    Kafka(String),
}

impl CommitError {
    /// Another process took the state over: this one must stop, not retry.
    pub(super) fn is_fenced(&self) -> bool {
        matches!(self, CommitError::Manifest(crate::task::StateError::Fenced { .. }))
    }
}

/// Commits checkpoint `epoch`: records it in the state manifest (all `positions`), then
/// commits `positions` to Kafka (waiting for the answer up to `commit_timeout`,
/// [`super::bounded_commit`]), restricted to `owned` (never a partition another member now
/// owns), each offset carrying `lineage:epoch` in its metadata (which state and checkpoint
/// committed it, for operators reading the group's offsets; the pipeline does not read it).
/// A commit still unanswered from before is waited for or not as `earlier` says.
pub(super) fn commit(
    consumer: &BaseConsumer<Ctx>,
    epoch: u64,
    positions: &Positions,
    owned: &TopicPartitionList,
    earlier: Earlier,
) -> Result<(), CommitError> {
    let log = consumer.context().commits.clone();
    let metadata = match &consumer.context().state {
        Some(state) => {
            state.commit(epoch, positions).map_err(CommitError::Manifest)?;
            format!("{}:{epoch}", state.lineage())
        }
        None => format!(":{epoch}"),
    };
    let mut tpl = TopicPartitionList::new();
    for ((topic, p), next) in positions {
        if owned.find_partition(topic, *p).is_some() {
            let mut e = tpl.add_partition(topic, *p);
            e.set_offset(Offset::Offset(*next)).map_err(|e| CommitError::Kafka(e.to_string()))?;
            e.set_metadata(&metadata);
        }
    }
    if tpl.count() > 0 {
        // bounded: a coordinator that does not answer must not hold the consumer thread
        consumer
            .context()
            .unanswered
            .commit(consumer.client().native_ptr(), &tpl, epoch, earlier)
            .map_err(|e| CommitError::Kafka(format!("committing offsets: {e}")))?;
    }
    // what compaction may now merge
    let committed = tpl.elements().into_iter().filter_map(|e| match e.offset() {
        Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
        _ => None,
    });
    let lineage = consumer.context().state.as_ref().map_or("", |s| s.lineage());
    log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(lineage, epoch, committed);
    Ok(())
}
