//! `whet serve`: the Tinker wire protocol on this machine, with whet's engine behind it; and
//! `whet keys`, the API keys a server bound beyond loopback accepts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use whet_contract::{ContractError, LoraConfig, SamplingClient, TrainingClient};
use whet_engine::{Precision, TrainingSession};
use whet_server::{Host, ServedModel};

use crate::common::{self, Loaded};

/// The default model's file (`tools/get-smollm2.sh`) and the name it is served under.
const DEFAULT_MODEL: (&str, &str) = (
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "models/SmolLM2-135M-Instruct.Q4_1.gguf",
);

/// Flags of `whet serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (port 0 picks a free one). On loopback any `tml-…` key is
    /// accepted; on any other address only keys made with `whet keys create`.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// A model to serve, `NAME=M`: clients ask for NAME (`base_model`, e.g. a Hugging Face id
    /// the cookbook knows), M is a model directory, .gguf file or cached hub id. Repeatable.
    /// Default: every model published in the home (`name@version` and `name@alias`: its base
    /// with its adapter merged, to sample from or train new adapters on) and the SmolLM2 file
    /// of tools/get-smollm2.sh, as HuggingFaceTB/SmolLM2-135M-Instruct.
    #[arg(long = "model", value_name = "NAME=M")]
    models: Vec<String>,
    /// Number format of the base projections: f32 or bf16.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    #[command(flatten)]
    dev: common::DeviceArgs,
    /// whet's home: checkpoints, keys, tokenizers (default: $WHET_HOME, else ~/.whet).
    #[arg(long, env = "WHET_HOME")]
    home: Option<PathBuf>,
    /// Seconds a session lives without a heartbeat.
    #[arg(long, default_value_t = 300)]
    session_timeout_secs: u64,
    /// Seconds `retrieve_future` holds a poll before answering `try_again`.
    #[arg(long, default_value_t = 40)]
    poll_hold_secs: u64,
    /// Print one JSON line (`{"url", "models"}`) once listening, instead of a sentence.
    #[arg(long)]
    json: bool,
    /// Do not run the home's queued jobs here (leave them to `whet worker`).
    #[arg(long)]
    no_worker: bool,
}

/// Jobs of the platform API, on the engine in this process (as `whet train` / `whet worker`).
struct EngineJobs {
    home: whet_jobs::Home,
}

impl whet_server::Jobs for EngineJobs {
    fn submit(
        &self,
        spec: &whet_jobs::JobSpec,
        precision: &str,
        retry_of: Option<&str>,
    ) -> Result<serde_json::Value, whet_jobs::JobError> {
        let mut store = whet_jobs::Store::open(&self.home.db())?;
        whet_jobs::runner::submit(
            &self.home,
            &mut store,
            &mut crate::backend::Local::default(),
            spec,
            precision,
            0,
            retry_of,
        )
    }

    fn run(&self, id: &str) -> Result<serde_json::Value, whet_jobs::JobError> {
        crate::backend::run_job(&self.home, id, true)
            .map_err(|e| whet_jobs::JobError::Backend(format!("{e:#}")))
    }
}

/// What a served name stands for: a base model, with a published model's adapter merged in
/// (`name@version`), and whether a tokenizer comes with it.
struct Spec {
    base: String,
    adapter: Option<PathBuf>,
    tokenizer: bool,
}

/// Served name → what it stands for.
type Specs = HashMap<String, Spec>;

/// The engine as the server's host: each base model loaded once, on first use, and shared by
/// every adapter and sampler on it.
struct EngineHost {
    specs: Specs,
    precision: Precision,
    loaded: HashMap<String, Loaded>,
}

fn engine_err(e: impl std::fmt::Display) -> ContractError {
    ContractError::Internal(e.to_string())
}

impl EngineHost {
    fn get(&mut self, name: &str) -> Result<&Loaded, ContractError> {
        if !self.loaded.contains_key(name) {
            let spec = self.specs.get(name).ok_or_else(|| {
                ContractError::invalid("base_model", format!("unknown model {name:?}"))
            })?;
            let mut loaded = common::load(&spec.base, self.precision, spec.tokenizer)
                .map_err(|e| engine_err(format!("{e:#}")))?;
            if let Some(dir) = &spec.adapter {
                // A published model is its base with its adapter folded in: new adapters
                // train on top of it.
                let adapter =
                    common::load_adapter(&loaded, dir).map_err(|e| engine_err(format!("{e:#}")))?;
                let tensors = whet_engine::merge::merged_tensors(&loaded.model, Some(&adapter))
                    .map_err(engine_err)?
                    .into_iter()
                    .collect();
                let weights = whet_engine::loader::LoadedWeights {
                    config: loaded.model.config.clone(),
                    tensors,
                };
                let model = whet_engine::Model::from_weights_in(
                    weights,
                    loaded.model.device(),
                    self.precision,
                )
                .map_err(engine_err)?;
                loaded.model = std::sync::Arc::new(model);
            }
            self.loaded.insert(name.to_string(), loaded);
        }
        Ok(&self.loaded[name])
    }
}

