//! `render_conversation` (what `whet data render` and training use) against transformers'
//! `apply_chat_template` for a Llama 3 and a Qwen2.5 tokenizer: the same token ids, and loss
//! weights of 1 on exactly each assistant message's content and end-of-turn token.
//!
//! Each case's row is in OpenAI's format, some tool-call arguments as JSON text; transformers is
//! given them as objects (`template_messages`, what it documents), and so must whet's
//! `parse_row` make them: the templates write arguments with `tojson`, which would encode JSON
//! text a second time.
//!
//! Fixtures: tests/fixtures/chat/families/<family>/ (tokenizer.json, tokenizer_config.json,
//! cases.json), written by tools/make_render_fixtures.py. The tokenizers are the families' real
//! tokenizer.json files with the vocabulary pruned to what the cases use; token ids are the
//! real ones, so the vocabulary is sparse and trained tokens are decoded through `inner()`
//! (`Tokenizer::decode` refuses ids at or above the token count).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use whet_data::{
    parse_row, render_conversation, Conversation, Format, Rendered, Row, Scaffold, Tokenizer,
    TrainOn,
};

const FAMILIES: [&str; 2] = ["llama3", "qwen2.5"];

fn family_dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/chat/families")
        .join(family)
}

struct Family {
    name: &'static str,
    tok: Tokenizer,
    fixture: Value,
}

fn load(name: &'static str) -> Family {
    let dir = family_dir(name);
    let tok = Tokenizer::from_model_path(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let path = dir.join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fixture = serde_json::from_str(&text).expect("cases.json is JSON");
    Family { name, tok, fixture }
}

fn families() -> Vec<Family> {
    FAMILIES.iter().map(|&f| load(f)).collect()
}

fn cases(fam: &Family) -> &[Value] {
    let cases = fam.fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 3, "{}: {} cases", fam.name, cases.len());
    cases
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

/// The case as a dataset row: `{"messages", "tools"}`, parsed as `whet data render` parses it.
fn conversation(case: &Value) -> Conversation {
    let mut row = json!({"messages": case["messages"]});
    if !case["tools"].is_null() {
        row["tools"] = case["tools"].clone();
    }
    match parse_row(&row, Format::Auto) {
        Ok(Row::Chat(conv)) => conv,
        other => panic!("{}: not a chat row: {other:?}", case["name"]),
    }
}

/// The arguments of every tool call in `messages`, in order.
fn tool_arguments(messages: &Value) -> Vec<Value> {
    messages
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["tool_calls"].as_array())
        .flatten()
        .map(|call| call["function"]["arguments"].clone())
        .collect()
}

/// (message index, [start, end)) of each assistant message's trained tokens.
fn spans(case: &Value) -> Vec<(usize, usize, usize)> {
    case["trained"]
        .as_array()
        .expect("trained")
        .iter()
        .map(|t| {
            let span = ids(&t["span"]);
            (
                t["message"].as_u64().unwrap() as usize,
                span[0] as usize,
                span[1] as usize,
            )
        })
        .collect()
}

fn weights_on(len: usize, spans: &[(usize, usize, usize)]) -> Vec<f32> {
    let mut w = vec![0.0; len];
    for &(_, start, end) in spans {
        w[start..end].fill(1.0);
    }
    w
}

fn render(fam: &Family, conv: &Conversation, scaffold: &Scaffold<'_>, on: TrainOn) -> Rendered {
    let r = render_conversation(&fam.tok, conv, scaffold, on)
        .unwrap_or_else(|e| panic!("{}: {e}", fam.name));
    assert_eq!(r.tokens.len(), r.weights.len());
    r
}

