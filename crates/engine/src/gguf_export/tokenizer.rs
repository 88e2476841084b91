//! The `tokenizer.*` metadata of a GGUF export: copied from a GGUF source, or built from a
//! Hugging Face byte-level BPE `tokenizer.json` the way llama.cpp's `convert_hf_to_gguf.py`
//! writes it (model `gpt2`).

use std::path::Path;

use serde_json::Value as Json;

use super::{io_err, s, GgufValue};
use crate::config::ModelConfig;
use crate::loader::ModelSource;
use crate::EngineError;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// The `tokenizer.*` metadata for a GGUF export of the model at `source`: a GGUF source's own
/// keys, copied verbatim; for a Hugging Face directory, keys built from its byte-level BPE
/// `tokenizer.json` and `tokenizer_config.json`. Fails, naming what is missing, when the
/// tokenizer cannot be represented.
pub fn tokenizer_metadata(
    source: &ModelSource,
    config: &ModelConfig,
) -> Result<Vec<(String, GgufValue)>, EngineError> {
    let out = match source {
        ModelSource::Gguf(path) => {
            let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
            let content = candle_core::quantized::gguf_file::Content::read(&mut f)
                .map_err(|e| io_err(path, format!("not a readable GGUF file: {e}")))?;
            // Sorted: the reader's map has no order, and the same export should give the same
            // bytes. (Its reader drops trailing NULs of strings; byte-level BPE tokens have none.)
            let mut keys: Vec<_> = content
                .metadata
                .into_iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .collect();
            keys.sort_by(|a, b| a.0.cmp(&b.0));
            if keys.is_empty() {
                return Err(EngineError::Unsupported(format!(
                    "{}: has no tokenizer.* metadata, and llama.cpp cannot run a GGUF without a tokenizer",
                    path.display()
                )));
            }
            keys
        }
        ModelSource::HfDir(dir) => hf_tokenizer_metadata(dir, config)?,
    };
    let n = out
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.to_vec().ok().map(Vec::len));
    if n.is_some_and(|n| n != config.vocab_size) {
        return Err(EngineError::Config(format!(
            "{}: the tokenizer has {} tokens but the embedding has {} rows; llama.cpp needs one token per row",
            source.tokenizer_path().display(),
            n.unwrap_or(0),
            config.vocab_size
        )));
    }
    Ok(out)
}

fn read_json(path: &Path) -> Result<Json, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| io_err(path, format!("malformed JSON: {e}")))
}

/// llama.cpp's `tokenizer.ggml.pre` for a `tokenizer.json` pre-tokenizer, recognised by its
/// steps (llama.cpp's converter hashes sample tokenizations instead; these are the families
/// whet's own GGUF tokenizer reader knows, in Hugging Face's spelling and in whet's).
fn pre_name(pre: &Json) -> Option<&'static str> {
    let steps: Vec<&Json> = match pre.get("type").and_then(Json::as_str)? {
        "Sequence" => pre.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let mut sig = Vec::new();
    for s in steps {
        match s.get("type").and_then(Json::as_str)? {
            "Split" => {
                let p = s.get("pattern")?;
                let r = p.get("Regex").or_else(|| p.get("String"))?.as_str()?;
                sig.push(if r == r"\p{N}" {
                    "digits"
                } else if r.contains(r"\p{N}{1,3}") {
                    "llama3"
                } else if r.contains(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|") {
                    "qwen2"
                } else if r.contains(r" ?\p{L}+| ?\p{N}+") {
                    "gpt2"
                } else {
                    return None;
                });
            }
            "Digits" if s.get("individual_digits") == Some(&Json::Bool(true)) => sig.push("digits"),
            // ByteLevel splits with GPT-2's regex unless told not to.
            "ByteLevel" if s.get("use_regex").and_then(Json::as_bool).unwrap_or(true) => {
                sig.push("gpt2")
            }
            "ByteLevel" => {}
            _ => return None,
        }
    }
    Some(match sig.as_slice() {
        ["llama3"] => "llama-bpe",
        ["qwen2"] => "qwen2",
        ["digits", "gpt2"] => "smollm",
        ["gpt2"] => "gpt-2",
        _ => return None,
    })
}

