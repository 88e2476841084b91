//! The `backend = "tinker"` side of jobs: the rows are rendered here with the local model's
//! tokenizer, and training runs on a Tinker-protocol server through the contract over HTTP
//! (`whet_server::client`) — the same job file, on a bigger machine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use whet_contract::{
    AdamParams, ContractError, Datum, ForwardBackwardOutput, LoraConfig, LossFn, LossFnConfig,
    ModelInfo, OptimStepResponse, SamplingClient, TrainingClient,
};
use whet_jobs::spec::TinkerBackend;
use whet_jobs::{BaseModel, JobError, LoraSpec};
use whet_server::client::{Connection, RemoteTraining};

/// A job's server and, once the model is loaded, its session.
pub struct Remote {
    spec: TinkerBackend,
    conn: Option<Arc<Connection>>,
}

fn err(e: impl std::fmt::Display) -> JobError {
    JobError::Backend(e.to_string())
}

impl Remote {
    /// The server of `[tinker]`.
    pub fn new(spec: TinkerBackend) -> Self {
        Self { spec, conn: None }
    }

    /// Connects, checks the server serves `base_model`, and loads the local tokenizer.
    pub fn load_model(&mut self, model: &str, with_tokenizer: bool) -> Result<BaseModel, JobError> {
        let key = std::env::var(&self.spec.api_key_env).map_err(|_| {
            JobError::Invalid(format!(
                "tinker.api_key_env: ${} is not set (the server's API key)",
                self.spec.api_key_env
            ))
        })?;
        let tokenizer = if with_tokenizer {
            let source = whet_engine::ModelSource::resolve(model)
                .map_err(|e| err(format!("model {model:?} (the local tokenizer): {e}")))?;
            Some(Arc::new(
                whet_data::Tokenizer::from_model_path(source.tokenizer_path())
                    .map_err(|e| err(format!("the tokenizer of {model}: {e}")))?,
            ))
        } else {
            None
        };
        let conn = Connection::open(&self.spec.base_url, &key)
            .map_err(|e| err(format!("tinker.base_url {}: {e}", self.spec.base_url)))?;
        let models = conn.models().map_err(err)?;
        let context_length = models
            .iter()
            .find(|(name, _)| *name == self.spec.base_model)
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                let names: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
                JobError::Invalid(format!(
                    "tinker.base_model: {} does not serve {:?} (it serves {names:?})",
                    self.spec.base_url, self.spec.base_model
                ))
            })?;
        tracing::info!(
            "training on {} ({}), session {}",
            self.spec.base_url,
            self.spec.base_model,
            conn.session_id()
        );
        self.conn = Some(conn);
        Ok(BaseModel {
            tokenizer,
            context_length,
        })
    }

    /// A LoRA client on the server; checkpoints' adapters are downloaded under `checkpoints`.
    pub fn training_client(
        &mut self,
        lora: &LoraSpec,
        checkpoints: &Path,
    ) -> Result<Box<dyn TrainingClient>, JobError> {
        let conn = self
            .conn
            .clone()
            .ok_or_else(|| err("no connection: the model was not loaded"))?;
        if lora.init_adapter.is_some() {
            return Err(JobError::Invalid(
                "lora.init_adapter: with backend = \"tinker\", import the adapter on the server (`whet checkpoints import`) and continue from its tinker:// path".into(),
            ));
        }
        let config = tinker_lora(lora)?;
        let inner = conn
            .training_client(&self.spec.base_model, &config)
            .map_err(err)?;
        Ok(Box::new(Downloading {
            inner,
            conn,
            dir: checkpoints.to_path_buf(),
        }))
    }
}

/// Tinker's LoRA settings: rank, seed, and whole groups of projections at alpha 32.
fn tinker_lora(lora: &LoraSpec) -> Result<LoraConfig, JobError> {
    const ATTN: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
    const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
    let has = |group: &[&str]| {
        group
            .iter()
            .all(|m| lora.target_modules.iter().any(|t| t == m))
    };
    let none = |group: &[&str]| {
        !group
            .iter()
            .any(|m| lora.target_modules.iter().any(|t| t == m))
    };
    let (attn, mlp) = (has(&ATTN), has(&MLP));
    if !((attn || none(&ATTN)) && (mlp || none(&MLP))) {
        return Err(JobError::Invalid(
            "lora.target_modules: a Tinker server trains all attention projections and/or all MLP projections; name whole groups".into(),
        ));
    }
    if lora.alpha != 32.0 || lora.dropout != 0.0 {
        return Err(JobError::Invalid(format!(
            "lora.alpha {} / lora.dropout {}: a Tinker server trains alpha 32 without dropout",
            lora.alpha, lora.dropout
        )));
    }
    Ok(LoraConfig {
        rank: lora.rank,
        seed: Some(lora.seed),
        train_unembed: false,
        train_mlp: mlp,
        train_attn: attn,
    })
}

/// A remote training client whose sampler checkpoints also land here, as the local backend's
/// do (`checkpoints/sampler_weights/<name>`), so publishing and exporting work the same.
struct Downloading {
    inner: RemoteTraining,
    conn: Arc<Connection>,
    dir: PathBuf,
}

impl TrainingClient for Downloading {
    fn forward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        self.inner.forward(data, loss_fn, config)
    }

    fn forward_backward(
        &mut self,
        data: &[Datum],
        loss_fn: LossFn,
        config: &LossFnConfig,
    ) -> Result<ForwardBackwardOutput, ContractError> {
        self.inner.forward_backward(data, loss_fn, config)
    }

    fn optim_step(&mut self, params: &AdamParams) -> Result<OptimStepResponse, ContractError> {
        self.inner.optim_step(params)
    }

    fn save_state(&mut self, name: &str) -> Result<String, ContractError> {
        self.inner.save_state(name)
    }

    fn load_state(&mut self, path: &str) -> Result<(), ContractError> {
        self.inner.load_state(path)
    }

    fn load_state_with_optimizer(&mut self, path: &str) -> Result<(), ContractError> {
        self.inner.load_state_with_optimizer(path)
    }

    fn save_weights_for_sampler(&mut self, name: &str) -> Result<String, ContractError> {
        let path = self.inner.save_weights_for_sampler(name)?;
        let local = self.dir.join("sampler_weights").join(name);
        match whet_server::client::download(&self.conn, &path, &local) {
            Ok(()) => Ok(local.display().to_string()),
            Err(e) => {
                // A hosted service signs only external exports: the adapter stays there.
                tracing::warn!("{path} stays on the server (download failed: {e})");
                Ok(path)
            }
        }
    }

    fn sampling_client(&mut self) -> Result<Box<dyn SamplingClient>, ContractError> {
        self.inner.sampling_client()
    }

    fn base_sampling_client(&mut self) -> Result<Box<dyn SamplingClient>, ContractError> {
        self.inner.base_sampling_client()
    }

    fn get_info(&self) -> Result<ModelInfo, ContractError> {
        self.inner.get_info()
    }
}
