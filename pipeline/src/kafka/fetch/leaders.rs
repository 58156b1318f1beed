//! Partition leaders asked of the brokers without waiting.
//!
//! The native fetch sends each partition's Fetch to its leader, so it needs the leader and that
//! broker's address. It used to ask librdkafka (`fetch_metadata`, up to 5 s per topic) on the
//! consumer thread, so a broker that did not answer held every checkpoint, flush and poll of the
//! group for 5 s at each ask — and asks come when a leader is lost, which is when brokers stall.
//! Here one DescribeTopics request (librdkafka's admin API: a Metadata request on the consumer's
//! own client) asks for every topic wanted, and its answer lands on a queue of our own that the
//! fetcher looks at without waiting.

use std::ffi::CString;
use std::time::Duration;

use rdkafka::bindings as rd;

use crate::kafka::admin_ask::AdminAsk;
use crate::kafka::reply_queue::text;

/// How long the brokers have to answer an ask (librdkafka answers with an error after it).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// An ask with no answer at all after this long is given up on.
const GIVE_UP_AFTER: Duration = Duration::from_secs(15);

/// One topic's partitions as an answer describes them: each with its leader's id and address
/// (`host:port`), or none; or the topic's own error. (DescribeTopics gives no partition's error:
/// a partition without a leader, as with LEADER_NOT_AVAILABLE, has none.)
pub(super) type TopicLeaders = (String, Result<Vec<(i32, Option<(i32, String)>)>, String>);

/// An ask in flight. Drop it before the client it was sent on.
pub(super) struct LeaderAsk(AdminAsk);

impl LeaderAsk {
    /// Sends one DescribeTopics request for `topics` on consumer `client`
    /// (`BaseConsumer::client().native_ptr()`), to broker `to`. Without one librdkafka sends
    /// it to the controller the metadata names, which in a KRaft cluster is any one broker:
    /// the stalled one, perhaps, until librdkafka's metadata names another.
    pub(super) fn send(client: *mut rd::rd_kafka_t, topics: &[&str], to: Option<i32>) -> Result<Self, String> {
        let names: Vec<CString> = topics
            .iter()
            .map(|t| CString::new(*t).map_err(|_| format!("topic {t:?} has a NUL byte")))
            .collect::<Result<_, _>>()?;
        let mut pointers: Vec<*const std::ffi::c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let op = rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS;
        AdminAsk::send(client, op, ASK_TIMEOUT, to, |client, options, queue| {
            // SAFETY: a live client, options and queue; the collection is ours, destroyed once
            // the request has copied it (the names outlive its making)
            unsafe {
                let collection = rd::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len());
                rd::rd_kafka_DescribeTopics(client, collection, options, queue);
                rd::rd_kafka_TopicCollection_destroy(collection);
            }
        })
        .map(LeaderAsk)
    }

    /// The answer, if it has come (without waiting): each topic's partitions, or the request's
    /// error (one too once the ask has had no answer for [`GIVE_UP_AFTER`]).
    pub(super) fn answer(&self) -> Option<Result<Vec<TopicLeaders>, String>> {
        self.0.answer(rd::RD_KAFKA_EVENT_DESCRIBETOPICS_RESULT, GIVE_UP_AFTER, read)
    }
}

/// What a DescribeTopics answer says. A leader the answer names without an address (not among
/// its brokers) counts as none.
fn read(event: *mut rd::rd_kafka_event_t) -> Vec<TopicLeaders> {
    // SAFETY: a live answer event of this kind; its descriptions, their partitions and nodes
    // live as long as it and are copied here
    unsafe {
        let result = rd::rd_kafka_event_DescribeTopics_result(event);
        let mut count = 0usize;
        let topics = if result.is_null() {
            std::ptr::null_mut()
        } else {
            rd::rd_kafka_DescribeTopics_result_topics(result, &mut count)
        };
        let topics = if topics.is_null() { &[][..] } else { std::slice::from_raw_parts(topics, count) };
        topics
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
                        let node = rd::rd_kafka_TopicPartitionInfo_leader(p);
                        let host = if node.is_null() { String::new() } else { text(rd::rd_kafka_Node_host(node)) };
                        let leader = (!host.is_empty() && rd::rd_kafka_Node_id(node) >= 0)
                            .then(|| (rd::rd_kafka_Node_id(node), format!("{host}:{}", rd::rd_kafka_Node_port(node))));
                        (rd::rd_kafka_TopicPartitionInfo_partition(p), leader)
                    })
                    .collect();
                (name, Ok(partitions))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::fenced_broker::{FencedBroker, NODE_ID, TOPIC};
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::time::Instant;

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
        let ask = LeaderAsk::send(consumer.client().native_ptr(), &[TOPIC], None).unwrap();
        assert!(ask.answer().is_none() && t0.elapsed() < Duration::from_millis(500), "no wait");
        let answer = answer_within(&ask, Duration::from_secs(10)).expect("an answer").unwrap();
        let expected = vec![(0, Some((NODE_ID, broker.address().to_owned())))];
        assert_eq!(answer, vec![(TOPIC.to_owned(), Ok(expected))]);
        drop(ask);

        // to the broker the first answer named (as the fetcher asks a broker it knows)
        broker.set_fenced(true);
        let ask = LeaderAsk::send(consumer.client().native_ptr(), &[TOPIC], Some(NODE_ID)).unwrap();
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
        let ask = LeaderAsk::send(consumer.client().native_ptr(), &["t"], None).unwrap();
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
        assert!(t0.elapsed() < GIVE_UP_AFTER, "librdkafka's own error answer, not our give-up");
        assert!(t0.elapsed() >= ASK_TIMEOUT - Duration::from_millis(500), "answered after {:?}", t0.elapsed());
        assert!(slowest < Duration::from_millis(100), "a look waited {slowest:?}");
    }
}
