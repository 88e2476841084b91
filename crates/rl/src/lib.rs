//! Reinforcement learning over Tinker's training contract: groups of rollouts per prompt
//! scored by reward recipes, group-relative advantages, and the loop that turns them into
//! `importance_sampling` / `ppo` steps. It runs the same against the in-process engine or a
//! remote Tinker-protocol server.
//!
//! Read [`train`] top to bottom: the plan picks the step's prompts; the sampler (the current
//! weights, refreshed every `weight_sync_interval` steps) draws `num_rollouts` completions of
//! each, seeded by step and group; the recipe scores them; advantages are rewards minus the
//! group mean; the datums carry the sampler's logprobs and the advantages on the completion
//! tokens; one `forward_backward` and one `optim_step` follow. The advantages are divided by the
//! step's count of completion tokens, so the loss is a mean over sampled tokens and the learning
//! rate does not depend on the batch's size or its completions' lengths.

#![warn(missing_docs)]

pub mod advantages;
pub mod config;
pub mod episode;
pub mod prompts;
pub mod recipes;
pub mod rollouts;
mod step;
pub mod world;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Instant;

use whet_contract::{ContractError, SamplingClient, TrainingClient};
use whet_data::Tokenizer;
use whet_sft::{Checkpoint, Control, OptimizerConfig, ScheduleConfig};

pub use advantages::{group_advantages, group_kind, GroupKind};
pub use config::{Algorithm, ExecutionMode, RewardConfig, RlConfig};
pub use prompts::{load_prompts, prompt_messages, prompts_from_rows, trajectory_rows};
pub use recipes::{recipe, Recipe, RewardError};
pub use rollouts::{Prompt, Rollout};
use step::{sample_batch, sample_world_batch, train_batch, Batch};

/// Errors of the RL loop.
#[derive(Debug, thiserror::Error)]
pub enum RlError {
    /// A setting that cannot work (names the field).
    #[error("{0}")]
    Config(String),
    /// The training client failed.
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// Text that cannot be decoded.
    #[error(transparent)]
    Data(#[from] whet_data::DataError),
    /// The plan (schedule) cannot work.
    #[error(transparent)]
    Sft(#[from] whet_sft::SftError),
    /// A step's failed rollouts went past `rl.max_error_rate`.
    #[error(
        "step {step}: {:.0}% of the rollouts failed, above rl.max_error_rate = {max} \
         (the job log names the errors)", rate * 100.0
    )]
    TooManyErrors {
        /// The step (1-based).
        step: usize,
        /// Its share of failed rollouts.
        rate: f64,
        /// `rl.max_error_rate`.
        max: f64,
    },
}

/// A step's metrics: `step`, `loss`, `learning_rate`, `grad_norm`, `train/reward_mean|min|max`,
/// `by_group/frac_all_good|all_bad|mixed`, `rollouts/failed`, `optim/kl_sample_train_v1|v2`,
/// `optim/entropy`, `tokens/completion_mean`, `num_tokens`, `tokens_per_second`,
/// `time/sample`, `time/train`; live RL adds `worlds/success_rate|turns_mean|episodes_error`
/// and `worlds/reward/<source>`; `eval/reward_mean` and `eval/rollouts` when evaluated (and for
/// a world `eval/success_rate`, `eval/turns_mean`).
pub type Metrics = BTreeMap<String, f64>;

/// Watches a run: metrics, rollouts, checkpoints; may stop it after a step.
pub trait Observer {
    /// After each optimizer step.
    fn on_step(&mut self, metrics: &Metrics) -> Control;
    /// The step's rollouts (for the job's rollout log).
    fn on_rollouts(&mut self, _step: usize, _prompts: &[&Prompt], _groups: &[Vec<Rollout>]) {}
    /// The step's world episodes (live RL), one list per group.
    fn on_episodes(&mut self, _step: usize, _episodes: &[Vec<episode::Episode>]) {}
    /// After each checkpoint.
    fn on_checkpoint(&mut self, checkpoint: &Checkpoint);
    /// The eval reward before the first step.
    fn on_initial_eval(&mut self, _metrics: &Metrics) {}
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Steps completed (counting those before a resume).
    pub steps: usize,
    /// Steps in the run.
    pub total_steps: usize,
    /// The final checkpoint, when the run reached its end.
    pub last: Option<Checkpoint>,
    /// Whether the observer stopped it.
    pub stopped: bool,
}

