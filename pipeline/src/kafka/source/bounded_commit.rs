//! Offset commits that wait for the group coordinator's answer for a bounded time.
//!
//! rdkafka's synchronous commit (`rd_kafka_commit`) waits for the answer with no bound of its
//! own (11 minutes in a two-broker run whose coordinator's `__consumer_offsets` partition had
//! lost its only replica). With the coordinator not answering, the consumer thread stood
//! still: no fetch, no flush, no stop, and no poll, so librdkafka left the group once
//! `max.poll.interval.ms` passed and the source lost its partitions. Here the commit's answer
//! goes to a queue of our own (`rd_kafka_commit_queue`) and is waited for up to
//! `commit_timeout`; a commit with no answer by then fails like an unreachable broker and
//! stays in flight in librdkafka. No other commit starts until that one has answered (the
//! source tries again at a later checkpoint): a late answer must not move the group's
//! offsets back behind a newer commit.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use citystream_operators::Counter;
use rdkafka::TopicPartitionList;
use rdkafka::bindings as rd;
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::reply_queue::{Answer, ReplyQueue, text};

/// A commit whose answer did not come in time: the queue it will land on (destroyed before
/// the consumer: [`Unanswered::forget`]).
struct InFlight {
    queue: ReplyQueue,
    epoch: u64,
    since: Instant,
}

/// The source's commit with no answer yet, if any, and how long a commit may wait.
pub(super) struct Unanswered {
    slot: Mutex<Slot>,
    wait: Duration,
    /// Commits that had no answer within `wait`.
    timeouts: Counter,
}

#[derive(Default)]
struct Slot {
    in_flight: Option<InFlight>,
    /// Set by [`Unanswered::forget`]: the consumer is going, no commit may start.
    closed: bool,
}

/// Whether a commit waits for an earlier one's answer (up to the bound) or gives up at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Earlier {
    /// The periodic checkpoint: the source reads on and tries again at a later one.
    GiveUp,
    /// A revocation or the final commit: the last chance to commit these partitions.
    Wait,
}

impl Unanswered {
    pub(super) fn new(wait: Duration, timeouts: Counter) -> Self {
        Unanswered { slot: Mutex::new(Slot::default()), wait, timeouts }
    }

    /// How long a commit may wait for its answer (`commit_timeout`, under half of
    /// `max.poll.interval.ms`): also how long an assignment, which does not poll either, asks
    /// its fresh partitions' low watermarks again while the cluster settles.
    pub(super) fn wait(&self) -> Duration {
        self.wait
    }

    /// Drops a commit still in flight (its queue) and refuses any later one. Call before the
    /// consumer goes: librdkafka's queues must be destroyed before their client.
    pub(super) fn forget(&self) {
        let mut slot = self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.closed = true;
        slot.in_flight.take();
    }

    /// Commits `offsets` (checkpoint `epoch`) on consumer `client`
    /// (`BaseConsumer::client().native_ptr()`) and waits for the answer up to the configured
    /// bound. An earlier commit that has had no answer yet is waited for first, as `earlier`
    /// says: no commit goes over it. An error if the commit failed, had no answer in time, or
    /// could not start.
    pub(super) fn commit(
        &self,
        client: *mut rd::rd_kafka_t,
        offsets: &TopicPartitionList,
        epoch: u64,
        earlier: Earlier,
    ) -> Result<(), String> {
        let mut slot = self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.closed {
            return Err("the consumer is closing".into());
        }
        if let Some(before) = slot.in_flight.as_ref() {
            let wait = match earlier {
                Earlier::GiveUp => Duration::ZERO,
                Earlier::Wait => self.wait,
            };
            match before.queue.poll(wait) {
                None => {
                    return Err(format!(
                        "the commit of checkpoint {} has had no answer for {:.0?}; no commit goes over it",
                        before.epoch,
                        before.since.elapsed()
                    ));
                }
                Some(event) => {
                    let outcome = answer(event);
                    tracing::info!(
                        epoch = before.epoch,
                        after = ?before.since.elapsed(),
                        outcome = outcome.as_ref().err().map_or("committed", String::as_str),
                        "a late answer to an offset commit"
                    );
                    slot.in_flight.take();
                }
            }
        }
        let client = NonNull::new(client).ok_or("no consumer handle")?;
        let queue = ReplyQueue::new(client).ok_or("no queue for the commit")?;
        // SAFETY: live handles; librdkafka copies `offsets` and keeps its own reference to the
        // queue until it has answered there
        let err = unsafe {
            rd::rd_kafka_commit_queue(client.as_ptr(), offsets.ptr(), queue.as_ptr(), None, std::ptr::null_mut())
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(RDKafkaErrorCode::from(err).to_string());
        }
        let in_flight = InFlight { queue, epoch, since: Instant::now() };
        match in_flight.queue.poll(self.wait) {
            Some(event) => answer(event),
            None => {
                self.timeouts.inc();
                slot.in_flight = Some(in_flight);
                Err(format!("no answer from the group coordinator within {:?}", self.wait))
            }
        }
    }
}

