//! The source's own fetch queue: every assigned partition's messages are forwarded to it and
//! taken from it in batches.
//!
//! rdkafka's `BaseConsumer::poll` takes one message per call from the consumer's queue, which
//! also carries rebalances and errors: per message, librdkafka locks the queue and reads the
//! clock, and rdkafka reads it again (a third of the consumer thread's time on a backlog). A
//! partition's fetch queue forwarded to a queue of our own (`rd_kafka_queue_forward`) leaves
//! the consumer's queue to the events, and `rd_kafka_consume_batch_queue` takes up to 1024
//! messages per call (librdkafka still locks the queue per message; what goes is rdkafka's and
//! librdkafka's per-poll work, clock readings included). librdkafka applies the same rules
//! there as in a poll: a message from before a partition's last pause, seek or revocation (an
//! outdated version) is dropped, and each message taken moves the partition's application
//! position (where a pause resumes) — an error it passes on in a batch too, so the source seeks
//! to its own position when it resumes a partition it paused in librdkafka.
//!
//! librdkafka clears a partition's forwarding when it stops fetching it (at revocation) and
//! does not forward it to the consumer's queue again once the application forwarded it, so
//! every assignment forwards its partitions, and the consumer thread forwards all of them again
//! at every flush (a revocation's stop runs on librdkafka's thread and can land after the next
//! assignment's forward: at most a flush interval of delay, nothing lost).
//!
//! The consumer thread waits on this queue when it has nothing to read, so an event on the
//! consumer's queue (an assignment, above all the first one) would wait for that wait to end.
//! Anything put on the consumer's empty queue ends the wait at once instead
//! (`rd_kafka_queue_cb_event_enable`, `rd_kafka_queue_yield`): a backlog starts as soon as the
//! group has assigned its partitions, not up to 100 ms later.

use std::ffi::CString;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;

/// Messages taken per call.
pub(super) const BATCH: usize = 1024;

/// A librdkafka queue of our own. Destroy it before the consumer (see `Loop::run`). One per
/// client: a second one would replace the first one's callback on the consumer's queue.
pub(super) struct FetchQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    client: NonNull<rd::rd_kafka_t>,
    /// The consumer's queue (with a consumer group), whose events end a wait on `queue`.
    events: Option<NonNull<rd::rd_kafka_queue_t>>,
}

/// Called by librdkafka, on the thread that enqueues (one of its own, or the consumer thread
/// for an event of its own calls) with the consumer's queue locked, when an event lands on
/// that queue while it is empty: ends a wait on our queue (`opaque`).
unsafe extern "C" fn wake(_client: *mut rd::rd_kafka_t, opaque: *mut std::ffi::c_void) {
    // SAFETY: `opaque` is our queue's handle, alive until `drop` has removed this callback
    // (which takes the same lock the callback runs under)
    unsafe { rd::rd_kafka_queue_yield(opaque.cast()) };
}

// SAFETY: librdkafka's queues are thread-safe; the handle is used by the consumer thread and
// by the rebalance callbacks, which run on that thread inside its polls.
unsafe impl Send for FetchQueue {}
unsafe impl Sync for FetchQueue {}

impl FetchQueue {
    /// A new queue of consumer `client` (`BaseConsumer::client().native_ptr()`).
    pub(super) fn new(client: *mut rd::rd_kafka_t) -> Option<Self> {
        let client = NonNull::new(client)?;
        // SAFETY: a live client handle; the queue is destroyed in `drop`.
        let queue = NonNull::new(unsafe { rd::rd_kafka_queue_new(client.as_ptr()) })?;
        // SAFETY: a live client; the consumer's queue handle is ours until `drop` (null
        // without a consumer group), and `wake` gets our queue's handle, which outlives it
        let events = NonNull::new(unsafe { rd::rd_kafka_queue_get_consumer(client.as_ptr()) });
        if let Some(events) = events {
            unsafe { rd::rd_kafka_queue_cb_event_enable(events.as_ptr(), Some(wake), queue.as_ptr().cast()) };
        }
        Some(FetchQueue { queue, client, events })
    }

    /// Forwards the messages of `topic`/`partition` to this queue. False if librdkafka has no
    /// such partition (it creates one it does not know yet, so only a bad name fails).
    pub(super) fn forward(&self, topic: &str, partition: i32) -> bool {
        let Ok(name) = CString::new(topic) else { return false };
        // SAFETY: live handles; the partition queue handle is released at once (the forwarding
        // holds its own reference to our queue).
        unsafe {
            let pq = rd::rd_kafka_queue_get_partition(self.client.as_ptr(), name.as_ptr(), partition);
            if pq.is_null() {
                return false;
            }
            rd::rd_kafka_queue_forward(pq, self.queue.as_ptr());
            rd::rd_kafka_queue_destroy(pq);
        }
        true
    }

    /// Whether events wait on the consumer's queue. A poll serves at most one event, and
    /// `wake` comes only for an event that finds that queue empty: the source serves them all
    /// before it waits.
    pub(super) fn events_waiting(&self) -> bool {
        // SAFETY: a live handle (see `new`)
        self.events.is_some_and(|e| unsafe { rd::rd_kafka_queue_length(e.as_ptr()) } > 0)
    }

