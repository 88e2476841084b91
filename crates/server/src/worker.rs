//! The worker: one thread that owns the engine's clients and runs every request in the order it
//! was released (a run's requests in `seq_id` order, see [`crate::state`]).
//!
//! Base weights are the host's business (loaded once per model and shared by every adapter);
//! here each training run is a `TrainingClient` and each sampler a `SamplingClient`. A failure
//! resolves the request's future with `{"error", "category"}`; a panic in the engine is caught
//! and reported the same way, so one bad request never takes the server down.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::mpsc;

use serde_json::{json, Value};
use whet_contract::{
    AdamParams, ContractError, Datum, LoraConfig, LossFn, LossFnConfig, ModelInput, SamplingClient,
    SamplingParams, TrainingClient,
};
use whet_jobs::checkpoints::{CheckpointKind, Checkpoints, RunRecord, TinkerPath};

use crate::error::{contract_category, Category};
use crate::futures::{Futures, Outcome};
use crate::Host;

/// One step of a training run.
#[derive(Debug)]
pub enum TrainOp {
    /// `forward` (no gradients) or `forward_backward`.
    Forward {
        /// The datums, validated.
        data: Vec<Datum>,
        /// The loss.
        loss_fn: LossFn,
        /// Its config.
        config: LossFnConfig,
        /// Accumulate gradients.
        backward: bool,
    },
    /// `optim_step`.
    Optim(AdamParams),
    /// `save_weights` / `save_weights_for_sampler` / `save_weights_external` under `path`.
    Save {
        /// Where (its kind says what is saved).
        path: TinkerPath,
        /// The owner's key fingerprint.
        owner: String,
        /// Expiry from now.
        ttl_seconds: Option<u64>,
        /// The client's metadata.
        user_metadata: Option<Value>,
        /// The `type` of the answer.
        reply_type: &'static str,
    },
    /// `save_weights_and_get_sampling_client`: a snapshot sampler named `sampler_id`.
    Snapshot {
        /// `{session}:sample:{n}`.
        sampler_id: String,
    },
    /// `load_weights` on an existing run (SDK ≤ 0.34's legacy path).
    Load {
        /// The state directory.
        dir: PathBuf,
        /// Its `tinker://` path (for the answer).
        path: String,
        /// Also the optimizer moments and step.
        optimizer: bool,
    },
}

/// A unit of work for the worker.
#[derive(Debug)]
pub enum Work {
    /// `create_model`, or `load_weights` creating a run from a state.
    Create {
        /// The future.
        request_id: String,
        /// The run's record (written once the client exists).
        run: RunRecord,
        /// Its LoRA settings.
        lora: LoraConfig,
        /// A state to load: `(dir, with optimizer, tinker path)`.
        load: Option<(PathBuf, bool, String)>,
    },
    /// A released request of a run.
    Train {
        /// The future.
        request_id: String,
        /// `{session}:train:{n}`.
        run_id: String,
        /// What to do.
        op: TrainOp,
    },
    /// A sampler on a base model or a saved adapter, made when first used.
    OpenSampler {
        /// `{session}:sample:{n}`.
        sampler_id: String,
        /// The base model.
        base_model: String,
        /// A PEFT adapter directory.
        adapter: Option<PathBuf>,
    },
    /// `asample`.
    Sample {
        /// The future.
        request_id: String,
        /// Which sampler.
        sampler_id: String,
        /// The prompt.
        prompt: ModelInput,
        /// How many sequences.
        num_samples: usize,
        /// How to sample.
        params: SamplingParams,
        /// Prompt logprobs too.
        prompt_logprobs: bool,
        /// Top-k prompt logprobs (0 = none).
        topk: usize,
        /// Only the last n prompt logprobs (the rest reported as not computed).
        last_n: Option<usize>,
    },
    /// Forget these runs and samplers (their session ended).
    Drop {
        /// Run ids.
        runs: Vec<String>,
        /// Sampler ids.
        samplers: Vec<String>,
        /// The session expired (no heartbeat): each run trained since its last saved state is
        /// saved first, as `weights/autosave-<unix time>` owned by `(run id, owner)`'s owner.
        autosave: Vec<(String, String)>,
    },
}

