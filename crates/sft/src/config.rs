//! The SFT hyper-parameters: the `[optimizer]` and `[schedule]` sections of a job file, with
//! their defaults. Unknown keys are refused, so a typo never trains silently with a default.

use serde::{Deserialize, Serialize};
use whet_contract::AdamParams;

/// `[optimizer]`: AdamW, as `torch.optim.AdamW`, plus global gradient-norm clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate (the schedule scales it).
    pub learning_rate: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub grad_clip_norm: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip_norm: 1.0,
        }
    }
}

impl OptimizerConfig {
    /// Tinker's `AdamParams` for one step at learning rate `lr`.
    pub fn adam_params(&self, lr: f64) -> AdamParams {
        AdamParams {
            learning_rate: lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_clip_norm: self.grad_clip_norm,
        }
    }
}

/// How the learning rate moves over the run (after warmup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The peak rate throughout.
    Constant,
    /// Linear decay from the peak to 0 at the last step.
    #[default]
    Linear,
    /// Half a cosine from the peak to 0 at the last step.
    Cosine,
}

/// `[schedule]`: how long, in what batches, in what order, how often to checkpoint and eval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Passes over the training rows.
    pub epochs: usize,
    /// A cap on optimizer steps; training ends at whichever of epochs and steps comes first.
    pub steps: Option<usize>,
    /// Rows per optimizer step (when `batch_tokens` is unset).
    pub batch_size: usize,
    /// Tokens per optimizer step, in place of a row count: each step takes rows in the epoch's
    /// order while their tokens (what the model reads) fit this budget; a row longer than the
    /// budget trains alone. A budget keeps the work per step even when row lengths vary widely;
    /// steps then differ in rows, and epochs (each shuffled differently) in steps. The engine
    /// packs a step's rows into one sequence where rows never attend to each other. Unset:
    /// `batch_size` rows per step. With it set, `batch_size` must stay at its default — a
    /// changed `batch_size` beside it is refused, as one of the two would silently not apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_tokens: Option<usize>,
    /// Forward/backward passes per optimizer step (the batch split into this many parts, by
    /// rows). With `batch_tokens`, a step with fewer rows than this runs one part per row.
    pub gradient_accumulation_steps: usize,
    /// Shuffle the rows each epoch (seeded).
    pub shuffle: bool,
    /// Seed of the shuffling.
    pub seed: u64,
    /// Learning-rate schedule after warmup.
    pub lr_schedule: LrSchedule,
    /// Steps of linear warmup from 0 to the peak rate.
    pub warmup_steps: usize,
    /// Save resumable state and an adapter every this many steps; 0: only at the end.
    pub checkpoint_interval: usize,
    /// Evaluate on the eval rows every this many steps (and at the end); 0: only at the end.
    pub eval_interval: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            steps: None,
            batch_size: 8,
            batch_tokens: None,
            gradient_accumulation_steps: 1,
            shuffle: true,
            seed: 0,
            lr_schedule: LrSchedule::Linear,
            warmup_steps: 0,
            checkpoint_interval: 0,
            eval_interval: 10,
        }
    }
}

/// The learning rate of step `step` (0-based) of `total`: linear warmup over `warmup` steps
/// (step 0 trains at `peak / warmup`, not at 0), then the schedule from the peak down to 0 at
/// the step after the last.
pub fn learning_rate(
    peak: f64,
    schedule: LrSchedule,
    step: usize,
    total: usize,
    warmup: usize,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Linear => peak * (1.0 - progress),
        LrSchedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay_to_zero() {
        let lr = |s, step| learning_rate(1.0, s, step, 10, 2);
        assert_eq!(
            (lr(LrSchedule::Linear, 0), lr(LrSchedule::Linear, 1)),
            (0.5, 1.0)
        );
        assert_eq!(lr(LrSchedule::Linear, 2), 1.0);
        assert!((lr(LrSchedule::Linear, 6) - 0.5).abs() < 1e-12);
        assert!((lr(LrSchedule::Linear, 9) - 0.125).abs() < 1e-12);
        assert!((lr(LrSchedule::Cosine, 6) - 0.5).abs() < 1e-12);
        assert!(lr(LrSchedule::Cosine, 9) > 0.0 && lr(LrSchedule::Cosine, 9) < 0.05);
        assert_eq!(lr(LrSchedule::Constant, 9), 1.0);
        // No warmup: the first step trains at the peak.
        assert_eq!(learning_rate(2.0, LrSchedule::Linear, 0, 4, 0), 2.0);
    }

    #[test]
    fn unknown_keys_are_refused_and_defaults_fill_in() {
        let s: ScheduleConfig = serde_json::from_str(r#"{"epochs": 2}"#).unwrap();
        assert_eq!((s.epochs, s.batch_size, s.batch_tokens), (2, 8, None));
        let s: ScheduleConfig = serde_json::from_str(r#"{"batch_tokens": 4096}"#).unwrap();
        assert_eq!(s.batch_tokens, Some(4096));
        // Unset, it is left out, so a serialised schedule reads as before the field existed.
        let json = serde_json::to_string(&ScheduleConfig::default()).unwrap();
        assert!(!json.contains("batch_tokens"), "{json}");
        let e = serde_json::from_str::<ScheduleConfig>(r#"{"epoch": 2}"#).unwrap_err();
        assert!(e.to_string().contains("epoch"), "{e}");
        let o: OptimizerConfig = serde_json::from_str(r#"{"learning_rate": 0.01}"#).unwrap();
        assert_eq!(o.adam_params(0.5).learning_rate, 0.5);
        assert_eq!(o.adam_params(0.5).grad_clip_norm, 1.0);
    }
}