/// Where the weights differ, as readable tokens.
fn weight_diff(fam: &Family, tokens: &[u32], got: &[f32], want: &[f32]) -> String {
    tokens
        .iter()
        .zip(got.iter().zip(want))
        .enumerate()
        .filter(|(_, (_, (g, w)))| g != w)
        .map(|(i, (&t, (g, w)))| {
            let text = fam.tok.inner().decode(&[t], false).unwrap_or_default();
            format!("  token {i} {t} {text:?}: weight {g}, expected {w}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn fixture_tokenizers_are_the_real_vocabularies() {
    for fam in families() {
        let specials = fam.fixture["special_ids"].as_object().unwrap();
        assert!(!specials.is_empty());
        for (token, id) in specials {
            assert_eq!(
                fam.tok.token_to_id(token),
                Some(id.as_u64().unwrap() as u32),
                "{}: {token}",
                fam.name
            );
        }
        let eot = fam.fixture["end_of_turn"].as_str().unwrap();
        assert_eq!(fam.tok.eos_token(), Some(eot), "{}", fam.name);
        assert!(fam.tok.chat_template().is_some());
    }
    let llama = load("llama3");
    assert_eq!(llama.tok.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(llama.tok.token_to_id("<|eot_id|>"), Some(128_009));
    assert_eq!(llama.tok.token_to_id("<|python_tag|>"), Some(128_010));
    let qwen = load("qwen2.5");
    assert_eq!(qwen.tok.bos_token(), None);
    assert_eq!(qwen.tok.token_to_id("<|im_end|>"), Some(151_645));
    assert_eq!(qwen.tok.token_to_id("<tool_call>"), Some(151_657));
    // Qwen3 added these; Qwen2.5 spells them out in BPE pieces.
    assert_eq!(qwen.tok.token_to_id("<tool_response>"), None);
}

/// Arguments a row gives as JSON text (OpenAI's shape) reach the template as the object
/// transformers was given, keys in order, and render encoded once.
#[test]
fn tool_call_arguments_given_as_json_text_render_as_objects() {
    for fam in families() {
        let mut as_text = 0;
        for case in cases(&fam) {
            let name = format!("{}/{}", fam.name, case["name"].as_str().unwrap());
            let conv = conversation(case);
            let parsed = Value::Array(conv.messages.clone());
            assert_eq!(parsed, case["template_messages"], "{name}");
            let row_args = tool_arguments(&case["messages"]);
            let args = tool_arguments(&parsed);
            assert_eq!(row_args.len(), args.len(), "{name}");
            for (row, arg) in row_args.iter().zip(&args) {
                assert!(arg.is_object(), "{name}: {arg}");
                match row {
                    Value::String(text) => {
                        as_text += 1;
                        let object: Value = serde_json::from_str(text).unwrap();
                        // Same keys in the same order.
                        assert_eq!(arg.to_string(), object.to_string(), "{name}");
                    }
                    row => assert_eq!(row, arg, "{name}"),
                }
            }
            let text = case["text"].as_str().unwrap();
            assert!(
                !text.contains(r#"": "{""#),
                "{name}: arguments encoded twice"
            );
        }
        assert!(as_text > 0, "{}: no arguments given as JSON text", fam.name);
    }
}

#[test]
fn render_is_token_identical_to_apply_chat_template_and_trains_on_assistant_turns_only() {
    let mut checked = 0;
    for fam in families() {
        let template = fam.tok.chat_template().unwrap();
        for case in cases(&fam) {
            let name = format!("{}/{}", fam.name, case["name"].as_str().unwrap());
            let conv = conversation(case);
            let tools = case["tools"].as_array().map(Vec::as_slice);
            // The text first, for a readable failure; then what matters, the tokens.
            let text = template.render(&conv.messages, tools, false, None).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{name}: text");
            let want = ids(&case["ids"]);
            let r = render(
                &fam,
                &conv,
                &Scaffold::default(),
                TrainOn::AllAssistantMessages,
            );
            assert_eq!(r.tokens, want, "{name}: tokens");
            assert_eq!(
                fam.tok
                    .apply_chat_template(&conv.messages, tools, false)
                    .unwrap(),
                want,
                "{name}: apply_chat_template"
            );

            let spans = spans(case);
            let assistants = conv
                .messages
                .iter()
                .filter(|m| m["role"] == "assistant")
                .count();
            assert_eq!(spans.len(), assistants, "{name}: one span per reply");
            for &(i, _, _) in &spans {
                assert_eq!(conv.messages[i]["role"], "assistant", "{name}: message {i}");
            }
            let expected = weights_on(want.len(), &spans);
            assert!(
                r.weights == expected,
                "{name}: weights differ\n{}",
                weight_diff(&fam, &r.tokens, &r.weights, &expected)
            );

            // The last reply alone.
            let last = render(
                &fam,
                &conv,
                &Scaffold::default(),
                TrainOn::LastAssistantMessage,
            );
            assert_eq!(last.tokens, want, "{name}: tokens (last)");
            let expected = weights_on(want.len(), &spans[spans.len() - 1..]);
            assert!(
                last.weights == expected,
                "{name}: weights (last) differ\n{}",
                weight_diff(&fam, &last.tokens, &last.weights, &expected)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

/// The scaffold's system prompt and tools render as the row's own would.
#[test]
fn scaffold_system_prompt_and_tools_render_as_the_rows_own() {
    for fam in families() {
        for case in cases(&fam) {
            let name = format!("{}/{}", fam.name, case["name"].as_str().unwrap());
            let conv = conversation(case);
            let want = ids(&case["ids"]);
            let expected = weights_on(want.len(), &spans(case));
            let mut bare = conv.clone();
            let system = match conv.messages[0]["role"].as_str() {
                Some("system") => {
                    bare.messages.remove(0);
                    bare.weights.remove(0);
                    conv.messages[0]["content"].as_str()
                }
                _ => None,
            };
            let tools = bare.tools.take().unwrap_or_default();
            if system.is_none() && tools.is_empty() {
                continue;
            }
            let scaffold = Scaffold {
                system_prompt: system,
                tools: &tools,
            };
            let r = render(&fam, &bare, &scaffold, TrainOn::AllAssistantMessages);
            assert_eq!(r.tokens, want, "{name}: tokens");
            assert!(r.weights == expected, "{name}: weights");
        }
    }
}

/// Decoded, the trained tokens of a plain chat are each reply followed by the end-of-turn token,
/// and nothing else: no header, no system/user text, no newline after the end of turn.
#[test]
fn trained_tokens_decode_to_the_replies_and_their_end_of_turn() {
    for fam in families() {
        let eot = fam.fixture["end_of_turn"].as_str().unwrap();
        for case in cases(&fam) {
            let name = format!("{}/{}", fam.name, case["name"].as_str().unwrap());
            let conv = conversation(case);
            if conv.messages.iter().any(|m| m.get("tool_calls").is_some()) {
                continue;
            }
            let r = render(
                &fam,
                &conv,
                &Scaffold::default(),
                TrainOn::AllAssistantMessages,
            );
            let trained: Vec<u32> = r
                .tokens
                .iter()
                .zip(&r.weights)
                .filter(|(_, &w)| w == 1.0)
                .map(|(&t, _)| t)
                .collect();
            let want: String = conv
                .messages
                .iter()
                .filter(|m| m["role"] == "assistant")
                .map(|m| format!("{}{eot}", m["content"].as_str().unwrap()))
                .collect();
            assert_eq!(
                fam.tok.inner().decode(&trained, false).unwrap(),
                want,
                "{name}"
            );
            assert!(r.weights.iter().all(|&w| w == 0.0 || w == 1.0));
            // Each reply's tokens end with the end-of-turn token, and the token after it (if
            // any) is context.
            let eot_id = fam.tok.token_to_id(eot).unwrap();
            for &(_, _, end) in &spans(case) {
                assert_eq!(r.tokens[end - 1], eot_id, "{name}");
                if end < r.tokens.len() {
                    assert_eq!(r.weights[end], 0.0, "{name}");
                }
            }
        }
    }
}
