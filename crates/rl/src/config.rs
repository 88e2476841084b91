//! The RL hyper-parameters: the `[rl]` and `[reward]` sections of a job file, with their
//! defaults. Unknown keys are refused, so a typo never trains silently with a default.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use whet_contract::{LossFn, LossFnConfig};

/// The policy-gradient loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// `−Σ r·A`, r the ratio of the current policy to the sampler's (Tinker's default).
    #[default]
    ImportanceSampling,
    /// PPO's clipped objective.
    Ppo,
    /// The clipped ratio as a constant weight on `lp·A`.
    Cispo,
    /// `lp·A` with a quadratic penalty on `lp − old`.
    Dro,
}

/// How sampling and training overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionMode {
    /// Sample with the current weights, then train on those samples.
    #[default]
    Sync,
    /// Sample step n + 1's groups while step n trains (one step stale).
    OneStepOffAsync,
    /// Samplers run ahead; groups staler than `max_steps_off_policy` are discarded.
    FullyAsync,
}

/// `[rl]`: rollouts, groups, the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlConfig {
    /// The loss.
    pub algorithm: Algorithm,
    /// Rollouts per prompt: the group whose mean reward is each rollout's baseline.
    pub num_rollouts: usize,
    /// Prompts (groups) per optimizer step.
    pub groups_per_step: usize,
    /// Longest completion, in tokens.
    pub max_new_tokens: usize,
    /// Sampling temperature (above 0: identical rollouts teach nothing).
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
    /// Extra stop strings (the model's end-of-turn token always stops).
    pub stop: Vec<String>,
    /// Turns per episode against a world.
    pub max_turns: usize,
    /// How sampling and training overlap.
    pub execution_mode: ExecutionMode,
    /// How many optimizer steps old a group may be when it is trained on (async modes).
    pub max_steps_off_policy: Option<usize>,
    /// Divide each group's advantages by its reward standard deviation.
    pub normalize_advantages: bool,
    /// Leave out groups whose rollouts all scored the same (their advantages are all 0).
    pub remove_constant_reward_groups: bool,
    /// PPO / CISPO lower ratio clip.
    pub clip_low_threshold: f64,
    /// PPO / CISPO upper ratio clip.
    pub clip_high_threshold: f64,
    /// DRO's penalty strength.
    pub beta: f64,
    /// Refresh the sampler's weights every this many steps (1: always on-policy).
    pub weight_sync_interval: usize,
    /// β of a KL penalty against the base model (the adapter switched off): each sampled
    /// token's advantage loses β·(logp_policy − logp_base). 0 turns it off.
    pub kl_penalty_coef: f64,
    /// Eval prompts (or a world's eval seeds) scored per evaluation, at most.
    pub eval_max_rollouts: usize,
    /// Sampling temperature of the evaluation: 0 (the default) is greedy, one rollout per eval
    /// prompt or seed. The training temperature measures the policy RL optimises: a policy can
    /// gain at its sampling temperature while its greedy choices stay as they were.
    pub eval_temperature: f64,
    /// Rollouts per eval prompt (episodes per eval seed) when `eval_temperature` is above 0.
    /// Their sampling seeds are the same at every evaluation of a run, so successive evals
    /// compare the policies on the same draws.
    pub eval_num_rollouts: usize,
    /// The failure policy: a step whose share of failed rollouts (a verifier that crashed,
    /// hung or answered garbage; an episode a world error ended) is above this fails the job
    /// once the step is recorded, keeping the last checkpoint. Failures at or below it are
    /// scored as failed, counted (`rollouts/error_rate`) and logged, and the job goes on.
    /// 1.0 (the default): always go on.
    pub max_error_rate: f64,
}

impl Default for RlConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::ImportanceSampling,
            num_rollouts: 8,
            groups_per_step: 4,
            max_new_tokens: 64,
            temperature: 1.0,
            top_p: 1.0,
            stop: vec![],
            max_turns: 1,
            execution_mode: ExecutionMode::Sync,
            max_steps_off_policy: None,
            normalize_advantages: false,
            remove_constant_reward_groups: true,
            clip_low_threshold: 0.8,
            clip_high_threshold: 1.2,
            beta: 0.05,
            weight_sync_interval: 1,
            kl_penalty_coef: 0.0,
            eval_max_rollouts: 64,
            eval_temperature: 0.0,
            eval_num_rollouts: 1,
            max_error_rate: 1.0,
        }
    }
}

