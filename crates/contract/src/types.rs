//! Tinker's data types, with Tinker's names, JSON shapes and defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ContractError;

/// One chunk of a model input. Only tokenized text exists for text-only models; Tinker's image
/// and audio chunks are refused with a clear error when they are parsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelInputChunk {
    /// Token ids of already-rendered text.
    EncodedText {
        /// The token ids.
        tokens: Vec<i64>,
    },
}

/// A sequence of input chunks (Tinker's `ModelInput`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInput {
    /// The chunks, concatenated in order.
    pub chunks: Vec<ModelInputChunk>,
}

impl ModelInput {
    /// A model input made of one text chunk.
    pub fn from_ints(tokens: Vec<i64>) -> Self {
        Self {
            chunks: vec![ModelInputChunk::EncodedText { tokens }],
        }
    }

    /// All tokens of all chunks, in order.
    pub fn to_ints(&self) -> Vec<i64> {
        self.chunks
            .iter()
            .flat_map(|c| match c {
                ModelInputChunk::EncodedText { tokens } => tokens.iter().copied(),
            })
            .collect()
    }

    /// Number of tokens (Tinker's `length`).
    pub fn length(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| match c {
                ModelInputChunk::EncodedText { tokens } => tokens.len(),
            })
            .sum()
    }
}

/// Element type of a [`TensorData`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDtype {
    /// Signed 64-bit integers (token ids).
    Int64,
    /// 32-bit floats (weights, logprobs, advantages).
    Float32,
}

/// The values of a [`TensorData`], typed by its dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorValues {
    /// Integer values.
    Int64(Vec<i64>),
    /// Float values.
    Float32(Vec<f32>),
}

/// A flat tensor with a dtype and an optional shape (Tinker's `TensorData`).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// The values, row-major.
    pub data: TensorValues,
    /// The shape; `None` means one dimension of `data`'s length.
    pub shape: Option<Vec<usize>>,
}

impl TensorData {
    /// A 1-D float32 tensor.
    pub fn from_f32(values: Vec<f32>) -> Self {
        let n = values.len();
        Self {
            data: TensorValues::Float32(values),
            shape: Some(vec![n]),
        }
    }

    /// A 1-D int64 tensor.
    pub fn from_i64(values: Vec<i64>) -> Self {
        let n = values.len();
        Self {
            data: TensorValues::Int64(values),
            shape: Some(vec![n]),
        }
    }

    /// The dtype of the values.
    pub fn dtype(&self) -> TensorDtype {
        match self.data {
            TensorValues::Int64(_) => TensorDtype::Int64,
            TensorValues::Float32(_) => TensorDtype::Float32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            TensorValues::Int64(v) => v.len(),
            TensorValues::Float32(v) => v.len(),
        }
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (integers converted).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorValues::Int64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorValues::Float32(v) => v.clone(),
        }
    }

    /// The values as i64; float values must be integral.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, String> {
        match &self.data {
            TensorValues::Int64(v) => Ok(v.clone()),
            TensorValues::Float32(v) => v
                .iter()
                .map(|&x| {
                    if x.fract() == 0.0 && x.is_finite() {
                        Ok(x as i64)
                    } else {
                        Err(format!("value {x} is not an integer"))
                    }
                })
                .collect(),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorDataWire {
    data: Vec<serde_json::Number>,
    dtype: TensorDtype,
    #[serde(default)]
    shape: Option<Vec<usize>>,
}

impl Serialize for TensorData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let data = match &self.data {
            TensorValues::Int64(v) => v.iter().map(|&x| serde_json::Number::from(x)).collect(),
            TensorValues::Float32(v) => v
                .iter()
                .map(|&x| {
                    // Non-finite floats have no JSON form; Tinker's own clients never send them.
                    serde_json::Number::from_f64(x as f64)
                        .unwrap_or_else(|| serde_json::Number::from(0))
                })
                .collect(),
        };
        TensorDataWire {
            data,
            dtype: self.dtype(),
            shape: self.shape.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for TensorData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let wire = TensorDataWire::deserialize(d)?;
        let data = match wire.dtype {
            TensorDtype::Int64 => TensorValues::Int64(
                wire.data
                    .iter()
                    .map(|n| {
                        n.as_i64()
                            .ok_or_else(|| D::Error::custom(format!("int64 tensor holds {n}")))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            TensorDtype::Float32 => TensorValues::Float32(
                wire.data
                    .iter()
                    .map(|n| n.as_f64().map(|x| x as f32).unwrap_or(f32::NAN))
                    .collect(),
            ),
        };
        let t = TensorData {
            data,
            shape: wire.shape,
        };
        if let Some(shape) = &t.shape {
            let n: usize = shape.iter().product();
            if n != t.len() {
                return Err(D::Error::custom(format!(
                    "shape {shape:?} holds {n} values but data has {}",
                    t.len()
                )));
            }
        }
        Ok(t)
    }
}

/// One training example (Tinker's `Datum`): position *i* of `model_input` predicts
/// `loss_fn_inputs["target_tokens"][i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Datum {
    /// The input tokens.
    pub model_input: ModelInput,
    /// Named per-token inputs of the loss: `target_tokens`, `weights`, `logprobs`, `advantages`.
    #[serde(default)]
    pub loss_fn_inputs: BTreeMap<String, TensorData>,
}

/// Per-datum outputs of a loss: `logprobs` (and, for some losses, more).
pub type LossFnOutput = BTreeMap<String, TensorData>;

/// Scalar configuration of a loss (`clip_low_threshold`, `beta`, ...).
pub type LossFnConfig = BTreeMap<String, f64>;

/// The built-in losses. Every loss is a *sum* over tokens: clients normalise through weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossFn {
    /// `−Σ weights·lp`.
    CrossEntropy,
    /// `−Σ exp(lp − old)·A`.
    ImportanceSampling,
    /// `−Σ min(r·A, clip(r, lo, hi)·A)`.
    Ppo,
    /// `−Σ sg(clip(r, lo, hi))·lp·A`.
    Cispo,
    /// `−Σ (lp·A − ½β(lp − old)²)`.
    Dro,
}

impl LossFn {
    /// Tinker's name of the loss.
    pub fn name(self) -> &'static str {
        match self {
            LossFn::CrossEntropy => "cross_entropy",
            LossFn::ImportanceSampling => "importance_sampling",
            LossFn::Ppo => "ppo",
            LossFn::Cispo => "cispo",
            LossFn::Dro => "dro",
        }
    }

    /// Parses Tinker's name of a loss.
    pub fn parse(name: &str) -> Result<Self, ContractError> {
        Ok(match name {
            "cross_entropy" => LossFn::CrossEntropy,
            "importance_sampling" => LossFn::ImportanceSampling,
            "ppo" => LossFn::Ppo,
            "cispo" => LossFn::Cispo,
            "dro" => LossFn::Dro,
            other => {
                return Err(ContractError::invalid(
                    "loss_fn",
                    format!(
                        "unknown loss '{other}' (expected cross_entropy, importance_sampling, ppo, cispo or dro)"
                    ),
                ))
            }
        })
    }

    /// The `loss_fn_inputs` the loss needs besides `target_tokens`.
    pub fn required_inputs(self) -> &'static [&'static str] {
        match self {
            LossFn::CrossEntropy => &[],
            _ => &["logprobs", "advantages"],
        }
    }
}

