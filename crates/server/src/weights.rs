//! Weights endpoints: `save_weights` (a training state), `save_weights_for_sampler` (a named
//! adapter, or a snapshot sampler), `save_weights_external` (an adapter to download) and
//! `load_weights` (a training client from a state, or a state into one).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use whet_contract::LoraConfig;
use whet_jobs::checkpoints::{check_name, CheckpointKind, TinkerPath};

use crate::error::ApiError;
use crate::state::{parse, State};
use crate::training::{check_optimizer, future, run_record};
use crate::worker::{TrainOp, Work};

#[derive(Deserialize)]
struct Save {
    model_id: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    seq_id: Option<i64>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    user_metadata: Option<Value>,
    #[serde(default)]
    sampling_session_seq_id: Option<i64>,
    #[serde(default)]
    age_encryption_recipients: Option<Vec<String>>,
}

fn checkpoint_path(
    run_id: &str,
    kind: CheckpointKind,
    name: Option<&str>,
) -> Result<TinkerPath, ApiError> {
    let name = name.ok_or_else(|| ApiError::bad("path", "a checkpoint name is required"))?;
    check_name("path", name).map_err(|e| ApiError::bad("path", e))?;
    Ok(TinkerPath {
        run_id: run_id.to_string(),
        kind,
        name: name.to_string(),
    })
}

async fn save(
    state: Arc<State>,
    headers: HeaderMap,
    body: Bytes,
    kind: CheckpointKind,
    reply_type: &'static str,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: Save = parse(&body)?;
    let (model_id, seq_id) = (req.model_id.clone(), req.seq_id);
    let (base_model, _) = state.run_info(&owner, &req.model_id)?;
    let op = save_op(&state, &owner, req, &base_model, kind, reply_type);
    let id = state.submit_train(&owner, &model_id, seq_id, op)?;
    Ok(future(id, &model_id))
}

fn save_op(
    state: &State,
    owner: &str,
    req: Save,
    base_model: &str,
    kind: CheckpointKind,
    reply_type: &'static str,
) -> Result<TrainOp, ApiError> {
    if req
        .age_encryption_recipients
        .as_ref()
        .is_some_and(|r| !r.is_empty())
    {
        return Err(ApiError::bad(
            "age_encryption_recipients",
            "age encryption of exports is not supported by whet serve; download without recipients (e.g. `tinker checkpoint download`)",
        ));
    }
    Ok(if kind == CheckpointKind::Sampler && req.path.is_none() {
        // save_weights_and_get_sampling_client: a snapshot sampler, nothing on disk.
        let n = req.sampling_session_seq_id.ok_or_else(|| {
            ApiError::bad("path", "either path or sampling_session_seq_id is required")
        })?;
        let session = req
            .model_id
            .split(":train:")
            .next()
            .unwrap_or_default()
            .to_string();
        let sampler_id = format!("{session}:sample:{n}");
        state.add_sampler(owner, &session, &sampler_id, base_model, None)?;
        TrainOp::Snapshot { sampler_id }
    } else {
        TrainOp::Save {
            path: checkpoint_path(&req.model_id, kind, req.path.as_deref())?,
            owner: owner.to_string(),
            ttl_seconds: req.ttl_seconds,
            user_metadata: req.user_metadata,
            reply_type,
        }
    })
}

/// `POST /api/v1/save_weights`: a training state (`save_state`).
pub async fn save_weights(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    save(
        state,
        headers,
        body,
        CheckpointKind::Training,
        "save_weights",
    )
    .await
}

/// `POST /api/v1/save_weights_for_sampler`: a named adapter, or a snapshot sampler.
pub async fn save_weights_for_sampler(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    save(
        state,
        headers,
        body,
        CheckpointKind::Sampler,
        "save_weights_for_sampler",
    )
    .await
}

