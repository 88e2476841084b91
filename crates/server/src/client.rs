//! A Tinker-protocol client: the contract's [`TrainingClient`] and [`SamplingClient`] over
//! HTTP, against `whet serve` on another machine or any Tinker-protocol service — so a job
//! written for this machine runs on a bigger one unchanged (`backend = "tinker"`).
//!
//! Blocking and sequential: each call submits its request and waits for the future (the
//! server's long poll). A connection is one session with a heartbeat thread; dropping it ends
//! the session. Transient failures (connection errors, 408/429/5xx) are retried with backoff
//! for up to two minutes, with the same `seq_id`, which the server deduplicates.

mod codec;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use whet_contract::{
    AdamParams, ContractError, Datum, ForwardBackwardOutput, LoraConfig, LossFn, LossFnConfig,
    ModelInfo, ModelInput, OptimStepResponse, SampleResponse, SamplingClient, SamplingParams,
    TrainingClient,
};

/// How long transient failures are retried.
const RETRY_FOR: Duration = Duration::from_secs(120);

/// What a request returned.
enum Answer {
    Json(Value),
    Proto(Vec<u8>),
}

/// One session on a Tinker-protocol server.
pub struct Connection {
    base: String,
    key: String,
    agent: ureq::Agent,
    session_id: String,
    model_seq: AtomicI64,
    sampler_seq: AtomicI64,
    alive: Arc<AtomicBool>,
}

fn failed(message: impl Into<String>) -> ContractError {
    ContractError::Internal(message.into())
}

