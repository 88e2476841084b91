//! Training rows as people bring them, told apart by their fields.
//!
//! - **chat**: `{"messages": [...]}` in OpenAI's format (`role`, `content`, `tool_calls`,
//!   `tool_call_id`), with an optional per-message `weight` of 0 or 1 on assistant messages
//!   (as OpenAI's fine-tuning format has) and optional `tools` (JSON-schema functions). Tool-call
//!   `arguments` may be JSON text (OpenAI's shape) or an object; either way the conversation
//!   carries the object, which is what chat templates expect;
//! - **prompt/response**: a prompt under `prompt`, `input`, `question` or `task_prompt` and a
//!   target under `expected_output`, `target`, `answer`, `output`, `response` or `completion`,
//!   made into a user turn and an assistant turn;
//! - **trajectories**: an ATIF record (`steps` with `source` user/agent/system, agent tool calls
//!   and their observations), made into a chat with tool calls and tool results;
//! - **datums**: Tinker datums (`model_input`, `loss_fn_inputs`), pre-tokenized, used as they are.
//!
//! Files (`files.rs`): `.jsonl` (one row per line), `.json` (an array of rows) and `.csv` (one
//! row per record; a `messages` or `tools` column holds JSON text). Every error names the file,
//! the line (or record) and the field.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use whet_contract::Datum;

/// The kind of the rows of a dataset, declared (`format` in a job or `dataset.yaml`) or detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Detect each row's kind from its fields.
    #[default]
    Auto,
    /// `messages` rows.
    Chat,
    /// Prompt and target columns.
    PromptResponse,
    /// ATIF trajectory records.
    Trajectories,
    /// Tinker datums.
    Datums,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        serde_json::from_value(Value::String(s.to_string())).map_err(|_| {
            format!("{s:?}: expected auto, chat, prompt_response, trajectories or datums")
        })
    }
}

/// Field names that hold a prompt, in the order they are looked for.
pub const PROMPT_FIELDS: [&str; 4] = ["prompt", "input", "question", "task_prompt"];
/// Field names that hold the target of a prompt, in the order they are looked for.
pub const TARGET_FIELDS: [&str; 6] = [
    "expected_output",
    "target",
    "answer",
    "output",
    "response",
    "completion",
];

/// A conversation to render with a chat template.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// OpenAI-format messages (the `weight` key removed).
    pub messages: Vec<Value>,
    /// Per message: `Some(false)` for `weight: 0`, `Some(true)` for `weight: 1`, `None` when
    /// the row does not say (the `train_on` policy decides).
    pub weights: Vec<Option<bool>>,
    /// Tools the row declares (JSON-schema functions), if any.
    pub tools: Option<Vec<Value>>,
}

/// One training row.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A conversation (from chat, prompt/response or trajectory rows).
    Chat(Conversation),
    /// A pre-tokenized Tinker datum.
    Datum(Datum),
}

/// A row that does not parse: the JSON path of the offending field and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    /// `messages[2].role`, `steps[0].source`, ...; `.` for the row as a whole.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> RowError {
    RowError {
        field: field.into(),
        message: message.into(),
    }
}

/// Reads one row given the dataset's format.
pub fn parse_row(v: &Value, format: Format) -> std::result::Result<Row, RowError> {
    let Some(obj) = v.as_object() else {
        return Err(bad(".", "a row must be a JSON object"));
    };
    let kind = match format {
        Format::Auto => detect(obj)?,
        f => f,
    };
    match kind {
        Format::Chat => chat(obj),
        Format::PromptResponse => prompt_response(obj),
        Format::Trajectories => trajectory(obj),
        Format::Datums => {
            let d: Datum = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
                let path = e.path().to_string();
                bad(path, format!("not a Tinker datum: {}", e.into_inner()))
            })?;
            crate::datum::validate_datum(&d).map_err(|(field, message)| bad(field, message))?;
            Ok(Row::Datum(d))
        }
        Format::Auto => unreachable!("detect never answers auto"),
    }
}

fn detect(obj: &Map<String, Value>) -> std::result::Result<Format, RowError> {
    if obj.contains_key("messages") {
        Ok(Format::Chat)
    } else if obj.contains_key("model_input") {
        Ok(Format::Datums)
    } else if obj.contains_key("steps") {
        Ok(Format::Trajectories)
    } else if PROMPT_FIELDS.iter().any(|k| obj.contains_key(*k)) {
        Ok(Format::PromptResponse)
    } else {
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        Err(bad(
            ".",
            format!(
                "cannot tell the row's kind from its fields {keys:?}: expected `messages` (chat), \
                 one of {PROMPT_FIELDS:?} with one of {TARGET_FIELDS:?} (prompt/response), `steps` \
                 (an ATIF trajectory) or `model_input` (a Tinker datum)"
            ),
        ))
    }
}

