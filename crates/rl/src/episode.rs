//! Episodes against a world: the policy continues the conversation (the world's observation,
//! rendered with the model's chat template and the world's tools), its completion becomes an
//! assistant message with tool calls, the world answers — until `done`, the turn limit, or a
//! world failure. Episodes become ATIF trajectories (per-step rewards and the outcome in
//! `extra`) for SFT and offline RL, and per-turn datums for live RL.

use serde::Serialize;
use serde_json::{json, Value};
use whet_contract::{ModelInput, SamplingClient};
use whet_data::Tokenizer;

use crate::rollouts;
use crate::world::{parse_tool_calls, Manifest, Signal, World};
use crate::RlError;

/// One assistant turn.
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    /// The prompt the policy continued (the whole conversation so far, rendered).
    #[serde(skip)]
    pub prompt_tokens: Vec<i64>,
    /// The sampled tokens.
    #[serde(skip)]
    pub tokens: Vec<i64>,
    /// Their sampler logprobs.
    #[serde(skip)]
    pub logprobs: Vec<f32>,
    /// The completion's text.
    pub completion: String,
    /// The assistant message it became.
    pub message: Value,
    /// What the world answered.
    pub observation: Vec<Value>,
    /// The world's reward signals.
    pub signals: Vec<Signal>,
    /// The turn's reward under the manifest's policy (the terminal reward included on the
    /// last turn).
    pub reward: f64,
}

/// A finished episode.
#[derive(Debug, Clone, Serialize)]
pub struct Episode {
    /// `reset`'s task.
    pub task: Value,
    /// `reset`'s seed.
    pub seed: u64,
    /// The world's first observation.
    pub start: Vec<Value>,
    /// The world's tools.
    pub tools: Vec<Value>,
    /// The turns.
    pub turns: Vec<Turn>,
    /// `finished`, `stalled`, `max_steps`, `error`, or the world's own word.
    pub termination_reason: String,
    /// Whether the goal was reached (`finished`).
    pub success: bool,
    /// What went wrong, for `error`.
    pub error: Option<String>,
}

impl Episode {
    /// The sum of the turns' rewards.
    pub fn total_reward(&self) -> f64 {
        self.turns.iter().map(|t| t.reward).sum()
    }
}

/// Plays one episode of `manifest`'s `(task, seed)` with `sampler` (seeded by `sample_seed`).
/// World failures end the episode with `error`; sampler and tokenizer failures are errors.
#[allow(clippy::too_many_arguments)]
pub fn play(
    manifest: &Manifest,
    sampler: &dyn SamplingClient,
    tokenizer: &Tokenizer,
    system_prompt: Option<&str>,
    task: &Value,
    seed: u64,
    sample_seed: u64,
    temperature: f64,
) -> Result<Episode, RlError> {
    let mut ep = Episode {
        task: task.clone(),
        seed,
        start: vec![],
        tools: vec![],
        turns: vec![],
        termination_reason: "max_steps".into(),
        success: false,
        error: None,
    };
    let fail = |mut ep: Episode, e: String| {
        ep.termination_reason = "error".into();
        ep.error = Some(e);
        let r = manifest.terminal_reward("error");
        if let Some(t) = ep.turns.last_mut() {
            t.reward += r;
        }
        Ok(ep)
    };
    let mut world = match World::start(manifest) {
        Ok(w) => w,
        Err(e) => return fail(ep, e),
    };
    let reset = match world.request(&json!({"op": "reset", "seed": seed, "task": task})) {
        Ok(r) => r,
        Err(e) => return fail(ep, e),
    };
    let (Some(start), tools) = (
        reset["observation"].as_array().cloned(),
        reset["tools"].as_array().cloned().unwrap_or_default(),
    ) else {
        return fail(ep, format!("reset: no `observation` list in {reset:.200}"));
    };
    ep.start = start.clone();
    ep.tools = tools.clone();
    // A template with no place for tools (SmolLM2's, for one) gets them, and the policy's
    // earlier calls, as Hermes text (whet_data's chat template does it), which
    // `parse_tool_calls` reads back.
    let mut messages: Vec<Value> = system_prompt
        .map(|s| json!({"role": "system", "content": s}))
        .into_iter()
        .chain(start)
        .collect();
    for turn in 0..manifest.limits.max_turns {
        let prompt = tokenizer.apply_chat_template(
            &messages,
            (!tools.is_empty()).then_some(tools.as_slice()),
            true,
        )?;
        let prompt: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let params = rollouts::params(
            manifest.limits.max_tokens_per_turn,
            temperature,
            1.0,
            &[],
            sample_seed.wrapping_add(turn as u64),
        );
        let out = sampler.sample(&ModelInput::from_ints(prompt.clone()), 1, &params, false, 0)?;
        let seq = out
            .sequences
            .into_iter()
            .next()
            .ok_or_else(|| RlError::Config("the sampler returned no sequence".into()))?;
        let ids: Vec<u32> = seq.tokens.iter().map(|&t| t as u32).collect();
        let completion = tokenizer.decode(&ids, true)?;
        let (content, calls) = parse_tool_calls(&completion, turn);
        let mut message = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            message["tool_calls"] = json!(calls);
        }
        messages.push(message.clone());
        let mut t = Turn {
            prompt_tokens: prompt,
            tokens: seq.tokens,
            logprobs: seq.logprobs,
            completion,
            message: message.clone(),
            observation: vec![],
            signals: vec![],
            reward: 0.0,
        };
        let answer = match world.request(&json!({"op": "step", "action": message})) {
            Ok(a) => a,
            Err(e) => {
                ep.turns.push(t);
                return fail(ep, e);
            }
        };
        t.observation = answer["observation"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        t.signals = serde_json::from_value(answer["reward_signals"].clone()).unwrap_or_default();
        t.reward = manifest.turn_reward(&t.signals);
        messages.extend(t.observation.iter().cloned());
        let done = answer["done"].as_bool().unwrap_or(false);
        if done {
            let reason = answer["termination_reason"]
                .as_str()
                .unwrap_or("finished")
                .to_string();
            t.reward += manifest.terminal_reward(&reason);
            ep.success = reason == "finished";
            ep.termination_reason = reason;
            ep.turns.push(t);
            return Ok(ep);
        }
        ep.turns.push(t);
    }
    // Out of turns.
    if let Some(t) = ep.turns.last_mut() {
        t.reward += manifest.terminal_reward("max_steps");
    }
    Ok(ep)
}

