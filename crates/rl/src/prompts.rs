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
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (line, value) in whet_data::read_values(path)? {
        let at = format!("{}:{line}", path.display());
        let row = match value {
            Ok(v) => v,
            Err(e) => {
                errors.push(e.to_string());
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
        let tools = (!scaffold.tools.is_empty()).then_some(scaffold.tools);
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
        return Err(RlError::Config(format!(
            "{}: no prompt rows",
            path.display()
        )));
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
