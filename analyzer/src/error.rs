//! Errors of the analyzer. Every error a user can cause names the node (`n12 "h.0.attn"`), its
//! op type and the reason, or the input / file it came from.

use thiserror::Error;

/// An op-level failure (shape inference, evaluation, vjp), before the node is known.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{0}")]
pub struct OpError(pub String);

impl OpError {
    pub fn new(msg: impl Into<String>) -> Self {
        OpError(msg.into())
    }
}

/// Shorthand: `return Err(op_err!("rank {} != {}", a, b))`.
#[macro_export]
macro_rules! op_err {
    ($($t:tt)*) => { $crate::error::OpError(format!($($t)*)) };
}

#[derive(Debug, Error)]
pub enum AnalyzerError {
    /// A node failed: `node` is printed as `n12 "name"`, `op` is its op type (IR or frontend).
    #[error("{node} ({op}): {reason}")]
    Node {
        node: String,
        op: String,
        reason: String,
    },
    #[error("input {name:?}: {reason}")]
    Input { name: String, reason: String },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("text IR line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("graph does not verify: {0}")]
    Verify(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = AnalyzerError> = std::result::Result<T, E>;
