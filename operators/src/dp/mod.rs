//! `dp_aggregate`: differentially private counts, sums and means per partition and event-time
//! window, with contribution bounding, exact discrete noise from a cryptographically secure
//! generator, and a persistent budget per release stream.
//!
//! Per window, every privacy unit (e.g. a vehicle pseudonym or a device) is bounded to at most
//! `max_partitions` partitions (L0) and `max_contributions` rows per partition (L∞), chosen
//! uniformly at random among its rows — not the first ones. Values are clamped to `bounds` and
//! put on a grid of `granularity`, so sums are integers and the noise is exact discrete
//! Laplace (ε-DP, sensitivity L0·L∞·M) or discrete Gaussian (ρ-zCDP with ρ from the release's
//! (ε, δ), L2 sensitivity sqrt(L0)·L∞·M), where M is the largest grid value. A mean is a noisy
//! sum over a noisy count, each with half the release's budget.
//!
//! Partitions are public (`public`: every listed partition is released every window, empty or
//! not; rows of other partitions are dropped and counted) or, for counts with Laplace noise,
//! selected privately: a partition is released only if its noisy count reaches
//! τ = Δ + (Δ/ε)·ln(L0 / (2δ)) (Laplace thresholding).
//!
//! Each window release is charged to the release's [`Accountant`] — persisted before the rows
//! are emitted — and once the period's budget is spent, releases stop with an error log and the
//! metric `citystream_dp_releases_refused_total`, never silently.
//!
//! With `noise_key`, the random draws of a window (contribution bounding and noise) come from
//! ChaCha20 seeded with `HMAC-SHA256(key, release ‖ window ‖ the window's rows in a canonical
//! order)`: the same rows give the same release, whatever order they arrived in — a backlog
//! replay, a restore after a crash — and the accountant charges a replayed release once. Other
//! rows give unrelated noise, as fresh noise would be to anyone without the key. The key is as
//! sensitive as the pseudonymization secret: with it, guesses about the data can be checked
//! against a release. Without `noise_key`, each release draws from the operating system.//!
//! Files: [`config`] (the YAML and planning), [`bounding`] (contribution bounding),
//! [`operator`] (buffering, releasing and charging windows), [`noise`] (the samplers),
//! [`accountant`] (the budget).

pub mod accountant;
mod bounding;
mod config;
pub mod noise;
mod operator;

pub use bounding::bound_contributions;
pub use config::{
    Budget, CARBON_HIGH_MODE_GAUGE, DeferConfig, DpAggregate, DpConfig, INSECURE_SEED_ENV, Mechanism, Partitions,
};
pub use operator::DpAggregateOp;
