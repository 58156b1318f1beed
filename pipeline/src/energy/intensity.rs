//! Carbon intensity of the grid (gCO2e/kWh): a constant, an hourly CSV series, or live values
//! from a Kafka topic, with the latest [`MAX_HOURS`] hours kept.

use std::collections::BTreeMap;

use std::sync::Arc;

#[cfg(feature = "kafka")]
use citystream_operators::Metrics;
use serde::Deserialize;

#[cfg(feature = "kafka")]
use super::config::CarbonTopicConfig;
use super::config::EnergyConfig;

/// Hours of intensity kept (two years): beyond it the earliest hours are forgotten, so a topic
/// that keeps publishing (or names hours far apart) cannot grow the process without bound.
pub const MAX_HOURS: usize = 2 * 366 * 24;

/// Carbon intensity: per hour where a series names it, else the latest live value, else the
/// constant. Clones share the series (a Kafka reader updates every holder). At most
/// [`MAX_HOURS`] hours are held.
#[derive(Debug, Clone, Default)]
pub struct Intensity {
    constant: f64,
    hourly: Arc<std::sync::RwLock<BTreeMap<i64, f64>>>,
    latest: Arc<std::sync::RwLock<Option<f64>>>,
}

/// Keeps the latest [`MAX_HOURS`] hours of `hourly`.
fn forget_earliest(hourly: &mut BTreeMap<i64, f64>) {
    while hourly.len() > MAX_HOURS {
        hourly.pop_first();
    }
}

/// Why the grid intensity cannot be read, or a live message is refused.
#[derive(Debug, thiserror::Error)]
pub enum IntensityError {
    /// The series file cannot be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the series file is not `hour,g_per_kwh`.
    #[error("{file}:{line}: {problem}")]
    Line {
        /// The file.
        file: String,
        /// The line (1-based).
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// A live message is not `{"hour": RFC 3339, "g_per_kwh": n}` or `{"g_per_kwh": n}`.
    #[error("{0}")]
    Message(String),
    /// The Kafka topic cannot be read.
    #[error("carbon_topic: {0}")]
    Topic(String),
}

impl Intensity {
    /// From the config (reads the series file).
    pub fn from_config(cfg: &EnergyConfig) -> Result<Self, IntensityError> {
        let mut hourly = BTreeMap::new();
        if let Some(f) = &cfg.carbon_file {
            let file = || f.as_str().to_owned();
            let text =
                std::fs::read_to_string(f.as_str()).map_err(|source| IntensityError::Read { file: file(), source })?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
                let bad = |problem: String| IntensityError::Line { file: file(), line: i + 1, problem };
                let (t, v) = line.split_once(',').ok_or_else(|| bad("expected `hour,g_per_kwh`".into()))?;
                let t =
                    chrono::DateTime::parse_from_rfc3339(t.trim()).map_err(|e| bad(e.to_string()))?.timestamp_millis();
                let v: f64 = v.trim().parse().map_err(|e: std::num::ParseFloatError| bad(e.to_string()))?;
                hourly.insert(t.div_euclid(3_600_000), v);
            }
            forget_earliest(&mut hourly);
        }
        Ok(Self {
            constant: cfg.carbon_g_per_kwh,
            hourly: Arc::new(std::sync::RwLock::new(hourly)),
            latest: Default::default(),
        })
    }

    /// The intensity at `ts_ms`: the series' hour, else the latest live value, else the constant.
    pub fn at(&self, ts_ms: i64) -> f64 {
        let hourly = self.hourly.read().unwrap_or_else(|e| e.into_inner());
        hourly
            .get(&ts_ms.div_euclid(3_600_000))
            .copied()
            .or(*self.latest.read().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or(self.constant)
    }

    /// Applies one intensity message (JSON `{"hour": RFC 3339, "g_per_kwh": n}` or
    /// `{"g_per_kwh": n}`).
    pub fn apply_message(&self, payload: &[u8]) -> Result<(), IntensityError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Msg {
            #[serde(default)]
            hour: Option<String>,
            g_per_kwh: f64,
        }
        let m: Msg = serde_json::from_slice(payload).map_err(|e| IntensityError::Message(e.to_string()))?;
        if !m.g_per_kwh.is_finite() || m.g_per_kwh < 0.0 {
            return Err(IntensityError::Message(format!("g_per_kwh {} is not a non-negative number", m.g_per_kwh)));
        }
        match m.hour {
            Some(h) => {
                let t = chrono::DateTime::parse_from_rfc3339(&h)
                    .map_err(|e| IntensityError::Message(format!("hour `{h}`: {e}")))?;
                let mut hourly = self.hourly.write().unwrap_or_else(|e| e.into_inner());
                hourly.insert(t.timestamp_millis().div_euclid(3_600_000), m.g_per_kwh);
                forget_earliest(&mut hourly);
            }
            None => *self.latest.write().unwrap_or_else(|e| e.into_inner()) = Some(m.g_per_kwh),
        }
        Ok(())
    }

