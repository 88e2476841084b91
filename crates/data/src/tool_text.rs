//! Tools for chat templates that have no place for them.
//!
//! Many small models' templates (SmolLM2's, for one) ignore both the `tools` argument and the
//! `tool_calls` of assistant messages: transformers renders such a conversation without the
//! tools and with empty assistant turns, so a model trained on it learns nothing about calling
//! tools, and a policy playing a world would see neither what it can call nor what it called.
//! For those templates whet writes both as text, in the Hermes convention that Qwen2.5 and
//! NousHermes use (and that `whet_rl`'s parser reads back):
//! - the tools go into the system message (joined after the system prompt, or as a system
//!   message of their own), one JSON schema per line between `<tools>` tags, with how to call;
//! - each tool call is appended to its assistant message's content as
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
//!
//! What a template supports is found once per template by rendering probes: a template that
//! renders a probe tool differently from no tools "has a place for tools"; one whose output
//! contains a probe call's function name "renders tool calls". Templates that do either keep
//! transformers' rendering for it, token for token.

use serde_json::{json, Value};

use crate::pyfmt::{json_dumps, JsonOptions};

/// The function name the probes use; no real tool is called this.
const PROBE: &str = "whet_probe_tool";

/// What a chat template does with tools and tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ToolSupport {
    /// The template writes the `tools` it is given.
    pub(crate) tools: bool,
    /// The template writes assistant messages' `tool_calls`.
    pub(crate) tool_calls: bool,
}

impl ToolSupport {
    /// Probes a template through `render(messages, tools)`. A probe the template refuses with
    /// tools but renders without counts as "no place" (the text form is then the only one that
    /// works); a template that cannot render the bare probe is left alone.
    pub(crate) fn probe<E>(
        render: impl Fn(&[Value], Option<&[Value]>) -> Result<String, E>,
    ) -> Self {
        let tool = json!({"type": "function", "function": {
            "name": PROBE, "description": "probe",
            "parameters": {"type": "object", "properties": {}}}});
        let tools = [tool];
        let user = json!({"role": "user", "content": "x"});
        let renders_tools = match (
            render(std::slice::from_ref(&user), Some(&tools)),
            render(std::slice::from_ref(&user), None),
        ) {
            (Ok(with), Ok(without)) => with != without,
            (Err(_), Ok(_)) => false,
            _ => true,
        };
        let call = json!({"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_0", "type": "function",
            "function": {"name": PROBE, "arguments": {}}}]});
        let renders_calls = render(&[user, call], Some(&tools)).is_ok_and(|s| s.contains(PROBE));
        Self {
            tools: renders_tools,
            tool_calls: renders_calls,
        }
    }
}

