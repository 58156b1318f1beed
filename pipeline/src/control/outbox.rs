//! Decisions published to Kafka (the alerts topic and the feedback topic), in the order they
//! were made, through an outbox.
//!
//! A decision waits at most `publish_timeout` for the broker; one the broker did not take stays
//! in the outbox (in memory, at most [`MAX_PENDING`]), a background task retries every two
//! seconds, and while anything waits new decisions are refused with 503 (the broker is away:
//! a decision that cannot reach the other control rooms is not made). Delivery is at least
//! once: a send that timed out may still arrive, and then arrives again with the retry.
//!
//! A control center serving a shared book sends a decision's event to the alerts topic first,
//! and only that, with [`Outbox::send_event`] (the topic is where the decision is made); once
//! the decision is applied, its feedback row goes through the outbox.

#[cfg(feature = "kafka")]
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use citystream_operators::Metrics;

use super::ControlError;
use super::config::ControlConfig;

/// The most decisions the outbox holds.
#[cfg(feature = "kafka")]
pub(crate) const MAX_PENDING: usize = 10_000;

/// A decision waiting for the broker: its lifecycle event (none when it is already on the
/// alerts topic) and its feedback row.
#[cfg(feature = "kafka")]
type Queued = (Option<RecordBatch>, RecordBatch);

/// Publishes decisions (see the module docs).
pub(crate) struct Outbox {
    #[cfg(feature = "kafka")]
    writer: tokio::sync::Mutex<(crate::kafka::KafkaWriter, VecDeque<Queued>)>,
    pending: AtomicUsize,
    timeout: Duration,
    alerts_topic: Option<String>,
    feedback_topic: Option<String>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("pending", &self.pending()).finish_non_exhaustive()
    }
}

impl Outbox {
    /// The outbox of `cfg.kafka`, if any.
    pub(crate) fn open(name: &str, cfg: &ControlConfig, metrics: &Metrics) -> Result<Option<Arc<Self>>, ControlError> {
        let bad = |problem: String| ControlError::Config { key: "kafka", problem };
        let Some(k) = &cfg.kafka else { return Ok(None) };
        if k.alerts_topic.is_none() && k.feedback_topic.is_none() {
            return Err(bad("set `alerts_topic`, `feedback_topic` or both".into()));
        }
        #[cfg(feature = "kafka")]
        {
            let topics: Vec<&str> = k.alerts_topic.iter().chain(&k.feedback_topic).map(String::as_str).collect();
            // a message the broker did not take within the timeout is given up by librdkafka
            // too (the outbox sends it again), so a refused decision does not arrive minutes later
            let mut properties = k.properties.clone();
            if !properties.contains_key("message.timeout.ms") && !properties.contains_key("delivery.timeout.ms") {
                // at least a second (librdkafka reads 0 as forever, and it must exceed linger.ms)
                let ms = k.publish_timeout.to_std().as_millis().max(1000);
                properties.insert("message.timeout.ms".into(), crate::primitives::EnvString::literal(ms.to_string()));
            }
            let writer = crate::kafka::KafkaWriter::for_topics(name, &k.brokers, &properties, &topics, metrics)
                .map_err(|e| bad(e.to_string()))?;
            Ok(Some(Arc::new(Self {
                writer: tokio::sync::Mutex::new((writer, VecDeque::new())),
                pending: AtomicUsize::new(0),
                timeout: k.publish_timeout.to_std(),
                alerts_topic: k.alerts_topic.clone(),
                feedback_topic: k.feedback_topic.clone(),
            })))
        }
        #[cfg(not(feature = "kafka"))]
        {
            let _ = (name, metrics);
            Err(bad("this build has no Kafka support (feature `kafka`)".into()))
        }
    }

    /// How long a decision waits for the broker.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Decisions waiting for the broker.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Queues a decision and publishes everything queued, waiting at most the timeout;
    /// `Err` says how many still wait.
    pub(crate) async fn publish(&self, event: Option<&RecordBatch>, feedback: &RecordBatch) -> Result<(), usize> {
        #[cfg(feature = "kafka")]
        {
            let mut guard = self.writer.lock().await;
            if guard.1.len() >= MAX_PENDING {
                return Err(guard.1.len());
            }
            guard.1.push_back((event.cloned(), feedback.clone()));
            self.pending.store(guard.1.len(), Ordering::Relaxed);
            self.drain(&mut guard).await
        }
        #[cfg(not(feature = "kafka"))]
        {
            let _ = (event, feedback, &self.alerts_topic, &self.feedback_topic, self.timeout);
            Err(1)
        }
    }

    #[cfg(feature = "kafka")]
    async fn drain(&self, guard: &mut (crate::kafka::KafkaWriter, VecDeque<Queued>)) -> Result<(), usize> {
        let (w, queue) = guard;
        while let Some((event, feedback)) = queue.front() {
            let sent = async {
                if let (Some(t), Some(event)) = (&self.alerts_topic, event) {
                    w.write(t, Some("location"), event).await?;
                }
                if let Some(t) = &self.feedback_topic {
                    w.write(t, Some("location"), feedback).await?;
                }
                w.flush().await
            };
            match tokio::time::timeout(self.timeout, sent).await {
                Ok(Ok(())) => {
                    queue.pop_front();
                    self.pending.store(queue.len(), Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    tracing::error!("publishing a decision to Kafka: {e}");
                    return Err(queue.len());
                }
                Err(_) => {
                    tracing::warn!(timeout = ?self.timeout, "publishing a decision to Kafka: no answer from the broker");
                    return Err(queue.len());
                }
            }
        }
        Ok(())
    }

    /// Sends a decision's lifecycle event to the alerts topic now, ahead of anything queued,
    /// waiting at most the timeout for the broker's acknowledgement.
    pub(crate) async fn send_event(&self, event: &RecordBatch) -> Result<(), String> {
        let Some(t) = &self.alerts_topic else { return Err("no `alerts_topic`".into()) };
        #[cfg(feature = "kafka")]
        {
            let mut guard = self.writer.lock().await;
            let w = &mut guard.0;
            let sent = async {
                w.write(t, Some("location"), event).await?;
                w.flush().await
            };
            match tokio::time::timeout(self.timeout, sent).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer from the broker within {:?}", self.timeout)),
            }
        }
        #[cfg(not(feature = "kafka"))]
        {
            let _ = (t, event);
            Err("this build has no Kafka support (feature `kafka`)".into())
        }
    }

    /// Retries what waits every two seconds, until the task is dropped.
    pub(crate) async fn retry_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            if self.pending() == 0 {
                continue;
            }
            #[cfg(feature = "kafka")]
            {
                let mut guard = self.writer.lock().await;
                if self.drain(&mut guard).await.is_ok() {
                    tracing::info!("the decisions that waited for Kafka are published");
                }
            }
        }
    }
}
