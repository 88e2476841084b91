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
pub mod prompts;
pub mod recipes;
pub mod rollouts;

use std::collections::BTreeMap;
use std::time::Instant;

use whet_contract::{ContractError, SamplingClient, TrainingClient};
use whet_data::Tokenizer;
use whet_sft::{Checkpoint, Control, OptimizerConfig, ScheduleConfig};

pub use advantages::{group_advantages, group_kind, GroupKind};
pub use config::{Algorithm, ExecutionMode, RewardConfig, RlConfig};
pub use prompts::{load_prompts, prompt_messages};
pub use recipes::{recipe, Recipe, RewardError};
pub use rollouts::{Prompt, Rollout};

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
}

/// A step's metrics: `step`, `loss`, `learning_rate`, `grad_norm`, `train/reward_mean|min|max`,
/// `by_group/frac_all_good|all_bad|mixed`, `rollouts/failed`, `optim/kl_sample_train_v1|v2`,
/// `optim/entropy`, `tokens/completion_mean`, `num_tokens`, `tokens_per_second`,
/// `time/sample`, `time/train`, and `eval/reward_mean` when evaluated.
pub type Metrics = BTreeMap<String, f64>;

/// Watches a run: metrics, rollouts, checkpoints; may stop it after a step.
pub trait Observer {
    /// After each optimizer step.
    fn on_step(&mut self, metrics: &Metrics) -> Control;
    /// The step's rollouts (for the job's rollout log).
    fn on_rollouts(&mut self, _step: usize, _prompts: &[&Prompt], _groups: &[Vec<Rollout>]) {}
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
    /// Eval prompts (scored greedily, one rollout each).
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

/// Trains from `start_step` to the end of the plan (see the crate docs for the order of work).
pub fn train(
    client: &mut dyn TrainingClient,
    run: &Run<'_>,
    start_step: usize,
    observer: &mut dyn Observer,
) -> Result<Outcome, RlError> {
    run.rl.check().map_err(RlError::Config)?;
    if run.rl.execution_mode != ExecutionMode::Sync {
        return Err(RlError::Config(
            "`rl.execution_mode`: only \"sync\" is available in this version".into(),
        ));
    }
    let schedule = run.schedule();
    let plan = whet_sft::Plan::new(run.prompts.len(), &schedule)?;
    let total = plan.total_steps();
    if start_step > total {
        return Err(RlError::Config(format!(
            "resuming at step {start_step}, but the run has {total} steps"
        )));
    }
    let (loss_fn, loss_config) = run.rl.loss();
    if start_step == 0 && !run.eval.is_empty() {
        let sampler = client.sampling_client()?;
        let mut m = Metrics::new();
        m.insert("step".into(), 0.0);
        m.insert(
            "eval/reward_mean".into(),
            eval_reward(sampler.as_ref(), run)?,
        );
        observer.on_initial_eval(&m);
    }
    let mut sampler: Option<Box<dyn SamplingClient>> = None;
    for step in start_step..total {
        let started = Instant::now();
        // 1. The sampler: the current weights, refreshed on its interval (and after a resume).
        if sampler.is_none() || step % run.rl.weight_sync_interval == 0 {
            sampler = Some(client.sampling_client()?);
        }
        let Some(s) = sampler.as_deref() else {
            continue;
        };
        // 2. Groups of rollouts, scored.
        let prompts: Vec<&Prompt> = plan
            .batch(step)
            .into_iter()
            .map(|i| &run.prompts[i])
            .collect();
        let mut groups = Vec::with_capacity(prompts.len());
        for (g, prompt) in prompts.iter().enumerate() {
            let p = rollouts::params(
                run.rl.max_new_tokens,
                run.rl.temperature,
                run.rl.top_p,
                &run.rl.stop,
                seed(run.schedule.seed, step, g),
            );
            groups.push(rollouts::sample_group(
                s,
                run.tokenizer,
                run.recipe,
                prompt,
                run.rl.num_rollouts,
                &p,
            )?);
        }
        let sampled_at = Instant::now();
        // 3. Advantages within each group (failed rollouts are left out of it).
        let mut m = Metrics::new();
        let (mut good, mut bad, mut mixed, mut failed) = (0usize, 0usize, 0usize, 0usize);
        let mut rewards = Vec::new();
        let mut trainable: Vec<(usize, usize)> = Vec::new();
        for (g, group) in groups.iter_mut().enumerate() {
            let scored: Vec<usize> = (0..group.len())
                .filter(|&i| group[i].reward.is_some())
                .collect();
            failed += group.len() - scored.len();
            let r: Vec<f64> = scored.iter().filter_map(|&i| group[i].reward).collect();
            rewards.extend(&r);
            let kind = group_kind(&r);
            match kind {
                GroupKind::AllGood => good += 1,
                GroupKind::AllBad => bad += 1,
                GroupKind::Mixed => mixed += 1,
            }
            if r.len() < 2 || (kind != GroupKind::Mixed && run.rl.remove_constant_reward_groups) {
                continue;
            }
            for (&i, a) in scored
                .iter()
                .zip(group_advantages(&r, run.rl.normalize_advantages))
            {
                group[i].advantage = a;
                trainable.push((g, i));
            }
        }
        // 4. One policy-gradient step on the trainable rollouts (a step with none still takes
        //    an optimizer step with zero gradients, so the schedule and state stay aligned).
        let completion_tokens: usize = trainable
            .iter()
            .map(|&(g, i)| groups[g][i].tokens.len())
            .sum();
        let scale = 1.0 / completion_tokens.max(1) as f64;
        let datums: Vec<_> = trainable
            .iter()
            .map(|&(g, i)| rollouts::datum(&prompts[g].tokens, &groups[g][i], scale))
            .collect();
        let mut loss = 0.0;
        let (mut kl1, mut kl2, mut n_kl) = (0.0, 0.0, 0usize);
        if !datums.is_empty() {
            let out = client.forward_backward(&datums, loss_fn, &loss_config)?;
            loss = out.metrics.get("loss:sum").copied().unwrap_or(0.0);
            // Sampler vs trainer logprobs of the sampled tokens: how off-policy the step is.
            for (&(g, i), lp) in trainable.iter().zip(&out.loss_fn_outputs) {
                let r = &groups[g][i];
                let new = lp
                    .get("logprobs")
                    .map(|t| t.to_f32_vec())
                    .unwrap_or_default();
                let first = prompts[g].tokens.len() - 1;
                for (k, old) in r.logprobs.iter().enumerate() {
                    if let Some(&new) = new.get(first + k) {
                        let d = (*old - new) as f64;
                        kl1 += d;
                        kl2 += 0.5 * d * d;
                        n_kl += 1;
                    }
                }
            }
        }
        let lr = whet_sft::learning_rate(
            run.optimizer.learning_rate,
            schedule.lr_schedule,
            step,
            total,
            schedule.warmup_steps,
        );
        let opt = client.optim_step(&run.optimizer.adam_params(lr))?;
        let done = step + 1;
        // 5. Metrics.
        let all_tokens: usize = groups.iter().flatten().map(|r| r.tokens.len()).sum();
        let all_logprobs: Vec<f32> = groups
            .iter()
            .flatten()
            .flat_map(|r| r.logprobs.clone())
            .collect();
        let n_groups = groups.len().max(1) as f64;
        let n_rollouts = groups.iter().map(Vec::len).sum::<usize>().max(1) as f64;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        m.insert("step".into(), done as f64);
        m.insert("loss".into(), loss);
        m.insert("learning_rate".into(), lr);
        m.insert(
            "grad_norm".into(),
            opt.metrics.get("grad_norm:mean").copied().unwrap_or(0.0),
        );
        m.insert("train/reward_mean".into(), mean(&rewards));
        m.insert(
            "train/reward_min".into(),
            rewards
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min)
                .min(f64::MAX),
        );
        m.insert(
            "train/reward_max".into(),
            rewards
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max)
                .max(f64::MIN),
        );
        m.insert("by_group/frac_all_good".into(), good as f64 / n_groups);
        m.insert("by_group/frac_all_bad".into(), bad as f64 / n_groups);
        m.insert("by_group/frac_mixed".into(), mixed as f64 / n_groups);
        m.insert("rollouts/failed".into(), failed as f64);
        m.insert("rollouts/trained".into(), trainable.len() as f64);
        m.insert("optim/kl_sample_train_v1".into(), kl1 / n_kl.max(1) as f64);
        m.insert("optim/kl_sample_train_v2".into(), kl2 / n_kl.max(1) as f64);
        // The sampled tokens' mean negative logprob estimates the policy's entropy.
        m.insert(
            "optim/entropy".into(),
            -all_logprobs.iter().map(|&x| x as f64).sum::<f64>() / all_logprobs.len().max(1) as f64,
        );
        m.insert(
            "tokens/completion_mean".into(),
            all_tokens as f64 / n_rollouts,
        );
        m.insert("num_tokens".into(), all_tokens as f64);
        m.insert("time/sample".into(), (sampled_at - started).as_secs_f64());
        m.insert("time/train".into(), sampled_at.elapsed().as_secs_f64());
        m.insert(
            "tokens_per_second".into(),
            all_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        );
        let last = done == total;
        let eval_now =
            run.schedule.eval_interval > 0 && done.is_multiple_of(run.schedule.eval_interval);
        if !run.eval.is_empty() && (eval_now || last) {
            let sampler = client.sampling_client()?;
            m.insert(
                "eval/reward_mean".into(),
                eval_reward(sampler.as_ref(), run)?,
            );
        }
        observer.on_rollouts(done, &prompts, &groups);
        let control = observer.on_step(&m);
        // 6. Checkpoints, as for SFT.
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
        if run.schedule.checkpoint_interval > 0
            && done.is_multiple_of(run.schedule.checkpoint_interval)
        {
            let c = checkpoint(client, done, &format!("step-{done}"))?;
            observer.on_checkpoint(&c);
        }
        // A sampler refreshed on an interval must still see a resumed run's weights.
        if run.rl.weight_sync_interval == 1 {
            sampler = None;
        }
    }
    Ok(Outcome {
        steps: total,
        total_steps: total,
        last: None,
        stopped: false,
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

/// Mean reward of one greedy rollout per eval prompt (at most `eval_max_rollouts` prompts).
fn eval_reward(sampler: &dyn SamplingClient, run: &Run<'_>) -> Result<f64, RlError> {
    let mut total = 0.0;
    let mut n = 0usize;
    for prompt in run.eval.iter().take(run.rl.eval_max_rollouts.max(1)) {
        let p = rollouts::params(run.rl.max_new_tokens, 0.0, 1.0, &run.rl.stop, 0);
        let group = rollouts::sample_group(sampler, run.tokenizer, run.recipe, prompt, 1, &p)?;
        // An eval rollout that cannot be scored counts as 0.
        total += group.first().and_then(|r| r.reward).unwrap_or(0.0);
        n += 1;
    }
    Ok(total / n.max(1) as f64)
}
