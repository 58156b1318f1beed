//! The command line's commands, one file each: [`run`], [`replay`] (a config over archived
//! files), [`report`] (energy), [`simulate`] (and the thumbnail dictionary). `main.rs` parses arguments and dispatches.

pub(crate) mod replay;
#[cfg(feature = "sql")]
pub(crate) mod report;
pub(crate) mod run;
pub(crate) mod simulate;