/// The `tokenizer.*` keys of a Hugging Face byte-level BPE tokenizer (as llama.cpp's
/// `convert_hf_to_gguf.py` writes them for model `gpt2`).
fn hf_tokenizer_metadata(
    dir: &Path,
    config: &ModelConfig,
) -> Result<Vec<(String, GgufValue)>, EngineError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(io_err(
            &path,
            "not found: a GGUF export needs a byte-level BPE tokenizer.json \
             (SentencePiece tokenizer.model files are not supported)",
        ));
    }
    let bad = |m: String| EngineError::Unsupported(format!("{}: {m}", path.display()));
    let tj = read_json(&path)?;
    let model = &tj["model"];
    let byte_level = [&tj["pre_tokenizer"], &tj["decoder"]]
        .iter()
        .any(|v| v.to_string().contains("\"ByteLevel\""));
    if model["type"] != "BPE" || !byte_level {
        return Err(bad(format!(
            "model type {} with {} pre-tokenizer: GGUF export supports byte-level BPE tokenizers only (Llama 3, SmolLM2, Qwen)",
            model["type"], tj["pre_tokenizer"]["type"]
        )));
    }
    let pre = pre_name(&tj["pre_tokenizer"]).ok_or_else(|| {
        bad(format!(
            "pre_tokenizer {} is not one whet can name for llama.cpp (known: llama-bpe, qwen2, smollm, gpt-2)",
            tj["pre_tokenizer"]
        ))
    })?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is missing".into()))?;
    let n = config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![TOKEN_UNUSED; n];
    let mut place = |id: Option<u64>, text: &str, ty: i32| -> Result<(), EngineError> {
        let id = id.ok_or_else(|| bad(format!("token {text:?} has no integer id")))? as usize;
        let slot = tokens.get_mut(id).ok_or_else(|| {
            bad(format!(
                "token {text:?} has id {id}, past the model's {n} embedding rows"
            ))
        })?;
        *slot = Some(text.to_string());
        types[id] = ty;
        Ok(())
    };
    for (text, id) in vocab {
        place(id.as_u64(), text, TOKEN_NORMAL)?;
    }
    // Added tokens keep their raw text (llama.cpp matches control tokens verbatim).
    let added = tj["added_tokens"].as_array().cloned().unwrap_or_default();
    for t in &added {
        let text = t["content"].as_str().unwrap_or_default();
        let ty = if t["special"].as_bool() == Some(true) {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        place(t["id"].as_u64(), text, ty)?;
    }
    let tokens: Vec<GgufValue> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| GgufValue::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    // Merges are "a b" strings, or (transformers >= 4.45) [a, b] pairs whose sides may hold
    // spaces; gguf-py joins those with a space after spelling each space as U+0120.
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is missing".into()))?
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::String(s) => Ok(GgufValue::String(s.clone())),
            Json::Array(p) if p.len() == 2 && p.iter().all(Json::is_string) => {
                let side = |v: &Json| v.as_str().unwrap_or_default().replace(' ', "\u{120}");
                Ok(GgufValue::String(format!(
                    "{} {}",
                    side(&p[0]),
                    side(&p[1])
                )))
            }
            _ => Err(bad(format!("model.merges[{i}] is not a merge"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        Json::Null
    };
    let id_of = |text: &str| -> Option<u32> {
        added
            .iter()
            .find(|t| t["content"] == text)
            .and_then(|t| t["id"].as_u64())
            .or_else(|| vocab.get(text).and_then(Json::as_u64))
            .map(|id| id as u32)
    };
    let special = |key: &str| -> Option<u32> {
        let v = &tc[key];
        id_of(v.as_str().or_else(|| v["content"].as_str())?)
    };
    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s(pre)),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(tokens),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            GgufValue::Array(merges),
        ),
    ];
    let eos = special("eos_token").or_else(|| config.eos_token_ids.first().copied());
    for (key, id) in [
        ("bos_token_id", special("bos_token")),
        ("eos_token_id", eos),
        ("unknown_token_id", special("unk_token")),
        ("padding_token_id", special("pad_token")),
    ] {
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(id)));
        }
    }
    // BOS is added when tokenizer_config says so, else when the post-processor's template
    // starts with a special token (Llama 3's `<|begin_of_text|>`).
    let post = &tj["post_processor"];
    let steps = match post["processors"].as_array() {
        Some(list) => list.iter().collect(),
        None => vec![post],
    };
    let template_bos = steps
        .iter()
        .any(|p| p["type"] == "TemplateProcessing" && p["single"][0].get("SpecialToken").is_some());
    let add_bos = tc["add_bos_token"].as_bool().unwrap_or(template_bos);
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(add_bos),
    ));
    if let Some(b) = tc["add_eos_token"].as_bool() {
        out.push(("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(b)));
    }
    let template = match &tc["chat_template"] {
        Json::String(t) => Some(t.clone()),
        // A list of named templates: llama.cpp's default is the one named "default".
        Json::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(String::from),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), GgufValue::String(t)));
    }
    Ok(out)
}