fn tools_of(obj: &Map<String, Value>) -> std::result::Result<Option<Vec<Value>>, RowError> {
    match obj.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(t)) => {
            for (i, tool) in t.iter().enumerate() {
                if !tool.is_object() {
                    return Err(bad(format!("tools[{i}]"), "a tool must be a JSON object"));
                }
            }
            Ok(Some(t.clone()))
        }
        Some(_) => Err(bad("tools", "expected an array of JSON-schema functions")),
    }
}

/// A tool call's `arguments` as the JSON object chat templates expect.
///
/// OpenAI's format carries them as JSON text (`"{\"city\": \"Tokyo\"}"`), but the templates of
/// Llama 3.1, Qwen2.5 and others write them with `tojson`, which would quote that text again:
/// the model would be trained on `"arguments": "{\"city\": \"Tokyo\"}"`, an escaped form it
/// should never produce. transformers documents tool-call arguments given to
/// `apply_chat_template` as dicts, and vLLM's OpenAI server parses them into dicts before
/// applying the template; so does whet. Text that is not JSON, or JSON that is not an object,
/// is an error naming `field` — bad input must never train silently. Key order is kept
/// (serde_json's `preserve_order`), so the object renders as the text spelled it.
fn tool_arguments(args: &Value, field: &str) -> std::result::Result<Value, RowError> {
    let because = "chat templates write tool-call arguments with tojson, so they must be a \
                   JSON object (or JSON text of one, as OpenAI's format has them)";
    let text = match args {
        Value::Object(_) => return Ok(args.clone()),
        Value::String(text) => text,
        other => {
            return Err(bad(
                field,
                format!(
                    "{} is {}, not an object: {because}",
                    excerpt(&other.to_string()),
                    kind(other)
                ),
            ))
        }
    };
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(v) => Err(bad(
            field,
            format!(
                "{:?} is JSON text of {}, not of an object: {because}",
                excerpt(text),
                kind(&v)
            ),
        )),
        Err(e) => Err(bad(
            field,
            format!("{:?} is not JSON text ({e}): {because}", excerpt(text)),
        )),
    }
}

/// At most 80 characters of `s`, for an error message.
fn excerpt(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An assistant message's tool call with its arguments made an object ([`tool_arguments`]).
/// OpenAI's shape nests `name` and `arguments` under `function`; a call that has no `function`
/// may carry them itself (templates accept both).
fn normalize_tool_call(call: &mut Value, field: &str) -> std::result::Result<(), RowError> {
    let Some(call) = call.as_object_mut() else {
        return Err(bad(field, "a tool call must be a JSON object"));
    };
    let (holder, field) = if call.contains_key("function") {
        match call.get_mut("function") {
            Some(Value::Object(f)) => (f, format!("{field}.function")),
            _ => {
                return Err(bad(
                    format!("{field}.function"),
                    "expected a JSON object (`name`, `arguments`)",
                ))
            }
        }
    } else {
        (call, field.to_string())
    };
    if let Some(args) = holder.get_mut("arguments") {
        *args = tool_arguments(args, &format!("{field}.arguments"))?;
    }
    Ok(())
}

fn chat(obj: &Map<String, Value>) -> std::result::Result<Row, RowError> {
    let Some(Value::Array(raw)) = obj.get("messages") else {
        return Err(bad("messages", "expected an array of messages"));
    };
    if raw.is_empty() {
        return Err(bad("messages", "no messages"));
    }
    let mut messages = Vec::with_capacity(raw.len());
    let mut weights = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}].{f}");
        let Some(m) = m.as_object() else {
            return Err(bad(
                format!("messages[{i}]"),
                "a message must be a JSON object",
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => return Err(bad(at("role"), "missing or not a string")),
        };
        if !["system", "user", "assistant", "tool", "developer"].contains(&role) {
            return Err(bad(
                at("role"),
                format!("{role:?}: expected system, user, assistant or tool"),
            ));
        }
        match m.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Array(_)) => {}
            Some(_) => return Err(bad(at("content"), "expected a string")),
        }
        if m.get("content").is_none_or(Value::is_null) && !m.contains_key("tool_calls") {
            return Err(bad(at("content"), "missing (and no tool_calls)"));
        }
        if let Some(tc) = m.get("tool_calls") {
            if role != "assistant" {
                return Err(bad(at("tool_calls"), "only assistant messages call tools"));
            }
            if !tc.is_array() {
                return Err(bad(at("tool_calls"), "expected an array"));
            }
        }
        if role == "tool" && !m.get("tool_call_id").is_some_and(Value::is_string) {
            return Err(bad(
                at("tool_call_id"),
                "a tool message needs the id of its call",
            ));
        }
        let weight = match m.get("weight") {
            None | Some(Value::Null) => None,
            Some(w) if role != "assistant" => {
                return Err(bad(
                    at("weight"),
                    format!("{w}: only assistant messages carry a weight"),
                ))
            }
            Some(w) => match w.as_f64() {
                Some(0.0) => Some(false),
                Some(1.0) => Some(true),
                _ => return Err(bad(at("weight"), format!("{w}: expected 0 or 1"))),
            },
        };
        let mut m = m.clone();
        m.remove("weight");
        if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
            for (j, call) in calls.iter_mut().enumerate() {
                normalize_tool_call(call, &format!("messages[{i}].tool_calls[{j}]"))?;
            }
        }
        messages.push(Value::Object(m));
        weights.push(weight);
    }
    Ok(Row::Chat(Conversation {
        messages,
        weights,
        tools: tools_of(obj)?,
    }))
}

