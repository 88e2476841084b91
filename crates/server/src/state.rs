//! The server's state: sessions, training runs and their `seq_id` order, samplers, keys.
//!
//! Ordering: each training client numbers its requests 1, 2, 3 … and the SDK sends chunks of one
//! call concurrently (the first chunk last), so requests arrive out of order. A request waits in
//! its run's queue until every earlier `seq_id` has gone to the worker; a retry of a `seq_id`
//! already seen answers the same future, so a gradient is never applied twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use whet_contract::LoraConfig;
use whet_jobs::checkpoints::Checkpoints;

use crate::error::{ApiError, Category};
use crate::futures::Futures;
use crate::worker::{TrainOp, Work};
use crate::{Config, Host, ServedModel};

/// A training run being served (a training client on the worker).
#[derive(Debug)]
pub struct Run {
    /// The key fingerprint that made it.
    pub owner: String,
    /// The session it belongs to.
    pub session_id: String,
    /// Its base model.
    pub base_model: String,
    /// Its LoRA settings.
    pub lora: LoraConfig,
    next_seq: i64,
    /// Requests waiting for an earlier seq_id; `None` for one refused at submission.
    waiting: BTreeMap<i64, (String, Option<TrainOp>)>,
    seen: HashMap<i64, String>,
    gap_since: Option<Instant>,
}

/// A sampler being served.
#[derive(Debug)]
pub struct Sampler {
    /// The key fingerprint that made it.
    pub owner: String,
    /// Its base model.
    pub base_model: String,
    /// The checkpoint it samples, if any.
    pub model_path: Option<String>,
    seen: HashMap<i64, String>,
}

#[derive(Debug)]
struct Session {
    owner: String,
    last_seen: Instant,
    finished: Option<String>,
    runs: Vec<String>,
    samplers: Vec<String>,
    user_metadata: Option<Value>,
}

#[derive(Default)]
struct Registry {
    sessions: HashMap<String, Session>,
    runs: HashMap<String, Run>,
    samplers: HashMap<String, Sampler>,
    session_counter: u64,
}

/// What an ended session leaves for the worker to drop: its run ids and sampler ids.
pub type Ended = (Vec<String>, Vec<String>);

