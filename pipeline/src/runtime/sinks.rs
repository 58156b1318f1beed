//! Sink tasks: read a sink's inputs, align their barriers, and hand the sink its batches,
//! watermarks and checkpoints (`task::Sink`); acknowledge every barrier once the sink made
//! everything before it durable.

use std::collections::BTreeMap;

use citystream_operators::{Message, Metrics};
use tokio::sync::mpsc;

use super::PipelineError;
use super::align::{Aligner, Next};
use crate::task::{Sink, SinkAck, TableStats};

pub(crate) struct SinkTask {
    /// Inputs of the sink.
    inputs: usize,
    rows_in: citystream_operators::Counter,
    bytes_in: citystream_operators::Counter,
    sink: Box<dyn Sink>,
    ack: SinkAck,
}

impl SinkTask {
    /// The task of sink `name` with `inputs` inputs.
    pub(crate) fn new(name: &str, inputs: usize, sink: Box<dyn Sink>, ack: SinkAck, metrics: &Metrics) -> Self {
        Self {
            inputs,
            rows_in: metrics.counter("citystream_stage_rows_in_total", "Rows received by a stage.", &[("stage", name)]),
            bytes_in: metrics.counter(
                "citystream_stage_bytes_in_total",
                "Arrow bytes received by a stage.",
                &[("stage", name)],
            ),
            sink,
            ack,
        }
    }

    /// Runs until every input ended; what each table holds.
    pub(crate) async fn run(
        mut self,
        inputs: Vec<mpsc::Receiver<Message>>,
    ) -> Result<BTreeMap<String, TableStats>, PipelineError> {
        let mut watermarks = vec![i64::MIN; self.inputs];
        let mut inputs = Aligner::new(inputs);
        loop {
            match inputs.next().await? {
                Next::Message(input, Message::Batch(b)) => {
                    self.rows_in.inc_by(b.num_rows() as u64);
                    self.bytes_in.inc_by(super::batch_bytes(&b));
                    self.sink.write(input, &b).await?
                }
                Next::Message(input, Message::Watermark(wm)) => {
                    let before = watermarks.iter().copied().min().unwrap_or(i64::MIN);
                    if wm > watermarks[input] {
                        watermarks[input] = wm;
                        self.sink.on_input_watermark(input, wm);
                    }
                    let after = watermarks.iter().copied().min().unwrap_or(i64::MIN);
                    if after > before {
                        self.sink.on_watermark(after)?;
                    }
                }
                Next::Message(input, Message::End) => watermarks[input] = i64::MAX,
                Next::Message(_, Message::Barrier(_)) => unreachable!("the aligner reports barriers as `Aligned`"),
                Next::Aligned(b) => {
                    // everything before the barrier, and nothing after it, is made durable
                    self.sink.flush().await?;
                    self.sink.on_checkpoint(b.epoch);
                    self.ack.ack(b.epoch);
                }
                Next::Ended => {
                    self.sink.on_end();
                    self.sink.flush().await?;
                    return Ok(self.sink.tables());
                }
            }
        }
    }
}
