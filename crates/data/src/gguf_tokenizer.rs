//! Builds a Hugging Face `tokenizer.json` document from the tokenizer a GGUF file embeds, so that
//! a `.gguf` is a complete model for us: no `tokenizer.json` next to it is needed.
//!
//! Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is built. How text is cut into words
//! before BPE depends on `tokenizer.ggml.pre`, whose names and regexes are llama.cpp's (see
//! `llm_tokenizer_bpe` in llama.cpp's `src/llama-vocab.cpp`); each is stated below. Several
//! regexes are applied in order, each one splitting the pieces the previous left ("isolated":
//! matches and the text between them both become pieces), which is llama.cpp's
//! `unicode_regex_split` and Hugging Face's `Split(behavior="isolated")`.

use std::collections::HashSet;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{DataError, Result};
use crate::gguf::{GgufMetadata, GgufValue};

/// GPT-2's word regex: contractions, optionally space-prefixed letters / numbers / other runs,
/// then whitespace. llama.cpp's copy lacks the final `|\s+`; the text it leaves unmatched is
/// exactly what `\s+` would match, and isolated splitting keeps it as a piece either way.
pub(crate) const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's regex as llama.cpp writes it: case-insensitive contractions spelled out as
/// character classes (`(?i:'s|...)` in the original `tokenizer.json`; the spelled-out form does
/// not case-fold non-ASCII letters such as `ſ`), numbers in groups of up to three digits.
pub(crate) const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's regex: Llama 3's with single digits (`\p{N}` instead of `\p{N}{1,3}`).
pub(crate) const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer a `tokenizer.ggml.pre` value selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PreTokenizer {
    /// Regexes applied one after the other.
    pub(crate) regexes: Vec<&'static str>,
    /// If a whole word is a vocabulary token, take it without merging (llama.cpp's
    /// `ignore_merges`, the BPE model's `ignore_merges` in `tokenizer.json`).
    pub(crate) ignore_merges: bool,
    /// Whether llama.cpp adds BOS by default for this family (a GGUF's
    /// `tokenizer.ggml.add_bos_token` overrides it).
    pub(crate) add_bos_default: bool,
}

/// The pre-tokenizer of a `tokenizer.ggml.pre` value, or `None` if we do not know it.
pub(crate) fn pre_tokenizer(pre: &str) -> Option<PreTokenizer> {
    let plain = |regexes: Vec<&'static str>| PreTokenizer {
        regexes,
        ignore_merges: false,
        add_bos_default: false,
    };
    Some(match pre {
        // llama.cpp's fallback: punctuation runs, GPT-2, number runs, then groups of three
        // ASCII digits.
        "default" => plain(vec![
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_REGEX,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ]),
        // llama.cpp spells GPT-2's name `gpt-2`; `gpt2` is accepted as an alias.
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => plain(vec![GPT2_REGEX]),
        // SmolLM (and StarCoder, whose tokenizer it reuses): every numeric character is its own
        // piece, then GPT-2's regex. This is SmolLM2's `tokenizer.json` (`Digits(individual)`
        // then byte-level with GPT-2's regex).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
            plain(vec![r"\p{N}", GPT2_REGEX])
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            PreTokenizer {
                regexes: vec![LLAMA3_REGEX],
                ignore_merges: true,
                add_bos_default: true,
            }
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => plain(vec![QWEN2_REGEX]),
        _ => return None,
    })
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What [`build_tokenizer_json`] learned besides the document itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct GgufSpecials {
    /// Named special tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`) → text.
    pub(crate) named: Vec<(String, String)>,
    /// EOS, EOT and EOM ids, in that order, without repeats.
    pub(crate) eos_ids: Vec<u32>,
    /// `tokenizer.chat_template`, if any.
    pub(crate) chat_template: Option<String>,
}

/// GPT-2's byte → printable character map: bytes that are printable Latin-1 map to themselves,
/// the others to U+0100 onwards, in byte order.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            u32::from(b)
        } else {
            next += 1;
            next - 1
        };
        map[usize::from(b)] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    map
}

