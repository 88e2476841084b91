//! Checking datums and turning them into flat per-token arrays, before any compute.

use whet_contract::{Datum, LossFn, TensorData};

use crate::config::ModelConfig;
use crate::EngineError;

/// One datum as the trainer consumes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Input tokens.
    pub tokens: Vec<u32>,
    /// The token each position predicts.
    pub targets: Vec<u32>,
    /// Per-token loss weights (1 when not given).
    pub weights: Vec<f32>,
    /// Sampler logprobs (0 when the loss does not use them).
    pub old_logprobs: Vec<f32>,
    /// Advantages (0 when the loss does not use them).
    pub advantages: Vec<f32>,
}

const KNOWN_INPUTS: [&str; 4] = ["target_tokens", "weights", "logprobs", "advantages"];

fn invalid(field: String, message: String) -> EngineError {
    EngineError::Invalid { field, message }
}

/// Checks token ids against the vocabulary and converts them.
pub fn check_tokens(tokens: &[i64], vocab: usize, field: &str) -> Result<Vec<u32>, EngineError> {
    tokens
        .iter()
        .enumerate()
        .map(|(pos, &t)| {
            if t < 0 || t as u64 >= vocab as u64 {
                Err(invalid(
                    field.to_string(),
                    format!(
                        "token id {t} at position {pos} is outside the vocabulary (0..{vocab})"
                    ),
                ))
            } else {
                Ok(t as u32)
            }
        })
        .collect()
}

fn floats(t: &TensorData, n: usize, field: &str) -> Result<Vec<f32>, EngineError> {
    if t.len() != n {
        return Err(invalid(
            field.to_string(),
            format!("has {} values but model_input has {n} tokens", t.len()),
        ));
    }
    let v = t.to_f32_vec();
    if let Some(pos) = v.iter().position(|x| !x.is_finite()) {
        return Err(invalid(
            field.to_string(),
            format!("value at position {pos} is not finite"),
        ));
    }
    Ok(v)
}

/// Validates every datum for `loss_fn` on a model and flattens it.
pub fn prepare(
    data: &[Datum],
    loss_fn: LossFn,
    config: &ModelConfig,
) -> Result<Vec<Prepared>, EngineError> {
    let vocab = config.vocab_size;
    let max_len = config.max_position_embeddings;
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            let tokens = check_tokens(
                &d.model_input.to_ints(),
                vocab,
                &format!("data[{i}].model_input"),
            )?;
            let n = tokens.len();
            if n == 0 {
                return Err(invalid(format!("data[{i}].model_input"), "is empty".into()));
            }
            if n > max_len {
                return Err(invalid(
                    format!("data[{i}].model_input"),
                    format!("has {n} tokens, more than the model's context of {max_len}"),
                ));
            }
            let inputs = &d.loss_fn_inputs;
            if let Some(k) = inputs.keys().find(|k| !KNOWN_INPUTS.contains(&k.as_str())) {
                return Err(invalid(
                    format!("data[{i}].loss_fn_inputs.{k}"),
                    format!("is not an input of any loss (known: {})", KNOWN_INPUTS.join(", ")),
                ));
            }
            let field = |k: &str| format!("data[{i}].loss_fn_inputs.{k}");
            let target = inputs
                .get("target_tokens")
                .ok_or_else(|| invalid(field("target_tokens"), "is missing".into()))?;
            if target.len() != n {
                return Err(invalid(
                    field("target_tokens"),
                    format!("has {} values but model_input has {n} tokens (position i predicts target_tokens[i])", target.len()),
                ));
            }
            let target_ids = target
                .to_i64_vec()
                .map_err(|m| invalid(field("target_tokens"), m))?;
            let targets = check_tokens(&target_ids, vocab, &field("target_tokens"))?;
            let weights = match inputs.get("weights") {
                Some(w) => floats(w, n, &field("weights"))?,
                None => vec![1.0; n],
            };
            let needed = |k: &str| -> Result<Vec<f32>, EngineError> {
                match inputs.get(k) {
                    Some(t) => floats(t, n, &field(k)),
                    None if loss_fn.required_inputs().contains(&k) => Err(invalid(
                        field(k),
                        format!("is missing (loss {} needs it)", loss_fn.name()),
                    )),
                    None => Ok(vec![0.0; n]),
                }
            };
            Ok(Prepared {
                tokens,
                targets,
                weights,
                old_logprobs: needed("logprobs")?,
                advantages: needed("advantages")?,
            })
        })
        .collect()
}
