//! The subscribers of a task's output ports, and sending to them.

use citystream_operators::Message;
use tokio::sync::mpsc;

use super::PipelineError;

/// One edge into a task: the channel of one of its inputs.
#[derive(Debug, Clone)]
pub(crate) struct Edge {
    pub(crate) tx: mpsc::Sender<Message>,
}

/// The subscribers of each output port of a node.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outputs {
    pub(crate) ports: Vec<Vec<Edge>>,
}

impl Outputs {
    /// Whether anybody reads `port`.
    pub(crate) fn is_connected(&self, port: usize) -> bool {
        !self.ports[port].is_empty()
    }

    /// Sends `msg` to every subscriber of `port`.
    pub(crate) async fn send(&self, port: usize, msg: Message) -> Result<(), PipelineError> {
        for e in &self.ports[port] {
            e.tx.send(msg.clone()).await.map_err(|_| PipelineError::Disconnected)?;
        }
        Ok(())
    }

    /// Sends `msg` on every port.
    pub(crate) async fn broadcast(&self, msg: Message) -> Result<(), PipelineError> {
        for p in 0..self.ports.len() {
            self.send(p, msg.clone()).await?;
        }
        Ok(())
    }

    /// [`send`](Self::send) from a thread outside the async runtime (a source's own thread):
    /// blocks while the channel is full.
    pub(crate) fn blocking_send(&self, port: usize, msg: Message) -> Result<(), PipelineError> {
        for e in &self.ports[port] {
            e.tx.blocking_send(msg.clone()).map_err(|_| PipelineError::Disconnected)?;
        }
        Ok(())
    }

    /// [`broadcast`](Self::broadcast) from a thread outside the async runtime.
    pub(crate) fn blocking_broadcast(&self, msg: Message) -> Result<(), PipelineError> {
        for p in 0..self.ports.len() {
            self.blocking_send(p, msg.clone())?;
        }
        Ok(())
    }
}
