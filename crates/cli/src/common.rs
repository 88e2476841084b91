//! What every command shares: loading a model with its tokenizer and optional adapter, and
//! writing output without ever leaving a partial file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use candle_core::Device;
use whet_data::Tokenizer;
use whet_engine::{Detokenize, Model, ModelSource, Precision, SamplerOptions};
use whet_lora::LoraAdapter;

/// The model flags of the commands that run one: `--model M [--adapter A]`.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// The base model: a Hugging Face directory, a .gguf file or a cached hub id.
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter directory applied on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The number format of the base model's projections: f32 (exact, the default) or bf16
    /// (half the memory; about twice as fast on CPUs with AVX512_BF16).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

impl ModelArgs {
    /// A published model (`name@version`, `name@alias`) becomes its base model and adapter;
    /// anything else is left as typed.
    pub fn resolve_published(mut self) -> Result<Self> {
        if std::path::Path::new(&self.model).exists() || !self.model.contains('@') {
            return Ok(self);
        }
        let home = whet_jobs::Home::resolve(None)?;
        let store = whet_jobs::Store::open(&home.db())?;
        if let Some(r) = whet_jobs::models::resolve(&home, &store, &self.model)? {
            if self.adapter.is_some() {
                anyhow::bail!(
                    "--model {}: a published model brings its own adapter; leave out --adapter",
                    self.model
                );
            }
            self.model = r.base_model;
            self.adapter = Some(r.adapter);
        }
        Ok(self)
    }
}

/// `--device cpu|cuda[:N]`: where the commands that run a model put it.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where the model runs: cpu (the default), cuda (GPU 0) or cuda:N. A GPU needs a build
    /// with `--features cuda` (see the README's CUDA section).
    #[arg(long, default_value = "cpu", global = true)]
    pub device: String,
}

/// The device every model of this process loads onto (set once, by [`DeviceArgs::select`]).
static DEVICE: OnceLock<Device> = OnceLock::new();

impl DeviceArgs {
    /// Opens the device (an error names it: unknown, absent, or a CPU-only build) and makes it
    /// the one [`load`] puts models on.
    pub fn select(&self) -> Result<()> {
        let device = whet_engine::parse_device(&self.device)?;
        if !device.is_cpu() {
            tracing::info!("models run on {}", self.device);
        }
        // A second selection (a command calling another) keeps the first.
        let _ = DEVICE.set(device);
        Ok(())
    }
}

/// A base model ready to use, with its tokenizer.
pub struct Loaded {
    /// What the user typed.
    pub spec: String,
    /// Where the files are.
    pub source: ModelSource,
    /// The weights.
    pub model: Arc<Model>,
    /// The tokenizer, when the command needs one.
    pub tokenizer: Option<Arc<Tokenizer>>,
}

impl Loaded {
    /// The tokenizer (loaded when the command asked for it).
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_deref().ok_or_else(|| {
            anyhow::anyhow!("{}: this command needs the model's tokenizer", self.spec)
        })
    }
}

/// Loads a model in `precision`, and its tokenizer first when `with_tokenizer` (so a broken
/// one fails fast; scoring token ids needs none).
pub fn load(spec: &str, precision: Precision, with_tokenizer: bool) -> Result<Loaded> {
    let source = ModelSource::resolve(spec)?;
    let tokenizer = if with_tokenizer {
        Some(Arc::new(
            Tokenizer::from_model_path(source.tokenizer_path())
                .with_context(|| format!("loading the tokenizer of {spec}"))?,
        ))
    } else {
        None
    };
    let started = std::time::Instant::now();
    let device = DEVICE.get().cloned().unwrap_or(Device::Cpu);
    let (source, model) = whet_engine::load_model(spec, &device, precision)?;
    tracing::info!(
        "loaded {spec} ({:?}, {} layers, {precision}) in {:.1}s",
        model.config.architecture,
        model.config.num_layers,
        started.elapsed().as_secs_f64()
    );
    if let Some(t) = &tokenizer {
        if t.vocab_size() > model.config.vocab_size {
            tracing::warn!(
                "the tokenizer has {} tokens but the model's embedding has {} rows",
                t.vocab_size(),
                model.config.vocab_size
            );
        }
    }
    Ok(Loaded {
        spec: spec.to_string(),
        source,
        model,
        tokenizer,
    })
}

/// Loads a PEFT adapter (or a whet state directory, which holds one) for the model.
pub fn load_adapter(loaded: &Loaded, dir: &Path) -> Result<LoraAdapter> {
    whet_engine::load_adapter(&loaded.model, dir)
        .with_context(|| format!("loading adapter {}", dir.display()))
}

/// Sampler options from the tokenizer and the model config: every EOS id, and a detokenizer
/// for stop strings.
pub fn sampler_options(loaded: &Loaded) -> SamplerOptions {
    let mut eos = loaded
        .tokenizer
        .as_ref()
        .map(|t| t.eos_token_ids())
        .unwrap_or_default();
    for id in &loaded.model.config.eos_token_ids {
        if !eos.contains(id) {
            eos.push(*id);
        }
    }
    let detokenize = loaded.tokenizer.clone().map(|tok| -> Detokenize {
        Arc::new(move |ids: &[u32]| tok.decode(ids, false).unwrap_or_default())
    });
    SamplerOptions {
        eos_token_ids: eos,
        detokenize,
        ..Default::default()
    }
}

/// Writes `text` to `out` atomically (temp file + rename), or to stdout when `out` is None.
pub fn emit(out: Option<&PathBuf>, text: &str) -> Result<()> {
    match out {
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
        Some(path) => whet_lora::io::write_atomic(path, text.as_bytes())?,
    }
    Ok(())
}

/// `--home` and `--json`, shared by the commands that read the home.
#[derive(clap::Args)]
pub struct HomeArgs {
    /// whet's home (default: $WHET_HOME, else ~/.whet).
    #[arg(long, env = "WHET_HOME")]
    pub home: Option<PathBuf>,
    /// Machine-readable output (one JSON document per line).
    #[arg(long)]
    pub json: bool,
}

impl HomeArgs {
    /// The home and its database.
    pub fn open(&self) -> Result<(whet_jobs::Home, whet_jobs::Store)> {
        let home = whet_jobs::Home::resolve(self.home.clone())?;
        let store = whet_jobs::Store::open(&home.db())?;
        Ok((home, store))
    }
}

#[cfg(test)]
mod device_tests {
    use super::DeviceArgs;

    #[test]
    fn device_flag_refuses_what_this_build_cannot_open() {
        let sel = |d: &str| DeviceArgs { device: d.into() }.select();
        assert!(sel("cpu").is_ok());
        let e = sel("tpu").unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("cuda:N"), "{e}");
        if !cfg!(feature = "cuda") {
            let e = sel("cuda").unwrap_err().to_string();
            assert!(
                e.contains("without CUDA") && e.contains("--features cuda"),
                "{e}"
            );
        }
    }
}
