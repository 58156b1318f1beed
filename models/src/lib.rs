//! ONNX models in the citystream stream.
//!
//! - [`features`]: the `features` stage, model input rows from one-minute traffic windows and
//!   the road graph (the same definition as `models/train/features.py`).
//! - [`infer`]: the `infer` stage, an ONNX model through ONNX Runtime (`ort`, loaded from the
//!   PyPI wheel at run time), micro-batched, hot-swappable, with a shadow model.
//! - [`california`]: the `california7` stage, the model-free incident detector.
//! - [`onnx`]: finding ONNX Runtime and loading checked models; their sessions are shared
//!   within a process (`sessions`).

#![warn(missing_docs)]

pub mod california;
pub mod features;
pub mod infer;
pub mod onnx;
mod sessions;

pub use california::California7Config;
pub use features::{FEATURES, FeaturesConfig, GraphError, RoadGraph};
pub use infer::InferConfig;
pub use onnx::{Model, ModelError, Provider};
