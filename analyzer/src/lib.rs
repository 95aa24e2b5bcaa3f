//! The analyzer of autopar: the graph IR, its importers, the training-graph builder and the
//! meta-shape profiler. See ARCHITECTURE.md for where it sits in the pipeline.

pub mod builder;
pub mod dtype;
pub mod entity;
pub mod error;
pub mod eval;
pub mod fuse;
pub mod graph;
pub mod onnx;
pub mod ops;
pub mod profile;
pub mod reference;
pub mod tensor;
pub mod text;
pub mod train;
pub mod verify;

pub use builder::GraphBuilder;
pub use dtype::{DType, TensorType};
pub use error::{AnalyzerError, OpError};
pub use graph::{Graph, NodeId, Phase, ValueDef, ValueId, WeightData};
pub use ops::Op;
pub use tensor::Tensor;
