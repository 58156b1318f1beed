//! Where the joules of an interval come from: the model, or Intel RAPL counters shared by
//! CPU time over the machine's busy time (`/proc/stat`).

/// Where the joules of an interval come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Power {
    /// The model: watts per busy core, idle watts, over `seconds`.
    Model {
        /// W per busy core.
        watts_per_busy_core: f64,
        /// Baseline W.
        idle_watts: f64,
        /// Interval length.
        seconds: f64,
    },
    /// RAPL: the package joules of the interval and the machine's busy CPU seconds.
    Rapl {
        /// Package energy of the interval.
        joules: f64,
        /// Busy CPU seconds of the whole machine in the interval.
        machine_busy_s: f64,
    },
}

/// Package energy counters, in µJ, when readable.
pub(super) fn rapl_uj() -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    for e in std::fs::read_dir("/sys/class/powercap").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("intel-rapl:") && name.matches(':').count() == 1 {
            total += std::fs::read_to_string(e.path().join("energy_uj")).ok()?.trim().parse::<u64>().ok()?;
            any = true;
        }
    }
    any.then_some(total)
}

/// Busy CPU seconds of the machine so far (`/proc/stat`: all but idle and iowait).
pub(super) fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let busy: u64 = v.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(busy as f64 / hz)
}
