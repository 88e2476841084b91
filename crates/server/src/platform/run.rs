//! Jobs that the platform API starts: `POST /v1/jobs` (submit), `POST /v1/jobs/{id}/retry`,
//! and the worker thread that runs queued jobs while the server is up.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use whet_jobs::Store;

use super::with_store;
use crate::error::ApiError;
use crate::state::State;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Submit {
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    toml: Option<String>,
    #[serde(default)]
    precision: Option<String>,
}

fn job_runner(state: &State) -> Result<Arc<dyn crate::Jobs>, ApiError> {
    state.jobs.clone().ok_or_else(|| ApiError {
        status: axum::http::StatusCode::NOT_IMPLEMENTED,
        message: "this server does not run jobs".into(),
    })
}

fn precision(p: Option<String>) -> Result<String, ApiError> {
    match p.as_deref() {
        None => Ok("f32".into()),
        Some(p @ ("f32" | "bf16")) => Ok(p.to_string()),
        Some(other) => Err(ApiError::bad(
            "precision",
            format!("{other:?} (f32 or bf16)"),
        )),
    }
}

pub(super) async fn submit(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    state.owner(&headers)?;
    let runner = job_runner(&state)?;
    let req: Submit = crate::state::parse(&body)?;
    let spec = match (req.config, req.toml) {
        (Some(c), None) => {
            let spec: whet_jobs::JobSpec =
                serde_json::from_value(c).map_err(|e| ApiError::bad("config", e))?;
            spec.check().map_err(|e| ApiError::bad("config", e))?;
            spec
        }
        (None, Some(t)) => {
            whet_jobs::JobSpec::from_toml(&t).map_err(|e| ApiError::bad("toml", e))?
        }
        _ => return Err(ApiError::bad("body", "give either `config` or `toml`")),
    };
    let precision = precision(req.precision)?;
    let record = tokio::task::spawn_blocking(move || runner.submit(&spec, &precision, None))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(record))
}

pub(super) async fn retry(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.owner(&headers)?;
    let runner = job_runner(&state)?;
    let check = id.clone();
    let old = with_store(&state, move |_, store| Ok(store.job(&check)?)).await?;
    if !matches!(old["status"].as_str(), Some("failed" | "cancelled")) {
        return Err(ApiError::bad(
            "id",
            format!(
                "job {id} is {}: only failed or cancelled jobs are retried",
                old["status"]
            ),
        ));
    }
    let spec: whet_jobs::JobSpec = serde_json::from_value(old["config"].clone())
        .map_err(|e| ApiError::internal(format!("job {id}: its stored config: {e}")))?;
    let precision = old["precision"].as_str().unwrap_or("f32").to_string();
    let record = tokio::task::spawn_blocking(move || runner.submit(&spec, &precision, Some(&id)))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(record))
}

/// The thread that runs queued jobs, one at a time, while the server is up.
pub struct JobWorker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl JobWorker {
    /// Stops after the job in progress (if any) has ended.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.handle.join();
    }
}

/// Starts the job worker when the server runs jobs.
pub fn spawn_job_worker(state: &Arc<State>) -> Option<JobWorker> {
    let runner = state.jobs.clone().filter(|_| state.config.run_jobs)?;
    let home = state.home.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::Builder::new()
        .name("whet-jobs".into())
        .spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let claimed = Store::open(&home.db()).and_then(|mut s| s.claim_queued());
                match claimed {
                    Ok(Some(id)) => match runner.run(&id) {
                        Ok(r) => tracing::info!("job {id}: {}", r["status"]),
                        Err(e) => tracing::warn!("job {id}: {e}"),
                    },
                    Ok(None) => std::thread::sleep(Duration::from_millis(500)),
                    Err(e) => {
                        tracing::warn!("claiming a queued job: {e}");
                        std::thread::sleep(Duration::from_secs(2));
                    }
                }
            }
        })
        .ok()?;
    Some(JobWorker { stop, handle })
}
