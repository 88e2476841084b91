//! The RL loop on the real engine (tiny Llama fixture; SmolLM2's tokenizer decodes its
//! completions): rollouts are seeded by step and group, so a run resumed from a checkpoint
//! samples, scores and trains exactly what the uninterrupted run did — same rewards, same
//! final adapter, byte for byte.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::json;
use whet_contract::TrainingClient;
use whet_engine::{load_model, Precision, SamplerOptions, TrainingSession};
use whet_rl::recipes::{RewardInput, Score};
use whet_rl::{Metrics, Prompt, Recipe, RewardError, RlConfig, Run};
use whet_sft::{Checkpoint, Control, OptimizerConfig, ScheduleConfig};

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
        eprintln!(
            "skipping: {} is missing (run tools/get-smollm2.sh)",
            p.display()
        );
        return None;
    }
    Some(whet_data::Tokenizer::from_model_path(&p).unwrap())
}

/// A reward that differs between completions (their length in characters, mod 3).
struct Length;

impl Recipe for Length {
    fn name(&self) -> &str {
        "length_mod_3"
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        Ok(Score::new((input.completion.chars().count() % 3) as f64))
    }
}

#[derive(Default)]
struct Log {
    steps: Vec<Metrics>,
    checkpoints: Vec<Checkpoint>,
    stop_after: Option<usize>,
}

impl whet_rl::Observer for Log {
    fn on_step(&mut self, m: &Metrics) -> Control {
        self.steps.push(m.clone());
        match self.stop_after {
            Some(n) if m["step"] as usize >= n => Control::Stop,
            _ => Control::Continue,
        }
    }
    fn on_checkpoint(&mut self, c: &Checkpoint) {
        self.checkpoints.push(c.clone());
    }
}

