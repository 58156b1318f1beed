//! Checkpoint acknowledgements: sinks report the last barrier epoch whose data they made
//! durable; sources wait for every sink before committing the positions of that epoch.

use tokio::sync::watch;

/// Held by a sink: reports durable epochs.
#[derive(Debug)]
pub(crate) struct SinkAck(watch::Sender<u64>);

impl SinkAck {
    /// Everything before barrier `epoch` is durable in this sink.
    pub(crate) fn ack(&self, epoch: u64) {
        self.0.send_modify(|e| *e = (*e).max(epoch));
    }
}

/// Held by a source: waits until every sink has made an epoch durable.
#[derive(Debug, Clone)]
pub struct CheckpointAcks(Vec<watch::Receiver<u64>>);

impl CheckpointAcks {
    /// A fresh set of acknowledgements for `sinks` sinks.
    pub(crate) fn new(sinks: usize) -> (Vec<SinkAck>, CheckpointAcks) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..sinks).map(|_| watch::channel(0u64)).map(|(t, r)| (SinkAck(t), r)).unzip();
        (tx, CheckpointAcks(rx))
    }

    /// The newest epoch every sink has acknowledged.
    pub fn acked(&self) -> u64 {
        self.0.iter().map(|r| *r.borrow()).min().unwrap_or(u64::MAX)
    }

    /// Waits until every sink has acknowledged `epoch`; false if a sink went away first.
    pub async fn wait(&mut self, epoch: u64) -> bool {
        for r in &mut self.0 {
            if r.wait_for(|e| *e >= epoch).await.is_err() {
                return false;
            }
        }
        true
    }
}
