//! The command line's commands, one file each: [`run`], [`control`] (a control center alone), [`replay`] (a config over archived
//! files), [`report`] (energy), `serve` (Flight SQL), [`simulate`] (and the thumbnail dictionary). `main.rs` parses arguments and dispatches.

pub(crate) mod control;
pub(crate) mod replay;
#[cfg(feature = "sql")]
pub(crate) mod report;
pub(crate) mod run;
#[cfg(feature = "sql")]
pub(crate) mod serve;
pub(crate) mod simulate;

/// A future that completes on SIGINT or SIGTERM (Ctrl-C elsewhere). The handlers are installed
/// when this is called, not when the future is first polled, so a signal sent as soon as a
/// command printed its first line is not missed (and does not kill the process uncleanly).
pub(crate) fn on_termination() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    };
    async move {
        #[cfg(unix)]
        if let (Ok(mut term), Ok(mut int)) = signals {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
