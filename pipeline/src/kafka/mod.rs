//! Kafka in and out (feature `kafka`): a consumer-group source that commits offsets only after
//! every sink made the data before a checkpoint barrier durable, a JSON sink on an idempotent
//! zstd producer, and the producer the simulator uses to feed topics.

pub(crate) mod admin_ask;
#[cfg(test)]
mod fenced_broker;
pub mod fetch;
pub mod global;
pub(crate) mod membership;
pub mod partition;
pub(crate) mod rebootstrap;
pub(crate) mod reply_queue;
mod sink;
mod source;
pub(crate) mod watermarks;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use citystream_operators::Duration;
use citystream_operators::partitioning::KeySpec;
use citystream_schemas::EventKind;
use rdkafka::ClientConfig;
use serde::Deserialize;

pub(crate) use sink::KafkaSink;
pub use sink::{KafkaSinkConfig, KafkaWriter, TopicRoute};
pub use source::CONSUMER_DEFAULTS;

use crate::primitives::EnvString;

/// Topic per event kind. Without `topics` a source reads `city.traffic`, `city.camera` and
/// `city.environment`; with it, exactly the kinds it names (a kind left out, or `null`, is not
/// read).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTopics {
    /// The traffic topic.
    #[serde(default)]
    pub traffic: Option<String>,
    /// The camera topic.
    #[serde(default)]
    pub camera: Option<String>,
    /// The environment topic.
    #[serde(default)]
    pub environment: Option<String>,
}

/// How producers key each topic (co-partitioning, for several instances in one group: see
/// [`citystream_operators::partitioning`]); a topic without one is not checked.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaKeys {
    /// The traffic topic's key (e.g. the corridor of `segment_id`).
    #[serde(default)]
    pub traffic: Option<KeySpec>,
    /// The camera topic's key (e.g. `zone_id`).
    #[serde(default)]
    pub camera: Option<KeySpec>,
    /// The environment topic's key (e.g. `station_id`).
    #[serde(default)]
    pub environment: Option<KeySpec>,
}

impl Default for KafkaTopics {
    fn default() -> Self {
        Self {
            traffic: Some(EventKind::Traffic.default_topic().into()),
            camera: Some(EventKind::Camera.default_topic().into()),
            environment: Some(EventKind::Environment.default_topic().into()),
        }
    }
}

fn d_group() -> EnvString {
    EnvString::literal("citystream")
}
fn d_batch_rows() -> NonZeroUsize {
    NonZeroUsize::new(8192).expect("non-zero")
}
fn d_batch_wait() -> Duration {
    Duration::from_millis(100)
}
fn d_checkpoint() -> Duration {
    Duration::from_secs(5)
}
fn d_idle() -> Duration {
    Duration::from_secs(30)
}

fn d_ooo() -> Duration {
    Duration::from_secs(120)
}
fn d_drift() -> Option<Duration> {
    Some(Duration::from_secs(600))
}
fn d_commit_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_max_held_bytes() -> usize {
    16 << 20
}

