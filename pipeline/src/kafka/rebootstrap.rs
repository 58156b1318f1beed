//! The bootstrap servers given to librdkafka again when it has forgotten every broker.
//!
//! Since 2.10, librdkafka drops a broker that a metadata answer leaves out, and a KRaft cluster
//! leaves out a broker its controller has fenced: one that stood still for longer than
//! `broker.session.timeout.ms` (9 s by default: a stopped process, a frozen machine) answers
//! metadata again before it is unfenced, naming no broker. A client of a one-broker cluster then
//! knows no broker at all. It sends no request: no metadata ask ("no usable brokers"), no
//! coordinator lookup, no produce, so a group's commits and heartbeats and a producer's
//! deliveries wait. Its own re-bootstrap (KIP-899, librdkafka 2.12.1) starts at once only when
//! the forgotten broker's going down is counted as every broker down, which races with the
//! broker's removal (the tests below reproduce the state with a stand-in broker); otherwise its
//! timer (`metadata.recovery.rebootstrap.trigger.ms`, 5 minutes) starts when a metadata request
//! is sent with none answered since, and with no broker none is sent. In
//! `tests/tests/kafka_outage.rs`'s stall on a broker with some history, a commit stayed
//! unanswered for over 100 s after the broker came back, until the run ended. Every long-lived
//! client of the pipeline is watched: once a second, how many brokers librdkafka has learned is
//! looked at, and once it has known none for [`AFTER`], the bootstrap servers are added again
//! (`rd_kafka_brokers_add`): librdkafka connects to one, and learns the cluster from it.
//!
//! A client served by a loop of ours (a consumer's poll) calls [`Rebootstrap::keep_known`] in
//! it; one that is not (a producer, whose deliveries librdkafka's own thread serves) is watched by
//! a [`RebootstrapThread`].

use std::ffi::CString;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;

/// How long librdkafka may know no broker, having known one, before the bootstrap servers
/// are added again; and how long after that before they may be added again.
const AFTER: Duration = Duration::from_secs(3);
const AGAIN_AFTER: Duration = Duration::from_secs(30);
/// How often the learned brokers are looked at.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Watches librdkafka's learned brokers (see the module's doc).
pub(crate) struct Rebootstrap {
    /// Who the client is, for the warning.
    who: String,
    /// The client's `bootstrap.servers`, for `rd_kafka_brokers_add` (read from the client the
    /// first time they are needed).
    servers: Option<CString>,
    /// When the brokers were last looked at.
    looked_at: Option<Instant>,
    /// librdkafka has learned a broker once (before, it is bootstrapping: nothing to do).
    learned_once: bool,
    /// Since when librdkafka has known no broker.
    without_since: Option<Instant>,
    /// When the servers were last added again.
    added_at: Option<Instant>,
    /// How many times they were.
    times_added: Arc<AtomicU32>,
}

impl Rebootstrap {
    /// Watches the client `who` (a source's name, "the alert sink `alerts`"), named in the
    /// warning.
    pub(crate) fn new(who: impl Into<String>) -> Self {
        Rebootstrap {
            who: who.into(),
            servers: None,
            looked_at: None,
            learned_once: false,
            without_since: None,
            added_at: None,
            times_added: Arc::default(),
        }
    }

    /// [`Self::check`], with a warning when the servers were added again. Cheap enough for
    /// every round of a poll loop: it looks at most once per [`LOOK_EVERY`].
    pub(crate) fn keep_known(&mut self, client: *mut rd::rd_kafka_t) {
        if self.looked_at.is_some_and(|at| at.elapsed() < LOOK_EVERY) {
            return;
        }
        self.looked_at = Some(Instant::now());
        if self.check(client) {
            tracing::warn!(
                client = self.who,
                times = self.times_added.load(Ordering::Relaxed),
                "librdkafka knew no broker (a metadata answer named none, as a KRaft cluster does while a \
                 broker is fenced): its bootstrap servers were added again"
            );
        }
    }

