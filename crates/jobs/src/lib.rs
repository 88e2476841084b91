//! Training jobs. This crate holds the job file (`JOB.toml`: what to train, on what, how);
//! the store, the registries of datasets, capabilities and models, and the runner build on it.

#![warn(missing_docs)]

pub mod spec;

pub use spec::{DataSpec, JobSpec, LoraSpec, Shape};

/// Errors of job files and jobs.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A job file that cannot be read or parsed (names the file and the key).
    #[error("{path}: {message}")]
    Spec {
        /// The job file.
        path: String,
        /// What is wrong, naming the key.
        message: String,
    },
}
