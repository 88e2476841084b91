//! `whet adapter merge`: fold a LoRA adapter into its base model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;
use whet_engine::{merge, ModelSource, Precision};

use crate::common;

/// Adapter commands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Merge an adapter into the base weights and write a plain Hugging Face directory
    /// (config.json, model.safetensors, tokenizer files) that loads without PEFT.
    Merge {
        /// The base model.
        #[arg(long)]
        model: String,
        /// The PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// The output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an adapter command.
pub fn run(c: Command) -> Result<()> {
    let Command::Merge {
        model,
        adapter,
        out,
        json,
    } = c;
    merge_to(&model, &adapter, &out)?;
    if json {
        println!(
            "{}",
            json!({"out": out, "base_model": model, "adapter": adapter})
        );
    } else {
        println!(
            "merged {} into {} -> {}",
            adapter.display(),
            model,
            out.display()
        );
    }
    Ok(())
}

/// Merges `adapter` into `model` and writes a plain Hugging Face directory at `out` (which
/// must not exist).
pub fn merge_to(model: &str, adapter: &std::path::Path, out: &std::path::Path) -> Result<()> {
    if out.exists() {
        anyhow::bail!(
            "{}: already exists; choose a new output directory",
            out.display()
        );
    }
    // A GGUF model has no tokenizer files: the merged directory gets the ones whet builds.
    let is_gguf = matches!(ModelSource::resolve(model)?, ModelSource::Gguf(_));
    let loaded = common::load(model, Precision::F32, is_gguf)?;
    let lora = common::load_adapter(&loaded, adapter)?;
    // A GGUF model has no tokenizer files: write the ones whet built from its metadata.
    let extra = match &loaded.source {
        ModelSource::Gguf(_) => tokenizer_files(&loaded)?,
        ModelSource::HfDir(_) => vec![],
    };
    merge::write_merged(&loaded.model, Some(&lora), &loaded.source, &extra, out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// `tokenizer.json` and `tokenizer_config.json` for a tokenizer built from GGUF metadata.
fn tokenizer_files(loaded: &common::Loaded) -> Result<Vec<(String, Vec<u8>)>> {
    let tok = loaded.tokenizer()?;
    let tokenizer_json = tok
        .inner()
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": loaded.model.config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(b) = tok.bos_token() {
        config["bos_token"] = b.into();
    }
    if let Some(e) = tok.eos_token() {
        config["eos_token"] = e.into();
    }
    if let Some(t) = tok.chat_template() {
        config["chat_template"] = t.source().into();
    }
    Ok(vec![
        ("tokenizer.json".into(), tokenizer_json.into_bytes()),
        (
            "tokenizer_config.json".into(),
            serde_json::to_vec_pretty(&config)?,
        ),
    ])
}