fn session(dir: &Path) -> TrainingSession {
    let fixture = root().join("tests/fixtures/tiny-llama");
    let (_, model) = load_model(fixture.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
    let lora = whet_lora::LoraConfig {
        rank: 4,
        alpha: 8.0,
        seed: 3,
        ..Default::default()
    };
    TrainingSession::new(model, "tiny-llama", lora, dir, SamplerOptions::default()).unwrap()
}

#[test]
fn a_resumed_rl_run_ends_with_the_same_adapter_bitwise() {
    let Some(tok) = tokenizer() else { return };
    let prompts: Vec<Prompt> = (0..5)
        .map(|i| Prompt {
            tokens: vec![1, 10 + i, 20 + i, 30],
            text: format!("prompt {i}"),
            row: json!({}),
            location: format!("prompts.jsonl:{}", i + 1),
        })
        .collect();
    let rl = RlConfig {
        num_rollouts: 4,
        groups_per_step: 2,
        max_new_tokens: 6,
        ..RlConfig::default()
    };
    let optimizer = OptimizerConfig {
        learning_rate: 1e-2,
        ..Default::default()
    };
    let schedule = ScheduleConfig {
        epochs: 2,
        checkpoint_interval: 2,
        seed: 11,
        ..Default::default()
    };
    let run = Run {
        prompts: &prompts,
        eval: &[],
        tokenizer: &tok,
        recipe: &Length,
        rl: &rl,
        optimizer: &optimizer,
        schedule: &schedule,
        world: None,
    };
    let adapter =
        |dir: &str| std::fs::read(Path::new(dir).join("adapter_model.safetensors")).unwrap();

    let a = tempfile::tempdir().unwrap();
    let mut straight = Log::default();
    let out = whet_rl::train(&mut session(a.path()), &run, 0, &mut straight).unwrap();
    assert_eq!(out.steps, 6, "2 epochs of ceil(5 / 2) steps");
    assert!(
        straight.steps.iter().any(|m| m["rollouts/trained"] > 0.0),
        "some groups have mixed rewards"
    );

    // Stopped after step 3: the last checkpoint is step 2; resume from it in a new session.
    let b = tempfile::tempdir().unwrap();
    let mut first = Log {
        stop_after: Some(3),
        ..Log::default()
    };
    let out = whet_rl::train(&mut session(b.path()), &run, 0, &mut first).unwrap();
    assert!(out.stopped);
    let c = first.checkpoints.last().unwrap().clone();
    assert_eq!(c.step, 2);
    let mut resumed_session = session(b.path());
    resumed_session.load_state_with_optimizer(&c.state).unwrap();
    let mut rest = Log::default();
    let out = whet_rl::train(&mut resumed_session, &run, c.step, &mut rest).unwrap();
    assert_eq!(out.steps, 6);
    for (x, y) in straight.steps[2..].iter().zip(&rest.steps) {
        assert_eq!(
            x["train/reward_mean"], y["train/reward_mean"],
            "step {}",
            x["step"]
        );
        assert_eq!(x["loss"], y["loss"], "step {}", x["step"]);
    }
    assert!(
        adapter(&out.last.unwrap().adapter)
            == adapter(&straight.checkpoints.last().unwrap().adapter),
        "the resumed run's adapter differs"
    );
}

/// The async modes train on stale-bounded data: one_step_off_async's batches are exactly one
/// step stale (the first on-policy); fully_async's never staler than `max_steps_off_policy`.
#[test]
fn async_modes_respect_their_staleness_bound() {
    let Some(tok) = tokenizer() else { return };
    let prompts: Vec<Prompt> = (0..6)
        .map(|i| Prompt {
            tokens: vec![1, 40 + i, 50 + i],
            text: format!("prompt {i}"),
            row: json!({}),
            location: format!("prompts.jsonl:{}", i + 1),
        })
        .collect();
    let optimizer = OptimizerConfig::default();
    let schedule = ScheduleConfig {
        epochs: 2,
        ..Default::default()
    };
    for (mode, bound) in [
        (whet_rl::ExecutionMode::OneStepOffAsync, 1),
        (whet_rl::ExecutionMode::FullyAsync, 1),
        (whet_rl::ExecutionMode::FullyAsync, 2),
    ] {
        let rl = RlConfig {
            num_rollouts: 3,
            groups_per_step: 2,
            max_new_tokens: 5,
            execution_mode: mode,
            max_steps_off_policy: Some(bound),
            ..RlConfig::default()
        };
        let run = Run {
            prompts: &prompts,
            eval: &[],
            tokenizer: &tok,
            recipe: &Length,
            rl: &rl,
            optimizer: &optimizer,
            schedule: &schedule,
            world: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::default();
        let out = whet_rl::train(&mut session(dir.path()), &run, 0, &mut log).unwrap();
        assert_eq!(out.steps, 6);
        let staleness: Vec<f64> = log.steps.iter().map(|m| m["async/staleness"]).collect();
        let discarded: f64 = log.steps.iter().map(|m| m["async/discarded_groups"]).sum();
        assert!(
            staleness.iter().all(|&s| s <= bound as f64),
            "{mode:?}: {staleness:?}"
        );
        if mode == whet_rl::ExecutionMode::OneStepOffAsync {
            assert_eq!(staleness, vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        }
        assert_eq!(
            discarded, 0.0,
            "{mode:?}: the queue keeps batches within the bound"
        );
        assert!(log.steps.iter().any(|m| m["rollouts/trained"] > 0.0));
    }
}

/// The KL penalty against the base model: at the start the adapter is zero (PEFT's init), so
/// policy and base agree and the first step trains as without the penalty; once the policy has
/// moved, `kl/policy_base` measures how far.
#[test]
fn the_kl_penalty_is_zero_at_the_base_and_grows_as_the_policy_moves() {
    let Some(tok) = tokenizer() else { return };
    let prompts: Vec<Prompt> = (0..4)
        .map(|i| Prompt {
            tokens: vec![1, 60 + i, 70 + i],
            text: format!("prompt {i}"),
            row: json!({}),
            location: format!("prompts.jsonl:{}", i + 1),
        })
        .collect();
    let optimizer = OptimizerConfig {
        learning_rate: 5e-2,
        ..Default::default()
    };
    let schedule = ScheduleConfig {
        epochs: 2,
        shuffle: false,
        ..Default::default()
    };
    let run_with = |coef: f64| {
        let rl = RlConfig {
            num_rollouts: 4,
            groups_per_step: 2,
            max_new_tokens: 6,
            kl_penalty_coef: coef,
            ..RlConfig::default()
        };
        let run = Run {
            prompts: &prompts,
            eval: &[],
            tokenizer: &tok,
            recipe: &Length,
            rl: &rl,
            optimizer: &optimizer,
            schedule: &schedule,
            world: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::default();
        whet_rl::train(&mut session(dir.path()), &run, 0, &mut log).unwrap();
        log.steps
    };
    let plain = run_with(0.0);
    let kl = run_with(0.5);
    assert!(!plain[0].contains_key("kl/policy_base"));
    assert!(
        kl[0]["kl/policy_base"].abs() < 1e-4,
        "{}",
        kl[0]["kl/policy_base"]
    );
    assert!((kl[0]["loss"] - plain[0]["loss"]).abs() <= 1e-4 * plain[0]["loss"].abs().max(1e-3));
    let later = kl
        .iter()
        .skip(1)
        .map(|m| m["kl/policy_base"].abs())
        .fold(0.0, f64::max);
    assert!(later > 1e-3, "the policy moved away from the base: {later}");
}
