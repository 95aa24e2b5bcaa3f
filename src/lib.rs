//! autopar: the pipeline as a library.
