//! The backend of jobs: whet's engine on this machine (`backend = "local"`) or a Tinker-protocol
//! server (`backend = "tinker"`, see [`crate::remote`]), and the terminal's progress bar.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use whet_contract::TrainingClient;
use whet_engine::{ModelSource, Precision, TrainingSession};
use whet_jobs::{BaseModel, JobError, LoraSpec};
use whet_lora::{LoraConfig, Target};

use crate::common;

/// Set by the first Ctrl-C (or SIGTERM): the job stops after the step in progress and keeps
/// its last checkpoint; a second Ctrl-C exits at once.
pub static CANCEL: AtomicBool = AtomicBool::new(false);

/// Routes Ctrl-C (SIGINT) and SIGTERM to [`CANCEL`].
pub fn catch_interrupts() {
    let installed = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ncancelling after this step (Ctrl-C again to quit now)");
    });
    if let Err(e) = installed {
        tracing::warn!("Ctrl-C will not cancel cleanly: {e}");
    }
}

fn backend_error(e: impl std::fmt::Display) -> JobError {
    JobError::Backend(e.to_string())
}

/// The engine in this process (the model loaded once per job), or, for a
/// `backend = "tinker"` job, a Tinker-protocol server.
#[derive(Default)]
pub struct Local {
    loaded: Option<common::Loaded>,
    remote: Option<crate::remote::Remote>,
}

impl whet_jobs::Backend for Local {
    fn select(&mut self, spec: &whet_jobs::JobSpec) -> Result<(), JobError> {
        self.remote = match (spec.backend, &spec.tinker) {
            (whet_jobs::spec::BackendKind::Tinker, Some(t)) => {
                Some(crate::remote::Remote::new(t.clone()))
            }
            (whet_jobs::spec::BackendKind::Tinker, None) => {
                return Err(JobError::Invalid(
                    "backend = \"tinker\" needs a [tinker] table".into(),
                ))
            }
            (whet_jobs::spec::BackendKind::Local, _) => None,
        };
        Ok(())
    }

    fn check_model(&mut self, model: &str) -> Result<(), JobError> {
        ModelSource::resolve(model)
            .map(|_| ())
            .map_err(|e| backend_error(format!("model {model:?}: {e}")))
    }

    fn load_model(
        &mut self,
        model: &str,
        precision: &str,
        with_tokenizer: bool,
    ) -> Result<BaseModel, JobError> {
        if let Some(remote) = &mut self.remote {
            return remote.load_model(model, with_tokenizer);
        }
        let precision: Precision = precision.parse().map_err(backend_error)?;
        let loaded = common::load(model, precision, with_tokenizer)
            .map_err(|e| backend_error(format!("{e:#}")))?;
        let base = BaseModel {
            tokenizer: loaded.tokenizer.clone(),
            context_length: loaded.model.config.max_position_embeddings,
        };
        self.loaded = Some(loaded);
        Ok(base)
    }

    fn training_client(
        &mut self,
        lora: &LoraSpec,
        checkpoints: &Path,
    ) -> Result<Box<dyn TrainingClient>, JobError> {
        if let Some(remote) = &mut self.remote {
            return remote.training_client(lora, checkpoints);
        }
        let loaded = self
            .loaded
            .as_ref()
            .ok_or_else(|| backend_error("no model loaded"))?;
        let session = match &lora.init_adapter {
            Some(dir) => TrainingSession::with_adapter(
                loaded.model.clone(),
                &loaded.spec,
                common::load_adapter(loaded, dir).map_err(|e| backend_error(format!("{e:#}")))?,
                checkpoints,
                common::sampler_options(loaded),
            ),
            None => TrainingSession::new(
                loaded.model.clone(),
                &loaded.spec,
                lora_config(lora)?,
                checkpoints,
                common::sampler_options(loaded),
            )
            .map_err(backend_error)?,
        };
        Ok(Box::new(session))
    }
}

fn lora_config(spec: &LoraSpec) -> Result<LoraConfig, JobError> {
    let target_modules = spec
        .target_modules
        .iter()
        .map(|t| {
            serde_json::from_value::<Target>(Value::String(t.clone())).map_err(|_| {
                JobError::Invalid(format!("lora.target_modules: {t:?} is not a projection"))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(LoraConfig {
        rank: spec.rank,
        alpha: spec.alpha,
        dropout: spec.dropout,
        seed: spec.seed,
        target_modules,
        ..LoraConfig::default()
    })
}

/// The terminal's progress bar: step, loss, eval loss, tokens/s, ETA.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar on stderr, or none (`hidden`: `--json`, workers).
    pub fn new(hidden: bool) -> Self {
        if hidden {
            return Self(ProgressBar::hidden());
        }
        Self(
            ProgressBar::new(0).with_style(
                ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
        )
    }
}

impl whet_jobs::Display for Bar {
    fn start(&mut self, total: usize, position: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(position as u64);
    }

    fn step(&mut self, step: usize, summary: &str) {
        self.0.set_position(step as u64);
        self.0.set_message(summary.to_string());
    }

    fn initial_eval(&mut self, eval_loss: f64) {
        self.0
            .set_message(format!("eval {eval_loss:.4} before training"));
    }

    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Runs job `id` here with the engine, the progress bar (unless `quiet`) and Ctrl-C.
pub fn run_job(home: &whet_jobs::Home, id: &str, quiet: bool) -> anyhow::Result<Value> {
    let mut bar = Bar::new(quiet);
    Ok(whet_jobs::runner::run_job(
        home,
        &mut Local::default(),
        id,
        &mut bar,
        &CANCEL,
    )?)
}
