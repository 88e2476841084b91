//! Prompt datasets: each row becomes the conversation the policy continues (its prompt as a user
//! turn, or its chat up to the last assistant reply), rendered with the model's chat template
//! and the capability's scaffold. Every row is checked — its prompt, and what its recipe needs —
//! before any compute; errors name file, line and field.

use std::path::Path;

use serde_json::{json, Value};
use whet_data::rows::PROMPT_FIELDS;
use whet_data::{Scaffold, Tokenizer};

use crate::recipes::Recipe;
use crate::rollouts::Prompt;
use crate::RlError;

/// A prompt row with its `file:line`, or why it could not be read.
pub type PromptRow = (String, Result<Value, String>);

/// The messages a row asks the policy to continue, and the prompt's text for the recipe.
pub fn prompt_messages(row: &Value) -> Result<(Vec<Value>, String), String> {
    let Some(obj) = row.as_object() else {
        return Err(". : a row is a JSON object".into());
    };
    for key in PROMPT_FIELDS {
        if let Some(v) = obj.get(key) {
            let text = v
                .as_str()
                .ok_or_else(|| format!("{key}: expected text"))?
                .to_string();
            return Ok((vec![json!({"role": "user", "content": text})], text));
        }
    }
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return Err(format!(
            "{}: a prompt row needs one of these fields, or `messages`",
            PROMPT_FIELDS.join(" | ")
        ));
    };
    // A chat row: everything before its last assistant reply (that reply is the reference).
    let end = match messages.last() {
        Some(m) if m["role"] == "assistant" => messages.len() - 1,
        _ => messages.len(),
    };
    let prompt = messages[..end].to_vec();
    let text = prompt
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .ok_or_else(|| "messages: no user message before the last assistant reply".to_string())?
        .to_string();
    Ok((prompt, text))
}

/// Reads and renders a prompt dataset. With a system prompt the scaffold's comes first (a
/// row's own system message is kept after it). Prompts longer than `max_prompt_tokens` are
/// errors: the completion would have no room.
pub fn load_prompts(
    path: &Path,
    tokenizer: &Tokenizer,
    scaffold: &Scaffold<'_>,
    recipe: &dyn Recipe,
    max_prompt_tokens: usize,
) -> Result<Vec<Prompt>, RlError> {
    let rows = whet_data::read_values(path)?
        .into_iter()
        .map(|(line, v)| {
            (
                format!("{}:{line}", path.display()),
                v.map_err(|e| e.to_string()),
            )
        })
        .collect();
    prompts_from_rows(rows, tokenizer, scaffold, recipe, max_prompt_tokens)
}

/// Renders rows (each with its `file:line`, or why it could not be read) into prompts; every
/// unusable row is reported, with its location.
pub fn prompts_from_rows(
    rows: Vec<PromptRow>,
    tokenizer: &Tokenizer,
    scaffold: &Scaffold<'_>,
    recipe: &dyn Recipe,
    max_prompt_tokens: usize,
) -> Result<Vec<Prompt>, RlError> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (at, value) in rows {
        let row = match value {
            Ok(v) => v,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let checked = prompt_messages(&row).and_then(|(messages, text)| {
            recipe
                .check_row(&row)
                .map_err(|e| format!("{e} (recipe {})", recipe.name()))?;
            Ok((messages, text))
        });
        let (mut messages, text) = match checked {
            Ok(x) => x,
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                continue;
            }
        };
        if let Some(system) = scaffold.system_prompt {
            messages.insert(0, json!({"role": "system", "content": system}));
        }
        // The scaffold's tools, then the row's own (a trajectory's).
        let mut tools: Vec<Value> = scaffold.tools.to_vec();
        if let Some(own) = row.get("tools").and_then(Value::as_array) {
            tools.extend(own.iter().cloned());
        }
        let tools = (!tools.is_empty()).then_some(tools.as_slice());
        let tokens = tokenizer.apply_chat_template(&messages, tools, true)?;
        if tokens.len() > max_prompt_tokens {
            errors.push(format!(
                "{at}: the prompt is {} tokens, more than the {max_prompt_tokens} that leave room for the completion",
                tokens.len()
            ));
            continue;
        }
        out.push(Prompt {
            tokens: tokens.iter().map(|&t| t as i64).collect(),
            text,
            row,
            location: at,
        });
    }
    if !errors.is_empty() {
        let shown: Vec<&str> = errors.iter().take(20).map(String::as_str).collect();
        return Err(RlError::Config(format!(
            "{} unusable prompt row(s):\n  {}",
            errors.len(),
            shown.join("\n  ")
        )));
    }
    if out.is_empty() {
        return Err(RlError::Config("no prompt rows".into()));
    }
    Ok(out)
}

