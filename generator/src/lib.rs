//! The generator: from a training graph and a sharding plan to the SPMD program every rank
//! runs (local shapes, collectives from the solver's one resharding function, gradient
//! synchronisation, optimizer updates on local shards), and its verifier.
//!
//! - [`bridge`]: the graph-to-solver translations shared with the planner;
//! - [`program`]: the program, one per mesh, spelled out per rank on demand;
//! - [`generate`](mod@generate): graph + plan -> program;
//! - [`recompute`]: the step as a chain of stages, and checkpoint schedules as recompute blocks;
//! - [`verify`](mod@verify): shapes, layouts, and that all ranks issue matching collectives.

pub mod bridge;
pub mod generate;
pub mod program;
pub mod recompute;
pub mod verify;

pub use generate::{generate, generate_plain, GenerateError};
pub use program::{Instr, LeafKind, Program, SlotId};
pub use verify::{verify, VerifyError};
