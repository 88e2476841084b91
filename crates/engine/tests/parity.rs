//! Parity with PyTorch + transformers + PEFT, against the fixtures `tools/make_fixtures.py`
//! builds (tiny random Llama / Qwen2 / Qwen3 / Mistral models, PEFT adapters, datums, and the
//! logprobs, losses, gradients and AdamW updates torch computed on them).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::Value;
use whet_contract::{
    AdamParams, Datum, LossFn, LossFnConfig, ModelInput, SamplingClient, SamplingParams,
    TrainingClient,
};
use whet_engine::{load_adapter, load_model, Model, Precision, SamplerOptions, TrainingSession};

const MODELS: [&str; 4] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"];
const LOSSES: [&str; 5] = [
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Fixture {
    dir: PathBuf,
    model: Arc<Model>,
    datums: Vec<Datum>,
    expected: HashMap<String, Tensor>,
    meta: Value,
}

fn fixture(name: &str) -> Fixture {
    fixture_in(name, Precision::F32)
}

fn fixture_in(name: &str, precision: Precision) -> Fixture {
    let dir = fixtures().join(name);
    let (_, model) = load_model(dir.to_str().unwrap(), &Device::Cpu, precision).unwrap();
    let datums = std::fs::read_to_string(dir.join("datums.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    Fixture {
        dir,
        model,
        datums,
        expected,
        meta,
    }
}

impl Fixture {
    fn session(&self, with_adapter: bool) -> TrainingSession {
        let ckpt = tempfile::tempdir().unwrap().keep();
        if with_adapter {
            let adapter = load_adapter(&self.model, &self.dir.join("adapter")).unwrap();
            TrainingSession::with_adapter(
                self.model.clone(),
                "fixture",
                adapter,
                &ckpt,
                SamplerOptions::default(),
            )
        } else {
            // A fresh adapter has B = 0, so it computes exactly the base model.
            let cfg = whet_lora::LoraConfig {
                rank: 2,
                ..Default::default()
            };
            TrainingSession::new(
                self.model.clone(),
                "fixture",
                cfg,
                &ckpt,
                SamplerOptions::default(),
            )
            .unwrap()
        }
    }

    fn loss_config(&self, loss: &str) -> LossFnConfig {
        self.meta["loss_fn_config"][loss]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
            .collect()
    }

    fn tensor(&self, key: &str) -> Vec<f32> {
        self.expected
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no {key}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
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

fn logprobs_of(out: &whet_contract::ForwardBackwardOutput) -> Vec<Vec<f32>> {
    out.loss_fn_outputs
        .iter()
        .map(|o| o["logprobs"].to_f32_vec())
        .collect()
}

#[test]
fn logprobs_match_transformers_bare_and_with_peft_adapter() {
    for name in MODELS {
        let f = fixture(name);
        for (with_adapter, tag) in [(false, "base"), (true, "adapter")] {
            let mut s = f.session(with_adapter);
            let out = s
                .forward(&f.datums, LossFn::CrossEntropy, &LossFnConfig::new())
                .unwrap();
            for (i, lp) in logprobs_of(&out).iter().enumerate() {
                let want = f.tensor(&format!("logprobs.{tag}.{i}"));
                let d = max_abs_diff(lp, &want);
                assert!(d < 1e-4, "{name} {tag} datum {i}: max |Δ logprob| = {d}");
            }
        }
    }
}

#[test]
fn losses_and_every_lora_gradient_match_torch() {
    for name in MODELS {
        let f = fixture(name);
        for loss in LOSSES {
            let mut s = f.session(true);
            let out = s
                .forward_backward(
                    &f.datums,
                    LossFn::parse(loss).unwrap(),
                    &f.loss_config(loss),
                )
                .unwrap();
            let want = f.tensor(&format!("loss.{loss}"))[0];
            let got = out.metrics["loss:sum"] as f32;
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{name} {loss}: loss {got} vs torch {want}"
            );
            let grads = s.accumulated_grads();
            assert_eq!(grads.len(), s.adapter().named_vars().len(), "{name} {loss}");
            for (key, g) in grads {
                let want = f.tensor(&format!("grad.{loss}.{key}"));
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = max_abs_diff(&values(g), &want);
                assert!(
                    d <= 1e-4 * scale.max(1e-6),
                    "{name} {loss} {key}: max |Δ grad| = {d} (max |grad| {scale})"
                );
            }
        }
    }
}

/// The update rule alone: AdamW with clipping on torch's own (stored) gradients, step t using
/// `t·g`, must reproduce torch's weights to float rounding.
#[test]
fn adamw_update_rule_matches_torch_exactly() {
    for name in MODELS {
        let f = fixture(name);
        let params: AdamParams = serde_json::from_value(f.meta["adam_params"].clone()).unwrap();
        let adapter = load_adapter(&f.model, &f.dir.join("adapter")).unwrap();
        let mut opt = whet_lora::AdamW::new();
        for t in 1..=f.meta["adam_steps"].as_u64().unwrap() {
            let grads: BTreeMap<String, Tensor> = adapter
                .named_vars()
                .into_iter()
                .map(|(k, v)| {
                    let g = Tensor::from_vec(
                        f.tensor(&format!("grad.cross_entropy.{k}")),
                        v.shape(),
                        &Device::Cpu,
                    )
                    .unwrap();
                    (k, (g * t as f64).unwrap())
                })
                .collect();
            opt.step(&adapter, &grads, &params).unwrap();
        }
        for (key, var) in adapter.named_vars() {
            let d = max_abs_diff(
                &values(var.as_tensor()),
                &f.tensor(&format!("adam_given_grads.{key}")),
            );
            assert!(d < 1e-6, "{name} {key}: max |Δ weight| = {d}");
        }
    }
}

/// The whole loop, three times forward_backward + optim_step, against torch, within 1e-5.
///
/// One exception, and why: Adam divides each element's step by `sqrt(v) + eps`, so an element
/// whose gradient is ~1e-6 of its tensor's largest (after clipping, near `eps`) takes a step
/// set by the f32 rounding noise of that gradient — in torch as in whet, and no f32 program
/// can agree there. Those elements (|g| < 1e-4·max|g| at step 1; under 1% of all, asserted)
/// are only held to Adam's own bound of `lr` per step; `adamw_update_rule_matches_torch_exactly`
/// pins the update rule on every element.
#[test]
fn three_adamw_steps_match_torch() {
    for name in MODELS {
        let f = fixture(name);
        let params: AdamParams = serde_json::from_value(f.meta["adam_params"].clone()).unwrap();
        let steps = f.meta["adam_steps"].as_u64().unwrap();
        let mut s = f.session(true);
        for _ in 0..steps {
            s.forward_backward(&f.datums, LossFn::CrossEntropy, &LossFnConfig::new())
                .unwrap();
            s.optim_step(&params).unwrap();
        }
        let (mut total, mut unresolved) = (0usize, 0usize);
        for (key, var) in s.adapter().named_vars() {
            let want = f.tensor(&format!("adam.{key}"));
            let g0 = f.tensor(&format!("grad.cross_entropy.{key}"));
            let gmax = g0.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (a, b)) in values(var.as_tensor()).iter().zip(&want).enumerate() {
                total += 1;
                let tol = if g0[i].abs() < 1e-4 * gmax {
                    unresolved += 1;
                    2.0 * steps as f32 * params.learning_rate as f32
                } else {
                    1e-5
                };
                assert!(
                    (a - b).abs() < tol,
                    "{name} {key}[{i}]: {a} vs torch {b} after {steps} steps (|g0| {})",
                    g0[i]
                );
            }
        }
        assert!(
            unresolved * 100 < total,
            "{name}: {unresolved} of {total} near-zero gradients"
        );
    }
}

#[test]
fn gradients_accumulate_across_calls_and_micro_batches() {
    let f = fixture("tiny-qwen2");
    let mut whole = f.session(true);
    whole
        .forward_backward(&f.datums, LossFn::CrossEntropy, &LossFnConfig::new())
        .unwrap();
    let mut split = f.session(true);
    split.set_token_budget(1); // every datum its own micro-batch
    for d in &f.datums {
        split
            .forward_backward(
                std::slice::from_ref(d),
                LossFn::CrossEntropy,
                &LossFnConfig::new(),
            )
            .unwrap();
    }
    for (key, g) in whole.accumulated_grads() {
        let d = max_abs_diff(&values(g), &values(&split.accumulated_grads()[key]));
        assert!(d < 1e-5, "{key}: {d}");
    }
}

#[test]
fn gguf_models_match_their_safetensors_twins() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        let f = fixture(name);
        let (_, gguf) = load_model(
            f.dir.join("model.gguf").to_str().unwrap(),
            &Device::Cpu,
            Precision::F32,
        )
        .unwrap();
        assert_eq!(gguf.config.head_dim, f.model.config.head_dim, "{name}");
        let adapter = load_adapter(&gguf, &f.dir.join("adapter")).unwrap();
        let mut s = TrainingSession::with_adapter(
            gguf,
            "gguf",
            adapter,
            &tempfile::tempdir().unwrap().keep(),
            SamplerOptions::default(),
        );
        let out = s
            .forward(&f.datums, LossFn::CrossEntropy, &LossFnConfig::new())
            .unwrap();
        for (i, lp) in logprobs_of(&out).iter().enumerate() {
            let d = max_abs_diff(lp, &f.tensor(&format!("logprobs.adapter.{i}")));
            assert!(d < 1e-4, "{name}.gguf datum {i}: {d}");
        }
    }
}

