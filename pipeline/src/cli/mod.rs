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
