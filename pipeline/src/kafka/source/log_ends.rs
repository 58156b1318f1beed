//! Log ends asked of the brokers without waiting (the librdkafka fetch path).
//!
//! Watermark alignment tells a partition with a backlog from one that is caught up by its log
//! end. librdkafka knows the end of a partition it has fetched from; for one it has not (paused
//! from the start, or whose leader has not answered yet) the source asks the broker. That ask
//! used to wait (`fetch_watermarks`, up to 5 s each, once a second per partition) on the
//! consumer thread, so a broker that did not answer held every flush, checkpoint and poll of the
//! group for 5 s per such partition. Here one ListOffsets request (librdkafka's admin API, on
//! the consumer's own client) asks for all of them, and its answer lands on a queue of our own
//! that the source looks at without waiting. A partition without an answer of the last
//! [`ANSWER_LASTS`] counts as having a backlog, as one whose ask failed did before.
//!
//! The ask is for the high watermark (read_uncommitted), whatever the consumer's
//! `isolation.level`: the end librdkafka keeps from its fetches and the native fetch's. With
//! read_committed, a partition stopped at an open transaction is then behind, not caught up,
//! until the transaction ends (the old ask gave the last stable offset there).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::Tp;
use crate::kafka::admin_ask::AdminAsk;
use crate::kafka::reply_queue::text;

/// How long the brokers have to answer an ask (librdkafka answers with an error after it).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// A partition's end is asked again once its last answer is this old.
const ASK_EVERY: Duration = Duration::from_secs(1);
/// An answer older than this is not used: the ask after it has had no answer in its time.
const ANSWER_LASTS: Duration = Duration::from_secs(6);
/// An ask with no answer at all after this long is dropped, so that another may start (an
/// answer landing later finds its queue gone).
const GIVE_UP_AFTER: Duration = Duration::from_secs(15);

/// The ask in flight, and what it asked for.
struct Ask {
    ask: AdminAsk,
    asked: Vec<Tp>,
}

/// The log ends the source has asked for, and the ask in flight. Drop it before the consumer:
/// librdkafka's queues must be destroyed before their client.
#[derive(Default)]
pub(super) struct LogEnds {
    in_flight: Option<Ask>,
    /// Per partition: the end its last answer gave (`None`: the ask failed for it), and when.
    answers: HashMap<Tp, (Option<i64>, Instant)>,
}

impl LogEnds {
    /// The end the last answer for `tp` gave, unless it is older than [`ANSWER_LASTS`] (none
    /// yet, or the ask failed: `None`).
    pub(super) fn known(&self, tp: &Tp) -> Option<i64> {
        self.answers.get(tp).filter(|(_, at)| at.elapsed() < ANSWER_LASTS).and_then(|(end, _)| *end)
    }

    /// Takes the answer of the ask in flight, if it has come (without waiting), then — when no
    /// ask is in flight — asks consumer `client` (`BaseConsumer::client().native_ptr()`) for the
    /// ends of those of `wanted` with no answer, or one [`ASK_EVERY`] old. An ask that could not
    /// start is logged and tried again at the next call.
    pub(super) fn refresh(&mut self, client: *mut rd::rd_kafka_t, wanted: &[Tp]) {
        self.take_answer();
        if self.in_flight.is_some() {
            return;
        }
        let due: Vec<Tp> = wanted
            .iter()
            .filter(|tp| self.answers.get(*tp).is_none_or(|(_, at)| at.elapsed() >= ASK_EVERY))
            .cloned()
            .collect();
        if due.is_empty() {
            return;
        }
        match ask(client, &due) {
            Ok(ask) => self.in_flight = Some(Ask { ask, asked: due }),
            Err(e) => tracing::warn!("asking the brokers for log ends: {e}"),
        }
    }

    /// Forgets the partitions not in `assigned` (revoked; call after [`LogEnds::refresh`],
    /// which may take an answer for them).
    pub(super) fn retain(&mut self, assigned: impl Fn(&Tp) -> bool) {
        self.answers.retain(|tp, _| assigned(tp));
    }

    /// The answer of the ask in flight, if it has come: each partition asked for gets the end
    /// it gave, or `None` (an error, for it or for the whole ask: asked again in a second).
    fn take_answer(&mut self) {
        let Some(in_flight) = self.in_flight.as_ref() else { return };
        let ends = match in_flight.ask.answer(rd::RD_KAFKA_EVENT_LISTOFFSETS_RESULT, GIVE_UP_AFTER, read) {
            Some(Ok(ends)) => ends,
            Some(Err(e)) if in_flight.ask.waited() >= GIVE_UP_AFTER => {
                tracing::warn!("asking the brokers for log ends: {e}; asking again");
                Vec::new()
            }
            Some(Err(e)) => {
                tracing::debug!("asking the brokers for log ends: {e}");
                Vec::new()
            }
            None => return,
        };
        let now = Instant::now();
        let Some(in_flight) = self.in_flight.take() else { return };
        for tp in &in_flight.asked {
            self.answers.insert(tp.clone(), (None, now));
        }
        for (tp, end) in ends {
            if let Some(known) = self.answers.get_mut(&tp) {
                known.0 = end;
            }
        }
    }
}

/// Sends one ListOffsets request for the latest offset (high watermark) of each of
/// `partitions` (librdkafka sends each to its leader).
fn ask(client: *mut rd::rd_kafka_t, partitions: &[Tp]) -> Result<AdminAsk, String> {
    let mut list = TopicPartitionList::with_capacity(partitions.len());
    for (topic, partition) in partitions {
        list.add_partition_offset(topic, *partition, Offset::End).map_err(|e| e.to_string())?;
    }
    let op = rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_LISTOFFSETS;
    // (the options' isolation level is read_uncommitted unless set)
    AdminAsk::send(client, op, ASK_TIMEOUT, None, |client, options, queue| {
        // SAFETY: a live client, options and queue; librdkafka copies the list
        unsafe { rd::rd_kafka_ListOffsets(client, list.ptr(), options, queue) }
    })
}

