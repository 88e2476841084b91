//! `whet model info`: what a model is, without loading its weights.

use anyhow::Result;
use serde_json::json;
use whet_data::Tokenizer;
use whet_engine::{loader, ModelSource};

/// Model commands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Architecture, sizes, context, tokenizer and chat template of a model.
    Info {
        /// A Hugging Face directory, a .gguf file or a cached hub id.
        model: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a model command.
pub fn run(c: Command) -> Result<()> {
    let Command::Info { model, json } = c;
    let source = ModelSource::resolve(&model)?;
    let config = loader::load_config(&source)?;
    let tok = Tokenizer::from_model_path(source.tokenizer_path())?;
    let (kind, path) = match &source {
        ModelSource::HfDir(p) => ("huggingface-directory", p),
        ModelSource::Gguf(p) => ("gguf", p),
    };
    let info = json!({
        "model": model,
        "source": {"kind": kind, "path": path},
        "config": config,
        "parameters": config.num_parameters(),
        "tokenizer": {
            "vocab_size": tok.vocab_size(),
            "bos_token": tok.bos_token(),
            "eos_token": tok.eos_token(),
            "eos_token_ids": tok.eos_token_ids(),
            "chat_template": tok.chat_template().is_some(),
        },
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let c = &config;
    println!("model           {model}");
    println!("source          {kind} {}", path.display());
    println!("architecture    {:?}", c.architecture);
    println!(
        "parameters      {:.1}M",
        config.num_parameters() as f64 / 1e6
    );
    println!(
        "layers          {} (hidden {}, mlp {})",
        c.num_layers, c.hidden_size, c.intermediate_size
    );
    println!(
        "attention       {} heads, {} kv heads, head_dim {}{}",
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        if c.qk_norm { ", q/k norm" } else { "" }
    );
    println!("context         {}", c.max_position_embeddings);
    println!(
        "rope            theta {} {:?}",
        c.rope_theta, c.rope_scaling
    );
    println!("tied embeddings {}", c.tie_word_embeddings);
    println!(
        "tokenizer       {} tokens, bos {:?}, eos {:?}, chat template: {}",
        tok.vocab_size(),
        tok.bos_token(),
        tok.eos_token(),
        if tok.chat_template().is_some() {
            "yes"
        } else {
            "no"
        }
    );
    Ok(())
}
