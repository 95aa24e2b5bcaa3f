//! Per-rank program generator (issue 4). Not yet implemented.
