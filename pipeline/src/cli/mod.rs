//! The command line's commands, one file each: [`run`], [`report`] (energy), [`simulate`]
//! (and the thumbnail dictionary). `main.rs` parses arguments and dispatches.

#[cfg(feature = "sql")]
pub(crate) mod report;
pub(crate) mod run;
pub(crate) mod simulate;
