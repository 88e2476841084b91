//! Training endpoints: `create_model`, `get_info`, `forward_backward` (protobuf), `optim_step`
//! (the weights endpoints are in [`crate::weights`]).
//!
//! Each handler checks the whole request (model, loss, tokens against the vocabulary, lengths
//! against the context) and answers 400 naming the field before anything is queued; what it
//! queues can then only fail inside the engine.

use std::io::Read;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use whet_contract::{AdamParams, Datum, LoraConfig, LossFn};
use whet_jobs::checkpoints::RunRecord;

use crate::error::ApiError;
use crate::state::{parse, State};
use crate::worker::{TrainOp, Work};
use crate::ServedModel;

pub(crate) fn future(request_id: String, model_id: &str) -> Json<Value> {
    Json(json!({"request_id": request_id, "model_id": model_id}))
}

#[derive(Deserialize)]
struct WireLora {
    #[serde(default = "default_rank")]
    rank: usize,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default = "yes")]
    train_unembed: bool,
    #[serde(default = "yes")]
    train_mlp: bool,
    #[serde(default = "yes")]
    train_attn: bool,
}

fn default_rank() -> usize {
    32
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct CreateModel {
    session_id: String,
    model_seq_id: i64,
    base_model: String,
    #[serde(default)]
    lora_config: Option<WireLora>,
    #[serde(default)]
    optimizer_config: Option<Value>,
    #[serde(default)]
    user_metadata: Option<Value>,
}

pub(crate) fn check_optimizer(config: &Option<Value>) -> Result<(), ApiError> {
    match config.as_ref().and_then(|c| c["type"].as_str()) {
        None | Some("adamw") => Ok(()),
        Some(other) => Err(ApiError::bad(
            "optimizer_config.type",
            format!("{other:?} is not supported (whet trains with adamw)"),
        )),
    }
}

/// The contract's LoRA settings from the wire's. `train_unembed` (the SDK's default is true)
/// is accepted and not applied: whet trains no LoRA on the unembedding, because PEFT-loading
/// servers such as vLLM cannot load one; `get_info` and `weights_info` report it as false.
fn lora_config(wire: Option<WireLora>) -> Result<LoraConfig, ApiError> {
    let w = wire.unwrap_or(WireLora {
        rank: default_rank(),
        seed: None,
        train_unembed: true,
        train_mlp: true,
        train_attn: true,
    });
    if w.rank == 0 || w.rank > 1024 {
        return Err(ApiError::bad(
            "lora_config.rank",
            format!("{} is not in 1..=1024", w.rank),
        ));
    }
    if !w.train_mlp && !w.train_attn {
        return Err(ApiError::bad(
            "lora_config",
            "train_mlp and train_attn are both false: whet trains LoRA on the attention and/or MLP projections",
        ));
    }
    if w.train_unembed {
        tracing::info!("lora_config.train_unembed = true: no LoRA on the unembedding (whet trains attention/MLP only)");
    }
    Ok(LoraConfig {
        rank: w.rank,
        seed: w.seed,
        train_unembed: false,
        train_mlp: w.train_mlp,
        train_attn: w.train_attn,
    })
}

pub(crate) fn run_record(
    run_id: &str,
    base_model: &str,
    lora: &LoraConfig,
    owner: &str,
    user_metadata: Option<Value>,
) -> RunRecord {
    RunRecord {
        training_run_id: run_id.to_string(),
        base_model: base_model.to_string(),
        lora_rank: lora.rank,
        train_attn: lora.train_attn,
        train_mlp: lora.train_mlp,
        train_unembed: false,
        owner: Some(owner.to_string()),
        created_at: whet_jobs::now_rfc3339(),
        user_metadata,
    }
}

/// `POST /api/v1/create_model`: a LoRA training client on a served base model.
pub async fn create_model(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: CreateModel = parse(&body)?;
    state.model("base_model", &req.base_model)?;
    check_optimizer(&req.optimizer_config)?;
    let lora = lora_config(req.lora_config)?;
    let run_id = format!("{}:train:{}", req.session_id, req.model_seq_id);
    state.add_run(
        &owner,
        &req.session_id,
        &run_id,
        &req.base_model,
        lora.clone(),
        1,
    )?;
    let request_id = state.futures.create(&owner);
    state.send(Work::Create {
        request_id: request_id.clone(),
        run: run_record(&run_id, &req.base_model, &lora, &owner, req.user_metadata),
        lora,
        load: None,
    })?;
    tracing::info!(
        "{run_id}: LoRA rank {} on {}",
        lora_rank_of(&state, &owner, &run_id),
        req.base_model
    );
    Ok(future(request_id, &run_id))
}

fn lora_rank_of(state: &State, owner: &str, run_id: &str) -> usize {
    state
        .run_info(owner, run_id)
        .map(|(_, l)| l.rank)
        .unwrap_or(0)
}

#[derive(Deserialize)]
struct ModelId {
    model_id: String,
}

/// `POST /api/v1/get_info`: what a training client trains, and where its tokenizer is.
pub async fn get_info(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: ModelId = parse(&body)?;
    let (base_model, lora) = state.run_info(&owner, &req.model_id)?;
    let model = state.model("base_model", &base_model)?;
    // The SDK cuts tokenizer_id at the first ':' and hands it to AutoTokenizer.from_pretrained:
    // a local directory works offline; without one, the model's name (a hub id) is the guess.
    let tokenizer_id = model
        .tokenizer_dir
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| base_model.clone());
    Ok(Json(json!({
        "model_id": req.model_id,
        "model_data": {"arch": "llama", "model_name": base_model, "tokenizer_id": tokenizer_id},
        "is_lora": true,
        "lora_rank": lora.rank,
        "optimizer_config": {"type": "adamw"},
        "type": "get_info",
    })))
}

