//! The SFT loop, over Tinker's training contract only: it runs the same against the in-process
//! engine or a remote Tinker-protocol server.
//!
//! Read [`train`] top to bottom: the plan picks the step's rows, chat rows are normalised so
//! the loss is the mean over the batch's trained tokens, `forward_backward` runs once per
//! accumulation part, `optim_step` applies AdamW at the schedule's learning rate, metrics go to
//! the observer, eval and checkpoints follow their intervals. Everything a resumed run needs
//! is either in the saved state (adapter, AdamW moments, step, dropout RNG) or a pure function
//! of the config and the step number (data order, learning rate), so resuming from a checkpoint
//! reproduces the uninterrupted run bit for bit.

#![warn(missing_docs)]

pub mod config;
pub mod examples;
pub mod plan;

use std::time::Instant;

use serde::Serialize;
use whet_contract::{ContractError, Datum, LossFn, LossFnConfig, TrainingClient};

pub use config::{learning_rate, LrSchedule, OptimizerConfig, ScheduleConfig};
pub use examples::{prepare, prepare_row, Example, Prepared, Rendering, RowOutcome};
pub use plan::Plan;

/// Errors of the SFT loop.
#[derive(Debug, thiserror::Error)]
pub enum SftError {
    /// A setting that cannot work (names the field).
    #[error("{0}")]
    Config(String),
    /// A row that cannot be trained on.
    #[error("{location}: {message}")]
    Row {
        /// `file:line`.
        location: String,
        /// What is wrong.
        message: String,
    },
    /// A row whose loss weights are all zero (no assistant message to learn, or all
    /// `weight: 0`).
    #[error("{location}: trains on nothing (no weighted target token; check train_on and the row's assistant messages)")]
    NothingTrained {
        /// `file:line`.
        location: String,
    },
    /// The training client failed.
    #[error(transparent)]
    Contract(#[from] ContractError),
}

/// One optimizer step's metrics (the keys of a job's metrics JSONL).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepMetrics {
    /// Steps completed (1-based).
    pub step: usize,
    /// Mean loss per trained token of the batch (datums: the weighted sum as given).
    pub loss: f64,
    /// The learning rate of this step.
    pub learning_rate: f64,
    /// Tokens read.
    pub num_tokens: usize,
    /// Tokens with a positive loss weight.
    pub num_loss_tokens: usize,
    /// `num_tokens` over the step's wall time (forward, backward and optimizer).
    pub tokens_per_second: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean eval loss per trained token, when evaluated at this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// A checkpoint the loop saved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checkpoint {
    /// Steps completed when it was saved.
    pub step: usize,
    /// Resumable state (adapter, optimizer, step): what `load_state_with_optimizer` takes.
    pub state: String,
    /// A PEFT adapter directory.
    pub adapter: String,
}

/// Whether to go on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Train the next step.
    Continue,
    /// Stop now (a cancelled job): no further step, no new checkpoint.
    Stop,
}

/// Where the loop reports (a job writes these to its store; tests collect them).
pub trait Observer {
    /// After each optimizer step (with `eval_loss` when the step evaluated).
    fn on_step(&mut self, metrics: &StepMetrics) -> Control;
    /// After each checkpoint, before training goes on.
    fn on_checkpoint(&mut self, checkpoint: &Checkpoint);
    /// The eval loss before the first step (a run from step 0 with eval rows).
    fn on_initial_eval(&mut self, _eval_loss: f64) {}
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// Steps completed (counting those before a resume).
    pub steps: usize,
    /// The eval loss before training (runs from step 0 with eval rows).
    pub initial_eval_loss: Option<f64>,
    /// The run's steps, when it was not stopped.
    pub total_steps: usize,
    /// The final checkpoint (absent when stopped early).
    pub last: Option<Checkpoint>,
    /// Stopped by the observer.
    pub stopped: bool,
}

/// Eval datums per `forward` call.
const EVAL_CHUNK: usize = 16;

