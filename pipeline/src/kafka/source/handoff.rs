//! Handing what the consumer thread read on to the pipeline without leaving the group.
//!
//! A send into a full channel (a sink holds the pipeline: backpressure) waits for room, and
//! polls the consumer whenever [`KEEP_GROUP_EVERY`] has passed since its last poll: librdkafka
//! leaves the group once `max.poll.interval.ms` passes without a poll, and a rebalance waits
//! for one.
//!
//! A rebalance callback inside that poll takes a checkpoint (`commit::checkpoint`), and what
//! the loop was handing on when it began to wait was read before that checkpoint: it must
//! reach the sinks before the checkpoint's barrier. So the loop parks every hand-off in the
//! shared state ([`Unsent`]) until it is sent, and the callback sends whatever is parked first
//! ([`send_parked`]). A revocation and an assignment inside the poll can also start a partition
//! over (at its committed offset) while the loop still has messages of it in hand: each
//! partition remembers the assignment it came with, each message the one it was fetched under,
//! and `Loop::accept` drops a message fetched before its partition's assignment.
//!
//! The messages such a poll returns (a partition not forwarded to the source's queue: none,
//! normally) are kept and read once the send is done ([`Loop::read_kept`]); past
//! [`MAX_KEPT_BYTES`] of them it polls no more (the group may then take the partitions back,
//! and the run stops, as before).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use citystream_operators::Message;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message as _, OwnedMessage};
use tokio::sync::mpsc::{Sender, error::TrySendError};

use super::context::{Shared, lock};
use super::{Loop, Tp};
use crate::task::{Outputs, PipelineError};

/// How long a send into a full channel waits for room after the consumer's last poll before
/// it polls again.
pub(super) const KEEP_GROUP_EVERY: Duration = Duration::from_millis(100);

/// At most this many events are taken from the consumer's queue per poll between waits: its
/// messages are kept in memory until the send is done.
const POLLS_PER_WAIT: usize = 64;

/// Payload bytes of kept messages past which a wait polls no more: what librdkafka's prefetch
/// holds by default (`queued.max.messages.kbytes`, `CONSUMER_DEFAULTS`).
const MAX_KEPT_BYTES: usize = 16 << 20;

/// A message the consumer thread is handing on to `port`, sent to the port's subscribers
/// before `edge` already.
pub(super) struct Unsent {
    port: usize,
    edge: usize,
    msg: Message,
}

/// Sends what is parked to the subscribers it has not reached yet, in order, waiting for room
/// as long as it takes (a rebalance callback: it runs inside the consumer's poll, which cannot
/// be polled again from there). An error if a subscriber went away.
pub(super) fn send_parked(shared: &Mutex<Shared>) -> Result<(), PipelineError> {
    let (parked, outputs) = {
        let mut s = lock(shared);
        (std::mem::take(&mut s.unsent), s.outputs.clone())
    };
    send_blocking(parked, &outputs)
}

/// Parks `msgs` to be handed on after what is parked already ([`Loop::hand_on_parked`], or
/// [`send_parked`] in a rebalance callback).
pub(super) fn park(s: &mut Shared, msgs: impl IntoIterator<Item = (usize, Message)>) {
    s.unsent.extend(msgs.into_iter().map(|(port, msg)| Unsent { port, edge: 0, msg }));
}

fn send_blocking(parked: VecDeque<Unsent>, outputs: &Outputs) -> Result<(), PipelineError> {
    for u in parked {
        for e in &outputs.ports[u.port][u.edge..] {
            e.tx.blocking_send(u.msg.clone()).map_err(|_| PipelineError::Disconnected)?;
        }
    }
    Ok(())
}

