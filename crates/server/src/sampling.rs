//! Sampling endpoints: `create_sampling_session`, `GET samplers/{id}`, `asample`.
//!
//! A sampler is named `{session}:sample:{n}` (the SDK's counter). One on a saved adapter is
//! made on the worker when first used; a snapshot of a training client is made by
//! `save_weights_for_sampler` (see [`crate::training`]). `asample` answers one
//! `sample_sequence_ids` entry per sample: the SDK asserts their number.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use whet_contract::{ModelInput, SamplingParams};
use whet_jobs::checkpoints::TinkerPath;

use crate::error::ApiError;
use crate::state::{parse, State};
use crate::worker::Work;

#[derive(Deserialize)]
struct CreateSamplingSession {
    session_id: String,
    sampling_session_seq_id: i64,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    model_path: Option<String>,
}

/// `POST /api/v1/create_sampling_session`: a sampler on a base model or a saved adapter.
pub async fn create_sampling_session(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: CreateSamplingSession = parse(&body)?;
    let sampler_id = format!("{}:sample:{}", req.session_id, req.sampling_session_seq_id);
    let (base_model, adapter) = match (&req.model_path, &req.base_model) {
        (Some(path), _) => {
            // Sampler weights, or a training state (its directory holds the PEFT adapter too).
            let p = TinkerPath::parse(path).map_err(|e| ApiError::bad("model_path", e))?;
            let record = state.checkpoints.get(&p)?;
            if record.owner.as_deref().is_some_and(|o| o != owner) {
                return Err(ApiError::forbidden(format!(
                    "{path} belongs to another API key"
                )));
            }
            let run = state.checkpoints.run(&p.run_id)?;
            (run.base_model, Some(state.checkpoints.dir(&p)))
        }
        (None, Some(base)) => (base.clone(), None),
        (None, None) => {
            return Err(ApiError::bad(
                "base_model",
                "either base_model or model_path is required",
            ))
        }
    };
    state.model("base_model", &base_model)?;
    state.add_sampler(
        &owner,
        &req.session_id,
        &sampler_id,
        &base_model,
        req.model_path.clone(),
    )?;
    state.send(Work::OpenSampler {
        sampler_id: sampler_id.clone(),
        base_model,
        adapter,
    })?;
    Ok(Json(
        json!({"sampling_session_id": sampler_id, "type": "create_sampling_session"}),
    ))
}

/// `GET /api/v1/samplers/{id}`: its base model (the SDK loads its tokenizer from it).
pub async fn get_sampler(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(sampler_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let (base_model, model_path) = state.sampler_info(&owner, &sampler_id)?;
    let mut v = json!({"sampler_id": sampler_id, "base_model": base_model});
    if let Some(p) = model_path {
        v["model_path"] = json!(p);
    }
    Ok(Json(v))
}

#[derive(Deserialize)]
struct SampleRequest {
    #[serde(default)]
    sampling_session_id: Option<String>,
    #[serde(default)]
    seq_id: Option<i64>,
    #[serde(default = "one")]
    num_samples: usize,
    prompt: Value,
    #[serde(default)]
    sampling_params: Option<Value>,
    #[serde(default)]
    prompt_logprobs: bool,
    #[serde(default)]
    topk_prompt_logprobs: usize,
    #[serde(default)]
    topk_sample_logprobs: usize,
    #[serde(default)]
    prompt_alt_tokens_k: usize,
    #[serde(default)]
    target_prompt_logprobs: Option<Value>,
    #[serde(default)]
    prompt_logprobs_last_n: Option<usize>,
}

fn one() -> usize {
    1
}

/// Most sequences one request may ask for.
const MAX_SAMPLES: usize = 1024;

/// `POST /api/v1/asample`: queues a sampling request; the result is a `SampleResponse`.
pub async fn asample(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: SampleRequest = parse(&body)?;
    let sampler_id = req.sampling_session_id.clone().ok_or_else(|| {
        ApiError::bad(
            "sampling_session_id",
            "required (create a sampling client first)",
        )
    })?;
    let seq_id = req
        .seq_id
        .ok_or_else(|| ApiError::bad("seq_id", "required"))?;
    let prompt: ModelInput =
        serde_json::from_value(req.prompt).map_err(|e| ApiError::bad("prompt", e))?;
    let params: SamplingParams = serde_json::from_value(req.sampling_params.unwrap_or(json!({})))
        .map_err(|e| ApiError::bad("sampling_params", e))?;
    if req.num_samples == 0 || req.num_samples > MAX_SAMPLES {
        return Err(ApiError::bad(
            "num_samples",
            format!("{} is not in 1..={MAX_SAMPLES}", req.num_samples),
        ));
    }
    for (field, k) in [
        ("topk_sample_logprobs", req.topk_sample_logprobs),
        ("prompt_alt_tokens_k", req.prompt_alt_tokens_k),
    ] {
        if k > 0 {
            return Err(ApiError::bad(field, "not supported by whet serve (use 0)"));
        }
    }
    if req.target_prompt_logprobs.is_some() {
        return Err(ApiError::bad(
            "target_prompt_logprobs",
            "not supported by whet serve",
        ));
    }
    if req.prompt_logprobs_last_n.is_some() && !req.prompt_logprobs {
        return Err(ApiError::bad(
            "prompt_logprobs_last_n",
            "needs prompt_logprobs: true",
        ));
    }
    let (base_model, _) = state.sampler_info(&owner, &sampler_id)?;
    let model = state.model("base_model", &base_model)?;
    let tokens = prompt.to_ints();
    if tokens.is_empty() {
        return Err(ApiError::bad("prompt", "no tokens"));
    }
    if tokens.len() >= model.max_context_length {
        return Err(ApiError::bad(
            "prompt",
            format!(
                "{} tokens leaves no room in {}'s context of {}",
                tokens.len(),
                model.name,
                model.max_context_length
            ),
        ));
    }
    let vocab = model.vocab_size as i64;
    if let Some((j, t)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t < 0 || t >= vocab)
    {
        return Err(ApiError::bad(
            &format!("prompt.tokens[{j}]"),
            format!(
                "token id {t} is outside {}'s vocabulary (0..{vocab})",
                model.name
            ),
        ));
    }
    let (request_id, new) = state.sample_future(&owner, &sampler_id, seq_id)?;
    if new {
        let topk = if req.prompt_logprobs {
            req.topk_prompt_logprobs
        } else {
            0
        };
        state.send(Work::Sample {
            request_id: request_id.clone(),
            sampler_id,
            prompt,
            num_samples: req.num_samples,
            params,
            prompt_logprobs: req.prompt_logprobs || req.topk_prompt_logprobs > 0,
            topk: req.topk_prompt_logprobs.max(topk),
            last_n: req.prompt_logprobs_last_n,
        })?;
    }
    let ids: Vec<String> = (0..req.num_samples)
        .map(|i| format!("{request_id}:{i}"))
        .collect();
    Ok(Json(
        json!({"request_id": request_id, "sample_sequence_ids": ids}),
    ))
}