impl RlConfig {
    /// Checks what the types cannot; errors name the key.
    pub fn check(&self) -> Result<(), String> {
        if self.num_rollouts < 2 {
            return Err(
                "`rl.num_rollouts` must be at least 2 (a group's mean is each rollout's baseline)"
                    .into(),
            );
        }
        if self.groups_per_step == 0 {
            return Err("`rl.groups_per_step` must be at least 1".into());
        }
        if self.max_new_tokens == 0 {
            return Err("`rl.max_new_tokens` must be at least 1".into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err("`rl.temperature` must be above 0 (greedy rollouts are all alike)".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err("`rl.top_p` must be in (0, 1]".into());
        }
        if self.max_turns == 0 {
            return Err("`rl.max_turns` must be at least 1".into());
        }
        if !(self.eval_temperature >= 0.0 && self.eval_temperature.is_finite()) {
            return Err("`rl.eval_temperature` must be 0 (greedy) or more".into());
        }
        if self.eval_num_rollouts == 0 {
            return Err("`rl.eval_num_rollouts` must be at least 1".into());
        }
        if self.eval_num_rollouts > 1 && self.eval_temperature == 0.0 {
            return Err(
                "`rl.eval_num_rollouts` above 1 needs `rl.eval_temperature` above 0 \
                 (greedy rollouts of one prompt are all alike)"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return Err("`rl.max_error_rate` must be in [0, 1]".into());
        }
        if !(self.kl_penalty_coef >= 0.0 && self.kl_penalty_coef.is_finite()) {
            return Err("`rl.kl_penalty_coef` must be 0 or more".into());
        }
        if self.weight_sync_interval == 0 {
            return Err("`rl.weight_sync_interval` must be at least 1".into());
        }
        if !(self.clip_low_threshold > 0.0 && self.clip_low_threshold <= 1.0)
            || self.clip_high_threshold < 1.0
        {
            return Err(
                "`rl.clip_low_threshold` must be in (0, 1] and `rl.clip_high_threshold` at least 1"
                    .into(),
            );
        }
        match (self.execution_mode, self.max_steps_off_policy) {
            (ExecutionMode::Sync, _) => {}
            (ExecutionMode::OneStepOffAsync, Some(1)) => {}
            (ExecutionMode::OneStepOffAsync, _) => {
                return Err(
                    "`rl.execution_mode = \"one_step_off_async\"` needs `rl.max_steps_off_policy = 1`"
                        .into(),
                )
            }
            (ExecutionMode::FullyAsync, Some(n)) if n >= 1 => {}
            (ExecutionMode::FullyAsync, _) => {
                return Err(
                    "`rl.execution_mode = \"fully_async\"` needs `rl.max_steps_off_policy` (at least 1)"
                        .into(),
                )
            }
        }
        Ok(())
    }

    /// The contract's loss and its configuration.
    pub fn loss(&self) -> (LossFn, LossFnConfig) {
        let mut config = LossFnConfig::new();
        let loss = match self.algorithm {
            Algorithm::ImportanceSampling => LossFn::ImportanceSampling,
            Algorithm::Ppo | Algorithm::Cispo => {
                config.insert("clip_low_threshold".into(), self.clip_low_threshold);
                config.insert("clip_high_threshold".into(), self.clip_high_threshold);
                if self.algorithm == Algorithm::Ppo {
                    LossFn::Ppo
                } else {
                    LossFn::Cispo
                }
            }
            Algorithm::Dro => {
                config.insert("beta".into(), self.beta);
                LossFn::Dro
            }
        };
        (loss, config)
    }
}

/// `[reward]`: the recipe that scores a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// A recipe name (`exact_match_v1`, `contains_v1`, `row_reward_v1`,
    /// `trajectory_imitation_v1`, `task_verifier_v1`, `gsm8k_v1`, `command_v1`).
    pub recipe: String,
    /// The recipe's parameters (JSON object).
    pub params: Value,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            recipe: "exact_match_v1".into(),
            params: Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_mistakes_name_the_key() {
        assert!(RlConfig::default().check().is_ok());
        let bad = |f: fn(&mut RlConfig)| {
            let mut c = RlConfig::default();
            f(&mut c);
            c.check().unwrap_err()
        };
        assert!(bad(|c| c.num_rollouts = 1).contains("num_rollouts"));
        assert!(bad(|c| c.temperature = 0.0).contains("temperature"));
        assert!(bad(|c| c.eval_num_rollouts = 4).contains("eval_temperature"));
        assert!(bad(|c| c.eval_temperature = -1.0).contains("eval_temperature"));
        assert!(
            bad(|c| c.execution_mode = ExecutionMode::FullyAsync).contains("max_steps_off_policy")
        );
        assert!(bad(|c| {
            c.execution_mode = ExecutionMode::OneStepOffAsync;
            c.max_steps_off_policy = Some(2);
        })
        .contains("= 1"));
        let c: Result<RlConfig, _> = serde_json::from_str(r#"{"num_rollout": 4}"#);
        assert!(c.unwrap_err().to_string().contains("num_rollout"));
    }

    #[test]
    fn losses_carry_their_parameters() {
        let c = RlConfig {
            algorithm: Algorithm::Ppo,
            ..RlConfig::default()
        };
        let (loss, config) = c.loss();
        assert_eq!(loss, LossFn::Ppo);
        assert_eq!(config["clip_high_threshold"], 1.2);
        assert!(RlConfig::default().loss().1.is_empty());
    }
}
