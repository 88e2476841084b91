//! RL parity with PyTorch + PEFT: one full RL step — two prompts with groups of four rollouts
//! (fixed completions, sampler logprobs off the current policy so PPO clips both ways), given
//! rewards → group-relative advantages → datums → `importance_sampling` / `ppo` loss → LoRA
//! gradients → one AdamW step — against the numbers `tools/make_rl_fixtures.py` computed with
//! torch on the tiny fixtures (tests/fixtures/rl/<model>/, on tests/fixtures/<model>/'s base
//! model and PEFT adapter).
//!
//! Three levels, so a disagreement says where it comes from: the datums whet builds from the
//! rollouts (bit for bit), the loss and gradients of one `forward_backward` on them, and the
//! whole step through [`whet_rl::train`] with a scripted sampler and reward recipe (loss,
//! gradients, gradient norm, the sampler/trainer KL metrics and the updated adapter).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use whet_contract::{
    AdamParams, ContractError, Datum, ForwardBackwardOutput, LossFn, LossFnConfig, ModelInfo,
    ModelInput, OptimStepResponse, SampleResponse, SampledSequence, SamplingClient, SamplingParams,
    StopReason, TrainingClient,
};
use whet_engine::{load_adapter, load_model, Model, Precision, SamplerOptions, TrainingSession};
use whet_rl::recipes::{RewardInput, Score};
use whet_rl::{
    group_advantages, rollouts, Algorithm, Metrics, Prompt, Recipe, RewardError, RlConfig, Rollout,
    Run,
};
use whet_sft::{Checkpoint, Control, LrSchedule, OptimizerConfig, ScheduleConfig};

const MODELS: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"];
const LOSSES: [(Algorithm, &str); 2] = [
    (Algorithm::ImportanceSampling, "importance_sampling"),
    (Algorithm::Ppo, "ppo"),
];
/// `(case, normalize_advantages, key prefix in expected.safetensors)`.
const CASES: [(&str, bool, &str); 2] = [("mean", false, ""), ("normalized", true, "normalized.")];

/// Relative tolerance of losses and gradients (as the engine's parity test: fp32 against fp32).
const REL_TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Fixture {
    name: &'static str,
    base: PathBuf,
    dir: PathBuf,
    model: Arc<Model>,
    inputs: Value,
    expected: HashMap<String, Tensor>,
}

fn fixture(name: &'static str) -> Fixture {
    let base = fixtures().join(name);
    let dir = fixtures().join("rl").join(name);
    let (_, model) = load_model(base.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
    let inputs =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    Fixture {
        name,
        base,
        dir,
        model,
        inputs,
        expected,
    }
}

impl Fixture {
    /// A session on the fixture's PEFT adapter.
    fn session(&self, ckpt: &Path) -> TrainingSession {
        let adapter = load_adapter(&self.model, &self.base.join("adapter")).unwrap();
        TrainingSession::with_adapter(
            self.model.clone(),
            self.name,
            adapter,
            ckpt,
            SamplerOptions::default(),
        )
    }

    fn prompts(&self) -> Vec<Vec<i64>> {
        serde_json::from_value(self.inputs["prompts"].clone()).unwrap()
    }

    /// The groups as the loop has them after scoring (advantages still unset).
    fn groups(&self) -> Vec<Vec<Rollout>> {
        self.inputs["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                g.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| Rollout {
                        tokens: serde_json::from_value(r["tokens"].clone()).unwrap(),
                        logprobs: serde_json::from_value(r["logprobs"].clone()).unwrap(),
                        completion: String::new(),
                        reward: r["reward"].as_f64(),
                        metrics: BTreeMap::new(),
                        error: None,
                        advantage: 0.0,
                        prompt: None,
                        token_advantages: vec![],
                    })
                    .collect()
            })
            .collect()
    }

    fn datums_file(&self, prefix: &str) -> Vec<Datum> {
        std::fs::read_to_string(self.dir.join(format!("{prefix}datums.jsonl")))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn adam_params(&self) -> AdamParams {
        serde_json::from_value(self.inputs["adam_params"].clone()).unwrap()
    }

    fn tensor(&self, key: &str) -> Vec<f32> {
        values(
            self.expected
                .get(key)
                .unwrap_or_else(|| panic!("{}: fixture has no {key}", self.name)),
        )
    }
}

