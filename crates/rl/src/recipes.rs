//! Reward recipes: how an RL job scores a completion of a prompt row.
//!
//! A job names a recipe and its params; [`recipe`] checks both before any compute (unknown
//! names, unknown params and wrong types are [`RewardError::Config`]), and
//! [`Recipe::check_row`] lets the job check every prompt row up front. Scoring one rollout
//! either gives a [`Score`] or [`RewardError::Failed`], which the loop counts and logs while the
//! job goes on. The names and semantics are those of the platform whet reproduces.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use whet_data::rows::TARGET_FIELDS;

pub(crate) mod command;
mod rows;

use command::{CommandRecipe, COMMAND_PARAMS};
use rows::{
    Contains, ExactMatch, Gsm8k, RowReward, TaskVerifier, TrajectoryImitation, CONTAINS_PARAMS,
};

/// The recipes' names.
pub const RECIPES: [&str; 7] = [
    "exact_match_v1",
    "contains_v1",
    "row_reward_v1",
    "trajectory_imitation_v1",
    "task_verifier_v1",
    "gsm8k_v1",
    "command_v1",
];

/// What a recipe scores.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The prompt as the policy saw it.
    pub prompt: &'a str,
    /// The sampled completion.
    pub completion: &'a str,
    /// The prompt row, as read from the dataset.
    pub row: &'a Value,
}

/// A score.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Score {
    /// The reward.
    pub reward: f64,
    /// Named numbers logged beside the reward (averaged per step by the loop).
    pub metrics: BTreeMap<String, f64>,
}

impl Score {
    /// A reward without metrics.
    pub fn new(reward: f64) -> Self {
        Score {
            reward,
            metrics: BTreeMap::new(),
        }
    }

    fn binary(hit: bool) -> Self {
        Score::new(if hit { 1.0 } else { 0.0 })
    }
}

/// Why a reward could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// The recipe or its params are wrong; found when the job starts, before any compute.
    #[error("reward recipe: {0}")]
    Config(String),
    /// This one rollout could not be scored; the loop counts and logs it and goes on.
    #[error("reward failed: {0}")]
    Failed(String),
}

/// A reward recipe.
pub trait Recipe: Send + Sync {
    /// The recipe's name, one of [`RECIPES`].
    fn name(&self) -> &str;

    /// Whether `row` has what this recipe needs, so a job can refuse a bad prompt file (naming
    /// file and line) before any compute; the message names the field.
    fn check_row(&self, row: &Value) -> Result<(), String> {
        let _ = row;
        Ok(())
    }

    /// Scores one completion.
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError>;
}

/// The recipe `name` with its JSON `params` (an object or null), checked: unknown recipe names
/// list the known ones, unknown param keys are refused naming them, wrong types name the param.
pub fn recipe(name: &str, params: &Value) -> Result<Box<dyn Recipe>, RewardError> {
    let known = |allowed: &[&str]| Params::new(name, params, allowed);
    Ok(match name {
        "exact_match_v1" => {
            known(&[])?;
            Box::new(ExactMatch)
        }
        "contains_v1" => Box::new(Contains::new(&known(&CONTAINS_PARAMS)?)?),
        "row_reward_v1" => {
            known(&[])?;
            Box::new(RowReward)
        }
        "trajectory_imitation_v1" => {
            known(&[])?;
            Box::new(TrajectoryImitation)
        }
        "task_verifier_v1" => {
            known(&[])?;
            Box::new(TaskVerifier)
        }
        "gsm8k_v1" => {
            known(&[])?;
            Box::new(Gsm8k)
        }
        "command_v1" => Box::new(CommandRecipe::new(&known(&COMMAND_PARAMS)?)?),
        _ => {
            return Err(RewardError::Config(format!(
                "unknown recipe `{name}`: expected one of {}",
                RECIPES.join(", ")
            )))
        }
    })
}

/// The row's expected output: the first present of [`TARGET_FIELDS`], else the content of the
/// last assistant message of its `messages`. The error names the field.
pub fn expected_output(row: &Value) -> Result<String, String> {
    target(row).map(|(_, text)| text)
}

