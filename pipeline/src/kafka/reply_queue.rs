//! A librdkafka queue of our own, where the answer to one asynchronous request lands (the
//! source's offset commit and log-end ask, the native fetch's leader ask): its owner looks at it
//! when it chooses, waiting as long as it chooses, and destroys it once answered or given up on
//! (an answer landing later finds the queue disabled and is dropped). Every such queue must go
//! before its client: its owner is declared before the consumer in the source's loop.

use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;

pub(crate) struct ReplyQueue(NonNull<rd::rd_kafka_queue_t>);

// SAFETY: librdkafka's queues are thread-safe; the handle is used by the consumer thread (and
// the rebalance callbacks on it) and destroyed before the consumer (see the module's doc).
unsafe impl Send for ReplyQueue {}

impl ReplyQueue {
    /// A new queue on `client`; `None` if librdkafka made none.
    pub(crate) fn new(client: NonNull<rd::rd_kafka_t>) -> Option<Self> {
        // SAFETY: a live client; the queue is destroyed by the drop
        NonNull::new(unsafe { rd::rd_kafka_queue_new(client.as_ptr()) }).map(ReplyQueue)
    }

    /// The handle, for the request to answer on (librdkafka keeps its own reference to the
    /// queue until it has answered).
    pub(crate) fn as_ptr(&self) -> *mut rd::rd_kafka_queue_t {
        self.0.as_ptr()
    }

    /// The answer, if it comes within `wait` (zero: only one already there). An event taken
    /// is the caller's, to destroy.
    pub(crate) fn poll(&self, wait: Duration) -> Option<NonNull<rd::rd_kafka_event_t>> {
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: a live queue
        NonNull::new(unsafe { rd::rd_kafka_queue_poll(self.0.as_ptr(), ms) })
    }
}

impl Drop for ReplyQueue {
    fn drop(&mut self) {
        // SAFETY: our handle, destroyed once, while the client lives
        unsafe { rd::rd_kafka_queue_destroy(self.0.as_ptr()) };
    }
}
