//! The Kafka source's own fetch path (`fetch: native`): Fetch requests to each partition
//! leader on a connection of our own, record batches read straight into the source's raw
//! batches — without librdkafka's op, queue lock and clock reading per message, which cost the
//! source about half of its CPU on a backlog (README, "Benchmarks").
//!
//! librdkafka stays the consumer group's member: it joins, is assigned partitions (and has them
//! revoked), and commits offsets; the source pauses every assigned partition there, so librdkafka
//! fetches nothing, and fetches them here instead ([`Fetcher`]). Leaders are asked of the brokers
//! through librdkafka without waiting ([`leaders`]), again when a partition has none or a broker
//! answers that it no longer leads it; a broker that cannot be reached is tried again with a
//! growing backoff (up to 10 s). A broker's host name is resolved on a thread of its own, and a
//! connect is begun without waiting and finished while responses are awaited (each of the host's
//! addresses in turn, [`CONNECT_TIMEOUT`] each: [`connect`]), so neither a DNS server nor a host
//! that drops packets holds anything else. Requests go to every leader before any response is read,
//! and a round waits no later than its caller's `until`, whatever the number of brokers; a response
//! is read as its bytes come in ([`Incoming`]), so a broker that stops halfway through one holds no
//! other broker's back (it is dropped once no byte has come for [`IO_TIMEOUT`]). Each leader's next
//! request goes out as soon as its response is in, before the source reads it (one request in
//! flight per broker: the broker reads the log while the source works). The source runs a round on
//! its consumer thread, between polls of librdkafka — whose rebalance callbacks run inside those
//! polls — so no fetched data crosses an assignment or a revocation.
//!
//! Plaintext connections only: with `security.protocol` other than `plaintext` the source keeps
//! librdkafka's fetch. [`wire`] has the protocol.

mod connect;
mod leaders;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

use connect::{Resolution, Resolver, connect_next, ready_for_io};
use leaders::LeaderAsk;

pub use wire::{Decoders, FetchLimits, PartitionData, Record, RecordSet, WireError};

/// A topic partition.
pub type Tp = (String, i32);

/// What one request asks of a broker: (topic, partition, offset), a topic's partitions
/// together.
type Request<'a> = Vec<(&'a str, i32, i64)>;

/// How long a connection waits for a response beyond the fetch's own wait, and for a write.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait before a broker that could not be reached is tried again; doubled up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Metadata is asked again at most this often (after the last ask ended).
const METADATA_EVERY: Duration = Duration::from_millis(500);

/// Error codes after which the partition's leader is looked up again.
const LEADER_ERRORS: &[i16] = &[
    3,   // UNKNOWN_TOPIC_OR_PARTITION
    5,   // LEADER_NOT_AVAILABLE
    6,   // NOT_LEADER_OR_FOLLOWER
    9,   // REPLICA_NOT_AVAILABLE
    56,  // KAFKA_STORAGE_ERROR
    74,  // FENCED_LEADER_EPOCH
    75,  // UNKNOWN_LEADER_EPOCH
    100, // UNKNOWN_TOPIC_ID
];
/// OFFSET_OUT_OF_RANGE: the position is before the log start (retention) or past its end.
pub const OFFSET_OUT_OF_RANGE: i16 = 1;

/// One broker connection.
struct Conn {
    stream: TcpStream,
    /// Its connect is under way (non-blocking: a broker host that drops packets holds no
    /// round); nothing has been written yet.
    connecting: bool,
    /// The host's addresses not tried yet in this connect, next last: one that fails is
    /// followed at once by the next, as a blocking connect would try them.
    untried: Vec<SocketAddr>,
    /// `request` holds a request that goes out once connected.
    pending: bool,
    correlation: i32,
    request: Vec<u8>,
    /// The response to the request in flight, as far as it has come in.
    incoming: Incoming,
}

/// A response as far as it has come in: its 4-byte length, then its body (the correlation id
/// first). Read without waiting, whatever the socket has, so a broker that stops halfway
/// through a response holds up no other broker's (it is dropped once no byte has come for
/// [`IO_TIMEOUT`]: time since its last byte, so neither a slow link nor the source's own busy
/// time between rounds, with the broker waiting on a full socket buffer, counts against it).
#[derive(Default)]
struct Incoming {
    length: [u8; 4],
    length_read: usize,
    body: Vec<u8>,
    body_read: usize,
    /// When its last bytes came in; `None` before its first.
    progress_at: Option<Instant>,
}

impl Incoming {
    /// Whether some of a response has come in.
    fn begun(&self) -> bool {
        self.length_read > 0
    }