/// Result of `forward` / `forward_backward`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardBackwardOutput {
    /// The record type of `loss_fn_outputs` (Tinker answers `"ArrayRecord"`).
    pub loss_fn_output_type: String,
    /// Per datum, in input order: at least `logprobs` (float32, one per target position).
    pub loss_fn_outputs: Vec<LossFnOutput>,
    /// Metrics keyed `name:reduction` (`loss:sum`, ...).
    pub metrics: BTreeMap<String, f64>,
}

/// Hyper-parameters of one AdamW step (Tinker's `AdamParams`, with its defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamParams {
    /// Learning rate.
    pub learning_rate: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (as `torch.optim.AdamW`).
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip_norm: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        Self {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.0,
            grad_clip_norm: 0.0,
        }
    }
}

/// Result of `optim_step`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimStepResponse {
    /// Metrics keyed `name:reduction` (`grad_norm:mean`, ...).
    pub metrics: BTreeMap<String, f64>,
}

/// Stop condition of sampling: `None` stops at EOS; an empty list disables every stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    Text(String),
    /// Token ids that end a sequence (included in the output).
    Tokens(Vec<i64>),
    /// Stop strings (the output is cut after the first occurrence).
    Texts(Vec<String>),
}

/// Sampling parameters (Tinker's `SamplingParams`, with its defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Maximum new tokens; `None` means up to the context length.
    pub max_tokens: Option<usize>,
    /// Seed of the sampler's random stream.
    pub seed: Option<u64>,
    /// Stop strings or tokens.
    pub stop: Option<Stop>,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens; -1 keeps all.
    pub top_k: i64,
    /// Nucleus sampling mass; 1 keeps all.
    pub top_p: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: None,
            seed: None,
            stop: None,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
        }
    }
}

/// Why a sampled sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token or string (or EOS) ended it.
    Stop,
    /// `max_tokens` or the context length ended it.
    Length,
}

/// One sampled sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledSequence {
    /// Why it ended.
    pub stop_reason: StopReason,
    /// The new tokens.
    pub tokens: Vec<i64>,
    /// The logprob of each new token under the sampled model (before temperature/top-k/top-p).
    pub logprobs: Vec<f32>,
}

/// The `k` most likely `(token, logprob)` pairs at each prompt position (`None` at 0).
pub type TopkLogprobs = Vec<Option<Vec<(i64, f32)>>>;

/// Result of `sample`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleResponse {
    /// `num_samples` sequences.
    pub sequences: Vec<SampledSequence>,
    /// Prompt logprobs when asked for (position 0 is `None`).
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Top-k prompt logprobs when asked for: per position `(token, logprob)` pairs.
    pub topk_prompt_logprobs: Option<TopkLogprobs>,
}

/// Tinker's `LoraConfig` for `create_lora_training_client`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// LoRA rank.
    pub rank: usize,
    /// Seed of the adapter's initialisation.
    pub seed: Option<u64>,
    /// LoRA on the unembedding (not supported: serving stacks cannot load it).
    pub train_unembed: bool,
    /// LoRA on gate/up/down.
    pub train_mlp: bool,
    /// LoRA on q/k/v/o.
    pub train_attn: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 32,
            seed: None,
            train_unembed: false,
            train_mlp: true,
            train_attn: true,
        }
    }
}

/// What a training client reports about itself (Tinker's `get_info`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Base model name.
    pub model_name: String,
    /// LoRA rank.
    pub lora_rank: usize,
    /// Where the tokenizer can be loaded from.
    pub tokenizer_id: String,
    /// Maximum sequence length.
    pub max_context_length: usize,
}