/// The datums of one RL step exactly as the loop builds them: advantages per group, the
/// advantage scaled by 1 / (completion tokens of the step), group by group.
fn step_datums(prompts: &[Vec<i64>], groups: &mut [Vec<Rollout>], normalize: bool) -> Vec<Datum> {
    for group in groups.iter_mut() {
        let rewards: Vec<f64> = group.iter().map(|r| r.reward.unwrap()).collect();
        for (r, a) in group.iter_mut().zip(group_advantages(&rewards, normalize)) {
            r.advantage = a;
        }
    }
    let tokens: usize = groups.iter().flatten().map(|r| r.tokens.len()).sum();
    let scale = 1.0 / tokens as f64;
    prompts
        .iter()
        .zip(groups.iter())
        .flat_map(|(p, g)| g.iter().map(move |r| rollouts::datum(p, r, scale)))
        .collect()
}

fn rl_config(algorithm: Algorithm, normalize: bool) -> RlConfig {
    RlConfig {
        algorithm,
        num_rollouts: 4,
        groups_per_step: 2,
        max_new_tokens: 8,
        normalize_advantages: normalize,
        ..RlConfig::default()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts the loss and every LoRA gradient against torch's `{prefix}loss.{loss}` and
/// `{prefix}grad.{loss}.{key}`; returns the worst relative differences (loss, gradient).
fn assert_loss_and_grads(
    f: &Fixture,
    what: &str,
    prefix: &str,
    loss: &str,
    got_loss: f64,
    grads: &BTreeMap<String, Tensor>,
) -> (f32, f32) {
    let want = f.tensor(&format!("{prefix}loss.{loss}"))[0];
    let loss_rel = (got_loss as f32 - want).abs() / want.abs();
    assert!(
        loss_rel <= REL_TOL,
        "{} {what}: loss {got_loss} vs torch {want}",
        f.name
    );
    let keys: Vec<&str> = f.inputs["lora_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        grads.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut k = keys.clone();
            k.sort();
            k
        },
        "{} {what}: gradient keys",
        f.name
    );
    let mut worst = 0f32;
    for (key, g) in grads {
        let want = f.tensor(&format!("{prefix}grad.{loss}.{key}"));
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            scale > 0.0,
            "{} {what} {key}: torch's gradient is 0",
            f.name
        );
        let d = max_abs_diff(&values(g), &want) / scale;
        worst = worst.max(d);
        assert!(
            d <= REL_TOL,
            "{} {what} {key}: max |Δ grad| = {d} of max |grad| {scale}",
            f.name
        );
    }
    (loss_rel, worst)
}

#[test]
fn rollouts_become_the_datums_torch_trained_on() {
    for name in MODELS {
        let f = fixture(name);
        let prompts = f.prompts();
        for (case, normalize, prefix) in CASES {
            let info = &f.inputs["cases"][case];
            let mut groups = f.groups();
            let datums = step_datums(&prompts, &mut groups, normalize);
            // Advantages: whet's f64 arithmetic is the script's, operation for operation.
            for (g, group) in groups.iter().enumerate() {
                for (i, r) in group.iter().enumerate() {
                    let want = info["advantages"][g][i].as_f64().unwrap();
                    assert!(
                        (r.advantage - want).abs() <= 1e-12,
                        "{name} {case} group {g} rollout {i}: advantage {} vs {want}",
                        r.advantage
                    );
                }
            }
            let want = f.datums_file(prefix);
            assert_eq!(datums.len(), want.len(), "{name} {case}");
            for (i, (d, w)) in datums.iter().zip(&want).enumerate() {
                assert_eq!(
                    d.model_input.to_ints(),
                    w.model_input.to_ints(),
                    "{name} {case} datum {i}: model_input"
                );
                let (a, b) = (&d.loss_fn_inputs, &w.loss_fn_inputs);
                assert_eq!(
                    a.keys().collect::<Vec<_>>(),
                    b.keys().collect::<Vec<_>>(),
                    "{name} {case} datum {i}"
                );
                assert_eq!(
                    a["target_tokens"].to_i64_vec().unwrap(),
                    b["target_tokens"].to_i64_vec().unwrap(),
                    "{name} {case} datum {i}: target_tokens"
                );
                for key in ["logprobs", "advantages"] {
                    let bits = |t: &whet_contract::TensorData| -> Vec<u32> {
                        t.to_f32_vec().iter().map(|x| x.to_bits()).collect()
                    };
                    assert_eq!(
                        bits(&a[key]),
                        bits(&b[key]),
                        "{name} {case} datum {i}: {key}"
                    );
                }
            }
        }
    }
}

