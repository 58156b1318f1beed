//! The bootstrap servers given to librdkafka again when it has forgotten every broker.
//!
//! Since 2.10, librdkafka drops a broker that a metadata answer leaves out, and a KRaft cluster
//! leaves out a broker its controller has fenced: one that stood still for longer than
//! `broker.session.timeout.ms` (9 s by default: a stopped process, a frozen machine) answers
//! metadata again before it is unfenced, naming no broker. A client of a one-broker cluster then
//! knows no broker at all. It sends no request: no metadata ask ("no usable brokers"), no
//! coordinator lookup, so the group's commits and heartbeats wait. Its own re-bootstrap
//! (KIP-899) did not start in our runs (librdkafka 2.12.1, `tests/tests/kafka_outage.rs`'s stall
//! on a broker with some history: a commit stayed unanswered for over 100 s after the broker
//! came back, until the run ended). The source looks once a second at how many brokers
//! librdkafka has learned, and once it has known none for [`AFTER`], adds the bootstrap servers
//! again (`rd_kafka_brokers_add`): librdkafka connects to one, and learns the cluster from it.

use std::ffi::CString;
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;

/// How long librdkafka may know no broker, having known one, before the bootstrap servers
/// are added again; and how long after that before they may be added again.
const AFTER: Duration = Duration::from_secs(3);
const AGAIN_AFTER: Duration = Duration::from_secs(30);

/// Watches librdkafka's learned brokers (see the module's doc).
pub(super) struct Rebootstrap {
    /// `bootstrap.servers`, for `rd_kafka_brokers_add`.
    servers: CString,
    /// librdkafka has learned a broker once (before, it is bootstrapping: nothing to do).
    learned_once: bool,
    /// Since when librdkafka has known no broker.
    without_since: Option<Instant>,
    /// When the servers were last added again.
    added_at: Option<Instant>,
}

impl Rebootstrap {
    /// Watches for `servers` (`bootstrap.servers`, which librdkafka took: no NUL byte).
    pub(super) fn new(servers: &str) -> Self {
        let servers = CString::new(servers).unwrap_or_default();
        Rebootstrap { servers, learned_once: false, without_since: None, added_at: None }
    }

    /// Looks at the brokers consumer `client` (`BaseConsumer::client().native_ptr()`) has
    /// learned; once it has known none for [`AFTER`], having known one, adds the bootstrap
    /// servers again (at most once per [`AGAIN_AFTER`]). Returns whether it did.
    pub(super) fn check(&mut self, client: *mut rd::rd_kafka_t) -> bool {
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
        self.added_at = Some(Instant::now());
        // SAFETY: a live client; librdkafka copies the NUL-terminated list (and keeps a copy
        // for its own re-bootstrap: one per call, hence the rate)
        unsafe { rd::rd_kafka_brokers_add(client, self.servers.as_ptr()) };
        true
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
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};

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
        let mut watch = Rebootstrap::new(&address);
        assert!(!watch.check(client));
        watch.without_since = Some(Instant::now() - AFTER);
        assert!(!watch.check(client), "bootstrapping: nothing to do");
        // as after a metadata answer that named no broker
        watch.learned_once = true;
        watch.without_since = Some(Instant::now());
        assert!(!watch.check(client), "not before AFTER");
        watch.without_since = Some(Instant::now() - AFTER);
        assert!(watch.check(client), "added again");
        assert!(!watch.check(client), "not again before AGAIN_AFTER");
        watch.added_at = Some(Instant::now() - AGAIN_AFTER);
        assert!(watch.check(client), "again after AGAIN_AFTER");
    }
}
