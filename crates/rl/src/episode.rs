//! Episodes against a world: the policy continues the conversation (the world's observation,
//! rendered with the model's chat template and the world's tools), its completion becomes an
//! assistant message with tool calls, the world answers — until `done`, the turn limit, or a
//! world failure. Episodes become ATIF trajectories (per-step rewards and the outcome in
//! `extra`) for SFT and offline RL, and per-turn datums for live RL.

use serde::Serialize;
use serde_json::{json, Value};
use whet_contract::{ModelInput, SampledSequence, SamplingClient};
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

/// Which episode to play: `reset`'s task and seed, and the seed of the policy's sampling.
#[derive(Debug, Clone)]
pub struct EpisodeSpec {
    /// `reset`'s task.
    pub task: Value,
    /// `reset`'s seed (which world).
    pub seed: u64,
    /// Seeds the policy's sampling in this episode.
    pub sample_seed: u64,
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
    let spec = EpisodeSpec {
        task: task.clone(),
        seed,
        sample_seed,
    };
    let mut eps = play_many(
        manifest,
        sampler,
        tokenizer,
        system_prompt,
        &[spec],
        temperature,
    )?;
    eps.pop()
        .ok_or_else(|| RlError::Config("no episode was played".into()))
}

/// An episode in progress.
struct Live {
    ep: Episode,
    world: World,
    tools: Vec<Value>,
    messages: Vec<Value>,
    sample_seed: u64,
}

/// Plays the episodes of `specs` in lockstep: every turn, the policy's prompts of all the
/// episodes still going are sampled in one [`SamplingClient::sample_each`] call (the engine
/// decodes them as one batch, each prompt resuming from the keys and values of its own last
/// turn), then each world answers its own. A world failure ends its episode with `error`;
/// sampler and tokenizer failures are errors. Episode `i`'s turn `t` is seeded with
/// `sample_seed + t` of the first episode still going and the row's place in the batch, so
/// the same specs and weights play the same episodes.
pub fn play_many(
    manifest: &Manifest,
    sampler: &dyn SamplingClient,
    tokenizer: &Tokenizer,
    system_prompt: Option<&str>,
    specs: &[EpisodeSpec],
    temperature: f64,
) -> Result<Vec<Episode>, RlError> {
    let mut done: Vec<Option<Episode>> = (0..specs.len()).map(|_| None).collect();
    let mut live: Vec<(usize, Live)> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        match start(manifest, system_prompt, spec) {
            Ok(l) => live.push((i, l)),
            Err(ep) => done[i] = Some(*ep),
        }
    }
    for turn in 0..manifest.limits.max_turns {
        if live.is_empty() {
            break;
        }
        // A template with no place for tools (SmolLM2's, for one) gets them, and the policy's
        // earlier calls, as Hermes text (whet_data's chat template does it), which
        // `parse_tool_calls` reads back.
        let mut prompts = Vec::with_capacity(live.len());
        for (_, l) in &live {
            let tools = (!l.tools.is_empty()).then_some(l.tools.as_slice());
            let prompt = tokenizer.apply_chat_template(&l.messages, tools, true)?;
            prompts.push(prompt.iter().map(|&t| t as i64).collect::<Vec<i64>>());
        }
        let params = rollouts::params(
            manifest.limits.max_tokens_per_turn,
            temperature,
            1.0,
            &[],
            live[0].1.sample_seed.wrapping_add(turn as u64),
        );
        let inputs: Vec<ModelInput> = prompts
            .iter()
            .map(|p| ModelInput::from_ints(p.clone()))
            .collect();
        let seqs = sampler.sample_each(&inputs, &params)?;
        if seqs.len() != live.len() {
            return Err(RlError::Config(format!(
                "the sampler returned {} sequences for {} prompts",
                seqs.len(),
                live.len()
            )));
        }
        let mut still = Vec::with_capacity(live.len());
        for (((i, mut l), prompt), seq) in live.into_iter().zip(prompts).zip(seqs) {
            let ids: Vec<u32> = seq.tokens.iter().map(|&t| t as u32).collect();
            let completion = tokenizer.decode(&ids, true)?;
            match advance(manifest, &mut l, turn, prompt, seq, completion) {
                Step::Going => still.push((i, l)),
                Step::Over => done[i] = Some(l.ep),
            }
        }
        live = still;
    }
    // Out of turns.
    for (i, mut l) in live {
        if let Some(t) = l.ep.turns.last_mut() {
            t.reward += manifest.terminal_reward("max_steps");
        }
        done[i] = Some(l.ep);
    }
    done.into_iter()
        .map(|e| e.ok_or_else(|| RlError::Config("an episode was lost".into())))
        .collect()
}

