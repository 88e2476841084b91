//! Episodes against a world process (a shell script speaking the protocol of
//! datasets/worlds/README.md), played by SmolLM2: rewards follow the manifest's policy, the episode becomes an ATIF trajectory,
//! and a world that crashes mid-episode ends it with `error`; episodes played in lockstep play
//! as they would alone; turn prompts extend the sampled history; and one live-RL step moves
//! the policy toward the episodes that did better.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::json;
use whet_engine::{load_model, Precision, Sampler, SamplerOptions};
use whet_rl::episode::{play, play_many, to_atif, EpisodeSpec};
use whet_rl::world::Manifest;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tokenizer() -> Option<whet_data::Tokenizer> {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing",
            p.display()
        );
        eprintln!("skipping: {} is missing", p.display());
        return None;
    }
    Some(whet_data::Tokenizer::from_model_path(&p).unwrap())
}

/// A world in `dir`: `script` run by `sh`, and a manifest named `name` whose seeds, limits and
/// reward policy are `rest` (YAML).
fn world_in(dir: &Path, name: &str, script: &str, rest: &str) -> Manifest {
    std::fs::write(dir.join("world.sh"), script).unwrap();
    let yaml = format!(
        "schema: 1\nname: {name}\nversion: 1.0.0\nentrypoint: [\"sh\", \"world.sh\"]\n{rest}"
    );
    std::fs::write(dir.join("world.yaml"), yaml).unwrap();
    Manifest::from_file(&dir.join("world.yaml")).unwrap()
}

fn manifest(dir: &Path, script: &str) -> Manifest {
    world_in(
        dir,
        "two-turns",
        script,
        "seeds: [5]\nlimits: {max_turns: 3, max_tokens_per_turn: 4, timeout_sec: 5}\n\
         reward_policy:\n  components: {tool_observation: 0.02}\n  terminal: {finished: 1.0, error: -1.0}\n",
    )
}

/// Answers reset, then a first step (not done), then finishes on the second.
const WORLD: &str = r#"n=0
while read -r line; do
  case "$line" in
    *'"reset"'*) echo '{"observation": [{"role": "user", "content": "Say hi twice."}], "tools": []}' ;;
    *'"step"'*) n=$((n+1))
      if [ "$n" -lt 2 ]; then
        echo '{"observation": [{"role": "user", "content": "Again."}], "reward_signals": [{"source": "tool_observation", "value": 5}], "done": false}'
      else
        echo '{"observation": [], "reward_signals": [], "done": true, "termination_reason": "finished"}'
      fi ;;
    *) exit 0 ;;
  esac
done
"#;