#[test]
fn resuming_from_saved_state_is_bitwise_identical() {
    let f = fixture("tiny-llama");
    let params = AdamParams {
        learning_rate: 1e-2,
        weight_decay: 0.01,
        grad_clip_norm: 1.0,
        ..AdamParams::default()
    };
    let cfg = whet_lora::LoraConfig {
        rank: 4,
        dropout: 0.1, // the dropout stream must resume too
        seed: 5,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let step = |s: &mut TrainingSession| {
        s.forward_backward(&f.datums, LossFn::CrossEntropy, &LossFnConfig::new())
            .unwrap();
        s.optim_step(&params).unwrap();
    };
    let mut straight = TrainingSession::new(
        f.model.clone(),
        "t",
        cfg.clone(),
        dir.path(),
        SamplerOptions::default(),
    )
    .unwrap();
    step(&mut straight);
    step(&mut straight);
    let path = straight.save_state("step-2").unwrap();
    step(&mut straight);
    step(&mut straight);

    let mut resumed = TrainingSession::new(
        f.model.clone(),
        "t",
        whet_lora::LoraConfig { seed: 99, ..cfg },
        dir.path(),
        SamplerOptions::default(),
    )
    .unwrap();
    resumed.load_state_with_optimizer(&path).unwrap();
    step(&mut resumed);
    step(&mut resumed);
    for ((k, a), (_, b)) in straight
        .adapter()
        .named_vars()
        .iter()
        .zip(resumed.adapter().named_vars())
    {
        assert_eq!(
            values(a.as_tensor()),
            values(b.as_tensor()),
            "{k} differs after resume"
        );
    }
    assert_eq!(straight.optimizer(), resumed.optimizer());
}

/// `forward`'s logprobs of `tokens` following `prompt` (position i predicts token i + 1).
fn continuation_logprobs(s: &mut TrainingSession, prompt: &[i64], tokens: &[i64]) -> Vec<f32> {
    let mut all = prompt.to_vec();
    all.extend(tokens);
    let datum = Datum {
        model_input: ModelInput::from_ints(all[..all.len() - 1].to_vec()),
        loss_fn_inputs: BTreeMap::from([(
            "target_tokens".to_string(),
            whet_contract::TensorData::from_i64(all[1..].to_vec()),
        )]),
    };
    let out = s
        .forward(&[datum], LossFn::CrossEntropy, &LossFnConfig::new())
        .unwrap();
    logprobs_of(&out)[0][prompt.len() - 1..].to_vec()
}

#[test]
fn sampled_logprobs_equal_forward_logprobs() {
    for name in ["tiny-qwen3", "tiny-mistral"] {
        let f = fixture(name);
        let mut s = f.session(true);
        let sampler = s.sampling_client().unwrap();
        let prompt: Vec<i64> = vec![3, 17, 42, 9, 100, 5];
        let params = SamplingParams {
            max_tokens: Some(12),
            seed: Some(1),
            stop: Some(whet_contract::Stop::Tokens(vec![])),
            ..SamplingParams::default()
        };
        let resp = sampler
            .sample(&ModelInput::from_ints(prompt.clone()), 3, &params, true, 0)
            .unwrap();
        assert_eq!(resp.sequences.len(), 3);
        // The prompt logprobs equal compute_logprobs.
        let cl = sampler
            .compute_logprobs(&ModelInput::from_ints(prompt.clone()))
            .unwrap();
        let pl = resp.prompt_logprobs.clone().unwrap();
        assert_eq!(pl[0], None);
        for (a, b) in pl.iter().zip(&cl).skip(1) {
            assert!((a.unwrap() - b.unwrap()).abs() < 1e-4);
        }
        for seq in &resp.sequences {
            assert_eq!(seq.tokens.len(), 12);
            let lp = continuation_logprobs(&mut s, &prompt, &seq.tokens);
            let d = max_abs_diff(&lp, &seq.logprobs);
            assert!(
                d < 1e-4,
                "{name}: sampler vs forward logprobs differ by {d}"
            );
        }
        // Same seed, same samples.
        let again = sampler
            .sample(&ModelInput::from_ints(prompt.clone()), 3, &params, false, 0)
            .unwrap();
        assert_eq!(
            again
                .sequences
                .iter()
                .map(|s| &s.tokens)
                .collect::<Vec<_>>(),
            resp.sequences.iter().map(|s| &s.tokens).collect::<Vec<_>>()
        );
    }
}

fn smollm2() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{} is missing: run tools/get-smollm2.sh", p.display());
    }
    eprintln!(
        "skipping: {} is missing (run tools/get-smollm2.sh)",
        p.display()
    );
    None
}

