//! A LoRA training session: Tinker's `TrainingClient` in process.
//!
//! `forward_backward` runs the datums in micro-batches bounded by a token budget (packed, no
//! padding), adds each micro-batch's LoRA gradients to the accumulated ones, and returns
//! per-datum logprobs. Because every loss is a sum over tokens, splitting into micro-batches
//! gives the same gradient as one big batch. `optim_step` applies AdamW and zeroes the sums.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use whet_contract::{
    AdamParams, ContractError, Datum, ForwardBackwardOutput, LossFn, LossFnConfig, ModelInfo,
    OptimStepResponse, SamplingClient, TensorData, TrainingClient,
};
use whet_lora::{peft, state, AdamW, LoraAdapter, LoraConfig};

use crate::batch::{prepare, Prepared};
use crate::losses::Loss;
use crate::model::{DropoutRng, Layout, Model};
use crate::sampler::{Sampler, SamplerOptions};
use crate::EngineError;

/// Default tokens per micro-batch: bounds activation memory (about 2 MB per token for a
/// 135M model with composite ops) while keeping GEMMs large.
pub const DEFAULT_TOKEN_BUDGET: usize = 1024;

/// A LoRA adapter being trained on a shared base model.
pub struct TrainingSession {
    model: Arc<Model>,
    base_name: String,
    adapter: LoraAdapter,
    optimizer: AdamW,
    grads: BTreeMap<String, Tensor>,
    dropout: DropoutRng,
    checkpoint_dir: PathBuf,
    token_budget: usize,
    sampler_options: SamplerOptions,
}

impl TrainingSession {
    /// A fresh adapter (PEFT's initialisation) on `model`; checkpoints go under
    /// `checkpoint_dir` (`weights/<name>` for states, `sampler_weights/<name>` for adapters).
    pub fn new(
        model: Arc<Model>,
        base_name: &str,
        config: LoraConfig,
        checkpoint_dir: &Path,
        sampler_options: SamplerOptions,
    ) -> Result<Self, EngineError> {
        let adapter = LoraAdapter::init(config, &model.site_shapes(), model.device())?;
        Ok(Self::with_adapter(
            model,
            base_name,
            adapter,
            checkpoint_dir,
            sampler_options,
        ))
    }

    /// A session continuing an existing adapter (e.g. one loaded from a PEFT directory).
    pub fn with_adapter(
        model: Arc<Model>,
        base_name: &str,
        adapter: LoraAdapter,
        checkpoint_dir: &Path,
        sampler_options: SamplerOptions,
    ) -> Self {
        let seed = adapter.config().seed;
        Self {
            model,
            base_name: base_name.to_string(),
            adapter,
            optimizer: AdamW::new(),
            grads: BTreeMap::new(),
            dropout: DropoutRng { seed, counter: 0 },
            checkpoint_dir: checkpoint_dir.to_path_buf(),
            token_budget: DEFAULT_TOKEN_BUDGET,
            sampler_options,
        }
    }

    /// Sets the micro-batch token budget (a datum longer than it runs alone).
    pub fn set_token_budget(&mut self, tokens: usize) {
        self.token_budget = tokens.max(1);
    }

    /// The adapter being trained.
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// The optimizer state.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The accumulated gradients, keyed by PEFT name.
    pub fn accumulated_grads(&self) -> &BTreeMap<String, Tensor> {
        &self.grads
    }

