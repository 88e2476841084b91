//! Rollouts: a group of completions of one prompt, sampled by the policy, scored by the recipe,
//! and turned into training datums.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use whet_contract::{Datum, ModelInput, SamplingClient, SamplingParams, Stop, TensorData};
use whet_data::Tokenizer;

use crate::recipes::{Recipe, RewardError, RewardInput};
use crate::RlError;

/// A prompt of an RL dataset, rendered.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// The prompt's tokens (chat template with the generation prompt).
    pub tokens: Vec<i64>,
    /// The prompt's text as the recipe sees it (the row's prompt, or its last user message).
    pub text: String,
    /// The row, for the recipe (expected output, reward, verification …).
    pub row: Value,
    /// `file:line` of the row.
    pub location: String,
}

/// One sampled completion and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct Rollout {
    /// The completion's tokens (the stop token included).
    pub tokens: Vec<i64>,
    /// The sampler's logprob of each token.
    #[serde(skip)]
    pub logprobs: Vec<f32>,
    /// The completion's text (special tokens skipped).
    pub completion: String,
    /// Its reward, or why it could not be scored.
    pub reward: Option<f64>,
    /// The recipe's metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Why scoring failed (a crashed or hung verifier, a missing field).
    pub error: Option<String>,
    /// Its advantage (set once the group is scored).
    pub advantage: f64,
    /// The prompt it continued, when it is not its group's (a world episode's turns).
    #[serde(skip)]
    pub prompt: Option<Vec<i64>>,
    /// Several turns of one episode in one sequence: per token of `tokens`, its advantage if
    /// the policy sampled it, `None` for the world's and the template's tokens between turns
    /// (context, not trained; their `logprobs` are 0). Empty: every token was sampled and has
    /// `advantage`.
    #[serde(skip)]
    pub token_advantages: Vec<Option<f64>>,
}

impl Rollout {
    /// Token `k`'s advantage, or `None` when the policy did not sample it.
    pub fn token_advantage(&self, k: usize) -> Option<f64> {
        if self.token_advantages.is_empty() {
            Some(self.advantage)
        } else {
            self.token_advantages.get(k).copied().flatten()
        }
    }

    /// The tokens the policy sampled.
    pub fn sampled_tokens(&self) -> usize {
        (0..self.tokens.len())
            .filter(|&k| self.token_advantage(k).is_some())
            .count()
    }

    /// Whether any sampled token has a non-zero advantage (something to learn from).
    pub fn has_signal(&self) -> bool {
        (0..self.tokens.len()).any(|k| self.token_advantage(k).is_some_and(|a| a != 0.0))
    }
}

/// Samples `n` completions of `prompt` with `sampler` and scores each with `recipe`.
pub fn sample_group(
    sampler: &dyn SamplingClient,
    tokenizer: &Tokenizer,
    recipe: &dyn Recipe,
    prompt: &Prompt,
    n: usize,
    params: &SamplingParams,
) -> Result<Vec<Rollout>, RlError> {
    let input = ModelInput::from_ints(prompt.tokens.clone());
    let out = sampler.sample(&input, n, params, false, 0)?;
    out.sequences
        .into_iter()
        .map(|seq| {
            let ids: Vec<u32> = seq.tokens.iter().map(|&t| t as u32).collect();
            let completion = tokenizer.decode(&ids, true)?;
            let scored = recipe.score(&RewardInput {
                prompt: &prompt.text,
                completion: &completion,
                row: &prompt.row,
            });
            let (reward, metrics, error) = match scored {
                Ok(s) => (Some(s.reward), s.metrics, None),
                Err(RewardError::Failed(e)) => (None, BTreeMap::new(), Some(e)),
                Err(e @ RewardError::Config(_)) => return Err(RlError::Config(e.to_string())),
            };
            Ok(Rollout {
                tokens: seq.tokens,
                logprobs: seq.logprobs,
                completion,
                reward,
                metrics,
                error,
                advantage: 0.0,
                prompt: None,
                token_advantages: vec![],
            })
        })
        .collect()
}

/// The sampling parameters of a rollout: seeded per step and group, so a resumed job samples
/// what the uninterrupted one did.
pub fn params(
    max_new_tokens: usize,
    temperature: f64,
    top_p: f64,
    stop: &[String],
    seed: u64,
) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_new_tokens),
        seed: Some(seed),
        stop: (!stop.is_empty()).then(|| Stop::Texts(stop.to_vec())),
        temperature,
        top_p,
        ..SamplingParams::default()
    }
}

/// The training datum of a rollout: the prompt and completion as one sequence, shifted by one
/// (position `i` predicts token `i + 1`); the sampler's logprobs and the advantage sit on the
/// completion's targets only — the prompt's positions carry 0 and so no gradient.
/// `scale` multiplies the advantage (the loop's normalisation).
pub fn datum(prompt: &[i64], rollout: &Rollout, scale: f64) -> Datum {
    datum_with_penalty(prompt, rollout, scale, &[])
}

/// [`datum`], each completion token's advantage lowered by `penalty[k]` (a KL penalty; empty
/// for none) before scaling.
pub fn datum_with_penalty(prompt: &[i64], rollout: &Rollout, scale: f64, penalty: &[f64]) -> Datum {
    let tokens: Vec<i64> = prompt.iter().chain(&rollout.tokens).copied().collect();
    let n = tokens.len() - 1;
    // Targets at positions ≥ prompt.len() − 1 are completion tokens.
    let first = prompt.len().saturating_sub(1);
    let mut logprobs = vec![0f32; n];
    let mut advantages = vec![0f32; n];
    for (k, &lp) in rollout.logprobs.iter().enumerate() {
        // Tokens the policy did not sample (between merged turns) keep advantage 0: context.
        if let (true, Some(a)) = (first + k < n, rollout.token_advantage(k)) {
            logprobs[first + k] = lp;
            let p = penalty.get(k).copied().unwrap_or(0.0);
            advantages[first + k] = ((a - p) * scale) as f32;
        }
    }
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "target_tokens".to_string(),
        TensorData::from_i64(tokens[1..].to_vec()),
    );
    inputs.insert("logprobs".to_string(), TensorData::from_f32(logprobs));
    inputs.insert("advantages".to_string(), TensorData::from_f32(advantages));
    Datum {
        model_input: ModelInput::from_ints(tokens[..n].to_vec()),
        loss_fn_inputs: inputs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datum_trains_on_the_completion_only() {
        let r = Rollout {
            tokens: vec![7, 8, 9],
            logprobs: vec![-0.5, -1.0, -2.0],
            completion: String::new(),
            reward: Some(1.0),
            metrics: BTreeMap::new(),
            error: None,
            advantage: 0.5,
            prompt: None,
            token_advantages: vec![],
        };
        let d = datum(&[1, 2, 3], &r, 2.0);
        assert_eq!(d.model_input.to_ints(), vec![1, 2, 3, 7, 8]);
        let t = &d.loss_fn_inputs;
        assert_eq!(
            t["target_tokens"].to_i64_vec().unwrap(),
            vec![2, 3, 7, 8, 9]
        );
        assert_eq!(t["logprobs"].to_f32_vec(), vec![0.0, 0.0, -0.5, -1.0, -2.0]);
        assert_eq!(t["advantages"].to_f32_vec(), vec![0.0, 0.0, 1.0, 1.0, 1.0]);
    }
}