/// The outcome an offset commit's answer carries (the request's error, else the first
/// partition's).
fn answer(answer: Answer) -> Result<(), String> {
    answer.check(rd::RD_KAFKA_EVENT_OFFSET_COMMIT)?;
    // SAFETY: a live event of ours; the partition list it hands out lives as long as it and is
    // copied here
    unsafe {
        if let Some(list) = NonNull::new(rd::rd_kafka_event_topic_partition_list(answer.as_ptr()))
            && !list.as_ref().elems.is_null()
        {
            // librdkafka sets the request's error when a partition failed (the error the
            // synchronous commit returned); a partition's own is looked at all the same
            let list = list.as_ref();
            let elems = std::slice::from_raw_parts(list.elems, list.cnt.max(0) as usize);
            if let Some(e) = elems.iter().find(|e| e.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR) {
                return Err(format!("{}/{}: {}", text(e.topic), e.partition, RDKafkaErrorCode::from(e.err)));
            }
        }
    }
    Ok(())
}

/// Forgets the source's unanswered commit when dropped (a panic included): declared before
/// the consumer, it goes first.
pub(super) struct ForgetUnanswered(pub(super) Arc<Unanswered>);

impl Drop for ForgetUnanswered {
    fn drop(&mut self) {
        self.0.forget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::consumer::BaseConsumer;

    /// A "broker" that takes connections and never answers: the commit cannot even find its
    /// coordinator. It gives up after the bound, and the next one does not go over it; once
    /// librdkafka has answered it (`__WAIT_COORD`, after `session.timeout.ms`), the next
    /// takes that late answer and starts.
    #[test]
    fn an_unanswered_commit_fails_after_the_bound_and_holds_back_the_next() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = silent.local_addr().unwrap().to_string();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &address)
            .set("group.id", "bounded-commit-test")
            .set("enable.auto.commit", "false")
            // a commit waiting for a coordinator is answered after this long (and closing waits
            // for it): 3 s, well past the 300 ms bound below
            .set("session.timeout.ms", "3000")
            .create()
            .unwrap();
        let metrics = citystream_operators::Metrics::new();
        let timeouts = metrics.counter("timeouts", "test", &[]);
        let unanswered = Unanswered::new(Duration::from_millis(300), timeouts.clone());
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset("t", 0, rdkafka::Offset::Offset(7)).unwrap();
        let client = rdkafka::consumer::Consumer::client(&consumer).native_ptr();
        let t0 = Instant::now();
        let first = unanswered.commit(client, &offsets, 1, Earlier::GiveUp).unwrap_err();
        assert!(first.contains("no answer from the group coordinator within 300ms"), "{first}");
        assert!(t0.elapsed() < Duration::from_secs(2), "bounded: {:?}", t0.elapsed());
        assert_eq!(timeouts.get(), 1);
        let second = unanswered.commit(client, &offsets, 2, Earlier::GiveUp).unwrap_err();
        assert!(second.contains("the commit of checkpoint 1 has had no answer"), "{second}");
        assert_eq!(timeouts.get(), 1, "the second did not start");
        // a revocation's commit waits for the earlier answer, up to the bound
        let t1 = Instant::now();
        let third = unanswered.commit(client, &offsets, 3, Earlier::Wait).unwrap_err();
        assert!(third.contains("the commit of checkpoint 1 has had no answer"), "{third}");
        assert!(t1.elapsed() >= Duration::from_millis(250), "waited for the earlier answer: {:?}", t1.elapsed());
        assert_eq!(timeouts.get(), 1, "the third did not start");
        // librdkafka gives up on the first after session.timeout.ms: the next takes that answer
        std::thread::sleep(Duration::from_secs(5));
        let fourth = unanswered.commit(client, &offsets, 4, Earlier::GiveUp).unwrap_err();
        assert!(
            fourth.contains("no answer from the group coordinator"),
            "took the late answer, then started: {fourth}"
        );
        assert_eq!(timeouts.get(), 2);
        unanswered.forget();
        let closed = unanswered.commit(client, &offsets, 5, Earlier::Wait).unwrap_err();
        assert!(closed.contains("closing"), "{closed}");
        drop(consumer);
        drop(silent);
    }
}
