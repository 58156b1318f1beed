//! The energy and carbon account: per task (source, stage, sink) and interval, the thread CPU
//! time it used, the rows it took in and handed on, the joules that CPU time cost and the
//! grams of CO2-equivalent at the grid's intensity — written to an `energy` Parquet table and
//! published as metrics.
//!
//! Joules come from Intel RAPL (`/sys/class/powercap/intel-rapl:*/energy_uj`) when the machine
//! exposes it: the package energy of the interval is shared among tasks by their CPU time over
//! the machine's busy CPU time (`/proc/stat`). Otherwise from a documented model:
//! `cpu_s × watts_per_busy_core`, plus `idle_watts × interval` shared by CPU time. Each row says
//! which (`source`). GPU time (`gpu_s`) is the NVML busy time of the device shared among the
//! `infer` stages on the CUDA provider (`crate::gpu`); absent without NVML or such a stage,
//! never invented.
//! Carbon intensity (gCO2e/kWh) is a constant, an hourly series from a CSV file, or read live
//! from a Kafka topic (`carbon_topic`: JSON `{"hour": "2026-03-02T08:00:00Z", "g_per_kwh": 412}`
//! for an hour of a forecast or measured series, or `{"g_per_kwh": 412}` for "from now on").
//!
//! One file per job: [`config`] (`runtime.energy` YAML), [`account`] (an interval's rows from
//! counter samples, and the `energy` table), [`power`] (RAPL and `/proc/stat` readers),
//! [`intensity`] (the grid's gCO2e/kWh), [`recorder`] (the task that samples, accounts and
//! writes), [`policy`] (carbon-aware scheduling of deferrable work), [`services`] (what a run starts of
//! them, as `task::Service`).

mod account;
mod config;
mod intensity;
mod policy;
mod power;
mod recorder;
pub(crate) mod services;

pub use account::{EnergyRow, Sample, account, schema};
pub use config::{CarbonTopicConfig, EnergyConfig};
pub use intensity::{Intensity, IntensityError, MAX_HOURS};
pub(crate) use policy::run_policy;
pub use policy::{
    CarbonPolicyConfig, CarbonScheduler, CompactionPolicyConfig, Decision, ExportPolicyConfig, d_alert_floor,
};
pub use power::Power;
pub(crate) use recorder::run;
