//! The platform's JSON API, beside the Tinker protocol on the same server and with the same
//! keys: jobs (submit, list with search, get, cancel, retry, logs, metrics, and a live stream
//! of both as server-sent events), and the registries (datasets, capabilities, models with
//! aliases). The server runs queued jobs itself, one at a time, on a thread of its own.
//! `GET /v1/openapi.json` describes it, generated from [`ENDPOINTS`].
//!
//! The home's database is opened per request on a blocking thread (SQLite in WAL mode: reads
//! never wait for a training job writing its metrics).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State as AxState};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use whet_jobs::{Cancel, Home, Store, TERMINAL};

use crate::error::ApiError;
use crate::state::State;

mod run;

use run::{retry, submit};
pub use run::{spawn_job_worker, JobWorker};

/// One endpoint of the API: method, path, summary (the OpenAPI document is built from these).
pub struct Endpoint {
    /// HTTP method.
    pub method: &'static str,
    /// Path with `{parameters}`.
    pub path: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
}

/// Every endpoint of the platform API.
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "get",
        path: "/v1/jobs",
        summary: "Job summaries, newest first: id, name, status, model, trainer, dataset, capability, times, last step and loss",
        query: &[
            ("status", "only jobs with this status (queued, running, completed, failed, cancelled)"),
            ("q", "case-insensitive text in the id, name, model, status or tags"),
            ("limit", "at most this many (default 100)"),
            ("offset", "skip this many first"),
        ],
    },
    Endpoint {
        method: "post",
        path: "/v1/jobs",
        summary: "Submits a job: body {\"config\": <job file as JSON>} or {\"toml\": <job file text>}, optional \"precision\" (f32, bf16); paths in it are taken as they are, so give absolute ones or registry references. Answers the queued record",
        query: &[],
    },
    Endpoint {
        method: "post",
        path: "/v1/jobs/{id}/retry",
        summary: "Submits a failed or cancelled job again, as a new job (retry_of)",
        query: &[],
    },
    Endpoint {
        method: "get",
        path: "/v1/jobs/{id}",
        summary: "A job's full record: config, pinned references, metrics, artifacts, error, times",
        query: &[],
    },
    Endpoint {
        method: "post",
        path: "/v1/jobs/{id}/cancel",
        summary: "Cancels a queued job, or stops a running one after its current step",
        query: &[],
    },
    Endpoint {
        method: "get",
        path: "/v1/jobs/{id}/metrics",
        summary: "The job's metrics rows, one per step",
        query: &[("after_step", "only rows after this step")],
    },
    Endpoint {
        method: "get",
        path: "/v1/jobs/{id}/logs",
        summary: "The job's log entries with their sequence numbers",
        query: &[("after", "only entries after this sequence number")],
    },
    Endpoint {
        method: "get",
        path: "/v1/jobs/{id}/stream",
        summary: "Server-sent events: `log` entries and `metrics` rows as they are written, `status` changes, then `end` once the job has ended",
        query: &[
            ("after", "log entries after this sequence number only"),
            ("after_step", "metrics rows after this step only"),
        ],
    },
    Endpoint {
        method: "get",
        path: "/v1/datasets",
        summary: "Published dataset versions",
        query: &[("name", "only this dataset")],
    },
    Endpoint {
        method: "get",
        path: "/v1/capabilities",
        summary: "Published capability versions",
        query: &[("name", "only this capability")],
    },
    Endpoint {
        method: "get",
        path: "/v1/models",
        summary: "Published model versions with their lineage and aliases",
        query: &[("name", "only this model")],
    },
    Endpoint {
        method: "get",
        path: "/v1/openapi.json",
        summary: "This document",
        query: &[],
    },
];

/// The API's routes.
pub fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/v1/jobs", get(jobs).post(submit))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/retry", post(retry))
        .route("/v1/jobs/{id}/metrics", get(metrics))
        .route("/v1/jobs/{id}/logs", get(logs))
        .route("/v1/jobs/{id}/stream", get(stream))
        .route("/v1/datasets", get(|s, h, q| registry(s, h, q, "dataset")))
        .route(
            "/v1/capabilities",
            get(|s, h, q| registry(s, h, q, "capability")),
        )
        .route("/v1/models", get(|s, h, q| registry(s, h, q, "model")))
        .route("/v1/openapi.json", get(openapi))
}

/// Runs `f` with the home's database on a blocking thread.
pub(crate) async fn with_store<T: Send + 'static>(
    state: &State,
    f: impl FnOnce(&Home, &mut Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let home = state.home.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = Store::open(&home.db())?;
        f(&home, &mut store)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the database task failed: {e}")))?
}

