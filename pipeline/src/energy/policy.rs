//! `runtime.carbon_policy`: deferrable work (compaction, training exports) waits for
//! low-carbon hours, never longer than its `max_delay`.

use std::path::{Path, PathBuf};

use citystream_operators::{Duration, EnvString, Metrics};
use serde::Deserialize;

use super::config::d_interval;
use super::intensity::Intensity;

/// `runtime.carbon_policy` in YAML: deferrable work waits for low-carbon hours.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarbonPolicyConfig {
    /// Grid intensity (gCO2e/kWh) above which deferrable work waits.
    pub high_g_per_kwh: f64,
    /// How often the policy is checked. Default `1m`.
    #[serde(default = "d_interval")]
    pub check_every: Duration,
    /// Parquet compaction as deferrable work; absent: the pipeline never compacts by itself
    /// (the policy still tracks the grid's mode for the stages that switch models).
    #[serde(default)]
    pub compaction: Option<CompactionPolicyConfig>,
    /// Training exports (settled partitions of lake tables copied for `models/train`) as
    /// deferrable work. Default: none.
    #[serde(default)]
    pub training_export: Option<ExportPolicyConfig>,
    /// The high mode also holds while the pipeline draws more than this (watts, from the
    /// energy account's latest interval). Default: none (the grid alone decides).
    #[serde(default)]
    pub energy_budget_watts: Option<f64>,
    /// Alerting is never degraded below this: a stage that alert rules read may predict a calm
    /// segment at most this far apart in the high mode (`infer` `carbon.calm.every`). Default `5m`.
    #[serde(default = "d_alert_floor")]
    pub alert_floor: Duration,
}

/// The default alert floor (5 minutes).
pub fn d_alert_floor() -> Duration {
    Duration::from_secs(300)
}

/// When compaction runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactionPolicyConfig {
    /// Compaction is due this long after the last one. Default `1h`.
    #[serde(default = "d_hour")]
    pub every: Duration,
    /// A due compaction waits at most this long for a low-carbon hour, then runs anyway.
    /// Default `6h`.
    #[serde(default = "d_six_hours")]
    pub max_delay: Duration,
    /// Files younger than this are left alone. Default `10m`.
    #[serde(default = "d_ten_minutes")]
    pub min_age: Duration,
    /// Target size of merged files, MiB. Default 128.
    #[serde(default = "d_target_mb")]
    pub target_mb: u64,
}

/// When and what the training export copies (`sink::export`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportPolicyConfig {
    /// Where the export tree goes (read by `models/train/feedback.py` and `train.py --feedback-lake`).
    pub to: EnvString,
    /// The lake tables exported. Default `[traffic_minutes, feedback, alerts]`.
    #[serde(default = "d_export_tables")]
    pub tables: Vec<String>,
    /// An export is due this long after the last one. Default `1d`.
    #[serde(default = "d_day")]
    pub every: Duration,
    /// A due export waits at most this long for a low-carbon hour. Default `12h`.
    #[serde(default = "d_twelve_hours")]
    pub max_delay: Duration,
    /// Partitions with a file younger than this wait for a later run. Default `10m`.
    #[serde(default = "d_ten_minutes")]
    pub min_age: Duration,
}

fn d_export_tables() -> Vec<String> {
    ["traffic_minutes", "feedback", "alerts"].map(String::from).to_vec()
}
fn d_day() -> Duration {
    Duration::from_secs(86_400)
}
fn d_twelve_hours() -> Duration {
    Duration::from_secs(12 * 3600)
}

fn d_hour() -> Duration {
    Duration::from_secs(3600)
}
fn d_six_hours() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn d_ten_minutes() -> Duration {
    Duration::from_secs(600)
}
fn d_target_mb() -> u64 {
    128
}

/// What the policy decided at one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is due.
    Idle,
    /// Compaction is due and the grid is clean enough: run it.
    Run,
    /// Compaction is due but the grid is dirty: wait.
    Defer,
    /// Compaction waited `max_delay`: run it whatever the grid.
    Forced,
}