#[test]
fn smollm2_greedy_decoding_equals_transformers() {
    let Some(path) = smollm2() else { return };
    let (_, model) = load_model(path.to_str().unwrap(), &Device::Cpu, Precision::F32).unwrap();
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2/greedy.json")).unwrap(),
    )
    .unwrap();
    let eos = fixture["eos_token_id"].as_u64().unwrap() as u32;
    let sampler = whet_engine::Sampler::new(
        model,
        None,
        SamplerOptions {
            eos_token_ids: vec![eos],
            detokenize: None,
        },
    );
    for case in fixture["cases"].as_array().unwrap() {
        let ints = |k: &str| -> Vec<i64> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        };
        let prompt = ints("prompt_tokens");
        let want = ints("greedy_tokens");
        let resp = sampler
            .sample(
                &ModelInput::from_ints(prompt),
                1,
                &SamplingParams {
                    max_tokens: Some(fixture["max_new_tokens"].as_u64().unwrap() as usize),
                    temperature: 0.0,
                    ..SamplingParams::default()
                },
                true,
                0,
            )
            .unwrap();
        let seq = &resp.sequences[0];
        assert_eq!(seq.tokens, want, "greedy tokens differ from transformers");
        let want_lp: Vec<f32> = case["greedy_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let d = max_abs_diff(&seq.logprobs, &want_lp);
        assert!(d < 1e-3, "greedy logprobs differ by {d}");
        let want_prompt = case["prompt_logprobs"].as_array().unwrap();
        for (a, b) in resp
            .prompt_logprobs
            .unwrap()
            .iter()
            .zip(want_prompt)
            .skip(1)
        {
            assert!((a.unwrap() - b.as_f64().unwrap() as f32).abs() < 1e-3);
        }
    }
}

