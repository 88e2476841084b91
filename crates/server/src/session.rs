//! Session-level endpoints: client config, sessions and heartbeats, telemetry, and
//! `retrieve_future` (the long poll every future goes through).

use std::sync::Arc;

use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::futures::{Outcome, Poll};
use crate::state::{parse, State};
use crate::worker::Work;

/// `POST /api/v1/client/config`: every flag at the SDK's default except those named here.
pub async fn client_config() -> Json<Value> {
    Json(json!({
        "pjwt_auth_enabled": false,
        "proto_compress_fwdbwd": false,
        "sample_use_retrieve_futures": false,
        "custom_loss_server_side": false,
        "sample_join_sampling_session": false,
        // One machine: a few dozen samples in flight are plenty and keep memory bounded.
        "sample_max_concurrent_requests": 64,
        // SDK 0.34 then creates clients from a state the way 0.38 does.
        "create_model_via_load_weights": true,
    }))
}

/// `POST /api/v1/client/dynamic_config`.
pub async fn dynamic_config() -> Json<Value> {
    Json(json!({"refresh_interval_sec": 300, "sample_cancel_enabled": false}))
}

/// `POST /api/v1/telemetry`: accepted and dropped (nothing leaves the machine).
pub async fn telemetry() -> Json<Value> {
    Json(json!({"status": "accepted"}))
}

#[derive(Deserialize)]
struct CreateSession {
    #[serde(default)]
    user_metadata: Option<Value>,
}

/// `POST /api/v1/create_session`.
pub async fn create_session(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: CreateSession = parse(&body)?;
    let id = state.new_session(&owner, req.user_metadata);
    tracing::info!("session {id} created");
    Ok(Json(json!({"session_id": id, "type": "create_session"})))
}

#[derive(Deserialize)]
struct Heartbeat {
    session_id: String,
}

/// `POST /api/v1/session_heartbeat`: 410 once the session is over (the SDK stops then).
pub async fn heartbeat(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: Heartbeat = parse(&body)?;
    state.check_session(&owner, &req.session_id)?;
    Ok(Json(json!({"type": "session_heartbeat"})))
}

#[derive(Deserialize)]
struct Finish {
    #[serde(default)]
    reason: Option<Value>,
}

/// `POST /api/v1/sessions/{id}/finish`: the first reason wins; the session's clients go.
pub async fn finish(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(session_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: Finish = parse(&body).unwrap_or(Finish { reason: None });
    let reason = req
        .reason
        .as_ref()
        .and_then(|r| r["type"].as_str())
        .unwrap_or("success")
        .to_string();
    let Some((runs, samplers)) = state.finish_session(&owner, &session_id, &reason)? else {
        return Ok(Json(json!({})));
    };
    tracing::info!("session {session_id} finished ({reason})");
    state.send(Work::Drop {
        runs,
        samplers,
        autosave: Vec::new(),
    })?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Retrieve {
    request_id: String,
}

/// `POST /api/v1/retrieve_future`: the outcome, or `try_again` after the hold time.
pub async fn retrieve_future(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let owner = state.owner(&headers)?;
    let req: Retrieve = parse(&body)?;
    match state
        .futures
        .poll(&req.request_id, &owner, state.config.poll_hold)
        .await
    {
        Poll::Unknown => Err(ApiError::not_found(format!(
            "request_id: no request {:?}",
            req.request_id
        ))),
        Poll::Pending => Ok(Json(json!({
            "type": "try_again",
            "request_id": req.request_id,
            "queue_state": "active",
        }))
        .into_response()),
        Poll::Ready(outcome) => Ok(match &*outcome {
            Outcome::Json(v) => Json(v.clone()).into_response(),
            Outcome::Proto(bytes) => (
                [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                bytes.clone(),
            )
                .into_response(),
            Outcome::Failed { message, category } => {
                Json(json!({"error": message, "category": category.as_str()})).into_response()
            }
        }),
    }
}
