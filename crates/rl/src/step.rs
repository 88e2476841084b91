//! One RL step in two halves: sampling a batch of groups (any thread, any policy version) and
//! training on it (the training client's thread).

use std::time::Instant;

use whet_contract::{SamplingClient, TrainingClient};
use whet_sft::Plan;

use std::collections::BTreeMap;

use crate::advantages::{group_advantages, group_kind, reward_to_go, GroupKind};
use crate::episode::{self, Episode, EpisodeSpec};
use crate::rollouts::{self, Rollout};
use crate::{seed, Metrics, RlError, Run};

/// A step's groups of rollouts, with the policy version that sampled them.
pub struct Batch {
    /// The plan's step whose prompts these are.
    pub step: usize,
    /// Optimizer steps applied to the weights that sampled it.
    pub version: usize,
    /// The prompts (indices into the run's prompts), one group each.
    pub prompts: Vec<usize>,
    /// The groups.
    pub groups: Vec<Vec<Rollout>>,
    /// Seconds spent sampling and scoring.
    pub seconds: f64,
    /// World episodes, one list per group (live RL): then every rollout is one or more
    /// consecutive turns of an episode, with its own prompt and per-token advantages already
    /// set (each turn's reward-to-go minus the group's mean return).
    pub episodes: Vec<Vec<Episode>>,
}

/// Samples and scores the groups of plan step `step` with `sampler` (policy `version`).
/// Seeds depend on the step and group only, so the same weights give the same rollouts.
pub fn sample_batch(
    sampler: &dyn SamplingClient,
    run: &Run<'_>,
    plan: &Plan,
    step: usize,
    version: usize,
) -> Result<Batch, RlError> {
    let started = Instant::now();
    let prompts = plan.batch(step);
    let mut groups = Vec::with_capacity(prompts.len());
    for (g, &i) in prompts.iter().enumerate() {
        let p = rollouts::params(
            run.rl.max_new_tokens,
            run.rl.temperature,
            run.rl.top_p,
            &run.rl.stop,
            seed(run.schedule.seed, step, g),
        );
        groups.push(rollouts::sample_group(
            sampler,
            run.tokenizer,
            run.recipe,
            &run.prompts[i],
            run.rl.num_rollouts,
            &p,
        )?);
    }
    Ok(Batch {
        step,
        version,
        prompts,
        groups,
        seconds: started.elapsed().as_secs_f64(),
        episodes: vec![],
    })
}

/// Plays the episodes of plan step `step` against the run's world: `num_rollouts` episodes of
/// each of the step's (task, seed) slots. Each turn's advantage is its reward-to-go minus the
/// mean return of the slot's episodes (÷ their std when normalising); an episode's turns are
/// merged into one rollout where each turn's prompt extends the one before (see [`merge_turns`]).
pub fn sample_world_batch(
    sampler: &dyn SamplingClient,
    run: &Run<'_>,
    plan: &Plan,
    step: usize,
    version: usize,
) -> Result<Batch, RlError> {
    let started = Instant::now();
    let world = run
        .world
        .as_ref()
        .ok_or_else(|| RlError::Config("no world".into()))?;
    let slots = plan.batch(step);
    // Every episode of the step in one lockstep batch: group g's k-th episode plays slot g.
    let k_of = run.rl.num_rollouts;
    let specs: Vec<EpisodeSpec> = slots
        .iter()
        .enumerate()
        .flat_map(|(g, &slot)| {
            let (task, world_seed) = world.manifest.episode(slot);
            (0..k_of).map(move |k| EpisodeSpec {
                task: task.clone(),
                seed: world_seed,
                sample_seed: seed(run.schedule.seed, step, g).wrapping_add(k as u64 * 7919),
            })
        })
        .collect();
    let mut played = episode::play_many(
        world.manifest,
        sampler,
        run.tokenizer,
        world.system_prompt,
        &specs,
        run.rl.temperature,
    )?
    .into_iter();
    let (mut groups, mut episodes) = (Vec::new(), Vec::new());
    for _ in &slots {
        let eps: Vec<Episode> = played.by_ref().take(k_of).collect();
        let returns: Vec<f64> = eps.iter().map(Episode::total_reward).collect();
        let centered = group_advantages(&returns, run.rl.normalize_advantages);
        let mut group = Vec::new();
        for ((ep, ret), a) in eps.iter().zip(&returns).zip(&centered) {
            // advantage_t = rtg_t − baseline, baseline = return − centered advantage.
            let baseline = ret - a;
            let rewards: Vec<f64> = ep.turns.iter().map(|t| t.reward).collect();
            let advantages: Vec<f64> = reward_to_go(&rewards)
                .into_iter()
                .map(|rtg| {
                    if run.rl.normalize_advantages && (ret - baseline).abs() > 0.0 {
                        (rtg - baseline) * a / (ret - baseline)
                    } else {
                        rtg - baseline
                    }
                })
                .collect();
            group.extend(merge_turns(ep, &advantages, *ret));
        }
        groups.push(group);
        episodes.push(eps);
    }
    Ok(Batch {
        step,
        version,
        prompts: vec![],
        groups,
        seconds: started.elapsed().as_secs_f64(),
        episodes,
    })
}

