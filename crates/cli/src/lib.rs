//! What whet's binaries share (the `whet` CLI and `whet-bench`).

pub mod runtime;