enum SamplerSlot {
    Ready(Box<dyn SamplingClient>),
    Lazy {
        base_model: String,
        adapter: Option<PathBuf>,
    },
}

struct Worker {
    host: Box<dyn Host>,
    futures: Futures,
    checkpoints: Checkpoints,
    runs: HashMap<String, Box<dyn TrainingClient>>,
    samplers: HashMap<String, SamplerSlot>,
    exports: u64,
    /// Runs trained since their last saved state: what an expiring session must save.
    unsaved: std::collections::HashSet<String>,
}

/// Starts the worker thread; it ends when every sender of `rx` is gone.
pub fn spawn(
    host: Box<dyn Host>,
    rx: mpsc::Receiver<Work>,
    futures: Futures,
    checkpoints: Checkpoints,
) -> std::thread::JoinHandle<()> {
    let mut worker = Worker {
        host,
        futures,
        checkpoints,
        runs: HashMap::new(),
        samplers: HashMap::new(),
        exports: 0,
        unsaved: std::collections::HashSet::new(),
    };
    std::thread::Builder::new()
        .name("whet-worker".into())
        .spawn(move || {
            for work in rx {
                worker.handle(work);
            }
        })
        .expect("the worker thread starts")
}

fn failed(e: &ContractError) -> Outcome {
    Outcome::Failed {
        message: e.to_string(),
        category: contract_category(e),
    }
}

/// Runs `f`, turning a panic into a server error.
fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, ContractError>,
) -> Result<T, ContractError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            tracing::error!("{what} panicked: {msg}");
            Err(ContractError::Internal(format!(
                "{what} failed inside the engine: {msg}"
            )))
        }
    }
}

impl Worker {
    fn handle(&mut self, work: Work) {
        match work {
            Work::Create {
                request_id,
                run,
                lora,
                load,
            } => {
                let outcome = match self.create(&run, &lora, load) {
                    Ok(v) => Outcome::Json(v),
                    Err(e) => failed(&e),
                };
                self.futures.complete(&request_id, outcome);
            }
            Work::Train {
                request_id,
                run_id,
                op,
            } => {
                let outcome = match self.runs.get_mut(&run_id) {
                    None => Outcome::Failed {
                        message: format!("training client {run_id} does not exist (its creation failed or its session ended)"),
                        category: Category::User,
                    },
                    Some(tc) => {
                        // What the step does to "trained since the last saved state".
                        let effect = match &op {
                            TrainOp::Optim(_) => Some(true),
                            TrainOp::Load { .. } => Some(false),
                            TrainOp::Save { path, .. } if path.kind == CheckpointKind::Training => {
                                Some(false)
                            }
                            _ => None,
                        };
                        let (outcome, snapshot) = train(
                            tc.as_mut(),
                            &run_id,
                            op,
                            &self.checkpoints,
                            &mut self.exports,
                        );
                        if let Some((id, sampler)) = snapshot {
                            self.samplers.insert(id, SamplerSlot::Ready(sampler));
                        }
                        match (effect, &outcome) {
                            (_, Outcome::Failed { .. }) | (None, _) => {}
                            (Some(true), _) => {
                                self.unsaved.insert(run_id.clone());
                            }
                            (Some(false), _) => {
                                self.unsaved.remove(&run_id);
                            }
                        }
                        outcome
                    }
                };
                self.futures.complete(&request_id, outcome);
            }
            Work::OpenSampler {
                sampler_id,
                base_model,
                adapter,
            } => {
                self.samplers.insert(
                    sampler_id,
                    SamplerSlot::Lazy {
                        base_model,
                        adapter,
                    },
                );
            }
            Work::Sample {
                request_id,
                sampler_id,
                prompt,
                num_samples,
                params,
                prompt_logprobs,
                topk,
                last_n,
            } => {
                let outcome = match self.sampler(&sampler_id) {
                    Err(e) => failed(&e),
                    Ok(s) => match guarded("sample", || {
                        s.sample(&prompt, num_samples, &params, prompt_logprobs, topk)
                    }) {
                        Err(e) => failed(&e),
                        Ok(mut r) => {
                            if let (Some(n), Some(lps)) = (last_n, r.prompt_logprobs.as_mut()) {
                                let keep_from = lps.len().saturating_sub(n);
                                lps[..keep_from].iter_mut().for_each(|x| *x = None);
                            }
                            Outcome::Proto(crate::proto::encode_sample_response(&r, topk))
                        }
                    },
                };
                self.futures.complete(&request_id, outcome);
            }
            Work::Drop {
                runs,
                samplers,
                autosave,
            } => {
                for (run_id, owner) in autosave {
                    self.autosave(&run_id, &owner);
                }
                for id in runs {
                    self.unsaved.remove(&id);
                    self.runs.remove(&id);
                }
                for id in samplers {
                    self.samplers.remove(&id);
                }
            }
        }
    }