    /// Reads what `stream` holds now, without waiting: `true` once the whole response is in.
    /// A response longer than a fetch's `max_bytes` and a batch beyond them is an error.
    fn read_available(&mut self, stream: &TcpStream, max_bytes: i32) -> std::io::Result<bool> {
        use std::io::ErrorKind;
        loop {
            let into = if self.length_read < 4 {
                &mut self.length[self.length_read..]
            } else if self.body_read < self.body.len() {
                &mut self.body[self.body_read..]
            } else {
                return Ok(true);
            };
            let n = match recv_now(stream, into) {
                Ok(0) => return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the broker closed the connection")),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.progress_at = Some(Instant::now());
            if self.length_read < 4 {
                self.length_read += n;
                if self.length_read == 4 {
                    let len = checked_length(i32::from_be_bytes(self.length), max_bytes)?;
                    self.body.resize(len, 0);
                    self.body_read = 0;
                }
            } else {
                self.body_read += n;
            }
        }
    }

    /// The whole response's body, taken: the next response starts afresh (give the buffer
    /// back with [`Incoming::reuse`]).
    fn take(&mut self) -> Vec<u8> {
        self.length_read = 0;
        self.body_read = 0;
        self.progress_at = None;
        std::mem::take(&mut self.body)
    }

    /// A taken body's buffer, to read the next response into.
    fn reuse(&mut self, buffer: Vec<u8>) {
        if !self.begun() {
            self.body = buffer;
        }
    }
}

/// Reads into `into` what `stream` holds now (`MSG_DONTWAIT`: the socket stays blocking for
/// writes); `WouldBlock` when it holds nothing.
fn recv_now(stream: &TcpStream, into: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `into` is valid for writes of `into.len()` bytes for the call's duration
    let n = unsafe { libc::recv(stream.as_raw_fd(), into.as_mut_ptr().cast(), into.len(), libc::MSG_DONTWAIT) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// A response's length prefix, checked: at least the correlation id, at most a fetch's
/// `max_bytes` plus a first batch over the limits.
fn checked_length(len: i32, max_bytes: i32) -> std::io::Result<usize> {
    let most = i64::from(max_bytes) + wire::MAX_DECOMPRESSED as i64;
    if len < 4 || i64::from(len) > most {
        return Err(std::io::Error::other(format!("a response of {len} bytes")));
    }
    Ok(len as usize)
}

/// A broker and how it may be reached now.
#[derive(Default)]
struct Broker {
    address: String,
    conn: Option<Conn>,
    /// Its host name being resolved, on a thread of its own ([`connect::addresses`]).
    resolving: Option<Resolution>,
    /// Not tried again before this (after a failure), and the next backoff.
    retry_at: Option<Instant>,
    backoff: Duration,
    in_flight: Option<InFlight>,
}

/// A broker's request in flight (one at a time).
struct InFlight {
    /// What it asked for: partition → offset.
    asked: HashMap<Tp, i64>,
    /// When it is given up on if no response has begun to come in by then (one that has begun
    /// is given up on after [`IO_TIMEOUT`] without a byte: [`Broker::give_up_at`]); while its
    /// connection is being made, when that connect is given up on ([`CONNECT_TIMEOUT`]).
    deadline: Instant,
}

impl Broker {
    /// When its request in flight is given up on: at the request's deadline while no response
    /// has begun, `io_timeout` after the last byte of one that has. `None` with none in flight.
    fn give_up_at(&self, io_timeout: Duration) -> Option<Instant> {
        let deadline = self.in_flight.as_ref()?.deadline;
        Some(match self.conn.as_ref()?.incoming.progress_at {
            Some(at) => at + io_timeout,
            None => deadline,
        })
    }

    /// After a failure: not tried again before a backoff twice the last (200 ms to 10 s).
    fn back_off(&mut self) {
        self.backoff = (self.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + self.backoff);
    }
}

/// What a round of fetches did.
#[derive(Debug, Default)]
pub struct Round {
    /// Partitions fetched (a request reached their leader).
    pub fetched: usize,
    /// Partitions whose position is out of the log's range, with the offset asked for: reset
    /// them (`auto.offset.reset`) if they are still there.
    pub out_of_range: Vec<(Tp, i64)>,
    /// Some request is in flight as the round ends: one not answered by its `until`, one
    /// waiting for its connection, or the next one, sent as a response came in (the next round
    /// waits for it, without asking again).
    pub waiting: bool,
}

/// The connections and leaders of the native fetch path. Drop it before the consumer it asks
/// for leaders on: its ask's librdkafka queue must go before the client.
pub struct Fetcher {
    client_id: String,
    limits: FetchLimits,
    brokers: HashMap<i32, Broker>,
    leaders: HashMap<Tp, i32>,
    /// When the last metadata ask ended, and how long until the next may start:
    /// [`METADATA_EVERY`], doubled (up to [`MAX_BACKOFF`]) after each ask that had no answer.
    metadata_at: Option<Instant>,
    metadata_backoff: Duration,
    /// Some partition has no known leader, or lost it.
    stale: bool,
    /// The leader ask in flight and the broker it went to, the broker that answered the last
    /// ask, and how many asks in a row had no answer.
    leader_ask: Option<(LeaderAsk, Option<i32>)>,
    answered_by: Option<i32>,
    asks_unanswered: usize,
    /// Where the next request starts in its partition list.
    rotation: usize,
    /// [`IO_TIMEOUT`] and [`CONNECT_TIMEOUT`] (shorter in tests).
    io_timeout: Duration,
    connect_timeout: Duration,
    /// Resolves brokers' host names: the system's resolver (a stand-in in tests).
    resolver: Resolver,
}

impl Fetcher {
    /// A fetcher with no connection yet, identifying itself as `client_id`.
    pub fn new(client_id: &str, limits: FetchLimits) -> Self {
        Fetcher {
            client_id: client_id.to_owned(),
            limits,
            brokers: HashMap::new(),
            leaders: HashMap::new(),
            metadata_at: None,
            metadata_backoff: METADATA_EVERY,
            stale: true,
            leader_ask: None,
            answered_by: None,
            asks_unanswered: 0,
            rotation: 0,
            io_timeout: IO_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            resolver: connect::system_resolver,
        }
    }

    /// What its requests ask for.
    pub fn limits(&self) -> FetchLimits {
        self.limits
    }

    /// Takes the answer of the leader ask in flight, if it has come (without waiting); then,
    /// when some partition of `wanted` needs a leader and the last ask ended [`METADATA_EVERY`]
    /// ago (longer after asks without an answer), asks the brokers for the leaders of every
    /// topic of `wanted` and their addresses ([`leaders`]: nothing here waits for a broker).
    /// A leader lost while an ask is in flight is asked for again after its answer.
    fn refresh<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, wanted: &[(Tp, i64)]) {
        if let Some((ask, asked)) = &self.leader_ask {
            let Some(answer) = ask.answer() else { return };
            if answer.is_ok() {
                self.answered_by = *asked;
            }
            self.leader_ask = None;
            self.take_leaders(answer);
        }
        if wanted.iter().any(|(tp, _)| !self.leaders.contains_key(tp)) {
            self.stale = true;
        }
        if !self.stale || self.metadata_at.is_some_and(|at| at.elapsed() < self.metadata_backoff) {
            return;
        }
        let mut topics: Vec<&str> = wanted.iter().map(|(tp, _)| tp.0.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        let whom = self.whom_to_ask();
        match LeaderAsk::send(consumer.client().native_ptr(), &topics, whom) {
            Ok(ask) => {
                // from here on, a lost leader is one the answer may not know of
                self.stale = false;
                self.leader_ask = Some((ask, whom));
            }
            Err(e) => self.take_leaders(Err(e)),
        }
    }

    /// The broker to ask for leaders: among those that lead a partition, are connected and
    /// are not backing off, the one that answered the last ask, or after an ask without an
    /// answer the next of them; `None` (librdkafka's choice: the controller its metadata names)
    /// while there is none.
    fn whom_to_ask(&self) -> Option<i32> {
        let now = Instant::now();
        let mut ids: Vec<i32> = self
            .brokers
            .iter()
            .filter(|(id, b)| {
                b.conn.is_some() && b.retry_at.is_none_or(|at| now >= at) && self.leaders.values().any(|l| l == *id)
            })
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        match self.answered_by {
            Some(id) if self.asks_unanswered == 0 && ids.contains(&id) => Some(id),
            _ => (!ids.is_empty()).then(|| ids[self.asks_unanswered % ids.len()]),
        }
    }

    /// What a leader ask found: each partition's leader (and its address, a changed one
    /// dropping the broker's connection), or none. The next ask waits [`METADATA_EVERY`], or
    /// twice the last wait after an ask without an answer (up to [`MAX_BACKOFF`]); partitions
    /// still without a leader are asked for again then.
    fn take_leaders(&mut self, answer: Result<Vec<leaders::TopicLeaders>, String>) {
        let answered = answer.is_ok();
        let mut complete = answered;
        match answer {
            Err(e) => tracing::warn!("native fetch: reading the partition leaders: {e}"),
            Ok(topics) => {
                for (topic, partitions) in topics {
                    let partitions = match partitions {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(topic, "native fetch: reading the partition leaders: {e}");
                            complete = false;
                            continue;
                        }
                    };
                    for (partition, leader) in partitions {
                        let tp = (topic.clone(), partition);
                        let Some((id, address)) = leader else {
                            self.leaders.remove(&tp);
                            complete = false;
                            continue;
                        };
                        let broker = self.brokers.entry(id).or_default();
                        if broker.address != address {
                            broker.address = address;
                            broker.conn = None;
                            broker.resolving = None;
                            broker.in_flight = None;
                        }
                        self.leaders.insert(tp, id);
                    }
                }
            }
        }
        self.stale |= !complete;
        self.metadata_at = Some(Instant::now());
        self.metadata_backoff =
            if answered { METADATA_EVERY } else { (self.metadata_backoff * 2).clamp(METADATA_EVERY, MAX_BACKOFF) };
        self.asks_unanswered = if answered { 0 } else { self.asks_unanswered + 1 };
    }

    /// How long a response may take: the fetch's wait on the broker, and the I/O timeout.
    fn response_timeout(&self) -> Duration {
        self.io_timeout + Duration::from_millis(self.limits.max_wait_ms.max(0) as u64)
    }

    /// The connection to broker `id`, its connect begun now if need be (`None` while it backs
    /// off, and while its host name is being resolved, on a thread of its own: the connect
    /// begins at the first call after the answer). The connect is finished by
    /// [`Fetcher::ready`] (even one that completed at once: its socket is writable at the next
    /// poll); the one request made meanwhile waits for it (connections are only made by
    /// [`Fetcher::send`], which puts that request in flight: its deadline is the connect's).
    fn conn(&mut self, id: i32) -> Option<&mut Conn> {
        let (resolver, connect_timeout) = (self.resolver, self.connect_timeout);
        let broker = self.brokers.get_mut(&id)?;
        if broker.conn.is_none() {
            if broker.retry_at.is_some_and(|at| Instant::now() < at) {
                return None;
            }
            // a resolution takes as long as a connect may
            let addresses = connect::addresses(&broker.address, &mut broker.resolving, resolver, connect_timeout)?;
            let begun = addresses.and_then(|mut untried| Ok((connect_next(&mut untried)?, untried)));
            match begun {
                Ok((stream, untried)) => {
                    broker.conn = Some(Conn {
                        stream,
                        connecting: true,
                        untried,
                        pending: false,
                        correlation: 0,
                        request: Vec::new(),
                        incoming: Incoming::default(),
                    });
                    broker.retry_at = None;
                }
                Err(e) => {
                    broker.back_off();
                    tracing::warn!(
                        broker = id,
                        address = broker.address,
                        "native fetch: cannot connect: {e}; trying again in {:?}",
                        broker.backoff
                    );
                    self.stale = true;
                    return None;
                }
            }
        }
        broker.conn.as_mut()
    }

    /// Broker `id`'s connect, its socket writable (or in error: `revents`): done, or failed.
    /// Done, the socket is made ready for I/O and the request that waited for it sent, with the
    /// response's deadline from now; a connect that failed goes on to the host's next address
    /// ([`Fetcher::connect_failed`]); a send that failed drops the broker.
    fn finish_connect(&mut self, id: i32, revents: libc::c_short) {
        // a response's timeout is also the socket's read timeout
        let (response_timeout, io_timeout) = (self.response_timeout(), self.io_timeout);
        let Some(conn) = self.brokers.get_mut(&id).and_then(|b| b.conn.as_mut()) else { return };
        let outcome = match conn.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match conn.stream.peer_addr() {
                Ok(_) => Ok(()),
                // an error or hang-up without a socket error: it will not connect
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {
                    if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                        Err(std::io::Error::other("the socket closed while connecting"))
                    } else {
                        // woken early: still connecting
                        return;
                    }
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = outcome {
            self.connect_failed(id, &e.to_string());
            return;
        }
        if let Err(e) = ready_for_io(&conn.stream, response_timeout, io_timeout) {
            self.failed(id, &format!("setting up a connection: {e}"));
            return;
        }
        conn.connecting = false;
        conn.untried.clear();
        let pending = std::mem::take(&mut conn.pending);
        let sent = if pending { conn.stream.write_all(&conn.request) } else { Ok(()) };
        let Some(broker) = self.brokers.get_mut(&id) else { return };
        broker.backoff = Duration::ZERO;
        match sent {
            Ok(()) if pending => {
                if let Some(f) = broker.in_flight.as_mut() {
                    f.deadline = Instant::now() + response_timeout;
                }
            }
            Ok(()) => {}
            Err(e) => self.failed(id, &format!("sending a fetch: {e}")),
        }
    }

    /// A connect to broker `id` that failed (`what`) or did not complete in time: the host's
    /// next address is tried at once, with a deadline of its own, the request still waiting;
    /// after the last, the broker is dropped as after any failure ([`Fetcher::failed`]).
    fn connect_failed(&mut self, id: i32, what: &str) {
        let connect_timeout = self.connect_timeout;
        let Some(broker) = self.brokers.get_mut(&id) else { return };
        let next = match broker.conn.as_mut() {
            Some(conn) if !conn.untried.is_empty() => {
                connect_next(&mut conn.untried).map(|stream| conn.stream = stream)
            }
            _ => Err(std::io::Error::other(what.to_owned())),
        };
        match next {
            Ok(()) => {
                tracing::debug!(broker = id, address = broker.address, "native fetch: {what}; trying its next address");
                if let Some(f) = broker.in_flight.as_mut() {
                    f.deadline = Instant::now() + connect_timeout;
                }
            }
            Err(e) => self.failed(id, &format!("cannot connect: {e}")),
        }
    }

    /// Drops broker `id`'s connection after a failure; it is connected again at the next round
    /// (after a backoff), and the leaders are asked again (the broker may have gone for good).
    fn failed(&mut self, id: i32, what: &str) {
        if let Some(broker) = self.brokers.get_mut(&id) {
            broker.conn = None;
            broker.in_flight = None;
            broker.back_off();
            tracing::warn!(broker = id, address = broker.address, "native fetch: {what}; reconnecting");
        }
        self.stale = true;
    }

    /// Sends a Fetch request for `partitions` to broker `leader` (once connected, when its
    /// connection is still being made); remembers what it asked (one request in flight per
    /// broker).
    fn send(&mut self, leader: i32, partitions: &Request<'_>) {
        let (limits, client_id) = (self.limits, self.client_id.clone());
        // the broker fills a response in the request's order, up to its byte limits: each
        // request starts one partition further on, so none waits behind the others for good
        self.rotation = self.rotation.wrapping_add(1);
        let start = self.rotation % partitions.len().max(1);
        let mut request: Vec<(&str, Vec<(i32, i64)>)> = Vec::with_capacity(partitions.len());
        for &(t, p, offset) in partitions[start..].iter().chain(&partitions[..start]) {
            match request.last_mut() {
                Some((last, ps)) if *last == t => ps.push((p, offset)),
                _ => request.push((t, vec![(p, offset)])),
            }
        }
        let (response_timeout, connect_timeout) = (self.response_timeout(), self.connect_timeout);
        let Some(conn) = self.conn(leader) else { return };
        conn.correlation = conn.correlation.wrapping_add(1);
        wire::encode_fetch(&mut conn.request, conn.correlation, &client_id, limits, &request);
        // while connecting, the request waits (sent once connected: `finish_connect`), and the
        // connect has its own deadline
        let connecting = conn.connecting;
        conn.pending = connecting;
        if !connecting && let Err(e) = conn.stream.write_all(&conn.request) {
            self.failed(leader, &format!("sending a fetch: {e}"));
            return;
        }
        let asked = partitions.iter().map(|&(t, p, o)| ((t.to_owned(), p), o)).collect::<HashMap<Tp, i64>>();
        let deadline = Instant::now() + if connecting { connect_timeout } else { response_timeout };
        if let Some(b) = self.brokers.get_mut(&leader) {
            b.in_flight = Some(InFlight { asked, deadline });
        }
    }

    /// The brokers whose response has (begun to) come in, waiting for the first until the
    /// earliest deadline of a request in flight (the fetch's wait and [`IO_TIMEOUT`] after it was
    /// sent) or `until`, whichever is sooner: a caught-up broker's long poll holds no other
    /// broker's response back, and a broker that does not answer holds the caller no longer than
    /// `until` (its request stays in flight, waited for again at the next call). A broker whose
    /// response has not begun by its request's deadline is dropped (reconnected later, its
    /// leaders asked again) — while other brokers answer too, so that a hung broker's partitions
    /// move on to their new leaders. A connect under way is finished here once its socket is
    /// writable ([`Fetcher::finish_connect`]: its request goes out), or given up on at its
    /// deadline; such a broker is not among those returned.
    fn ready(&mut self, until: Instant) -> Vec<i32> {
        use std::os::fd::AsRawFd;
        // (broker, socket, when given up on, whether connecting)
        let waiting: Vec<(i32, i32, Instant, bool)> = self
            .brokers
            .iter()
            .filter_map(|(id, b)| {
                let conn = b.conn.as_ref()?;
                Some((*id, conn.stream.as_raw_fd(), b.give_up_at(self.io_timeout)?, conn.connecting))
            })
            .collect();
        let Some(first) = waiting.iter().map(|w| w.2).min() else {
            return Vec::new();
        };
        let first = first.min(until);
        // a connect under way is done (or failed) once its socket is writable
        let mut fds: Vec<libc::pollfd> = waiting
            .iter()
            .map(|&(_, fd, _, connecting)| libc::pollfd {
                fd,
                events: if connecting { libc::POLLOUT } else { libc::POLLIN },
                revents: 0,
            })
            .collect();
        // rounded up: a poll that returns before the deadline only waits again (past `until`,
        // it does not wait: what has come in is read)
        let timeout = first.saturating_duration_since(Instant::now()).as_nanos().div_ceil(1_000_000);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the call's duration
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.min(libc::c_int::MAX as u128) as libc::c_int,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // interrupted by a signal: the next round waits again; anything else would fail
            // again at once, so the brokers waited on are dropped (tried again after a backoff)
            if e.kind() != std::io::ErrorKind::Interrupted {
                for &(id, ..) in &waiting {
                    self.failed(id, &format!("waiting for fetch responses: {e}"));
                }
            }
            return Vec::new();
        }
        let now = Instant::now();
        let mut ready = Vec::new();
        for (&(id, _, deadline, connecting), f) in waiting.iter().zip(&fds) {
            if f.revents != 0 && connecting {
                self.finish_connect(id, f.revents);
            } else if f.revents != 0 {
                // an error or hang-up shows when reading
                ready.push(id);
            } else if deadline <= now && connecting {
                self.connect_failed(id, "no connection within the timeout");
            } else if deadline <= now {
                let begun = self.brokers[&id].conn.as_ref().is_some_and(|c| c.incoming.begun());
                self.failed(
                    id,
                    if begun { "a fetch response stalled" } else { "no fetch response within the timeout" },
                );
            }
        }
        ready
    }

    /// The responses that have come in whole, each with its broker and what its request asked:
    /// what has come of each response is read ([`Fetcher::ready`], then [`Incoming`]) until one
    /// is whole, none is on its way (each whole, dropped, or not begun when `ready` stopped
    /// waiting), or `until` has passed (a response begun is read on at the next call). A
    /// broker whose response has not begun by its request's deadline, or has had no byte for
    /// [`IO_TIMEOUT`] since it began, is dropped ([`Broker::give_up_at`]), so one that stops
    /// halfway through a response holds the others up no longer than one that never answers.
    fn responses(&mut self, until: Instant) -> Vec<(i32, HashMap<Tp, i64>, Vec<u8>)> {
        let (max_bytes, io_timeout) = (self.limits.max_bytes, self.io_timeout);
        let mut whole = Vec::new();
        loop {
            for leader in self.ready(until) {
                let step = {
                    let Some(broker) = self.brokers.get_mut(&leader) else { continue };
                    let Some(conn) = broker.conn.as_mut() else { continue };
                    match conn.incoming.read_available(&conn.stream, max_bytes) {
                        Ok(true) => {
                            let body = conn.incoming.take();
                            match check_correlation(&body, conn.correlation) {
                                Ok(()) => {
                                    Ok(Some((broker.in_flight.take().map(|f| f.asked).unwrap_or_default(), body)))
                                }
                                Err(e) => Err(format!("reading a fetch response: {e}")),
                            }
                        }
                        Ok(false) if broker.give_up_at(io_timeout).is_some_and(|at| at <= Instant::now()) => {
                            Err("a fetch response stalled".to_owned())
                        }
                        Ok(false) => Ok(None),
                        Err(e) => Err(format!("reading a fetch response: {e}")),
                    }
                };
                match step {
                    Ok(Some((asked, body))) => whole.push((leader, asked, body)),
                    Ok(None) => {}
                    Err(what) => self.failed(leader, &what),
                }
            }
            let coming = self
                .brokers
                .values()
                .any(|b| b.in_flight.is_some() && b.conn.as_ref().is_some_and(|c| c.incoming.begun()));
            if !whole.is_empty() || !coming || Instant::now() >= until {
                return whole;
            }
        }
    }

    /// A handed-on response's buffer back to broker `leader`'s connection, to read its next
    /// response into (one buffer per connection: a response allocates only when it is larger),
    /// cut to a fetch's `max_bytes` after a larger one (a first batch over the limits).
    fn reuse(&mut self, leader: i32, mut buffer: Vec<u8>) {
        let most = usize::try_from(self.limits.max_bytes).unwrap_or(0);
        if buffer.capacity() > most {
            buffer.truncate(most);
            buffer.shrink_to(most);
        }
        if let Some(conn) = self.brokers.get_mut(&leader).and_then(|b| b.conn.as_mut()) {
            conn.incoming.reuse(buffer);
        }
    }

    /// One round: a Fetch request to every leader of a partition in `wanted` (at its next
    /// offset) that has none in flight, then each leader's response read and its partitions
    /// handed to `on_data` with the offset they were fetched from (those without an error).
    /// Before a response is handed on, the leader's next request is sent — from where the
    /// response's whole batches end — so the broker reads while the source works (pipelining);
    /// data fetched for a position a partition no longer has (paused, sought, revoked) is for
    /// `on_data` to drop. Partitions whose leader is unknown or unreachable are left for a
    /// later round. A round waits for responses no later than `until` (the caller's next timer:
    /// checkpoints, flushes, polls of the group go on while a broker does not answer); the
    /// requests still in flight then are read by later rounds ([`Round::waiting`]).
    pub fn round<C: ConsumerContext, E>(
        &mut self,
        consumer: &BaseConsumer<C>,
        wanted: &[(Tp, i64)],
        until: Instant,
        mut on_data: impl FnMut(&PartitionData<'_>, i64) -> Result<(), E>,
    ) -> Result<Round, E> {
        let mut round = Round::default();
        self.refresh(consumer, wanted);
        // per leader, in `wanted`'s order (a topic's partitions together)
        let mut by_leader: BTreeMap<i32, Request<'_>> = BTreeMap::new();
        for (tp, offset) in wanted {
            if let Some(&leader) = self.leaders.get(tp) {
                by_leader.entry(leader).or_default().push((tp.0.as_str(), tp.1, *offset));
            }
        }
        for (leader, partitions) in &by_leader {
            if self.brokers.get(leader).is_some_and(|b| b.in_flight.is_none()) {
                self.send(*leader, partitions);
            }
        }
        for (leader, asked, response) in self.responses(until) {
            let parsed = wire::parse_fetch_response(&response[4..]);
            let (error, parts) = match parsed {
                Ok(p) => p,
                Err(e) => {
                    self.failed(leader, &format!("a malformed fetch response: {e}"));
                    continue;
                }
            };
            if error != 0 {
                self.failed(leader, &format!("the fetch failed with error {error}"));
                continue;
            }
            round.fetched += asked.len();
            // the next request first: from past this response's whole batches
            if let Some(next) = by_leader.get_mut(&leader) {
                for p in parts.iter().filter(|p| p.error == 0) {
                    let tp = (p.topic.to_owned(), p.partition);
                    let Some(&from) = asked.get(&tp) else { continue };
                    if let Some(slot) =
                        next.iter_mut().find(|(t, id, o)| *t == p.topic && *id == p.partition && *o == from)
                    {
                        slot.2 = wire::next_offset(p.records, from);
                    }
                }
                let next = std::mem::take(next);
                self.send(leader, &next);
            }
            let mut lost = Vec::new();
            let mut result = Ok(());
            for p in &parts {
                let tp = (p.topic.to_owned(), p.partition);
                let Some(&from) = asked.get(&tp) else {
                    tracing::warn!(topic = p.topic, partition = p.partition, "native fetch: a partition not asked for");
                    continue;
                };
                match p.error {
                    0 => {
                        result = on_data(p, from);
                        if result.is_err() {
                            break;
                        }
                    }
                    OFFSET_OUT_OF_RANGE => round.out_of_range.push((tp, from)),
                    e => {
                        if !LEADER_ERRORS.contains(&e) {
                            tracing::warn!(topic = p.topic, partition = p.partition, "native fetch: error {e}");
                        }
                        lost.push(tp);
                    }
                }
            }
            drop(parts);
            self.reuse(leader, response);
            result?;
            for tp in lost {
                // unless a newer answer already names another leader
                if self.leaders.get(&tp) == Some(&leader) {
                    self.leaders.remove(&tp);
                }
                self.stale = true;
            }
        }
        round.waiting = self.brokers.values().any(|b| b.in_flight.is_some() && b.conn.is_some());
        Ok(round)
    }
}

/// Reads the response to the request sent on `stream` with `correlation` into `into`
/// (correlation id first, checked; the body follows it): at most a fetch's `max_bytes` and a
/// batch beyond them. It waits for the whole response (the `fetch_floor` benchmark's reader;
/// the [`Fetcher`] reads what has come, [`Incoming`], and waits on all its brokers at once).
pub fn receive(stream: &mut TcpStream, correlation: i32, into: &mut Vec<u8>, max_bytes: i32) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    into.resize(checked_length(i32::from_be_bytes(len), max_bytes)?, 0);
    stream.read_exact(into)?;
    check_correlation(into, correlation)
}

/// Whether a response's body (`checked_length`: 4 bytes at least) answers the request sent with
/// `correlation`.
fn check_correlation(body: &[u8], correlation: i32) -> std::io::Result<()> {
    let got = i32::from_be_bytes(body[..4].try_into().unwrap_or_default());
    if got != correlation {
        return Err(std::io::Error::other(format!("correlation id {got}, sent {correlation}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A broker connection to a local listener, and the listener's side of it.
    fn broker(f: &mut Fetcher, id: i32) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        f.brokers.insert(id, Broker { address, ..Broker::default() });
        assert!(f.conn(id).is_some());
        let peer = listener.accept().unwrap().0;
        // accepted: the connect is done
        f.finish_connect(id, 0);
        assert!(!f.brokers[&id].conn.as_ref().unwrap().connecting);
        peer
    }

    fn limits(max_wait_ms: i32) -> FetchLimits {
        FetchLimits { max_wait_ms, max_bytes: 1 << 20, partition_bytes: 1 << 20, read_committed: false }
    }

    /// An `until` no test reaches: calls wait for their brokers' deadlines.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// A request in flight to broker `id`, sent now.
    fn in_flight(f: &mut Fetcher, id: i32) {
        let deadline = Instant::now() + f.response_timeout();
        f.brokers.get_mut(&id).unwrap().in_flight = Some(InFlight { asked: HashMap::new(), deadline });
    }

    #[test]
    fn a_broker_that_stops_answering_is_dropped_while_another_answers() {
        let limits = limits(0);
        let mut f = Fetcher::new("test", limits);
        f.io_timeout = Duration::from_millis(300);
        let mut answering = broker(&mut f, 1);
        let _hung = broker(&mut f, 2); // accepts, never writes
        f.stale = false;
        in_flight(&mut f, 1);
        in_flight(&mut f, 2);
        let start = Instant::now();
        // rounds as the source runs them: broker 1's response is in at once, its next
        // request goes out; broker 2's never begins
        while f.brokers[&2].conn.is_some() && start.elapsed() < Duration::from_secs(5) {
            answering.write_all(&[0]).unwrap();
            assert_eq!(f.ready(far()), vec![1]);
            let mut byte = [0u8; 1];
            f.brokers.get_mut(&1).unwrap().conn.as_mut().unwrap().stream.read_exact(&mut byte).unwrap();
            in_flight(&mut f, 1);
            std::thread::sleep(Duration::from_millis(20));
        }
        let waited = start.elapsed();
        assert!(f.brokers[&2].conn.is_none(), "the hung broker is still connected after {waited:?}");
        assert!(f.brokers[&2].in_flight.is_none() && f.brokers[&2].retry_at.is_some());
        assert!(f.stale, "its partitions' leaders are asked again");
        assert!(waited >= Duration::from_millis(300), "dropped before its deadline: {waited:?}");
        assert!(f.brokers[&1].conn.is_some(), "the answering broker keeps its connection");
    }

    /// A fetcher with one broker (1) connected and a request in flight to it, and the broker's
    /// side of the connection.
    fn one_broker(io_timeout: Duration) -> (Fetcher, TcpStream) {
        let mut f = Fetcher::new("test", limits(0));
        f.io_timeout = io_timeout;
        let peer = broker(&mut f, 1);
        f.stale = false;
        in_flight(&mut f, 1);
        (f, peer)
    }

    /// A response to the request with `correlation`: its length, the correlation id, `body`.
    fn response(correlation: i32, body: &[u8]) -> Vec<u8> {
        let mut out = (4 + body.len() as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&correlation.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn a_broker_that_stops_halfway_through_a_response_holds_no_other_back() {
        let mut f = Fetcher::new("test", limits(0));
        f.io_timeout = Duration::from_millis(1500);
        let mut answering = broker(&mut f, 1);
        let mut halfway = broker(&mut f, 2);
        f.stale = false;
        in_flight(&mut f, 1);
        in_flight(&mut f, 2);
        // broker 2 sends its response's length and 10 bytes of its 100, then nothing
        halfway.write_all(&response(0, &[7; 96])[..14]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        answering.write_all(&response(0, b"whole")).unwrap();
        let start = Instant::now();
        let got = f.responses(far());
        assert_eq!(got.len(), 1, "one whole response");
        assert_eq!((got[0].0, &got[0].2[4..]), (1, &b"whole"[..]));
        // returned before broker 2's deadline: it is still connected, its response on its way
        assert!(f.brokers[&2].conn.is_some() && f.brokers[&2].in_flight.is_some(), "after {:?}", start.elapsed());
        assert!(f.brokers[&2].conn.as_ref().unwrap().incoming.begun());
        while f.brokers[&2].conn.is_some() && start.elapsed() < Duration::from_secs(10) {
            assert!(f.responses(far()).is_empty());
        }
        assert!(f.brokers[&2].conn.is_none(), "dropped at its deadline");
        assert!(f.brokers[&2].retry_at.is_some() && f.stale);
        assert!(f.brokers[&1].conn.is_some(), "the answering broker keeps its connection");
    }

    #[test]
    fn a_response_that_comes_in_pieces_is_read_whole_and_its_buffer_reused() {
        let (mut f, mut peer) = one_broker(Duration::from_secs(5));
        let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let bytes = response(0, &body);
        peer.write_all(&bytes[..3]).unwrap();
        let rest = bytes[3..].to_vec();
        let writer = std::thread::spawn(move || {
            for piece in rest.chunks(9_000) {
                std::thread::sleep(Duration::from_millis(20));
                peer.write_all(piece).unwrap();
            }
            peer
        });
        let got = f.responses(far());
        let mut peer = writer.join().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].2[4..], &body[..]);
        assert!(f.brokers[&1].in_flight.is_none() && !f.brokers[&1].conn.as_ref().unwrap().incoming.begun());
        let (_, _, buffer) = got.into_iter().next().unwrap();
        let capacity = buffer.capacity();
        f.reuse(1, buffer);
        // the next response is read into the same buffer
        in_flight(&mut f, 1);
        peer.write_all(&response(0, b"next")).unwrap();
        let got = f.responses(far());
        assert_eq!(&got[0].2[4..], b"next");
        assert_eq!(got[0].2.capacity(), capacity);
    }

    #[test]
    fn a_response_that_keeps_coming_past_its_requests_deadline_is_read_whole() {
        let (mut f, mut peer) = one_broker(Duration::from_secs(1));
        // 32 bytes, one every 100 ms: the last comes 2.2 s after the request's deadline
        let bytes = response(0, &[3; 24]);
        let writer = std::thread::spawn(move || {
            for b in bytes.chunks(1) {
                std::thread::sleep(Duration::from_millis(100));
                peer.write_all(b).unwrap();
            }
            peer
        });
        let start = Instant::now();
        let mut got = Vec::new();
        while got.is_empty() && f.brokers[&1].conn.is_some() && start.elapsed() < Duration::from_secs(20) {
            got = f.responses(far());
        }
        let _peer = writer.join().unwrap();
        assert_eq!(got.len(), 1, "dropped after {:?}", start.elapsed());
        assert_eq!(&got[0].2[4..], &[3; 24]);
        assert!(start.elapsed() > Duration::from_secs(1), "read before the request's deadline");
    }

    #[test]
    fn a_response_that_stalls_halfway_is_given_up_on_after_the_io_timeout_without_a_byte() {
        let (mut f, mut peer) = one_broker(Duration::from_millis(400));
        // half a response at once, then nothing: given up on 400 ms after its last byte
        peer.write_all(&response(0, &[9; 40])[..20]).unwrap();
        let start = Instant::now();
        while f.brokers[&1].conn.is_some() && start.elapsed() < Duration::from_secs(10) {
            assert!(f.responses(far()).is_empty());
        }
        assert!(f.brokers[&1].conn.is_none() && f.stale);
        assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
    }

    #[test]
    fn a_response_to_another_request_or_of_a_wrong_length_drops_the_broker() {
        for bytes in [response(5, b"late"), (-1i32).to_be_bytes().to_vec(), i32::MAX.to_be_bytes().to_vec()] {
            let (mut f, mut peer) = one_broker(Duration::from_secs(5));
            peer.write_all(&bytes).unwrap();
            assert!(f.responses(far()).is_empty());
            assert!(f.brokers[&1].conn.is_none() && f.stale);
        }
    }

    #[test]
    fn a_hung_broker_holds_a_call_no_longer_than_its_until_and_is_dropped_at_its_deadline() {
        let mut f = Fetcher::new("test", limits(100));
        f.io_timeout = Duration::from_secs(2);
        let _hung = broker(&mut f, 7);
        let start = Instant::now();
        in_flight(&mut f, 7); // given up on 2.1 s from now
        let mut waits = Vec::new();
        while f.brokers[&7].conn.is_some() && start.elapsed() < Duration::from_secs(10) {
            let call = Instant::now();
            assert!(f.responses(call + Duration::from_millis(50)).is_empty());
            waits.push(call.elapsed());
            if f.brokers[&7].conn.is_some() {
                assert!(f.brokers[&7].in_flight.is_some(), "its request stays in flight");
            }
        }
        assert!(f.brokers[&7].conn.is_none() && f.brokers[&7].retry_at.is_some() && f.stale);
        assert!(start.elapsed() >= Duration::from_millis(2100), "dropped before its deadline: {:?}", start.elapsed());
        // each call came back at its `until` (slack for a busy machine), not at the deadline
        assert!(waits.len() >= 3 && waits.iter().all(|w| *w < Duration::from_secs(1)), "{waits:?}");
    }

    #[test]
    fn a_response_begun_when_a_call_ends_is_read_on_by_the_next() {
        let (mut f, mut peer) = one_broker(Duration::from_secs(5));
        let bytes = response(0, &[5; 60]);
        peer.write_all(&bytes[..30]).unwrap();
        let call = Instant::now();
        assert!(f.responses(call + Duration::from_millis(50)).is_empty());
        assert!(call.elapsed() < Duration::from_secs(2), "waited {:?} for the rest", call.elapsed());
        assert!(f.brokers[&1].in_flight.is_some() && f.brokers[&1].conn.as_ref().unwrap().incoming.begun());
        peer.write_all(&bytes[30..]).unwrap();
        let got = f.responses(far());
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].2[4..], &[5; 60]);
    }

    /// Linux drops a SYN to a listener whose accept queue is full
    #[cfg(target_os = "linux")]
    #[test]
    fn a_connect_that_does_not_complete_holds_no_call_and_is_given_up_on_at_its_timeout() {
        use socket2::{Domain, Socket, Type};
        // a listener whose accept queue is full: the kernel drops further SYNs, so a connect to
        // it neither completes nor fails, as to a host that drops packets
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        listener.listen(0).unwrap();
        let address = listener.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        while let Ok(s) = TcpStream::connect_timeout(&address, Duration::from_millis(300)) {
            queued.push(s);
            assert!(queued.len() < 64, "the accept queue never filled");
        }
        let mut f = Fetcher::new("test", limits(0));
        f.connect_timeout = Duration::from_millis(1500);
        f.brokers.insert(3, Broker { address: address.to_string(), ..Broker::default() });
        f.stale = false;
        let start = Instant::now();
        f.send(3, &vec![("t", 0, 0)]);
        assert!(start.elapsed() < Duration::from_secs(1), "the connect was waited for: {:?}", start.elapsed());
        assert!(f.brokers[&3].conn.as_ref().is_some_and(|c| c.connecting && c.pending), "the request waits");
        let mut waits = Vec::new();
        while f.brokers[&3].conn.is_some() && start.elapsed() < Duration::from_secs(10) {
            let call = Instant::now();
            assert!(f.responses(call + Duration::from_millis(50)).is_empty());
            waits.push(call.elapsed());
        }
        assert!(f.brokers[&3].conn.is_none() && f.brokers[&3].retry_at.is_some() && f.stale, "given up on");
        assert!(start.elapsed() >= Duration::from_millis(1500), "before its timeout: {:?}", start.elapsed());
        assert!(waits.len() >= 3 && waits.iter().all(|w| *w < Duration::from_secs(1)), "{waits:?}");
    }

    #[test]
    fn a_request_made_while_connecting_goes_out_once_connected() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = Fetcher::new("test", limits(0));
        f.brokers.insert(4, Broker { address: listener.local_addr().unwrap().to_string(), ..Broker::default() });
        f.stale = false;
        f.send(4, &vec![("t", 0, 7)]);
        // (a non-blocking connect on Linux is under way, even on loopback)
        assert!(f.brokers[&4].conn.as_ref().is_some_and(|c| c.connecting && c.pending), "the request waits");
        first_request(&mut f, 4, &listener);
        assert!(f.brokers[&4].in_flight.is_some(), "waiting for its response");
    }

    #[test]
    fn a_refused_connect_goes_on_to_the_hosts_next_address_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // a port nothing listens on any more: refused
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut f = Fetcher::new("test", limits(0));
        f.stale = false;
        f.brokers.insert(5, Broker { address: "a host with two addresses".into(), ..Broker::default() });
        // the refused address first (next last)
        let mut untried = vec![listener.local_addr().unwrap(), closed];
        let stream = connect_next(&mut untried).unwrap();
        let broker = f.brokers.get_mut(&5).unwrap();
        broker.conn = Some(Conn {
            stream,
            connecting: true,
            untried,
            pending: true,
            correlation: 1,
            request: response(1, b"a request"),
            incoming: Incoming::default(),
        });
        in_flight(&mut f, 5);
        let start = Instant::now();
        while f.brokers[&5].conn.as_ref().is_some_and(|c| c.connecting) && start.elapsed() < Duration::from_secs(5) {
            assert!(f.responses(Instant::now() + Duration::from_millis(50)).is_empty());
        }
        let b = &f.brokers[&5];
        assert!(b.conn.as_ref().is_some_and(|c| !c.pending), "connected to the second address, the request sent");
        assert!(b.retry_at.is_none() && !f.stale, "no backoff, no metadata ask");
        let (mut peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0u8; response(1, b"a request").len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, response(1, b"a request"));
    }

    /// `slow.test:PORT` is 127.0.0.1:PORT, after `delay` (a DNS server that is slow to answer);
    /// each test has a resolver of its own, which counts its resolutions.
    fn resolve_slowly(
        address: &str,
        count: &std::sync::atomic::AtomicUsize,
        delay: Duration,
    ) -> std::io::Result<Vec<SocketAddr>> {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(delay);
        let port =
            address.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).ok_or(std::io::ErrorKind::InvalidInput)?;
        Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
    }

    /// The broker's side of the connection `f` makes to broker `id` (its connect begun), and the
    /// request it reads there: one whole Fetch request (api key 1) with correlation id 1, and
    /// nothing more.
    fn first_request(f: &mut Fetcher, id: i32, listener: &TcpListener) {
        // accepted while the fetcher goes on connecting: a first address refused (`::1` for
        // localhost, say) is followed by the next inside `responses`
        listener.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut peer = loop {
            match listener.accept() {
                Ok((peer, _)) => break peer,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < Duration::from_secs(5), "no connection came");
                    assert!(f.responses(Instant::now() + Duration::from_millis(20)).is_empty());
                }
                Err(e) => panic!("accepting: {e}"),
            }
        };
        peer.set_nonblocking(false).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while f.brokers[&id].conn.as_ref().is_some_and(|c| c.connecting) && start.elapsed() < Duration::from_secs(5) {
            assert!(f.responses(Instant::now() + Duration::from_millis(50)).is_empty());
        }
        assert!(f.brokers[&id].conn.as_ref().is_some_and(|c| !c.connecting && !c.pending), "connected, sent");
        let mut len = [0u8; 4];
        peer.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; i32::from_be_bytes(len) as usize];
        peer.read_exact(&mut body).unwrap();
        assert_eq!(&body[..2], &1i16.to_be_bytes());
        assert_eq!(&body[4..8], &1i32.to_be_bytes(), "the correlation id it was made with");
        peer.set_nonblocking(true).unwrap();
        assert_eq!(peer.read(&mut [0u8; 1]).map_err(|e| e.kind()), Err(std::io::ErrorKind::WouldBlock));
    }

    #[test]
    fn a_host_name_is_resolved_on_a_thread_of_its_own_and_then_connected() {
        static RESOLUTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = Fetcher::new("test", limits(0));
        f.resolver = |address| resolve_slowly(address, &RESOLUTIONS, Duration::from_secs(1));
        f.stale = false;
        let address = format!("slow.test:{}", listener.local_addr().unwrap().port());
        f.brokers.insert(6, Broker { address, ..Broker::default() });
        // rounds as the source runs them: a request to the broker, then a wait for responses
        let start = Instant::now();
        let mut calls = Vec::new();
        while f.brokers[&6].conn.is_none() && start.elapsed() < Duration::from_secs(5) {
            let call = Instant::now();
            f.send(6, &vec![("t", 0, 7)]);
            assert!(f.responses(Instant::now() + Duration::from_millis(50)).is_empty());
            calls.push(call.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        let waited = start.elapsed();
        assert!(f.brokers[&6].conn.is_some(), "never connected");
        assert!(waited >= Duration::from_secs(1), "connected before the resolver answered: {waited:?}");
        assert!(calls.len() >= 5 && calls.iter().all(|c| *c < Duration::from_millis(500)), "{calls:?}");
        assert_eq!(RESOLUTIONS.load(std::sync::atomic::Ordering::SeqCst), 1, "one resolution at a time");
        assert!(f.brokers[&6].retry_at.is_none() && !f.stale, "no backoff, no metadata ask");
        // the request made once resolved goes out once connected, once
        first_request(&mut f, 6, &listener);
    }

    #[test]
    fn a_resolution_without_an_answer_in_time_backs_off_and_its_answer_serves_the_next_try() {
        static RESOLUTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = Fetcher::new("test", limits(0));
        f.resolver = |address| resolve_slowly(address, &RESOLUTIONS, Duration::from_secs(2));
        f.connect_timeout = Duration::from_millis(300);
        f.stale = false;
        let address = format!("slow.test:{}", listener.local_addr().unwrap().port());
        f.brokers.insert(7, Broker { address, ..Broker::default() });
        let start = Instant::now();
        f.send(7, &vec![("t", 0, 7)]);
        assert!(f.brokers[&7].resolving.is_some() && f.brokers[&7].conn.is_none());
        std::thread::sleep(Duration::from_millis(400));
        f.send(7, &vec![("t", 0, 7)]);
        let b = &f.brokers[&7];
        assert!(b.conn.is_none() && b.in_flight.is_none(), "no connection while unresolved");
        assert!(b.retry_at.is_some() && f.stale, "backed off as after a failed connect");
        assert!(b.resolving.is_some(), "the resolution goes on");
        // its answer, once in, is the next try's
        while f.brokers[&7].conn.is_none() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
            f.send(7, &vec![("t", 0, 7)]);
        }
        assert!(start.elapsed() >= Duration::from_secs(2), "{:?}", start.elapsed());
        assert_eq!(RESOLUTIONS.load(std::sync::atomic::Ordering::SeqCst), 1, "the first resolution's answer");
        assert!(f.brokers[&7].resolving.is_none());
        first_request(&mut f, 7, &listener);
    }

    #[test]
    fn the_systems_resolver_runs_off_the_calling_thread_too() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = Fetcher::new("test", limits(0));
        f.stale = false;
        let address = format!("localhost:{}", listener.local_addr().unwrap().port());
        f.brokers.insert(8, Broker { address, ..Broker::default() });
        f.send(8, &vec![("t", 0, 7)]);
        assert!(f.brokers[&8].resolving.is_some() && f.brokers[&8].conn.is_none(), "resolving");
        let start = Instant::now();
        // (localhost may resolve to ::1 first, which nothing listens on: refused, and the next
        // tried, while `first_request` waits for the connection)
        while f.brokers[&8].conn.is_none() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
            f.send(8, &vec![("t", 0, 7)]);
        }
        first_request(&mut f, 8, &listener);
    }

    /// One topic `t`'s answer: each partition with its leader's id and address, or none.
    fn leaders_of(partitions: &[(i32, Option<(i32, &str)>)]) -> Result<Vec<leaders::TopicLeaders>, String> {
        let partitions = partitions.iter().map(|(p, l)| (*p, l.map(|(id, a)| (id, a.to_owned())))).collect();
        Ok(vec![("t".to_owned(), Ok(partitions))])
    }

    /// An answer gives each partition its leader; a broker whose address it changes loses its
    /// connection, one whose address it keeps does not; nothing is asked again.
    #[test]
    fn a_leader_answer_places_partitions_and_a_moved_broker_is_reconnected() {
        let mut f = Fetcher::new("test", limits(0));
        let _peer = broker(&mut f, 1);
        let address = f.brokers[&1].address.clone();
        f.stale = false; // as `refresh` leaves it once the ask is sent
        f.take_leaders(leaders_of(&[(0, Some((1, &address))), (1, Some((2, "127.0.0.1:1")))]));
        assert_eq!((f.leaders[&("t".to_owned(), 0)], f.leaders[&("t".to_owned(), 1)]), (1, 2));
        assert!(f.brokers[&1].conn.is_some(), "the same address keeps its connection");
        assert_eq!(f.brokers[&2].address, "127.0.0.1:1");
        assert!(!f.stale && f.asks_unanswered == 0 && f.metadata_backoff == METADATA_EVERY);
        f.take_leaders(leaders_of(&[(0, Some((1, "127.0.0.1:2")))]));
        assert!(f.brokers[&1].conn.is_none() && f.brokers[&1].address == "127.0.0.1:2", "moved: reconnected");
    }

    /// A partition the answer gives no leader loses the one it had, a topic's error leaves its
    /// leaders as they were, and either is asked for again; an ask without an answer backs the
    /// next off and goes to the next broker.
    #[test]
    fn what_an_answer_leaves_open_is_asked_again() {
        let mut f = Fetcher::new("test", limits(0));
        let (_p1, _p2) = (broker(&mut f, 1), broker(&mut f, 2));
        f.take_leaders(leaders_of(&[(0, Some((1, "127.0.0.1:3")))]));
        f.take_leaders(leaders_of(&[(0, None)]));
        assert!(!f.leaders.contains_key(&("t".to_owned(), 0)) && f.stale);
        f.stale = false;
        f.leaders.insert(("t".to_owned(), 1), 2);
        f.take_leaders(Ok(vec![("t".to_owned(), Err("UNKNOWN_TOPIC_OR_PARTITION".to_owned()))]));
        assert!(f.stale && f.leaders[&("t".to_owned(), 1)] == 2);
        assert_eq!(f.whom_to_ask(), Some(2), "broker 1 leads nothing (and moved: reconnecting)");
        let _p1 = broker(&mut f, 1);
        f.leaders.insert(("t".to_owned(), 2), 1);
        assert_eq!(f.whom_to_ask(), Some(1), "the lowest id, with no answer yet");
        f.answered_by = Some(2);
        assert_eq!(f.whom_to_ask(), Some(2), "the broker that answered the last ask");
        f.take_leaders(Err("Local: Timed out".to_owned()));
        assert_eq!((f.asks_unanswered, f.metadata_backoff), (1, METADATA_EVERY * 2));
        assert_eq!(f.whom_to_ask(), Some(2), "the next broker after an ask without an answer");
        f.take_leaders(Err("Local: Timed out".to_owned()));
        assert_eq!(f.whom_to_ask(), Some(1), "and the next");
        f.brokers.get_mut(&1).unwrap().back_off();
        assert_eq!(f.whom_to_ask(), Some(2), "not one backing off");
        f.take_leaders(leaders_of(&[]));
        assert_eq!((f.asks_unanswered, f.metadata_backoff), (0, METADATA_EVERY));
    }

    /// Against the stand-in broker: the fetcher asks for the leaders of the partitions it
    /// wants, without waiting, takes the answer at a later call, and asks nothing more until a
    /// leader is lost; one lost is asked for again and, while the broker is fenced, answered
    /// none.
    #[test]
    fn the_fetcher_asks_for_leaders_once_and_again_when_one_is_lost() {
        use crate::kafka::fenced_broker::{FencedBroker, NODE_ID, TOPIC};
        let broker = FencedBroker::start();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.address())
            .set("group.id", "fetch-test")
            .create()
            .unwrap();
        let mut f = Fetcher::new("test", limits(0));
        let tp = (TOPIC.to_owned(), 0);
        let wanted = vec![(tp.clone(), 0)];
        let answered = |f: &mut Fetcher| {
            let t0 = Instant::now();
            while f.leader_ask.is_some() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
                f.refresh(&consumer, &wanted);
            }
            f.leader_ask.is_none()
        };
        let call = Instant::now();
        f.refresh(&consumer, &wanted);
        assert!(call.elapsed() < Duration::from_millis(500), "no wait");
        assert!(f.leader_ask.is_some() && !f.stale, "asked");
        assert!(answered(&mut f));
        assert_eq!(f.leaders.get(&tp), Some(&NODE_ID));
        assert_eq!(f.brokers[&NODE_ID].address, broker.address());
        assert!(!f.stale, "a complete answer: nothing to ask again");
        std::thread::sleep(METADATA_EVERY);
        f.refresh(&consumer, &wanted);
        assert!(f.leader_ask.is_none(), "asked again with every leader known");
        // the leader lost (as after a NOT_LEADER answer), the broker fenced meanwhile
        broker.set_fenced(true);
        f.leaders.remove(&tp);
        f.refresh(&consumer, &wanted);
        assert!(f.leader_ask.is_some(), "a partition without a leader is asked for");
        assert!(answered(&mut f));
        assert!(!f.leaders.contains_key(&tp) && f.stale, "no leader while fenced: asked again later");
    }

    /// A broker that fails while an ask is in flight (the ask sent, the flag cleared) is asked
    /// about again after the answer, even a complete one: the answer may predate the failure.
    #[test]
    fn a_leader_lost_while_an_ask_is_in_flight_is_asked_for_again() {
        let mut f = Fetcher::new("test", limits(0));
        let _peer = broker(&mut f, 1);
        f.stale = false; // as `refresh` leaves it once the ask is sent
        f.failed(1, "the fetch failed with error 6");
        f.take_leaders(leaders_of(&[(0, Some((1, "127.0.0.1:3")))]));
        assert!(f.stale, "asked again");
    }
}
