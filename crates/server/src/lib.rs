//! `whet serve`: the Tinker wire protocol over HTTP, so the official `tinker` SDK and the
//! tinker-cookbook recipes run against a local machine unchanged (docs/tinker-wire.md).
//!
//! The server speaks to training only through the contract: a [`Host`] (the engine, in the
//! binary) makes [`TrainingClient`]s and [`SamplingClient`]s, and one worker thread owns them
//! all and runs their requests in order — the device is one, and on a CPU two requests at once
//! would only share its cores. Handlers validate a request completely, queue it and answer a
//! future id at once; `retrieve_future` long-polls for the outcome.
//!
//! - [`state`]: sessions, training runs with their `seq_id` order, samplers, keys;
//! - [`session`]: client config, sessions, heartbeats, `retrieve_future`;
//! - [`worker`]: the thread that runs the work;
//! - [`training`], [`weights`], [`sampling`], [`rest`]: the endpoints; [`proto`]: the protobuf messages;
//! - [`platform`]: the platform's JSON API (jobs, registries, live streams) beside the protocol,
//!   and the App at `/` (`src/app/index.html`, embedded);
//! - [`error`]: the HTTP mapping of every failure.

pub mod archive;
pub mod client;
pub mod error;
pub mod futures;
pub mod platform;
pub mod proto;
pub mod rest;
pub mod sampling;
pub mod session;
pub mod state;
pub mod training;
pub mod weights;
pub mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{delete, get, post, put};
use axum::Router;
use whet_contract::{ContractError, LoraConfig, SamplingClient, TrainingClient};

pub use state::State;

/// A base model the server offers.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedModel {
    /// The name clients use (`base_model`), e.g. the model's Hugging Face id.
    pub name: String,
    /// Longest sequence (prompt + completion) the model takes.
    pub max_context_length: usize,
    /// Token ids are below this.
    pub vocab_size: usize,
    /// A directory with `tokenizer.json` and `tokenizer_config.json` that
    /// `transformers.AutoTokenizer` loads offline (`get_info`'s `tokenizer_id`).
    pub tokenizer_dir: Option<PathBuf>,
}

/// What the server needs from an engine. Only the worker thread calls it, one call at a time.
pub trait Host: Send + 'static {
    /// A fresh LoRA training client on base model `base_model`, writing its checkpoints under
    /// `checkpoint_dir` (`weights/<name>`, `sampler_weights/<name>`).
    fn training_client(
        &mut self,
        base_model: &str,
        lora: &LoraConfig,
        checkpoint_dir: &Path,
    ) -> Result<Box<dyn TrainingClient>, ContractError>;

    /// A sampler on `base_model`, with the PEFT adapter in `adapter_dir` when given.
    fn sampling_client(
        &mut self,
        base_model: &str,
        adapter_dir: Option<&Path>,
    ) -> Result<Box<dyn SamplingClient>, ContractError>;
}

/// Jobs for the platform API: submitting one checks it with the engine, running one needs
/// the engine — both live in the binary.
pub trait Jobs: Send + Sync + 'static {
    /// Submits `spec` (checked, its data pinned) as a queued job; `retry_of` names the job it
    /// retries. Returns the record.
    fn submit(
        &self,
        spec: &whet_jobs::JobSpec,
        precision: &str,
        retry_of: Option<&str>,
    ) -> Result<serde_json::Value, whet_jobs::JobError>;

    /// Runs job `id` (already claimed) to its end; returns the record.
    fn run(&self, id: &str) -> Result<serde_json::Value, whet_jobs::JobError>;
}

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// The models offered.
    pub models: Vec<ServedModel>,
    /// How long `retrieve_future` holds a poll before answering `try_again`.
    pub poll_hold: Duration,
    /// A session without a heartbeat for this long is ended and its clients dropped.
    pub session_timeout: Duration,
    /// A request waiting this long for an earlier `seq_id` that never comes fails.
    pub seq_gap_timeout: Duration,
    /// Accept any `tml-…` key (loopback); otherwise only the home's keys.
    pub open_access: bool,
    /// Fingerprints of the keys made with `whet keys create` (used when not open).
    pub keys: Vec<String>,
    /// Run the home's queued jobs here (those submitted through the platform API, or with
    /// `whet train --detach`), one at a time.
    pub run_jobs: bool,
}