    /// Saves an abandoned run's state, so a client that vanished loses nothing.
    fn autosave(&mut self, run_id: &str, owner: &str) {
        // Nothing trained since its last saved state (or at all): nothing to lose.
        if !self.unsaved.remove(run_id) {
            return;
        }
        let Some(tc) = self.runs.get_mut(run_id) else {
            return;
        };
        let path = TinkerPath {
            run_id: run_id.to_string(),
            kind: CheckpointKind::Training,
            name: format!("autosave-{}", whet_jobs::now_unix()),
        };
        let op = TrainOp::Save {
            path: path.clone(),
            owner: owner.to_string(),
            ttl_seconds: None,
            user_metadata: None,
            reply_type: "save_weights",
        };
        match train(
            tc.as_mut(),
            run_id,
            op,
            &self.checkpoints,
            &mut self.exports,
        )
        .0
        {
            Outcome::Failed { message, .. } => {
                tracing::error!("{run_id}: saving its state before dropping it failed: {message}")
            }
            _ => tracing::info!(
                "{run_id}: session expired; state saved as {}",
                path.to_uri()
            ),
        }
    }

    fn create(
        &mut self,
        run: &RunRecord,
        lora: &LoraConfig,
        load: Option<(PathBuf, bool, String)>,
    ) -> Result<Value, ContractError> {
        let dir = self.checkpoints.run_dir(&run.training_run_id);
        let host = &mut self.host;
        let mut tc = guarded("create_model", || {
            host.training_client(&run.base_model, lora, &dir)
        })?;
        if let Some((state, optimizer, _)) = &load {
            let state = state.display().to_string();
            guarded("load_weights", || {
                if *optimizer {
                    tc.load_state_with_optimizer(&state)
                } else {
                    tc.load_state(&state)
                }
            })?;
        }
        self.checkpoints
            .write_run(run)
            .map_err(|e| ContractError::Io {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
        self.runs.insert(run.training_run_id.clone(), tc);
        Ok(match load {
            None => json!({"model_id": run.training_run_id, "type": "create_model"}),
            Some((_, _, path)) => {
                json!({"model_id": run.training_run_id, "path": path, "type": "load_weights"})
            }
        })
    }

    fn sampler(&mut self, id: &str) -> Result<&dyn SamplingClient, ContractError> {
        let slot = self.samplers.get_mut(id).ok_or_else(|| {
            ContractError::invalid(
                "sampling_session_id",
                format!("no sampler {id:?} (its session ended)"),
            )
        })?;
        if let SamplerSlot::Lazy {
            base_model,
            adapter,
        } = slot
        {
            let host = &mut self.host;
            let client = guarded("create_sampling_session", || {
                host.sampling_client(base_model, adapter.as_deref())
            })?;
            *slot = SamplerSlot::Ready(client);
        }
        match &*slot {
            SamplerSlot::Ready(s) => Ok(s.as_ref()),
            SamplerSlot::Lazy { .. } => Err(ContractError::Internal(format!(
                "sampler {id:?} could not be made"
            ))),
        }
    }
}

type Snapshot = Option<(String, Box<dyn SamplingClient>)>;

fn train(
    tc: &mut dyn TrainingClient,
    run_id: &str,
    op: TrainOp,
    checkpoints: &Checkpoints,
    exports: &mut u64,
) -> (Outcome, Snapshot) {
    let io = |e: whet_jobs::JobError| ContractError::Internal(e.to_string());
    let result: Result<(Outcome, Snapshot), ContractError> = (|| match op {
        TrainOp::Forward {
            data,
            loss_fn,
            config,
            backward,
        } => {
            let out = guarded("forward_backward", || {
                if backward {
                    tc.forward_backward(&data, loss_fn, &config)
                } else {
                    tc.forward(&data, loss_fn, &config)
                }
            })?;
            Ok((
                Outcome::Proto(crate::proto::encode_train_output(&out)),
                None,
            ))
        }
        TrainOp::Optim(params) => {
            let r = guarded("optim_step", || tc.optim_step(&params))?;
            Ok((
                Outcome::Json(json!({"metrics": r.metrics, "type": "optim_step"})),
                None,
            ))
        }
        TrainOp::Save {
            path,
            owner,
            ttl_seconds,
            user_metadata,
            reply_type,
        } => {
            match path.kind {
                CheckpointKind::Training => {
                    guarded("save_weights", || tc.save_state(&path.name))?;
                }
                CheckpointKind::Sampler => {
                    guarded("save_weights_for_sampler", || {
                        tc.save_weights_for_sampler(&path.name)
                    })?;
                }
                CheckpointKind::External => {
                    // The contract saves PEFT adapters under sampler_weights/; an export is
                    // written there under a fresh name and moved into place whole.
                    *exports += 1;
                    let tmp = format!("export-{}-{}", std::process::id(), exports);
                    let written = guarded("save_weights_external", || {
                        tc.save_weights_for_sampler(&tmp)
                    })?;
                    let dest = checkpoints.dir(&path);
                    let move_err = |e: std::io::Error| ContractError::Io {
                        path: dest.display().to_string(),
                        message: e.to_string(),
                    };
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent).map_err(move_err)?;
                    }
                    if dest.exists() {
                        std::fs::remove_dir_all(&dest).map_err(move_err)?;
                    }
                    std::fs::rename(&written, &dest).map_err(move_err)?;
                }
            }
            let record = checkpoints
                .record(&path, Some(&owner), ttl_seconds, user_metadata)
                .map_err(io)?;
            let mut reply = json!({"path": path.to_uri(), "type": reply_type});
            if path.kind == CheckpointKind::External {
                reply["size_bytes"] = json!(record.size_bytes);
            }
            Ok((Outcome::Json(reply), None))
        }
        TrainOp::Snapshot { sampler_id } => {
            let sampler = guarded("save_weights_for_sampler", || tc.sampling_client())?;
            Ok((
                Outcome::Json(json!({
                    "sampling_session_id": sampler_id,
                    "type": "save_weights_for_sampler",
                })),
                Some((sampler_id, sampler)),
            ))
        }
        TrainOp::Load {
            dir,
            path,
            optimizer,
        } => {
            let dir = dir.display().to_string();
            guarded("load_weights", || {
                if optimizer {
                    tc.load_state_with_optimizer(&dir)
                } else {
                    tc.load_state(&dir)
                }
            })?;
            Ok((
                Outcome::Json(json!({"path": path, "model_id": run_id, "type": "load_weights"})),
                None,
            ))
        }
    })();
    result.unwrap_or_else(|e| (failed(&e), None))
}
