//! A model's tokenizer: the Hugging Face `tokenizers` model, its special tokens, the ids that end
//! generation, and its chat template — from a Hugging Face model directory or a `.gguf` file.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::error::{DataError, Result};
use crate::gguf::read_gguf_metadata;
use crate::gguf_tokenizer::build_tokenizer_json;

/// The special-token names transformers passes to chat templates (`SPECIAL_TOKENS_ATTRIBUTES`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A model's tokenizer (see the module docs).
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    /// Named special tokens (`bos_token` → `<s>`), in [`SPECIAL_TOKEN_NAMES`] order.
    special_tokens: Vec<(String, String)>,
    eos_token_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// `path` is a Hugging Face model directory (tokenizer.json, tokenizer_config.json, optional
    /// chat_template.jinja, optional generation_config.json/config.json for eos ids) or a
    /// `.gguf` file.
    pub fn from_model_path(path: &Path) -> Result<Self> {
        let is_gguf = path.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf {
            Self::from_gguf(path)
        } else if path.is_dir() {
            Self::from_hf_dir(path)
        } else if path.exists() {
            Err(DataError::Tokenizer {
                path: path.display().to_string(),
                message: "expected a model directory or a .gguf file".into(),
            })
        } else {
            Err(DataError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
    }

    fn from_gguf(path: &Path) -> Result<Self> {
        let md = read_gguf_metadata(path)?;
        let (doc, specials) = build_tokenizer_json(&md, path)?;
        let inner = tokenizers::Tokenizer::from_str(&doc.to_string())
            .map_err(|e| DataError::tokenizer(path, e))?;
        let chat_template = match &specials.chat_template {
            Some(src) => Some(template_with_specials(src, &specials.named)?),
            None => None,
        };
        Ok(Self {
            inner,
            source: path.to_path_buf(),
            special_tokens: specials.named,
            eos_token_ids: specials.eos_ids,
            chat_template,
        })
    }

    fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(DataError::Tokenizer {
                path: dir.display().to_string(),
                message: "no tokenizer.json (only models with a fast tokenizer file are supported)"
                    .into(),
            });
        }
        let mut inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| DataError::tokenizer(&tok_path, e))?;
        // A tokenizer.json may carry truncation/padding settings; transformers ignores them
        // unless asked, and so do we (they would silently cut or pad our encodings).
        inner
            .with_truncation(None)
            .map_err(|e| DataError::tokenizer(&tok_path, e))?;
        inner.with_padding(None);

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let mut special_tokens = Vec::new();
        if let Some(cfg) = &config {
            for name in SPECIAL_TOKEN_NAMES {
                if let Some(text) = special_token_text(cfg, name, &config_path)? {
                    special_tokens.push((name.to_string(), text));
                }
            }
        }

        let template_source = chat_template_source(dir, config.as_ref(), &config_path)?;
        let chat_template = match &template_source {
            Some(src) => Some(template_with_specials(src, &special_tokens)?),
            None => None,
        };

        let mut eos_token_ids = Vec::new();
        let mut push = |id: u32| {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        };
        if let Some((_, eos)) = special_tokens.iter().find(|(n, _)| n == "eos_token") {
            match inner.token_to_id(eos) {
                Some(id) => push(id),
                None => {
                    return Err(DataError::json(
                        &config_path,
                        "eos_token",
                        format!("{eos:?} is not in the vocabulary"),
                    ))
                }
            }
        }
        for file in ["generation_config.json", "config.json"] {
            let p = dir.join(file);
            if let Some(v) = read_json_if_exists(&p)? {
                for id in id_list(v.get("eos_token_id"), &p, "eos_token_id")? {
                    push(id);
                }
            }
        }

        Ok(Self {
            inner,
            source: dir.to_path_buf(),
            special_tokens,
            eos_token_ids,
            chat_template,
        })
    }

    /// Token ids of `text`; `add_special_tokens` adds what the model's post-processor adds
    /// (BOS for most Llama-family models, nothing for SmolLM2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| DataError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; `skip_special_tokens` leaves out special added tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= n) {
            return Err(DataError::Decode(format!(
                "token id {id} at position {i} is outside the vocabulary ({n} tokens)"
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| DataError::Decode(e.to_string()))
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token, spelled as the vocabulary spells it (byte-level tokens use `Ġ` for
    /// a space) or as an added token's text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary's spelling of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The beginning-of-sequence token, if the model names one.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }

    /// The end-of-sequence token, if the model names one.
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }

    /// A named special token (`pad_token`, `unk_token`, ...).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }

    /// Every id that ends generation by default: the EOS token, a GGUF's EOT/EOM tokens, and
    /// the `eos_token_id` lists of generation_config.json and config.json. No repeats.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The model file or directory this tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The underlying `tokenizers` tokenizer, for what this type does not wrap.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Renders with the model's own template then encodes without adding special tokens (what
    /// transformers' apply_chat_template does). Error if the model has no template.
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| DataError::NoChatTemplate {
                path: self.source.display().to_string(),
            })?;
        let text = template.render(messages, tools, add_generation_prompt, None)?;
        self.encode(&text, false)
    }
}

