//! Runtime for autopar's per-rank SPMD programs (issue 4).
//!
//! The generator emits one program per rank; executing it needs two things: tensor kernels
//! (the tch runtime, to come) and collectives between ranks. This crate starts with the
//! collectives, [`comm`], because their semantics (groups along mesh axes, failure that never
//! hangs) are shared by the in-process test backend and the NCCL backend. [`weights`] gives
//! each rank its shard of every parameter and writes plan-independent checkpoints.

pub mod collective;
pub mod comm;
pub mod exec;
pub mod lower;
pub mod measure;
pub mod rendezvous;
pub mod session;
pub mod tcp_comm;
pub mod weights;
pub use tch;
#[cfg(feature = "cuda")]
pub mod cuda;
