//! `infer`: runs an ONNX model on feature rows, micro-batched across keys, with hot swap and
//! an optional shadow model.
//!
//! - **Input**: one `FixedSizeList<Float32, F>` column (its values buffer is handed to ONNX
//!   Runtime as the `[rows, F]` tensor without a copy when a micro-batch is one input batch;
//!   several buffered batches are concatenated once) or a list of numeric columns (copied into
//!   a row-major buffer).
//! - **Micro-batching**: rows are gathered until `batch.max_rows` or `batch.max_delay`
//!   (processing time, checked when a batch or a watermark arrives: the stage has no timer of
//!   its own) and always run before a watermark is forwarded, so no prediction is ever behind
//!   the watermark downstream. One model run never mixes rows of two event times, so a row's
//!   score does not depend on how the input was batched (see [`Infer::runs_of`]).
//! - **Outputs**: the `keep` columns, each model output mapped to named `Float32` columns, and
//!   `model` / `model_sha256` stamped on every row. Port `shadow` (when configured) carries the
//!   candidate model's predictions for the same rows, stamped with its own name and checksum.
//! - **Hot swap**: a watcher thread polls the model file; a changed file is loaded and checked
//!   in the background and the operator switches to it between two batches. A file that fails
//!   to load or check is rejected with a logged reason and the old model keeps serving.
//!
//! One file per job: [`config`] (the YAML and planning), [`operator`] (micro-batching, the
//! model runs, the outputs), [`hot_swap`] (the model slot and its file watcher), [`calm`]
//! (thinning calm keys in the high-carbon mode).

mod calm;
mod config;
mod hot_swap;
mod operator;

pub use config::{BatchConfig, CalmConfig, CarbonConfig, FeatureInput, InferConfig, ShadowConfig};
pub use operator::Infer;
