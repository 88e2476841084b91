//! Episodes against a world process (a shell script speaking the protocol of
//! datasets/worlds/README.md), played by SmolLM2: rewards follow the manifest's policy, the episode becomes an ATIF trajectory,
//! and a world that crashes mid-episode ends it with `error`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::json;
use whet_engine::{load_model, Precision, Sampler, SamplerOptions};
use whet_rl::episode::{play, to_atif};
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
