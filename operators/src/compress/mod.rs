//! `compress`: lossy compression of numeric sensor series with a guaranteed error bound.
//!
//! Per series (the `key` columns, e.g. a station), rows are taken in event-time order (they are
//! held until the watermark passes them) and a row is dropped only when **linear interpolation
//! between the kept rows before and after it reconstructs every configured field within its
//! tolerance**. The tolerance of a reading `v` is `max(abs, rel * |v|)`.
//!
//! Methods, per field:
//! - `swinging_door`: keeps the set of slopes from the last kept point that pass within
//!   tolerance of every dropped point (the "door"); the next kept point is chosen so its slope
//!   lies in that set, so every dropped point is within tolerance of the line. This is the
//!   swinging-door trending algorithm in its exact form (feasible-slope intersection).
//! - `deadband`: a reading is dropped while it and the next one stay within half the tolerance
//!   of the last kept value; any line between two such values is then within the tolerance of
//!   every dropped reading.
//!
//! Fields are decided jointly: a row is dropped only if every field allows it, and every field
//! restarts from the same kept row, so the bound holds for each field independently. A null in
//! any configured field keeps the row (there is nothing to interpolate). A jump larger than the
//! tolerance — an incident's sudden drop in speed — is therefore always kept, with the row
//! before it. `max_gap` also keeps the rows on both sides of a silence longer than it, so
//! outages are not bridged by a line: after such a silence a series starts again as if new,
//! which lets the operator forget a series once the watermark is `max_gap` past its last row
//! (its memory follows the series that spoke within `max_gap`, not every key ever seen;
//! metric `citystream_compress_series`).
//!
//! Columns not listed in `fields` are carried on kept rows only: compress a copy for storage,
//! and aggregate (counts, flows) from the uncompressed stream. A row at or before its series'
//! last processed time (beyond the watermark) goes to `late_events`.
//!
//! Files: [`config`] (the YAML: methods, tolerances, planning, live changes), [`operator`] (the
//! series, the door, holding rows until the watermark, snapshots).

mod config;
mod operator;

pub use config::{CompressConfig, FieldTolerance, Method};
pub use operator::Compress;