/// A seed for step `step`, group `group` (SplitMix64 of the run's seed): fixed here so a
/// resumed run samples what the uninterrupted one did.
fn seed(run_seed: u64, step: usize, group: usize) -> u64 {
    let mut z = run_seed
        .wrapping_add((step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((group as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Everything a run needs besides the client.
pub struct Run<'a> {
    /// Training prompts.
    pub prompts: &'a [Prompt],
    /// Eval prompts (scored greedily, one rollout each, unless `rl.eval_temperature` says
    /// otherwise).
    pub eval: &'a [Prompt],
    /// Decodes completions for the recipe.
    pub tokenizer: &'a Tokenizer,
    /// Scores rollouts.
    pub recipe: &'a dyn Recipe,
    /// `[rl]`.
    pub rl: &'a RlConfig,
    /// `[optimizer]`.
    pub optimizer: &'a OptimizerConfig,
    /// `[schedule]` (its `batch_size` is `rl.groups_per_step`).
    pub schedule: &'a ScheduleConfig,
    /// Live RL: the world the episodes are played in (then `prompts` is unused: the plan runs
    /// over the manifest's (task, seed) slots).
    pub world: Option<WorldRun<'a>>,
}

/// The world of a live-RL run.
#[derive(Clone, Copy)]
pub struct WorldRun<'a> {
    /// Its manifest.
    pub manifest: &'a world::Manifest,
    /// The capability's system prompt, before the world's first observation.
    pub system_prompt: Option<&'a str>,
}

impl Run<'_> {
    /// The schedule with one batch = one step's prompts.
    fn schedule(&self) -> ScheduleConfig {
        ScheduleConfig {
            batch_size: self.rl.groups_per_step,
            batch_tokens: None,
            gradient_accumulation_steps: 1,
            ..self.schedule.clone()
        }
    }
}

/// Samples a step's batch: prompts and recipe, or episodes in the world.
fn sample(
    sampler: &dyn SamplingClient,
    run: &Run<'_>,
    plan: &whet_sft::Plan,
    step: usize,
    version: usize,
) -> Result<Batch, RlError> {
    if run.world.is_some() {
        sample_world_batch(sampler, run, plan, step, version)
    } else {
        sample_batch(sampler, run, plan, step, version)
    }
}

/// Trains from `start_step` to the end of the plan (see the crate docs for the order of work).
///
/// Execution modes: `sync` samples each step with the current weights. `one_step_off_async`
/// samples step n + 1 (on a second thread, with the weights before step n's update) while step
/// n trains: every batch after the first is exactly one step stale. `fully_async` keeps a
/// sampler running ahead on its own thread, always with the newest weights it has been handed,
/// at most `max_steps_off_policy` batches ahead; a batch staler than the bound when its turn
/// comes is discarded (counted in `async/discarded_groups`) and that step trains on nothing.
/// Sync runs resume bit for bit; async runs resume correctly (the first resumed step samples
/// on-policy) but, timing being part of fully_async, not bitwise.
pub fn train(
    client: &mut dyn TrainingClient,
    run: &Run<'_>,
    start_step: usize,
    observer: &mut dyn Observer,
) -> Result<Outcome, RlError> {
    run.rl.check().map_err(RlError::Config)?;
    let schedule = run.schedule();
    let slots = match &run.world {
        Some(w) => w.manifest.tasks.len() * w.manifest.seeds.len(),
        None => run.prompts.len(),
    };
    let plan = whet_sft::Plan::new(slots, &schedule)?;
    let total = plan.total_steps();
    if start_step > total {
        return Err(RlError::Config(format!(
            "resuming at step {start_step}, but the run has {total} steps"
        )));
    }
    if start_step == 0 && has_eval(run) {
        let sampler = client.sampling_client()?;
        let mut m = evaluate(sampler.as_ref(), run)?;
        m.insert("step".into(), 0.0);
        observer.on_initial_eval(&m);
    }
    let bound = run.rl.max_steps_off_policy.unwrap_or(1).max(1);
    let mode = run.rl.execution_mode;
    let plan = &plan;
    let stopped_thread = || RlError::Config("the sampling thread stopped".into());
    std::thread::scope(|scope| -> Result<Outcome, RlError> {
        // one_step_off_async: the next step's batch, sampling while this step trains.
        let mut next: Option<std::thread::ScopedJoinHandle<'_, Result<Batch, RlError>>> = None;
        // fully_async: weights to the sampler thread, batches back, at most `bound` ahead.
        let (weights_tx, weights_rx) = mpsc::channel::<(usize, Box<dyn SamplingClient>)>();
        let (batches_tx, batches_rx) = mpsc::sync_channel::<Result<Batch, RlError>>(bound - 1);
        if mode == ExecutionMode::FullyAsync {
            weights_tx
                .send((start_step, client.sampling_client()?))
                .map_err(|_| stopped_thread())?;
            scope.spawn(move || {
                let Ok((mut version, mut sampler)) = weights_rx.recv() else {
                    return;
                };
                for step in start_step..total {
                    // The newest weights handed over so far.
                    while let Ok((v, s)) = weights_rx.try_recv() {
                        (version, sampler) = (v, s);
                    }
                    let batch = sample(sampler.as_ref(), run, plan, step, version);
                    let failed = batch.is_err();
                    if batches_tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            });
        }
        let mut sampler: Option<Box<dyn SamplingClient>> = None;
        for step in start_step..total {
            let started = Instant::now();
            // 1. The step's batch of groups, sampled and scored.
            let mut discarded = 0usize;
            let mut batch = match mode {
                ExecutionMode::Sync => {
                    // The current weights, refreshed on their interval (and after a resume).
                    if sampler.is_none() || step % run.rl.weight_sync_interval == 0 {
                        sampler = Some(client.sampling_client()?);
                    }
                    let s = sampler.as_deref().ok_or_else(stopped_thread)?;
                    sample(s, run, plan, step, step)?
                }
                ExecutionMode::OneStepOffAsync => {
                    let batch = match next.take() {
                        Some(h) => h.join().map_err(|_| stopped_thread())??,
                        None => {
                            let s = client.sampling_client()?;
                            sample(s.as_ref(), run, plan, step, step)?
                        }
                    };
                    if step + 1 < total {
                        let s = client.sampling_client()?;
                        next = Some(
                            scope.spawn(move || sample(s.as_ref(), run, plan, step + 1, step)),
                        );
                    }
                    batch
                }
                ExecutionMode::FullyAsync => {
                    let mut batch = batches_rx.recv().map_err(|_| stopped_thread())??;
                    if batch.step != step {
                        return Err(RlError::Config(format!(
                            "the sampling thread sent step {} for step {step}",
                            batch.step
                        )));
                    }
                    if step - batch.version > bound {
                        // Too stale for the bound: nothing of it is trained.
                        discarded = batch.groups.len();
                        batch.groups.clear();
                        batch.prompts.clear();
                    }
                    batch
                }
            };
            // 2. Advantages, forward_backward, optim_step.
            let lr = whet_sft::learning_rate(
                run.optimizer.learning_rate,
                schedule.lr_schedule,
                step,
                total,
                schedule.warmup_steps,
            );
            let mut m = train_batch(client, run, &mut batch, lr)?;
            let done = step + 1;
            if mode == ExecutionMode::FullyAsync && done < total {
                // A sampler thread that ended (it sent an error) takes no more weights.
                let _ = weights_tx.send((done, client.sampling_client()?));
            }
            m.insert("step".into(), done as f64);
            m.insert("async/staleness".into(), (step - batch.version) as f64);
            m.insert("async/discarded_groups".into(), discarded as f64);
            let seconds = started.elapsed().as_secs_f64();
            m.insert("time/step".into(), seconds);
            m.insert(
                "tokens_per_second".into(),
                m["num_tokens"] / seconds.max(1e-9),
            );
            // 3. Eval on its interval and at the end.
            let last = done == total;
            let every = run.schedule.eval_interval;
            if has_eval(run) && (last || (every > 0 && done.is_multiple_of(every))) {
                let s = client.sampling_client()?;
                m.extend(evaluate(s.as_ref(), run)?);
            }
            let prompts: Vec<&Prompt> = batch.prompts.iter().map(|&i| &run.prompts[i]).collect();
            observer.on_rollouts(done, &prompts, &batch.groups);
            if !batch.episodes.is_empty() {
                observer.on_episodes(done, &batch.episodes);
            }
            let control = observer.on_step(&m);
            let rate = m.get("rollouts/error_rate").copied().unwrap_or(0.0);
            if rate > run.rl.max_error_rate {
                return Err(RlError::TooManyErrors {
                    step: done,
                    rate,
                    max: run.rl.max_error_rate,
                });
            }
            // 4. Checkpoints, as for SFT.
            if last {
                let c = checkpoint(client, done, "final")?;
                observer.on_checkpoint(&c);
                return Ok(Outcome {
                    steps: done,
                    total_steps: total,
                    last: Some(c),
                    stopped: false,
                });
            }
            if control == Control::Stop {
                return Ok(Outcome {
                    steps: done,
                    total_steps: total,
                    last: None,
                    stopped: true,
                });
            }
            let every = run.schedule.checkpoint_interval;
            if every > 0 && done.is_multiple_of(every) {
                let c = checkpoint(client, done, &format!("step-{done}"))?;
                observer.on_checkpoint(&c);
            }
        }
        Ok(Outcome {
            steps: total,
            total_steps: total,
            last: None,
            stopped: false,
        })
    })
}

fn checkpoint(
    client: &mut dyn TrainingClient,
    step: usize,
    name: &str,
) -> Result<Checkpoint, RlError> {
    Ok(Checkpoint {
        step,
        state: client.save_state(name)?,
        adapter: client.save_weights_for_sampler(name)?,
    })
}

/// Whether the run has anything to evaluate on: eval prompts, or a world's eval seeds.
fn has_eval(run: &Run<'_>) -> bool {
    match &run.world {
        Some(w) => !w.manifest.eval_seeds.is_empty(),
        None => !run.eval.is_empty(),
    }
}

/// The evaluation, on at most `eval_max_rollouts` eval prompts (or world eval (task, seed)
/// pairs): greedy with one rollout each by default, or `eval_num_rollouts` each at
/// `eval_temperature`. `eval/reward_mean` is the mean reward (a world's: the mean return), and
/// for a world `eval/success_rate` and `eval/turns_mean`; `eval/rollouts` counts them.
///
/// The sampling seeds depend only on the rollout's place in the eval (the run's seed mixed
/// with a step index training never reaches), so every eval of a run, and of another run with
/// the same seed, draws the same random numbers: a change between two evals is the policy's.
fn evaluate(sampler: &dyn SamplingClient, run: &Run<'_>) -> Result<Metrics, RlError> {
    let limit = run.rl.eval_max_rollouts.max(1);
    let (temperature, k) = match run.rl.eval_temperature {
        t if t > 0.0 => (t, run.rl.eval_num_rollouts),
        _ => (0.0, 1),
    };
    let eval_seed = |j: usize| seed(run.schedule.seed, usize::MAX, j);
    let mut m = Metrics::new();
    if let Some(world) = &run.world {
        let specs: Vec<episode::EpisodeSpec> = world
            .manifest
            .eval_episodes()
            .into_iter()
            .take(limit)
            .flat_map(|(task, seed)| (0..k).map(move |_| (task.clone(), seed)))
            .enumerate()
            .map(|(j, (task, seed))| episode::EpisodeSpec {
                task,
                seed,
                sample_seed: eval_seed(j),
            })
            .collect();
        let n = specs.len();
        // All in one lockstep batch.
        let played = episode::play_many(
            world.manifest,
            sampler,
            run.tokenizer,
            world.system_prompt,
            &specs,
            temperature,
        )?;
        let ret: f64 = played.iter().map(episode::Episode::total_reward).sum();
        let won = played.iter().filter(|e| e.success).count() as f64;
        let turns: f64 = played.iter().map(|e| e.turns.len() as f64).sum();
        m.insert("eval/rollouts".into(), n as f64);
        let n = n.max(1) as f64;
        m.insert("eval/reward_mean".into(), ret / n);
        m.insert("eval/success_rate".into(), won / n);
        m.insert("eval/turns_mean".into(), turns / n);
        return Ok(m);
    }
    let (mut total, mut n) = (0.0, 0usize);
    for (j, prompt) in run.eval.iter().take(limit).enumerate() {
        let p = rollouts::params(
            run.rl.max_new_tokens,
            temperature,
            run.rl.top_p,
            &run.rl.stop,
            eval_seed(j),
        );
        let group = rollouts::sample_group(sampler, run.tokenizer, run.recipe, prompt, k, &p)?;
        // An eval rollout that cannot be scored counts as 0.
        total += group.iter().map(|r| r.reward.unwrap_or(0.0)).sum::<f64>();
        n += group.len();
    }
    m.insert("eval/rollouts".into(), n as f64);
    m.insert("eval/reward_mean".into(), total / n.max(1) as f64);
    Ok(m)
}