#[test]
fn an_episode_follows_the_protocol_and_becomes_a_trajectory() {
    let Some(tok) = tokenizer() else { return };
    let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (_, model) = load_model(gguf.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
    let sampler = Sampler::new(model, None, SamplerOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), WORLD);
    let (task, seed) = m.episode(0);
    let ep = play(&m, &sampler, &tok, Some("Be brief."), &task, seed, 1, 1.0).unwrap();
    assert_eq!(ep.termination_reason, "finished");
    assert!(ep.success);
    assert_eq!(ep.turns.len(), 2);
    // The policy's component value (0.02) replaces the world's own (5); finished adds 1.0.
    assert!((ep.turns[0].reward - 0.02).abs() < 1e-12);
    assert!((ep.total_reward() - 1.02).abs() < 1e-12);
    let atif = to_atif(&ep, &m, "tiny", "t-1");
    assert_eq!(atif["schema_version"], "ATIF-v1.4");
    assert_eq!(atif["success"], true);
    let sources: Vec<&str> = atif["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["user", "agent", "user", "agent"]);
    assert_eq!(atif["steps"][1]["extra"]["reward"], json!(0.02));
    // The trajectory is a valid whet trajectory row.
    whet_data::parse_row(&atif, whet_data::Format::Trajectories).unwrap();

    // A world that crashes after reset: the episode ends with `error` and its penalty.
    let crash = "read -r line; echo '{\"observation\": [{\"role\": \"user\", \"content\": \"hi\"}]}'; exit 1\n";
    let m = manifest(dir.path(), crash);
    let ep = play(&m, &sampler, &tok, None, &task, seed, 1, 1.0).unwrap();
    assert_eq!(ep.termination_reason, "error");
    assert!(
        ep.error.as_deref().unwrap().contains("exited")
            || ep.error.as_deref().unwrap().contains("stopped")
    );
    assert!((ep.total_reward() + 1.0).abs() < 1e-12);
}

/// Episodes played in lockstep (their turns sampled as one batch, each resuming from its own
/// last turn's keys and values) are the episodes each would be alone, and a world that crashes
/// ends only its own episode.
#[test]
fn episodes_in_lockstep_play_as_they_would_alone() {
    let Some(tok) = tokenizer() else { return };
    let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (_, model) = load_model(gguf.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The world of seed 7 dies right after its reset.
    let script = WORLD.replace(
        "  case \"$line\" in\n",
        "  case \"$line\" in\n    *'\"seed\":7'*) echo '{\"observation\": [{\"role\": \"user\", \"content\": \"hi\"}]}'; exit 1 ;;\n",
    );
    let m = manifest(dir.path(), &script);
    let specs: Vec<EpisodeSpec> = [5, 7, 9]
        .into_iter()
        .map(|seed| EpisodeSpec {
            task: json!(null),
            seed,
            sample_seed: 0,
        })
        .collect();
    let sampler = Sampler::new(model.clone(), None, SamplerOptions::default());
    let together = play_many(&m, &sampler, &tok, Some("Be brief."), &specs, 0.0).unwrap();
    assert_eq!(together.len(), 3);
    assert_eq!(together[1].termination_reason, "error");
    assert!(
        sampler.reused_prompt_tokens() > 0,
        "turn 2 resumed from turn 1"
    );
    for (i, ep) in together.iter().enumerate() {
        let fresh = Sampler::new(model.clone(), None, SamplerOptions::default());
        let alone = play(
            &m,
            &fresh,
            &tok,
            Some("Be brief."),
            &ep.task,
            ep.seed,
            0,
            0.0,
        )
        .unwrap();
        assert_eq!(ep.seed, specs[i].seed);
        assert_eq!(
            ep.termination_reason, alone.termination_reason,
            "seed {}",
            ep.seed
        );
        let completions = |e: &whet_rl::episode::Episode| -> Vec<String> {
            e.turns.iter().map(|t| t.completion.clone()).collect()
        };
        assert_eq!(completions(ep), completions(&alone), "seed {}", ep.seed);
        assert!((ep.total_reward() - alone.total_reward()).abs() < 1e-12);
    }
    assert_eq!(together[0].termination_reason, "finished");
}

/// A policy that always answers with the same text (tokenized, the end-of-turn token last), as
/// a model that learned the Hermes call format would.
struct Scripted {
    tokens: Vec<i64>,
}

impl whet_contract::SamplingClient for Scripted {
    fn sample(
        &self,
        _prompt: &whet_contract::ModelInput,
        num_samples: usize,
        _params: &whet_contract::SamplingParams,
        _include_prompt_logprobs: bool,
        _topk_prompt_logprobs: usize,
    ) -> whet_contract::Result<whet_contract::SampleResponse> {
        let seq = whet_contract::SampledSequence {
            stop_reason: whet_contract::StopReason::Stop,
            tokens: self.tokens.clone(),
            logprobs: vec![-0.1; self.tokens.len()],
        };
        Ok(whet_contract::SampleResponse {
            sequences: vec![seq; num_samples],
            prompt_logprobs: None,
            topk_prompt_logprobs: None,
        })
    }

    fn compute_logprobs(
        &self,
        prompt: &whet_contract::ModelInput,
    ) -> whet_contract::Result<Vec<Option<f32>>> {
        Ok(vec![None; prompt.to_ints().len()])
    }
}

/// With SmolLM2's template (tools and calls as Hermes text), a turn's prompt continues the
/// previous turn's prompt and sampled tokens exactly, so live RL trains an episode as one
/// sequence (`merge_turns` in step.rs) instead of reading the conversation once per turn.
#[test]
fn turn_prompts_extend_the_sampled_history() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    let script = r#"while read -r line; do
  case "$line" in
    *'"reset"'*) echo '{"observation": [{"role": "user", "content": "List /."}], "tools": [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]}' ;;
    *'"step"'*) echo '{"observation": [{"role": "tool", "tool_call_id": "call_0_0", "content": "a.txt"}], "reward_signals": [], "done": false}' ;;
    *) exit 0 ;;
  esac
