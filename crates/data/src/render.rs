//! Conversations to training tokens: the model's own chat template renders the text, and loss
//! weights mark the tokens to learn.
//!
//! Where a message lies in the rendered text is found the way the template itself draws it:
//! an assistant message's text starts where the conversation up to it, rendered with the
//! generation prompt, ends (so the `<|im_start|>assistant\n` header is context, not target),
//! and ends where the conversation up to and including it ends — minus trailing whitespace, so
//! the end-of-turn token (`<|im_end|>`, `<|eot_id|>`) is trained and the newline after it is not.
//! Each of these renders must be a prefix of the whole conversation's; a template that rewrites
//! earlier turns as later ones arrive (Qwen3 dropping old reasoning) is reported, not guessed.
//!
//! The whole text is tokenized once; a token is trained when it starts inside a trained span.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{DataError, Result};
use crate::rows::Conversation;
use crate::tokenizer::Tokenizer;

/// Which messages of a conversation carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant message (unless its row gives it `weight: 0`).
    #[default]
    AllAssistantMessages,
    /// The last assistant message only (unless it has `weight: 0`).
    LastAssistantMessage,
    /// Every token of the conversation.
    AllMessages,
}

impl std::str::FromStr for TrainOn {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        serde_json::from_value(Value::String(s.to_string())).map_err(|_| {
            format!(
                "{s:?}: expected all_assistant_messages, last_assistant_message or all_messages"
            )
        })
    }
}

/// What happens to a row longer than the maximum length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Keep its first max-length tokens.
    #[default]
    Truncate,
    /// Leave the row out.
    Drop,
}

impl std::str::FromStr for Overflow {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        serde_json::from_value(Value::String(s.to_string()))
            .map_err(|_| format!("{s:?}: expected truncate or drop"))
    }
}

/// A rendered conversation: token ids and, per token, its loss weight (0 or 1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rendered {
    /// The template's text, tokenized without added special tokens.
    pub tokens: Vec<u32>,
    /// 1.0 on the tokens to learn, 0.0 on context.
    pub weights: Vec<f32>,
}

impl Rendered {
    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }
}

/// The system prompt and tools a capability gives every conversation.
#[derive(Debug, Clone, Default)]
pub struct Scaffold<'a> {
    /// Prepended as the system message (joined with a blank line before a row's own).
    pub system_prompt: Option<&'a str>,
    /// Passed to the template (a row's own tools come after them).
    pub tools: &'a [Value],
}

/// Renders `conv` with the tokenizer's chat template and marks the trained tokens.
pub fn render_conversation(
    tokenizer: &Tokenizer,
    conv: &Conversation,
    scaffold: &Scaffold<'_>,
    train_on: TrainOn,
) -> Result<Rendered> {
    let template = tokenizer
        .chat_template()
        .ok_or_else(|| DataError::NoChatTemplate {
            path: tokenizer.source().display().to_string(),
        })?;
    let (messages, weights) = with_system_prompt(conv, scaffold.system_prompt);
    let mut tools: Vec<Value> = scaffold.tools.to_vec();
    tools.extend(conv.tools.iter().flatten().cloned());
    let tools = (!tools.is_empty()).then_some(tools.as_slice());
    let render = |upto: usize, gen: bool| template.render(&messages[..upto], tools, gen, None);
    let full = render(messages.len(), false)?;

    // Byte spans of the text to learn.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    if train_on == TrainOn::AllMessages {
        spans.push((0, full.len()));
    } else {
        let assistant: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i]["role"] == "assistant")
            .collect();
        let chosen: Vec<usize> = match train_on {
            TrainOn::LastAssistantMessage => assistant.last().copied().into_iter().collect(),
            _ => assistant,
        };
        for i in chosen.into_iter().filter(|&i| weights[i] != Some(false)) {
            let start = prefix_len(&full, &render(i, true)?, i)?;
            let end = prefix_len(&full, &render(i + 1, false)?, i)?;
            let end = start.max(full[..end].trim_end().len());
            if end > start {
                spans.push((start, end));
            }
        }
    }
    let enc = tokenizer
        .inner()
        .encode(full.as_str(), false)
        .map_err(|e| DataError::Encode(e.to_string()))?;
    let trained = |start: usize| spans.iter().any(|&(a, b)| start >= a && start < b);
    let weights = enc
        .get_offsets()
        .iter()
        .map(|&(start, _)| if trained(start) { 1.0 } else { 0.0 })
        .collect();
    Ok(Rendered {
        tokens: enc.get_ids().to_vec(),
        weights,
    })
}

/// The capability's system prompt goes first: a message of its own, or joined (blank line)
/// before the row's own system message — templates take one system message, at the start.
fn with_system_prompt(
    conv: &Conversation,
    system: Option<&str>,
) -> (Vec<Value>, Vec<Option<bool>>) {
    let mut messages = conv.messages.clone();
    let mut weights = conv.weights.clone();
    let Some(system) = system.filter(|s| !s.is_empty()) else {
        return (messages, weights);
    };
    match messages.first_mut() {
        Some(first) if first["role"] == "system" => {
            let own = first["content"].as_str().unwrap_or_default().to_string();
            first["content"] = Value::String(if own.is_empty() {
                system.to_string()
            } else {
                format!("{system}\n\n{own}")
            });
        }
        _ => {
            messages.insert(0, json!({"role": "system", "content": system}));
            weights.insert(0, None);
        }
    }
    (messages, weights)
}

/// `part.len()` if `part` is a prefix of `full`, else an error naming the message.
fn prefix_len(full: &str, part: &str, message: usize) -> Result<usize> {
    if full.starts_with(part) {
        Ok(part.len())
    } else {
        Err(DataError::Template(format!(
            "cannot locate message {message} in the rendered conversation: the template renders \
             the turns before it differently once later turns follow (it rewrites history, as \
             templates that drop earlier reasoning do); train on the last assistant message or \
             on pre-tokenized datums instead"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_on_parses_its_three_names() {
        assert_eq!(
            "last_assistant_message".parse::<TrainOn>().unwrap(),
            TrainOn::LastAssistantMessage
        );
        assert!("assistant"
            .parse::<TrainOn>()
            .unwrap_err()
            .contains("all_messages"));
    }

    #[test]
    fn system_prompt_is_prepended_or_joined() {
        let conv = Conversation {
            messages: vec![json!({"role": "user", "content": "hi"})],
            weights: vec![None],
            tools: None,
        };
        let (m, w) = with_system_prompt(&conv, Some("Be brief."));
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(w.len(), 2);
        let conv = Conversation {
            messages: vec![json!({"role": "system", "content": "Row's own."})],
            weights: vec![None],
            tools: None,
        };
        let (m, _) = with_system_prompt(&conv, Some("Be brief."));
        assert_eq!(m[0]["content"], "Be brief.\n\nRow's own.");
        assert_eq!(m.len(), 1);
    }
}
