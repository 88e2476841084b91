//! What the engine's integration tests share: the fixtures `tools/make_fixtures.py` builds
//! (tiny random models, PEFT adapters, datums, torch's numbers) and small helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::Value;
use whet_contract::{Datum, LossFn, LossFnConfig, ModelInput, TrainingClient};
use whet_engine::{load_adapter, load_model, Model, Precision, SamplerOptions, TrainingSession};

/// `tests/fixtures/` of the repository, or `$WHET_FIXTURES`: where a test binary built
/// elsewhere finds them (the build's path is baked in; benches/gpu/device-check.sh runs the
/// CUDA tests on a machine without a toolchain).
pub fn fixtures() -> PathBuf {
    std::env::var_os("WHET_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// A tiny model with its PEFT adapter, datums and what torch computed on them.
pub struct Fixture {
    /// Its directory.
    pub dir: PathBuf,
    /// The model.
    pub model: Arc<Model>,
    /// `datums.jsonl`.
    pub datums: Vec<Datum>,
    /// `expected.safetensors`: torch's tensors.
    pub expected: HashMap<String, Tensor>,
    /// `expected.json`: torch's scalars and configs.
    pub meta: Value,
}

/// The fixture `name`, f32.
pub fn fixture(name: &str) -> Fixture {
    fixture_in(name, Precision::F32)
}

/// The fixture `name` at `precision`.
pub fn fixture_in(name: &str, precision: Precision) -> Fixture {
    fixture_on(name, &Device::Cpu, precision)
}

/// The fixture `name` with its model on `dev` at `precision` (torch's numbers stay on the CPU).
pub fn fixture_on(name: &str, dev: &Device, precision: Precision) -> Fixture {
    let dir = fixtures().join(name);
    let (_, model) = load_model(dir.to_str().unwrap(), dev, precision).unwrap();
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
    /// A training session on the fixture model: with the fixture's PEFT adapter, or a fresh
    /// one (B = 0, the bare model).
    pub fn session(&self, with_adapter: bool) -> TrainingSession {
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

    /// The loss config torch used for `loss`.
    pub fn loss_config(&self, loss: &str) -> LossFnConfig {
        self.meta["loss_fn_config"][loss]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
            .collect()
    }

    /// An expected tensor, flattened.
    pub fn tensor(&self, key: &str) -> Vec<f32> {
        self.expected
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no {key}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

/// A tensor's values, flattened.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The largest elementwise difference of two equally long lists.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Per datum, the `logprobs` output of a forward pass.
pub fn logprobs_of(out: &whet_contract::ForwardBackwardOutput) -> Vec<Vec<f32>> {
    out.loss_fn_outputs
        .iter()
        .map(|o| o["logprobs"].to_f32_vec())
        .collect()
}

/// Per datum, the logprobs of a forward pass with the fixture's adapter.
pub fn scored(f: &Fixture) -> Vec<Vec<f32>> {
    let out = f
        .session(true)
        .forward(&f.datums, LossFn::CrossEntropy, &LossFnConfig::new())
        .unwrap();
    logprobs_of(&out)
}

/// `forward`'s logprobs of `tokens` following `prompt` (position i predicts token i + 1).
pub fn continuation_logprobs(s: &mut TrainingSession, prompt: &[i64], tokens: &[i64]) -> Vec<f32> {
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