#[test]
fn ppo_and_importance_sampling_gradients_match_torch() {
    let mut report = Vec::new();
    for name in MODELS {
        let f = fixture(name);
        let prompts = f.prompts();
        for (case, normalize, prefix) in CASES {
            let datums = step_datums(&prompts, &mut f.groups(), normalize);
            for (algorithm, loss) in LOSSES {
                let (loss_fn, config) = rl_config(algorithm, normalize).loss();
                assert_eq!(loss_fn, LossFn::parse(loss).unwrap());
                assert_eq!(
                    serde_json::to_value(&config).unwrap(),
                    f.inputs["loss_fn_config"][loss],
                    "{name}: torch used another loss config"
                );
                let ckpt = tempfile::tempdir().unwrap();
                let mut s = f.session(ckpt.path());
                let out = s.forward_backward(&datums, loss_fn, &config).unwrap();
                let (l, g) = assert_loss_and_grads(
                    &f,
                    &format!("{case} {loss}"),
                    prefix,
                    loss,
                    out.metrics["loss:sum"],
                    s.accumulated_grads(),
                );
                report.push(format!(
                    "{name} {case} {loss}: loss rel {l:.1e}, grad rel {g:.1e}"
                ));
            }
            // The fixture tells the losses apart: PPO's clip changes the gradients far beyond
            // the tolerance (an engine that ignored it would fail above).
            let clip_effect = f.inputs["lora_keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| {
                    let k = k.as_str().unwrap();
                    let is = f.tensor(&format!("{prefix}grad.importance_sampling.{k}"));
                    let ppo = f.tensor(&format!("{prefix}grad.ppo.{k}"));
                    let scale = is.iter().fold(0f32, |m, x| m.max(x.abs()));
                    max_abs_diff(&is, &ppo) / scale
                })
                .fold(0f32, f32::max);
            assert!(
                clip_effect > 100.0 * REL_TOL,
                "{name} {case}: PPO's clip barely matters ({clip_effect})"
            );
        }
    }
    eprintln!("{}", report.join("\n"));
}

// ---- the whole step through the loop --------------------------------------------------------

/// A sampler that answers each prompt with the fixture's completions and sampler logprobs.
struct ScriptedSampler(Vec<(Vec<i64>, Vec<SampledSequence>)>);

impl SamplingClient for ScriptedSampler {
    fn sample(
        &self,
        prompt: &ModelInput,
        num_samples: usize,
        _params: &SamplingParams,
        _include_prompt_logprobs: bool,
        _topk_prompt_logprobs: usize,
    ) -> Result<SampleResponse, ContractError> {
        let tokens = prompt.to_ints();
        let (_, sequences) = self
            .0
            .iter()
            .find(|(p, _)| *p == tokens)
            .unwrap_or_else(|| panic!("unscripted prompt {tokens:?}"));
        assert_eq!(num_samples, sequences.len());
        Ok(SampleResponse {
            sequences: sequences.clone(),
            prompt_logprobs: None,
            topk_prompt_logprobs: None,
        })
    }

    fn compute_logprobs(&self, _prompt: &ModelInput) -> Result<Vec<Option<f32>>, ContractError> {
        Err(ContractError::Unsupported("scripted sampler".into()))
    }
}