done
"#;
    let m = manifest(dir.path(), script);
    let text = "<tool_call>\n{\"name\": \"ls\", \"arguments\": {\"path\": \"/\"}}\n</tool_call>";
    let mut tokens: Vec<i64> = tok
        .encode(text, false)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    tokens.push(i64::from(tok.token_to_id("<|im_end|>").unwrap()));
    let policy = Scripted { tokens };
    let ep = play(&m, &policy, &tok, None, &json!(null), 5, 0, 1.0).unwrap();
    assert_eq!(ep.turns.len(), 3, "{:?}", ep.termination_reason);
    for pair in ep.turns.windows(2) {
        let sampled: Vec<i64> = pair[0]
            .prompt_tokens
            .iter()
            .chain(&pair[0].tokens)
            .copied()
            .collect();
        let next = &pair[1].prompt_tokens;
        assert!(
            next.starts_with(&sampled),
            "the next prompt re-spells the history:\n{:?}\n{:?}",
            tok.decode(
                &next[..sampled.len().min(next.len())]
                    .iter()
                    .map(|&t| t as u32)
                    .collect::<Vec<_>>(),
                false
            ),
            tok.decode(
                &sampled.iter().map(|&t| t as u32).collect::<Vec<_>>(),
                false
            )
        );
    }
}

