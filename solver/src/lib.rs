//! Sharding solver (issue 3): strategies, cost model, ILP. Not yet implemented.
