//! One episode: the first observation, the tools, and what each assistant turn earns.
//!
//! Mistakes of the *policy* (an unknown tool, bad arguments, a missing path, no tool call) are
//! part of the game: they get a `tool` (or `user`) message and a negative reward signal. Only
//! mistakes of the *caller* (an action that is not an assistant message) are protocol errors.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::tree::Vault;

/// Reward for a successful `ls` or `cat` of something not looked at before.
pub const TOOL_OBSERVATION: f64 = 0.02;
/// Reward for the first `cat` of the file that holds the code.
pub const DISCOVERY: f64 = 0.10;
/// Penalty for an unknown tool, bad arguments or a missing path.
pub const TOOL_ERROR: f64 = -0.20;
/// Penalty for an assistant message without tool calls.
pub const NO_TOOL_CALL: f64 = -0.10;
/// Penalty for submitting the wrong code (the episode ends with `wrong_answer`).
pub const WRONG_ANSWER: f64 = -0.50;
/// Consecutive turns that learn nothing new (no tool call, only errors or repeats) after which
/// the episode ends as `stalled`: a policy that is going round in circles frees its slot early.
pub const STALL_TURNS: u32 = 3;

const GOAL: &str = "Find the 4-digit access code hidden in the files and submit it with the \
                    submit tool. Start with ls(\"/\").";
const REMINDER: &str = "Use a tool: ls(path) lists a directory, cat(path) shows a file, \
                        submit(code) answers.";

/// The task a `reset` asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Files in the tree; `None` lets the seed choose (2 to 4).
    pub files: Option<usize>,
}

impl Task {
    /// Reads `reset`'s `task`: absent/null or `"find-code"` or `{"id": "find-code"}`, the
    /// object optionally with `"files": N` (1..=8). Anything else is refused, so a typo in a
    /// manifest fails loudly instead of silently playing the default.
    pub fn parse(task: Option<&Value>, default_files: Option<usize>) -> Result<Task, String> {
        let mut out = Task {
            files: default_files,
        };
        let id = match task {
            None | Some(Value::Null) => return Ok(out),
            Some(Value::String(id)) => id.as_str(),
            Some(Value::Object(map)) => {
                for (key, value) in map {
                    match key.as_str() {
                        "id" => {}
                        "files" => out.files = Some(file_count(value)?),
                        other => return Err(format!("task: unknown option {other:?}")),
                    }
                }
                match map.get("id") {
                    Some(Value::String(id)) => id.as_str(),
                    _ => return Err("task: \"id\" must be a string".into()),
                }
            }
            Some(_) => return Err("task must be an object like {\"id\": \"find-code\"}".into()),
        };
        if id != "find-code" {
            return Err(format!("unknown task id {id:?} (known: \"find-code\")"));
        }
        Ok(out)
    }
}

fn file_count(value: &Value) -> Result<usize, String> {
    match value.as_u64() {
        Some(n) if (1..=crate::tree::MAX_FILES as u64).contains(&n) => Ok(n as usize),
        _ => Err(format!(
            "task: \"files\" must be an integer from 1 to {}",
            crate::tree::MAX_FILES
        )),
    }
}

/// The functions offered to the policy, as OpenAI-style JSON-schema tools.
pub fn tools() -> Value {
    let function = |name: &str, description: &str, arg: &str, arg_description: &str| {
        json!({"type": "function", "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {arg: {"type": "string", "description": arg_description}},
                "required": [arg],
                "additionalProperties": false,
            },
        }})
    };
    json!([
        function(
            "ls",
            "List a directory.",
            "path",
            "Directory path, e.g. \"/\" or \"/docs\"."
        ),
        function(
            "cat",
            "Show a file's contents.",
            "path",
            "File path, e.g. \"/docs/notes.txt\"."
        ),
        function(
            "submit",
            "Submit the access code. Ends the episode.",
            "code",
            "The 4-digit code."
        ),
    ])
}

/// The game state between turns.
pub struct Episode {
    vault: Vault,
    /// `ls:/docs`, `cat:/memo.txt`: what was already looked at (repeats earn nothing).
    seen: BTreeSet<String>,
    discovered: bool,
    idle_turns: u32,
    done: bool,
}

/// What one tool call did.
enum Outcome {
    /// Shown to the policy; `new` says whether it was looked at for the first time.
    Seen {
        new: bool,
    },
    Error,
    Submitted {
        right: bool,
    },
}

impl Episode {
    /// A fresh episode for `seed` and `task`.
    pub fn new(seed: u64, task: &Task) -> Episode {
        Episode {
            vault: Vault::generate(seed, task.files),
            seen: BTreeSet::new(),
            discovered: false,
            idle_turns: 0,
            done: false,
        }
    }

    /// `reset`'s response: the goal as a user message, and the tools.
    pub fn start(&self) -> Value {
        json!({"observation": [{"role": "user", "content": GOAL}], "tools": tools()})
    }