/// YAML of a `kafka` source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: EnvString,
    /// Consumer group. Default `citystream`.
    #[serde(default = "d_group")]
    pub group_id: EnvString,
    /// Topic per event kind. Default: `city.traffic`, `city.camera`, `city.environment`.
    #[serde(default)]
    pub topics: KafkaTopics,
    /// How producers key each topic: the planner proves every keyed stage's state stays on one
    /// partition, and `decode` sends rows on the wrong partition to dead letters (`misrouted`).
    /// Default: none (fine for one instance; several instances need it).
    #[serde(default)]
    pub keys: KafkaKeys,
    /// Largest raw batch handed on, rows. Default 8192.
    #[serde(default = "d_batch_rows")]
    pub batch_rows: NonZeroUsize,
    /// A partial batch is handed on after this long. Default `100ms`.
    #[serde(default = "d_batch_wait")]
    pub batch_wait: Duration,
    /// How often a checkpoint barrier is sent; offsets are committed once every sink made
    /// the data before it durable. Default `5s`.
    #[serde(default = "d_checkpoint")]
    pub checkpoint_interval: Duration,
    /// How long a checkpoint's offset commit waits for the group coordinator's answer. One
    /// with no answer by then stays in flight: no commit goes over it, so later checkpoints
    /// (and new barriers) wait until it has answered, while the source reads on and can stop (a
    /// stop whose final commit still has no answer after a minute of retries ends with an
    /// error, and the next run replays from the last commit that landed). A revocation or the
    /// final commit's first try waits for an unanswered one first, up to this long again. An
    /// assignment asks the low watermark of partitions without a committed offset again for up
    /// to this long while the cluster settles (a leader just elected). Under half of
    /// `max.poll.interval.ms` (the consumer does not poll while it waits). Default `10s`.
    #[serde(default = "d_commit_timeout")]
    pub commit_timeout: Duration,
    /// How far behind the newest event of its partition an event may arrive and still be on
    /// time; a partition's watermark trails its newest event time (from the payload's `ts`,
    /// read by `decode`) by this much. Default `2m`.
    #[serde(default = "d_ooo")]
    pub max_out_of_orderness: Duration,
    /// A partition that is caught up with its log end and has had no message for this long
    /// stops holding the watermark back (one silent sensor or empty partition must not stall
    /// the city); it counts again with its next message. A partition with messages left to
    /// read always holds it. Default `30s`.
    #[serde(default = "d_idle")]
    pub idle_partition_timeout: Duration,
    /// Watermark alignment: while catching up, a partition whose event time runs further ahead
    /// of the slowest one is paused until the slowest is within half of this, so windows and
    /// deduplication hold a bounded span of event time; `null` turns it off. Default `10m`.
    #[serde(default = "d_drift")]
    pub max_drift: Option<Duration>,
    /// A partition paused by watermark alignment is still read: its messages are held, not
    /// handed on (its offsets and its event time stay where they were), up to this many
    /// payload bytes over all partitions (the message that passes the bound, one per paused
    /// partition, is still held), and handed on first when it resumes. Past that, it is
    /// paused in librdkafka, which drops the messages it had prefetched for it and fetches them
    /// again on resume. `0`: pause in librdkafka at once. Default 16 MiB (`16777216`).
    #[serde(default = "d_max_held_bytes")]
    pub max_held_bytes: usize,
    /// How partitions are fetched: `native`, Fetch requests of the source's own to each
    /// partition leader (plaintext connections only), with librdkafka kept as the group's member
    /// and committer ([`fetch`]); `librdkafka`, librdkafka's own fetch; `auto`, `native` unless
    /// `properties` set a `security.protocol` other than `plaintext`. Default `auto`.
    #[serde(default)]
    pub fetch: KafkaFetch,
    /// End the source after no message arrived for this long (bounded runs and tests);
    /// absent: run until stopped.
    #[serde(default)]
    pub stop_when_idle: Option<Duration>,
    /// Any librdkafka consumer property (`security.protocol`, `sasl.*`, `ssl.*`, …); use
    /// `${VAR}` for secrets.
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
    /// Set by the runtime for one task of `runtime.tasks: partition`: this copy of the source
    /// reads partition `task` of every topic that has it, assigned by hand (the process's
    /// member of the group decides which tasks it runs), and commits as a consumer outside
    /// the group's membership.
    #[serde(skip)]
    pub(crate) task: Option<i32>,
}

/// How a Kafka source fetches (`fetch:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaFetch {
    /// `native` where the connection is plaintext, else `librdkafka`.
    #[default]
    Auto,
    /// The source's own Fetch requests.
    Native,
    /// librdkafka's fetch.
    Librdkafka,
}

impl KafkaSourceConfig {
    /// Whether this source fetches natively; an error for `fetch: native` on a connection it
    /// cannot make (TLS or SASL).
    pub fn native_fetch(&self) -> Result<bool, String> {
        let protocol = self.properties.get("security.protocol").map(|v| v.as_str().to_ascii_lowercase());
        let plaintext = protocol.as_deref().is_none_or(|p| p == "plaintext");
        match self.fetch {
            KafkaFetch::Librdkafka => Ok(false),
            KafkaFetch::Auto => Ok(plaintext),
            KafkaFetch::Native if plaintext => Ok(true),
            KafkaFetch::Native => Err(format!(
                "`fetch: native` makes plaintext connections only, and `security.protocol` is {}: \
                 use `fetch: librdkafka` (or `auto`)",
                protocol.unwrap_or_default()
            )),
        }
    }