fn text_field(
    obj: &Map<String, Value>,
    names: &[&str],
    what: &str,
) -> std::result::Result<String, RowError> {
    for &name in names {
        match obj.get(name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => return Ok(s.clone()),
            // Numbers and booleans as answers are common in eval-style data.
            Some(v @ (Value::Number(_) | Value::Bool(_))) => return Ok(v.to_string()),
            Some(_) => return Err(bad(name, format!("the {what} must be a string"))),
        }
    }
    Err(bad(
        names.join("|"),
        format!("no {what}: expected one of {names:?}"),
    ))
}

fn prompt_response(obj: &Map<String, Value>) -> std::result::Result<Row, RowError> {
    let prompt = text_field(obj, &PROMPT_FIELDS, "prompt")?;
    let target = text_field(obj, &TARGET_FIELDS, "target")?;
    Ok(Row::Chat(Conversation {
        messages: vec![
            json!({"role": "user", "content": prompt}),
            json!({"role": "assistant", "content": target}),
        ],
        weights: vec![None, None],
        tools: tools_of(obj)?,
    }))
}

/// An ATIF record as a chat: user/system steps as those turns; an agent step as an assistant
/// turn (its tool calls in OpenAI's shape, arguments kept an object as ATIF has them — see
/// [`tool_arguments`]) followed by one tool message per observation result.
fn trajectory(obj: &Map<String, Value>) -> std::result::Result<Row, RowError> {
    let Some(Value::Array(steps)) = obj.get("steps") else {
        return Err(bad("steps", "expected an array of steps"));
    };
    let mut messages = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let at = |f: &str| format!("steps[{i}].{f}");
        let Some(step) = step.as_object() else {
            return Err(bad(format!("steps[{i}]"), "a step must be a JSON object"));
        };
        let text = match step.get("message") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad(at("message"), "expected a string")),
        };
        match step.get("source").and_then(Value::as_str) {
            Some(role @ ("user" | "system")) => {
                messages.push(json!({"role": role, "content": text}));
            }
            Some("agent") => {
                let mut msg = json!({"role": "assistant", "content": text});
                if let Some(calls) = step.get("tool_calls").filter(|c| !c.is_null()) {
                    let Some(calls) = calls.as_array() else {
                        return Err(bad(at("tool_calls"), "expected an array"));
                    };
                    let mut out = Vec::with_capacity(calls.len());
                    for (j, c) in calls.iter().enumerate() {
                        let field = |f: &str| format!("steps[{i}].tool_calls[{j}].{f}");
                        let id = c.get("tool_call_id").and_then(Value::as_str);
                        let name = c.get("function_name").and_then(Value::as_str);
                        let (Some(id), Some(name)) = (id, name) else {
                            return Err(bad(
                                field("function_name"),
                                "a tool call needs `tool_call_id` and `function_name` strings",
                            ));
                        };
                        let args = match c.get("arguments") {
                            None | Some(Value::Null) => json!({}),
                            Some(args) => tool_arguments(args, &field("arguments"))?,
                        };
                        out.push(json!({
                            "id": id,
                            "type": "function",
                            "function": {"name": name, "arguments": args},
                        }));
                    }
                    if !out.is_empty() {
                        msg["tool_calls"] = Value::Array(out);
                    }
                }
                messages.push(msg);
                let results = step
                    .get("observation")
                    .and_then(|o| o.get("results"))
                    .and_then(Value::as_array);
                for (j, r) in results.into_iter().flatten().enumerate() {
                    let id = r.get("source_call_id").and_then(Value::as_str);
                    let Some(id) = id else {
                        return Err(bad(
                            format!("steps[{i}].observation.results[{j}].source_call_id"),
                            "missing or not a string",
                        ));
                    };
                    let content = match r.get("content") {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                        None => String::new(),
                    };
                    messages.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                }
            }
            _ => {
                return Err(bad(at("source"), "expected user, agent or system"));
            }
        }
    }
    if messages.is_empty() {
        return Err(bad("steps", "no steps"));
    }
    let weights = vec![None; messages.len()];
    // ATIF has no field for the tools offered; whet's world rollouts keep them in
    // `extra.tools`, and a top-level `tools` (as chat rows have) is read too.
    let tools = match tools_of(obj)? {
        Some(t) => Some(t),
        None => match obj.get("extra").and_then(Value::as_object) {
            Some(extra) => tools_of(extra).map_err(|e| RowError {
                field: format!("extra.{}", e.field),
                message: e.message,
            })?,
            None => None,
        },
    };
    Ok(Row::Chat(Conversation {
        messages,
        weights,
        tools,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::read_rows;

    fn chat_of(row: Row) -> Conversation {
        match row {
            Row::Chat(c) => c,
            other => panic!("expected a chat, got {other:?}"),
        }
    }

    #[test]
    fn kinds_are_detected_from_fields() {
        let c = chat_of(
            parse_row(
                &json!({"messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello", "weight": 0},
                    {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "sure"}]}),
                Format::Auto,
            )
            .unwrap(),
        );
        assert_eq!(c.weights, vec![None, Some(false), None, None]);
        assert!(c.messages[1].get("weight").is_none());
        let c =
            chat_of(parse_row(&json!({"question": "2+2?", "answer": 4}), Format::Auto).unwrap());
        assert_eq!(c.messages[0]["content"], "2+2?");
        assert_eq!(c.messages[1], json!({"role": "assistant", "content": "4"}));
        let d = parse_row(
            &json!({"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                    "loss_fn_inputs": {"target_tokens":
                        {"data": [2, 3], "dtype": "int64", "shape": [2]}}}),
            Format::Auto,
        )
        .unwrap();
        assert!(matches!(d, Row::Datum(_)));
    }

    #[test]
    fn trajectories_become_chats_with_tool_calls() {
        let atif = json!({"schema_version": "ATIF-v1.4", "steps": [
            {"step_id": 1, "source": "user", "message": "Goal: list files"},
            {"step_id": 2, "source": "agent", "message": "Listing.",
             "tool_calls": [{"tool_call_id": "c1", "function_name": "run",
                             "arguments": {"command": "ls"}}],
             "observation": {"results": [{"source_call_id": "c1", "content": "a.txt"}]}},
            {"step_id": 3, "source": "agent", "message": "There is a.txt."}]});
        let c = chat_of(parse_row(&atif, Format::Auto).unwrap());
        let roles: Vec<&str> = c
            .messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
        assert_eq!(c.messages[1]["tool_calls"][0]["function"]["name"], "run");
        // ATIF's arguments are an object, and stay one (templates write them with tojson).
        assert_eq!(
            c.messages[1]["tool_calls"][0]["function"]["arguments"],
            json!({"command": "ls"})
        );
        assert_eq!(c.messages[2]["tool_call_id"], "c1");
    }

    #[test]
    fn tool_call_arguments_as_json_text_become_objects() {
        // OpenAI's shape: arguments as JSON text. Templates write them with tojson, so the
        // conversation carries the object, keys in the text's order.
        let c = chat_of(
            parse_row(
                &json!({"messages": [
                    {"role": "user", "content": "Weather in Tokyo?"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {
                            "name": "get_weather",
                            "arguments": "{\"unit\": \"celsius\", \"city\": \"Tokyo\"}"}},
                        {"id": "call_2", "type": "function", "function": {
                            "name": "get_time", "arguments": {"city": "Tokyo"}}},
                        {"name": "flat", "arguments": "{}"}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "17"},
                    {"role": "assistant", "content": "17 degrees."}]}),
                Format::Auto,
            )
            .unwrap(),
        );
        let calls = &c.messages[1]["tool_calls"];
        let args = &calls[0]["function"]["arguments"];
        assert_eq!(*args, json!({"unit": "celsius", "city": "Tokyo"}));
        assert_eq!(args.to_string(), r#"{"unit":"celsius","city":"Tokyo"}"#);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["id"], "call_1");
        // An object stays as it is; a call without `function` has its own arguments parsed.
        assert_eq!(calls[1]["function"]["arguments"], json!({"city": "Tokyo"}));
        assert_eq!(calls[2]["arguments"], json!({}));
    }

    #[test]
    fn tool_call_arguments_that_are_not_a_json_object_are_errors() {
        let row = |args: Value| {
            json!({"messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"},
                {"role": "assistant", "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": {}}},
                    {"id": "b", "type": "function", "function": {"name": "g", "arguments": args}}]}]})
        };
        let field = "messages[2].tool_calls[1].function.arguments";
        for (args, says) in [
            (json!("{\"city\": \"Tokyo\""), "is not JSON text"),
            (json!("city=Tokyo"), "is not JSON text"),
            (json!(""), "is not JSON text"),
            (json!("[1, 2]"), "JSON text of an array, not of an object"),
            (json!("\"Tokyo\""), "JSON text of a string"),
            (json!(42), "is a number, not an object"),
            (json!(["Tokyo"]), "is an array, not an object"),
        ] {
            let e = parse_row(&row(args.clone()), Format::Auto).unwrap_err();
            assert_eq!(e.field, field, "{args}");
            assert!(e.message.contains(says), "{args}: {}", e.message);
            assert!(e.message.contains("tojson"), "{args}: {}", e.message);
        }
        let e = parse_row(
            &json!({"messages": [{"role": "assistant", "tool_calls": ["f()"]}]}),
            Format::Auto,
        )
        .unwrap_err();
        assert_eq!(e.field, "messages[0].tool_calls[0]");
        let e = parse_row(
            &json!({"messages": [{"role": "assistant", "tool_calls": [{"function": "f"}]}]}),
            Format::Auto,
        )
        .unwrap_err();
        assert_eq!(e.field, "messages[0].tool_calls[0].function");
        // ATIF arguments given as text are held to the same rule.
        let e = parse_row(
            &json!({"steps": [{"source": "agent", "tool_calls": [
                {"tool_call_id": "c1", "function_name": "run", "arguments": "ls -l"}]}]}),
            Format::Auto,
        )
        .unwrap_err();
        assert_eq!(e.field, "steps[0].tool_calls[0].arguments");
        // In a file, the error names the file, the line and the field.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.jsonl");
        let ok = r#"{"messages": [{"role": "user", "content": "hi"}]}"#;
        std::fs::write(&path, format!("{ok}\n{}\n", row(json!("{oops}")))).unwrap();
        let e = read_rows(&path, Format::Auto).unwrap_err().to_string();
        assert!(e.contains("calls.jsonl:2") && e.contains(field), "{e}");
    }

    #[test]
    fn malformed_rows_name_the_field() {
        let err = |v: Value| parse_row(&v, Format::Auto).unwrap_err();
        assert_eq!(
            err(json!({"messages": [{"role": "robot", "content": "x"}]})).field,
            "messages[0].role"
        );
        assert_eq!(
            err(json!({"messages": [{"role": "user", "content": "x", "weight": 1}]})).field,
            "messages[0].weight"
        );
        assert_eq!(
            err(json!({"messages": [{"role": "assistant", "content": "x", "weight": 0.5}]})).field,
            "messages[0].weight"
        );
        assert_eq!(
            err(json!({"messages": [{"role": "tool", "content": "x"}]})).field,
            "messages[0].tool_call_id"
        );
        assert_eq!(err(json!({"prompt": "x"})).field, TARGET_FIELDS.join("|"));
        assert!(err(json!({"text": "x"})).message.contains("cannot tell"));
        assert_eq!(
            err(json!({"steps": [{"source": "robot"}]})).field,
            "steps[0].source"
        );
        // A declared format is held to.
        let e = parse_row(&json!({"prompt": "a", "answer": "b"}), Format::Chat).unwrap_err();
        assert_eq!(e.field, "messages");
    }
}