impl Host for EngineHost {
    fn training_client(
        &mut self,
        base_model: &str,
        lora: &LoraConfig,
        checkpoint_dir: &Path,
    ) -> Result<Box<dyn TrainingClient>, ContractError> {
        let loaded = self.get(base_model)?;
        let config = whet_lora::LoraConfig::from_tinker(lora)
            .map_err(|e| ContractError::invalid("lora_config", e.to_string()))?;
        let session = TrainingSession::new(
            loaded.model.clone(),
            base_model,
            config,
            checkpoint_dir,
            common::sampler_options(loaded),
        )
        .map_err(engine_err)?;
        Ok(Box::new(session))
    }

    fn sampling_client(
        &mut self,
        base_model: &str,
        adapter_dir: Option<&Path>,
    ) -> Result<Box<dyn SamplingClient>, ContractError> {
        let loaded = self.get(base_model)?;
        let weights = match adapter_dir {
            Some(dir) => Some(
                common::load_adapter(loaded, dir)
                    .map_err(|e| engine_err(format!("{e:#}")))?
                    .sampling_weights()
                    .map_err(engine_err)?,
            ),
            None => None,
        };
        Ok(Box::new(whet_engine::Sampler::new(
            loaded.model.clone(),
            weights,
            common::sampler_options(loaded),
        )))
    }
}