/// The engine's session, with a scripted sampler, keeping the gradients each `optim_step`
/// applies (the session zeroes them).
struct Scripted {
    session: TrainingSession,
    script: Vec<(Vec<i64>, Vec<SampledSequence>)>,
    applied: Vec<BTreeMap<String, Tensor>>,
}

impl TrainingClient for Scripted {
    fn forward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        self.session.forward(data, loss_fn, config)
    }
    fn forward_backward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        self.session.forward_backward(data, loss_fn, config)
    }
    fn optim_step(&mut self, params: &AdamParams) -> Result<OptimStepResponse, ContractError> {
        self.applied.push(self.session.accumulated_grads().clone());
        self.session.optim_step(params)
    }
    fn save_state(&mut self, name: &str) -> Result<String, ContractError> {
        self.session.save_state(name)
    }
    fn load_state(&mut self, path: &str) -> Result<(), ContractError> {
        self.session.load_state(path)
    }
    fn load_state_with_optimizer(&mut self, path: &str) -> Result<(), ContractError> {
        self.session.load_state_with_optimizer(path)
    }
    fn save_weights_for_sampler(&mut self, name: &str) -> Result<String, ContractError> {
        self.session.save_weights_for_sampler(name)
    }
    fn sampling_client(&mut self) -> Result<Box<dyn SamplingClient>, ContractError> {
        Ok(Box::new(ScriptedSampler(self.script.clone())))
    }
    fn base_sampling_client(&mut self) -> Result<Box<dyn SamplingClient>, ContractError> {
        self.session.base_sampling_client()
    }
    fn get_info(&self) -> Result<ModelInfo, ContractError> {
        self.session.get_info()
    }
}

/// The fixture's rewards, looked up by prompt row and completion text.
struct ScriptedRewards;

impl Recipe for ScriptedRewards {
    fn name(&self) -> &str {
        "scripted"
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        let reward = input.row["rewards"][input.completion]
            .as_f64()
            .unwrap_or_else(|| panic!("no reward for {:?}", input.completion));
        Ok(Score::new(reward))
    }
}

#[derive(Default)]
struct Log(Vec<Metrics>);

impl whet_rl::Observer for Log {
    fn on_step(&mut self, m: &Metrics) -> Control {
        self.0.push(m.clone());
        Control::Continue
    }
    fn on_checkpoint(&mut self, _: &Checkpoint) {}
}

/// A word-level tokenizer over the fixtures' 128 ids (`t0` … `t127`), so the recipe sees
/// distinct completion texts.
fn tokenizer(dir: &Path) -> whet_data::Tokenizer {
    let vocab: serde_json::Map<String, Value> =
        (0..128).map(|i| (format!("t{i}"), json!(i))).collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    });
    std::fs::write(dir.join("tokenizer.json"), doc.to_string()).unwrap();
    whet_data::Tokenizer::from_model_path(dir).unwrap()
}

