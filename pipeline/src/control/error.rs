//! Why the control center cannot start, or cannot take a batch of alerts.

use std::path::PathBuf;

use super::auth::TokensError;
use crate::sink::parquet::ParquetSinkError;

/// An error of the control center.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The tokens cannot be loaded.
    #[error(transparent)]
    Tokens(#[from] TokensError),
    /// A setting, or a file a setting names (`road_graph`, `sites`, `calibration_file`), is
    /// wrong.
    #[error("{key}: {problem}")]
    Config {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The address cannot be listened on.
    #[error("control center: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A batch of alerts lacks a column of the alert schema.
    #[error("no column `{0}`")]
    MissingColumn(String),
    /// The `alerts` table could not be read to restore the book.
    #[error("{}: {source}", path.display())]
    Lake {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The decision tables (`feedback`, `alerts` under `feedback_path`) cannot be written.
    #[error("feedback table: {0}")]
    Decisions(#[from] ParquetSinkError),
    /// The calibration file cannot be written.
    #[error("calibration_file `{}`: {source}", path.display())]
    Calibrations {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}
