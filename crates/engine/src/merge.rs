//! Folding an adapter into the base (`W' = W + scaling·B·A`) and writing a plain Hugging Face
//! directory that any stack loads without PEFT.

use std::path::Path;

use candle_core::Tensor;
use whet_lora::io::{write_atomic, write_json_atomic, write_safetensors_atomic};
use whet_lora::{LoraAdapter, Site, Target};

use crate::loader::ModelSource;
use crate::model::Model;
use crate::EngineError;

/// Files copied from a Hugging Face source directory into the merged one.
const COPIED: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
];

/// The model's weights under their Hugging Face names, with `adapter` merged in.
pub fn merged_tensors(
    model: &Model,
    adapter: Option<&LoraAdapter>,
) -> Result<Vec<(String, Tensor)>, EngineError> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        model.embed.to_tensor()?,
    )];
    for (layer, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{layer}");
        out.push((format!("{p}.input_layernorm.weight"), l.input_norm.clone()));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            l.post_attention_norm.clone(),
        ));
        for (k, &target) in Target::ALL.iter().enumerate() {
            let name = target.module_path(layer);
            let lin = &l.proj[k];
            let delta = match adapter {
                Some(a) => a.delta(Site { layer, target })?,
                None => None,
            };
            let w = lin.weight.to_tensor()?;
            let w = match delta {
                Some(d) => (w + d)?,
                None => w,
            };
            out.push((format!("{name}.weight"), w));
            if let Some(b) = &lin.bias {
                out.push((format!("{name}.bias"), b.clone()));
            }
        }
        if let Some((qn, kn)) = &l.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), qn.clone()));
            out.push((format!("{p}.self_attn.k_norm.weight"), kn.clone()));
        }
    }
    out.push(("model.norm.weight".to_string(), model.norm.clone()));
    if !model.config.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), model.lm_head.to_tensor()?));
    }
    Ok(out)
}

/// Writes the merged model to `out` (which must not exist): `config.json`,
/// `model.safetensors`, the source's tokenizer files, and `extra_files` (e.g. a tokenizer
/// converted from GGUF metadata). Built in a temp directory and renamed: all or nothing.
pub fn write_merged(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    source: &ModelSource,
    extra_files: &[(String, Vec<u8>)],
    out: &Path,
) -> Result<(), EngineError> {
    let io = |p: &Path, e: std::io::Error| EngineError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    if out.exists() {
        return Err(EngineError::Io {
            path: out.display().to_string(),
            message: "already exists; choose a new output directory".into(),
        });
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let result = (|| -> Result<(), EngineError> {
        let tensors = merged_tensors(model, adapter)?;
        write_safetensors_atomic(&tmp.join("model.safetensors"), &tensors)?;
        let config = match source {
            ModelSource::HfDir(dir) => {
                let p = dir.join("config.json");
                let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
                serde_json::from_str(&text).map_err(|e| EngineError::Io {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?
            }
            ModelSource::Gguf(_) => model.config.to_hf_json(),
        };
        write_json_atomic(&tmp.join("config.json"), &config)?;
        if let ModelSource::HfDir(dir) = source {
            for f in COPIED {
                let src = dir.join(f);
                if src.is_file() {
                    std::fs::copy(&src, tmp.join(f)).map_err(|e| io(&src, e))?;
                }
            }
        }
        for (name, bytes) in extra_files {
            write_atomic(&tmp.join(name), bytes)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| io(out, e))
}
