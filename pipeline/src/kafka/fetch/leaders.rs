//! Partition leaders asked of the brokers without waiting.
//!
//! The native fetch sends each partition's Fetch to its leader, so it needs the leader and that
//! broker's address. It used to ask librdkafka (`fetch_metadata`, up to 5 s per topic) on the
//! consumer thread, so a broker that did not answer held every checkpoint, flush and poll of the
//! group for 5 s at each ask — and asks come when a leader is lost, which is when brokers stall.
//! Here one DescribeTopics request (librdkafka's admin API: a Metadata request on the consumer's
//! own client) asks for every topic wanted, and its answer lands on a queue of our own that the
//! fetcher looks at without waiting.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;

use crate::kafka::reply_queue::ReplyQueue;

/// How long the brokers have to answer an ask (librdkafka answers with an error after it).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// An ask with no answer at all after this long is given up on (an answer landing later finds
/// its queue gone).
const GIVE_UP_AFTER: Duration = Duration::from_secs(15);

/// One topic's partitions as an answer describes them: each with its leader's id and address
/// (`host:port`), or none; or the topic's own error.
pub(super) type TopicLeaders = (String, Result<Vec<(i32, Option<(i32, String)>)>, String>);

/// An ask in flight. Drop it before the client it was sent on: librdkafka's queues must be
/// destroyed before their client.
pub(super) struct LeaderAsk {
    queue: ReplyQueue,
    since: Instant,
}

impl LeaderAsk {
    /// Sends one DescribeTopics request for `topics` on consumer `client`
    /// (`BaseConsumer::client().native_ptr()`).
    pub(super) fn send(client: *mut rd::rd_kafka_t, topics: &[&str]) -> Result<Self, String> {
        let client = NonNull::new(client).ok_or("no consumer handle")?;
        let names: Vec<CString> = topics
            .iter()
            .map(|t| CString::new(*t).map_err(|_| format!("topic {t:?} has a NUL byte")))
            .collect::<Result<_, _>>()?;
        let mut pointers: Vec<*const std::ffi::c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let queue = ReplyQueue::new(client).ok_or("no queue for the ask")?;
        // SAFETY: a live client and queue; the collection and options are ours and destroyed
        // here (librdkafka copies them; the names outlive the collection's making)
        unsafe {
            let options = rd::rd_kafka_AdminOptions_new(
                client.as_ptr(),
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
            );
            if options.is_null() {
                return Err("no admin options for the ask".into());
            }
            let mut errstr = [0 as std::ffi::c_char; 256];
            let timeout = ASK_TIMEOUT.as_millis() as i32;
            let set =
                rd::rd_kafka_AdminOptions_set_request_timeout(options, timeout, errstr.as_mut_ptr(), errstr.len());
            if set != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                rd::rd_kafka_AdminOptions_destroy(options);
                return Err(CStr::from_ptr(errstr.as_ptr()).to_string_lossy().into_owned());
            }
            let collection = rd::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len());
            rd::rd_kafka_DescribeTopics(client.as_ptr(), collection, options, queue.as_ptr());
            rd::rd_kafka_TopicCollection_destroy(collection);
            rd::rd_kafka_AdminOptions_destroy(options);
        }
        Ok(LeaderAsk { queue, since: Instant::now() })
    }

    /// The answer, if it has come (without waiting): each topic's partitions, or the request's
    /// error (one too once the ask has had no answer for [`GIVE_UP_AFTER`]).
    pub(super) fn answer(&self) -> Option<Result<Vec<TopicLeaders>, String>> {
        match self.queue.poll(Duration::ZERO) {
            Some(event) => Some(read(event)),
            None if self.since.elapsed() >= GIVE_UP_AFTER => Some(Err(format!("no answer in {GIVE_UP_AFTER:?}"))),
            None => None,
        }
    }
}