/// The carbon-aware scheduler of deferrable work (a pure state machine; the runtime feeds it
/// the clock and the intensity).
#[derive(Debug, Clone)]
pub struct CarbonScheduler {
    high: f64,
    budget_watts: Option<f64>,
    every_ms: i64,
    max_delay_ms: i64,
    last_run_ms: i64,
    high_mode: Option<bool>,
}

impl CarbonScheduler {
    /// A scheduler whose first compaction is due `every` after `start_ms`.
    pub fn new(cfg: &CarbonPolicyConfig, c: &CompactionPolicyConfig, start_ms: i64) -> Self {
        Self::periodic(cfg, c.every, c.max_delay, start_ms)
    }

    /// A scheduler of any deferrable job due every `every`, waiting at most `max_delay`.
    pub fn periodic(cfg: &CarbonPolicyConfig, every: Duration, max_delay: Duration, start_ms: i64) -> Self {
        Self {
            high: cfg.high_g_per_kwh,
            budget_watts: cfg.energy_budget_watts,
            every_ms: every.as_millis_i64(),
            max_delay_ms: max_delay.as_millis_i64(),
            last_run_ms: start_ms,
            high_mode: None,
        }
    }

    /// Whether the pipeline is in the high mode now (the grid above the threshold, or the
    /// pipeline's power above the budget), and whether that changed.
    pub fn mode(&mut self, g_per_kwh: f64, watts: Option<f64>) -> (bool, bool) {
        let high = self.is_high(g_per_kwh, watts);
        let changed = self.high_mode != Some(high);
        self.high_mode = Some(high);
        (high, changed)
    }

    /// Above the budget enters the high mode; only below 90% of it leaves it again (the high
    /// mode lowers the power, which must not flip the mode back at the next check).
    fn is_high(&self, g_per_kwh: f64, watts: Option<f64>) -> bool {
        let over = match (watts, self.budget_watts) {
            (Some(w), Some(b)) if self.high_mode == Some(true) => w > 0.9 * b,
            (Some(w), Some(b)) => w > b,
            _ => false,
        };
        g_per_kwh > self.high || over
    }

    /// The decision at `now_ms` with the grid at `g_per_kwh` and the pipeline drawing `watts`.
    pub fn decide(&mut self, now_ms: i64, g_per_kwh: f64, watts: Option<f64>) -> Decision {
        let due_since = self.last_run_ms + self.every_ms;
        if now_ms < due_since {
            return Decision::Idle;
        }
        let d = if !self.is_high(g_per_kwh, watts) {
            Decision::Run
        } else if now_ms - due_since >= self.max_delay_ms {
            Decision::Forced
        } else {
            Decision::Defer
        };
        if d != Decision::Defer {
            self.last_run_ms = now_ms;
        }
        d
    }
}

fn mode_gauge(metrics: &Metrics) -> citystream_operators::Gauge {
    metrics.gauge(
        "citystream_carbon_high_mode",
        "1 while the grid is above the policy's threshold or the pipeline above its energy budget.",
        &[],
    )
}

/// Sets the policy's mode from the grid as it is now, before any stage reads it: stages that
/// switch with the mode (`infer`'s `carbon`) then take the first rows in the mode the policy
/// starts in, not in the normal mode until the policy's first check runs (a race a backlog
/// loses: with a constant grid above the threshold, one run predicted every calm minute for
/// its first seconds and another did not).
pub(crate) fn set_initial_mode(cfg: &CarbonPolicyConfig, intensity: &Intensity, metrics: &Metrics) {
    let g = intensity.at(chrono::Utc::now().timestamp_millis());
    mode_gauge(metrics).set(if g > cfg.high_g_per_kwh { 1.0 } else { 0.0 });
}

