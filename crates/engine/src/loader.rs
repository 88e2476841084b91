//! Finding and reading a model: a Hugging Face directory (safetensors, sharded or not), a GGUF
//! file (dequantized to f32), or a hub id resolved through the local Hugging Face cache.
//!
//! Every weight comes out under its Hugging Face name (`model.layers.0.self_attn.q_proj.weight`)
//! so the decoder has one naming to follow.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::EngineError;

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face model directory.
    HfDir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    /// Resolves what a user typed: an existing directory, an existing `.gguf` file, or a hub id
    /// (`org/name`) found in the local Hugging Face cache. whet never downloads.
    pub fn resolve(spec: &str) -> Result<Self, EngineError> {
        let path = Path::new(spec);
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(EngineError::Io {
                    path: path.join("config.json").display().to_string(),
                    message: "not found: a model directory needs config.json and model.safetensors (or a sharded index)".into(),
                });
            }
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        if path.is_file() {
            let mut magic = [0u8; 4];
            let ok = File::open(path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok();
            if ok && &magic == b"GGUF" {
                return Ok(ModelSource::Gguf(path.to_path_buf()));
            }
            return Err(EngineError::Io {
                path: spec.into(),
                message: "is a file but not a GGUF file (a model is a directory, a .gguf file or a hub id)".into(),
            });
        }
        let looks_like_id = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && !spec.contains(std::path::MAIN_SEPARATOR_STR.repeat(2).as_str());
        if looks_like_id {
            let cache = hf_hub::Cache::from_env();
            let repo = cache.model(spec.to_string());
            if let Some(config) = repo.get("config.json") {
                if let Some(dir) = config.parent() {
                    return Ok(ModelSource::HfDir(dir.to_path_buf()));
                }
            }
            return Err(EngineError::Io {
                path: spec.into(),
                message: format!(
                    "not a local path, and hub id '{spec}' is not in the Hugging Face cache at {} \
                     (no config.json in a snapshot). whet does not download: on a machine with \
                     access run `huggingface-cli download {spec}` and copy the cache here (or set \
                     HF_HOME), or pass a local model directory or .gguf file",
                    cache.path().display()
                ),
            });
        }
        Err(EngineError::Io {
            path: spec.into(),
            message: "no such file or directory (a model is a directory, a .gguf file or a hub id like org/name)".into(),
        })
    }

    /// The path the tokenizer is read from (the directory, or the GGUF file itself).
    pub fn tokenizer_path(&self) -> &Path {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p,
        }
    }
}

/// Weights by Hugging Face name, as f32 tensors, plus the config.
pub struct LoadedWeights {
    /// The model's shape.
    pub config: ModelConfig,
    /// Tensors by Hugging Face name.
    pub tensors: HashMap<String, Tensor>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Reads config and weights from a source.
pub fn load(source: &ModelSource, device: &Device) -> Result<LoadedWeights, EngineError> {
    match source {
        ModelSource::HfDir(dir) => load_hf_dir(dir, device),
        ModelSource::Gguf(path) => load_gguf(path, device),
    }
}

/// Reads only the config of a source (cheap: no weights).
pub fn load_config(source: &ModelSource) -> Result<ModelConfig, EngineError> {
    match source {
        ModelSource::HfDir(dir) => read_hf_config(dir),
        ModelSource::Gguf(path) => {
            let mut f = File::open(path).map_err(|e| io_err(path, e))?;
            let content = gguf_file::Content::read(&mut f)
                .map_err(|e| io_err(path, format!("not a readable GGUF file: {e}")))?;
            gguf_config(&content, path, None)
        }
    }
}

fn read_hf_config(dir: &Path) -> Result<ModelConfig, EngineError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| io_err(&path, format!("malformed JSON: {e}")))?;
    ModelConfig::from_hf_json(&v, &path.display().to_string())
}

fn load_hf_dir(dir: &Path, device: &Device) -> Result<LoadedWeights, EngineError> {
    let config = read_hf_config(dir)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| io_err(&index, format!("malformed JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| io_err(&index, "field 'weight_map' is missing"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        files
    } else {
        return Err(io_err(
            &single,
            "not found (nor model.safetensors.index.json): the directory has no weights",
        ));
    };
    let mut tensors = HashMap::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| io_err(file, e))?;
        let loaded = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| io_err(file, format!("not a valid safetensors file: {e}")))?;
        for (name, t) in loaded {
            tensors.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    Ok(LoadedWeights { config, tensors })
}

fn meta_usize(content: &gguf_file::Content, key: &str) -> Option<usize> {
    use gguf_file::Value as V;
    match content.metadata.get(key)? {
        V::U8(x) => Some(*x as usize),
        V::U16(x) => Some(*x as usize),
        V::U32(x) => Some(*x as usize),
        V::U64(x) => Some(*x as usize),
        V::I8(x) => usize::try_from(*x).ok(),
        V::I16(x) => usize::try_from(*x).ok(),
        V::I32(x) => usize::try_from(*x).ok(),
        V::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

fn meta_f64(content: &gguf_file::Content, key: &str) -> Option<f64> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_f64().ok().or_else(|| v.to_f32().ok().map(f64::from)))
}