/// What a DescribeTopics answer says; destroys the event.
fn read(event: NonNull<rd::rd_kafka_event_t>) -> Result<Vec<TopicLeaders>, String> {
    let event = event.as_ptr();
    let text = |p: *const std::ffi::c_char| {
        // SAFETY: a NUL-terminated string of the event's, or null
        if p.is_null() { String::new() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() }
    };
    // SAFETY: an event we own, destroyed once at the end; the result, its descriptions, their
    // partitions and nodes live as long as the event and are copied before
    unsafe {
        let outcome = if rd::rd_kafka_event_type(event) != rd::RD_KAFKA_EVENT_DESCRIBETOPICS_RESULT {
            Err(format!("an unexpected answer (event type {})", rd::rd_kafka_event_type(event)))
        } else if rd::rd_kafka_event_error(event) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            Err(text(rd::rd_kafka_event_error_string(event)))
        } else {
            let result = rd::rd_kafka_event_DescribeTopics_result(event);
            let mut count = 0usize;
            let topics = if result.is_null() {
                std::ptr::null_mut()
            } else {
                rd::rd_kafka_DescribeTopics_result_topics(result, &mut count)
            };
            let topics = if topics.is_null() { &[][..] } else { std::slice::from_raw_parts(topics, count) };
            Ok(topics
                .iter()
                .filter(|t| !t.is_null())
                .map(|&t| {
                    let name = text(rd::rd_kafka_TopicDescription_name(t));
                    let error = rd::rd_kafka_TopicDescription_error(t);
                    if !error.is_null()
                        && rd::rd_kafka_error_code(error) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                    {
                        return (name, Err(text(rd::rd_kafka_error_string(error))));
                    }
                    let mut count = 0usize;
                    let partitions = rd::rd_kafka_TopicDescription_partitions(t, &mut count);
                    let partitions =
                        if partitions.is_null() { &[][..] } else { std::slice::from_raw_parts(partitions, count) };
                    let partitions = partitions
                        .iter()
                        .filter(|p| !p.is_null())
                        .map(|&p| {
                            let leader = rd::rd_kafka_TopicPartitionInfo_leader(p);
                            let leader = (!leader.is_null() && rd::rd_kafka_Node_id(leader) >= 0).then(|| {
                                let address = format!(
                                    "{}:{}",
                                    text(rd::rd_kafka_Node_host(leader)),
                                    rd::rd_kafka_Node_port(leader)
                                );
                                (rd::rd_kafka_Node_id(leader), address)
                            });
                            (rd::rd_kafka_TopicPartitionInfo_partition(p), leader)
                        })
                        .collect();
                    (name, Ok(partitions))
                })
                .collect())
        };
        rd::rd_kafka_event_destroy(event);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::fenced_broker::{FencedBroker, NODE_ID, TOPIC};
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    /// The answer, waited for up to `limit`.
    fn answer_within(ask: &LeaderAsk, limit: Duration) -> Option<Result<Vec<TopicLeaders>, String>> {
        let t0 = Instant::now();
        loop {
            if let Some(a) = ask.answer() {
                return Some(a);
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A broker that answers gives each partition's leader and its address; one that answers
    /// as a fenced broker does gives none. The ask and each look return at once.
    #[test]
    fn an_ask_gives_each_partition_its_leader_and_address() {
        let broker = FencedBroker::start();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", broker.address())
            .set("group.id", "leaders-test")
            .create()
            .unwrap();
        let t0 = Instant::now();
        let ask = LeaderAsk::send(consumer.client().native_ptr(), &[TOPIC]).unwrap();
        assert!(ask.answer().is_none() && t0.elapsed() < Duration::from_millis(500), "no wait");
        let answer = answer_within(&ask, Duration::from_secs(10)).expect("an answer").unwrap();
        let expected = vec![(0, Some((NODE_ID, broker.address().to_owned())))];
        assert_eq!(answer, vec![(TOPIC.to_owned(), Ok(expected))]);
        drop(ask);

        broker.set_fenced(true);
        let ask = LeaderAsk::send(consumer.client().native_ptr(), &[TOPIC]).unwrap();
        let answer = answer_within(&ask, Duration::from_secs(10)).expect("an answer").unwrap();
        assert_eq!(answer, vec![(TOPIC.to_owned(), Ok(vec![(0, None)]))]);
    }

    /// An ask to a broker that never answers holds nothing: each look returns at once, and
    /// librdkafka's error answer comes after its request timeout.
    #[test]
    fn an_unanswered_ask_holds_nothing_and_ends_in_an_error() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = silent.local_addr().unwrap().to_string();
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &address).set("group.id", "leaders-test").create().unwrap();
        let ask = LeaderAsk::send(consumer.client().native_ptr(), &["t"]).unwrap();
        let t0 = Instant::now();
        let mut slowest = Duration::ZERO;
        let answer = loop {
            let look = Instant::now();
            let a = ask.answer();
            slowest = slowest.max(look.elapsed());
            if let Some(a) = a {
                break a;
            }
            assert!(t0.elapsed() < GIVE_UP_AFTER + Duration::from_secs(1), "no answer, not even given up on");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(answer.is_err(), "{answer:?}");
        assert!(t0.elapsed() >= ASK_TIMEOUT - Duration::from_millis(500), "answered after {:?}", t0.elapsed());
        assert!(slowest < Duration::from_millis(100), "a look waited {slowest:?}");
    }
}
