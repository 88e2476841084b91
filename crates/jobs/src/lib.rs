//! Training jobs and the home they live in: the job file (`JOB.toml`), the home's store (one
//! SQLite database and content-addressed blobs), the dataset and capability registries, and
//! the runner: a job's record with its lifecycle `queued → running → completed | failed |
//! cancelled`, trained through a [`Backend`] (the engine in process, or a remote service) with
//! the SFT loop, its metrics and log in the store.

#![warn(missing_docs)]

pub mod capabilities;
pub mod checkpoints;
pub mod datasets;
pub mod home;
pub mod keys;
pub mod models;
pub mod recorder;
mod records;
mod rl_run;
pub mod runner;
pub mod spec;
pub mod store;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub use capabilities::Capability;
pub use home::Home;
pub use recorder::{Display, Quiet};
pub use runner::{Backend, BaseModel};
pub use spec::{DataSpec, JobSpec, LoraSpec, Shape};
pub use store::{Cancel, Pushed, Store, TERMINAL};

/// Errors of job files, the store and the registries.
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
    /// A file that cannot be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why (not a `source`: the message says it already).
        error: std::io::Error,
    },
    /// Input that is wrong (the message names the file and field).
    #[error("{0}")]
    Invalid(String),
    /// A job, dataset or capability that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The database.
    #[error("the home's database: {0}")]
    Store(String),
    /// The database stayed busy (other processes writing) for a minute.
    #[error("the home's database is busy: {0}")]
    Busy(String),
    /// Rows that cannot be read.
    #[error(transparent)]
    Data(#[from] whet_data::DataError),
    /// Rows that cannot be trained on, or a schedule that cannot work.
    #[error(transparent)]
    Sft(#[from] whet_sft::SftError),
    /// The training backend refused a request.
    #[error(transparent)]
    Contract(#[from] whet_contract::ContractError),
    /// The training backend failed (loading the model, starting a session).
    #[error("{0}")]
    Backend(String),
}

impl JobError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            error,
        }
    }
}

/// Checks a registry name: `^[a-z0-9][a-z0-9-]*$`.
pub fn check_name(what: &str, name: &str) -> Result<(), JobError> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(JobError::Invalid(format!(
            "{what} {name:?}: use lowercase letters, digits and '-', starting with a letter or digit"
        )))
    }
}

/// Checks a semver version (`1.2.3`, pre-release and build metadata allowed).
pub fn check_version(what: &str, version: &str) -> Result<(), JobError> {
    semver::Version::parse(version).map(|_| ()).map_err(|e| {
        JobError::Invalid(format!(
            "{what} {version:?} is not semver (like 1.0.0): {e}"
        ))
    })
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The time now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_rfc3339() -> String {
    rfc3339(now_unix())
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (days to civil date: Howard Hinnant's algorithm).
pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_996_800 + 3661), "2026-11-30T01:01:01Z");
    }

    #[test]
    fn names_and_versions() {
        assert!(check_name("n", "faq-v2").is_ok());
        for bad in ["", "-x", "Faq", "a_b", "a b"] {
            assert!(check_name("n", bad).is_err(), "{bad}");
        }
        assert!(check_version("v", "1.0.0").is_ok());
        assert!(check_version("v", "0.0.0+abc.chat").is_ok());
        assert!(check_version("v", "1.0").is_err());
    }
}
