//! Messages read from a partition that watermark alignment paused, held until it resumes.
//!
//! librdkafka's pause drops the messages it prefetched for a partition (the pause bumps the
//! partition's version and the queue discards older ones) and fetches them again on resume: on
//! a dense backlog, where one fetch spans more event time than `max_drift`, alignment paid for
//! every message of the fast partition twice. So a paused partition is read on: its messages
//! wait here in raw batches, not handed on, and its position (what a checkpoint commits) and
//! its event time (which `decode` reads from what it is handed) stay where the pause left them.
//! Past the source's `max_held_bytes` the partition is paused in librdkafka as well, which
//! resumes from the last message read, so the held messages and what follows them meet.

use arrow::array::RecordBatch;
use citystream_schemas::raw::RawBatchBuilder;

/// One paused partition's held messages, in offset order.
#[derive(Debug)]
pub(super) struct Held {
    /// The output port of the partition's topic.
    pub(super) port: usize,
    /// Full batches (`batch_rows` each), oldest first.
    full: Vec<RecordBatch>,
    builder: RawBatchBuilder,
    /// Payload bytes held.
    pub(super) bytes: usize,
    /// Messages held.
    pub(super) messages: u64,
    /// The offset after the last message held.
    pub(super) next: i64,
    /// Whether the partition is also paused in librdkafka (the hold was full).
    pub(super) fetch_paused: bool,
}

impl Held {
    /// Nothing held yet, with room for `rows` messages of `bytes` in all.
    pub(super) fn new(port: usize, rows: usize, bytes: usize) -> Self {
        Held {
            port,
            full: Vec::new(),
            builder: RawBatchBuilder::with_capacity(rows, bytes),
            bytes: 0,
            messages: 0,
            next: 0,
            fetch_paused: false,
        }
    }

    /// Holds one message; a full batch of `batch_rows` is finished.
    pub(super) fn push(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        arrived: i64,
        payload: &[u8],
        batch_rows: usize,
    ) {
        self.builder.append(topic, partition, offset, arrived, payload);
        self.bytes += payload.len();
        self.messages += 1;
        self.next = offset.saturating_add(1);
        if self.builder.len() >= batch_rows {
            self.full.push(self.builder.finish());
        }
    }

    /// The held messages as batches, oldest first.
    pub(super) fn into_batches(mut self) -> Vec<RecordBatch> {
        if !self.builder.is_empty() {
            self.full.push(self.builder.finish());
        }
        self.full
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    #[test]
    fn held_messages_come_back_in_order_in_batches_of_at_most_batch_rows() {
        let mut h = Held::new(2, 2, 4);
        for o in 100..107 {
            h.push("t", 1, o, 5, b"abc", 3);
        }
        assert_eq!((h.bytes, h.messages, h.next), (21, 7, 107));
        let batches = h.into_batches();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).collect::<Vec<_>>(), [3, 3, 1]);
        let offsets: Vec<i64> =
            batches.iter().flat_map(|b| b.column(2).as_primitive::<Int64Type>().values().to_vec()).collect();
        assert_eq!(offsets, (100..107).collect::<Vec<_>>());
    }

    #[test]
    fn nothing_held_gives_no_batch() {
        assert!(Held::new(0, 8, 64).into_batches().is_empty());
    }
}