/// An episode's turns as rollouts. Turn k+1's prompt normally is turn k's prompt, its sampled
/// tokens, then the world's answer and the next generation prompt: then both turns go in one
/// sequence (the tokens between them are context, not trained), so the trainer reads the
/// conversation once instead of once per turn. Where the chat template renders the history
/// differently from what was sampled (a tool call re-spelled), the next turn starts a rollout
/// of its own. Either way each sampled token keeps its turn's advantage and sampler logprob,
/// conditioned on exactly the tokens the sampler saw.
pub(crate) fn merge_turns(ep: &Episode, advantages: &[f64], ret: f64) -> Vec<Rollout> {
    let mut out: Vec<Rollout> = Vec::new();
    for (turn, &adv) in ep.turns.iter().zip(advantages) {
        if let Some(r) = out.last_mut() {
            let prompt = r.prompt.as_deref().unwrap_or_default();
            let so_far = prompt.len() + r.tokens.len();
            let extends = turn.prompt_tokens.len() >= so_far
                && turn.prompt_tokens[..prompt.len()] == *prompt
                && turn.prompt_tokens[prompt.len()..so_far] == r.tokens[..];
            if extends {
                let between = &turn.prompt_tokens[so_far..];
                r.tokens.extend_from_slice(between);
                r.logprobs.extend(std::iter::repeat_n(0.0, between.len()));
                r.token_advantages
                    .extend(std::iter::repeat_n(None, between.len()));
                r.tokens.extend_from_slice(&turn.tokens);
                r.logprobs.extend_from_slice(&turn.logprobs);
                r.token_advantages
                    .extend(std::iter::repeat_n(Some(adv), turn.tokens.len()));
                r.completion.push('\n');
                r.completion.push_str(&turn.completion);
                continue;
            }
        }
        out.push(Rollout {
            tokens: turn.tokens.clone(),
            logprobs: turn.logprobs.clone(),
            completion: turn.completion.clone(),
            reward: Some(ret),
            metrics: BTreeMap::new(),
            error: ep.error.clone(),
            advantage: adv,
            prompt: Some(turn.prompt_tokens.clone()),
            token_advantages: vec![Some(adv); turn.tokens.len()],
        });
    }
    out
}

