//! Barrier alignment for tasks with several inputs.
//!
//! Once an input has delivered barrier *e*, whatever it sends next belongs after the
//! checkpoint; it is held back until every input still running has delivered *e*. Only then
//! does the task act on the barrier (a sink makes its output durable, a stage forwards it), and
//! then it takes up the held-back messages in order. Without this, rows read after a checkpoint
//! could be written into files that the checkpoint commits, and a replay after a crash would
//! write them twice.

use std::collections::VecDeque;

use citystream_operators::{Barrier, Message};
use tokio::sync::mpsc;

use super::{Envelope, PipelineError};

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

/// Merges a task's inputs with barrier alignment.
pub(crate) struct Aligner {
    blocked: Vec<bool>,
    ended: Vec<bool>,
    /// Held back from blocked inputs, in arrival order.
    held: VecDeque<Envelope>,
    /// Released after an alignment, handled before anything new.
    replay: VecDeque<Envelope>,
    barrier: Option<Barrier>,
}

impl Aligner {
    pub(crate) fn new(inputs: usize) -> Self {
        Self {
            blocked: vec![false; inputs],
            ended: vec![false; inputs],
            held: VecDeque::new(),
            replay: VecDeque::new(),
            barrier: None,
        }
    }

    fn aligned(&self) -> bool {
        self.blocked.iter().zip(&self.ended).all(|(b, e)| *b || *e)
    }

    fn release(&mut self) -> Barrier {
        let b = self.barrier.take().expect("a barrier is pending");
        self.blocked.iter_mut().for_each(|x| *x = false);
        // what was held back comes first, then anything still queued for replay
        let mut next = std::mem::take(&mut self.held);
        next.extend(self.replay.drain(..));
        self.replay = next;
        b
    }

    /// The next thing to handle; `Err(Disconnected)` when every sender went away without `End`.
    pub(crate) async fn next(&mut self, rx: &mut mpsc::Receiver<Envelope>) -> Result<Next, PipelineError> {
        loop {
            let env = match self.replay.pop_front() {
                Some(e) => e,
                None if self.ended.iter().all(|e| *e) => return Ok(Next::Ended),
                None => rx.recv().await.ok_or(PipelineError::Disconnected)?,
            };
            if self.blocked[env.input] {
                self.held.push_back(env);
                continue;
            }
            match env.msg {
                Message::Barrier(b) => {
                    self.barrier = Some(b);
                    self.blocked[env.input] = true;
                    if self.aligned() {
                        return Ok(Next::Aligned(self.release()));
                    }
                }
                Message::End if !self.ended[env.input] && self.barrier.is_some() => {
                    // the last input the pending barrier waited for ended instead: the barrier
                    // is aligned now, and the end is reported right after it
                    self.ended[env.input] = true;
                    if self.aligned() {
                        let b = self.release();
                        self.replay.push_back(env);
                        return Ok(Next::Aligned(b));
                    }
                    return Ok(Next::Message(env.input, Message::End));
                }
                Message::End => {
                    self.ended[env.input] = true;
                    return Ok(Next::Message(env.input, Message::End));
                }
                msg => return Ok(Next::Message(env.input, msg)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(input: usize, msg: Message) -> Envelope {
        Envelope { input, msg }
    }

    fn label(n: &Next) -> String {
        match n {
            Next::Message(i, Message::Watermark(w)) => format!("{i}:wm{w}"),
            Next::Message(i, Message::End) => format!("{i}:end"),
            Next::Message(i, m) => format!("{i}:{m:?}"),
            Next::Aligned(b) => format!("barrier{}", b.epoch),
            Next::Ended => "ended".into(),
        }
    }

    #[tokio::test]
    async fn holds_back_what_follows_a_barrier_until_all_inputs_deliver_it() {
        let (tx, mut rx) = mpsc::channel(16);
        let b = |e| Message::Barrier(Barrier { epoch: e });
        for e in [
            env(0, Message::Watermark(1)),
            env(0, b(1)),
            env(0, Message::Watermark(2)), // after the checkpoint on input 0: held back
            env(1, Message::Watermark(10)),
            env(1, b(1)),
            env(1, Message::Watermark(11)),
            env(0, Message::End),
            env(1, Message::End),
        ] {
            tx.send(e).await.unwrap();
        }
        let mut a = Aligner::new(2);
        let mut seen = Vec::new();
        loop {
            let n = a.next(&mut rx).await.unwrap();
            let done = matches!(n, Next::Ended);
            seen.push(label(&n));
            if done {
                break;
            }
        }
        assert_eq!(seen, ["0:wm1", "1:wm10", "barrier1", "0:wm2", "1:wm11", "0:end", "1:end", "ended"]);
    }

    #[tokio::test]
    async fn an_ended_input_does_not_hold_a_barrier_back() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(env(1, Message::End)).await.unwrap();
        tx.send(env(0, Message::Barrier(Barrier { epoch: 3 }))).await.unwrap();
        let mut a = Aligner::new(2);
        assert_eq!(label(&a.next(&mut rx).await.unwrap()), "1:end");
        assert_eq!(label(&a.next(&mut rx).await.unwrap()), "barrier3");
    }
}