/// Prompts of different lengths decoded as one batch (prefilled together, left-padded caches)
/// give each sequence the logprobs `forward` gives, and greedy decoding the same tokens as
/// decoding each prompt alone.
#[test]
fn batched_prompts_of_different_lengths_decode_like_single_ones() {
    for name in ["tiny-llama", "tiny-mistral"] {
        let f = fixture(name);
        let mut s = f.session(true);
        let sampler = whet_engine::Sampler::new(
            f.model.clone(),
            Some(s.adapter().sampling_weights().unwrap()),
            SamplerOptions::default(),
        );
        let prompts: Vec<Vec<i64>> =
            vec![vec![5, 9, 2], vec![7, 1, 3, 8, 60, 11, 4, 90, 12], vec![40]];
        let inputs: Vec<ModelInput> = prompts.iter().cloned().map(ModelInput::from_ints).collect();
        let params = SamplingParams {
            max_tokens: Some(10),
            seed: Some(3),
            stop: Some(whet_contract::Stop::Tokens(vec![])),
            ..SamplingParams::default()
        };
        let batch = sampler.sample_many(&inputs, 2, &params).unwrap();
        for (prompt, seqs) in prompts.iter().zip(&batch) {
            for seq in seqs {
                let lp = continuation_logprobs(&mut s, prompt, &seq.tokens);
                let d = max_abs_diff(&lp, &seq.logprobs);
                assert!(d < 1e-4, "{name}: batched sampler vs forward differ by {d}");
            }
        }
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params
        };
        let together = sampler.sample_many(&inputs, 1, &greedy).unwrap();
        for (input, seqs) in inputs.iter().zip(&together) {
            let alone = sampler.sample(input, 1, &greedy, false, 0).unwrap();
            assert_eq!(seqs[0].tokens, alone.sequences[0].tokens, "{name}");
        }
    }
}

