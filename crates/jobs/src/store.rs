//! The home's database: jobs with their events and metrics (`records.rs`), and the registries
//! (datasets, capabilities), in one SQLite file.
//!
//! Several processes share it (a foreground `whet train`, a `whet worker`, `whet jobs cancel`
//! from another terminal), so it runs in WAL mode with a busy timeout, and every change is one
//! transaction: a crash never leaves half a record. The schema is versioned by numbered
//! migrations recorded in `PRAGMA user_version`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::Value;

use crate::JobError;

/// Numbered schema migrations; entry `i` takes the database from version `i` to `i + 1`.
/// Never edit a published one: append.
const MIGRATIONS: &[&str] = &[
    // 1: registries, jobs, events, metrics.
    "CREATE TABLE registry (
        kind TEXT NOT NULL,          -- 'dataset' | 'capability'
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        digest TEXT NOT NULL,        -- sha256 of the canonical document
        document TEXT NOT NULL,      -- JSON
        created_at TEXT NOT NULL,
        PRIMARY KEY (kind, name, version)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,        -- queued | running | completed | failed | cancelled
        record TEXT NOT NULL,        -- JSON, the job record
        created_at INTEGER NOT NULL, -- Unix seconds, for ordering
        cancel_requested_at TEXT
    );
    CREATE INDEX jobs_by_status ON jobs (status, created_at);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        timestamp TEXT NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_by_job ON events (job_id, seq);
    CREATE TABLE metrics (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        step INTEGER NOT NULL,
        row TEXT NOT NULL,
        PRIMARY KEY (job_id, step)
    );",
    // 2: aliases (`champion`, `staging`) that point at a version of a registry entry and move.
    "CREATE TABLE aliases (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        version TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (kind, name, alias)
    );",
];

/// A job's lifecycle: `queued → running → completed | failed | cancelled`.
pub const TERMINAL: [&str; 3] = ["completed", "failed", "cancelled"];

/// What pushing a registry entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// A new immutable version.
    Created,
    /// The same bytes were already published under this name and version.
    Unchanged,
}

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// A queued job, cancelled at once.
    Cancelled,
    /// A running job asked to stop after its current step.
    Requested,
    /// The job had already ended with this status.
    AlreadyEnded(String),
}

/// An open database.
pub struct Store {
    pub(crate) conn: Connection,
}

pub(crate) fn db(e: rusqlite::Error) -> JobError {
    use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked) => JobError::Busy(e.to_string()),
        _ => JobError::Store(e.to_string()),
    }
}

