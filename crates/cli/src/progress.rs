//! A running job's progress: the terminal's bar, and the job's metrics, log and record in the
//! home's database, fed by the SFT loop's observer. The record is saved at the start, after
//! every checkpoint and at the end, so a job killed at any moment names its last good
//! checkpoint.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use whet_jobs::Store;
use whet_sft::{Checkpoint, Control, Observer, StepMetrics};

/// Set by the first Ctrl-C (or SIGTERM): the job stops after the step in progress and keeps
/// its last checkpoint; a second Ctrl-C exits at once.
pub static CANCEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Routes Ctrl-C (SIGINT) and SIGTERM to [`CANCEL`].
pub fn catch_interrupts() {
    use std::sync::atomic::Ordering;
    let installed = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ncancelling after this step (Ctrl-C again to quit now)");
    });
    if let Err(e) = installed {
        tracing::warn!("Ctrl-C will not cancel cleanly: {e}");
    }
}

/// Progress and metrics of the running job.
pub struct Progress<'s> {
    /// The terminal's progress bar (loss, eval loss, tokens/s, ETA).
    pub bar: ProgressBar,
    store: &'s mut Store,
    /// The latest step's metrics.
    pub last: Option<StepMetrics>,
    /// Checkpoints saved so far (a resumed job's earlier ones included).
    pub checkpoints: Vec<Checkpoint>,
    /// The eval loss before the first step.
    pub initial_eval: Option<f64>,
    /// The job's record, as saved.
    pub record: Value,
    /// Whether someone cancelled the job (`whet jobs cancel`, Ctrl-C).
    pub cancelled: bool,
}

impl<'s> Progress<'s> {
    /// Progress of the job whose record is `record`, over `total_steps`.
    pub fn new(store: &'s mut Store, record: Value, total_steps: usize, quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total_steps as u64).with_style(
                ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
        };
        let checkpoints = checkpoints_of(&record);
        Self {
            bar,
            store,
            last: None,
            checkpoints,
            initial_eval: record["initial_eval_loss"].as_f64(),
            record,
            cancelled: false,
        }
    }

    fn id(&self) -> String {
        self.record["id"].as_str().unwrap_or_default().to_string()
    }

    /// Saves the record (one transaction).
    pub fn save(&mut self) -> Result<()> {
        self.store.save_job(&self.record)?;
        Ok(())
    }

    /// One log entry, `{timestamp, level, message, data}`; `data.event` names the platform's
    /// progress events (training_start, step_complete, eval_complete, checkpoint_saved,
    /// training_error, training_end).
    pub fn log(&mut self, level: &str, message: String, data: Value) {
        let id = self.id();
        let now = whet_jobs::now_rfc3339();
        if let Err(e) = self.store.log(&id, &now, level, &message, &data) {
            tracing::warn!("writing the log of {id}: {e}");
        }
    }

    /// Records a metrics row.
    fn metrics(&mut self, step: usize, row: &Value) {
        let id = self.id();
        if let Err(e) = self.store.put_metrics(&id, step, row) {
            tracing::warn!("writing the metrics of {id}: {e}");
        }
    }

    /// Whether the job should stop: Ctrl-C here, or `whet jobs cancel` anywhere.
    fn cancel_requested(&self) -> bool {
        CANCEL.load(std::sync::atomic::Ordering::SeqCst)
            || self.store.cancel_requested(&self.id()).unwrap_or(false)
    }
}

impl Observer for Progress<'_> {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.bar.set_position(m.step as u64);
        let eval = m
            .eval_loss
            .map(|e| format!("  eval {e:.4}"))
            .unwrap_or_default();
        self.bar.set_message(format!(
            "loss {:.4}{eval}  {:.0} tok/s",
            m.loss, m.tokens_per_second
        ));
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
        self.record["metrics"] = json!(self.last);
        if let Err(e) = self.save() {
            tracing::warn!("saving the job record: {e:#}");
        }
        let data = json!({"event": "checkpoint_saved", "checkpoint": c});
        self.log("info", format!("checkpoint at step {}", c.step), data);
    }

    fn on_initial_eval(&mut self, eval_loss: f64) {
        self.initial_eval = Some(eval_loss);
        self.record["initial_eval_loss"] = json!(eval_loss);
        self.bar
            .set_message(format!("eval {eval_loss:.4} before training"));
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
