//! Running CPU-bound work from async tasks, and accounting its thread CPU time.

/// Aborts a background task when dropped (the run's end ends it).
#[allow(dead_code)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a synchronous, CPU-bound closure without stalling the async worker threads.
pub(crate) fn cpu<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Like [`cpu`], and adds the thread CPU time `f` used to `counter`.
pub(crate) fn cpu_metered<T>(counter: &citystream_operators::Counter, f: impl FnOnce() -> T) -> T {
    cpu(|| {
        let t0 = thread_cpu_ns();
        let r = f();
        counter.inc_by(thread_cpu_ns().saturating_sub(t0));
        r
    })
}

/// CPU time consumed by the calling thread, nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_THREAD_CPUTIME_ID is always valid.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc == 0 { ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 } else { 0 }
}