    fn run(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        config: &LossFnConfig,
        backward: bool,
    ) -> Result<ForwardBackwardOutput, EngineError> {
        let loss = Loss::new(loss_fn, config)?;
        // Every datum is checked before any compute.
        let prepared = prepare(data, loss_fn, &self.model.config)?;
        let weights = if backward {
            self.adapter.training_weights()
        } else {
            self.adapter.sampling_weights()?
        };
        let device = self.model.device().clone();
        let mut logprobs: Vec<Vec<f32>> = Vec::with_capacity(prepared.len());
        let mut loss_sum = 0f64;
        for group in micro_batches(&prepared, self.token_budget) {
            let lens: Vec<usize> = group.iter().map(|p| p.tokens.len()).collect();
            let cat = |f: &dyn Fn(&Prepared) -> &[f32]| -> Result<Tensor, EngineError> {
                let v: Vec<f32> = group.iter().flat_map(|p| f(p).iter().copied()).collect();
                Ok(Tensor::from_vec(v, lens.iter().sum::<usize>(), &device)?)
            };
            let tokens: Vec<u32> = group
                .iter()
                .flat_map(|p| p.tokens.iter().copied())
                .collect();
            let targets: Vec<u32> = group
                .iter()
                .flat_map(|p| p.targets.iter().copied())
                .collect();
            let dropout = if backward {
                Some(&mut self.dropout)
            } else {
                None
            };
            let hidden = self.model.forward_hidden(
                &tokens,
                Layout::Packed(&lens),
                Some(&weights),
                dropout,
            )?;
            let lp = self.model.target_logprobs(&hidden, &targets)?;
            let total = loss.sum(
                &lp,
                &cat(&|p| &p.weights)?,
                &cat(&|p| &p.old_logprobs)?,
                &cat(&|p| &p.advantages)?,
            )?;
            loss_sum += total.to_scalar::<f32>()? as f64;
            if backward {
                let mut grads = total.backward()?;
                for (key, var) in self.adapter.named_vars() {
                    if let Some(g) = grads.remove(var.as_tensor()) {
                        let sum = match self.grads.remove(&key) {
                            Some(acc) => (acc + g)?,
                            None => g,
                        };
                        self.grads.insert(key, sum);
                    }
                }
            }
            let lp: Vec<f32> = lp.to_vec1()?;
            let mut start = 0;
            for len in lens {
                logprobs.push(lp[start..start + len].to_vec());
                start += len;
            }
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("loss:sum".to_string(), loss_sum);
        Ok(ForwardBackwardOutput {
            loss_fn_output_type: "ArrayRecord".into(),
            loss_fn_outputs: logprobs
                .into_iter()
                .map(|lp| BTreeMap::from([("logprobs".to_string(), TensorData::from_f32(lp))]))
                .collect(),
            metrics,
        })
    }

    fn state_dir(&self, name: &str) -> Result<PathBuf, EngineError> {
        check_name(name)?;
        Ok(self.checkpoint_dir.join("weights").join(name))
    }

    fn load(&mut self, path: &str, with_optimizer: bool) -> Result<(), EngineError> {
        let st = state::load_state(
            Path::new(path),
            &self.model.site_shapes(),
            self.model.device(),
        )?;
        self.adapter = st.adapter;
        self.grads.clear();
        self.dropout = DropoutRng {
            seed: self.adapter.config().seed,
            counter: 0,
        };
        if with_optimizer {
            self.optimizer = st.optimizer;
            self.dropout.counter = st.manifest.trainer["dropout_counter"].as_u64().unwrap_or(0);
        } else {
            self.optimizer = AdamW::new();
        }
        Ok(())
    }
}

/// Checkpoint names become directory names: no separators, no dot-names.
fn check_name(name: &str) -> Result<(), EngineError> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err(EngineError::Invalid {
            field: "name".into(),
            message: format!("'{name}' is not a valid checkpoint name (no slashes, not empty, not starting with '.')"),
        });
    }
    Ok(())
}

/// Consecutive datums grouped while their tokens fit the budget.
fn micro_batches(prepared: &[Prepared], budget: usize) -> Vec<&[Prepared]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    for (i, p) in prepared.iter().enumerate() {
        if i > start && tokens + p.tokens.len() > budget {
            out.push(&prepared[start..i]);
            start = i;
            tokens = 0;
        }
        tokens += p.tokens.len();
    }
    if start < prepared.len() {
        out.push(&prepared[start..]);
    }
    out
}

impl TrainingClient for TrainingSession {
    fn forward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        loss_fn_config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        Ok(crate::in_pool(|| {
            self.run(data, loss_fn, loss_fn_config, false)
        })?)
    }

    fn forward_backward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        loss_fn_config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        Ok(crate::in_pool(|| {
            self.run(data, loss_fn, loss_fn_config, true)
        })?)
    }

    fn optim_step(&mut self, params: &AdamParams) -> Result<OptimStepResponse, ContractError> {
        let report = self
            .optimizer
            .step(&self.adapter, &self.grads, params)
            .map_err(EngineError::from)?;
        self.grads.clear();
        let mut metrics = BTreeMap::new();
        metrics.insert("grad_norm:mean".to_string(), report.grad_norm);
        metrics.insert("learning_rate:mean".to_string(), params.learning_rate);
        Ok(OptimStepResponse { metrics })
    }

    fn save_state(&mut self, name: &str) -> Result<String, ContractError> {
        let dir = self.state_dir(name)?;
        state::save_state(
            &dir,
            &self.base_name,
            &self.adapter,
            &self.optimizer,
            serde_json::json!({"dropout_counter": self.dropout.counter}),
        )
        .map_err(EngineError::from)?;
        Ok(dir.display().to_string())
    }

    fn load_state(&mut self, path: &str) -> Result<(), ContractError> {
        Ok(self.load(path, false)?)
    }

    fn load_state_with_optimizer(&mut self, path: &str) -> Result<(), ContractError> {
        Ok(self.load(path, true)?)
    }

    fn save_weights_for_sampler(&mut self, name: &str) -> Result<String, ContractError> {
        check_name(name)?;
        let dir = self.checkpoint_dir.join("sampler_weights").join(name);
        peft::save_peft_adapter(&self.adapter, &self.base_name, &dir).map_err(EngineError::from)?;
        Ok(dir.display().to_string())
    }

    fn sampling_client(&mut self) -> Result<Box<dyn SamplingClient>, ContractError> {
        let weights = self.adapter.sampling_weights().map_err(EngineError::from)?;
        Ok(Box::new(Sampler::new(
            self.model.clone(),
            Some(weights),
            self.sampler_options.clone(),
        )))
    }

    fn base_sampling_client(&mut self) -> Result<Box<dyn SamplingClient>, ContractError> {
        Ok(Box::new(Sampler::new(
            self.model.clone(),
            None,
            self.sampler_options.clone(),
        )))
    }

    fn get_info(&self) -> Result<ModelInfo, ContractError> {
        Ok(ModelInfo {
            model_name: self.base_name.clone(),
            lora_rank: self.adapter.config().rank,
            tokenizer_id: self.base_name.clone(),
            max_context_length: self.model.config.max_position_embeddings,
        })
    }
}
