//! Tinker's training contract: the types and the client traits.
//!
//! Training loops, jobs and the server talk to training only through [`TrainingClient`] and
//! [`SamplingClient`]. The engine implements them in process; an HTTP client implements them
//! against any Tinker-protocol server. This crate depends on serde only, so everything above
//! it builds and tests without a tensor library.

mod types;

pub use types::*;

/// Errors of the contract, shared by every implementation.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The request is malformed: `field` names what is wrong (e.g. `data[3].target_tokens`).
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// Where the problem is.
        field: String,
        /// What the problem is.
        message: String,
    },
    /// The request is well formed but asks for something this implementation does not do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// Anything else (a backend failure).
    #[error("{0}")]
    Internal(String),
}

impl ContractError {
    /// An [`ContractError::InvalidInput`] naming the field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Result alias of the contract.
pub type Result<T, E = ContractError> = std::result::Result<T, E>;

/// A LoRA training session on a base model (Tinker's `TrainingClient`).
///
/// Gradients from `forward_backward` accumulate until `optim_step`, which applies them and
/// zeroes them. Calls are executed in the order they are made.
pub trait TrainingClient: Send {
    /// Logprobs and loss without gradients.
    fn forward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        loss_fn_config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput>;

    /// Logprobs, loss, and gradients added to the accumulated ones.
    fn forward_backward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        loss_fn_config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput>;

    /// One AdamW step on the accumulated gradients, which are then zeroed.
    fn optim_step(&mut self, params: &AdamParams) -> Result<OptimStepResponse>;

    /// Saves adapter, optimizer moments and step under `name`; returns the state's path.
    fn save_state(&mut self, name: &str) -> Result<String>;

    /// Loads adapter weights from a saved state (optimizer state reset).
    fn load_state(&mut self, path: &str) -> Result<()>;

    /// Loads adapter weights, optimizer moments and step from a saved state.
    fn load_state_with_optimizer(&mut self, path: &str) -> Result<()>;

    /// Saves the adapter (PEFT format) for sampling; returns its path.
    fn save_weights_for_sampler(&mut self, name: &str) -> Result<String>;

    /// A sampler on the current weights (a snapshot: later training does not change it).
    fn sampling_client(&mut self) -> Result<Box<dyn SamplingClient>>;

    /// A sampler on the base model alone (the adapter switched off): the reference policy of a
    /// KL penalty.
    fn base_sampling_client(&mut self) -> Result<Box<dyn SamplingClient>>;

    /// What the session trains.
    fn get_info(&self) -> Result<ModelInfo>;
}

/// Sampling from a model, with or without an adapter (Tinker's `SamplingClient`).
pub trait SamplingClient: Send {
    /// `num_samples` completions of `prompt`, with per-token logprobs.
    fn sample(
        &self,
        prompt: &ModelInput,
        num_samples: usize,
        params: &SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> Result<SampleResponse>;

    /// The logprob of every prompt token given the ones before it (position 0 is `None`).
    fn compute_logprobs(&self, prompt: &ModelInput) -> Result<Vec<Option<f32>>>;

    /// One completion of each prompt (many conversations advancing by a turn at once, as
    /// episodes played in lockstep do). Not a Tinker call: this default samples the prompts one
    /// by one, prompt `i` seeded with [`each_seed`]`(params.seed, i)`; the engine decodes them
    /// as one batch with the same per-row seeds, so both give the same tokens.
    fn sample_each(
        &self,
        prompts: &[ModelInput],
        params: &SamplingParams,
    ) -> Result<Vec<SampledSequence>> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let params = SamplingParams {
                    seed: params.seed.map(|s| each_seed(s, i)),
                    ..params.clone()
                };
                self.sample(prompt, 1, &params, false, 0)?
                    .sequences
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        ContractError::Internal("the sampler returned no sequence".into())
                    })
            })
            .collect()
    }
}

/// The seed of row `i` of a batch sampled with seed `seed`: sequence `i` of one `sample` call,
/// or prompt `i` of [`SamplingClient::sample_each`]. Row 0 keeps `seed` itself.
pub fn each_seed(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datum_json_roundtrip() {
        let text = r#"{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64", "shape": [3]},
                               "weights": {"data": [0.0, 1.0, 1.0], "dtype": "float32"}}}"#;
        let d: Datum = serde_json::from_str(text).unwrap();
        assert_eq!(d.model_input.to_ints(), vec![1, 2, 3]);
        assert_eq!(
            d.loss_fn_inputs["target_tokens"].to_i64_vec().unwrap(),
            vec![2, 3, 4]
        );
        assert_eq!(
            d.loss_fn_inputs["weights"].to_f32_vec(),
            vec![0.0, 1.0, 1.0]
        );
        let again: Datum = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(d, again);
    }

    #[test]
    fn bad_shapes_and_chunks_are_refused() {
        let bad_shape = r#"{"data": [1, 2], "dtype": "int64", "shape": [3]}"#;
        assert!(serde_json::from_str::<TensorData>(bad_shape).is_err());
        let image = r#"{"chunks": [{"type": "image", "data": "x"}]}"#;
        assert!(serde_json::from_str::<ModelInput>(image).is_err());
        let float_ids = r#"{"data": [1.5], "dtype": "int64"}"#;
        assert!(serde_json::from_str::<TensorData>(float_ids).is_err());
    }

    #[test]
    fn defaults_match_tinker() {
        let p: AdamParams = serde_json::from_str("{}").unwrap();
        assert_eq!(p.learning_rate, 1e-4);
        assert_eq!(p.beta2, 0.95);
        assert_eq!(p.eps, 1e-12);
        let s: SamplingParams = serde_json::from_str(r#"{"stop": ["</s>"]}"#).unwrap();
        assert_eq!(s.stop, Some(Stop::Texts(vec!["</s>".into()])));
        assert_eq!(s.top_k, -1);
        let s: SamplingParams = serde_json::from_str(r#"{"stop": [2, 7]}"#).unwrap();
        assert_eq!(s.stop, Some(Stop::Tokens(vec![2, 7])));
    }
}