impl Connection {
    /// Opens a session on the server at `base_url` with `api_key`.
    pub fn open(base_url: &str, api_key: &str) -> Result<Arc<Self>, ContractError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(180)))
            .build()
            .into();
        let mut conn = Self {
            base: base_url.trim_end_matches('/').to_string(),
            key: api_key.to_string(),
            agent,
            session_id: String::new(),
            model_seq: AtomicI64::new(0),
            sampler_seq: AtomicI64::new(0),
            alive: Arc::new(AtomicBool::new(true)),
        };
        conn.json("client/config", &json!({"sdk_version": "whet"}))?;
        let s = conn.json(
            "create_session",
            &json!({"tags": ["whet"], "user_metadata": {}, "sdk_version": "whet", "type": "create_session"}),
        )?;
        conn.session_id = s["session_id"]
            .as_str()
            .ok_or_else(|| failed(format!("create_session answered {s}")))?
            .to_string();
        let conn = Arc::new(conn);
        // Heartbeats every 10 s keep the session (and its adapters) alive on the server.
        let weak = Arc::downgrade(&conn);
        let alive = conn.alive.clone();
        std::thread::Builder::new()
            .name("whet-heartbeat".into())
            .spawn(move || loop {
                for _ in 0..100 {
                    std::thread::sleep(Duration::from_millis(100));
                    if !alive.load(Ordering::Relaxed) {
                        return;
                    }
                }
                let Some(c) = weak.upgrade() else { return };
                let body = json!({"session_id": c.session_id, "type": "session_heartbeat"});
                if let Err(e) = c.json("session_heartbeat", &body) {
                    tracing::warn!("heartbeat to {}: {e}", c.base);
                }
            })
            .map_err(|e| failed(e.to_string()))?;
        Ok(conn)
    }

    /// The session id.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.base)
    }

    /// One request, retried on transient failures; 4xx answers become errors naming the
    /// server's message.
    fn request(&self, path: &str, body: Option<(&[u8], &str)>) -> Result<Answer, ContractError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(500);
        loop {
            let sent = match body {
                Some((bytes, content_type)) => self
                    .agent
                    .post(&self.url(path))
                    .header("X-API-Key", &self.key)
                    .header("Content-Type", content_type)
                    .header("Accept", "application/json, application/x-protobuf")
                    .send(bytes),
                None => self
                    .agent
                    .get(&self.url(path))
                    .header("X-API-Key", &self.key)
                    .call(),
            };
            let retry = match sent {
                Err(e) => format!("{}: {e}", self.url(path)),
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let proto = resp
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains("protobuf"));
                    let bytes = resp
                        .body_mut()
                        .with_config()
                        .limit(1 << 30)
                        .read_to_vec()
                        .map_err(|e| failed(format!("{}: {e}", self.url(path))))?;
                    if status == 200 {
                        return Ok(if proto {
                            Answer::Proto(bytes)
                        } else {
                            Answer::Json(serde_json::from_slice(&bytes).map_err(|e| {
                                failed(format!("{}: not JSON: {e}", self.url(path)))
                            })?)
                        });
                    }
                    let message = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_string))
                        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
                    if !(status == 408 || status == 429 || status >= 500) {
                        return Err(ContractError::invalid(
                            path,
                            format!("the server answered {status}: {message}"),
                        ));
                    }
                    format!("{}: {status} {message}", self.url(path))
                }
            };
            if start.elapsed() > RETRY_FOR {
                return Err(failed(format!("gave up after {RETRY_FOR:?}: {retry}")));
            }
            tracing::warn!("{retry}; retrying in {delay:?}");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    fn json(&self, path: &str, body: &Value) -> Result<Value, ContractError> {
        match self.request(
            path,
            Some((body.to_string().as_bytes(), "application/json")),
        )? {
            Answer::Json(v) => Ok(v),
            Answer::Proto(_) => Err(failed(format!("{path}: protobuf where JSON was expected"))),
        }
    }

    /// Waits for the future a submission answered.
    fn wait(&self, submitted: &Value) -> Result<Answer, ContractError> {
        let id = submitted["request_id"]
            .as_str()
            .ok_or_else(|| failed(format!("not a future: {submitted}")))?;
        loop {
            let answer = self.request(
                "retrieve_future",
                Some((
                    json!({"request_id": id, "allow_metadata_only": false})
                        .to_string()
                        .as_bytes(),
                    "application/json",
                )),
            )?;
            match answer {
                Answer::Json(v) if v["type"] == "try_again" => continue,
                Answer::Json(v) if v.get("error").is_some() => {
                    let message = v["error"].as_str().unwrap_or("failed").to_string();
                    return Err(if v["category"] == "user" {
                        ContractError::invalid("request", message)
                    } else {
                        failed(message)
                    });
                }
                other => return Ok(other),
            }
        }
    }

    fn wait_json(&self, submitted: &Value) -> Result<Value, ContractError> {
        match self.wait(submitted)? {
            Answer::Json(v) => Ok(v),
            Answer::Proto(_) => Err(failed("protobuf where JSON was expected")),
        }
    }

    fn wait_proto(&self, submitted: &Value) -> Result<Vec<u8>, ContractError> {
        match self.wait(submitted)? {
            Answer::Proto(b) => Ok(b),
            Answer::Json(v) => Err(failed(format!("JSON where protobuf was expected: {v}"))),
        }
    }

    /// The served models: `(name, max_context_length)`.
    pub fn models(&self) -> Result<Vec<(String, usize)>, ContractError> {
        let Answer::Json(v) = self.request("get_server_capabilities", None)? else {
            return Err(failed("get_server_capabilities answered protobuf"));
        };
        Ok(v["supported_models"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        Some((
                            m["model_name"].as_str()?.to_string(),
                            m["max_context_length"].as_u64().unwrap_or(0) as usize,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// A new LoRA training client on `base_model`.
    pub fn training_client(
        self: &Arc<Self>,
        base_model: &str,
        lora: &LoraConfig,
    ) -> Result<RemoteTraining, ContractError> {
        let n = self.model_seq.fetch_add(1, Ordering::SeqCst);
        let submitted = self.json(
            "create_model",
            &json!({"session_id": self.session_id, "model_seq_id": n, "base_model": base_model,
                    "lora_config": lora, "optimizer_config": {"type": "adamw"},
                    "type": "create_model"}),
        )?;
        let created = self.wait_json(&submitted)?;
        let model_id = created["model_id"]
            .as_str()
            .ok_or_else(|| failed(format!("create_model answered {created}")))?
            .to_string();
        Ok(RemoteTraining {
            conn: self.clone(),
            model_id,
            base_model: base_model.to_string(),
            rank: lora.rank,
            seq: 0,
        })
    }

    /// A sampler on a base model or on a checkpoint (`tinker://…`).
    fn sampler(self: &Arc<Self>, what: Value) -> Result<RemoteSampler, ContractError> {
        let n = self.sampler_seq.fetch_add(1, Ordering::SeqCst);
        let mut body = json!({"session_id": self.session_id, "sampling_session_seq_id": n,
                              "type": "create_sampling_session"});
        if let (Some(b), Some(w)) = (body.as_object_mut(), what.as_object()) {
            b.extend(w.clone());
        }
        let v = self.json("create_sampling_session", &body)?;
        let id = v["sampling_session_id"]
            .as_str()
            .ok_or_else(|| failed(format!("create_sampling_session answered {v}")))?;
        Ok(RemoteSampler {
            conn: self.clone(),
            sampler_id: id.to_string(),
            seq: AtomicI64::new(0),
        })
    }

    /// A sampler on `base_model` alone.
    pub fn base_sampler(
        self: &Arc<Self>,
        base_model: &str,
    ) -> Result<RemoteSampler, ContractError> {
        self.sampler(json!({"base_model": base_model}))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        let body = json!({"reason": {"type": "success"}, "detail": null});
        let path = format!("sessions/{}/finish", self.session_id);
        let _ = self
            .agent
            .post(&self.url(&path))
            .header("X-API-Key", &self.key)
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes());
    }
}

/// A LoRA training client on a remote server.
pub struct RemoteTraining {
    conn: Arc<Connection>,
    model_id: String,
    base_model: String,
    rank: usize,
    seq: i64,
}

impl RemoteTraining {
    /// The server's id of this client (`{session}:train:{n}`).
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    fn next_seq(&mut self) -> i64 {
        self.seq += 1;
        self.seq
    }

    fn train(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        config: &LossFnConfig,
        forward_only: bool,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        let seq = self.next_seq();
        let body = codec::encode_train_request(
            &self.model_id,
            seq,
            data,
            loss_fn.name(),
            config,
            forward_only,
        );
        let submitted = match self
            .conn
            .request("forward_backward", Some((&body, "application/x-protobuf")))?
        {
            Answer::Json(v) => v,
            Answer::Proto(_) => return Err(failed("forward_backward answered protobuf")),
        };
        codec::decode_train_output(&self.conn.wait_proto(&submitted)?)
    }

    fn save(&mut self, endpoint: &str, extra: Value) -> Result<Value, ContractError> {
        let seq = self.next_seq();
        let mut body = json!({"model_id": self.model_id, "seq_id": seq, "type": endpoint});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let submitted = self.conn.json(endpoint, &body)?;
        self.conn.wait_json(&submitted)
    }

    fn load(&mut self, path: &str, optimizer: bool) -> Result<(), ContractError> {
        if !path.starts_with("tinker://") {
            return Err(ContractError::invalid(
                "path",
                format!("{path}: a remote training client loads tinker:// checkpoints only"),
            ));
        }
        self.save(
            "load_weights",
            json!({"path": path, "optimizer": optimizer}),
        )
        .map(|_| ())
    }
}

impl TrainingClient for RemoteTraining {
    fn forward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        loss_fn_config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        self.train(data, loss_fn, loss_fn_config, true)
    }

    fn forward_backward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        loss_fn_config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        self.train(data, loss_fn, loss_fn_config, false)
    }

    fn optim_step(&mut self, params: &AdamParams) -> Result<OptimStepResponse, ContractError> {
        let v = self.save("optim_step", json!({"adam_params": params}))?;
        let metrics = serde_json::from_value(v["metrics"].clone()).unwrap_or_default();
        Ok(OptimStepResponse { metrics })
    }

    fn save_state(&mut self, name: &str) -> Result<String, ContractError> {
        let v = self.save("save_weights", json!({"path": name}))?;
        v["path"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| failed(format!("save_weights answered {v}")))
    }

    fn load_state(&mut self, path: &str) -> Result<(), ContractError> {
        self.load(path, false)
    }

    fn load_state_with_optimizer(&mut self, path: &str) -> Result<(), ContractError> {
        self.load(path, true)
    }

    fn save_weights_for_sampler(&mut self, name: &str) -> Result<String, ContractError> {
        let v = self.save(
            "save_weights_for_sampler",
            json!({"path": name, "kind": "snapshot"}),
        )?;
        v["path"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| failed(format!("save_weights_for_sampler answered {v}")))
    }

    fn sampling_client(&mut self) -> Result<Box<dyn SamplingClient>, ContractError> {
        let n = self.conn.sampler_seq.fetch_add(1, Ordering::SeqCst);
        let v = self.save(
            "save_weights_for_sampler",
            json!({"sampling_session_seq_id": n, "kind": "snapshot"}),
        )?;
        let id = v["sampling_session_id"]
            .as_str()
            .ok_or_else(|| failed(format!("save_weights_for_sampler answered {v}")))?;
        Ok(Box::new(RemoteSampler {
            conn: self.conn.clone(),
            sampler_id: id.to_string(),
            seq: AtomicI64::new(0),
        }))
    }

    fn base_sampling_client(&mut self) -> Result<Box<dyn SamplingClient>, ContractError> {
        Ok(Box::new(self.conn.base_sampler(&self.base_model)?))
    }

    fn get_info(&self) -> Result<ModelInfo, ContractError> {
        let v = self.conn.json(
            "get_info",
            &json!({"model_id": self.model_id, "type": "get_info"}),
        )?;
        let context = self
            .conn
            .models()
            .ok()
            .and_then(|m| m.into_iter().find(|(n, _)| *n == self.base_model))
            .map(|(_, c)| c)
            .unwrap_or(0);
        Ok(ModelInfo {
            model_name: v["model_data"]["model_name"]
                .as_str()
                .unwrap_or(&self.base_model)
                .to_string(),
            lora_rank: v["lora_rank"]
                .as_u64()
                .map(|r| r as usize)
                .unwrap_or(self.rank),
            tokenizer_id: v["model_data"]["tokenizer_id"]
                .as_str()
                .unwrap_or(&self.base_model)
                .to_string(),
            max_context_length: context,
        })
    }
}

/// A sampler on a remote server.
pub struct RemoteSampler {
    conn: Arc<Connection>,
    sampler_id: String,
    seq: AtomicI64,
}

impl SamplingClient for RemoteSampler {
    fn sample(
        &self,
        prompt: &ModelInput,
        num_samples: usize,
        params: &SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> Result<SampleResponse, ContractError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let body = json!({
            "sampling_session_id": self.sampler_id, "seq_id": seq, "num_samples": num_samples,
            "prompt": prompt, "sampling_params": params,
            "prompt_logprobs": include_prompt_logprobs || topk_prompt_logprobs > 0,
            "topk_prompt_logprobs": topk_prompt_logprobs, "type": "sample",
        });
        let submitted = self.conn.json("asample", &body)?;
        codec::decode_sample_response(&self.conn.wait_proto(&submitted)?)
    }

    fn compute_logprobs(&self, prompt: &ModelInput) -> Result<Vec<Option<f32>>, ContractError> {
        let params = SamplingParams {
            max_tokens: Some(1),
            ..SamplingParams::default()
        };
        let r = self.sample(prompt, 1, &params, true, 0)?;
        r.prompt_logprobs
            .ok_or_else(|| failed("asample gave no prompt logprobs"))
    }
}

/// Downloads checkpoint `tinker_path`'s files into `dir` (via the server's signed URLs);
/// `whet serve` signs any checkpoint, hosted services their `external_weights` exports.
pub fn download(conn: &Connection, tinker_path: &str, dir: &Path) -> Result<(), ContractError> {
    let rest = tinker_path
        .strip_prefix("tinker://")
        .ok_or_else(|| ContractError::invalid("path", format!("{tinker_path}: not tinker://")))?;
    let (run, ckpt) = rest
        .split_once('/')
        .ok_or_else(|| ContractError::invalid("path", format!("{tinker_path}: no checkpoint")))?;
    let Answer::Json(v) = conn.request(
        &format!("training_runs/{run}/checkpoints/{ckpt}/external_weights_urls"),
        None,
    )?
    else {
        return Err(failed("external_weights_urls answered protobuf"));
    };
    let urls = v["urls"]
        .as_object()
        .ok_or_else(|| failed(format!("external_weights_urls answered {v}")))?;
    let io = |e: std::io::Error| ContractError::Io {
        path: dir.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    for (name, url) in urls {
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(failed(format!("refusing to write {name:?}")));
        }
        let url = url.as_str().unwrap_or_default();
        let bytes = conn
            .agent
            .get(url)
            .call()
            .map_err(|e| failed(format!("{url}: {e}")))?
            .body_mut()
            .with_config()
            .limit(1 << 34)
            .read_to_vec()
            .map_err(|e| failed(format!("{url}: {e}")))?;
        let tmp = dir.join(format!(".{name}.part"));
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, dir.join(name)).map_err(io)?;
    }
    Ok(())
}