/// Builds the `tokenizer.json` document of the byte-level BPE tokenizer in `md`.
pub(crate) fn build_tokenizer_json(
    md: &GgufMetadata,
    path: &Path,
) -> Result<(Value, GgufSpecials)> {
    let model_key = "tokenizer.ggml.model";
    let model = md
        .get(model_key)
        .ok_or_else(|| DataError::gguf_key(path, model_key, "missing: the file has no tokenizer"))?
        .as_str()
        .ok_or_else(|| DataError::gguf_key(path, model_key, "is not a string"))?;
    match model {
        "gpt2" => {}
        "llama" => {
            return Err(DataError::Unsupported {
                path: path.display().to_string(),
                key: model_key.into(),
                value: model.into(),
                message: "SentencePiece tokenizers are not supported yet; only byte-level BPE \
                          (\"gpt2\") is"
                    .into(),
            })
        }
        other => {
            return Err(DataError::Unsupported {
                path: path.display().to_string(),
                key: model_key.into(),
                value: other.into(),
                message: "only byte-level BPE (\"gpt2\") tokenizers are supported".into(),
            })
        }
    }

    let pre_key = "tokenizer.ggml.pre";
    // llama.cpp treats a missing `pre` as "default" (with a loud warning); so do we.
    let pre_name = match md.get(pre_key) {
        None => "default",
        Some(v) => v
            .as_str()
            .ok_or_else(|| DataError::gguf_key(path, pre_key, "is not a string"))?,
    };
    let pre = pre_tokenizer(pre_name).ok_or_else(|| DataError::Unsupported {
        path: path.display().to_string(),
        key: pre_key.into(),
        value: pre_name.into(),
        message: "unknown pre-tokenizer; known: default, gpt-2/gpt2, smollm, starcoder, \
                  llama-bpe/llama3, qwen2 and their llama.cpp aliases"
            .into(),
    })?;

    let tokens = string_array(md, path, "tokenizer.ggml.tokens")?;
    let merges = string_array(md, path, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => {
            let key = "tokenizer.ggml.token_type";
            let arr = v
                .as_array()
                .ok_or_else(|| DataError::gguf_key(path, key, "is not an array"))?;
            if arr.len() != tokens.len() {
                return Err(DataError::gguf_key(
                    path,
                    key,
                    format!("has {} entries for {} tokens", arr.len(), tokens.len()),
                ));
            }
            arr.iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_i64().ok_or_else(|| {
                        DataError::gguf_key(path, key, format!("entry {i} is not an integer"))
                    })
                })
                .collect::<Result<_>>()?
        }
    };

    // The vocabulary. Normal tokens are stored in GPT-2's byte alphabet; added tokens (control,
    // user-defined) are stored as their raw text, and must stay so: the `tokenizers` library
    // gives an added token the id its raw text has in the vocabulary. A normal token with a
    // character outside the alphabet cannot come out of byte-level BPE as written, so it is
    // re-spelled byte by byte (as transformers does); if that spelling is taken, the raw one stays.
    let alphabet = byte_to_char();
    let in_alphabet: HashSet<char> = alphabet.iter().copied().collect();
    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        let is_added = ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED;
        let key = if !is_added && !tok.chars().all(|c| in_alphabet.contains(&c)) {
            let respelled: String = tok.bytes().map(|b| alphabet[usize::from(b)]).collect();
            if vocab.contains_key(&respelled) {
                tok.to_string()
            } else {
                respelled
            }
        } else {
            tok.to_string()
        };
        // A repeated token keeps its first id (later ones can then only be decoded, never
        // produced), rather than silently moving the first one.
        vocab.entry(key).or_insert_with(|| json!(id));
        if is_added {
            added.push(json!({
                "id": id,
                "content": tok,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }

    let merges: Vec<Value> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // llama.cpp splits at the first space after the first character, so that a merge
            // whose left side starts with a space still parses.
            let first = m.chars().next().map_or(0, char::len_utf8);
            match m[first..].find(' ') {
                Some(at) => Ok(json!([&m[..first + at], &m[first + at + 1..]])),
                None => Err(DataError::gguf_key(
                    path,
                    "tokenizer.ggml.merges",
                    format!("entry {i} ({m:?}) is not two tokens separated by a space"),
                )),
            }
        })
        .collect::<Result<_>>()?;

    let token_at = |key: &str| -> Result<Option<(u32, String)>> {
        let Some(v) = md.get(key) else {
            return Ok(None);
        };
        let id = v
            .as_u64()
            .ok_or_else(|| DataError::gguf_key(path, key, "is not an unsigned integer"))?;
        // Some converters write -1 (as u32::MAX) for "none".
        if id == u64::from(u32::MAX) {
            return Ok(None);
        }
        let tok = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get(i))
            .ok_or_else(|| {
                DataError::gguf_key(
                    path,
                    key,
                    format!(
                        "id {id} is outside the vocabulary ({} tokens)",
                        tokens.len()
                    ),
                )
            })?;
        Ok(Some((id as u32, tok.to_string())))
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;
    let unk = token_at("tokenizer.ggml.unknown_token_id")?;
    let pad = token_at("tokenizer.ggml.padding_token_id")?;
    let eot = token_at("tokenizer.ggml.eot_token_id")?;
    let eom = token_at("tokenizer.ggml.eom_token_id")?;

    let flag = |key: &str, default: bool| -> Result<bool> {
        match md.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| DataError::gguf_key(path, key, "is not a bool")),
        }
    };
    let add_bos = flag("tokenizer.ggml.add_bos_token", pre.add_bos_default)?;
    let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;
    let post_processor = template_processing(
        if add_bos { bos.as_ref() } else { None },
        if add_eos { eos.as_ref() } else { None },
    );

    let mut pre_tokenizers: Vec<Value> = pre
        .regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    pre_tokenizers.push(json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false
    }));

    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
            "vocab": vocab,
            "merges": merges,
        }
    });

    let mut named = Vec::new();
    for (name, tok) in [
        ("bos_token", &bos),
        ("eos_token", &eos),
        ("unk_token", &unk),
        ("pad_token", &pad),
    ] {
        if let Some((_, text)) = tok {
            named.push((name.to_string(), text.clone()));
        }
    }
    let mut eos_ids = Vec::new();
    for (id, _) in [&eos, &eot, &eom].into_iter().flatten() {
        if !eos_ids.contains(id) {
            eos_ids.push(*id);
        }
    }
    let chat_template = match md.get("tokenizer.chat_template") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| {
                    DataError::gguf_key(path, "tokenizer.chat_template", "is not a string")
                })?
                .to_string(),
        ),
    };
    Ok((
        doc,
        GgufSpecials {
            named,
            eos_ids,
            chat_template,
        },
    ))
}