    /// `commit_timeout`, which must be above zero and under half of `max.poll.interval.ms`
    /// (a revocation may wait for an earlier commit and then its own, without polling).
    pub fn commit_wait(&self) -> Result<std::time::Duration, String> {
        let wait = self.commit_timeout.to_std();
        let max_poll = match self.properties.get("max.poll.interval.ms") {
            Some(v) => v.as_str().trim().parse::<u64>().map_err(|_| {
                format!("`max.poll.interval.ms` must be a number of milliseconds, not {:?}", v.as_str())
            })?,
            None => 300_000,
        };
        if wait.is_zero() {
            return Err("`commit_timeout` must be above zero (a commit needs time for the coordinator's answer)".into());
        }
        if wait.as_millis() * 2 >= u128::from(max_poll) {
            return Err(format!(
                "`commit_timeout` ({}) must be under half of `max.poll.interval.ms` ({max_poll} ms): a revocation \
                 may wait for an earlier commit and then its own without polling, and past max.poll.interval.ms \
                 librdkafka leaves the group",
                self.commit_timeout
            ));
        }
        Ok(wait)
    }
}

/// Consumer properties about joining a group, which a task's consumer (assigned by hand, never
/// a member) leaves to the process's member: `group.instance.id` there keeps the tasks with a
/// restarted pod.
pub(crate) const MEMBERSHIP_PROPERTIES: &[&str] = &[
    "group.instance.id",
    "group.protocol",
    "group.remote.assignor",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
];

impl KafkaSourceConfig {
    /// How the topic of `kind` is keyed, if declared.
    pub fn key(&self, kind: EventKind) -> Option<&KeySpec> {
        match kind {
            EventKind::Traffic => self.keys.traffic.as_ref(),
            EventKind::Camera => self.keys.camera.as_ref(),
            EventKind::Environment => self.keys.environment.as_ref(),
        }
    }

    /// The topic of `kind`, if consumed.
    pub fn topic(&self, kind: EventKind) -> Option<&str> {
        match kind {
            EventKind::Traffic => self.topics.traffic.as_deref(),
            EventKind::Camera => self.topics.camera.as_deref(),
            EventKind::Environment => self.topics.environment.as_deref(),
        }
    }
}

/// A client config with `bootstrap.servers` and the pass-through properties.
pub(crate) fn client_config(brokers: &EnvString, properties: &BTreeMap<String, EnvString>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers.as_str());
    for (k, v) in properties {
        c.set(k, v.as_str());
    }
    c
}

/// A producer's client config: `client_config` plus `enable.idempotence=true`,
/// `compression.type=zstd`, `linger.ms=10` and the Java client's partitioner
/// ([`partition::PARTITIONER`]), each unless `properties` sets it.
pub(crate) fn producer_config(brokers: &EnvString, properties: &BTreeMap<String, EnvString>) -> ClientConfig {
    let mut cc = client_config(brokers, properties);
    for (k, v) in
        [("enable.idempotence", "true"), ("compression.type", "zstd"), ("linger.ms", "10"), partition::PARTITIONER]
    {
        if !properties.contains_key(k) {
            cc.set(k, v);
        }
    }
    cc
}

/// Produces simulator messages into their kind's topic, keyed as `deploy/kafka.yaml`'s `keys`
/// say (traffic by corridor, cameras by zone, stations by id: co-partitioning), with the event
/// time as the message timestamp. Used by `citystream simulate --kafka` and the tests.
pub mod produce {
    use std::time::Duration as StdDuration;

    use rdkafka::error::KafkaError;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    use crate::simulator::{SimReport, Simulation, SimulatorConfig};

    /// Why producing the simulation failed.
    #[derive(Debug, thiserror::Error)]
    pub enum ProduceError {
        /// The producer could not be created or flushed.
        #[error("kafka producer: {0}")]
        Producer(#[from] KafkaError),
        /// A message could not be queued.
        #[error("producing to {topic}: {source}")]
        Queue {
            /// The topic.
            topic: String,
            /// Why.
            source: KafkaError,
        },
        /// The broker did not acknowledge a message (after librdkafka's retries).
        #[error("delivery failed: {0}")]
        Delivery(KafkaError),
        /// The producer's broker watch could not be started.
        #[error("starting the producer's broker watch: {0}")]
        Watch(#[from] std::io::Error),
    }

    /// Waits for the broker's acknowledgement of one message.
    async fn delivered(f: rdkafka::producer::DeliveryFuture) -> Result<(), ProduceError> {
        match f.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(ProduceError::Delivery(e)),
            Err(_) => Err(ProduceError::Delivery(KafkaError::Canceled)),
        }
    }