#[test]
fn one_rl_step_of_the_loop_matches_torch() {
    let tok_dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(tok_dir.path());
    let mut report = Vec::new();
    for name in MODELS {
        let f = fixture(name);
        let groups = f.groups();
        let script: Vec<(Vec<i64>, Vec<SampledSequence>)> = f
            .prompts()
            .into_iter()
            .zip(&groups)
            .map(|(p, g)| {
                let seqs = g
                    .iter()
                    .map(|r| SampledSequence {
                        stop_reason: StopReason::Stop,
                        tokens: r.tokens.clone(),
                        logprobs: r.logprobs.clone(),
                    })
                    .collect();
                (p, seqs)
            })
            .collect();
        let prompts: Vec<Prompt> = script
            .iter()
            .zip(&groups)
            .enumerate()
            .map(|(g, ((tokens, _), group))| {
                let mut rewards = serde_json::Map::new();
                for r in group {
                    let ids: Vec<u32> = r.tokens.iter().map(|&t| t as u32).collect();
                    let text = tok.decode(&ids, true).unwrap();
                    assert!(rewards.insert(text, json!(r.reward)).is_none());
                }
                Prompt {
                    tokens: tokens.clone(),
                    text: format!("prompt {g}"),
                    row: json!({ "rewards": rewards }),
                    location: format!("prompts.jsonl:{}", g + 1),
                }
            })
            .collect();
        let adam = f.adam_params();
        let optimizer = OptimizerConfig {
            learning_rate: adam.learning_rate,
            beta1: adam.beta1,
            beta2: adam.beta2,
            eps: adam.eps,
            weight_decay: adam.weight_decay,
            grad_clip_norm: adam.grad_clip_norm,
        };
        let schedule = ScheduleConfig {
            epochs: 1,
            shuffle: false,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            checkpoint_interval: 0,
            eval_interval: 0,
            ..Default::default()
        };
        for (case, normalize, prefix) in CASES {
            let info = &f.inputs["cases"][case];
            for (algorithm, loss) in LOSSES {
                let what = format!("{case} {loss} (loop)");
                let rl = rl_config(algorithm, normalize);
                let run = Run {
                    prompts: &prompts,
                    eval: &[],
                    tokenizer: &tok,
                    recipe: &ScriptedRewards,
                    rl: &rl,
                    optimizer: &optimizer,
                    schedule: &schedule,
                    world: None,
                };
                let ckpt = tempfile::tempdir().unwrap();
                let mut client = Scripted {
                    session: f.session(ckpt.path()),
                    script: script.clone(),
                    applied: vec![],
                };
                let mut log = Log::default();
                let out = whet_rl::train(&mut client, &run, 0, &mut log).unwrap();
                assert_eq!(out.steps, 1, "{name} {what}");
                assert_eq!(client.applied.len(), 1, "{name} {what}");
                let m = &log.0[0];
                assert_eq!(m["rollouts/trained"], 8.0, "{name} {what}");
                let (l, g) =
                    assert_loss_and_grads(&f, &what, prefix, loss, m["loss"], &client.applied[0]);
                // The gradient norm the optimizer saw (before clipping).
                let norm = info["grad_norm"][loss].as_f64().unwrap();
                let norm_rel = (m["grad_norm"] - norm).abs() / norm;
                assert!(
                    norm_rel <= REL_TOL as f64,
                    "{name} {what}: grad norm {} vs torch {norm}",
                    m["grad_norm"]
                );
                // How far the sampler's logprobs are from the trainer's.
                for key in ["kl_sample_train_v1", "kl_sample_train_v2"] {
                    let want = f.inputs[key].as_f64().unwrap();
                    let got = m[&format!("optim/{key}")];
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{name} {what}: {key} {got} vs torch {want}"
                    );
                }
                // The adapter after the step (torch's update is stored for the "mean" case).
                let mut weight_diff = 0f32;
                if prefix.is_empty() {
                    let (mut total, mut unresolved) = (0usize, 0usize);
                    for (key, var) in client.session.adapter().named_vars() {
                        let want = f.tensor(&format!("adam.{loss}.{key}"));
                        let g0 = f.tensor(&format!("grad.{loss}.{key}"));
                        let gmax = g0.iter().fold(0f32, |m, x| m.max(x.abs()));
                        for (i, (a, b)) in values(var.as_tensor()).iter().zip(&want).enumerate() {
                            total += 1;
                            // Adam's first step is ±lr·g/(|g| + eps): an element whose gradient
                            // is ~0 moves by an amount set by rounding noise (as in the engine's
                            // parity test); it is held to Adam's bound of lr.
                            let tol = if g0[i].abs() < 1e-4 * gmax {
                                unresolved += 1;
                                2.0 * adam.learning_rate as f32
                            } else {
                                weight_diff = weight_diff.max((a - b).abs());
                                1e-6
                            };
                            assert!(
                                (a - b).abs() < tol,
                                "{name} {what} {key}[{i}]: {a} vs torch {b} (|g| {})",
                                g0[i]
                            );
                        }
                    }
                    assert!(
                        unresolved * 100 < total,
                        "{name} {what}: {unresolved} of {total} near-zero gradients"
                    );
                }
                report.push(format!(
                    "{name} {what}: loss rel {l:.1e}, grad rel {g:.1e}, grad norm rel \
                     {norm_rel:.1e}, max |Δ weight| {weight_diff:.1e}"
                ));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}