    /// Looks at the brokers `client` (`client().native_ptr()`) has learned; once it has known
    /// none for [`AFTER`], having known one, adds the bootstrap servers again (at most once per
    /// [`AGAIN_AFTER`]). Returns whether it did.
    fn check(&mut self, client: *mut rd::rd_kafka_t) -> bool {
        if client.is_null() {
            return false;
        }
        if learned_brokers(client) > 0 {
            self.learned_once = true;
            self.without_since = None;
            return false;
        }
        let since = *self.without_since.get_or_insert_with(Instant::now);
        if !self.learned_once || since.elapsed() < AFTER || self.added_at.is_some_and(|at| at.elapsed() < AGAIN_AFTER) {
            return false;
        }
        if self.servers.is_none() {
            self.servers = bootstrap_servers(client);
        }
        let Some(servers) = &self.servers else { return false };
        self.added_at = Some(Instant::now());
        self.times_added.fetch_add(1, Ordering::Relaxed);
        // SAFETY: a live client; librdkafka copies the NUL-terminated list (and keeps a copy
        // for its own re-bootstrap: one per call, hence the rate)
        unsafe { rd::rd_kafka_brokers_add(client, servers.as_ptr()) };
        true
    }
}

/// A [`Rebootstrap`] on a thread of its own, for a client no loop of ours serves. The thread
/// holds `holder` (a clone of the producer: it keeps the client alive) until this is dropped,
/// which stops and joins it: declare it before the producer's field, so that the producer is
/// dropped last, where its owner drops it.
pub(crate) struct RebootstrapThread {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    #[cfg(test)]
    times_added: Arc<AtomicU32>,
}

impl RebootstrapThread {
    /// Watches the client `client(&holder)` (see [`Rebootstrap::new`] for `who`).
    pub(crate) fn start<T: Send + 'static>(
        who: impl Into<String>,
        holder: T,
        client: fn(&T) -> *mut rd::rd_kafka_t,
    ) -> std::io::Result<Self> {
        let mut watch = Rebootstrap::new(who);
        #[cfg(test)]
        let times_added = watch.times_added.clone();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("rebootstrap".into()).spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(LOOK_EVERY) {
                watch.keep_known(client(&holder));
            }
        })?;
        Ok(RebootstrapThread {
            stop: Some(stop),
            thread: Some(thread),
            #[cfg(test)]
            times_added,
        })
    }

    /// How many times the bootstrap servers were added again.
    #[cfg(test)]
    fn times_added(&self) -> u32 {
        self.times_added.load(Ordering::Relaxed)
    }
}