/// Ends `ep` with `error`: the manifest's error reward on its last turn.
fn fail(manifest: &Manifest, ep: &mut Episode, e: String) {
    ep.termination_reason = "error".into();
    ep.error = Some(e);
    let r = manifest.terminal_reward("error");
    if let Some(t) = ep.turns.last_mut() {
        t.reward += r;
    }
}

/// Starts the world of `spec` and resets it; a world that fails gives the finished (failed)
/// episode instead.
fn start(
    manifest: &Manifest,
    system_prompt: Option<&str>,
    spec: &EpisodeSpec,
) -> Result<Live, Box<Episode>> {
    let mut ep = Episode {
        task: spec.task.clone(),
        seed: spec.seed,
        start: vec![],
        tools: vec![],
        turns: vec![],
        termination_reason: "max_steps".into(),
        success: false,
        error: None,
    };
    let mut world = match World::start(manifest) {
        Ok(w) => w,
        Err(e) => {
            fail(manifest, &mut ep, e);
            return Err(Box::new(ep));
        }
    };
    let reset = match world.request(&json!({"op": "reset", "seed": spec.seed, "task": spec.task})) {
        Ok(r) => r,
        Err(e) => {
            fail(manifest, &mut ep, e);
            return Err(Box::new(ep));
        }
    };
    let (Some(start), tools) = (
        reset["observation"].as_array().cloned(),
        reset["tools"].as_array().cloned().unwrap_or_default(),
    ) else {
        let e = format!("reset: no `observation` list in {reset:.200}");
        fail(manifest, &mut ep, e);
        return Err(Box::new(ep));
    };
    let messages = system_prompt
        .map(|s| json!({"role": "system", "content": s}))
        .into_iter()
        .chain(start.iter().cloned())
        .collect();
    Ok(Live {
        ep: Episode {
            start,
            tools: tools.clone(),
            ..ep
        },
        world,
        tools,
        messages,
        sample_seed: spec.sample_seed,
    })
}

/// Whether an episode goes on after a turn.
enum Step {
    Going,
    Over,
}

/// One turn of `l`: the completion becomes an assistant message with its tool calls, the world
/// answers, the turn's reward is scored (and the terminal reward when the world says done).
fn advance(
    manifest: &Manifest,
    l: &mut Live,
    turn: usize,
    prompt: Vec<i64>,
    seq: SampledSequence,
    completion: String,
) -> Step {
    let (content, calls) = parse_tool_calls(&completion, turn);
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = json!(calls);
    }
    l.messages.push(message.clone());
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
    let answer = match l.world.request(&json!({"op": "step", "action": message})) {
        Ok(a) => a,
        Err(e) => {
            l.ep.turns.push(t);
            fail(manifest, &mut l.ep, e);
            return Step::Over;
        }
    };
    t.observation = answer["observation"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    t.signals = serde_json::from_value(answer["reward_signals"].clone()).unwrap_or_default();
    t.reward = manifest.turn_reward(&t.signals);
    l.messages.extend(t.observation.iter().cloned());
    if answer["done"].as_bool().unwrap_or(false) {
        let reason = answer["termination_reason"]
            .as_str()
            .unwrap_or("finished")
            .to_string();
        t.reward += manifest.terminal_reward(&reason);
        l.ep.success = reason == "finished";
        l.ep.termination_reason = reason;
        l.ep.turns.push(t);
        return Step::Over;
    }
    l.ep.turns.push(t);
    Step::Going
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
