//! tch runtime (issue 4). Not yet implemented.
