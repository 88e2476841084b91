//! `whet adapter merge`: fold a LoRA adapter into its base model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use whet_engine::gguf_export::{self, GgufType};
use whet_engine::{loader, merge, ModelSource, Precision};

use crate::common;

/// Adapter commands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Merge an adapter into the base weights and write a plain Hugging Face directory
    /// (config.json, model.safetensors, tokenizer files) that loads without PEFT, or a GGUF
    /// file for llama.cpp (`--format gguf`).
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
        /// hf (a Hugging Face directory) or gguf (OUT/model-<type>.gguf, llama.cpp's format).
        #[arg(long, default_value = "hf")]
        format: String,
        /// With --format gguf: how the weight matrices are stored, f16 (the default) or q8_0
        /// (norms and biases stay f32).
        #[arg(long)]
        gguf_type: Option<GgufType>,
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
        format,
        gguf_type,
        json,
    } = c;
    let ty = gguf_type_for(&format, gguf_type, &["hf", "gguf"])?;
    let file = match ty {
        Some(ty) => {
            let name = format!(
                "{} + {}",
                base_name(&model),
                base_name(&adapter.to_string_lossy())
            );
            Some(merge_to_gguf(&model, &adapter, &out, ty, &name)?)
        }
        None => {
            merge_to(&model, &adapter, &out)?;
            None
        }
    };
    if json {
        let mut doc =
            json!({"out": out, "base_model": model, "adapter": adapter, "format": format});
        if let (Some(f), Some(ty)) = (&file, ty) {
            doc["file"] = json!(f);
            doc["gguf_type"] = json!(ty.to_string());
        }
        println!("{doc}");
    } else {
        println!(
            "merged {} into {} -> {}",
            adapter.display(),
            model,
            file.as_deref().unwrap_or(&out).display()
        );
    }
    Ok(())
}

/// Checks that `--format` is one of `formats` and that `--gguf-type` comes with `--format gguf`
/// only: the GGUF type to write (f16 unless given), or None for the other formats.
pub fn gguf_type_for(
    format: &str,
    gguf_type: Option<GgufType>,
    formats: &[&str],
) -> Result<Option<GgufType>> {
    if !formats.contains(&format) {
        bail!("--format {format:?}: expected {}", formats.join(", "));
    }
    match (format, gguf_type) {
        ("gguf", ty) => Ok(Some(ty.unwrap_or(GgufType::F16))),
        (_, Some(ty)) => bail!("--gguf-type {ty} applies to --format gguf only"),
        (_, None) => Ok(None),
    }
}

/// The last path component of a model or adapter (what `general.name` is made of).
fn base_name(spec: &str) -> String {
    let p = Path::new(spec.trim_end_matches('/'));
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string())
}

/// Merges `adapter` into `model` and writes a plain Hugging Face directory at `out` (which
/// must not exist).
pub fn merge_to(model: &str, adapter: &Path, out: &Path) -> Result<()> {
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

/// Merges `adapter` into `model` and writes `out/model-<type>.gguf` (`out` must not exist;
/// the directory appears whole or not at all). Returns the file's path.
pub fn merge_to_gguf(
    model: &str,
    adapter: &Path,
    out: &Path,
    ty: GgufType,
    name: &str,
) -> Result<PathBuf> {
    if out.exists() {
        bail!(
            "{}: already exists; choose a new output directory",
            out.display()
        );
    }
    // The tokenizer is checked before any weight is read: a model llama.cpp could not
    // tokenize for fails fast.
    let source = ModelSource::resolve(model)?;
    let tokenizer = loader::load_config(&source)
        .and_then(|config| gguf_export::tokenizer_metadata(&source, &config))
        .with_context(|| format!("exporting {model} as GGUF"))?;
    let loaded = common::load(model, Precision::F32, false)?;
    let lora = common::load_adapter(&loaded, adapter)?;
    let file_name = format!("model-{ty}.gguf");
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let dir_name = out
        .file_name()
        .map_or_else(|| "gguf".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{dir_name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = std::fs::create_dir(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))
        .and_then(|()| {
            gguf_export::write_gguf(
                &loaded.model,
                Some(&lora),
                &tokenizer,
                name,
                ty,
                &tmp.join(&file_name),
            )
            .with_context(|| format!("writing {}", out.join(&file_name).display()))
        })
        .and_then(|_| {
            std::fs::rename(&tmp, out).with_context(|| format!("creating {}", out.display()))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(out.join(file_name))
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
