//! Our GGUF-built SmolLM2 tokenizer against what transformers does with the same file
//! (tests/fixtures/chat/smollm2.json, written by tools/make_chat_fixtures.py).

use std::path::{Path, PathBuf};

use serde_json::Value;
use whet_data::Tokenizer;

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// The real model, or `None` (test skipped) when it has not been fetched. Under CI a missing
/// model is a failure, not a skip.
fn smollm2() -> Option<Tokenizer> {
    let path = repo_path("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        if std::env::var_os("CI").is_some() {
            panic!(
                "{} is missing (CI is set): run tools/get-smollm2.sh",
                path.display()
            );
        }
        eprintln!(
            "skipped: {} is missing; run tools/get-smollm2.sh to fetch it",
            path.display()
        );
        return None;
    }
    Some(Tokenizer::from_model_path(&path).expect("load SmolLM2 GGUF tokenizer"))
}

fn fixture() -> Value {
    let path = repo_path("tests/fixtures/chat/smollm2.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().expect("string")
}

#[test]
fn vocabulary_and_special_tokens_match_transformers() {
    let Some(tok) = smollm2() else { return };
    let fx = fixture();
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.bos_token(), Some(s(&fx["bos_token"])));
    assert_eq!(tok.eos_token(), Some(s(&fx["eos_token"])));
    assert_eq!(tok.special_token("unk_token"), Some(s(&fx["unk_token"])));
    assert_eq!(tok.special_token("pad_token"), Some(s(&fx["pad_token"])));
    assert_eq!(
        tok.token_to_id(s(&fx["bos_token"])),
        Some(fx["bos_token_id"].as_u64().unwrap() as u32)
    );
    // The GGUF names only an EOS (<|im_end|>); no EOT/EOM keys.
    assert_eq!(
        tok.eos_token_ids(),
        vec![fx["eos_token_id"].as_u64().unwrap() as u32]
    );
    assert_eq!(
        tok.chat_template().map(|t| t.source()),
        fx["chat_template"].as_str()
    );
}

#[test]
fn encodings_and_decodings_match_transformers() {
    let Some(tok) = smollm2() else { return };
    let fx = fixture();
    let cases = fx["encodings"].as_array().unwrap();
    assert!(cases.len() >= 15, "fixture has {} strings", cases.len());
    for case in cases {
        let text = s(&case["text"]);
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "encode {text:?}");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids_with_special_tokens"]),
            "encode+special {text:?}"
        );
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            s(&case["decoded"]),
            "decode {text:?}"
        );
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            s(&case["decoded_skip_special"]),
            "decode skip {text:?}"
        );
    }
}

/// transformers has no `smollm` pre-tokenizer and uses GPT-2's regex alone; llama.cpp and
/// SmolLM2's own tokenizer.json split every numeric character first. On these strings the two
/// differ, and we follow llama.cpp (the pipeline the model was trained with).
#[test]
fn known_divergences_follow_llama_cpp_not_transformers() {
    let Some(tok) = smollm2() else { return };
    let fx = fixture();
    for case in fx["divergences"].as_array().unwrap() {
        let text = s(&case["text"]);
        let ours = tok.encode(text, false).unwrap();
        assert_eq!(
            ours,
            ids(&case["ids_smollm_pre_tokenizer"]),
            "encode {text:?}"
        );
        assert_ne!(
            ours,
            ids(&case["ids"]),
            "{text:?} no longer diverges: move it to `encodings`"
        );
        assert_eq!(tok.decode(&ours, false).unwrap(), text);
    }
}

#[test]
fn apply_chat_template_matches_transformers_token_for_token() {
    let Some(tok) = smollm2() else { return };
    let fx = fixture();
    let template = tok.chat_template().expect("SmolLM2 has a chat template");
    let chats = fx["chats"].as_array().unwrap();
    assert!(chats.len() >= 6);
    for chat in chats {
        let name = s(&chat["name"]);
        let messages = chat["messages"].as_array().unwrap();
        let agp = chat["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(messages, None, agp, None).unwrap();
        assert_eq!(text, s(&chat["text"]), "text of {name} (agp={agp})");
        let got = tok.apply_chat_template(messages, None, agp).unwrap();
        // Where transformers' GPT-2-only pre-tokenizer differs from `smollm` (see above), the
        // fixture also records the `smollm` ids, and those are ours.
        match chat.get("ids_smollm_pre_tokenizer") {
            Some(reference) => {
                assert_eq!(got, ids(reference), "ids of {name} (agp={agp})");
                assert_ne!(got, ids(&chat["ids"]), "{name} no longer diverges");
            }
            None => assert_eq!(got, ids(&chat["ids"]), "ids of {name} (agp={agp})"),
        }
    }
}

/// The Hugging Face directory path on real data: a directory laid out as transformers'
/// `save_pretrained` writes it for this GGUF (tokenizer.json whose pre-tokenizer is GPT-2's
/// byte-level regex, tokenizer_config.json, chat_template.jinja). Loaded from there, we must
/// match transformers everywhere, divergent strings included.
#[test]
fn hugging_face_directory_matches_transformers_everywhere() {
    let Some(gguf_tok) = smollm2() else { return };
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let mut doc: Value = serde_json::from_str(&gguf_tok.inner().to_string(false).unwrap()).unwrap();
    doc["pre_tokenizer"] = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    std::fs::write(dir.path().join("tokenizer.json"), doc.to_string()).unwrap();
    let config = serde_json::json!({
        "backend": "tokenizers",
        "bos_token": fx["bos_token"],
        "eos_token": {"content": fx["eos_token"], "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true},
        "pad_token": fx["pad_token"],
        "unk_token": fx["unk_token"],
        "tokenizer_class": "TokenizersBackend"
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        s(&fx["chat_template"]),
    )
    .unwrap();

    let tok = Tokenizer::from_model_path(dir.path()).unwrap();
    assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.bos_token(), Some(s(&fx["bos_token"])));
    assert_eq!(
        tok.eos_token_ids(),
        vec![fx["eos_token_id"].as_u64().unwrap() as u32]
    );
    let all = fx["encodings"]
        .as_array()
        .unwrap()
        .iter()
        .chain(fx["divergences"].as_array().unwrap());
    for case in all {
        let text = s(&case["text"]);
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids"]),
            "encode {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids_with_special_tokens"])
        );
        assert_eq!(
            tok.decode(&ids(&case["ids"]), true).unwrap(),
            s(&case["decoded_skip_special"])
        );
    }
    for chat in fx["chats"].as_array().unwrap() {
        let messages = chat["messages"].as_array().unwrap();
        let agp = chat["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            tok.apply_chat_template(messages, None, agp).unwrap(),
            ids(&chat["ids"]),
            "{}",
            chat["name"]
        );
    }
}