    /// Takes up to [`BATCH`] messages into `into` (emptied first), waiting until the batch is
    /// full or `wait` is over (a wait is bounded by the source's next flush, which hands on
    /// what was read anyway).
    pub(super) fn take(&self, wait: Duration, into: &mut Taken) {
        into.clear();
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `into.messages` has room for BATCH pointers; librdkafka writes `n` of them,
        // each a message we own until `rd_kafka_message_destroy` (in `Taken::clear`).
        let n = unsafe { rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), ms, into.messages.as_mut_ptr(), BATCH) };
        // SAFETY: librdkafka initialized the first `n` pointers (n <= BATCH; negative: an error,
        // nothing taken)
        unsafe { into.messages.set_len(n.clamp(0, BATCH as isize) as usize) };
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        // SAFETY: our handles, destroyed once, while the client lives; the callback is removed
        // (under the consumer queue's lock, so none is running) before our queue goes
        unsafe {
            if let Some(events) = self.events {
                rd::rd_kafka_queue_cb_event_enable(events.as_ptr(), None, std::ptr::null_mut());
                rd::rd_kafka_queue_destroy(events.as_ptr());
            }
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}

/// Messages taken from a [`FetchQueue`], destroyed when cleared or dropped.
pub(super) struct Taken {
    messages: Vec<*mut rd::rd_kafka_message_t>,
}

impl Taken {
    pub(super) fn new() -> Self {
        Taken { messages: Vec::with_capacity(BATCH) }
    }

    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }

    /// The `i`th message.
    pub(super) fn get(&self, i: usize) -> Taken1<'_> {
        // SAFETY: a message librdkafka gave us, alive until `clear`
        Taken1(unsafe { &*self.messages[i] })
    }

    fn clear(&mut self) {
        for m in self.messages.drain(..) {
            // SAFETY: each message is destroyed once
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.clear();
    }
}

/// One message of a [`Taken`] batch.
pub(super) struct Taken1<'a>(&'a rd::rd_kafka_message_t);

/// The topic names of messages taken together, each read from librdkafka (a C string checked
/// for UTF-8) once per run of messages of the same topic instead of once per message.
#[derive(Default)]
pub(super) struct TopicNames<'a> {
    last: Option<(*mut rd::rd_kafka_topic_t, &'a str)>,
}

impl<'a> TopicNames<'a> {
    /// The topic of `m` (`None` where it has none or a name that is not UTF-8).
    pub(super) fn of(&mut self, m: &Taken1<'a>) -> Option<&'a str> {
        match self.last {
            // every message taken holds its topic handle: while they live, one handle is one topic
            Some((handle, name)) if handle == m.topic_handle() => Some(name),
            _ => {
                let name = m.topic()?;
                self.last = Some((m.topic_handle(), name));
                Some(name)
            }
        }
    }
}

impl<'a> Taken1<'a> {
    /// The error librdkafka reports in place of a message, if any.
    pub(super) fn error(&self) -> Option<rdkafka::error::RDKafkaErrorCode> {
        (self.0.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then(|| self.0.err.into())
    }

    /// The topic's name (`None` if it is not UTF-8, which librdkafka's topics always are).
    pub(super) fn topic(&self) -> Option<&'a str> {
        if self.0.rkt.is_null() {
            return None;
        }
        // SAFETY: the topic handle outlives its messages; librdkafka's name is NUL-terminated
        unsafe { std::ffi::CStr::from_ptr(rd::rd_kafka_topic_name(self.0.rkt)) }.to_str().ok()
    }

    /// The message's topic handle (one per topic, alive while a message refers to it).
    fn topic_handle(&self) -> *mut rd::rd_kafka_topic_t {
        self.0.rkt
    }

    pub(super) fn partition(&self) -> i32 {
        self.0.partition
    }

    pub(super) fn offset(&self) -> i64 {
        self.0.offset
    }

    pub(super) fn payload(&self) -> &'a [u8] {
        if self.0.payload.is_null() {
            return &[];
        }
        // SAFETY: `len` bytes at `payload`, alive with the message
        unsafe { std::slice::from_raw_parts(self.0.payload as *const u8, self.0.len) }
    }

    /// The message's timestamp, ms (`None`: not available).
    pub(super) fn timestamp(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message
        let t = unsafe { rd::rd_kafka_message_timestamp(self.0, &mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && t >= 0).then_some(t)
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    use super::*;

    #[test]
    fn a_queue_forwards_a_partition_not_fetched_yet_and_is_empty_without_a_broker() {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "queue-test")
            .create()
            .expect("a consumer (no connection is made yet)");
        let queue = FetchQueue::new(consumer.client().native_ptr()).expect("a queue");
        assert!(queue.forward("city.traffic", 3), "librdkafka creates the partition it does not know yet");
        assert!(!queue.forward("bad\0name", 0), "a name C cannot carry");
        let mut taken = Taken::new();
        queue.take(Duration::from_millis(20), &mut taken);
        assert_eq!(taken.len(), 0);
        // messages, then the queue, then the consumer (as `Loop::run` does)
        drop(taken);
        drop(queue);
        drop(consumer);
    }

    #[test]
    fn an_event_on_the_consumers_queue_ends_a_wait_on_ours() {
        // librdkafka puts a statistics event on the consumer's queue every 100 ms
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "queue-wake-test")
            .set("statistics.interval.ms", "100")
            .create()
            .expect("a consumer");
        let queue = FetchQueue::new(consumer.client().native_ptr()).expect("a queue");
        let mut taken = Taken::new();
        for _ in 0..3 {
            // the events waiting are served (a poll serves one), as the source does before it
            // waits: the next event finds the queue empty and ends the wait
            let mut polls = 0;
            while queue.events_waiting() {
                let _ = consumer.poll(Duration::ZERO);
                polls += 1;
                assert!(polls < 10_000, "the consumer's queue drains");
            }
            let t0 = std::time::Instant::now();
            queue.take(Duration::from_secs(60), &mut taken);
            assert_eq!(taken.len(), 0);
            assert!(t0.elapsed() < Duration::from_secs(30), "an event ended the wait: {:?}", t0.elapsed());
        }
        drop(taken);
        drop(queue);
        drop(consumer);
    }
}