impl Config {
    /// Defaults for `models`: 40 s polls, 5 min sessions, 10 min seq gaps, open access.
    pub fn new(models: Vec<ServedModel>) -> Self {
        Self {
            models,
            poll_hold: Duration::from_secs(40),
            session_timeout: Duration::from_secs(300),
            seq_gap_timeout: Duration::from_secs(600),
            open_access: true,
            keys: Vec::new(),
            run_jobs: true,
        }
    }
}

/// The router of every endpoint (under `/api/v1`).
pub fn router(state: Arc<State>) -> Router {
    let ckpt = "/api/v1/training_runs/{run_id}/checkpoints/{segment}/{name}";
    Router::new()
        .route("/", get(app))
        .route("/api/v1/healthz", get(rest::healthz))
        .route("/api/v1/client/config", post(session::client_config))
        .route(
            "/api/v1/client/dynamic_config",
            post(session::dynamic_config),
        )
        .route("/api/v1/create_session", post(session::create_session))
        .route("/api/v1/session_heartbeat", post(session::heartbeat))
        .route(
            "/api/v1/sessions/{session_id}/finish",
            post(session::finish),
        )
        .route("/api/v1/telemetry", post(session::telemetry))
        .route("/api/v1/retrieve_future", post(session::retrieve_future))
        .route("/api/v1/create_model", post(training::create_model))
        .route("/api/v1/get_info", post(training::get_info))
        .route("/api/v1/forward_backward", post(training::forward_backward))
        .route("/api/v1/optim_step", post(training::optim_step))
        .route("/api/v1/save_weights", post(weights::save_weights))
        .route("/api/v1/load_weights", post(weights::load_weights))
        .route(
            "/api/v1/save_weights_for_sampler",
            post(weights::save_weights_for_sampler),
        )
        .route(
            "/api/v1/save_weights_external",
            post(weights::save_weights_external),
        )
        .route(
            "/api/v1/create_sampling_session",
            post(sampling::create_sampling_session),
        )
        .route("/api/v1/samplers/{sampler_id}", get(sampling::get_sampler))
        .route("/api/v1/asample", post(sampling::asample))
        .route("/api/v1/get_server_capabilities", get(rest::capabilities))
        .route("/api/v1/weights_info", post(rest::weights_info))
        .route("/api/v1/training_runs", get(rest::training_runs))
        .route("/api/v1/training_runs/{run_id}", get(rest::training_run))
        .route(
            "/api/v1/training_runs/{run_id}/checkpoints",
            get(rest::run_checkpoints),
        )
        .route("/api/v1/checkpoints", get(rest::user_checkpoints))
        .route(ckpt, delete(rest::delete_checkpoint))
        .route(&format!("{ckpt}/ttl"), put(rest::set_ttl))
        .route(
            &format!("{ckpt}/external_weights_urls"),
            get(rest::external_weights_urls),
        )
        .route(&format!("{ckpt}/archive"), get(rest::archive))
        .route("/api/v1/files/{token}/{file}", get(rest::download))
        .route("/api/v1/sessions", get(rest::sessions))
        .route("/api/v1/sessions/{session_id}", get(rest::session))
        .merge(platform::routes())
        .fallback(rest::not_found)
        .with_state(state)
}

/// The App: one page (jobs and the hub) on the platform API, embedded in the binary.
async fn app() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("app/index.html"))
}

/// Serves on `listener` until `shutdown` resolves; the worker runs `host`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    host: Box<dyn Host>,
    config: Config,
    home: &whet_jobs::Home,
    jobs: Option<Arc<dyn Jobs>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = State::start(host, config, home, jobs);
    let reaper = tokio::spawn(state::reap(state.clone()));
    let job_worker = platform::spawn_job_worker(&state);
    let app = router(state.clone());
    let result = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    reaper.abort();
    state.stop();
    if let Some(w) = job_worker {
        w.stop();
    }
    result
}
