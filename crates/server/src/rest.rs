//! The REST side: capabilities, health, training runs and checkpoints (list, TTL, delete,
//! `weights_info`), downloads (signed URLs of external weights; SDK 0.34's tar `archive`),
//! sessions.
//!
//! A key sees its own runs and checkpoints and the home's own (made by the CLI or jobs, no
//! owner); another key's are answered 403 when named and left out of listings.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use whet_jobs::checkpoints::{CheckpointRecord, RunRecord, TinkerPath};

use crate::error::ApiError;
use crate::state::{lock, parse, State};

/// How long a download URL stays valid.
const URL_LIFETIME: Duration = Duration::from_secs(3600);

/// `GET /api/v1/healthz`.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Any other path: 404 naming it.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("{uri}: no such endpoint in whet serve"))
}

/// `GET /api/v1/get_server_capabilities`: the served models.
pub async fn capabilities(AxState(state): AxState<Arc<State>>) -> Json<Value> {
    let models: Vec<Value> = state
        .config
        .models
        .iter()
        .map(|m| {
            json!({"model_name": m.name, "max_context_length": m.max_context_length,
                   "trainable": true, "sampleable": true})
        })
        .collect();
    Json(json!({"supported_models": models}))
}

fn visible(owner: &str, record_owner: &Option<String>) -> bool {
    record_owner.as_deref().is_none_or(|o| o == owner)
}

fn checkpoint_json(r: &CheckpointRecord) -> Value {
    let path = r.path().ok();
    let mut v = json!({
        "checkpoint_id": path.as_ref().map(TinkerPath::checkpoint_id),
        "checkpoint_type": path.as_ref().map(|p| p.kind.type_name()),
        "time": r.time,
        "tinker_path": r.tinker_path,
        "size_bytes": r.size_bytes,
        "public": false,
    });
    if let Some(m) = &r.user_metadata {
        v["user_metadata"] = m.clone();
    }
    if let Some(t) = r.expires_unix {
        v["expires_at"] = json!(whet_jobs::rfc3339(t));
    }
    v
}

fn run_json(state: &State, run: &RunRecord) -> Value {
    let checkpoints = state.checkpoints.list(&run.training_run_id);
    let last = |type_name: &str| {
        checkpoints
            .iter()
            .rev()
            .find(|c| c.path().is_ok_and(|p| p.kind.type_name() == type_name))
            .map(checkpoint_json)
    };
    let last_time = checkpoints
        .last()
        .map(|c| c.time.clone())
        .unwrap_or_else(|| run.created_at.clone());
    let mut v = json!({
        "training_run_id": run.training_run_id,
        "base_model": run.base_model,
        "model_owner": run.owner.clone().unwrap_or_else(|| "home".into()),
        "is_lora": true,
        "corrupted": false,
        "lora_rank": run.lora_rank,
        "last_request_time": last_time,
        "last_checkpoint": last("training"),
        "last_sampler_checkpoint": last("sampler"),
    });
    if let Some(m) = &run.user_metadata {
        v["user_metadata"] = m.clone();
    }
    v
}

/// Pagination of a listing (`?limit=&offset=`).
#[derive(Deserialize)]
pub struct Page {
    /// At most this many items (default 100).
    #[serde(default = "default_limit")]
    limit: usize,
    /// Skip this many first.
    #[serde(default)]
    offset: usize,
}

fn default_limit() -> usize {
    100
}

fn page<T: Clone>(items: &[T], p: &Page) -> (Vec<T>, Value) {
    let slice: Vec<T> = items.iter().skip(p.offset).take(p.limit).cloned().collect();
    let cursor = json!({"offset": p.offset, "limit": p.limit, "total_count": items.len()});
    (slice, cursor)
}

/// `GET /api/v1/training_runs`: the caller's runs, newest first.
pub async fn training_runs(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let mut runs: Vec<RunRecord> = state
        .checkpoints
        .runs()
        .into_iter()
        .filter(|r| visible(&owner, &r.owner))
        .collect();
    runs.reverse();
    let (runs, cursor) = page(&runs, &p);
    let runs: Vec<Value> = runs.iter().map(|r| run_json(&state, r)).collect();
    Ok(Json(json!({"training_runs": runs, "cursor": cursor})))
}

fn owned_run(state: &State, owner: &str, run_id: &str) -> Result<RunRecord, ApiError> {
    let run = state.checkpoints.run(run_id)?;
    if !visible(owner, &run.owner) {
        return Err(ApiError::forbidden(format!(
            "training run {run_id} belongs to another API key"
        )));
    }
    Ok(run)
}

/// `GET /api/v1/training_runs/{run_id}`.
pub async fn training_run(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let run = owned_run(&state, &owner, &run_id)?;
    Ok(Json(run_json(&state, &run)))
}

/// `GET /api/v1/training_runs/{run_id}/checkpoints`.
pub async fn run_checkpoints(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    owned_run(&state, &owner, &run_id)?;
    let list: Vec<Value> = state
        .checkpoints
        .list(&run_id)
        .iter()
        .map(checkpoint_json)
        .collect();
    Ok(Json(json!({"checkpoints": list})))
}

/// `GET /api/v1/checkpoints`: every checkpoint the caller can see, newest first.
pub async fn user_checkpoints(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let mut all: Vec<CheckpointRecord> = state
        .checkpoints
        .list_all()
        .into_iter()
        .filter(|c| visible(&owner, &c.owner))
        .collect();
    all.reverse();
    let (list, cursor) = page(&all, &p);
    let list: Vec<Value> = list.iter().map(checkpoint_json).collect();
    Ok(Json(json!({"checkpoints": list, "cursor": cursor})))
}