fn loss_fn(name: &str) -> Result<LossFn, ApiError> {
    match name {
        "gspo" | "stable_reinforce" | "custom" => Err(ApiError::bad(
            "loss_fn",
            format!("{name} is not supported by whet (supported: cross_entropy, importance_sampling, ppo, cispo, dro; client-side custom losses work through forward_backward_custom)"),
        )),
        other => LossFn::parse(other).map_err(ApiError::from),
    }
}

/// Token ids below the vocabulary, sequences within the context.
fn check_datums(data: &[Datum], model: &ServedModel) -> Result<(), ApiError> {
    if data.is_empty() {
        return Err(ApiError::bad("data", "no datums"));
    }
    let vocab = model.vocab_size as i64;
    for (i, d) in data.iter().enumerate() {
        let tokens = d.model_input.to_ints();
        if tokens.len() > model.max_context_length {
            return Err(ApiError::bad(
                &format!("data[{i}].model_input"),
                format!(
                    "{} tokens is longer than {}'s context of {}",
                    tokens.len(),
                    model.name,
                    model.max_context_length
                ),
            ));
        }
        if let Some((j, t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0 || t >= vocab)
        {
            return Err(ApiError::bad(
                &format!("data[{i}].model_input.tokens[{j}]"),
                format!(
                    "token id {t} is outside {}'s vocabulary (0..{vocab})",
                    model.name
                ),
            ));
        }
        if let Some(targets) = d.loss_fn_inputs.get("target_tokens") {
            let targets = targets.to_i64_vec().map_err(|e| {
                ApiError::bad(&format!("data[{i}].loss_fn_inputs.target_tokens"), e)
            })?;
            if let Some((j, t)) = targets
                .iter()
                .enumerate()
                .find(|(_, &t)| t < 0 || t >= vocab)
            {
                return Err(ApiError::bad(
                    &format!("data[{i}].loss_fn_inputs.target_tokens[{j}]"),
                    format!(
                        "token id {t} is outside {}'s vocabulary (0..{vocab})",
                        model.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The body, inflated when `Content-Encoding: zstd` (the SDK's `proto_compress_fwdbwd`).
fn decompressed(headers: &HeaderMap, body: Bytes) -> Result<Bytes, ApiError> {
    let zstd = headers
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("zstd"));
    if !zstd {
        return Ok(body);
    }
    let mut out = Vec::new();
    ruzstd::decoding::StreamingDecoder::new(&body[..])
        .map_err(|e| ApiError::bad("body", format!("not zstd: {e}")))?
        .read_to_end(&mut out)
        .map_err(|e| ApiError::bad("body", format!("broken zstd stream: {e}")))?;
    Ok(Bytes::from(out))
}

/// `POST /api/v1/forward_backward`: a protobuf `ForwardBackwardRequest` (zstd accepted).
pub async fn forward_backward(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let body = decompressed(&headers, body)?;
    let req = crate::proto::decode_train_request(&body)?;
    let (base_model, _) = state.run_info(&owner, &req.model_id)?;
    let op = loss_fn(&req.loss_fn).and_then(|loss| {
        check_datums(&req.data, state.model("base_model", &base_model)?)?;
        Ok(TrainOp::Forward {
            data: req.data,
            loss_fn: loss,
            config: req.loss_fn_config,
            backward: !req.forward_only,
        })
    });
    let id = state.submit_train(&owner, &req.model_id, Some(req.seq_id), op)?;
    Ok(future(id, &req.model_id))
}

#[derive(Deserialize)]
struct OptimStep {
    model_id: String,
    #[serde(default)]
    seq_id: Option<i64>,
    #[serde(default)]
    adam_params: Option<Value>,
    #[serde(default)]
    optimizer_params: Option<Value>,
}

/// `POST /api/v1/optim_step`: AdamW on the accumulated gradients.
pub async fn optim_step(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: OptimStep = parse(&body)?;
    let op = (|| {
        if req.optimizer_params.is_some() && req.adam_params.is_none() {
            return Err(ApiError::bad(
                "optimizer_params",
                "only adam_params is supported (whet trains with AdamW)",
            ));
        }
        let params: AdamParams = serde_json::from_value(req.adam_params.unwrap_or(json!({})))
            .map_err(|e| ApiError::bad("adam_params", e))?;
        if !(params.learning_rate.is_finite() && params.learning_rate >= 0.0) {
            return Err(ApiError::bad(
                "adam_params.learning_rate",
                format!(
                    "{} is not a finite, non-negative number",
                    params.learning_rate
                ),
            ));
        }
        Ok(TrainOp::Optim(params))
    })();
    let id = state.submit_train(&owner, &req.model_id, req.seq_id, op)?;
    Ok(future(id, &req.model_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_bodies_are_inflated_and_broken_ones_named() {
        let plain = b"a ForwardBackwardRequest, repeated ".repeat(50);
        let mut packed = Vec::new();
        ruzstd::encoding::compress(
            &plain[..],
            &mut packed,
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut headers = HeaderMap::new();
        assert_eq!(
            decompressed(&headers, Bytes::from(packed.clone())).unwrap(),
            Bytes::from(packed.clone())
        );
        headers.insert(
            axum::http::header::CONTENT_ENCODING,
            "zstd".parse().unwrap(),
        );
        assert_eq!(
            decompressed(&headers, Bytes::from(packed)).unwrap(),
            Bytes::from(plain)
        );
        let err = decompressed(&headers, Bytes::from_static(b"not zstd")).unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.message.starts_with("body:"), "{}", err.message);
    }

    #[test]
    fn the_sdk_default_lora_is_accepted_without_the_unembedding() {
        let l = lora_config(None).unwrap();
        assert_eq!(
            (l.rank, l.train_unembed, l.train_mlp, l.train_attn),
            (32, false, true, true)
        );
        let none = WireLora {
            rank: 8,
            seed: None,
            train_unembed: true,
            train_mlp: false,
            train_attn: false,
        };
        assert!(lora_config(Some(none))
            .unwrap_err()
            .message
            .contains("train_mlp"));
        assert!(loss_fn("stable_reinforce")
            .unwrap_err()
            .message
            .contains("not supported"));
        assert!(loss_fn("ppo").is_ok());
    }
}