/// The ends a ListOffsets answer carries, per partition (`None` for a partition with an error
/// of its own).
fn read(event: *mut rd::rd_kafka_event_t) -> Vec<(Tp, Option<i64>)> {
    // SAFETY: a live answer event of this kind; its infos and their partitions live as long as
    // it and are copied here
    unsafe {
        let result = rd::rd_kafka_event_ListOffsets_result(event);
        let mut count = 0usize;
        let infos =
            if result.is_null() { std::ptr::null() } else { rd::rd_kafka_ListOffsets_result_infos(result, &mut count) };
        let infos = if infos.is_null() { &[][..] } else { std::slice::from_raw_parts(infos, count) };
        infos
            .iter()
            .filter_map(|&info| {
                let p = rd::rd_kafka_ListOffsetsResultInfo_topic_partition(info).as_ref()?;
                let topic = text(p.topic);
                let ok = p.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && p.offset >= 0;
                if !ok {
                    tracing::debug!(topic, partition = p.partition, "log end: {}", RDKafkaErrorCode::from(p.err));
                }
                Some(((topic, p.partition), ok.then_some(p.offset)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    fn consumer(brokers: &str) -> BaseConsumer {
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap()
    }

    /// A "broker" that takes connections and never answers: each call returns at once, the
    /// ask stays in flight until librdkafka answers it with an error (after its timeout), the
    /// partitions then count as unknown, and are asked again a second later.
    #[test]
    fn an_ask_nobody_answers_holds_no_call() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let consumer = consumer(&silent.local_addr().unwrap().to_string());
        let client = consumer.client().native_ptr();
        let mut ends = LogEnds::default();
        let wanted = vec![("t".to_owned(), 0), ("t".to_owned(), 1)];
        let start = Instant::now();
        let mut calls = Vec::new();
        while (calls.is_empty() || ends.in_flight.is_some()) && start.elapsed() < Duration::from_secs(20) {
            let call = Instant::now();
            ends.refresh(client, &wanted);
            calls.push(call.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        let answered = start.elapsed();
        assert!(ends.in_flight.is_none(), "no answer in {answered:?}");
        assert!(answered >= ASK_TIMEOUT - Duration::from_millis(500), "answered before its timeout: {answered:?}");
        assert!(answered < GIVE_UP_AFTER, "librdkafka's answer, not our giving up: {answered:?}");
        assert!(calls.iter().all(|c| *c < Duration::from_millis(500)), "a call waited: {calls:?}");
        assert!(wanted.iter().all(|tp| ends.answers.contains_key(tp) && ends.known(tp).is_none()));
        // asked again once the failure is a second old, not before
        ends.refresh(client, &wanted);
        assert!(ends.in_flight.is_none(), "asked again at once");
        std::thread::sleep(ASK_EVERY);
        ends.refresh(client, &wanted);
        assert!(ends.in_flight.as_ref().is_some_and(|a| a.asked == wanted), "not asked again");
        drop(ends);
        drop(consumer);
    }

    /// Against the suite's broker (`CITYSTREAM_KAFKA_BROKERS`, as the Kafka tests): the ends
    /// a ListOffsets answer gives are the partitions' log ends, and a partition that does not
    /// exist is unknown.
    #[test]
    fn an_answer_gives_each_partitions_log_end() {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let brokers = crate::kafka::test_brokers();
        let topic = format!(
            "log-ends-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        );
        let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let created = runtime
            .block_on(admin.create_topics(
                &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ))
            .unwrap_or_else(|e| panic!("needs a Kafka broker at {brokers} (CITYSTREAM_KAFKA_BROKERS): {e}"));
        assert!(created.iter().all(Result::is_ok), "{created:?}");
        // deleted however the test ends
        struct Delete<'a>(&'a AdminClient<rdkafka::client::DefaultClientContext>, &'a str, &'a tokio::runtime::Runtime);
        impl Drop for Delete<'_> {
            fn drop(&mut self) {
                let _ = self.2.block_on(self.0.delete_topics(&[self.1], &AdminOptions::new()));
            }
        }
        let _delete = Delete(&admin, &topic, &runtime);
        let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        for (partition, n) in [(0, 7), (1, 3)] {
            for i in 0..n {
                let key = format!("{i}");
                producer.send(BaseRecord::to(&topic).partition(partition).key(&key).payload("x")).unwrap();
            }
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let consumer = consumer(&brokers);
        let client = consumer.client().native_ptr();
        let mut ends = LogEnds::default();
        let wanted = vec![(topic.clone(), 0), (topic.clone(), 1), (topic.clone(), 5)];
        let start = Instant::now();
        ends.refresh(client, &wanted);
        while ends.in_flight.is_some() && start.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(20));
            ends.refresh(client, &wanted);
        }
        assert_eq!(ends.known(&wanted[0]), Some(7));
        assert_eq!(ends.known(&wanted[1]), Some(3));
        assert!(ends.answers.contains_key(&wanted[2]) && ends.known(&wanted[2]).is_none(), "no such partition");
        // revoked partitions are forgotten
        ends.retain(|tp| tp.1 == 0);
        assert_eq!(ends.answers.len(), 1);
        drop(ends);
        drop(consumer);
    }
}
