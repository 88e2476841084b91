//! A run's directory under the home: its record (`job.json`, rewritten atomically at the start,
//! after every checkpoint and at the end), its metrics (`metrics.jsonl`) and its log
//! (`log.jsonl`), fed by the SFT loop's observer, with the progress bar.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use whet_sft::{Checkpoint, Control, Observer, StepMetrics};

use crate::train_cmd::now;

/// Set by the first Ctrl-C: the run stops after the step in progress and keeps its last
/// checkpoint; a second Ctrl-C exits at once.
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
pub struct Progress {
    /// The terminal's progress bar (loss, eval loss, tokens/s, ETA).
    pub bar: ProgressBar,
    metrics: std::fs::File,
    log: std::fs::File,
    /// The latest step's metrics.
    pub last: Option<StepMetrics>,
    /// Checkpoints saved so far (a resumed run's earlier ones included).
    pub checkpoints: Vec<Checkpoint>,
    /// The eval loss before the first step.
    pub initial_eval: Option<f64>,
    /// The run's directory and its record, rewritten (atomically) at the start and after each
    /// checkpoint: a run killed at any moment leaves a record naming its last good checkpoint.
    pub dir: PathBuf,
    pub record: Value,
}

impl Progress {
    /// Opens the run's metrics and log (appending when resuming) and writes the record.
    pub fn open(dir: &Path, record: Value, total_steps: usize, append: bool) -> Result<Self> {
        let file = |name: &str| -> Result<std::fs::File> {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .create(true)
                .append(append)
                .write(true)
                .truncate(!append)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        };
        let bar = ProgressBar::new(total_steps as u64).with_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let progress = Self {
            bar,
            metrics: file("metrics.jsonl")?,
            log: file("log.jsonl")?,
            last: None,
            checkpoints: vec![],
            initial_eval: None,
            dir: dir.to_path_buf(),
            record,
        };
        progress.save();
        Ok(progress)
    }

    pub fn save(&self) {
        if let Err(e) = write_record(&self.dir, &self.record) {
            tracing::warn!("writing the job record: {e:#}");
        }
    }

    /// One log entry, `{timestamp, level, message, data}`; `data.event` names the platform's
    /// progress events (training_start, step_complete, eval_complete, checkpoint_saved,
    /// training_error, training_end).
    pub fn log(&mut self, level: &str, message: String, data: Value) {
        let line =
            json!({"timestamp": rfc3339(now()), "level": level, "message": message, "data": data});
        if let Err(e) = writeln!(self.log, "{line}") {
            tracing::warn!("writing the log: {e}");
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (days to civil date: Howard Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
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

impl Observer for Progress {
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
        let line = serde_json::to_string(m).unwrap_or_default();
        if let Err(e) = writeln!(self.metrics, "{line}") {
            tracing::warn!("writing metrics: {e}");
        }
        self.last = Some(m.clone());
        let data = json!({"event": "step_complete", "metrics": m});
        self.log("info", format!("step {} loss {:.4}", m.step, m.loss), data);
        if let Some(e) = m.eval_loss {
            let data = json!({"event": "eval_complete", "step": m.step, "eval_loss": e});
            self.log("info", format!("eval loss {e:.4} at step {}", m.step), data);
        }
        if CANCEL.load(std::sync::atomic::Ordering::SeqCst) {
            Control::Stop
        } else {
            Control::Continue
        }
    }

    fn on_checkpoint(&mut self, c: &Checkpoint) {
        self.checkpoints.push(c.clone());
        self.record["artifacts"]["checkpoints"] = json!(self.checkpoints);
        self.record["metrics"] = json!(self.last);
        self.save();
        let data = json!({"event": "checkpoint_saved", "checkpoint": c});
        self.log("info", format!("checkpoint at step {}", c.step), data);
    }

    fn on_initial_eval(&mut self, eval_loss: f64) {
        self.initial_eval = Some(eval_loss);
        self.bar
            .set_message(format!("eval {eval_loss:.4} before training"));
        let line = json!({"step": 0, "eval_loss": eval_loss});
        if let Err(e) = writeln!(self.metrics, "{line}") {
            tracing::warn!("writing metrics: {e}");
        }
    }
}

/// Writes the record atomically.
pub fn write_record(dir: &Path, record: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(record)?;
    whet_lora::io::write_atomic(&dir.join("job.json"), text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_996_800 + 3661), "2026-11-30T01:01:01Z");
    }
}
