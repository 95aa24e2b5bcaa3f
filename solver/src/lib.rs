//! The sharding solver of autopar (see ARCHITECTURE.md).
//!
//! Data flow: `Mesh` + per-op strategies (from each op's `DimMap`) -> `Problem` (plain numbers:
//! no graph types) -> ILP -> `Solution` -> `Plan`. Resharding between any two specs is decided
//! by one function, [`reshard::transition`]; the solver prices it, the generator emits it.

pub mod checkpoint;
pub mod cluster;
pub mod ilp;
pub mod mesh;
pub mod min_memory;
pub mod plan;
pub mod problem;
pub mod reshard;
pub mod spec;
pub mod strategy;

pub use mesh::{Mesh, MeshAxis};
pub use spec::ShardingSpec;