    /// Hours of the series held.
    pub fn hours(&self) -> usize {
        self.hourly.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Reads `cfg`'s topic from its start and then live into this intensity until the task is
    /// aborted; bad messages are logged and counted, never applied.
    #[cfg(feature = "kafka")]
    pub fn follow(
        &self,
        cfg: &CarbonTopicConfig,
        metrics: &Metrics,
    ) -> Result<tokio::task::JoinHandle<()>, IntensityError> {
        use rdkafka::Message;
        use rdkafka::consumer::{Consumer, StreamConsumer};
        let mut cc = crate::kafka::client_config(&cfg.brokers, &cfg.properties);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // a private group: every process reads the whole series, and commits nothing
        cc.set("group.id", format!("citystream-carbon-{}-{nanos:x}", std::process::id()));
        cc.set("auto.offset.reset", "earliest");
        cc.set("enable.auto.commit", "false");
        let consumer: StreamConsumer = cc.create().map_err(|e| IntensityError::Topic(e.to_string()))?;
        consumer.subscribe(&[cfg.topic.as_str()]).map_err(|e| IntensityError::Topic(e.to_string()))?;
        // the loop below waits on the consumer's stream: its broker watch runs on a thread
        let consumer = Arc::new(consumer);
        let rebootstrap =
            crate::kafka::rebootstrap::RebootstrapThread::start("the carbon intensity reader", consumer.clone(), |c| {
                c.client().native_ptr()
            })
            .map_err(|e| IntensityError::Topic(format!("starting its broker watch: {e}")))?;
        let this = self.clone();
        let outcome = |o: &str| {
            metrics.counter("citystream_carbon_messages_total", "Grid intensity messages read.", &[("outcome", o)])
        };
        let (ok, bad) = (outcome("applied"), outcome("invalid"));
        let topic = cfg.topic.clone();
        Ok(tokio::spawn(async move {
            // stopped and joined when the task is aborted
            let _rebootstrap = rebootstrap;
            loop {
                match consumer.recv().await {
                    Ok(m) => match this.apply_message(m.payload().unwrap_or_default()) {
                        Ok(()) => ok.inc(),
                        Err(e) => {
                            bad.inc();
                            tracing::warn!(topic = %topic, offset = m.offset(), "carbon intensity message ignored: {e}");
                        }
                    },
                    Err(e) => {
                        tracing::warn!(topic = %topic, "carbon intensity topic: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn an_hourly_series_overrides_the_constant() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("grid.csv");
        std::fs::write(&f, "# hour,g\n2026-03-02T08:00:00Z,412\n2026-03-02T09:00:00Z,120\n").unwrap();
        let cfg: EnergyConfig =
            serde_saphyr::from_str(&format!("path: /tmp/x\ncarbon_file: {}\ncarbon_g_per_kwh: 300\n", f.display()))
                .unwrap();
        let i = Intensity::from_config(&cfg).unwrap();
        let h8 = 1_772_438_400_000; // 2026-03-02T08:00Z
        assert_eq!(i.at(h8 + 10), 412.0);
        assert_eq!(i.at(h8 + 3_600_000 + 5), 120.0);
        assert_eq!(i.at(h8 - 1), 300.0);
        std::fs::write(&f, "yesterday,12\n").unwrap();
        let e = Intensity::from_config(&cfg).unwrap_err();
        assert!(matches!(e, IntensityError::Line { line: 1, .. }), "{e:?}");
        assert!(e.to_string().contains("grid.csv:1"), "{e}");
    }

    #[test]
    fn intensity_messages_set_an_hour_or_the_value_from_now_on_and_bad_ones_change_nothing() {
        let cfg: EnergyConfig = serde_saphyr::from_str("path: /tmp/x\ncarbon_g_per_kwh: 300\n").unwrap();
        let i = Intensity::from_config(&cfg).unwrap();
        let shared = i.clone();
        let h8 = 1_772_438_400_000; // 2026-03-02T08:00:00Z
        assert_eq!(i.at(h8), 300.0);
        i.apply_message(br#"{"hour": "2026-03-02T08:00:00Z", "g_per_kwh": 512}"#).unwrap();
        assert_eq!((shared.at(h8 + 59 * 60_000), shared.at(h8 + 3_600_000)), (512.0, 300.0), "clones share");
        i.apply_message(br#"{"g_per_kwh": 120.5}"#).unwrap();
        assert_eq!((i.at(h8), i.at(h8 + 3_600_000)), (512.0, 120.5), "the series' hour, else the latest");
        for bad in
            [&br#"{"g_per_kwh": -1}"#[..], br#"{"hour": "8 o'clock", "g_per_kwh": 1}"#, b"412", br#"{"gco2": 1}"#]
        {
            assert!(i.apply_message(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!((i.at(h8), i.at(h8 + 3_600_000)), (512.0, 120.5));
    }

    #[test]
    fn the_hourly_series_keeps_its_latest_hours_only() {
        let cfg: EnergyConfig = serde_saphyr::from_str("path: /tmp/x\ncarbon_g_per_kwh: 300\n").unwrap();
        let i = Intensity::from_config(&cfg).unwrap();
        let h0 = chrono::DateTime::parse_from_rfc3339("2020-01-01T00:00:00Z").unwrap();
        let n = MAX_HOURS + 500;
        for h in 0..n {
            let hour = (h0 + chrono::Duration::hours(h as i64)).to_rfc3339();
            i.apply_message(format!(r#"{{"hour": "{hour}", "g_per_kwh": {h}}}"#).as_bytes()).unwrap();
        }
        assert_eq!(i.hours(), MAX_HOURS);
        let ms = |h: usize| h0.timestamp_millis() + h as i64 * 3_600_000;
        assert_eq!(i.at(ms(n - 1)), (n - 1) as f64, "the latest hour is kept");
        assert_eq!(i.at(ms(499)), 300.0, "the earliest hours are forgotten");
        assert_eq!(i.at(ms(500)), 500.0);
    }
}