/// `POST /api/v1/save_weights_external`: a PEFT adapter to download.
pub async fn save_weights_external(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    save(
        state,
        headers,
        body,
        CheckpointKind::External,
        "save_weights_external",
    )
    .await
}

#[derive(Deserialize)]
struct LoadWeights {
    path: String,
    #[serde(default)]
    optimizer: bool,
    #[serde(default)]
    model_id: Option<String>,
    #[serde(default)]
    seq_id: Option<i64>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    model_seq_id: Option<i64>,
    #[serde(default)]
    base_model: Option<String>,
    #[serde(default)]
    optimizer_config: Option<Value>,
    #[serde(default)]
    user_metadata: Option<Value>,
}

/// A training state `owner` may load: parsed, present, theirs (or the home's own).
pub fn readable_state(state: &State, owner: &str, path: &str) -> Result<TinkerPath, ApiError> {
    let p = TinkerPath::parse(path).map_err(|e| ApiError::bad("path", e))?;
    if p.kind != CheckpointKind::Training {
        return Err(ApiError::bad(
            "path",
            format!("{path} holds sampler weights (no optimizer state); load a tinker://…/weights/… path, or sample from it with create_sampling_client"),
        ));
    }
    let record = state.checkpoints.get(&p)?;
    if record.owner.as_deref().is_some_and(|o| o != owner) {
        return Err(ApiError::forbidden(format!(
            "{path} belongs to another API key"
        )));
    }
    Ok(p)
}

/// `POST /api/v1/load_weights`: creates a training client from a state (session_id +
/// model_seq_id; this load is the run's seq 0), or loads one into an existing run.
pub async fn load_weights(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: LoadWeights = parse(&body)?;
    if let Some(model_id) = &req.model_id {
        let (base_model, _) = state.run_info(&owner, model_id)?;
        let op = (|| {
            let path = readable_state(&state, &owner, &req.path)?;
            let source = state.checkpoints.run(&path.run_id)?;
            if base_model != source.base_model {
                return Err(ApiError::bad(
                    "path",
                    format!(
                        "{} was trained on {}, not on {base_model}",
                        req.path, source.base_model
                    ),
                ));
            }
            Ok(TrainOp::Load {
                dir: state.checkpoints.dir(&path),
                path: req.path.clone(),
                optimizer: req.optimizer,
            })
        })();
        let id = state.submit_train(&owner, model_id, req.seq_id, op)?;
        return Ok(future(id, model_id));
    }
    let path = readable_state(&state, &owner, &req.path)?;
    let source = state.checkpoints.run(&path.run_id)?;
    let dir = state.checkpoints.dir(&path);
    let (Some(session_id), Some(model_seq_id)) = (&req.session_id, req.model_seq_id) else {
        return Err(ApiError::bad(
            "model_id",
            "either model_id, or session_id and model_seq_id, is required",
        ));
    };
    if let Some(b) = req.base_model.as_ref().filter(|b| **b != source.base_model) {
        return Err(ApiError::bad(
            "base_model",
            format!(
                "{} was trained on {}, not on {b}",
                req.path, source.base_model
            ),
        ));
    }
    state.model("base_model", &source.base_model)?;
    check_optimizer(&req.optimizer_config)?;
    let lora = LoraConfig {
        rank: source.lora_rank,
        seed: None,
        train_unembed: false,
        train_mlp: source.train_mlp,
        train_attn: source.train_attn,
    };
    let run_id = format!("{session_id}:train:{model_seq_id}");
    state.add_run(
        &owner,
        session_id,
        &run_id,
        &source.base_model,
        lora.clone(),
        1,
    )?;
    let request_id = state.futures.create(&owner);
    let metadata = req.user_metadata.or(source.user_metadata.clone());
    state.send(Work::Create {
        request_id: request_id.clone(),
        run: run_record(&run_id, &source.base_model, &lora, &owner, metadata),
        lora,
        load: Some((dir, req.optimizer, req.path.clone())),
    })?;
    Ok(future(request_id, &run_id))
}
