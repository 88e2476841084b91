//! Episodes against a world process (a shell script speaking the protocol of
//! datasets/worlds/README.md), played by SmolLM2: rewards follow the manifest's policy, the episode becomes an ATIF trajectory,
//! and a world that crashes mid-episode ends it with `error`; episodes played in lockstep play
//! as they would alone; turn prompts extend the sampled history.

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

fn manifest(dir: &Path, script: &str) -> Manifest {
    std::fs::write(dir.join("world.sh"), script).unwrap();
    let yaml = "schema: 1\nname: two-turns\nversion: 1.0.0\nentrypoint: [\"sh\", \"world.sh\"]\n\
                seeds: [5]\nlimits: {max_turns: 3, max_tokens_per_turn: 4, timeout_sec: 5}\n\
                reward_policy:\n  components: {tool_observation: 0.02}\n  terminal: {finished: 1.0, error: -1.0}\n";
    std::fs::write(dir.join("world.yaml"), yaml).unwrap();
    Manifest::from_file(&dir.join("world.yaml")).unwrap()
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