/// A directory `transformers.AutoTokenizer` loads offline: the model's own when it has
/// `tokenizer.json`, else one written under the home from the GGUF's tokenizer.
fn tokenizer_dir(home: &whet_jobs::Home, name: &str, spec: &str) -> Result<PathBuf> {
    let source = whet_engine::ModelSource::resolve(spec)?;
    let path = source.tokenizer_path();
    if path.is_dir()
        && path.join("tokenizer.json").is_file()
        && path.join("tokenizer_config.json").is_file()
    {
        return Ok(path.to_path_buf());
    }
    let tok = whet_data::Tokenizer::from_model_path(path)
        .with_context(|| format!("loading the tokenizer of {spec}"))?;
    let dir = home
        .root()
        .join("tokenizers")
        .join(name.replace(['/', ':'], "__"));
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    tok.inner()
        .save(tmp.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = tok.chat_template() {
        config["chat_template"] = json!(t.source());
        for (k, v) in t.special_tokens() {
            config[k.as_str()] = json!(v);
        }
    }
    for (key, value) in [
        ("bos_token", tok.bos_token()),
        ("eos_token", tok.eos_token()),
    ] {
        if let Some(v) = value {
            config[key] = json!(v);
        }
    }
    std::fs::write(
        tmp.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// The served models from `--model` flags (or the home's published ones and the default).
fn served(args: &Args, home: &whet_jobs::Home) -> Result<(Vec<ServedModel>, Specs)> {
    let mut pairs = Vec::new();
    for m in &args.models {
        let Some((name, spec)) = m.split_once('=') else {
            bail!("--model {m:?}: expected NAME=M (e.g. meta-llama/Llama-3.2-1B=/models/llama)");
        };
        if name.is_empty() || name.contains(':') {
            bail!("--model {m:?}: NAME must be non-empty and without ':'");
        }
        pairs.push((name.to_string(), spec.to_string()));
    }
    let store = whet_jobs::Store::open(&home.db())?;
    if pairs.is_empty() {
        // The models known to the home: every published version and alias.
        for doc in store.registry_list("model", None)? {
            let (Some(name), Some(version)) = (doc["name"].as_str(), doc["version"].as_str())
            else {
                continue;
            };
            pairs.push((format!("{name}@{version}"), format!("{name}@{version}")));
            for (alias, v) in store.aliases("model", name)? {
                if v == version {
                    pairs.push((format!("{name}@{alias}"), format!("{name}@{version}")));
                }
            }
        }
        let (name, file) = DEFAULT_MODEL;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(file);
        let path = [PathBuf::from(file), root]
            .into_iter()
            .find(|p| p.is_file());
        match path {
            Some(path) => pairs.push((name.to_string(), path.display().to_string())),
            None if pairs.is_empty() => bail!("no --model given, no model published in {}, and the default model is missing: run tools/get-smollm2.sh, or pass --model NAME=M", home.root().display()),
            None => {}
        }
    }
    let mut models = Vec::new();
    let mut specs = HashMap::new();
    for (name, spec) in pairs {
        // `name@version` / `name@alias` of the models registry: its base and its adapter.
        let (spec, adapter) = match whet_jobs::models::resolve(home, &store, &spec)
            .with_context(|| format!("--model {name}={spec}"))?
        {
            Some(r) => (r.base_model, Some(r.adapter)),
            None => (spec, None),
        };
        let source = whet_engine::ModelSource::resolve(&spec)
            .with_context(|| format!("--model {name}={spec}"))?;
        let config = whet_engine::loader::load_config(&source)
            .with_context(|| format!("--model {name}={spec}"))?;
        models.push(ServedModel {
            name: name.clone(),
            max_context_length: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            tokenizer_dir: match tokenizer_dir(home, &name, &spec) {
                Ok(dir) => Some(dir),
                Err(e) => {
                    // Token ids still train and sample; only stop strings and the SDK's
                    // get_tokenizer() need one.
                    tracing::warn!("{name}: no tokenizer ({e:#}); serving token ids only");
                    None
                }
            },
        });
        let tokenizer = models.last().is_some_and(|m| m.tokenizer_dir.is_some());
        specs.insert(
            name,
            Spec {
                base: spec,
                adapter,
                tokenizer,
            },
        );
    }
    Ok((models, specs))
}

/// Runs `whet serve` until Ctrl-C.
pub fn run(args: Args) -> Result<()> {
    args.dev.select()?;
    let home = whet_jobs::Home::resolve(args.home.clone())?;
    let (models, specs) = served(&args, &home)?;
    let mut config = whet_server::Config::new(models.clone());
    config.session_timeout = Duration::from_secs(args.session_timeout_secs.max(1));
    config.poll_hold = Duration::from_secs(args.poll_hold_secs);
    config.open_access = args.listen.ip().is_loopback();
    config.run_jobs = !args.no_worker;
    if !config.open_access {
        config.keys = whet_jobs::keys::list(&home)?
            .into_iter()
            .map(|k| k.fingerprint)
            .collect();
        if config.keys.is_empty() {
            bail!("--listen {}: beyond loopback only keys made with `whet keys create` are accepted, and this home has none", args.listen);
        }
    }
    let host = EngineHost {
        specs,
        precision: args.precision,
        loaded: HashMap::new(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        if args.json {
            println!(
                "{}",
                json!({"url": url, "models": names, "home": home.root()})
            );
        } else {
            eprintln!(
                "whet serve: {url} (models: {}; checkpoints in {})",
                names.join(", "),
                home.root().display()
            );
            eprintln!("  TINKER_BASE_URL={url} TINKER_API_KEY=tml-anything python your_script.py");
        }
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let jobs: std::sync::Arc<dyn whet_server::Jobs> =
            std::sync::Arc::new(EngineJobs { home: home.clone() });
        whet_server::serve(
            listener,
            Box::new(host),
            config,
            &home,
            Some(jobs),
            shutdown,
        )
        .await?;
        Ok(())
    })
}

/// `whet keys …`.
#[derive(clap::Subcommand)]
pub enum Keys {
    /// Make a key (shown once; only its fingerprint is stored).
    Create {
        /// A label for the key.
        #[arg(long, default_value = "default")]
        name: String,
        #[command(flatten)]
        home: common::HomeArgs,
    },
    /// List the keys' fingerprints and labels.
    List {
        #[command(flatten)]
        home: common::HomeArgs,
    },
    /// Revoke a key by fingerprint or label.
    Revoke {
        /// Fingerprint or label.
        which: String,
        #[command(flatten)]
        home: common::HomeArgs,
    },
}

/// Runs `whet keys …`.
pub fn keys(cmd: Keys) -> Result<()> {
    match cmd {
        Keys::Create { name, home } => {
            let h = whet_jobs::Home::resolve(home.home.clone())?;
            let (key, rec) = whet_jobs::keys::create(&h, &name)?;
            if home.json {
                println!(
                    "{}",
                    json!({"key": key, "fingerprint": rec.fingerprint, "name": rec.name})
                );
            } else {
                println!("{key}");
                eprintln!("(shown once; fingerprint {})", rec.fingerprint);
            }
        }
        Keys::List { home } => {
            let h = whet_jobs::Home::resolve(home.home.clone())?;
            for k in whet_jobs::keys::list(&h)? {
                if home.json {
                    println!("{}", serde_json::to_string(&k)?);
                } else {
                    println!("{}  {}  {}", k.fingerprint, k.name, k.created_at);
                }
            }
        }
        Keys::Revoke { which, home } => {
            let h = whet_jobs::Home::resolve(home.home.clone())?;
            if !whet_jobs::keys::revoke(&h, &which)? {
                bail!("no key {which:?}");
            }
        }
    }
    Ok(())
}