/// Wakes the thread that waits for room.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Sends `msg` into `tx`'s channel once it has room, waiting up to `wait` on this thread (no
/// async runtime): whether it was sent (if not, it is dropped: the caller has it parked), an
/// error if the receiver went away.
fn send_within(tx: &Sender<Message>, msg: Message, wait: Duration) -> Result<bool, PipelineError> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut reserve = std::pin::pin!(tx.reserve());
    let until = Instant::now() + wait;
    loop {
        if let Poll::Ready(permit) = reserve.as_mut().poll(&mut cx) {
            permit.map_err(|_| PipelineError::Disconnected)?.send(msg);
            return Ok(true);
        }
        let now = Instant::now();
        if now >= until {
            return Ok(false);
        }
        std::thread::park_timeout(until - now);
    }
}

impl Loop {
    /// Hands `msgs` on, in order, polling the consumer while the pipeline has no room (see the
    /// module's documentation). A message a rebalance callback sent meanwhile is not sent
    /// again.
    pub(super) fn hand_on(&self, msgs: impl IntoIterator<Item = (usize, Message)>) -> Result<(), PipelineError> {
        park(&mut lock(&self.shared), msgs);
        self.hand_on_parked()
    }

    /// Hands on what is parked (see [`Self::hand_on`]).
    pub(super) fn hand_on_parked(&self) -> Result<(), PipelineError> {
        let outputs = lock(&self.shared).outputs.clone();
        loop {
            let (port, edge, msg) = {
                let mut s = lock(&self.shared);
                let Some(u) = s.unsent.front() else { return Ok(()) };
                if u.edge >= outputs.ports[u.port].len() {
                    s.unsent.pop_front();
                    continue;
                }
                (u.port, u.edge, u.msg.clone())
            };
            let tx = &outputs.ports[port][edge].tx;
            let sent = match tx.try_send(msg) {
                Ok(()) => true,
                Err(TrySendError::Closed(_)) => return Err(PipelineError::Disconnected),
                Err(TrySendError::Full(msg)) => {
                    if self.last_polled.get().elapsed() >= KEEP_GROUP_EVERY {
                        self.keep_group()?;
                        // a rebalance callback may have sent it
                        continue;
                    }
                    let start = Instant::now();
                    let due = self.last_polled.get() + KEEP_GROUP_EVERY;
                    let sent = send_within(tx, msg, due.saturating_duration_since(start));
                    self.count_backpressure(start.elapsed());
                    sent?
                }
            };
            if sent {
                // nothing ran in between: the front is the message just sent
                if let Some(u) = lock(&self.shared).unsent.front_mut() {
                    u.edge += 1;
                }
            }
        }
    }

    /// Adds `waited` to `citystream_kafka_backpressure_milliseconds_total` (what is under a
    /// millisecond is carried over to the next wait).
    fn count_backpressure(&self, waited: Duration) {
        let total = self.backpressure_rest.get() + waited;
        let ms = total.as_millis() as u64;
        self.backpressure_ms.inc_by(ms);
        self.backpressure_rest.set(total - Duration::from_millis(ms));
    }

    /// Polls the consumer (see [`Self::keep_group`]), noting when.
    pub(super) fn poll(
        &self,
        wait: Duration,
    ) -> Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>> {
        let polled = self.consumer.poll(wait);
        self.last_polled.set(Instant::now());
        polled
    }

    /// Polls the consumer while the pipeline has no room: rebalances and errors are served,
    /// messages kept for later, and librdkafka sees the application poll.
    fn keep_group(&self) -> Result<(), PipelineError> {
        self.rebootstrap.borrow_mut().keep_known(self.consumer.client().native_ptr());
        // bounded memory: past MAX_KEPT_BYTES kept, no more polls (see the module's docs)
        if self.kept_bytes.get() > MAX_KEPT_BYTES {
            self.last_polled.set(Instant::now());
            return Ok(());
        }
        for _ in 0..POLLS_PER_WAIT {
            let Some(polled) = self.poll(Duration::ZERO) else { break };
            match polled {
                // with the native fetch: fetched by librdkafka before the assignment's pause
                Ok(_) if self.native.is_some() => {}
                Ok(m) => {
                    let generation = lock(&self.shared).generation;
                    let m = m.detach();
                    self.kept_bytes.set(self.kept_bytes.get() + m.payload().map_or(0, <[u8]>::len));
                    self.kept.borrow_mut().push_back((m, generation));
                }
                Err(e) => self.polled_error(e)?,
            }
        }
        // no event waiting
        self.last_polled.set(Instant::now());
        match lock(&self.shared).error.take() {
            // a callback inside the poll failed (the assignment lost, a cleanup on assignment)
            Some(e) => Err(self.err(e)),
            None => Ok(()),
        }
    }