    /// Runs the simulator into Kafka. `rate` paces messages per second (`None`: as fast as
    /// possible). Returns the simulator's account and the number of messages produced.
    pub async fn simulate_into(
        brokers: &str,
        cfg: SimulatorConfig,
        topics: &crate::kafka::KafkaTopics,
        rate: Option<std::num::NonZeroU32>,
    ) -> Result<(SimReport, u64), ProduceError> {
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("compression.type", "zstd")
            .set(super::partition::PARTITIONER.0, super::partition::PARTITIONER.1)
            .set("linger.ms", "20")
            .set("batch.size", "1000000")
            .set("message.timeout.ms", "120000")
            .create()?;
        // it may run for days, paced (see `rebootstrap`)
        let _rebootstrap =
            super::rebootstrap::RebootstrapThread::start("the simulator's producer", producer.clone(), |p| {
                rdkafka::producer::Producer::client(p).native_ptr()
            })?;
        let limiter = rate.map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r)));
        let mut sim = Simulation::new(cfg, chrono::Utc::now().timestamp_millis());
        let mut step = Vec::new();
        let mut inflight = Vec::with_capacity(4096);
        let mut produced = 0u64;
        // the event time is the message timestamp when the payload has one we can read
        let ts_of = |payload: &[u8], fallback: i64| -> i64 { event_time(payload).unwrap_or(fallback) };
        while sim.step(&mut step) {
            for m in step.drain(..) {
                let Some(topic) = topics_for(topics, m.kind) else { continue };
                if let Some(l) = &limiter {
                    l.until_ready().await;
                }
                let ts = ts_of(&m.payload, m.arrival_ms);
                let record = FutureRecord::to(topic).key(m.key.as_bytes()).payload(&m.payload).timestamp(ts);
                let fut = producer
                    .send_result(record)
                    .map_err(|(source, _)| ProduceError::Queue { topic: topic.to_owned(), source })?;
                inflight.push(fut);
                produced += 1;
                if inflight.len() >= 4096 {
                    for f in inflight.drain(..) {
                        delivered(f).await?;
                    }
                }
            }
        }
        for f in inflight.drain(..) {
            delivered(f).await?;
        }
        rdkafka::producer::Producer::flush(&producer, StdDuration::from_secs(60))?;
        Ok((sim.report(), produced))
    }

    /// The `ts` of a JSON event (UTC ms, or RFC 3339 text), if it has a readable one.
    pub fn event_time(payload: &[u8]) -> Option<i64> {
        serde_json::from_slice::<serde_json::Value>(payload).ok().and_then(|v| match &v["ts"] {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis()),
            _ => None,
        })
    }

    fn topics_for(t: &crate::kafka::KafkaTopics, kind: citystream_schemas::EventKind) -> Option<&str> {
        match kind {
            citystream_schemas::EventKind::Traffic => t.traffic.as_deref(),
            citystream_schemas::EventKind::Camera => t.camera.as_deref(),
            citystream_schemas::EventKind::Environment => t.environment.as_deref(),
        }
    }
}

/// Why topics could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    /// The admin client failed, or the broker did not answer.
    #[error("kafka admin: {0}")]
    Admin(#[from] rdkafka::error::KafkaError),
    /// The broker refused to create a topic.
    #[error("creating topic {topic}: {code}")]
    Create {
        /// The topic.
        topic: String,
        /// The broker's answer.
        code: rdkafka::types::RDKafkaErrorCode,
    },
}

/// The suite's broker for the tests that need one (`CITYSTREAM_KAFKA_BROKERS`, as the Kafka
/// tests; `127.0.0.1:9092` without it); panics, saying so, when none answers there.
#[cfg(test)]
pub(crate) fn test_brokers() -> String {
    let brokers = std::env::var("CITYSTREAM_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let reachable = brokers
        .split(',')
        .filter_map(|b| std::net::ToSocketAddrs::to_socket_addrs(b).ok()?.next())
        .any(|addr| std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).is_ok());
    assert!(reachable, "needs a Kafka broker at {brokers} (CITYSTREAM_KAFKA_BROKERS; scripts/test.sh starts one)");
    brokers
}