/// The checkpoint named by a REST path, if the caller may see it (`write`: may change it —
/// the home's own checkpoints are changed with the CLI only).
fn named(
    state: &State,
    owner: &str,
    run_id: &str,
    segment: &str,
    name: &str,
    write: bool,
) -> Result<(TinkerPath, CheckpointRecord), ApiError> {
    let uri = format!("tinker://{run_id}/{segment}/{name}");
    let path = TinkerPath::parse(&uri).map_err(|e| ApiError::bad("checkpoint", e))?;
    let record = state.checkpoints.get(&path)?;
    let allowed = match &record.owner {
        Some(o) => o == owner,
        None => !write,
    };
    if !allowed {
        return Err(ApiError::forbidden(match record.owner {
            Some(_) => format!("{uri} belongs to another API key"),
            None => format!("{uri} belongs to the whet home; change it with `whet checkpoints`"),
        }));
    }
    Ok((path, record))
}

/// `DELETE …/checkpoints/{segment}/{name}`.
pub async fn delete_checkpoint(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path((run_id, segment, name)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let (path, _) = named(&state, &owner, &run_id, &segment, &name, true)?;
    state.checkpoints.delete(&path)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Ttl {
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

/// `PUT …/checkpoints/{segment}/{name}/ttl` (`null` keeps it for good).
pub async fn set_ttl(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path((run_id, segment, name)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: Ttl = parse(&body)?;
    let (path, _) = named(&state, &owner, &run_id, &segment, &name, true)?;
    state.checkpoints.set_ttl(&path, req.ttl_seconds)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct WeightsInfo {
    tinker_path: String,
}

/// `POST /api/v1/weights_info`: what a checkpoint was trained from (SDK 0.34 reads it to
/// create a client from a state).
pub async fn weights_info(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let req: WeightsInfo = parse(&body)?;
    let path = TinkerPath::parse(&req.tinker_path).map_err(|e| ApiError::bad("tinker_path", e))?;
    let (_, _) = named(
        &state,
        &owner,
        &path.run_id,
        path.kind.segment(),
        &path.name,
        false,
    )?;
    let run = state.checkpoints.run(&path.run_id)?;
    Ok(Json(json!({
        "base_model": run.base_model,
        "is_lora": true,
        "lora_rank": run.lora_rank,
        "train_unembed": false,
        "train_mlp": run.train_mlp,
        "train_attn": run.train_attn,
        "optimizer_config": {"type": "adamw"},
    })))
}

/// An unguessable token (128 bits from the standard library's per-process random keys).
fn token() -> String {
    (0..2)
        .map(|i| format!("{:016x}", RandomState::new().hash_one((i, Instant::now()))))
        .collect()
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn signed(state: &State, path: &TinkerPath) -> (String, String) {
    let t = token();
    let expires = Instant::now() + URL_LIFETIME;
    lock(&state.downloads).insert(t.clone(), (state.checkpoints.dir(path), expires));
    (
        t,
        whet_jobs::rfc3339(whet_jobs::now_unix() + URL_LIFETIME.as_secs()),
    )
}

/// `GET …/checkpoints/{segment}/{name}/external_weights_urls`: a URL per file, fetchable
/// without headers (the token is in the URL) for an hour.
pub async fn external_weights_urls(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path((run_id, segment, name)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let (path, _) = named(&state, &owner, &run_id, &segment, &name, false)?;
    let dir = state.checkpoints.dir(&path);
    let (t, expires) = signed(&state, &path);
    let base = base_url(&headers);
    let mut urls = serde_json::Map::new();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    files.sort();
    for f in files {
        urls.insert(f.clone(), json!(format!("{base}/api/v1/files/{t}/{f}")));
    }
    Ok(Json(json!({"urls": urls, "expires": expires})))
}

/// `GET …/checkpoints/{segment}/{name}/archive` (SDK ≤ 0.34): a URL of the checkpoint as tar.
pub async fn archive(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path((run_id, segment, name)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let (path, _) = named(&state, &owner, &run_id, &segment, &name, false)?;
    let (t, expires) = signed(&state, &path);
    Ok(Json(json!({
        "url": format!("{}/api/v1/files/{t}/archive.tar", base_url(&headers)),
        "expires": expires,
    })))
}

/// `GET /api/v1/files/{token}/{file}`: a file of a signed checkpoint, or `archive.tar`.
pub async fn download(
    AxState(state): AxState<Arc<State>>,
    Path((t, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let dir = lock(&state.downloads)
        .get(&t)
        .filter(|(_, exp)| *exp > Instant::now())
        .map(|(d, _)| d.clone())
        .ok_or_else(|| ApiError::not_found("this download link is unknown or has expired"))?;
    let bytes = if file == "archive.tar" && !dir.join(&file).exists() {
        crate::archive::tar_dir(&dir)
            .map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?
    } else {
        if file.starts_with('.') || file.contains(['/', '\\']) {
            return Err(ApiError::bad("file", "not a file of this checkpoint"));
        }
        std::fs::read(dir.join(&file))
            .map_err(|_| ApiError::not_found(format!("{file}: not a file of this checkpoint")))?
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `GET /api/v1/sessions`: the caller's session ids.
pub async fn sessions(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    let ids = crate::state::session_ids(&state, &owner);
    let (ids, cursor) = page(&ids, &p);
    Ok(Json(json!({"sessions": ids, "cursor": cursor})))
}

/// `GET /api/v1/sessions/{id}`.
pub async fn session(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(session_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = state.owner(&headers)?;
    crate::state::session_summary(&state, &owner, &session_id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no session {session_id:?}")))
}