/// `messages` with the tools and tool calls the template would drop written as text, or `None`
/// when there is nothing to write.
pub(crate) fn fold(
    messages: &[Value],
    tools: Option<&[Value]>,
    support: ToolSupport,
) -> Option<Vec<Value>> {
    let tools = tools.filter(|t| !t.is_empty() && !support.tools);
    let has_calls = |m: &Value| m.get("tool_calls").is_some_and(|c| !c.is_null());
    let fold_calls = !support.tool_calls && messages.iter().any(has_calls);
    if tools.is_none() && !fold_calls {
        return None;
    }
    let mut out = messages.to_vec();
    if fold_calls {
        for m in out.iter_mut().filter(|m| has_calls(m)) {
            let calls: Vec<String> = m["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(call_text)
                .collect();
            let content = m["content"].as_str().unwrap_or_default().trim_end();
            let text = if content.is_empty() {
                calls.join("\n")
            } else {
                format!("{content}\n{}", calls.join("\n"))
            };
            if let Some(obj) = m.as_object_mut() {
                obj.remove("tool_calls");
                obj.insert("content".into(), Value::String(text));
            }
        }
    }
    if let Some(tools) = tools {
        let described = describe(tools);
        match out.first_mut() {
            Some(first) if first["role"] == "system" => {
                let own = first["content"].as_str().unwrap_or_default();
                first["content"] = Value::String(if own.is_empty() {
                    described
                } else {
                    format!("{own}\n\n{described}")
                });
            }
            _ => out.insert(0, json!({"role": "system", "content": described})),
        }
    }
    Some(out)
}

/// Python's `json.dumps` spelling (`{"a": 1, "b": 2}`), as templates that do render tools
/// write them.
fn dumps(v: &Value) -> String {
    json_dumps(
        &minijinja::Value::from(minijinja::value::Serde(v)),
        &JsonOptions::default(),
    )
    .unwrap_or_else(|_| v.to_string())
}

/// The system-message text describing `tools` and the call format.
fn describe(tools: &[Value]) -> String {
    let schemas: Vec<String> = tools.iter().map(dumps).collect();
    format!(
        "# Tools\n\nYou can call the functions described by these JSON schemas:\n<tools>\n{}\n\
         </tools>\n\nTo call a function, reply with its name and arguments as a JSON object \
         between <tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \
         \"arguments\": <arguments-object>}}\n</tool_call>",
        schemas.join("\n")
    )
}

/// One OpenAI-shaped tool call as Hermes text. Arguments given as JSON text are written as
/// the object they hold.
fn call_text(call: &Value) -> String {
    let f = call.get("function").unwrap_or(call);
    let args = match &f["arguments"] {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        Value::Null => json!({}),
        other => other.clone(),
    };
    let body = json!({"name": f["name"], "arguments": args});
    format!("<tool_call>\n{}\n</tool_call>", dumps(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: ToolSupport = ToolSupport {
        tools: false,
        tool_calls: false,
    };

    #[test]
    fn tools_join_the_system_prompt_and_calls_become_text() {
        let tools = [json!({"type": "function", "function": {"name": "ls"}})];
        let messages = [
            json!({"role": "system", "content": "Be brief."}),
            json!({"role": "user", "content": "go"}),
            json!({"role": "assistant", "content": "Looking.", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "ls", "arguments": "{\"path\": \"/\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": "a.txt"}),
        ];
        let out = fold(&messages, Some(&tools), NONE).unwrap();
        let system = out[0]["content"].as_str().unwrap();
        assert!(system.starts_with("Be brief.\n\n# Tools"), "{system}");
        assert!(system.contains(
            "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"ls\"}}\n</tools>"
        ));
        assert_eq!(
            out[2],
            json!({"role": "assistant", "content":
                "Looking.\n<tool_call>\n{\"name\": \"ls\", \"arguments\": {\"path\": \"/\"}}\n</tool_call>"})
        );
        assert_eq!(out[3], messages[3]);
        // No system message: the description is one.
        let out = fold(&messages[1..2], Some(&tools), NONE).unwrap();
        assert_eq!(out[0]["role"], "system");
        assert_eq!(out[1], messages[1]);
    }

    #[test]
    fn what_the_template_renders_is_left_to_it() {
        let tools = [json!({"type": "function", "function": {"name": "ls"}})];
        let call = json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "ls", "arguments": {}}}]});
        let both = ToolSupport {
            tools: true,
            tool_calls: true,
        };
        assert!(fold(std::slice::from_ref(&call), Some(&tools), both).is_none());
        assert!(fold(&[json!({"role": "user", "content": "x"})], None, NONE).is_none());
        let calls_only = ToolSupport {
            tools: true,
            tool_calls: false,
        };
        let out = fold(std::slice::from_ref(&call), Some(&tools), calls_only).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0]["content"],
            "<tool_call>\n{\"name\": \"ls\", \"arguments\": {}}\n</tool_call>"
        );
    }

    #[test]
    fn probes_tell_templates_apart() {
        let ignores = |m: &[Value], _: Option<&[Value]>| -> Result<String, ()> {
            Ok(m.iter().map(|m| m["content"].to_string()).collect())
        };
        assert_eq!(ToolSupport::probe(ignores), NONE);
        let writes =
            |m: &[Value], t: Option<&[Value]>| -> Result<String, ()> { Ok(format!("{m:?}{t:?}")) };
        assert_eq!(
            ToolSupport::probe(writes),
            ToolSupport {
                tools: true,
                tool_calls: true
            }
        );
        let refuses = |_: &[Value], t: Option<&[Value]>| -> Result<String, ()> {
            t.map_or(Ok(String::new()), |_| Err(()))
        };
        assert_eq!(ToolSupport::probe(refuses), NONE);
    }
}
