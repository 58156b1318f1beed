//! The simulator as a source task.

use std::time::{Duration, Instant};

use citystream_operators::event_time::EventClock;
use citystream_operators::{Message, Metrics};
use citystream_schemas::EventKind;
use citystream_schemas::raw::RawBatchBuilder;
use tokio::sync::watch;

use super::{SimMessage, SimReport, Simulation, SimulatorConfig, Speed};
use crate::task::{Outputs, PipelineError, Source, SourceContext, SourceReport, cpu_metered};

impl Source for SimulatorConfig {
    fn run(
        self: Box<Self>,
        ctx: SourceContext,
    ) -> futures_util::future::BoxFuture<'static, Result<SourceReport, PipelineError>> {
        Box::pin(async move {
            let SourceContext { name, outputs, clocks, stop, metrics, .. } = ctx;
            let (messages, sim) = run_simulator(&name, *self, outputs, clocks, stop, &metrics).await?;
            Ok(SourceReport { messages, account: Some(Box::new(sim)) })
        })
    }
}

fn port(kind: EventKind) -> usize {
    EventKind::ALL.iter().position(|k| *k == kind).expect("every kind has a port")
}

/// Hands on every batch being built that holds at least `min_rows` rows (≥ 1); returns the
/// rows sent.
async fn hand_on(builders: &mut [RawBatchBuilder], outputs: &Outputs, min_rows: usize) -> Result<u64, PipelineError> {
    let mut sent = 0;
    for (p, b) in builders.iter_mut().enumerate() {
        if b.len() >= min_rows.max(1) {
            sent += b.len() as u64;
            outputs.send(p, Message::Batch(b.finish())).await?;
        }
    }
    Ok(sent)
}

/// Runs the embedded simulator as a source: one raw stream per event kind (one partition, 0),
/// in arrival order. Each stream's watermark is its partition's on the stream's event clock:
/// the newest event time its `decode` stage has seen, minus `max_out_of_orderness`.
async fn run_simulator(
    name: &str,
    cfg: SimulatorConfig,
    outputs: Outputs,
    clocks: Vec<Option<EventClock>>,
    mut stop: watch::Receiver<bool>,
    metrics: &Metrics,
) -> Result<(u64, SimReport), PipelineError> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ground_truth = cfg.ground_truth.clone();
    let batch_rows = cfg.batch_rows.max(1);
    let speed = cfg.speed;
    let mut sim = Simulation::new(cfg, now_ms);
    if let Some(dir) = &ground_truth {
        let dir = std::path::PathBuf::from(dir.as_str());
        sim.write_plan(&dir).map_err(|e| PipelineError::Source {
            source_name: name.to_owned(),
            message: format!("cannot write the ground truth to {}: {e}", dir.display()),
        })?;
    }
    let names: Vec<String> = EventKind::ALL.iter().map(|k| format!("{name}.{k}")).collect();
    let events = EventKind::ALL.map(|k| {
        metrics.counter(
            "citystream_source_events_total",
            "Messages read by a source.",
            &[("source", name), ("stream", k.as_str())],
        )
    });
    let bytes = EventKind::ALL.map(|k| {
        metrics.counter(
            "citystream_source_bytes_total",
            "Payload bytes read by a source.",
            &[("source", name), ("stream", k.as_str())],
        )
    });
    let cpu_ns = metrics.counter(
        "citystream_stage_cpu_nanoseconds_total",
        "Thread CPU time spent in a stage's operator.",
        &[("stage", name)],
    );
    let sim_clock = metrics.gauge("citystream_simulator_time_ms", "The simulated clock.", &[("source", name)]);
    let mut builders: Vec<RawBatchBuilder> =
        EventKind::ALL.iter().map(|_| RawBatchBuilder::with_capacity(batch_rows, batch_rows * 200)).collect();
    let mut offsets = [0i64; 3];
    let mut total = 0u64;
    let wall0 = Instant::now();
    let sim0 = sim.start_ms();
    let mut pending: Vec<SimMessage> = Vec::new();
    let mut last_wm = vec![i64::MIN; clocks.len()];
    // false once every StopHandle is gone (then `changed` would return at once, forever)
    let mut stop_open = true;
    loop {
        if *stop.borrow() {
            tracing::info!(source = name, "stop requested: draining");
            break;
        }
        // generate until a batch is full (or, when paced, one step at a time)
        let more = cpu_metered(&cpu_ns, || {
            let mut more = true;
            // a call runs on the async worker: bounded even when only a sparse stream is
            // read (its batch would take a day of the city to fill)
            let mut generated = 0;
            while more && generated < 4 * batch_rows && builders.iter().all(|b| b.len() < batch_rows) {
                pending.clear();
                more = sim.step(&mut pending);
                generated += pending.len();
                for m in pending.drain(..) {
                    let p = port(m.kind);
                    if !outputs.is_connected(p) {
                        continue;
                    }
                    builders[p].append(&names[p], 0, offsets[p], m.arrival_ms, &m.payload);
                    offsets[p] += 1;
                    events[p].inc();
                    bytes[p].inc_by(m.payload.len() as u64);
                }
                if matches!(speed, Speed::Factor(_)) {
                    break;
                }
            }
            more
        });
        let min_rows = if !more || matches!(speed, Speed::Factor(_)) { 1 } else { batch_rows };
        total += hand_on(&mut builders, &outputs, min_rows).await?;
        sim_clock.set(sim.now_ms() as f64);
        let moved: Vec<(usize, i64)> = clocks
            .iter()
            .enumerate()
            .filter_map(|(p, c)| {
                c.as_ref().and_then(|c| c.watermark(0)).filter(|wm| *wm > last_wm[p]).map(|wm| (p, wm))
            })
            .collect();
        if !moved.is_empty() && more {
            // hand on every row read so far first, including partly filled batches of the
            // quieter streams, so their events are not held back behind the watermark
            total += hand_on(&mut builders, &outputs, 1).await?;
            for (p, wm) in moved {
                last_wm[p] = wm;
                outputs.send(p, Message::Watermark(wm)).await?;
            }
        }
        if !more {
            break;
        }
        if let Speed::Factor(f) = speed {
            let due = Duration::from_secs_f64(((sim.now_ms() - sim0) as f64 / 1000.0 / f).max(0.0));
            let wait = due.saturating_sub(wall0.elapsed());
            if !wait.is_zero() {
                if stop_open {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        changed = stop.changed() => stop_open = changed.is_ok(),
                    }
                } else {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    total += hand_on(&mut builders, &outputs, 1).await?;
    outputs.broadcast(Message::End).await?;
    if let Some(dir) = ground_truth {
        let dir = std::path::PathBuf::from(dir.as_str());
        sim.write_ground_truth(&dir).map_err(|e| PipelineError::Source {
            source_name: name.to_owned(),
            message: format!("cannot write the ground truth to {}: {e}", dir.display()),
        })?;
    }
    Ok((total, sim.report()))
}
