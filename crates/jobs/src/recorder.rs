//! A running job's observer: the job's metrics, log and record in the home's database, fed by
//! the SFT loop, and a [`Display`] for people (the CLI's progress bar). The record is saved at
//! the start, after every checkpoint and at the end, so a job killed at any moment names its
//! last good checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{json, Value};
use whet_sft::{Checkpoint, Control, Observer, StepMetrics};

use crate::{JobError, Store};

/// What a person watching a job sees (a progress bar, or nothing).
pub trait Display {
    /// Training starts (or resumes) at `position` of `total` steps.
    fn start(&mut self, _total: usize, _position: usize) {}
    /// Step `step` ended; `summary` is its metrics in a few words (loss, reward, speed).
    fn step(&mut self, _step: usize, _summary: &str) {}
    /// The eval loss before training.
    fn initial_eval(&mut self, _eval_loss: f64) {}
    /// Training ended (the display can go).
    fn finish(&mut self) {}
}

/// A display that shows nothing (workers, `--json`).
pub struct Quiet;

impl Display for Quiet {}

/// Progress and metrics of the running job.
pub struct Recorder<'s> {
    store: &'s mut Store,
    display: &'s mut dyn Display,
    interrupted: &'s AtomicBool,
    /// The latest step's metrics.
    pub last: Option<StepMetrics>,
    /// Checkpoints saved so far (a resumed job's earlier ones included).
    pub checkpoints: Vec<Checkpoint>,
    /// The job's record, as saved.
    pub record: Value,
    /// Whether the job was asked to stop (`whet jobs cancel`, or `interrupted`).
    pub cancelled: bool,
}

impl<'s> Recorder<'s> {
    /// Records the job whose record is `record`; it stops after a step once `interrupted` is
    /// set (Ctrl-C) or a cancel is requested in the store.
    pub fn new(
        store: &'s mut Store,
        record: Value,
        display: &'s mut dyn Display,
        interrupted: &'s AtomicBool,
    ) -> Self {
        let checkpoints = checkpoints_of(&record);
        Self {
            store,
            display,
            interrupted,
            last: None,
            checkpoints,
            record,
            cancelled: false,
        }
    }

    fn id(&self) -> String {
        self.record["id"].as_str().unwrap_or_default().to_string()
    }

    /// The display.
    pub fn display(&mut self) -> &mut dyn Display {
        self.display
    }

    /// Saves the record (one transaction).
    pub fn save(&mut self) -> Result<(), JobError> {
        self.store.save_job(&self.record)
    }

    /// One log entry, `{timestamp, level, message, data}`; `data.event` names the platform's
    /// progress events (training_start, step_complete, eval_complete, checkpoint_saved,
    /// training_error, training_end).
    pub fn log(&mut self, level: &str, message: String, data: Value) {
        let id = self.id();
        let now = crate::now_rfc3339();
        if let Err(e) = self.store.log(&id, &now, level, &message, &data) {
            tracing::warn!("writing the log of {id}: {e}");
        }
    }

    /// Ends the run: the `training_end` event, then the final record — `completed` (with the
    /// last checkpoint's adapter as `final_adapter`) or `cancelled` (its last checkpoint kept,
    /// no final adapter) — saved, and returned.
    pub fn finish(&mut self, steps: usize, cancelled: bool) -> Result<Value, JobError> {
        let (level, message, data) = if cancelled {
            (
                "warn",
                format!("cancelled after step {steps}"),
                json!({"event": "training_end", "steps": steps, "cancelled": true}),
            )
        } else {
            (
                "info",
                format!("completed {steps} steps"),
                json!({"event": "training_end", "steps": steps}),
            )
        };
        self.log(level, message, data);
        let final_adapter = self
            .checkpoints
            .last()
            .filter(|_| !cancelled)
            .map(|c| c.adapter.clone());
        let r = &mut self.record;
        r["status"] = json!(if cancelled { "cancelled" } else { "completed" });
        if let Some(last) = &self.last {
            r["metrics"] = json!(last);
        }
        r["artifacts"]["checkpoints"] = json!(self.checkpoints);
        r["artifacts"]["final_adapter"] = json!(final_adapter);
        r["completed_at"] = json!(crate::now_rfc3339());
        self.save()?;
        Ok(self.record.clone())
    }

    /// Records a metrics row.
    pub fn metrics(&mut self, step: usize, row: &Value) {
        let id = self.id();
        if let Err(e) = self.store.put_metrics(&id, step, row) {
            tracing::warn!("writing the metrics of {id}: {e}");
        }
    }

    /// Whether the job should stop (Ctrl-C here, `whet jobs cancel` anywhere).
    pub fn cancel_requested(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
            || self.store.cancel_requested(&self.id()).unwrap_or(false)
    }
}

impl Observer for Recorder<'_> {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        let eval = m
            .eval_loss
            .map(|e| format!("  eval {e:.4}"))
            .unwrap_or_default();
        let summary = format!("loss {:.4}{eval}  {:.0} tok/s", m.loss, m.tokens_per_second);
        self.display.step(m.step, &summary);
        self.metrics(m.step, &json!(m));
        self.last = Some(m.clone());
        let data = json!({"event": "step_complete", "metrics": m});
        self.log("info", format!("step {} loss {:.4}", m.step, m.loss), data);
        if let Some(e) = m.eval_loss {
            let data = json!({"event": "eval_complete", "step": m.step, "eval_loss": e});
            self.log("info", format!("eval loss {e:.4} at step {}", m.step), data);
        }
        if self.cancel_requested() {
            self.cancelled = true;
            Control::Stop
        } else {
            Control::Continue
        }
    }

    fn on_checkpoint(&mut self, c: &Checkpoint) {
        self.checkpoints.push(c.clone());
        self.record["artifacts"]["checkpoints"] = json!(self.checkpoints);
        if let Some(last) = &self.last {
            self.record["metrics"] = json!(last);
        }
        if let Err(e) = self.save() {
            tracing::warn!("saving the job record: {e}");
        }
        let data = json!({"event": "checkpoint_saved", "checkpoint": c});
        self.log("info", format!("checkpoint at step {}", c.step), data);
    }

    fn on_initial_eval(&mut self, eval_loss: f64) {
        self.record["initial_eval_loss"] = json!(eval_loss);
        self.display.initial_eval(eval_loss);
        self.metrics(0, &json!({"step": 0, "eval_loss": eval_loss}));
    }
}

/// The checkpoints a job record names, oldest first.
pub fn checkpoints_of(record: &Value) -> Vec<Checkpoint> {
    record["artifacts"]["checkpoints"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    Some(Checkpoint {
                        step: c["step"].as_u64()? as usize,
                        state: c["state"].as_str()?.to_string(),
                        adapter: c["adapter"].as_str()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}
