//! The home's database: jobs with their events and metrics, and the registries (datasets,
//! capabilities), in one SQLite file.
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
    conn: Connection,
}

fn db(e: rusqlite::Error) -> JobError {
    use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked) => JobError::Busy(e.to_string()),
        _ => JobError::Store(e.to_string()),
    }
}

/// Runs `f` again while the database is busy. SQLite's busy timeout covers most contention,
/// but not all of it (a WAL snapshot gone stale under a reader, a checkpoint at the moment a
/// connection opens), and a training job must not fail because someone ran `whet jobs list`.
fn retry<T>(mut f: impl FnMut() -> Result<T, JobError>) -> Result<T, JobError> {
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

fn json_text(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse(text: &str) -> Value {
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

    // ---- jobs ----

    /// Inserts a new job record (its `id`, `name`, `status` fields are the columns).
    pub fn create_job(&mut self, record: &Value, created_unix: u64) -> Result<(), JobError> {
        retry(|| {
            let id = record["id"].as_str().unwrap_or_default();
            self.conn
            .execute(
                "INSERT INTO jobs (id, name, status, record, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    id,
                    record["name"].as_str().unwrap_or_default(),
                    record["status"].as_str().unwrap_or("queued"),
                    json_text(record),
                    created_unix as i64
                ],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    /// Replaces a job's record and status in one transaction.
    pub fn save_job(&mut self, record: &Value) -> Result<(), JobError> {
        retry(|| {
            let id = record["id"].as_str().unwrap_or_default();
            let n = self
                .conn
                .execute(
                    "UPDATE jobs SET status = ?2, record = ?3 WHERE id = ?1",
                    params![
                        id,
                        record["status"].as_str().unwrap_or("failed"),
                        json_text(record)
                    ],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(JobError::NotFound(format!("job {id}")));
            }
            Ok(())
        })
    }

    /// A job's record, with its status and cancel request as the database has them now.
    pub fn job(&self, id: &str) -> Result<Value, JobError> {
        retry(|| {
            let row: Option<(String, String, Option<String>)> = self
                .conn
                .query_row(
                    "SELECT record, status, cancel_requested_at FROM jobs WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(db)?;
            let (record, status, cancel) = row
                .ok_or_else(|| JobError::NotFound(format!("job {id:?} (see `whet jobs list`)")))?;
            let mut v = parse(&record);
            v["status"] = Value::String(status);
            v["cancel_requested_at"] = cancel.map(Value::String).unwrap_or(Value::Null);
            Ok(v)
        })
    }

    /// Job records, newest first (in submission order: rowids only grow), optionally of one
    /// status.
    pub fn jobs(&self, status: Option<&str>) -> Result<Vec<Value>, JobError> {
        retry(|| {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT id FROM jobs WHERE (?1 IS NULL OR status = ?1) ORDER BY rowid DESC",
                )
                .map_err(db)?;
            let ids: Vec<String> = stmt
                .query_map(params![status], |r| r.get(0))
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?;
            ids.iter().map(|id| self.job(id)).collect()
        })
    }

    /// Takes the oldest queued job for this process: `queued → running` happens once, whoever
    /// else is claiming.
    pub fn claim_queued(&mut self) -> Result<Option<String>, JobError> {
        retry(|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let id: Option<String> = tx
                .query_row(
                    "SELECT id FROM jobs WHERE status = 'queued' ORDER BY rowid LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            if let Some(id) = &id {
                tx.execute(
                    "UPDATE jobs SET status = 'running' WHERE id = ?1",
                    params![id],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(id)
        })
    }

    /// Moves a job to `status` only if it is in one of `from` (returns whether it moved).
    pub fn transition(&mut self, id: &str, from: &[&str], status: &str) -> Result<bool, JobError> {
        retry(|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let now: Option<String> = tx
                .query_row("SELECT status FROM jobs WHERE id = ?1", params![id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db)?;
            let now = now.ok_or_else(|| JobError::NotFound(format!("job {id:?}")))?;
            let moved = from.contains(&now.as_str());
            if moved {
                tx.execute(
                    "UPDATE jobs SET status = ?2, cancel_requested_at = NULL WHERE id = ?1",
                    params![id, status],
                )
                .map_err(db)?;
            }
            tx.commit().map_err(db)?;
            Ok(moved)
        })
    }

    /// Cancels a queued job, or asks a running one to stop after its current step.
    pub fn cancel(&mut self, id: &str, now: &str) -> Result<Cancel, JobError> {
        retry(|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let status: Option<String> = tx
                .query_row("SELECT status FROM jobs WHERE id = ?1", params![id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(db)?;
            let status = status
                .ok_or_else(|| JobError::NotFound(format!("job {id:?} (see `whet jobs list`)")))?;
            let outcome = match status.as_str() {
                "queued" => {
                    tx.execute(
                    "UPDATE jobs SET status = 'cancelled', cancel_requested_at = ?2 WHERE id = ?1",
                    params![id, now],
                )
                .map_err(db)?;
                    Cancel::Cancelled
                }
                "running" => {
                    tx.execute(
                        "UPDATE jobs SET cancel_requested_at = ?2 WHERE id = ?1",
                        params![id, now],
                    )
                    .map_err(db)?;
                    Cancel::Requested
                }
                other => Cancel::AlreadyEnded(other.to_string()),
            };
            tx.commit().map_err(db)?;
            Ok(outcome)
        })
    }

    /// Whether someone asked job `id` to stop.
    pub fn cancel_requested(&self, id: &str) -> Result<bool, JobError> {
        retry(|| {
            let v: Option<Option<String>> = self
                .conn
                .query_row(
                    "SELECT cancel_requested_at FROM jobs WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            Ok(matches!(v, Some(Some(_))))
        })
    }

    // ---- events and metrics ----

    /// Appends a log entry `{timestamp, level, message, data}`.
    pub fn log(
        &mut self,
        id: &str,
        timestamp: &str,
        level: &str,
        message: &str,
        data: &Value,
    ) -> Result<(), JobError> {
        retry(|| {
            self.conn
            .execute(
                "INSERT INTO events (job_id, timestamp, level, message, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, timestamp, level, message, json_text(data)],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    /// Log entries of job `id` after sequence number `after`, with their sequence numbers.
    pub fn events(&self, id: &str, after: i64) -> Result<Vec<(i64, Value)>, JobError> {
        retry(|| {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT seq, timestamp, level, message, data FROM events
                 WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![id, after], |r| {
                    let (seq, timestamp, level, message, data): (
                        i64,
                        String,
                        String,
                        String,
                        String,
                    ) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
                    Ok((
                        seq,
                        serde_json::json!({"timestamp": timestamp, "level": level,
                                       "message": message, "data": parse(&data)}),
                    ))
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)
        })
    }

    /// Records the metrics row of a step (a redone step replaces its row).
    pub fn put_metrics(&mut self, id: &str, step: usize, row: &Value) -> Result<(), JobError> {
        retry(|| {
            self.conn
                .execute(
                    "INSERT OR REPLACE INTO metrics (job_id, step, row) VALUES (?1, ?2, ?3)",
                    params![id, step as i64, json_text(row)],
                )
                .map_err(db)?;
            Ok(())
        })
    }

    /// Drops the metrics rows after `step` (a resumed job redoes those steps).
    pub fn truncate_metrics(&mut self, id: &str, step: usize) -> Result<(), JobError> {
        retry(|| {
            self.conn
                .execute(
                    "DELETE FROM metrics WHERE job_id = ?1 AND step > ?2",
                    params![id, step as i64],
                )
                .map_err(db)?;
            Ok(())
        })
    }

    /// The metrics rows of job `id`, by step.
    pub fn metrics(&self, id: &str) -> Result<Vec<Value>, JobError> {
        retry(|| {
            let mut stmt = self
                .conn
                .prepare("SELECT row FROM metrics WHERE job_id = ?1 ORDER BY step")
                .map_err(db)?;
            let rows = stmt
                .query_map(params![id], |r| r.get::<_, String>(0))
                .map_err(db)?;
            rows.map(|r| r.map(|t| parse(&t)).map_err(db)).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("whet.db")).unwrap();
        (dir, s)
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

    #[test]
    fn job_lifecycle_claim_cancel_and_metrics() {
        let (_d, mut s) = store();
        for (i, id) in ["a", "b"].iter().enumerate() {
            let r = json!({"id": id, "name": "n", "status": "queued"});
            s.create_job(&r, i as u64).unwrap();
        }
        assert_eq!(s.claim_queued().unwrap().as_deref(), Some("a"));
        assert_eq!(s.job("a").unwrap()["status"], "running");
        assert_eq!(s.cancel("b", "t").unwrap(), Cancel::Cancelled);
        assert_eq!(s.claim_queued().unwrap(), None);
        assert!(!s.cancel_requested("a").unwrap());
        assert_eq!(s.cancel("a", "t").unwrap(), Cancel::Requested);
        assert!(s.cancel_requested("a").unwrap());
        s.put_metrics("a", 1, &json!({"step": 1})).unwrap();
        s.put_metrics("a", 2, &json!({"step": 2})).unwrap();
        s.truncate_metrics("a", 1).unwrap();
        assert_eq!(s.metrics("a").unwrap(), vec![json!({"step": 1})]);
        s.log("a", "t", "info", "hello", &json!({"event": "x"}))
            .unwrap();
        let ev = s.events("a", 0).unwrap();
        assert_eq!(ev.len(), 1);
        assert!(s.events("a", ev[0].0).unwrap().is_empty());
        let mut r = s.job("a").unwrap();
        r["status"] = json!("cancelled");
        s.save_job(&r).unwrap();
        assert_eq!(
            s.cancel("a", "t").unwrap(),
            Cancel::AlreadyEnded("cancelled".into())
        );
        assert!(s
            .transition("a", &["cancelled", "failed"], "queued")
            .unwrap());
        assert!(
            !s.cancel_requested("a").unwrap(),
            "a requeued job starts afresh"
        );
        assert_eq!(s.jobs(Some("queued")).unwrap().len(), 1);
        assert!(s.job("zz").is_err());
    }

    /// A job writing while readers open, read and close the database never fails. (Threads
    /// share a process's locks; the multi-process case — a job that once failed with "database
    /// is locked" while `whet jobs list` polled it — is the kill-and-resume test in the CLI.)
    #[test]
    fn a_writer_never_fails_while_readers_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("whet.db");
        let mut w = Store::open(&path).unwrap();
        w.create_job(&json!({"id": "a", "name": "n", "status": "running"}), 0)
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = Store::open(&path).unwrap();
                        assert_eq!(r.jobs(None).unwrap().len(), 1);
                        r.metrics("a").unwrap();
                    }
                })
            })
            .collect();
        for step in 0..300 {
            if step % 20 == 0 {
                // As a job does between submission and its run: close, open again.
                drop(w);
                w = Store::open(&path).unwrap();
            }
            let mut r = w.job("a").unwrap();
            r["step"] = json!(step);
            w.save_job(&r).unwrap();
            w.put_metrics("a", step, &json!({"step": step})).unwrap();
            w.log("a", "t", "info", "step", &json!({})).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(w.metrics("a").unwrap().len(), 300);
    }
}