/// The expected output and the field it came from.
fn target(row: &Value) -> Result<(String, String), String> {
    let Some(obj) = row.as_object() else {
        return Err("the row is not a JSON object".into());
    };
    for &name in &TARGET_FIELDS {
        match obj.get(name) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => return Ok((name.into(), s.clone())),
            // Numeric answers are common in eval-style data; compare them as written.
            Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                return Ok((name.into(), v.to_string()))
            }
            Some(_) => return Err(format!("{name}: the expected output must be a string")),
        }
    }
    if let Some(Value::Array(messages)) = obj.get("messages") {
        let last = messages
            .iter()
            .enumerate()
            .rev()
            .find(|(_, m)| m["role"] == "assistant");
        if let Some((i, m)) = last {
            let field = format!("messages[{i}].content");
            return match &m["content"] {
                Value::String(s) => Ok((field, s.clone())),
                // OpenAI's content parts: the text parts, joined.
                Value::Array(parts) => Ok((
                    field,
                    parts.iter().filter_map(|p| p["text"].as_str()).collect(),
                )),
                _ => Err(format!("{field}: expected the assistant's text")),
            };
        }
    }
    Err(format!(
        "{}: no expected output (nor `messages` with an assistant message)",
        TARGET_FIELDS.join("|")
    ))
}

/// A recipe's params object, with unknown keys refused.
struct Params<'a> {
    recipe: &'a str,
    map: Option<&'a Map<String, Value>>,
}

impl<'a> Params<'a> {
    fn new(recipe: &'a str, params: &'a Value, allowed: &[&str]) -> Result<Self, RewardError> {
        let map = match params {
            Value::Null => None,
            Value::Object(map) => Some(map),
            _ => {
                return Err(RewardError::Config(format!(
                    "{recipe}: params must be an object"
                )))
            }
        };
        let unknown: Vec<_> = map
            .into_iter()
            .flat_map(|m| m.keys())
            .filter(|k| !allowed.contains(&k.as_str()))
            .map(|k| format!("`{k}`"))
            .collect();
        if !unknown.is_empty() {
            let takes = match allowed {
                [] => "takes no params".to_string(),
                _ => format!("takes {}", allowed.join(", ")),
            };
            return Err(RewardError::Config(format!(
                "{recipe}: unknown param {} ({recipe} {takes})",
                unknown.join(", ")
            )));
        }
        Ok(Params { recipe, map })
    }

    /// A present, non-null param.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, what: &str) -> RewardError {
        RewardError::Config(format!("{}: param `{key}` {what}", self.recipe))
    }

    fn number(&self, key: &str, default: f64) -> Result<f64, RewardError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.bad(key, "must be a number")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config_err(name: &str, params: Value) -> String {
        match recipe(name, &params) {
            Err(RewardError::Config(m)) => m,
            Err(e) => panic!("expected a config error, got {e}"),
            Ok(_) => panic!("expected a config error for {name} {params}"),
        }
    }

    #[test]
    fn names_and_unknown_recipes() {
        for name in RECIPES
            .iter()
            .filter(|&&n| n != "command_v1" && n != "contains_v1")
        {
            assert_eq!(recipe(name, &Value::Null).unwrap().name(), *name);
            assert_eq!(recipe(name, &json!({})).unwrap().name(), *name);
        }
        let m = config_err("exact_match", Value::Null);
        assert!(
            m.contains("exact_match_v1") && m.contains("command_v1"),
            "{m}"
        );
        let m = config_err("exact_match_v1", json!({"needle": "x"}));
        assert!(m.contains("`needle`") && m.contains("no params"), "{m}");
        assert!(config_err("gsm8k_v1", json!([1])).contains("object"));
    }

    #[test]
    fn expected_output_fields_and_messages() {
        assert_eq!(
            expected_output(&json!({"answer": "a", "output": "o"})).unwrap(),
            "a"
        );
        assert_eq!(
            expected_output(&json!({"target": null, "response": 42})).unwrap(),
            "42"
        );
        let chat = json!({"messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond"}]},
        ]});
        assert_eq!(expected_output(&chat).unwrap(), "second");
        let e = expected_output(&json!({"prompt": "x"})).unwrap_err();
        assert!(e.contains("expected_output|target"), "{e}");
        assert!(expected_output(&json!({"answer": [1]}))
            .unwrap_err()
            .starts_with("answer:"));
        assert!(expected_output(&json!("text")).is_err());
    }
}