/// Offline RL rows from an ATIF trajectory dataset: one row per agent step — the messages
/// before it, the recorded action as `expected_output` (the text the model's chat template
/// gives that assistant message, tool calls included, without the end-of-turn marker), and
/// `reward` 1.0 when the episode succeeded, 0.0 when not (`trajectory_imitation_v1` pays it
/// when a completion reproduces the action).
pub fn trajectory_rows(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<PromptRow>, RlError> {
    let mut out = Vec::new();
    for (line, value) in whet_data::read_values(path)? {
        let at = format!("{}:{line}", path.display());
        let value = match value {
            Ok(v) => v,
            Err(e) => {
                out.push((at, Err(e.to_string())));
                continue;
            }
        };
        let conv = match whet_data::parse_row(&value, whet_data::Format::Trajectories) {
            Ok(whet_data::Row::Chat(c)) => c,
            Ok(_) => continue,
            Err(e) => {
                out.push((at.clone(), Err(format!("{at}: {}: {}", e.field, e.message))));
                continue;
            }
        };
        let reward = if value["success"].as_bool().unwrap_or(false) {
            1.0
        } else {
            0.0
        };
        for (i, m) in conv.messages.iter().enumerate() {
            if m["role"] != "assistant" || i == 0 {
                continue;
            }
            // The action as the template renders it: the last assistant message's trained
            // tokens (content, tool calls, end-of-turn), decoded without special tokens.
            let step = whet_data::Conversation {
                messages: conv.messages[..=i].to_vec(),
                weights: vec![None; i + 1],
                tools: conv.tools.clone(),
            };
            let rendered = whet_data::render_conversation(
                tokenizer,
                &step,
                &Scaffold::default(),
                whet_data::TrainOn::LastAssistantMessage,
            )?;
            let action: Vec<u32> = rendered
                .tokens
                .iter()
                .zip(&rendered.weights)
                .filter(|(_, &w)| w > 0.0)
                .map(|(&t, _)| t)
                .collect();
            let text = tokenizer.decode(&action, true)?.trim().to_string();
            let mut row = json!({
                "messages": conv.messages[..i].to_vec(),
                "expected_output": text,
                "reward": reward,
                "metadata": {"trajectory_id": value["trajectory_id"], "step": i},
            });
            if let Some(tools) = &conv.tools {
                row["tools"] = json!(tools);
            }
            out.push((format!("{at} (message {i})"), Ok(row)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_come_from_prompt_fields_or_chats() {
        let (m, t) = prompt_messages(&json!({"question": "2+2?", "answer": "4"})).unwrap();
        assert_eq!(t, "2+2?");
        assert_eq!(m, vec![json!({"role": "user", "content": "2+2?"})]);
        let chat = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]});
        let (m, t) = prompt_messages(&chat).unwrap();
        assert_eq!((m.len(), t.as_str()), (2, "Hi"));
        let e = prompt_messages(&json!({"answer": "4"})).unwrap_err();
        assert!(e.contains("prompt") && e.contains("messages"), "{e}");
        assert!(prompt_messages(&json!({"prompt": 3}))
            .unwrap_err()
            .contains("prompt"));
    }
}
