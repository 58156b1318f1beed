//! `window`: tumbling and sliding (hop) event-time windows per key, emitted when the watermark
//! passes a window's end plus the allowed lateness.
//!
//! Each window is emitted once, complete: rows may arrive out of order up to `allowed_lateness`
//! after the window's end. A row whose every window has already been emitted is late and goes
//! to the `late_events` output (same schema as the input), counted — never dropped silently.
//!
//! Aggregates: `count`, `sum`, `mean`, `min`, `max`, `quantile` (exact, `q` in 0..=1, linear
//! interpolation between order statistics as in numpy's default), `weighted_mean` (e.g.
//! vehicle-weighted mean speed: `column: speed_kmh, weight: flow`), `rate_per_hour` (sum scaled
//! to one hour: flow per hour) and `count_above` (`above: 15`: exceedances). Nulls are skipped
//! by every aggregate; an aggregate over no values is null (`count` and `count_above` are 0).
//!
//! State: per open window, one accumulator slot per key; quantiles keep their values (4 bytes
//! each). Windows close on watermark, so state is bounded by the keys active within
//! `size + allowed_lateness` (plus out-of-orderness upstream).
//!
//! Files: [`config`] (the YAML, planning), [`acc`] (accumulators and the exact quantile),
//! [`operator`] (open windows, emission, late rows, forgetting keys, snapshots), [`snapshot`]
//! (the snapshot's columns).

mod acc;
mod config;
mod operator;
mod snapshot;

pub use acc::quantile;
pub use config::{AggFn, AggregateConfig, WindowConfig};
pub use operator::Window;