/// The episode as an ATIF v1.4 trajectory: user steps for the world's messages, agent steps
/// with their tool calls and the observations that answered them; per-step rewards, signals
/// and the outcome in `extra`.
pub fn to_atif(ep: &Episode, manifest: &Manifest, model: &str, id: &str) -> Value {
    let mut steps = Vec::new();
    let mut push = |source: &str, message: &Value, extra: Value| {
        let mut s = json!({"step_id": steps.len() + 1, "source": source, "message": message});
        if let Some(o) = extra.as_object() {
            if let Some(m) = s.as_object_mut() {
                m.extend(o.clone());
            }
        }
        steps.push(s);
    };
    for m in &ep.start {
        let source = if m["role"] == "system" {
            "system"
        } else {
            "user"
        };
        push(source, &m["content"], json!({}));
    }
    for t in &ep.turns {
        let calls: Vec<Value> = t.message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                json!({"tool_call_id": c["id"], "function_name": c["function"]["name"],
                       "arguments": c["function"]["arguments"]})
            })
            .collect();
        let results: Vec<Value> = t
            .observation
            .iter()
            .filter(|m| m["role"] == "tool")
            .map(|m| json!({"source_call_id": m["tool_call_id"], "content": m["content"]}))
            .collect();
        let mut extra = json!({"extra": {"reward": t.reward, "reward_signals": t.signals}});
        if !calls.is_empty() {
            extra["tool_calls"] = json!(calls);
            extra["observation"] = json!({"results": results});
        }
        push("agent", &t.message["content"], extra);
        // Other messages the world sent (a reminder, the next instruction) are user steps.
        for m in t.observation.iter().filter(|m| m["role"] != "tool") {
            push("user", &m["content"], json!({}));
        }
    }
    json!({
        "schema_version": "ATIF-v1.4",
        "session_id": id,
        "trajectory_id": id,
        "agent": {"name": "whet", "version": env!("CARGO_PKG_VERSION"), "model_name": model},
        "steps": steps,
        "final_metrics": {"total_steps": ep.turns.len()},
        "extra": {"world": {"name": manifest.name, "version": manifest.version},
                  "task": ep.task, "tools": ep.tools, "total_reward": ep.total_reward(),
                  "error": ep.error},
        "seed": ep.seed,
        "success": ep.success,
        "termination_reason": ep.termination_reason,
        "step_count": ep.turns.len(),
    })
}