/// What the job list shows of a record.
fn summary(r: &Value) -> Value {
    let seconds = |a: &Value, b: &Value| -> Value {
        let t = |v: &Value| v.as_str().and_then(parse_rfc3339);
        match (t(a), t(b)) {
            (Some(a), Some(b)) => json!(b.saturating_sub(a)),
            _ => Value::Null,
        }
    };
    let end = if r["completed_at"].is_null() {
        json!(whet_jobs::now_rfc3339())
    } else {
        r["completed_at"].clone()
    };
    let data = [
        &r["dataset_ref"],
        &r["prompt_dataset_ref"],
        &r["world_manifest_id"],
        &r["trajectory_dataset_refs"][0],
    ]
    .into_iter()
    .find(|v| !v.is_null())
    .cloned()
    .unwrap_or(Value::Null);
    let capability = match (&r["capability"]["name"], &r["capability"]["version"]) {
        (Value::String(n), Value::String(v)) => json!(format!("{n}@{v}")),
        _ => Value::Null,
    };
    json!({
        "id": r["id"], "name": r["name"], "status": r["status"], "model": r["model"],
        "model_ref": r["model_ref"], "trainer_type": r["trainer_type"], "algorithm": r["algorithm"],
        "backend": r["backend"], "dataset": data, "capability": capability, "tags": r["tags"],
        "created_at": r["created_at"], "started_at": r["started_at"],
        "completed_at": r["completed_at"], "duration_s": seconds(&r["started_at"], &end),
        "step": r["metrics"]["step"], "loss": r["metrics"]["loss"],
        "eval_loss": r["metrics"]["eval_loss"], "reward_mean": r["metrics"]["train/reward_mean"],
        "error": r["error"], "retry_of": r["retry_of"],
    })
}