/// A `TemplateProcessing` post-processor adding `bos` before and `eos` after each sequence.
fn template_processing(bos: Option<&(u32, String)>, eos: Option<&(u32, String)>) -> Value {
    let piece = |seq: &str, type_id: u32| -> Vec<Value> {
        let mut v = Vec::new();
        if let Some((_, t)) = bos {
            v.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
        }
        v.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some((_, t)) = eos {
            v.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
        }
        v
    };
    let mut special = Map::new();
    for (id, t) in [bos, eos].into_iter().flatten() {
        special.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    let mut pair = piece("A", 0);
    pair.extend(piece("B", 1));
    json!({"type": "TemplateProcessing", "single": piece("A", 0), "pair": pair, "special_tokens": special})
}

fn string_array<'a>(md: &'a GgufMetadata, path: &Path, key: &str) -> Result<Vec<&'a str>> {
    let arr = md
        .get(key)
        .ok_or_else(|| DataError::gguf_key(path, key, "missing"))?
        .as_array()
        .ok_or_else(|| DataError::gguf_key(path, key, "is not an array"))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            GgufValue::String(s) => Ok(s.as_str()),
            other => Err(DataError::gguf_key(
                path,
                key,
                format!("entry {i} is a {}, not a string", other.type_name()),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::parse_gguf_metadata;
    use crate::gguf::tests::GgufWriter;

    fn tiny(pre: &str, add_bos: bool) -> Vec<u8> {
        // Byte-level tokens: "Ġ" is the space byte.
        let tokens = [
            "<|end|>", "a", "b", "1", "2", "Ġ", "ab", "Ġa", "<think>", " z",
        ];
        let types = [3, 1, 1, 1, 1, 1, 1, 1, 4, 1];
        let mut w = GgufWriter::new();
        w.string("tokenizer.ggml.model", "gpt2")
            .string("tokenizer.ggml.pre", pre)
            .strings("tokenizer.ggml.tokens", &tokens)
            .i32s("tokenizer.ggml.token_type", &types)
            .strings("tokenizer.ggml.merges", &["a b", "Ġ a"])
            .u32("tokenizer.ggml.bos_token_id", 0)
            .u32("tokenizer.ggml.eos_token_id", 0)
            .u32("tokenizer.ggml.eot_token_id", 8)
            .bool("tokenizer.ggml.add_bos_token", add_bos)
            .string("tokenizer.chat_template", "{{ messages }}");
        w.finish()
    }

    fn load(bytes: &[u8]) -> (tokenizers::Tokenizer, GgufSpecials) {
        let md = parse_gguf_metadata(bytes, Path::new("t.gguf")).unwrap();
        let (doc, sp) = build_tokenizer_json(&md, Path::new("t.gguf")).unwrap();
        let tok: tokenizers::Tokenizer = doc.to_string().parse().unwrap();
        (tok, sp)
    }

    #[test]
    fn builds_a_working_byte_level_bpe() {
        let (tok, sp) = load(&tiny("smollm", false));
        let ids = tok.encode("ab a<|end|>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![6, 7, 0]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "ab a<|end|>");
        assert_eq!(tok.decode(&ids, true).unwrap(), "ab a");
        // User-defined tokens are matched whole but are not special.
        let ids = tok.encode("a<think>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![1, 8]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "a<think>");
        // The normal token " z" is not in the byte alphabet (a raw space): it was re-spelled.
        assert_eq!(tok.token_to_id("Ġz"), Some(9));
        assert_eq!(tok.token_to_id(" z"), None);
        assert_eq!(tok.get_vocab_size(true), 10);
        assert_eq!(sp.eos_ids, vec![0, 8]);
        assert_eq!(sp.chat_template.as_deref(), Some("{{ messages }}"));
        assert_eq!(
            sp.named[0],
            ("bos_token".to_string(), "<|end|>".to_string())
        );
    }

    #[test]
    fn smollm_splits_digits_and_gpt2_does_not_need_to() {
        let (tok, _) = load(&tiny("smollm", true));
        let ids = tok.encode("12", true).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![0, 3, 4], "BOS then one piece per digit");
        let (tok, _) = load(&tiny("gpt-2", false));
        assert_eq!(tok.encode("12", true).unwrap().get_ids(), &[3, 4]);
    }

    #[test]
    fn regexes_cut_text_as_llama_cpp_does() {
        use tokenizers::{PreTokenizedString, PreTokenizer as _};
        let cut = |pre: &str, text: &str| -> Vec<String> {
            let p = pre_tokenizer(pre).unwrap();
            let doc = json!({"type": "Sequence", "pretokenizers": p.regexes.iter().map(|r|
                json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false})
            ).collect::<Vec<_>>()});
            let pt: tokenizers::PreTokenizerWrapper = serde_json::from_value(doc).unwrap();
            let mut s = PreTokenizedString::from(text);
            pt.pre_tokenize(&mut s).unwrap();
            s.get_splits(
                tokenizers::OffsetReferential::Original,
                tokenizers::OffsetType::Byte,
            )
            .into_iter()
            .map(|(w, _, _)| w.to_string())
            .collect()
        };
        assert_eq!(
            cut("gpt2", "I'm 12345 ok  !"),
            ["I", "'m", " 12345", " ok", " ", " !"]
        );
        assert_eq!(cut("smollm", " 123x"), [" ", "1", "2", "3", "x"]);
        assert_eq!(
            cut("llama-bpe", "I'M 12345\n\nok"),
            ["I", "'M", " ", "123", "45", "\n\n", "ok"]
        );
        assert_eq!(cut("qwen2", "x 123"), ["x", " ", "1", "2", "3"]);
    }

    #[test]
    fn unsupported_models_and_pre_tokenizers_are_named() {
        let mut w = GgufWriter::new();
        w.string("tokenizer.ggml.model", "llama");
        let md = parse_gguf_metadata(&w.finish(), Path::new("m.gguf")).unwrap();
        let e = build_tokenizer_json(&md, Path::new("m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.gguf")
                && e.contains("tokenizer.ggml.model")
                && e.contains("not supported yet"),
            "{e}"
        );

        let md = parse_gguf_metadata(&tiny("klingon", false), Path::new("m.gguf")).unwrap();
        let e = build_tokenizer_json(&md, Path::new("m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.ggml.pre = \"klingon\""), "{e}");
    }
}