/// Everything the handlers share.
pub struct State {
    /// The settings.
    pub config: Config,
    /// The futures table.
    pub futures: Futures,
    /// The home's checkpoints.
    pub checkpoints: Checkpoints,
    /// The home (jobs and registries for the platform API).
    pub home: whet_jobs::Home,
    /// Submitting and running jobs (absent: the platform API is read-only).
    pub jobs: Option<Arc<dyn crate::Jobs>>,
    /// Download tokens of external weights: token → (checkpoint dir, expiry).
    pub downloads: Mutex<HashMap<String, (std::path::PathBuf, Instant)>>,
    instance: String,
    registry: Mutex<Registry>,
    work: Mutex<Option<mpsc::Sender<Work>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A short fingerprint of an API key (keys themselves are never stored).
pub fn key_fingerprint(key: &str) -> String {
    whet_jobs::keys::fingerprint(key)
}

impl State {
    /// Starts the worker on `host` and returns the shared state.
    pub fn start(
        host: Box<dyn Host>,
        config: Config,
        home: &whet_jobs::Home,
        jobs: Option<Arc<dyn crate::Jobs>>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel();
        let futures = Futures::default();
        let checkpoints = Checkpoints::new(home);
        let worker = crate::worker::spawn(host, rx, futures.clone(), checkpoints.clone());
        // Run ids must not collide with the ones an earlier server left in the home.
        let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
        let instance = key_fingerprint(&seed)[..8].to_string();
        Arc::new(Self {
            config,
            futures,
            checkpoints,
            home: home.clone(),
            jobs,
            downloads: Mutex::new(HashMap::new()),
            instance,
            registry: Mutex::new(Registry::default()),
            work: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Stops the worker after the work already queued.
    pub fn stop(&self) {
        drop(lock(&self.work).take());
        if let Some(handle) = lock(&self.worker).take() {
            let _ = handle.join();
        }
    }

    /// Queues work for the worker.
    pub fn send(&self, work: Work) -> Result<(), ApiError> {
        lock(&self.work)
            .as_ref()
            .and_then(|tx| tx.send(work).ok())
            .ok_or_else(|| ApiError::internal("the server is shutting down"))
    }

    /// The served model `name`, or a 400 listing the served ones.
    pub fn model(&self, field: &str, name: &str) -> Result<&ServedModel, ApiError> {
        self.config
            .models
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.config.models.iter().map(|m| m.name.as_str()).collect();
                ApiError::bad(
                    field,
                    format!("unknown model {name:?}; this server serves {names:?}"),
                )
            })
    }

    /// The caller's key fingerprint, or 401.
    pub fn owner(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let key = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let Some(key) = key else {
            return Err(ApiError::unauthorized(
                "no X-API-Key header (set TINKER_API_KEY)",
            ));
        };
        let fp = key_fingerprint(key);
        if self.config.open_access {
            if !key.starts_with("tml-") {
                return Err(ApiError::unauthorized("API keys start with 'tml-'"));
            }
            return Ok(fp);
        }
        if self.config.keys.contains(&fp) {
            Ok(fp)
        } else {
            Err(ApiError::unauthorized(
                "unknown API key: this server accepts the keys made with `whet keys create`",
            ))
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    /// Checks that `session_id` is live and owned by `owner`.
    pub fn check_session(&self, owner: &str, session_id: &str) -> Result<(), ApiError> {
        let mut reg = self.registry();
        let s = reg
            .sessions
            .get_mut(session_id)
            .filter(|s| s.owner == owner)
            .ok_or_else(|| ApiError::not_found(format!("no session {session_id:?}")))?;
        if let Some(why) = &s.finished {
            return Err(ApiError::gone(format!(
                "session {session_id} is over ({why})"
            )));
        }
        s.last_seen = Instant::now();
        Ok(())
    }

    /// Registers run `run_id` of `session_id`; its first sequenced request is `first_seq`.
    pub fn add_run(
        &self,
        owner: &str,
        session_id: &str,
        run_id: &str,
        base_model: &str,
        lora: LoraConfig,
        first_seq: i64,
    ) -> Result<(), ApiError> {
        self.check_session(owner, session_id)?;
        let mut reg = self.registry();
        if reg.runs.contains_key(run_id) {
            return Err(ApiError {
                status: StatusCode::CONFLICT,
                message: format!("model_seq_id: training client {run_id} exists already"),
            });
        }
        reg.runs.insert(
            run_id.to_string(),
            Run {
                owner: owner.to_string(),
                session_id: session_id.to_string(),
                base_model: base_model.to_string(),
                lora,
                next_seq: first_seq,
                waiting: BTreeMap::new(),
                seen: HashMap::new(),
                gap_since: None,
            },
        );
        if let Some(s) = reg.sessions.get_mut(session_id) {
            s.runs.push(run_id.to_string());
        }
        Ok(())
    }

    /// `(base_model, lora)` of run `run_id` owned by `owner`.
    pub fn run_info(&self, owner: &str, run_id: &str) -> Result<(String, LoraConfig), ApiError> {
        let reg = self.registry();
        let run = reg
            .runs
            .get(run_id)
            .filter(|r| r.owner == owner)
            .ok_or_else(|| {
                ApiError::not_found(format!("model_id: no training client {run_id:?}"))
            })?;
        Ok((run.base_model.clone(), run.lora.clone()))
    }

    /// Queues `op` as request `seq_id` of run `run_id`; answers the future id (the same one
    /// for a retry of a `seq_id` already seen).
    pub fn submit_train(
        &self,
        owner: &str,
        run_id: &str,
        seq_id: Option<i64>,
        op: Result<TrainOp, ApiError>,
    ) -> Result<String, ApiError> {
        let seq = seq_id.ok_or_else(|| ApiError::bad("seq_id", "required"))?;
        let mut reg = self.registry();
        let session_id = {
            let run = reg
                .runs
                .get(run_id)
                .filter(|r| r.owner == owner)
                .ok_or_else(|| {
                    ApiError::not_found(format!("model_id: no training client {run_id:?}"))
                })?;
            run.session_id.clone()
        };
        if let Some(s) = reg.sessions.get_mut(&session_id) {
            if let Some(why) = &s.finished {
                return Err(ApiError::gone(format!(
                    "session {session_id} is over ({why})"
                )));
            }
            s.last_seen = Instant::now();
        }
        let run = reg.runs.get_mut(run_id).expect("checked above");
        if let Some(id) = run.seen.get(&seq) {
            return Ok(id.clone());
        }
        if seq < run.next_seq {
            return Err(ApiError::bad(
                "seq_id",
                format!(
                    "{seq} of {run_id} was already executed (the next expected is {})",
                    run.next_seq
                ),
            ));
        }
        let request_id = self.futures.create(owner);
        run.seen.insert(seq, request_id.clone());
        // A refused request still uses up its seq_id (the client has counted it): it is
        // answered with the error now and passed over in order, so the next one is not left
        // waiting for it.
        let refused = op.as_ref().err().cloned();
        match op {
            Ok(op) => run.waiting.insert(seq, (request_id.clone(), Some(op))),
            Err(e) => {
                self.futures
                    .fail(&request_id, e.category(), e.message.clone());
                run.waiting.insert(seq, (request_id.clone(), None))
            }
        };
        let mut ready = Vec::new();
        while let Some((id, op)) = run.waiting.remove(&run.next_seq) {
            if let Some(op) = op {
                ready.push((id, op));
            }
            run.next_seq += 1;
        }
        run.gap_since = if run.waiting.is_empty() {
            None
        } else {
            run.gap_since.or(Some(Instant::now()))
        };
        drop(reg);
        for (id, op) in ready {
            self.send(Work::Train {
                request_id: id,
                run_id: run_id.to_string(),
                op,
            })?;
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(request_id),
        }
    }

    /// Registers sampler `sampler_id` of `session_id`.
    pub fn add_sampler(
        &self,
        owner: &str,
        session_id: &str,
        sampler_id: &str,
        base_model: &str,
        model_path: Option<String>,
    ) -> Result<(), ApiError> {
        self.check_session(owner, session_id)?;
        let mut reg = self.registry();
        reg.samplers.insert(
            sampler_id.to_string(),
            Sampler {
                owner: owner.to_string(),
                base_model: base_model.to_string(),
                model_path,
                seen: HashMap::new(),
            },
        );
        if let Some(s) = reg.sessions.get_mut(session_id) {
            s.samplers.push(sampler_id.to_string());
        }
        Ok(())
    }

    /// `(base_model, model_path)` of sampler `sampler_id` owned by `owner`.
    pub fn sampler_info(
        &self,
        owner: &str,
        sampler_id: &str,
    ) -> Result<(String, Option<String>), ApiError> {
        let reg = self.registry();
        let s = reg
            .samplers
            .get(sampler_id)
            .filter(|s| s.owner == owner)
            .ok_or_else(|| ApiError::not_found(format!("no sampler {sampler_id:?}")))?;
        Ok((s.base_model.clone(), s.model_path.clone()))
    }

    /// The future of sample request `seq_id` of `sampler_id`: `(id, true)` when it is new
    /// (the caller queues the work), `(id, false)` for a resubmission.
    pub fn sample_future(
        &self,
        owner: &str,
        sampler_id: &str,
        seq_id: i64,
    ) -> Result<(String, bool), ApiError> {
        let mut reg = self.registry();
        let s = reg
            .samplers
            .get_mut(sampler_id)
            .filter(|s| s.owner == owner)
            .ok_or_else(|| {
                ApiError::not_found(format!("sampling_session_id: no sampler {sampler_id:?}"))
            })?;
        if let Some(id) = s.seen.get(&seq_id) {
            return Ok((id.clone(), false));
        }
        let id = self.futures.create(owner);
        s.seen.insert(seq_id, id.clone());
        Ok((id, true))
    }

    /// Opens a session of `owner`; returns its id.
    pub fn new_session(&self, owner: &str, user_metadata: Option<Value>) -> String {
        let mut reg = self.registry();
        reg.session_counter += 1;
        let id = format!("{}-{}", self.instance, reg.session_counter);
        reg.sessions.insert(
            id.clone(),
            Session {
                owner: owner.to_string(),
                last_seen: Instant::now(),
                finished: None,
                runs: Vec::new(),
                samplers: Vec::new(),
                user_metadata,
            },
        );
        id
    }

    /// Ends a session (the first reason wins): its runs and samplers leave the registry and
    /// are returned for the worker to drop; `None` when it had ended already.
    pub fn finish_session(
        &self,
        owner: &str,
        session_id: &str,
        reason: &str,
    ) -> Result<Option<Ended>, ApiError> {
        let mut reg = self.registry();
        let s = reg
            .sessions
            .get_mut(session_id)
            .filter(|s| s.owner == owner)
            .ok_or_else(|| ApiError::not_found(format!("no session {session_id:?}")))?;
        if s.finished.is_some() {
            return Ok(None);
        }
        s.finished = Some(format!("finished: {reason}"));
        let runs = std::mem::take(&mut s.runs);
        let samplers = std::mem::take(&mut s.samplers);
        for id in &runs {
            if let Some(run) = reg.runs.remove(id) {
                for (req, _) in run.waiting.into_values() {
                    self.futures.fail(
                        &req,
                        Category::User,
                        "the session finished before this request ran",
                    );
                }
            }
        }
        for id in &samplers {
            reg.samplers.remove(id);
        }
        Ok(Some((runs, samplers)))
    }

    /// Ends sessions without heartbeats and fails requests stuck behind a missing `seq_id`.
    fn reap_once(&self) {
        let now = Instant::now();
        let mut reg = self.registry();
        let timeout = self.config.session_timeout;
        let stale: Vec<String> = reg
            .sessions
            .iter()
            .filter(|(_, s)| s.finished.is_none() && now - s.last_seen > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut dropped_runs = Vec::new();
        let mut dropped_samplers = Vec::new();
        for id in stale {
            tracing::info!("session {id}: no heartbeat for {timeout:?}, ending it");
            if let Some(s) = reg.sessions.get_mut(&id) {
                s.finished = Some(format!("no heartbeat for {} s", timeout.as_secs()));
                dropped_runs.append(&mut s.runs);
                dropped_samplers.append(&mut s.samplers);
            }
        }
        let mut autosave = Vec::new();
        for id in &dropped_runs {
            if let Some(run) = reg.runs.remove(id) {
                autosave.push((id.clone(), run.owner.clone()));
                for (req, _) in run.waiting.into_values() {
                    self.futures.fail(
                        &req,
                        Category::User,
                        "the session ended before this request ran",
                    );
                }
            }
        }
        for id in &dropped_samplers {
            reg.samplers.remove(id);
        }
        let gap = self.config.seq_gap_timeout;
        for (id, run) in reg.runs.iter_mut() {
            if run.gap_since.is_some_and(|t| now - t > gap) {
                let missing = run.next_seq;
                tracing::warn!(
                    "{id}: seq_id {missing} never arrived; failing the requests after it"
                );
                for (seq, (req, _)) in std::mem::take(&mut run.waiting) {
                    self.futures.fail(
                        &req,
                        Category::User,
                        format!(
                            "seq_id {seq} waited {} s for seq_id {missing}, which never arrived",
                            gap.as_secs()
                        ),
                    );
                    run.next_seq = run.next_seq.max(seq + 1);
                }
                run.gap_since = None;
            }
        }
        drop(reg);
        if !dropped_runs.is_empty() || !dropped_samplers.is_empty() {
            let _ = self.send(Work::Drop {
                runs: dropped_runs,
                samplers: dropped_samplers,
                autosave,
            });
        }
        self.checkpoints.sweep_expired();
        lock(&self.downloads).retain(|_, (_, exp)| *exp > now);
    }
}

/// Locks a mutex, going on after a panic elsewhere (the data stays consistent per call).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The housekeeping loop: every few seconds, [`State::reap_once`].
pub async fn reap(state: Arc<State>) {
    let every = (state.config.session_timeout / 4)
        .clamp(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        tokio::time::sleep(every).await;
        state.reap_once();
    }
}

/// JSON bodies: any field the handler does not name is ignored (the SDK adds fields between
/// versions), but a body that is not JSON is a 400 naming the parse error.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad("body", e))
}

/// Facts `GET /api/v1/sessions/{id}` reports.
pub fn session_summary(state: &State, owner: &str, session_id: &str) -> Option<Value> {
    let reg = state.registry();
    let s = reg.sessions.get(session_id).filter(|s| s.owner == owner)?;
    Some(json!({
        "training_run_ids": s.runs,
        "sampler_ids": s.samplers,
        "user_metadata": s.user_metadata,
    }))
}

/// The ids of `owner`'s sessions, newest first.
pub fn session_ids(state: &State, owner: &str) -> Vec<String> {
    let reg = state.registry();
    let mut ids: Vec<(&String, Instant)> = reg
        .sessions
        .iter()
        .filter(|(_, s)| s.owner == owner)
        .map(|(id, s)| (id, s.last_seen))
        .collect();
    ids.sort_by_key(|(_, seen)| std::cmp::Reverse(*seen));
    ids.into_iter().map(|(id, _)| id.clone()).collect()
}