/// Runs `f` again while the database is busy. SQLite's busy timeout covers most contention,
/// but not all of it (a WAL snapshot gone stale under a reader, a checkpoint at the moment a
/// connection opens), and a training job must not fail because someone ran `whet jobs list`.
pub(crate) fn retry<T>(mut f: impl FnMut() -> Result<T, JobError>) -> Result<T, JobError> {
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(5);
    loop {
        match f() {
            Err(JobError::Busy(_)) if started.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

pub(crate) fn json_text(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub(crate) fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

impl Store {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, JobError> {
        let mut conn = Connection::open(path)
            .map_err(|e| JobError::Store(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(db)?;
        // WAL: readers never block the writer. Switching needs an exclusive lock, so only a
        // database not yet in WAL mode is switched.
        retry(|| {
            let mode: String = conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .map_err(db)?;
            if !mode.eq_ignore_ascii_case("wal") {
                conn.pragma_update(None, "journal_mode", "WAL")
                    .map_err(db)?;
            }
            conn.pragma_update(None, "foreign_keys", "ON").map_err(db)
        })?;
        let version: usize = retry(|| {
            conn.pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(db)
        })?;
        if version > MIGRATIONS.len() {
            return Err(JobError::Store(format!(
                "{}: schema version {version} is newer than this whet knows ({}); use a newer whet",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            retry(|| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Exclusive)
                    .map_err(db)?;
                // Another process may have migrated while we waited for the lock.
                let now: usize = tx
                    .pragma_query_value(None, "user_version", |r| r.get(0))
                    .map_err(db)?;
                if now > i {
                    return Ok(());
                }
                tx.execute_batch(sql).map_err(db)?;
                tx.pragma_update(None, "user_version", i + 1).map_err(db)?;
                tx.commit().map_err(db)
            })?;
        }
        Ok(Self { conn })
    }

    // ---- registries ----

    /// Publishes `kind` `name@version` (immutable): the same digest again is a no-op; a
    /// different one is refused.
    pub fn push(
        &mut self,
        kind: &str,
        name: &str,
        version: &str,
        digest: &str,
        document: &Value,
        now: &str,
    ) -> Result<Pushed, JobError> {
        retry(|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let existing: Option<String> = tx
                .query_row(
                    "SELECT digest FROM registry WHERE kind = ?1 AND name = ?2 AND version = ?3",
                    params![kind, name, version],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            let outcome = match existing {
                Some(d) if d == digest => Pushed::Unchanged,
                Some(d) => {
                    return Err(JobError::Invalid(format!(
                    "{kind} {name}@{version} is already published with other content (sha256 {d}); \
                     versions are immutable: publish a new version"
                )))
                }
                None => {
                    tx.execute(
                        "INSERT INTO registry (kind, name, version, digest, document, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![kind, name, version, digest, json_text(document), now],
                    )
                    .map_err(db)?;
                    Pushed::Created
                }
            };
            tx.commit().map_err(db)?;
            Ok(outcome)
        })
    }

    /// The document of `kind` `name@version`, if published.
    pub fn registry_get(
        &self,
        kind: &str,
        name: &str,
        version: &str,
    ) -> Result<Option<Value>, JobError> {
        retry(|| {
            self.conn
                .query_row(
                    "SELECT document FROM registry WHERE kind = ?1 AND name = ?2 AND version = ?3",
                    params![kind, name, version],
                    |r| r.get::<_, String>(0),
                )
                .optional()
                .map_err(db)
                .map(|d| d.as_deref().map(parse))
        })
    }

    /// The document of `kind` `name@version`, or an error saying what is published instead and
    /// how to publish (`publish`: the command).
    pub fn registry_require(
        &self,
        kind: &str,
        name: &str,
        version: &str,
        publish: &str,
    ) -> Result<Value, JobError> {
        if let Some(doc) = self.registry_get(kind, name, version)? {
            return Ok(doc);
        }
        let known: Vec<String> = self
            .registry_list(kind, Some(name))?
            .iter()
            .filter_map(|d| d["version"].as_str().map(String::from))
            .collect();
        Err(JobError::NotFound(if known.is_empty() {
            format!("{kind} {name}@{version}: no {kind} named {name:?} is published (`{publish}`)")
        } else {
            format!(
                "{kind} {name}@{version} is not published; published versions: {}",
                known.join(", ")
            )
        }))
    }

    /// The aliases of `kind` `name`: `(alias, version)`.
    pub fn aliases(&self, kind: &str, name: &str) -> Result<Vec<(String, String)>, JobError> {
        retry(|| {
            let mut stmt = self
                .conn
                .prepare("SELECT alias, version FROM aliases WHERE kind = ?1 AND name = ?2 ORDER BY alias")
                .map_err(db)?;
            let rows = stmt
                .query_map(params![kind, name], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
    }

    /// Points `alias` at `version` (`None` removes it).
    pub fn set_alias(
        &mut self,
        kind: &str,
        name: &str,
        alias: &str,
        version: Option<&str>,
        now: &str,
    ) -> Result<(), JobError> {
        retry(|| {
            match version {
                Some(v) => self.conn.execute(
                    "INSERT OR REPLACE INTO aliases (kind, name, alias, version, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![kind, name, alias, v, now],
                ),
                None => self.conn.execute(
                    "DELETE FROM aliases WHERE kind = ?1 AND name = ?2 AND alias = ?3",
                    params![kind, name, alias],
                ),
            }
            .map(|_| ())
            .map_err(db)
        })
    }

    /// Every published `kind` entry (all names, or one), oldest first.
    pub fn registry_list(&self, kind: &str, name: Option<&str>) -> Result<Vec<Value>, JobError> {
        retry(|| {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT document FROM registry WHERE kind = ?1 AND (?2 IS NULL OR name = ?2)
                 ORDER BY name, created_at, version",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![kind, name], |r| r.get::<_, String>(0))
                .map_err(db)?;
            rows.map(|r| r.map(|t| parse(&t)).map_err(db)).collect()
        })
    }
}

/// A store in a temporary directory, for tests.
#[cfg(test)]
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("whet.db")).unwrap();
    (dir, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> (tempfile::TempDir, Store) {
        temp_store()
    }

    #[test]
    fn migrations_run_once_and_a_newer_schema_is_refused() {
        let (dir, s) = store();
        drop(s);
        let path = dir.path().join("whet.db");
        Store::open(&path).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn registry_versions_are_immutable() {
        let (_d, mut s) = store();
        let doc = json!({"name": "faq", "version": "1.0.0"});
        assert_eq!(
            s.push("dataset", "faq", "1.0.0", "aa", &doc, "t").unwrap(),
            Pushed::Created
        );
        assert_eq!(
            s.push("dataset", "faq", "1.0.0", "aa", &doc, "t").unwrap(),
            Pushed::Unchanged
        );
        let e = s
            .push("dataset", "faq", "1.0.0", "bb", &doc, "t")
            .unwrap_err();
        assert!(e.to_string().contains("immutable"), "{e}");
        assert_eq!(
            s.registry_get("dataset", "faq", "1.0.0").unwrap(),
            Some(doc)
        );
        assert_eq!(s.registry_get("capability", "faq", "1.0.0").unwrap(), None);
        assert_eq!(s.registry_list("dataset", None).unwrap().len(), 1);
    }
}
