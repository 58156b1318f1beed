//! Running CPU-bound work from async tasks, and accounting its thread CPU time.

/// Aborts a background task when dropped (the run's end ends it).
#[allow(dead_code)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a synchronous closure that waits on a disk or the network (a file closed with fsync, a
/// snapshot saved, a state store opened) without stalling the async worker threads: on the
/// multi-threaded runtime the worker hands its other tasks to another thread first
/// (`block_in_place`).
///
/// Pure computation does not come here: an operator's call on a batch or a watermark runs on
/// the worker itself (as DataFusion runs its operators), because handing the worker over costs
/// a thread wake-up per call. Measured on the embedded default: 0.6 CPU-s per million events
/// of 4.2, and about 80 MiB of peak memory in the blocking threads' allocator arenas. The
/// worker's other tasks wait for one call: a batch's is bounded by the batch (`batch_rows`), a
/// watermark's or the end's by what the operator releases then (windows closing, a backlog's
/// minutes). An operator that may wait (`Operator::waits`: `admit`'s `delay` policy, the DP
/// ledger's fsync) comes here for each call.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Runs CPU-bound `f` on the calling thread and adds the thread CPU time it used to `counter`.
pub(crate) fn cpu_metered<T>(counter: &citystream_operators::Counter, f: impl FnOnce() -> T) -> T {
    let t0 = thread_cpu_ns();
    let r = f();
    counter.inc_by(thread_cpu_ns().saturating_sub(t0));
    r
}

/// [`blocking`], adding the thread CPU time `f` used to `counter`.
pub(crate) fn blocking_metered<T>(counter: &citystream_operators::Counter, f: impl FnOnce() -> T) -> T {
    blocking(|| cpu_metered(counter, f))
}

/// CPU time consumed by the calling thread, nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_THREAD_CPUTIME_ID is always valid.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc == 0 { ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 } else { 0 }
}