/// Trains from step `start_step` (0, or the step of the checkpoint the client's state was
/// loaded from) to the end of the plan.
pub fn train(
    client: &mut dyn TrainingClient,
    examples: &[Example],
    eval: &[Example],
    optimizer: &OptimizerConfig,
    schedule: &ScheduleConfig,
    start_step: usize,
    observer: &mut dyn Observer,
) -> Result<Outcome, SftError> {
    let plan = Plan::for_examples(examples, schedule)?;
    let total = plan.total_steps();
    if start_step > total {
        return Err(SftError::Config(format!(
            "resuming at step {start_step}, but the run has {total} steps"
        )));
    }
    let eval_datums = eval_set(eval);
    let loss_config = LossFnConfig::new();
    // The starting point of the eval curve (forward only: no state changes, so a resumed run
    // that skips it stays bitwise the same).
    let initial_eval_loss = if start_step == 0 && !eval_datums.is_empty() {
        let l = eval_loss(client, &eval_datums)?;
        observer.on_initial_eval(l);
        Some(l)
    } else {
        None
    };
    for step in start_step..total {
        let started = Instant::now();
        // 1. The step's rows, chat rows normalised to a mean over the batch's trained tokens.
        let batch: Vec<&Example> = plan.batch(step).into_iter().map(|i| &examples[i]).collect();
        let datums = examples::normalized(&batch);
        // 2. Gradients, accumulated over the parts of the batch.
        let mut loss = 0.0;
        for part in accumulation_parts(&datums, schedule.gradient_accumulation_steps) {
            let out = client.forward_backward(part, LossFn::CrossEntropy, &loss_config)?;
            loss += out.metrics.get("loss:sum").copied().unwrap_or(0.0);
        }
        // 3. One AdamW step at the schedule's rate.
        let lr = learning_rate(
            optimizer.learning_rate,
            schedule.lr_schedule,
            step,
            total,
            schedule.warmup_steps,
        );
        let opt = client.optim_step(&optimizer.adam_params(lr))?;
        let done = step + 1;
        let num_tokens: usize = batch.iter().map(|e| e.tokens()).sum();
        let mut metrics = StepMetrics {
            step: done,
            loss,
            learning_rate: lr,
            num_tokens,
            num_loss_tokens: batch.iter().map(|e| e.trained_tokens()).sum(),
            tokens_per_second: num_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            grad_norm: opt.metrics.get("grad_norm:mean").copied().unwrap_or(0.0),
            eval_loss: None,
        };
        // 4. Eval on its interval and at the end.
        let last = done == total;
        let eval_now = schedule.eval_interval > 0 && done.is_multiple_of(schedule.eval_interval);
        if !eval_datums.is_empty() && (eval_now || last) {
            metrics.eval_loss = Some(eval_loss(client, &eval_datums)?);
        }
        tracing::info!(
            "step {done}/{total} loss {:.4} lr {lr:.3e} {:.0} tok/s",
            metrics.loss,
            metrics.tokens_per_second
        );
        let control = observer.on_step(&metrics);
        // 5. Checkpoints on their interval and at the end (not when stopped: a cancelled run
        //    keeps its last checkpoint).
        if last {
            let c = checkpoint(client, done, "final")?;
            observer.on_checkpoint(&c);
            return Ok(Outcome {
                initial_eval_loss,
                steps: done,
                total_steps: total,
                last: Some(c),
                stopped: false,
            });
        }
        if control == Control::Stop {
            return Ok(Outcome {
                initial_eval_loss,
                steps: done,
                total_steps: total,
                last: None,
                stopped: true,
            });
        }
        if schedule.checkpoint_interval > 0 && done.is_multiple_of(schedule.checkpoint_interval) {
            let c = checkpoint(client, done, &format!("step-{done}"))?;
            observer.on_checkpoint(&c);
        }
    }
    // Resumed at the very end: nothing left to train.
    Ok(Outcome {
        initial_eval_loss,
        steps: total,
        total_steps: total,
        last: None,
        stopped: false,
    })
}

/// The batch in at most `parts` runs of consecutive rows, each of `ceil(rows / parts)` rows
/// but the last. A batch with fewer rows than parts (a token budget's step can be a single
/// long row) runs one part per row rather than failing: the parts' gradients add up to the
/// batch's either way, as the weights were normalised over the whole batch first.
fn accumulation_parts(datums: &[Datum], parts: usize) -> std::slice::Chunks<'_, Datum> {
    datums.chunks(datums.len().div_ceil(parts.max(1)).max(1))
}

fn checkpoint(
    client: &mut dyn TrainingClient,
    step: usize,
    name: &str,
) -> Result<Checkpoint, SftError> {
    Ok(Checkpoint {
        step,
        state: client.save_state(name)?,
        adapter: client.save_weights_for_sampler(name)?,
    })
}

/// The eval rows with weights scaled so that `loss:sum` over all of them is the mean loss per
/// trained token of the whole eval set.
fn eval_set(eval: &[Example]) -> Vec<Datum> {
    let all: Vec<Example> = eval
        .iter()
        .map(|e| Example {
            normalize: true,
            ..e.clone()
        })
        .collect();
    examples::normalized(&all.iter().collect::<Vec<_>>())
}

fn eval_loss(client: &mut dyn TrainingClient, datums: &[Datum]) -> Result<f64, SftError> {
    let mut total = 0.0;
    for chunk in datums.chunks(EVAL_CHUNK) {
        let out = client.forward(chunk, LossFn::CrossEntropy, &LossFnConfig::new())?;
        total += out.metrics.get("loss:sum").copied().unwrap_or(0.0);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulation_parts_cover_the_batch_in_order() {
        let datums: Vec<Datum> = (0..5)
            .map(|i| Datum {
                model_input: whet_contract::ModelInput::from_ints(vec![i]),
                loss_fn_inputs: Default::default(),
            })
            .collect();
        let sizes = |parts| {
            accumulation_parts(&datums, parts)
                .map(<[Datum]>::len)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(1), vec![5]);
        assert_eq!(sizes(2), vec![3, 2]);
        // More parts than rows: one row each, no empty part.
        assert_eq!(sizes(8), vec![1; 5]);
        assert_eq!(accumulation_parts(&datums[..1], 4).count(), 1);
    }
}