    /// The secret (for tests and debugging; never sent to the policy).
    #[cfg(test)]
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// Plays one assistant message; `Err` only for a malformed action or a finished episode.
    pub fn step(&mut self, action: &Value) -> Result<Value, String> {
        if self.done {
            return Err("the episode is over; send reset to start another".into());
        }
        let action = action
            .as_object()
            .ok_or("\"action\" must be an assistant message (an object)")?;
        let calls: &[Value] = match action.get("tool_calls") {
            None | Some(Value::Null) => &[],
            Some(Value::Array(calls)) => calls,
            Some(_) => return Err("\"action.tool_calls\" must be an array".into()),
        };
        if calls.iter().any(|c| !c.is_object()) {
            return Err("every entry of \"action.tool_calls\" must be an object".into());
        }

        let mut observation = Vec::new();
        let mut signals = Vec::new();
        let mut reason: Option<&str> = None;
        let mut learned = false;

        if calls.is_empty() {
            observation.push(json!({"role": "user", "content": REMINDER}));
            signals.push(signal("no_tool_call", NO_TOOL_CALL, "no tool call"));
        }
        for (i, call) in calls.iter().enumerate() {
            let id = match call.get("id") {
                Some(Value::String(id)) => id.clone(),
                // A tool message needs an id to answer; invent a stable one.
                _ => format!("call_{i}"),
            };
            let content = if reason.is_some() {
                // Calls after a submit in the same message are answered but not run.
                "not run: the episode ended with submit".to_string()
            } else {
                let (content, outcome) = self.call(call, &mut signals);
                match outcome {
                    Outcome::Seen { new } => learned |= new,
                    Outcome::Error => {}
                    Outcome::Submitted { right: true } => reason = Some("finished"),
                    Outcome::Submitted { right: false } => reason = Some("wrong_answer"),
                }
                content
            };
            observation.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
        }

        if reason.is_none() {
            self.idle_turns = if learned { 0 } else { self.idle_turns + 1 };
            if self.idle_turns >= STALL_TURNS {
                reason = Some("stalled");
            }
        }
        self.done = reason.is_some();
        Ok(json!({
            "observation": observation,
            "reward_signals": signals,
            "done": self.done,
            "termination_reason": reason,
        }))
    }

    /// Runs one tool call, pushing its reward signals; returns the tool message's text.
    fn call(&mut self, call: &Value, signals: &mut Vec<Value>) -> (String, Outcome) {
        let result = self.try_call(call, signals);
        match result {
            Ok(done) => done,
            Err(message) => {
                signals.push(signal("tool_error", TOOL_ERROR, &message));
                (format!("error: {message}"), Outcome::Error)
            }
        }
    }

    fn try_call(
        &mut self,
        call: &Value,
        signals: &mut Vec<Value>,
    ) -> Result<(String, Outcome), String> {
        let function = call
            .get("function")
            .ok_or("tool call without \"function\"")?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or("tool call without a function name")?;
        let args = arguments(function)?;
        match name {
            "ls" | "cat" => {
                let path = only_string_arg(name, &args, "path")?;
                let (canonical, text) = if name == "ls" {
                    self.vault.ls(&path)?
                } else {
                    self.vault.cat(&path)?
                };
                let key = format!("{name}:{canonical}");
                let new = self.seen.insert(key);
                if new {
                    let verb = if name == "ls" { "listed" } else { "read" };
                    signals.push(signal(
                        "tool_observation",
                        TOOL_OBSERVATION,
                        &format!("{verb} {canonical}"),
                    ));
                }
                if name == "cat" && !self.discovered && canonical[1..] == self.vault.code_path {
                    self.discovered = true;
                    signals.push(signal(
                        "discovery",
                        DISCOVERY,
                        "found the file with the code",
                    ));
                }
                Ok((text, Outcome::Seen { new }))
            }
            "submit" => {
                let code = match args.get("code") {
                    // A model may well write the code as a bare number.
                    Some(Value::Number(n)) if args.len() == 1 => n.to_string(),
                    _ => only_string_arg(name, &args, "code")?,
                };
                let code = code.trim();
                if code.is_empty() {
                    return Err("submit: \"code\" is empty".into());
                }
                if code == self.vault.code {
                    Ok((
                        "Correct. The vault is open.".into(),
                        Outcome::Submitted { right: true },
                    ))
                } else {
                    signals.push(signal(
                        "wrong_answer",
                        WRONG_ANSWER,
                        &format!("submitted {code:?}"),
                    ));
                    Ok(("Wrong code.".into(), Outcome::Submitted { right: false }))
                }
            }
            other => Err(format!(
                "unknown tool {other:?} (available: ls, cat, submit)"
            )),
        }
    }
}

/// A tool call's arguments: an object, JSON text holding one, or nothing (`{}`).
fn arguments(function: &Value) -> Result<Map<String, Value>, String> {
    let text = match function.get("arguments") {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(map)) => return Ok(map.clone()),
        Some(Value::String(text)) if text.trim().is_empty() => return Ok(Map::new()),
        Some(Value::String(text)) => text,
        Some(_) => return Err("arguments must be a JSON object".into()),
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("arguments must be a JSON object".into()),
        Err(e) => Err(format!("arguments are not valid JSON: {e}")),
    }
}

/// The single string argument `key` of tool `tool`; any other argument is refused, as the
/// schema says (`additionalProperties: false`).
fn only_string_arg(tool: &str, args: &Map<String, Value>, key: &str) -> Result<String, String> {
    if let Some(extra) = args.keys().find(|k| k.as_str() != key) {
        return Err(format!("{tool}: unexpected argument {extra:?}"));
    }
    match args.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{tool}: \"{key}\" must be a string")),
        None => Err(format!("{tool}: missing argument \"{key}\"")),
    }
}

fn signal(source: &str, value: f64, reason: &str) -> Value {
    json!({"source": source, "value": value, "reason": reason})
}

#[cfg(test)]
#[path = "episode_tests.rs"]
mod tests;