/// Creates those of `topics` that do not exist on `brokers` (`partitions` each, replication 1
/// unless `replication` says otherwise); those also in `keep` keep every message
/// (`retention.ms` and `retention.bytes` -1), and one of them that exists with a finite
/// retention is warned about.
/// Returns (created, already there).
pub async fn ensure_topics(
    brokers: &str,
    topics: &std::collections::BTreeSet<String>,
    keep: &std::collections::BTreeSet<String>,
    partitions: i32,
    replication: i32,
) -> Result<(Vec<String>, Vec<String>), TopicsError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let meta = admin.inner().fetch_metadata(None, std::time::Duration::from_secs(15))?;
    let existing: std::collections::BTreeSet<&str> = meta.topics().iter().map(|t| t.name()).collect();
    let (have, missing): (Vec<&String>, Vec<&String>) = topics.iter().partition(|t| existing.contains(t.as_str()));
    let new: Vec<NewTopic> = missing
        .iter()
        .map(|t| {
            let topic = NewTopic::new(t, partitions, TopicReplication::Fixed(replication));
            if keep.contains(*t) { topic.set("retention.ms", "-1").set("retention.bytes", "-1") } else { topic }
        })
        .collect();
    warn_finite_retention(&admin, have.iter().filter(|t| keep.contains(**t)).map(|t| t.as_str())).await;
    let mut created = Vec::new();
    if !new.is_empty() {
        for r in admin.create_topics(&new, &AdminOptions::new()).await? {
            match r {
                Ok(t) => created.push(t),
                Err((t, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::info!(topic = %t, "created meanwhile by someone else");
                }
                Err((topic, code)) => return Err(TopicsError::Create { topic, code }),
            }
        }
    }
    Ok((created, have.into_iter().cloned().collect()))
}

/// Warns about each of `topics` whose messages expire (a control center's book, rebuilt from
/// it, would lose what expired).
async fn warn_finite_retention<'a>(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topics: impl Iterator<Item = &'a str>,
) {
    use rdkafka::admin::{AdminOptions, ResourceSpecifier};
    let specs: Vec<ResourceSpecifier> = topics.map(ResourceSpecifier::Topic).collect();
    if specs.is_empty() {
        return;
    }
    let Ok(results) = admin.describe_configs(&specs, &AdminOptions::new()).await else { return };
    for r in results.into_iter().flatten() {
        let value = |name: &str| r.get(name).and_then(|e| e.value.clone()).unwrap_or_default();
        let (ms, bytes) = (value("retention.ms"), value("retention.bytes"));
        if let rdkafka::admin::OwnedResourceSpecifier::Topic(t) = &r.specifier
            && (ms != "-1" || bytes != "-1")
        {
            tracing::warn!(
                topic = %t,
                retention_ms = %ms,
                retention_bytes = %bytes,
                "a control center rebuilds its book from this topic, which drops old messages: keep them all \
                 (kafka-configs.sh --alter --entity-type topics --entity-name {t} --add-config \
                 retention.ms=-1,retention.bytes=-1)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(extra: &str) -> KafkaSourceConfig {
        serde_saphyr::from_str(&format!("brokers: 127.0.0.1:9092\n{extra}")).unwrap()
    }

    #[test]
    fn auto_fetches_natively_on_plaintext_only_and_native_refuses_tls() {
        assert_eq!(source("").fetch, KafkaFetch::Auto);
        assert_eq!(source("").native_fetch(), Ok(true));
        assert_eq!(source("properties: {security.protocol: PLAINTEXT}").native_fetch(), Ok(true));
        assert_eq!(source("properties: {security.protocol: SASL_SSL}").native_fetch(), Ok(false));
        assert_eq!(source("fetch: librdkafka").native_fetch(), Ok(false));
        assert_eq!(source("").commit_wait(), Ok(std::time::Duration::from_secs(10)));
        assert_eq!(source("commit_timeout: 2s").commit_wait(), Ok(std::time::Duration::from_secs(2)));
        assert!(source("commit_timeout: 0s").commit_wait().unwrap_err().contains("above zero"));
        let e = source("commit_timeout: 10s\nproperties: {max.poll.interval.ms: \"12000\"}").commit_wait().unwrap_err();
        assert!(e.contains("under half of `max.poll.interval.ms` (12000 ms)"), "{e}");
        assert_eq!(
            source("commit_timeout: 2s\nproperties: {max.poll.interval.ms: \"12000\"}").commit_wait(),
            Ok(std::time::Duration::from_secs(2))
        );
        let e = source("fetch: native\nproperties: {security.protocol: ssl}").native_fetch().unwrap_err();
        assert!(e.contains("plaintext") && e.contains("fetch: librdkafka"), "{e}");
        assert!(serde_saphyr::from_str::<KafkaSourceConfig>("brokers: b\nfetch: fast\n").is_err());
    }
}