/// Unix seconds of `YYYY-MM-DDTHH:MM:SSZ` (what the home writes).
fn parse_rfc3339(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from civil (Howard Hinnant's algorithm), the inverse of the home's formatter.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

#[derive(Deserialize)]
struct JobsQuery {
    status: Option<String>,
    q: Option<String>,
    #[serde(default = "hundred")]
    limit: usize,
    #[serde(default)]
    offset: usize,
}

fn hundred() -> usize {
    100
}

async fn jobs(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Result<Json<Value>, ApiError> {
    state.owner(&headers)?;
    with_store(&state, move |_, store| {
        let needle = q.q.as_deref().map(str::to_lowercase);
        let all: Vec<Value> = store
            .jobs(q.status.as_deref())?
            .iter()
            .map(summary)
            .filter(|s| {
                needle.as_deref().is_none_or(|n| {
                    ["id", "name", "model", "status", "tags"]
                        .iter()
                        .any(|k| s[*k].to_string().to_lowercase().contains(n))
                })
            })
            .collect();
        let page: Vec<Value> = all.iter().skip(q.offset).take(q.limit).cloned().collect();
        Ok(Json(json!({"jobs": page, "total": all.len()})))
    })
    .await
}

async fn job(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.owner(&headers)?;
    with_store(&state, move |_, store| Ok(Json(store.job(&id)?))).await
}

async fn cancel(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.owner(&headers)?;
    with_store(&state, move |home, store| {
        let now = whet_jobs::now_rfc3339();
        let result = match store.cancel(&id, &now)? {
            Cancel::Cancelled => "cancelled".to_string(),
            Cancel::Requested if !whet_jobs::runner::runner_alive(home, &id) => {
                // Its process is gone: nobody would see the request; end it here.
                let mut record = store.job(&id)?;
                record["status"] = json!("cancelled");
                record["completed_at"] = json!(now);
                store.save_job(&record)?;
                "cancelled".to_string()
            }
            Cancel::Requested => "stopping after the current step".to_string(),
            Cancel::AlreadyEnded(s) => format!("already {s}"),
        };
        Ok(Json(json!({"id": id, "result": result})))
    })
    .await
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: i64,
    #[serde(default)]
    after_step: Option<u64>,
}

async fn metrics(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(a): Query<After>,
) -> Result<Json<Value>, ApiError> {
    state.owner(&headers)?;
    with_store(&state, move |_, store| {
        store.job(&id)?;
        Ok(Json(
            json!({"rows": store.metrics_after(&id, a.after_step)?}),
        ))
    })
    .await
}

async fn logs(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(a): Query<After>,
) -> Result<Json<Value>, ApiError> {
    state.owner(&headers)?;
    with_store(&state, move |_, store| {
        store.job(&id)?;
        let events: Vec<Value> = store
            .events(&id, a.after)?
            .into_iter()
            .map(|(seq, mut e)| {
                e["seq"] = json!(seq);
                e
            })
            .collect();
        Ok(Json(json!({"events": events})))
    })
    .await
}

/// What the stream has sent so far.
struct Cursor {
    state: Arc<State>,
    id: String,
    after: i64,
    after_step: Option<u64>,
    status: String,
    pending: std::collections::VecDeque<Event>,
    ended: bool,
}

/// How often a stream looks for new rows.
const POLL: Duration = Duration::from_millis(400);

async fn stream(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(a): Query<After>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    state.owner(&headers)?;
    let check = id.clone();
    with_store(&state, move |_, store| {
        store.job(&check).map(|_| ()).map_err(ApiError::from)
    })
    .await?;
    let cursor = Cursor {
        state,
        id,
        after: a.after,
        after_step: a.after_step,
        status: String::new(),
        pending: Default::default(),
        ended: false,
    };
    let events = futures_util::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(e) = c.pending.pop_front() {
                return Some((Ok(e), c));
            }
            if c.ended {
                return None;
            }
            let (id, after, after_step) = (c.id.clone(), c.after, c.after_step);
            let found = with_store(&c.state, move |_, store| {
                let record = store.job(&id)?;
                let logs = store.events(&id, after)?;
                let rows = store.metrics_after(&id, after_step)?;
                Ok((record, logs, rows))
            })
            .await;
            let Ok((record, logs, rows)) = found else {
                c.ended = true;
                c.pending
                    .push_back(Event::default().event("end").data("{}"));
                continue;
            };
            for (seq, mut e) in logs {
                e["seq"] = json!(seq);
                c.after = seq;
                c.pending
                    .push_back(Event::default().event("log").data(e.to_string()));
            }
            for row in rows {
                c.after_step = row["step"].as_u64().or(c.after_step);
                c.pending
                    .push_back(Event::default().event("metrics").data(row.to_string()));
            }
            let status = record["status"].as_str().unwrap_or_default().to_string();
            if status != c.status {
                c.status = status.clone();
                c.pending.push_back(
                    Event::default()
                        .event("status")
                        .data(json!({"status": status, "error": record["error"]}).to_string()),
                );
            }
            if TERMINAL.contains(&status.as_str()) {
                c.ended = true;
                c.pending.push_back(
                    Event::default()
                        .event("end")
                        .data(summary(&record).to_string()),
                );
            }
            if c.pending.is_empty() {
                tokio::time::sleep(POLL).await;
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
struct NameQuery {
    name: Option<String>,
}

async fn registry(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Query(q): Query<NameQuery>,
    kind: &'static str,
) -> Result<Json<Value>, ApiError> {
    state.owner(&headers)?;
    with_store(&state, move |_, store| {
        let mut entries = store.registry_list(kind, q.name.as_deref())?;
        for e in &mut entries {
            if let Some(name) = e["name"].as_str().map(str::to_string) {
                let aliases: Vec<Value> = store
                    .aliases(kind, &name)?
                    .into_iter()
                    .filter(|(_, v)| e["version"].as_str() == Some(v.as_str()))
                    .map(|(a, _)| json!(a))
                    .collect();
                e["aliases"] = json!(aliases);
            }
        }
        Ok(Json(json!({"items": entries})))
    })
    .await
}

/// The OpenAPI 3.1 document of [`ENDPOINTS`].
pub fn openapi_document() -> Value {
    let mut paths = serde_json::Map::new();
    for e in ENDPOINTS {
        let mut parameters: Vec<Value> = e
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        parameters.extend(e.query.iter().map(|(name, description)| {
            json!({"name": name, "in": "query", "required": false, "description": description,
                   "schema": {"type": "string"}})
        }));
        let op = json!({
            "summary": e.summary,
            "parameters": parameters,
            "security": [{"apiKey": []}],
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {}}},
                "401": {"description": "no or unknown X-API-Key"},
                "404": {"description": "no such job or entry"},
            },
        });
        let item = paths.entry(e.path).or_insert_with(|| json!({}));
        item[e.method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "whet platform API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Jobs and the registries of a whet home, beside the Tinker protocol (/api/v1) on `whet serve`. Errors are {\"error\", \"category\"}."},
        "components": {"securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
        "paths": paths,
    })
}

async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_back() {
        for t in [0u64, 951_782_400, 1_764_000_000, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&whet_jobs::rfc3339(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn the_openapi_document_names_every_endpoint() {
        let doc = openapi_document();
        for e in ENDPOINTS {
            assert!(
                doc["paths"][e.path][e.method]["summary"].is_string(),
                "{}",
                e.path
            );
        }
        assert_eq!(
            doc["paths"]["/v1/jobs/{id}/metrics"]["get"]["parameters"][0]["in"],
            "path"
        );
    }
}
