//! Why an event was rejected.

use std::fmt;

/// A stable, machine-readable class of rejection, stored in `dead_letters.reason_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReasonCode {
    /// The payload is not one well-formed JSON object.
    BadJson,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong JSON type (a string where a number belongs, a null where a value is required).
    WrongType,
    /// `schema_version` is not one this build understands.
    UnknownSchemaVersion,
    /// `ts` is neither RFC 3339 text nor epoch milliseconds.
    BadTimestamp,
    /// `ts` is further from processing time than the configured bound.
    TimestampOutOfBounds,
    /// A value is outside its documented range.
    OutOfRange,
    /// A text field is empty, too long, or not one of its allowed values.
    InvalidValue,
    /// An environment event carries no measurement at all.
    NoMeasurement,
    /// A camera thumbnail is not valid base64.
    BadBase64,
    /// The message was refused by admission control (rate limits).
    RateLimited,
    /// A stage failed on the batch this row was in (a panic, or a batch it refused); the row
    /// is kept in `operator_errors` and the pipeline went on.
    OperatorError,
    /// The event arrived on a partition its topic's key does not put it on (a producer that
    /// keyed it otherwise): kept out of the stages, whose state per key must stay on one
    /// partition (scale-out).
    Misrouted,
}

impl ReasonCode {
    /// Every code, in a stable order (used for metrics labels and docs).
    pub const ALL: [ReasonCode; 13] = [
        ReasonCode::BadJson,
        ReasonCode::MissingField,
        ReasonCode::WrongType,
        ReasonCode::UnknownSchemaVersion,
        ReasonCode::BadTimestamp,
        ReasonCode::TimestampOutOfBounds,
        ReasonCode::OutOfRange,
        ReasonCode::InvalidValue,
        ReasonCode::NoMeasurement,
        ReasonCode::BadBase64,
        ReasonCode::RateLimited,
        ReasonCode::OperatorError,
        ReasonCode::Misrouted,
    ];

    /// The snake_case name stored in the `reason_code` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::BadJson => "bad_json",
            ReasonCode::MissingField => "missing_field",
            ReasonCode::WrongType => "wrong_type",
            ReasonCode::UnknownSchemaVersion => "unknown_schema_version",
            ReasonCode::BadTimestamp => "bad_timestamp",
            ReasonCode::TimestampOutOfBounds => "timestamp_out_of_bounds",
            ReasonCode::OutOfRange => "out_of_range",
            ReasonCode::InvalidValue => "invalid_value",
            ReasonCode::NoMeasurement => "no_measurement",
            ReasonCode::BadBase64 => "bad_base64",
            ReasonCode::RateLimited => "rate_limited",
            ReasonCode::OperatorError => "operator_error",
            ReasonCode::Misrouted => "misrouted",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection: its class and a precise human-readable message naming the field and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// The class of the rejection.
    pub code: ReasonCode,
    /// What exactly was wrong, e.g. ``occupancy 1.7 is outside 0..=1``.
    pub message: String,
}

impl Reason {
    /// A reason from its parts.
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}