/// Advantages, one `forward_backward` and one `optim_step` at learning rate `lr`; returns the
/// step's metrics (rewards, groups, off-policy measures, tokens, timings).
pub fn train_batch(
    client: &mut dyn TrainingClient,
    run: &Run<'_>,
    batch: &mut Batch,
    lr: f64,
) -> Result<Metrics, RlError> {
    let started = Instant::now();
    // Advantages within each group; failed rollouts are left out of it. World batches come
    // with theirs set; their groups are judged by the episodes' returns.
    let (mut good, mut bad, mut mixed, mut failed) = (0usize, 0usize, 0usize, 0usize);
    let mut rewards = Vec::new();
    let mut trainable: Vec<(usize, usize)> = Vec::new();
    let world = !batch.episodes.is_empty();
    for (g, group) in batch.groups.iter_mut().enumerate() {
        let r: Vec<f64> = if world {
            batch.episodes[g]
                .iter()
                .map(Episode::total_reward)
                .collect()
        } else {
            group.iter().filter_map(|x| x.reward).collect()
        };
        if !world {
            failed += group.iter().filter(|x| x.reward.is_none()).count();
        }
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
        if world {
            trainable.extend(
                (0..group.len())
                    .filter(|&i| group[i].has_signal())
                    .map(|i| (g, i)),
            );
            continue;
        }
        let scored: Vec<usize> = (0..group.len())
            .filter(|&i| group[i].reward.is_some())
            .collect();
        for (&i, a) in scored
            .iter()
            .zip(group_advantages(&r, run.rl.normalize_advantages))
        {
            group[i].advantage = a;
            trainable.push((g, i));
        }
    }
    // The advantages are divided by the step's completion-token count: the loss is a mean
    // over sampled tokens. A step with nothing to train still takes its (zero-gradient)
    // optimizer step, so the schedule and the optimizer state stay aligned with the plan.
    let prompt_of = |g: usize, i: usize| -> &[i64] {
        match &batch.groups[g][i].prompt {
            Some(p) => p,
            None => &run.prompts[batch.prompts[g]].tokens,
        }
    };
    let completion_tokens: usize = trainable
        .iter()
        .map(|&(g, i)| batch.groups[g][i].sampled_tokens())
        .sum();
    let scale = 1.0 / completion_tokens.max(1) as f64;
    // The KL penalty: each sampled token's logprob under the policy that sampled it against
    // the base model's (one forward pass of the base per trained rollout).
    let (mut kl_base, mut n_base) = (0.0, 0usize);
    let penalties: Vec<Vec<f64>> = if run.rl.kl_penalty_coef > 0.0 && !trainable.is_empty() {
        let base = client.base_sampling_client()?;
        trainable
            .iter()
            .map(|&(g, i)| {
                let r = &batch.groups[g][i];
                let prompt = prompt_of(g, i);
                let tokens: Vec<i64> = prompt.iter().chain(&r.tokens).copied().collect();
                let lp = base.compute_logprobs(&whet_contract::ModelInput::from_ints(tokens))?;
                Ok(r.logprobs
                    .iter()
                    .enumerate()
                    .map(|(k, &old)| {
                        if r.token_advantage(k).is_none() {
                            return 0.0;
                        }
                        let b = lp.get(prompt.len() + k).copied().flatten().unwrap_or(old);
                        let d = (old - b) as f64;
                        kl_base += d;
                        n_base += 1;
                        run.rl.kl_penalty_coef * d
                    })
                    .collect())
            })
            .collect::<Result<_, RlError>>()?
    } else {
        vec![]
    };
    let datums: Vec<_> = trainable
        .iter()
        .enumerate()
        .map(|(n, &(g, i))| {
            let penalty = penalties.get(n).map(Vec::as_slice).unwrap_or(&[]);
            rollouts::datum_with_penalty(prompt_of(g, i), &batch.groups[g][i], scale, penalty)
        })
        .collect();
    let (loss_fn, loss_config) = run.rl.loss();
    let mut loss = 0.0;
    let (mut kl1, mut kl2, mut n_kl) = (0.0, 0.0, 0usize);
    if !datums.is_empty() {
        let out = client.forward_backward(&datums, loss_fn, &loss_config)?;
        loss = out.metrics.get("loss:sum").copied().unwrap_or(0.0);
        // Sampler vs trainer logprobs of the sampled tokens: how off-policy the step is.
        for (&(g, i), lp) in trainable.iter().zip(&out.loss_fn_outputs) {
            let new = lp
                .get("logprobs")
                .map(|t| t.to_f32_vec())
                .unwrap_or_default();
            let first = prompt_of(g, i).len() - 1;
            let r = &batch.groups[g][i];
            for (k, old) in r.logprobs.iter().enumerate() {
                if let (Some(&new), Some(_)) = (new.get(first + k), r.token_advantage(k)) {
                    let d = (*old - new) as f64;
                    kl1 += d;
                    kl2 += 0.5 * d * d;
                    n_kl += 1;
                }
            }
        }
    }
    let opt = client.optim_step(&run.optimizer.adam_params(lr))?;
    let all = || batch.groups.iter().flatten();
    // Sampled tokens only (merged turns hold the world's tokens too, with logprob 0).
    let tokens: usize = all().map(Rollout::sampled_tokens).sum();
    let logprob_sum: f64 = all().flat_map(|r| &r.logprobs).map(|&x| x as f64).sum();
    let n_groups = batch.groups.len().max(1) as f64;
    let n_rollouts = all().count().max(1) as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let fold = |f: fn(f64, f64) -> f64, init: f64| {
        let x = rewards.iter().copied().fold(init, f);
        if x.is_finite() {
            x
        } else {
            0.0
        }
    };
    let train_seconds = started.elapsed().as_secs_f64();
    let mut m = Metrics::new();
    m.insert("loss".into(), loss);
    m.insert("learning_rate".into(), lr);
    let grad_norm = opt.metrics.get("grad_norm:mean").copied().unwrap_or(0.0);
    m.insert("grad_norm".into(), grad_norm);
    m.insert("train/reward_mean".into(), mean(&rewards));
    m.insert("train/reward_min".into(), fold(f64::min, f64::INFINITY));
    m.insert("train/reward_max".into(), fold(f64::max, f64::NEG_INFINITY));
    m.insert("by_group/frac_all_good".into(), good as f64 / n_groups);
    m.insert("by_group/frac_all_bad".into(), bad as f64 / n_groups);
    m.insert("by_group/frac_mixed".into(), mixed as f64 / n_groups);
    m.insert("rollouts/failed".into(), failed as f64);
    // The share of the step's experience that failed: rollouts a verifier could not score,
    // or episodes a world error ended.
    let error_rate = if world {
        let eps: Vec<&Episode> = batch.episodes.iter().flatten().collect();
        eps.iter().filter(|e| e.error.is_some()).count() as f64 / eps.len().max(1) as f64
    } else {
        failed as f64 / batch.groups.iter().map(Vec::len).sum::<usize>().max(1) as f64
    };
    m.insert("rollouts/error_rate".into(), error_rate);
    m.insert("rollouts/trained".into(), trainable.len() as f64);
    m.insert("optim/kl_sample_train_v1".into(), kl1 / n_kl.max(1) as f64);
    m.insert("optim/kl_sample_train_v2".into(), kl2 / n_kl.max(1) as f64);
    // The sampled tokens' mean negative logprob estimates the policy's entropy.
    m.insert("optim/entropy".into(), -logprob_sum / tokens.max(1) as f64);
    m.insert("tokens/completion_mean".into(), tokens as f64 / n_rollouts);
    m.insert("num_tokens".into(), tokens as f64);
    m.insert("time/sample".into(), batch.seconds);
    m.insert("time/train".into(), train_seconds);
    if run.rl.kl_penalty_coef > 0.0 {
        m.insert("kl/policy_base".into(), kl_base / n_base.max(1) as f64);
    }
    if world {
        world_metrics(run, &batch.episodes, &mut m);
    }
    Ok(m)
}

