//! A partition's log range (its low and high watermark), asked again while the cluster
//! settles.
//!
//! librdkafka's `query_watermark_offsets` (`fetch_watermarks`) waits for a leader and retries
//! some errors itself, but returns at once with others that pass by themselves within
//! seconds: a leader that has not taken the partition over yet or just gave it up
//! (`NotLeaderForPartition`, `ReplicaNotAvailable`), and a topic its metadata does not know
//! yet. The Kafka source asks when a partition with no committed offset is assigned (it
//! starts at the low watermark); failing there stopped the source, and with it the whole
//! process (CI saw three instances of a copartitioning test stop on `NotLeaderForPartition`
//! one second after creating their topics). Here such errors are asked again, with a growing
//! pause, until the caller's deadline; any other error returns at once. (Where a failed ask is
//! asked again anyway, as the native fetch's offset reset and the control center's replica do,
//! one ask is enough.)

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;

/// The first pause before asking again; it doubles up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Whether `e` passes once the cluster settles: a leader being elected or moved, metadata
/// behind a topic's creation (the broker's, or the client's cache: librdkafka's local
/// unknown topic or partition), a broker that did not answer in time.
pub(crate) fn passes(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            NotLeaderForPartition
                | ReplicaNotAvailable
                | LeaderNotAvailable
                | UnknownTopicOrPartition
                | UnknownTopic
                | UnknownPartition
                | UnknownLeaderEpoch
                | FencedLeaderEpoch
                | OffsetNotAvailable
                | RequestTimedOut
                | OperationTimedOut
                | BrokerNotAvailable
                | NetworkException
                | BrokerTransportFailure
                | AllBrokersDown
                | KafkaStorageError
        )
    )
}

/// The low and high watermark of `topic`/`partition`, asked again on an error that
/// [`passes`] until `deadline`; the last error after it.
pub(crate) fn watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    deadline: Instant,
) -> KafkaResult<(i64, i64)> {
    let mut pause = FIRST_PAUSE;
    let mut tries = 1u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(FIRST_PAUSE);
        match consumer.fetch_watermarks(topic, partition, left) {
            Err(e) if passes(&e) && Instant::now() + pause < deadline => {
                tracing::debug!(topic, partition, tries, "reading the log's range: {e}; asking again");
                std::thread::sleep(pause);
                pause = (pause * 2).min(LONGEST_PAUSE);
                tries += 1;
            }
            Ok(range) => {
                if tries > 1 {
                    tracing::info!(topic, partition, tries, "read the log's range after the cluster settled");
                }
                return Ok(range);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rdkafka::ClientConfig;

    use super::*;

    #[test]
    fn errors_of_a_settling_cluster_pass_and_others_do_not() {
        let code = |c| KafkaError::MetadataFetch(c);
        assert!(passes(&code(RDKafkaErrorCode::NotLeaderForPartition)));
        assert!(passes(&code(RDKafkaErrorCode::ReplicaNotAvailable)));
        assert!(passes(&code(RDKafkaErrorCode::LeaderNotAvailable)));
        assert!(passes(&code(RDKafkaErrorCode::UnknownTopicOrPartition)));
        assert!(!passes(&code(RDKafkaErrorCode::TopicAuthorizationFailed)));
        assert!(!passes(&code(RDKafkaErrorCode::InvalidPartitions)));
        assert!(!passes(&KafkaError::Canceled));
    }

    /// Against the suite's broker (`CITYSTREAM_KAFKA_BROKERS`, as the Kafka tests): the range
    /// of a topic created a second after the first ask is read once it exists, where one ask
    /// fails; a partition that never comes is asked for until the deadline, then an error.
    #[test]
    fn a_topic_created_while_asking_gives_its_range() {
        let brokers = crate::kafka::test_brokers();
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let topic = format!("watermarks-{}-{stamp}", std::process::id());
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        let once = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(5));
        assert!(once.as_ref().is_err_and(passes), "one ask before the topic exists: {once:?}");
        let create = {
            let (brokers, topic) = (brokers.clone(), topic.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let topics = BTreeSet::from([topic]);
                runtime
                    .block_on(crate::kafka::ensure_topics(&brokers, &topics, &BTreeSet::new(), 1, 1))
                    .unwrap_or_else(|e| panic!("creating the topic on {brokers}: {e}"));
            })
        };
        let range = watermarks(&consumer, &topic, 0, Instant::now() + Duration::from_secs(30));
        create.join().unwrap();
        assert_eq!(range.unwrap(), (0, 0));
        // librdkafka answers a partition the topic lacks at once: the wait is the retries'
        let started = Instant::now();
        let never = watermarks(&consumer, &topic, 3, started + Duration::from_secs(2));
        let waited = started.elapsed();
        assert!(never.as_ref().is_err_and(passes), "a partition the topic lacks: {never:?}");
        assert!(waited >= Duration::from_secs(1), "asked again until the deadline: {waited:?}");
        assert!(waited < Duration::from_secs(10), "gave up at the deadline: {waited:?}");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let admin: rdkafka::admin::AdminClient<_> =
            ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        let _ = runtime.block_on(admin.delete_topics(&[&topic], &rdkafka::admin::AdminOptions::new()));
    }
}