    /// Reads the oldest message kept by [`Self::keep_group`], if any (see
    /// [`Self::serve_message`]); `None` if none is kept.
    pub(super) fn read_kept(
        &self,
        key: &mut Tp,
        wall: &mut i64,
        last_message: &mut Instant,
        total: &mut u64,
    ) -> Option<Result<bool, PipelineError>> {
        // taken out first: serving it may hand a batch on, which may keep more
        let (m, generation): (OwnedMessage, u64) = self.kept.borrow_mut().pop_front()?;
        self.kept_bytes.set(self.kept_bytes.get() - m.payload().map_or(0, <[u8]>::len));
        Some(self.serve_message(&m, Some(generation), key, wall, last_message, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Edge;
    use tokio::sync::mpsc;

    fn wm(t: i64) -> Message {
        Message::Watermark(t)
    }

    fn watermarks(rx: &mut mpsc::Receiver<Message>) -> Vec<i64> {
        let mut seen = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                Message::Watermark(t) => seen.push(t),
                other => panic!("{other:?}"),
            }
        }
        seen
    }

    #[test]
    fn a_send_into_a_full_channel_waits_for_the_reader_or_the_time_given() {
        let (tx, mut rx) = mpsc::channel(1);
        tx.try_send(wm(1)).unwrap();
        let start = Instant::now();
        assert!(!send_within(&tx, wm(2), Duration::from_millis(50)).unwrap(), "full: not sent");
        assert!(start.elapsed() >= Duration::from_millis(50));
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut seen = vec![rx.blocking_recv()];
            seen.push(rx.blocking_recv());
            (rx, seen)
        });
        let start = Instant::now();
        assert!(send_within(&tx, wm(3), Duration::from_secs(30)).unwrap(), "sent once the reader took one");
        assert!(start.elapsed() < Duration::from_secs(10), "woken by the reader, not the time limit");
        let (rx, seen) = reader.join().unwrap();
        assert!(matches!(seen[..], [Some(Message::Watermark(1)), Some(Message::Watermark(3))]), "{seen:?}");
        drop(rx);
        assert!(matches!(send_within(&tx, wm(4), Duration::from_secs(30)), Err(PipelineError::Disconnected)));
    }

    #[test]
    fn parked_messages_go_in_order_to_the_subscribers_they_have_not_reached() {
        let (a, mut ra) = mpsc::channel(8);
        let (b, mut rb) = mpsc::channel(8);
        let (c, mut rc) = mpsc::channel(8);
        let outputs = Outputs { ports: vec![vec![Edge { tx: a }, Edge { tx: b }], vec![Edge { tx: c }]] };
        // the first had reached port 0's first subscriber already
        let parked = VecDeque::from([
            Unsent { port: 0, edge: 1, msg: wm(1) },
            Unsent { port: 1, edge: 0, msg: wm(2) },
            Unsent { port: 0, edge: 0, msg: wm(3) },
        ]);
        send_blocking(parked, &outputs).unwrap();
        assert_eq!(watermarks(&mut ra), [3]);
        assert_eq!(watermarks(&mut rb), [1, 3]);
        assert_eq!(watermarks(&mut rc), [2]);
        drop(rc);
        let parked = VecDeque::from([Unsent { port: 1, edge: 0, msg: wm(4) }]);
        assert!(matches!(send_blocking(parked, &outputs), Err(PipelineError::Disconnected)));
    }
}