/// With bf16 base weights the sampler's logprobs still match `forward`'s, and the model stays
/// close to its f32 self (bf16 keeps 8 mantissa bits: logprobs move by about 1e-2 here).
/// Sampler and forward use the same kernels, and each row's bf16 products do not depend on the
/// batch it is in, so most logprobs agree to the last bit; but attention sums in a different
/// order when decoding (one query over the cache) than when scoring (packed sequences), and
/// rounding to bf16 turns an f32 last-ulp difference into a one-bf16-ulp one now and then —
/// on these 64-wide random models that moves a logprob by up to a few 1e-3. Hence 5e-3 here
/// (the f32 path holds 1e-4).
#[test]
fn bf16_models_sample_what_forward_scores_and_stay_near_f32() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let exact = fixture(name);
        let f = fixture_in(name, Precision::Bf16);
        assert_eq!(f.model.precision(), Precision::Bf16);
        let scored = |fx: &Fixture| {
            let out = fx
                .session(true)
                .forward(&fx.datums, LossFn::CrossEntropy, &LossFnConfig::new())
                .unwrap();
            logprobs_of(&out).concat()
        };
        let d = max_abs_diff(&scored(&f), &scored(&exact));
        assert!(
            d > 0.0 && d < 2e-2,
            "{name}: bf16 vs f32 logprobs differ by {d}"
        );
        let mut s = f.session(true);
        let sampler = whet_engine::Sampler::new(
            f.model.clone(),
            Some(s.adapter().sampling_weights().unwrap()),
            SamplerOptions::default(),
        );
        let prompts: Vec<Vec<i64>> = vec![vec![5, 9, 2], vec![7, 1, 3, 8, 60, 11, 4, 90, 12]];
        let inputs: Vec<ModelInput> = prompts.iter().cloned().map(ModelInput::from_ints).collect();
        let params = SamplingParams {
            max_tokens: Some(10),
            seed: Some(5),
            stop: Some(whet_contract::Stop::Tokens(vec![])),
            ..SamplingParams::default()
        };
        let batch = sampler.sample_many(&inputs, 2, &params).unwrap();
        for (prompt, seqs) in prompts.iter().zip(&batch) {
            for seq in seqs {
                let lp = continuation_logprobs(&mut s, prompt, &seq.tokens);
                let d = max_abs_diff(&lp, &seq.logprobs);
                assert!(d < 5e-3, "{name}: bf16 sampler vs forward differ by {d}");
            }
        }
    }
}
