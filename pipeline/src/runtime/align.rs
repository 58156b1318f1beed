//! A task's inputs, merged with barrier alignment.
//!
//! Every input of a task has a channel of its own (`runtime.channel_capacity` messages). Once
//! an input has delivered barrier *e*, whatever it sends next belongs after the checkpoint: the
//! task stops reading that input until every input still running has delivered *e*. Only then
//! does it act on the barrier (a sink makes its output durable, a stage forwards it) and read
//! the blocked inputs again. Without alignment, rows read after a checkpoint could be written
//! into files that the checkpoint commits, and a replay after a crash would write them twice.
//!
//! A blocked input is not read, so what its sender produces meanwhile waits in the bounded
//! channel and then in the sender (backpressure), never in memory of this task: alignment holds
//! at most `channel_capacity` messages per input. This cannot deadlock: a task sends a barrier
//! on all its outputs before anything that follows it, so every input's barrier is on its way
//! before any sender waits on a blocked input.

use std::task::Poll;

use citystream_operators::{Barrier, Message};
use tokio::sync::mpsc;

use super::PipelineError;

/// What the task should do next.
#[derive(Debug)]
pub(crate) enum Next {
    /// A message to handle as usual (never a barrier).
    Message(usize, Message),
    /// Every input still running delivered this barrier.
    Aligned(Barrier),
    /// Every input ended (after its last message).
    Ended,
}

/// A task's input channels, read with barrier alignment.
pub(crate) struct Aligner {
    inputs: Vec<mpsc::Receiver<Message>>,
    blocked: Vec<bool>,
    ended: Vec<bool>,
    barrier: Option<Barrier>,
    /// An input whose end completed an alignment: reported right after the barrier.
    end_after_barrier: Option<usize>,
    /// The input read first at the next poll (rotates, so no input starves the others).
    start: usize,
}

impl Aligner {
    pub(crate) fn new(inputs: Vec<mpsc::Receiver<Message>>) -> Self {
        let n = inputs.len();
        Self {
            inputs,
            blocked: vec![false; n],
            ended: vec![false; n],
            barrier: None,
            end_after_barrier: None,
            start: 0,
        }
    }

    fn aligned(&self) -> bool {
        self.blocked.iter().zip(&self.ended).all(|(b, e)| *b || *e)
    }

    fn release(&mut self) -> Barrier {
        self.blocked.iter_mut().for_each(|x| *x = false);
        self.barrier.take().expect("a barrier is pending")
    }

