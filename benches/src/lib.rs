//! # citystream-benches
//!
//! Criterion benches (`benches/`) and the end-to-end throughput harness (`src/bin/e2e.rs`),
//! with the helpers they share: simulator payloads and process resource usage.

#![deny(missing_docs)]

use citystream_pipeline::simulator::{FaultConfig, Simulation, SimulatorConfig};
use citystream_schemas::EventKind;

/// `n` valid payloads of `kind` from the simulator (default city, no faults, seed 7).
pub fn sample_payloads(kind: EventKind, n: usize) -> Vec<Vec<u8>> {
    let cfg = SimulatorConfig { seed: 7, faults: FaultConfig::none(), ..SimulatorConfig::default() };
    let mut sim = Simulation::new(cfg, 0);
    let mut out = Vec::with_capacity(n);
    let mut step = Vec::new();
    while out.len() < n && sim.step(&mut step) {
        out.extend(step.drain(..).filter(|m| m.kind == kind).map(|m| m.payload));
    }
    out.truncate(n);
    out
}

/// CPU time (user + system) and peak resident memory of this process so far.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User plus system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size, MiB.
    pub peak_rss_mib: f64,
}

/// Reads [`Usage`] with `getrusage`.
pub fn usage() -> Usage {
    // SAFETY: getrusage fills the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF is valid and `ru` is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage { cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime), peak_rss_mib: ru.ru_maxrss as f64 / 1024.0 }
}