/// One epoch of live RL in the world of `m` from SmolLM2 with a new adapter (`lora`) at
/// learning rate `lr`; returns samplers of the weights before and after.
fn train_in_world(
    tok: &whet_data::Tokenizer,
    m: &Manifest,
    rl: &whet_rl::RlConfig,
    lora: whet_lora::LoraConfig,
    lr: f64,
    observer: &mut dyn whet_rl::Observer,
) -> (
    Box<dyn whet_contract::SamplingClient>,
    Box<dyn whet_contract::SamplingClient>,
) {
    use whet_contract::TrainingClient;
    let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (_, model) = load_model(gguf.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
    let ckpts = tempfile::tempdir().unwrap();
    let mut session = whet_engine::TrainingSession::new(
        model,
        "smollm2",
        lora,
        ckpts.path(),
        SamplerOptions::default(),
    )
    .unwrap();
    let before = session.sampling_client().unwrap();
    let optimizer = whet_sft::OptimizerConfig {
        learning_rate: lr,
        ..Default::default()
    };
    let schedule = whet_sft::ScheduleConfig {
        epochs: 1,
        ..Default::default()
    };
    let run = whet_rl::Run {
        prompts: &[],
        eval: &[],
        tokenizer: tok,
        recipe: &NoRecipe,
        rl,
        optimizer: &optimizer,
        schedule: &schedule,
        world: Some(whet_rl::WorldRun {
            manifest: m,
            system_prompt: None,
        }),
    };
    let outcome = whet_rl::train(&mut session, &run, 0, observer).unwrap();
    assert_eq!(outcome.steps, 1, "one slot, one epoch: one step");
    (before, session.sampling_client().unwrap())
}

/// Collects each step's rollouts as the loop trained them.
#[derive(Default)]
struct Trained {
    groups: Vec<Vec<whet_rl::Rollout>>,
    episodes: Vec<Vec<whet_rl::episode::Episode>>,
}

impl whet_rl::Observer for Trained {
    fn on_step(&mut self, _m: &whet_rl::Metrics) -> whet_sft::Control {
        whet_sft::Control::Continue
    }
    fn on_rollouts(
        &mut self,
        _step: usize,
        _p: &[&whet_rl::Prompt],
        groups: &[Vec<whet_rl::Rollout>],
    ) {
        self.groups.extend(groups.iter().cloned());
    }
    fn on_episodes(&mut self, _step: usize, episodes: &[Vec<whet_rl::episode::Episode>]) {
        self.episodes.extend(episodes.iter().cloned());
    }
    fn on_checkpoint(&mut self, _c: &whet_sft::Checkpoint) {}
}

/// World runs score episodes with the world, never with a recipe.
struct NoRecipe;

impl whet_rl::Recipe for NoRecipe {
    fn name(&self) -> &str {
        "none"
    }
    fn score(
        &self,
        _input: &whet_rl::recipes::RewardInput<'_>,
    ) -> Result<whet_rl::recipes::Score, whet_rl::RewardError> {
        unreachable!("a world run scored a completion with its recipe")
    }
}

/// The sign, end to end: one live-RL step on world episodes (two turns merged into one
/// sequence, the outcome decided by what the policy wrote) moves the policy toward its better
/// turns. Summed over the sampled tokens, advantage × (logprob after − logprob before) is the
/// first-order change of the objective the step ascends, so it must be positive; and the turns
/// with a positive advantage gain logprob against those with a negative one. A flipped sign, a
/// mask on the wrong tokens or advantages on the world's tokens would break one or the other.
#[test]
fn a_world_step_moves_the_policy_toward_its_better_turns() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Turn 1 always goes on; turn 2 finishes when the request line (the policy's words in it)
    // has an even length, else fails: a reward the policy controls, and mixed at temperature 1.
    let script = r#"n=0
while read -r line; do
  case "$line" in
    *'"reset"'*) echo '{"observation": [{"role": "user", "content": "Name a colour."}], "tools": []}' ;;
    *'"step"'*) n=$((n+1))
      if [ "$n" -lt 2 ]; then
        echo '{"observation": [{"role": "user", "content": "Another one."}], "reward_signals": [], "done": false}'
      elif [ $(( ${#line} % 2 )) -eq 0 ]; then
        echo '{"observation": [], "reward_signals": [], "done": true, "termination_reason": "finished"}'
      else
        echo '{"observation": [], "reward_signals": [], "done": true, "termination_reason": "failed"}'
      fi ;;
    *) exit 0 ;;
  esac
done
"#;
    let m = world_in(
        dir.path(),
        "parity-of-words",
        script,
        "seeds: [5]\nlimits: {max_turns: 3, max_tokens_per_turn: 6, timeout_sec: 5}\n\
         reward_policy:\n  components: {}\n  terminal: {finished: 1.0, failed: -1.0}\n",
    );
    let rl = whet_rl::RlConfig {
        num_rollouts: 8,
        groups_per_step: 1,
        temperature: 1.0,
        ..Default::default()
    };
    let lora = whet_lora::LoraConfig {
        rank: 8,
        alpha: 16.0,
        seed: 1,
        ..Default::default()
    };
    let mut trained = Trained::default();
    let (before, after) = train_in_world(&tok, &m, &rl, lora, 1e-4, &mut trained);

    let rollouts: Vec<&whet_rl::Rollout> = trained.groups.iter().flatten().collect();
    // One sequence per episode where the next prompt extends the sampled turn; a turn cut at
    // max_tokens_per_turn is re-spelled by the template (its end-of-turn added) and starts its own.
    assert!(rollouts.len() >= 8, "{} rollouts", rollouts.len());
    assert!(
        rollouts.iter().any(|r| r.token_advantages.contains(&None)),
        "some episode's two turns went in one sequence, the world's tokens between them untrained"
    );
    // The expected advantage comes from the world's outcomes, not from what the step stored:
    // no per-turn rewards here, so every sampled token's is its episode's return minus the
    // group's mean return.
    let returns: Vec<f64> = rollouts.iter().map(|r| r.reward.unwrap()).collect();
    assert!(
        returns.contains(&1.0) && returns.contains(&-1.0),
        "a mixed group: {returns:?}"
    );
    let episodes = trained.episodes.iter().flatten();
    let mean_return =
        episodes.clone().map(|e| e.total_reward()).sum::<f64>() / episodes.count() as f64;
    let (mut objective, mut good, mut bad) = (0.0f64, Vec::new(), Vec::new());
    for r in &rollouts {
        let prompt = r.prompt.as_deref().unwrap();
        let full = whet_contract::ModelInput::from_ints([prompt, &r.tokens[..]].concat());
        let lp_before = before.compute_logprobs(&full).unwrap();
        let lp_after = after.compute_logprobs(&full).unwrap();
        let adv = r.reward.unwrap() - mean_return;
        for (j, stored) in r.token_advantages.iter().enumerate() {
            let Some(stored) = stored else { continue };
            assert!(
                (stored - adv).abs() < 1e-9,
                "advantage {stored}, expected {adv}"
            );
            let at = prompt.len() + j;
            let delta = f64::from(lp_after[at].unwrap() - lp_before[at].unwrap());
            objective += adv * delta;
            if adv > 0.0 {
                good.push(delta);
            } else if adv < 0.0 {
                bad.push(delta);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(objective > 0.0, "Σ advantage × Δlogprob = {objective}");
    assert!(
        mean(&good) > mean(&bad),
        "better turns gained {} per token, worse ones {}",
        mean(&good),
        mean(&bad)
    );
}

/// Keeps the eval metrics: the initial eval's and each step's.
#[derive(Default)]
struct Evals(Vec<whet_rl::Metrics>);

impl whet_rl::Observer for Evals {
    fn on_step(&mut self, m: &whet_rl::Metrics) -> whet_sft::Control {
        self.0.push(m.clone());
        whet_sft::Control::Continue
    }
    fn on_checkpoint(&mut self, _c: &whet_sft::Checkpoint) {}
    fn on_initial_eval(&mut self, m: &whet_rl::Metrics) {
        self.0.push(m.clone());
    }
}

/// The eval at the training temperature plays `eval_num_rollouts` episodes per eval seed, and
/// every eval of a run draws the same random numbers: with the weights unchanged (learning
/// rate 0) the eval after the step is the eval before it, so a change between two evals is
/// the policy's, not the dice's.
#[test]
fn a_sampled_world_eval_repeats_its_draws() {
    let Some(tok) = tokenizer() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Finishes when the policy's words have an even length: greedy episodes of one prompt all
    // end alike, sampled ones differ. The world ignores its seed.
    let script = r#"while read -r line; do
  case "$line" in
    *'"reset"'*) echo '{"observation": [{"role": "user", "content": "Name a colour."}], "tools": []}' ;;
    *'"step"'*) if [ $(( ${#line} % 2 )) -eq 0 ]; then r=finished; else r=failed; fi
      echo "{\"observation\": [], \"reward_signals\": [], \"done\": true, \"termination_reason\": \"$r\"}" ;;
    *) exit 0 ;;
  esac
done
"#;
    let m = world_in(
        dir.path(),
        "parity",
        script,
        "seeds: [5]\neval_seeds: [1, 2, 3]\n\
         limits: {max_turns: 1, max_tokens_per_turn: 6, timeout_sec: 5}\n\
         reward_policy:\n  components: {}\n  terminal: {finished: 1.0, failed: -1.0}\n",
    );
    let rl = whet_rl::RlConfig {
        num_rollouts: 2,
        groups_per_step: 1,
        eval_temperature: 1.0,
        eval_num_rollouts: 4,
        ..Default::default()
    };
    let mut evals = Evals::default();
    train_in_world(
        &tok,
        &m,
        &rl,
        whet_lora::LoraConfig::default(),
        0.0,
        &mut evals,
    );
    let [before, after] = &evals.0[..] else {
        panic!("an initial eval and one step: {:?}", evals.0)
    };
    assert_eq!(before["eval/rollouts"], 12.0, "4 episodes × 3 eval seeds");
    let success = before["eval/success_rate"];
    assert!(
        success > 0.0 && success < 1.0,
        "sampled episodes of one prompt differ: success {success}"
    );
    for key in ["eval/rollouts", "eval/success_rate", "eval/reward_mean"] {
        assert_eq!(before[key], after[key], "{key}");
    }
}