    /// The next message of an input that is neither blocked nor ended, taking inputs in turn.
    /// Cancel-safe: a message is taken from its channel only in the poll that returns it.
    async fn recv(&mut self) -> Result<(usize, Message), PipelineError> {
        std::future::poll_fn(|cx| {
            let n = self.inputs.len();
            for k in 0..n {
                let i = (self.start + k) % n;
                if self.blocked[i] || self.ended[i] {
                    continue;
                }
                match self.inputs[i].poll_recv(cx) {
                    Poll::Ready(Some(msg)) => {
                        self.start = (i + 1) % n;
                        return Poll::Ready(Ok((i, msg)));
                    }
                    // the sender went away without `End`: its task failed
                    Poll::Ready(None) => return Poll::Ready(Err(PipelineError::Disconnected)),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }

    /// The next thing to handle; `Err(Disconnected)` when an input's sender went away without
    /// `End`. Cancel-safe (the only await is [`recv`](Self::recv)).
    pub(crate) async fn next(&mut self) -> Result<Next, PipelineError> {
        if let Some(i) = self.end_after_barrier.take() {
            return Ok(Next::Message(i, Message::End));
        }
        loop {
            if self.ended.iter().all(|e| *e) {
                return Ok(Next::Ended);
            }
            let (input, msg) = self.recv().await?;
            match msg {
                Message::Barrier(b) => {
                    self.barrier = Some(b);
                    self.blocked[input] = true;
                    if self.aligned() {
                        return Ok(Next::Aligned(self.release()));
                    }
                }
                Message::End => {
                    self.ended[input] = true;
                    if self.barrier.is_some() && self.aligned() {
                        // the last input the pending barrier waited for ended instead: the
                        // barrier is aligned now, and the end is reported right after it
                        self.end_after_barrier = Some(input);
                        return Ok(Next::Aligned(self.release()));
                    }
                    return Ok(Next::Message(input, Message::End));
                }
                msg => return Ok(Next::Message(input, msg)),
            }
        }
    }

    /// Messages waiting in the input channels (for the queue-depth gauge).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.inputs.iter().map(mpsc::Receiver::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(n: &Next) -> String {
        match n {
            Next::Message(i, Message::Watermark(w)) => format!("{i}:wm{w}"),
            Next::Message(i, Message::End) => format!("{i}:end"),
            Next::Message(i, m) => format!("{i}:{m:?}"),
            Next::Aligned(b) => format!("barrier{}", b.epoch),
            Next::Ended => "ended".into(),
        }
    }

    fn channels(n: usize, cap: usize) -> (Vec<mpsc::Sender<Message>>, Aligner) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel(cap)).unzip();
        (tx, Aligner::new(rx))
    }

    fn b(e: u64) -> Message {
        Message::Barrier(Barrier { epoch: e })
    }

    #[tokio::test]
    async fn holds_back_what_follows_a_barrier_until_all_inputs_deliver_it() {
        let (tx, mut a) = channels(2, 16);
        for (i, m) in [
            (0, Message::Watermark(1)),
            (0, b(1)),
            (0, Message::Watermark(2)), // after the checkpoint on input 0: not read before it
            (1, Message::Watermark(10)),
            (1, b(1)),
            (1, Message::Watermark(11)),
            (0, Message::End),
            (1, Message::End),
        ] {
            tx[i].send(m).await.unwrap();
        }
        let mut seen = Vec::new();
        loop {
            let n = a.next().await.unwrap();
            let done = matches!(n, Next::Ended);
            seen.push(label(&n));
            if done {
                break;
            }
        }
        let barrier = seen.iter().position(|s| s == "barrier1").unwrap();
        assert_eq!(seen[..barrier], ["0:wm1", "1:wm10"], "{seen:?}");
        let mut after = seen[barrier + 1..].to_vec();
        after.sort();
        assert_eq!(after, ["0:end", "0:wm2", "1:end", "1:wm11", "ended"], "{seen:?}");
    }

    #[tokio::test]
    async fn an_ended_input_does_not_hold_a_barrier_back() {
        let (tx, mut a) = channels(2, 16);
        tx[1].send(Message::End).await.unwrap();
        tx[0].send(b(3)).await.unwrap();
        let mut seen = vec![label(&a.next().await.unwrap()), label(&a.next().await.unwrap())];
        seen.sort();
        assert_eq!(seen, ["1:end", "barrier3"]);
    }

    #[tokio::test]
    async fn an_end_completing_an_alignment_comes_right_after_the_barrier() {
        let (tx, mut a) = channels(2, 16);
        tx[0].send(b(4)).await.unwrap();
        tx[0].send(Message::Watermark(9)).await.unwrap();
        tx[1].send(Message::End).await.unwrap();
        tx[0].send(Message::End).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(label(&a.next().await.unwrap()));
        }
        assert_eq!(seen, ["barrier4", "1:end", "0:wm9", "0:end", "ended"]);
    }

    #[tokio::test]
    async fn a_blocked_input_pushes_back_on_its_sender_instead_of_filling_memory() {
        // input 0 delivered the barrier and keeps sending; input 1 is slow to deliver it
        let (tx, mut a) = channels(2, 4);
        tx[0].send(b(1)).await.unwrap();
        tx[1].send(Message::Watermark(1)).await.unwrap();
        assert_eq!(label(&a.next().await.unwrap()), "1:wm1");
        let mut sent = 0;
        while tx[0].try_send(Message::Watermark(100 + sent)).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 4, "the blocked input's channel holds its capacity and no more");
        let fast = tx[0].clone();
        let extra = tokio::spawn(async move { fast.send(Message::Watermark(999)).await });
        tokio::task::yield_now().await;
        assert!(!extra.is_finished(), "the sender waits");
        assert_eq!(a.queued(), 4);
        tx[1].send(b(1)).await.unwrap();
        assert_eq!(label(&a.next().await.unwrap()), "barrier1");
        let mut wms = Vec::new();
        for _ in 0..5 {
            if let Next::Message(0, Message::Watermark(w)) = a.next().await.unwrap() {
                wms.push(w);
            }
        }
        extra.await.unwrap().unwrap();
        assert_eq!(wms, [100, 101, 102, 103, 999], "in order, after the barrier");
    }
}