/// Runs the carbon policy until the pipeline ends: compacts the Parquet roots when due and
/// the grid allows, logging and counting every switch and action.
pub(crate) async fn run_policy(
    cfg: CarbonPolicyConfig,
    intensity: Intensity,
    roots: Vec<PathBuf>,
    positioned: crate::sink::compact::Positioned,
    metrics: Metrics,
) {
    // without compaction the policy still publishes the grid's mode, which stages read
    // (an `infer` stage's `carbon` model switch)
    let compaction = cfg.compaction.clone();
    let for_sched = compaction.clone().unwrap_or_else(|| serde_saphyr::from_str("{}").expect("defaults deserialize"));
    let mut sched = CarbonScheduler::new(&cfg, &for_sched, chrono::Utc::now().timestamp_millis());
    let action = |a: &str| {
        metrics.counter(
            "citystream_policy_actions_total",
            "Actions of the carbon-aware policy.",
            &[("policy", "compaction"), ("action", a)],
        )
    };
    let mode = mode_gauge(&metrics);
    let intensity_gauge = metrics.gauge("citystream_carbon_g_per_kwh", "The grid's carbon intensity now.", &[]);
    let switches = |to: &str| {
        metrics.counter("citystream_carbon_mode_switches_total", "Switches of the carbon policy's mode.", &[("to", to)])
    };
    let export = cfg.training_export.clone();
    let mut export_sched = export
        .as_ref()
        // due `every` after the last recorded run; without a record, at once (the manifest
        // makes a repeated export incremental)
        .map(|e| {
            let now = chrono::Utc::now().timestamp_millis();
            let last = crate::sink::export::last_run(Path::new(e.to.as_str()))
                .filter(|t| *t <= now)
                .unwrap_or(now - e.every.as_millis_i64());
            CarbonScheduler::periodic(&cfg, e.every, e.max_delay, last)
        });
    let export_action = |a: &str| {
        metrics.counter(
            "citystream_policy_actions_total",
            "Actions of the carbon-aware policy.",
            &[("policy", "training_export"), ("action", a)],
        )
    };
    let mut export_job: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(cfg.check_every.to_std().max(std::time::Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let now = chrono::Utc::now().timestamp_millis();
        let g = intensity.at(now);
        let watts = metrics.value("citystream_energy_watts", &[]);
        let (high, changed) = sched.mode(g, watts);
        mode.set(if high { 1.0 } else { 0.0 });
        intensity_gauge.set(g);
        if changed {
            switches(if high { "high" } else { "normal" }).inc();
            tracing::info!(
                g_per_kwh = g,
                watts,
                high,
                "carbon policy: {}",
                if high { "high mode (grid or energy budget): deferring, cheaper inference" } else { "normal mode" }
            );
        }
        if let (Some(e), Some(s)) = (&export, export_sched.as_mut()) {
            let d = s.decide(now, g, watts);
            match d {
                Decision::Idle => {}
                Decision::Defer => export_action("defer").inc(),
                Decision::Run | Decision::Forced if export_job.as_ref().is_some_and(|j| !j.is_finished()) => {
                    export_action("still_running").inc();
                }
                Decision::Run | Decision::Forced => {
                    export_action(if d == Decision::Run { "run" } else { "forced" }).inc();
                    // off the policy loop: the mode keeps being checked while a long export runs
                    let (roots, e) = (roots.clone(), e.clone());
                    export_job = Some(tokio::task::spawn_blocking(move || {
                        let to = PathBuf::from(e.to.as_str());
                        let mut ok = true;
                        for root in &roots {
                            match crate::sink::export::export(root, &e.tables, &to, e.min_age.to_std()) {
                                Ok(r) => tracing::info!(
                                    ?d,
                                    partitions = r.partitions,
                                    rows = r.rows,
                                    skipped = r.skipped,
                                    "carbon policy: training export"
                                ),
                                Err(e) => {
                                    ok = false;
                                    tracing::error!("carbon policy: training export failed: {e}");
                                }
                            }
                        }
                        if ok
                            && let Err(e) = crate::sink::export::record_run(&to, chrono::Utc::now().timestamp_millis())
                        {
                            tracing::warn!("carbon policy: recording the training export's run: {e}");
                        }
                    }));
                }
            }
        }
        let Some(c) = &compaction else { continue };
        let d = sched.decide(now, g, watts);
        match d {
            Decision::Idle => {}
            Decision::Defer => {
                action("defer").inc();
            }
            Decision::Run | Decision::Forced => {
                action(if d == Decision::Run { "run" } else { "forced" }).inc();
                let opts = crate::sink::compact::CompactOptions {
                    target_bytes: c.target_mb << 20,
                    min_age: c.min_age.to_std(),
                    positioned: positioned.clone(),
                    ..Default::default()
                };
                for root in &roots {
                    let (root, opts) = (root.clone(), opts.clone());
                    match tokio::task::spawn_blocking(move || crate::sink::compact::compact(&root, &opts)).await {
                        Ok(Ok(r)) => tracing::info!(
                            ?d,
                            partitions = r.partitions,
                            files_in = r.files_in,
                            files_out = r.files_out,
                            "carbon policy: compacted"
                        ),
                        Ok(Err(e)) => tracing::error!("carbon policy: compaction failed: {e}"),
                        Err(e) => tracing::error!("carbon policy: compaction task: {e}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn compaction_waits_for_a_clean_hour_but_never_longer_than_max_delay() {
        let cfg: CarbonPolicyConfig =
            serde_saphyr::from_str("high_g_per_kwh: 300\ncompaction: {every: 1h, max_delay: 3h}\n").unwrap();
        let mut s = CarbonScheduler::new(&cfg, cfg.compaction.as_ref().unwrap(), 0);
        let h = 3_600_000;
        // a scripted grid, one check per hour (fake clock)
        let grid = [500.0, 500.0, 200.0, 450.0, 450.0, 450.0, 450.0, 450.0, 100.0];
        let decisions: Vec<Decision> = grid.iter().enumerate().map(|(i, g)| s.decide(i as i64 * h, *g, None)).collect();
        use Decision::*;
        assert_eq!(
            decisions,
            [Idle, Defer, Run, Defer, Defer, Defer, Forced, Defer, Run],
            "due at 1 h (dirty: wait), clean at 2 h (run); due at 3 h, dirty until 6 h = 3 h late (forced); due at 7 h, clean at 8 h"
        );
        assert_eq!(s.mode(500.0, None), (true, true));
        assert_eq!(s.mode(600.0, None), (true, false));
        assert_eq!(s.mode(100.0, None), (false, true));
    }

    #[test]
    fn an_energy_budget_also_sets_the_high_mode_and_defers_compaction() {
        let cfg: CarbonPolicyConfig = serde_saphyr::from_str(
            "high_g_per_kwh: 300\nenergy_budget_watts: 40\ncompaction: {every: 1h, max_delay: 3h}\n",
        )
        .unwrap();
        let mut s = CarbonScheduler::new(&cfg, cfg.compaction.as_ref().unwrap(), 0);
        // a clean grid throughout; the pipeline's power (fake clock, one check per hour)
        let watts = [10.0, 55.0, 55.0, 30.0, 80.0];
        let modes: Vec<(bool, bool)> = watts.iter().map(|w| s.mode(100.0, Some(*w))).collect();
        assert_eq!(modes, [(false, true), (true, true), (true, false), (false, true), (true, true)]);
        // hysteresis: in the high mode, 38 W (under the budget, above 90% of it) keeps it
        assert_eq!(s.mode(100.0, Some(38.0)), (true, false));
        assert_eq!(s.mode(100.0, Some(35.0)), (false, true));
        assert_eq!(s.mode(100.0, Some(38.0)), (false, false), "entering needs the budget itself");
        assert_eq!(s.mode(100.0, None), (false, false), "no reading: the grid decides");
        let h = 3_600_000;
        let d: Vec<Decision> = watts.iter().enumerate().map(|(i, w)| s.decide(i as i64 * h, 100.0, Some(*w))).collect();
        assert_eq!(d, [Decision::Idle, Decision::Defer, Decision::Defer, Decision::Run, Decision::Defer]);
    }
}