fn template_with_specials(source: &str, specials: &[(String, String)]) -> Result<ChatTemplate> {
    let mut t = ChatTemplate::new(source, None, None)?;
    for (name, text) in specials {
        t = t.with_special_token(name, text);
    }
    Ok(t)
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DataError::json(path, ".", e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DataError::io(path, e)),
    }
}

/// A special token in tokenizer_config.json: a string, an AddedToken dict `{"content": ...}`,
/// or null/absent.
fn special_token_text(cfg: &Value, name: &str, path: &Path) -> Result<Option<String>> {
    match cfg.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(DataError::json(
                path,
                format!("{name}.content"),
                "expected a string",
            )),
        },
        Some(_) => Err(DataError::json(
            path,
            name,
            "expected a string or an object with a `content` string",
        )),
    }
}

/// The chat template, by transformers' precedence: chat_template.jinja, then
/// chat_template.json's `chat_template`, then tokenizer_config.json's `chat_template` (a string,
/// or a list of `{name, template}` of which "default" is used).
fn chat_template_source(
    dir: &Path,
    config: Option<&Value>,
    config_path: &Path,
) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    match fs::read_to_string(&jinja) {
        Ok(s) => return Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DataError::io(&jinja, e)),
    }
    let json_path = dir.join("chat_template.json");
    if let Some(v) = read_json_if_exists(&json_path)? {
        if let Some(src) = template_field(&v, &json_path)? {
            return Ok(Some(src));
        }
    }
    match config {
        Some(cfg) => template_field(cfg, config_path),
        None => Ok(None),
    }
}

fn template_field(v: &Value, path: &Path) -> Result<Option<String>> {
    match v.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            for (i, item) in list.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(DataError::json(
                            path,
                            format!("chat_template[{i}]"),
                            "expected {\"name\": string, \"template\": string}",
                        ))
                    }
                }
            }
            Err(DataError::json(
                path,
                "chat_template",
                "a list of named templates without one named \"default\"",
            ))
        }
        Some(_) => Err(DataError::json(
            path,
            "chat_template",
            "expected a string or a list of {name, template}",
        )),
    }
}

/// `eos_token_id` as an int or a list of ints.
fn id_list(v: Option<&Value>, path: &Path, field: &str) -> Result<Vec<u32>> {
    let bad = || DataError::json(path, field, "expected a token id or a list of token ids");
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(bad)
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A word-level tokenizer.json small enough to write by hand.
    fn write_model(dir: &Path, config: Value) {
        let tok = json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "<|eot|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
            "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1, "<|eot|>": 2, "hello": 3, "world": 4, "[UNK]": 5}, "unk_token": "[UNK]"}
        });
        fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    }

    #[test]
    fn loads_a_hugging_face_directory() {
        let dir = tempfile::tempdir().unwrap();
        write_model(
            dir.path(),
            json!({
                "bos_token": {"content": "<s>", "lstrip": false},
                "eos_token": "</s>",
                "pad_token": null,
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }} {% endfor %}{{ eos_token }}"}
                ]
            }),
        );
        fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [1, 2]}"#,
        )
        .unwrap();
        let t = Tokenizer::from_model_path(dir.path()).unwrap();
        assert_eq!(t.bos_token(), Some("<s>"));
        assert_eq!(t.eos_token(), Some("</s>"));
        assert_eq!(t.special_token("pad_token"), None);
        assert_eq!(t.eos_token_ids(), vec![1, 2]);
        assert_eq!(t.vocab_size(), 6);
        assert_eq!(t.encode("hello world", true).unwrap(), vec![0, 3, 4]);
        assert_eq!(t.encode("hello world", false).unwrap(), vec![3, 4]);
        assert_eq!(t.decode(&[0, 3, 4], true).unwrap(), "hello world");
        let e = t.decode(&[3, 99], false).unwrap_err();
        assert!(e.to_string().contains("token id 99 at position 1"), "{e}");
        let msgs = [
            json!({"role": "user", "content": "hello"}),
            json!({"role": "assistant", "content": "world"}),
        ];
        // The template writes <s> itself; apply_chat_template must not add another.
        assert_eq!(
            t.apply_chat_template(&msgs, None, false).unwrap(),
            vec![0, 3, 4, 1]
        );

        // chat_template.jinja wins over tokenizer_config.json.
        fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ messages[0].content }}",
        )
        .unwrap();
        let t = Tokenizer::from_model_path(dir.path()).unwrap();
        assert_eq!(t.apply_chat_template(&msgs, None, false).unwrap(), vec![3]);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), json!({"eos_token": 7}));
        let e = Tokenizer::from_model_path(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("`eos_token`"),
            "{e}"
        );

        write_model(
            dir.path(),
            json!({"chat_template": [{"name": "rag", "template": "x"}]}),
        );
        let e = Tokenizer::from_model_path(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"default\""), "{e}");

        write_model(dir.path(), json!({}));
        let t = Tokenizer::from_model_path(dir.path()).unwrap();
        let e = t
            .apply_chat_template(&[], None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no chat template"), "{e}");

        let e = Tokenizer::from_model_path(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = Tokenizer::from_model_path(empty.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no tokenizer.json"), "{e}");
    }
}