#[test]
fn tokenizer_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<whet_data::ChatTemplate>();
}

/// Rendering for training: the tokens are exactly apply_chat_template's, and the weights mark
/// each assistant reply with its `<|im_end|>` — not the header before it, nor the newline after.
#[test]
fn rendered_rows_train_on_assistant_replies_and_their_end_of_turn() {
    use whet_data::{parse_row, render_conversation, Format, Row, Scaffold, TrainOn};
    let Some(tok) = smollm2() else { return };
    let row = serde_json::json!({"messages": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]});
    let Row::Chat(conv) = parse_row(&row, Format::Auto).unwrap() else {
        panic!("a chat row")
    };
    let scaffold = Scaffold {
        system_prompt: Some("Answer in one word."),
        tools: &[],
    };
    let trained_text = |train_on: TrainOn, conv: &whet_data::Conversation| {
        let r = render_conversation(&tok, conv, &scaffold, train_on).unwrap();
        assert_eq!(r.tokens.len(), r.weights.len());
        let ids: Vec<u32> = r
            .tokens
            .iter()
            .zip(&r.weights)
            .filter(|(_, &w)| w > 0.0)
            .map(|(&t, _)| t)
            .collect();
        (r.clone(), tok.decode(&ids, false).unwrap())
    };
    let (r, text) = trained_text(TrainOn::AllAssistantMessages, &conv);
    let mut with_system = conv.messages.clone();
    with_system.insert(
        0,
        serde_json::json!({"role": "system", "content": "Answer in one word."}),
    );
    assert_eq!(
        r.tokens,
        tok.apply_chat_template(&with_system, None, false).unwrap()
    );
    assert_eq!(text, "Paris.<|im_end|>Rome.<|im_end|>");
    let (_, text) = trained_text(TrainOn::LastAssistantMessage, &conv);
    assert_eq!(text, "Rome.<|im_end|>");
    let (r, _) = trained_text(TrainOn::AllMessages, &conv);
    assert_eq!(r.trained(), r.tokens.len());
    // weight: 0 on a reply keeps it as context.
    let mut zero = conv.clone();
    zero.weights[1] = Some(false);
    let (_, text) = trained_text(TrainOn::AllAssistantMessages, &zero);
    assert_eq!(text, "Rome.<|im_end|>");
}

/// SmolLM2's template ignores `tools` and `tool_calls`; transformers would render an agent
/// trajectory as empty assistant turns. whet writes both as Hermes text, so the calls are what
/// the model learns — the same text a policy playing a world sees and produces.
#[test]
fn tool_calls_are_trained_as_text_where_the_template_has_no_place_for_them() {
    use whet_data::{parse_row, render_conversation, Format, Row, Scaffold, TrainOn};
    let Some(tok) = smollm2() else { return };
    let atif = serde_json::json!({"schema_version": "ATIF-v1.4", "steps": [
        {"step_id": 1, "source": "user", "message": "Find the code."},
        {"step_id": 2, "source": "agent", "message": "",
         "tool_calls": [{"tool_call_id": "c1", "function_name": "cat",
                         "arguments": {"path": "/pin.txt"}}],
         "observation": {"results": [{"source_call_id": "c1", "content": "4821"}]}}],
        "extra": {"tools": [{"type": "function", "function": {"name": "cat",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]}});
    let Row::Chat(conv) = parse_row(&atif, Format::Auto).unwrap() else {
        panic!("a chat row")
    };
    assert!(
        conv.tools.is_some(),
        "the trajectory's tools come from extra.tools"
    );
    let r = render_conversation(
        &tok,
        &conv,
        &Scaffold::default(),
        TrainOn::AllAssistantMessages,
    )
    .unwrap();
    let text = tok.decode(&r.tokens, false).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\n# Tools\n"),
        "the tools are described in a system message: {text}"
    );
    assert!(text.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"cat\""));
    assert!(text.contains("<|im_start|>tool\n4821<|im_end|>"), "{text}");
    let trained: Vec<u32> = r
        .tokens
        .iter()
        .zip(&r.weights)
        .filter(|(_, &w)| w > 0.0)
        .map(|(&t, _)| t)
        .collect();
    assert_eq!(
        tok.decode(&trained, false).unwrap(),
        "<tool_call>\n{\"name\": \"cat\", \"arguments\": {\"path\": \"/pin.txt\"}}\n</tool_call><|im_end|>"
    );
}
