//! Tinker's futures: a submission answers a `request_id` at once, the work runs on the device
//! worker, and `retrieve_future` long-polls for the outcome.
//!
//! Each future carries a `watch` channel the worker flips when the outcome is in, so a poll
//! sleeps until then (or until the hold time passes, when it answers `try_again`: the SDK logs a
//! line for each, hence the long hold). Finished futures stay retrievable for a while because
//! the client re-polls after network errors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use crate::error::Category;

/// How long a finished future stays retrievable.
const KEEP_FINISHED: Duration = Duration::from_secs(30 * 60);

/// What a future resolves to.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A JSON result (create_model, optim_step, save_weights, ...).
    Json(Value),
    /// A protobuf result (`ForwardBackwardOutput`, `SampleResponse`), already encoded.
    Proto(Vec<u8>),
    /// The work failed: `{"error", "category"}` with HTTP 200, as the SDK expects.
    Failed {
        /// What went wrong.
        message: String,
        /// Whose fault.
        category: Category,
    },
}

struct Entry {
    outcome: Option<Arc<Outcome>>,
    done: watch::Sender<bool>,
    finished_at: Option<Instant>,
    owner: String,
}

/// The table of futures, shared by the handlers and the worker.
#[derive(Clone, Default)]
pub struct Futures {
    inner: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<String, Entry>,
    counter: u64,
}

/// What a poll found.
pub enum Poll {
    /// The outcome.
    Ready(Arc<Outcome>),
    /// Still running after the hold time.
    Pending,
    /// No such request (or another key's).
    Unknown,
}

impl Futures {
    /// Registers a pending future of `owner` and returns its id.
    pub fn create(&self, owner: &str) -> String {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        t.counter += 1;
        let id = format!("req-{}", t.counter);
        let now = Instant::now();
        t.entries
            .retain(|_, e| e.finished_at.is_none_or(|f| now - f < KEEP_FINISHED));
        let (done, _) = watch::channel(false);
        t.entries.insert(
            id.clone(),
            Entry {
                outcome: None,
                done,
                finished_at: None,
                owner: owner.to_string(),
            },
        );
        id
    }

    /// Resolves future `id` (the first outcome wins; later ones are ignored).
    pub fn complete(&self, id: &str, outcome: Outcome) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.entries.get_mut(id) {
            if e.outcome.is_none() {
                e.outcome = Some(Arc::new(outcome));
                e.finished_at = Some(Instant::now());
                e.done.send_replace(true);
            }
        }
    }

    /// Fails future `id`.
    pub fn fail(&self, id: &str, category: Category, message: impl Into<String>) {
        self.complete(
            id,
            Outcome::Failed {
                message: message.into(),
                category,
            },
        );
    }

    /// Waits up to `hold` for future `id` of `owner`.
    pub async fn poll(&self, id: &str, owner: &str, hold: Duration) -> Poll {
        let mut rx = {
            let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match t.entries.get(id) {
                Some(e) if e.owner == owner => {
                    if let Some(o) = &e.outcome {
                        return Poll::Ready(o.clone());
                    }
                    e.done.subscribe()
                }
                _ => return Poll::Unknown,
            }
        };
        // A closed channel or a timeout both end the wait; the table says which it was.
        let _ = tokio::time::timeout(hold, rx.wait_for(|done| *done)).await;
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match t.entries.get(id).and_then(|e| e.outcome.clone()) {
            Some(o) => Poll::Ready(o),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_poll_waits_for_the_outcome_and_other_keys_see_nothing() {
        let f = Futures::default();
        let id = f.create("alice");
        assert!(matches!(
            f.poll(&id, "alice", Duration::from_millis(10)).await,
            Poll::Pending
        ));
        let f2 = f.clone();
        let id2 = id.clone();
        let worker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f2.complete(&id2, Outcome::Json(serde_json::json!({"ok": true})));
            f2.fail(&id2, Category::Server, "too late: the first outcome wins");
        });
        let start = Instant::now();
        match f.poll(&id, "alice", Duration::from_secs(10)).await {
            Poll::Ready(o) => assert!(matches!(&*o, Outcome::Json(v) if v["ok"] == true)),
            _ => panic!("the poll should see the outcome"),
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        worker.join().unwrap();
        assert!(matches!(
            f.poll(&id, "alice", Duration::ZERO).await,
            Poll::Ready(o) if matches!(&*o, Outcome::Json(_))
        ));
        assert!(matches!(
            f.poll(&id, "bob", Duration::ZERO).await,
            Poll::Unknown
        ));
        assert!(matches!(
            f.poll("req-999", "alice", Duration::ZERO).await,
            Poll::Unknown
        ));
    }
}