fn gguf_config(
    content: &gguf_file::Content,
    path: &Path,
    freq_factors: Option<Vec<f32>>,
) -> Result<ModelConfig, EngineError> {
    let src = path.display().to_string();
    let arch_name = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| {
            EngineError::Config(format!("{src}: metadata 'general.architecture' is missing"))
        })?
        .clone();
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => {
            return Err(EngineError::Unsupported(format!(
            "{src}: GGUF architecture '{other}' is not supported (supported: llama, qwen2, qwen3)"
        )))
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let need = |k: &str| {
        meta_usize(content, &key(k))
            .ok_or_else(|| EngineError::Config(format!("{src}: metadata '{}' is missing", key(k))))
    };
    let hidden_size = need("embedding_length")?;
    let num_heads = need("attention.head_count")?;
    let num_kv_heads = meta_usize(content, &key("attention.head_count_kv")).unwrap_or(num_heads);
    let head_dim =
        meta_usize(content, &key("attention.key_length")).unwrap_or(hidden_size / num_heads.max(1));
    let vocab_size = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| EngineError::MissingTensor(format!("token_embd.weight in {src}")))?;
    let rope_scaling = match freq_factors {
        Some(factors) => RopeScaling::FreqFactors { factors },
        None => match content
            .metadata
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            None | Some("none") => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear {
                factor: meta_f64(content, &key("rope.scaling.factor")).unwrap_or(1.0),
            },
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "{src}: rope scaling '{other}' is not supported"
                )))
            }
        },
    };
    let eos = meta_usize(content, "tokenizer.ggml.eos_token_id").map(|x| x as u32);
    let cfg = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_layers: need("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: meta_f64(content, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(content, &key("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: need("context_length")?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qk_norm: architecture == Architecture::Qwen3,
        sliding_window: meta_usize(content, &key("attention.sliding_window")),
        eos_token_ids: eos.into_iter().collect(),
    };
    cfg.validate(&src)?;
    Ok(cfg)
}

/// llama.cpp's tensor name → the Hugging Face name.
fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes the row permutation llama.cpp's converter applies to `llama` q/k projections: it
/// reorders each head's rows from the two-halves RoPE layout Hugging Face uses to the
/// interleaved pairs llama.cpp rotates, i.e. rows `(head, half, i)` become `(head, i, half)`.
fn unpermute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor, EngineError> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / n_heads;
    let t = t
        .reshape((n_heads, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

fn load_gguf(path: &Path, device: &Device) -> Result<LoadedWeights, EngineError> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| io_err(path, format!("not a readable GGUF file: {e}")))?;
    let freq_factors = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let t = content
            .tensor(&mut f, "rope_freqs.weight", device)
            .and_then(|q| q.dequantize(device))
            .map_err(|e| io_err(path, format!("tensor rope_freqs.weight: {e}")))?;
        Some(t.flatten_all()?.to_vec1::<f32>()?)
    } else {
        None
    };
    let config = gguf_config(&content, path, freq_factors)?;
    let permuted = config.architecture == Architecture::Llama;
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        if name == "rope_freqs.weight" {
            continue;
        }
        let Some(hf) = gguf_to_hf_name(name) else {
            return Err(EngineError::UnexpectedTensor(format!(
                "{name} in {} (not a tensor of a {:?} model)",
                path.display(),
                config.architecture
            )));
        };
        let t = content
            .tensor(&mut f, name, device)
            .and_then(|q| q.dequantize(device))
            .map_err(|e| io_err(path, format!("tensor {name}: {e}")))?;
        let t = if permuted && (hf.contains("q_proj.") || hf.contains("k_proj.")) {
            let heads = if hf.contains("q_proj.") {
                config.num_heads
            } else {
                config.num_kv_heads
            };
            unpermute_rows(&t, heads)?
        } else {
            t
        };
        tensors.insert(hf, t.to_dtype(DType::F32)?);
    }
    Ok(LoadedWeights { config, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(out, in).
        let (heads, hd, inp) = (2usize, 4usize, 3usize);
        let w = Tensor::arange(0f32, (heads * hd * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((heads * hd, inp))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, hd / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * hd, inp))
            .unwrap();
        let back = unpermute_rows(&permuted, heads).unwrap();
        let a: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = back.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn names_map_and_missing_models_explain() {
        assert_eq!(
            gguf_to_hf_name("blk.3.attn_k_norm.weight").unwrap(),
            "model.layers.3.self_attn.k_norm.weight"
        );
        assert_eq!(
            gguf_to_hf_name("blk.1.attn_q.bias").unwrap(),
            "model.layers.1.self_attn.q_proj.bias"
        );
        let e = ModelSource::resolve("/no/such/model.gguf").unwrap_err();
        assert!(e.to_string().contains("/no/such/model.gguf"), "{e}");
        // The only test that touches HF_HOME (the environment is shared by test threads).
        let home = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HOME", home.path());
        let e = ModelSource::resolve("someorg/somemodel")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("someorg/somemodel") && e.contains("does not download"),
            "{e}"
        );
        // A model in the cache (hub layout: refs/main names the snapshot) resolves offline.
        let repo = home.path().join("hub/models--someorg--somemodel");
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(
            ModelSource::resolve("someorg/somemodel").unwrap(),
            ModelSource::HfDir(snap)
        );
    }
}