impl Drop for RebootstrapThread {
    fn drop(&mut self) {
        // the thread sees the channel closed at once
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client's `bootstrap.servers`, as its configuration ended up (a property may have set
/// it); `None` if librdkafka gives none.
fn bootstrap_servers(client: *mut rd::rd_kafka_t) -> Option<CString> {
    let name = c"bootstrap.servers";
    let mut size = 0usize;
    // SAFETY: a live client, whose configuration lives as long as it; librdkafka writes at
    // most `size` bytes, NUL included, after telling the size needed
    unsafe {
        let conf = rd::rd_kafka_conf(client);
        if conf.is_null()
            || rd::rd_kafka_conf_get(conf, name.as_ptr(), std::ptr::null_mut(), &mut size)
                != rd::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK
        {
            return None;
        }
        let mut buffer = vec![0 as std::ffi::c_char; size.max(1)];
        if rd::rd_kafka_conf_get(conf, name.as_ptr(), buffer.as_mut_ptr(), &mut size)
            != rd::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK
        {
            return None;
        }
        let servers = std::ffi::CStr::from_ptr(buffer.as_ptr()).to_owned();
        (!servers.is_empty()).then_some(servers)
    }
}

/// How many brokers librdkafka has learned from metadata (bootstrap servers not counted).
fn learned_brokers(client: *mut rd::rd_kafka_t) -> usize {
    let mut count = 0usize;
    // SAFETY: a live client; the returned array is malloc'ed for us and freed here
    unsafe {
        let ids = rd::rd_kafka_brokers_learned_ids(client, &mut count);
        if !ids.is_null() {
            rd::rd_kafka_mem_free(client, ids.cast());
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::fenced_broker::{FencedBroker, NODE_ID, TOPIC};
    use rdkafka::ClientConfig;
    use rdkafka::client::{Client, ClientContext};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{FutureProducer, Producer};

    /// A client whose bootstrap server never answers learns no broker: while it is
    /// bootstrapping nothing is done; once it has known a broker, and none for [`AFTER`], the
    /// servers are added again, at most once per [`AGAIN_AFTER`].
    #[test]
    fn the_bootstrap_servers_are_added_again_once_every_learned_broker_is_forgotten() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = silent.local_addr().unwrap().to_string();
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &address).create().unwrap();
        let client = consumer.client().native_ptr();
        assert_eq!(learned_brokers(client), 0);
        let mut watch = Rebootstrap::new("test");
        assert!(!watch.check(client));
        watch.without_since = Some(Instant::now() - AFTER);
        assert!(!watch.check(client), "bootstrapping: nothing to do");
        // as after a metadata answer that named no broker
        watch.learned_once = true;
        watch.without_since = Some(Instant::now());
        assert!(!watch.check(client), "not before AFTER");
        watch.without_since = Some(Instant::now() - AFTER);
        assert!(watch.check(client), "added again");
        assert_eq!(watch.servers.as_deref(), Some(CString::new(address.clone()).unwrap().as_c_str()));
        assert!(!watch.check(client), "not again before AGAIN_AFTER");
        watch.added_at = Some(Instant::now() - AGAIN_AFTER);
        assert!(watch.check(client), "again after AGAIN_AFTER");
    }

    /// Whether `f` holds within `limit`, looking every 50 ms.
    fn within(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        f()
    }

    /// Brings `client` to the state a fenced KRaft broker leaves it in: it learns `broker`, is
    /// answered a metadata naming no broker, and forgets it (and its bootstrap server). The
    /// broker answers normally again afterwards.
    fn forget_the_only_broker<C: ClientContext>(broker: &FencedBroker, client: &Client<C>) {
        let ask = Duration::from_secs(5);
        client.fetch_metadata(None, ask).expect("the stand-in broker's metadata");
        assert!(within(ask, || learned_brokers(client.native_ptr()) == 1), "the broker is learned");
        // as a client that has run for a while: a watch (looking once a second) has seen it
        std::thread::sleep(LOOK_EVERY + Duration::from_millis(300));
        broker.set_fenced(true);
        let fenced = client.fetch_metadata(Some(TOPIC), ask).expect("the fenced broker's metadata");
        assert!(fenced.brokers().is_empty() && fenced.topics()[0].partitions()[0].leader() == -1);
        assert!(within(ask, || learned_brokers(client.native_ptr()) == 0), "the broker is forgotten");
        broker.set_fenced(false);
    }

    /// A producer of `broker` brought to the forgotten-broker state, watched or not; then, once
    /// a watch has had its time, whether it knows its broker again. librdkafka's own
    /// re-bootstrap is off (`metadata.recovery.strategy: none`): whether it starts is a race (a
    /// broker's "all brokers down" count against its decommission; here it started in each of
    /// ten such clients run alone, and in 7 or 8 of ten run beside ten others), and these
    /// tests are about what the watch does.
    fn forgotten_broker(broker: &FencedBroker, watched: bool) -> (bool, Option<RebootstrapThread>, FutureProducer) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.address())
            .set("metadata.recovery.strategy", "none")
            .create()
            .unwrap();
        let watch =
            watched.then(|| RebootstrapThread::start("test", producer.clone(), |p| p.client().native_ptr()).unwrap());
        forget_the_only_broker(broker, producer.client());
        let client = producer.client().native_ptr();
        let known = within(AFTER + 5 * LOOK_EVERY, || learned_brokers(client) == 1);
        if known {
            // it is led to the partition again
            let md = producer.client().fetch_metadata(Some(TOPIC), Duration::from_secs(5)).unwrap();
            assert_eq!(md.topics()[0].partitions()[0].leader(), NODE_ID);
        } else {
            let ask = producer.client().fetch_metadata(Some(TOPIC), Duration::from_secs(1));
            assert!(ask.is_err(), "no broker to ask, but {:?}", ask.map(|m| m.brokers().len()));
        }
        (known, watch, producer)
    }

    /// The state the watch is for, reproduced: with no watch, a client that forgot its only
    /// broker stays without one, asking nothing more though the broker answers again. (A
    /// polled client: librdkafka lets a forgotten broker go once the application has taken its
    /// events, and a future producer's thread takes them.)
    #[test]
    fn without_a_watch_a_client_that_forgot_its_only_broker_knows_none_for_good() {
        let broker = FencedBroker::start();
        let (known, _, _) = forgotten_broker(&broker, false);
        assert!(!known);
    }

    /// With a watch on a thread of its own, as the pipeline's producers have, the client is
    /// given its bootstrap server again and learns the broker, which leads the partition again.
    #[test]
    fn a_watched_producer_that_forgot_its_only_broker_learns_it_again() {
        let broker = FencedBroker::start();
        let (known, watch, _producer) = forgotten_broker(&broker, true);
        let watch = watch.unwrap();
        assert!(known, "the broker is learned again");
        assert_eq!(watch.times_added(), 1);
        // dropping the watch stops its thread at once
        let t0 = Instant::now();
        drop(watch);
        assert!(t0.elapsed() < LOOK_EVERY);
    }
}
