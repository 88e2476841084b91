//! Job records, their events (the log) and their metrics rows, in the home's database.

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use serde_json::Value;

use crate::store::{db, json_text, parse, retry, Cancel, Store};
use crate::JobError;

impl Store {
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
        self.metrics_after(id, None)
    }

    /// The metrics rows of job `id` after step `after` (all with `None`), by step: a live
    /// view reads only what is new.
    pub fn metrics_after(&self, id: &str, after: Option<u64>) -> Result<Vec<Value>, JobError> {
        let after = after.map(|s| s as i64).unwrap_or(-1);
        retry(|| {
            let mut stmt = self
                .conn
                .prepare("SELECT row FROM metrics WHERE job_id = ?1 AND step > ?2 ORDER BY step")
                .map_err(db)?;
            let rows = stmt
                .query_map(params![id, after], |r| r.get::<_, String>(0))
                .map_err(db)?;
            rows.map(|r| r.map(|t| parse(&t)).map_err(db)).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::store::temp_store as store;

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