/// `worlds/success_rate`, `worlds/turns_mean`, `worlds/tokens_per_turn`,
/// `worlds/episodes_error` and
/// `worlds/reward/<source>` (per episode, what each signal source contributed under the
/// manifest's policy; `terminal` for the end-of-episode rewards).
fn world_metrics(run: &Run<'_>, episodes: &[Vec<Episode>], m: &mut Metrics) {
    let Some(world) = &run.world else { return };
    let all: Vec<&Episode> = episodes.iter().flatten().collect();
    let n = all.len().max(1) as f64;
    let mut by_source: BTreeMap<String, f64> = BTreeMap::new();
    for ep in &all {
        for t in &ep.turns {
            for s in &t.signals {
                let v = world.manifest.turn_reward(std::slice::from_ref(s));
                *by_source.entry(s.source.clone()).or_default() += v;
            }
        }
        *by_source.entry("terminal".into()).or_default() +=
            world.manifest.terminal_reward(&ep.termination_reason);
    }
    let count = |f: &dyn Fn(&Episode) -> bool| all.iter().filter(|e| f(e)).count() as f64 / n;
    m.insert("worlds/success_rate".into(), count(&|e| e.success));
    let turns: Vec<&crate::episode::Turn> = all.iter().flat_map(|e| &e.turns).collect();
    m.insert(
        "worlds/tokens_per_turn".into(),
        turns.iter().map(|t| t.tokens.len()).sum::<usize>() as f64 / turns.len().max(1) as f64,
    );
    m.insert(
        "worlds/episodes_error".into(),
        count(&|e| e.error.is_some()) * n,
    );
    m.insert(
        "worlds/turns_mean".into(),
        all.iter().map(|e| e.turns.len()).sum::<usize>() as f64 / n,
    );
    for (source, v) in by_source {
        m.insert(format!("worlds/reward/{source}"), v / n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::episode::Turn;
    use serde_json::json;

    fn turn(prompt: &[i64], tokens: &[i64], logprob: f32) -> Turn {
        Turn {
            prompt_tokens: prompt.to_vec(),
            tokens: tokens.to_vec(),
            logprobs: vec![logprob; tokens.len()],
            completion: String::new(),
            message: json!({}),
            observation: vec![],
            signals: vec![],
            reward: 0.0,
        }
    }

    #[test]
    fn turns_whose_prompts_extend_each_other_train_as_one_sequence() {
        let ep = Episode {
            task: json!(null),
            seed: 0,
            start: vec![],
            tools: vec![],
            turns: vec![
                turn(&[1, 2], &[10, 11], -0.5),
                // The history as sampled, then the world's answer (20, 21).
                turn(&[1, 2, 10, 11, 20, 21], &[12], -0.25),
                // History re-spelled (10 → 13): a sequence of its own.
                turn(&[1, 2, 13, 11, 20, 21, 12, 22], &[14, 15], -1.0),
            ],
            termination_reason: "finished".into(),
            success: true,
            error: None,
        };
        let rollouts = merge_turns(&ep, &[0.5, 0.25, -1.0], 1.0);
        assert_eq!(rollouts.len(), 2);
        let merged = &rollouts[0];
        assert_eq!(merged.prompt.as_deref(), Some(&[1, 2][..]));
        assert_eq!(merged.tokens, vec![10, 11, 20, 21, 12]);
        assert_eq!(merged.sampled_tokens(), 3);
        let d = rollouts::datum(&[1, 2], merged, 1.0);
        assert_eq!(d.model_input.to_ints(), vec![1, 2, 10, 11, 20, 21]);
        let adv = d.loss_fn_inputs["advantages"].to_f32_vec();
        let lp = d.loss_fn_inputs["logprobs"].to_f32_vec();
        // Targets: 2, 10, 11, 20, 21, 12 — the world's tokens (20, 21) are context only.
        assert_eq!(adv, vec![0.0, 0.5, 0.5, 0.0, 0.0, 0.25]);
        assert_eq!(lp, vec![0.0, -0.5, -0.5, 0.0, 0.0, -0.25]);
        assert_eq!(rollouts[1].tokens, vec![14, 15]);
        assert_eq!(rollouts[1].token_advantage(1), Some(-1.0));
        assert!(rollouts.iter().all(Rollout::has_signal));
    }
}
