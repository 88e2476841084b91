//! The recipes that score from the completion and the row alone: `exact_match_v1`,
//! `contains_v1`, `row_reward_v1`, `trajectory_imitation_v1`, `task_verifier_v1`, `gsm8k_v1`.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{expected_output, target, Params, Recipe, RewardError, RewardInput, Score};

pub(super) struct ExactMatch;

impl Recipe for ExactMatch {
    fn name(&self) -> &str {
        "exact_match_v1"
    }
    fn check_row(&self, row: &Value) -> Result<(), String> {
        target(row).map(drop)
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        let expected = expected_output(input.row).map_err(RewardError::Failed)?;
        Ok(Score::binary(input.completion.trim() == expected.trim()))
    }
}

pub(super) const CONTAINS_PARAMS: [&str; 3] = ["needle", "reward_if_true", "reward_if_false"];

pub(super) struct Contains {
    needle: String,
    if_true: f64,
    if_false: f64,
}

impl Contains {
    pub(super) fn new(p: &Params<'_>) -> Result<Self, RewardError> {
        let needle = match p.get("needle") {
            None => return Err(p.bad("needle", "is required")),
            Some(Value::String(s)) if s.is_empty() => {
                // Every completion contains "": surely a mistake, not a reward.
                return Err(p.bad("needle", "must not be empty"));
            }
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(p.bad("needle", "must be a string")),
        };
        let if_true = p.number("reward_if_true", 1.0)?;
        let if_false = p.number("reward_if_false", 0.0)?;
        Ok(Contains {
            needle,
            if_true,
            if_false,
        })
    }
}

impl Recipe for Contains {
    fn name(&self) -> &str {
        "contains_v1"
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        let hit = input.completion.contains(&self.needle);
        Ok(Score::new(if hit { self.if_true } else { self.if_false }))
    }
}

/// The row's `reward` column; `default` when absent.
fn row_reward(row: &Value, default: Option<f64>) -> Result<f64, String> {
    let value = match row.get("reward") {
        None | Some(Value::Null) => default,
        Some(Value::Number(n)) => n.as_f64(),
        // CSV datasets carry every column as text.
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match value {
        Some(x) if x.is_finite() => Ok(x),
        _ if row.get("reward").is_none_or(Value::is_null) => Err("reward: missing".into()),
        _ => Err("reward: must be a number".into()),
    }
}

pub(super) struct RowReward;

impl Recipe for RowReward {
    fn name(&self) -> &str {
        "row_reward_v1"
    }
    fn check_row(&self, row: &Value) -> Result<(), String> {
        row_reward(row, None).map(drop)
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        row_reward(input.row, None)
            .map(Score::new)
            .map_err(RewardError::Failed)
    }
}

pub(super) struct TrajectoryImitation;

impl Recipe for TrajectoryImitation {
    fn name(&self) -> &str {
        "trajectory_imitation_v1"
    }
    fn check_row(&self, row: &Value) -> Result<(), String> {
        target(row)?;
        row_reward(row, Some(1.0)).map(drop)
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        let action = expected_output(input.row).map_err(RewardError::Failed)?;
        let reward = row_reward(input.row, Some(1.0)).map_err(RewardError::Failed)?;
        let hit = input.completion.trim() == action.trim();
        Ok(Score::new(if hit { reward } else { 0.0 }))
    }
}

/// The lowercase hex SHA-256 of the row's `verification: {method: "flag", hash: "sha256:<hex>"}`.
fn verification_hash(row: &Value) -> Result<String, String> {
    let Some(v) = row.get("verification").filter(|v| !v.is_null()) else {
        return Err("verification: missing".into());
    };
    let Some(v) = v.as_object() else {
        return Err(
            "verification: expected {\"method\": \"flag\", \"hash\": \"sha256:<hex>\"}".into(),
        );
    };
    match v.get("method") {
        Some(Value::String(m)) if m == "flag" => {}
        Some(Value::String(m)) => {
            return Err(format!(
                "verification.method: unsupported method `{m}` (expected `flag`)"
            ))
        }
        _ => return Err("verification.method: expected \"flag\"".into()),
    }
    let hex = v
        .get("hash")
        .and_then(Value::as_str)
        .and_then(|h| h.strip_prefix("sha256:"));
    match hex {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(h.to_ascii_lowercase())
        }
        _ => Err("verification.hash: expected \"sha256:<64 hex digits>\"".into()),
    }
}

pub(super) struct TaskVerifier;

impl Recipe for TaskVerifier {
    fn name(&self) -> &str {
        "task_verifier_v1"
    }
    fn check_row(&self, row: &Value) -> Result<(), String> {
        verification_hash(row).map(drop)
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        let want = verification_hash(input.row).map_err(RewardError::Failed)?;
        let digest = Sha256::digest(input.completion.trim().as_bytes());
        let got: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Score::binary(got == want))
    }
}

/// The last number in `text`: an optional leading minus and `$`, digits with optional
/// thousands commas (`1,234`), an optional decimal part.
fn last_number(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    let digit = |j: usize| b.get(j).is_some_and(u8::is_ascii_digit);
    let (mut last, mut i) = (None, 0);
    while i < b.len() {
        if !(digit(i) || (b[i] == b'.' && digit(i + 1))) {
            i += 1;
            continue;
        }
        let start = i;
        while digit(i) {
            i += 1;
        }
        // A comma continues the number only before a group of exactly three digits, so a
        // list like "1,2,3" stays three numbers.
        while b.get(i) == Some(&b',') && (1..=3).all(|k| digit(i + k)) && !digit(i + 4) {
            i += 4;
        }
        if b.get(i) == Some(&b'.') && digit(i + 1) {
            i += 1;
            while digit(i) {
                i += 1;
            }
        }
        let body: String = text[start..i].chars().filter(|&c| c != ',').collect();
        let mut k = start;
        if k > 0 && b[k - 1] == b'$' {
            k -= 1;
        }
        // A minus after a word or a number is an operator or a hyphen ("3-5"), not a sign.
        let negative = k > 0 && b[k - 1] == b'-' && (k == 1 || !b[k - 2].is_ascii_alphanumeric());
        if let Ok(x) = format!("0{body}").parse::<f64>() {
            last = Some(if negative { -x } else { x });
        }
    }
    last
}

/// The reference number of a GSM8K row: the last number after `####`, or in the whole answer.
fn gsm8k_reference(row: &Value) -> Result<f64, String> {
    let (field, answer) = target(row)?;
    let tail = answer
        .split_once("####")
        .map_or(answer.as_str(), |(_, t)| t);
    last_number(tail).ok_or_else(|| format!("{field}: no number in the reference answer"))
}

pub(super) struct Gsm8k;

impl Recipe for Gsm8k {
    fn name(&self) -> &str {
        "gsm8k_v1"
    }
    fn check_row(&self, row: &Value) -> Result<(), String> {
        gsm8k_reference(row).map(drop)
    }
    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        let reference = gsm8k_reference(input.row).map_err(RewardError::Failed)?;
        let answer = last_number(input.completion);
        let mut score = Score::binary(answer.is_some_and(|x| (x - reference).abs() <= 1e-6));
        // Always present, so its per-step mean is the share of unparseable completions.
        let format_error = if answer.is_none() { 1.0 } else { 0.0 };
        score.metrics.insert("format_error".into(), format_error);
        Ok(score)
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipes::recipe;
    use serde_json::json;

    fn score(
        name: &str,
        params: Value,
        completion: &str,
        row: Value,
    ) -> Result<Score, RewardError> {
        let r = recipe(name, &params).expect("recipe");
        r.score(&RewardInput {
            prompt: "p",
            completion,
            row: &row,
        })
    }

    fn reward(name: &str, params: Value, completion: &str, row: Value) -> f64 {
        score(name, params, completion, row).expect("score").reward
    }

    fn config_err(name: &str, params: Value) -> String {
        match recipe(name, &params) {
            Err(RewardError::Config(m)) => m,
            Err(e) => panic!("expected a config error, got {e}"),
            Ok(_) => panic!("expected a config error for {name} {params}"),
        }
    }

    fn failed(r: Result<Score, RewardError>) -> String {
        match r {
            Err(RewardError::Failed(m)) => m,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn exact_match() {
        let row = json!({"prompt": "2+2?", "expected_output": " 4\n"});
        assert_eq!(
            reward("exact_match_v1", Value::Null, "4 ", row.clone()),
            1.0
        );
        assert_eq!(reward("exact_match_v1", Value::Null, "4.0", row), 0.0);
        let r = recipe("exact_match_v1", &Value::Null).unwrap();
        assert!(r
            .check_row(&json!({"prompt": "x"}))
            .unwrap_err()
            .contains("expected_output"));
        let m = failed(score(
            "exact_match_v1",
            Value::Null,
            "4",
            json!({"prompt": "x"}),
        ));
        assert!(m.contains("expected_output"), "{m}");
    }

    #[test]
    fn contains() {
        let p = json!({"needle": "yes", "reward_if_true": 2, "reward_if_false": -1.5});
        assert_eq!(reward("contains_v1", p.clone(), "oh yes!", json!({})), 2.0);
        assert_eq!(reward("contains_v1", p, "no", json!({})), -1.5);
        assert_eq!(
            reward("contains_v1", json!({"needle": "a"}), "cat", json!({})),
            1.0
        );
        assert_eq!(
            reward("contains_v1", json!({"needle": "a"}), "dog", json!({})),
            0.0
        );
        assert!(config_err("contains_v1", Value::Null).contains("`needle` is required"));
        assert!(config_err("contains_v1", json!({"needle": 3})).contains("`needle`"));
        assert!(config_err("contains_v1", json!({"needle": ""})).contains("empty"));
        let m = config_err("contains_v1", json!({"needle": "a", "reward_if_true": "1"}));
        assert!(m.contains("`reward_if_true` must be a number"), "{m}");
        let m = config_err("contains_v1", json!({"needle": "a", "neddle": 1, "zz": 2}));
        assert!(m.contains("`neddle`") && m.contains("`zz`") && m.contains("reward_if_false"));
    }

    #[test]
    fn row_reward() {
        assert_eq!(
            reward("row_reward_v1", Value::Null, "x", json!({"reward": 0.25})),
            0.25
        );
        assert_eq!(
            reward("row_reward_v1", Value::Null, "x", json!({"reward": "-2"})),
            -2.0
        );
        let m = failed(score(
            "row_reward_v1",
            Value::Null,
            "x",
            json!({"prompt": "p"}),
        ));
        assert!(m.contains("reward: missing"), "{m}");
        let m = failed(score(
            "row_reward_v1",
            Value::Null,
            "x",
            json!({"reward": "high"}),
        ));
        assert!(m.contains("reward: must be a number"), "{m}");
        let r = recipe("row_reward_v1", &Value::Null).unwrap();
        assert!(r.check_row(&json!({"reward": [1]})).is_err());
        assert!(r.check_row(&json!({"reward": 1})).is_ok());
    }

    #[test]
    fn trajectory_imitation() {
        let row = json!({"prompt": "p", "expected_output": "ls -la\n", "reward": 0.5});
        assert_eq!(
            reward(
                "trajectory_imitation_v1",
                Value::Null,
                " ls -la",
                row.clone()
            ),
            0.5
        );
        assert_eq!(
            reward("trajectory_imitation_v1", Value::Null, "ls", row),
            0.0
        );
        let chat = json!({"messages": [{"role": "user", "content": "go"},
                                       {"role": "assistant", "content": "cd /"}]});
        assert_eq!(
            reward("trajectory_imitation_v1", Value::Null, "cd /", chat),
            1.0
        );
        let r = recipe("trajectory_imitation_v1", &Value::Null).unwrap();
        let bad = json!({"expected_output": "a", "reward": true});
        assert!(r.check_row(&bad).unwrap_err().contains("reward"));
        assert!(r.check_row(&json!({"prompt": "p"})).is_err());
    }

    #[test]
    fn task_verifier() {
        // Well-formed hex, but without the `sha256:` prefix.
        let hex = "c1ef6e4edf8ac3fa4fe0aae46b0d0ee2af6a1e3a94bbe16cae5d67bb2c91d4d1";
        let digest: String = Sha256::digest(b"flag{ok}")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let hash = format!("sha256:{}", digest.to_uppercase());
        let row = json!({"verification": {"method": "flag", "hash": hash}});
        assert_eq!(
            reward("task_verifier_v1", Value::Null, "  flag{ok}\n", row.clone()),
            1.0
        );
        assert_eq!(
            reward("task_verifier_v1", Value::Null, "flag{no}", row),
            0.0
        );
        let r = recipe("task_verifier_v1", &Value::Null).unwrap();
        let check = |v: Value| r.check_row(&json!({"verification": v})).unwrap_err();
        assert!(check(json!({"method": "regex", "hash": hex})).starts_with("verification.method"));
        assert!(check(json!({"hash": hex})).starts_with("verification.method"));
        assert!(check(json!({"method": "flag", "hash": hex})).starts_with("verification.hash"));
        assert!(check(json!({"method": "flag", "hash": "sha256:abc"})).contains("hash"));
        assert!(check(json!("flag")).starts_with("verification:"));
        assert!(r
            .check_row(&json!({}))
            .unwrap_err()
            .contains("verification: missing"));
        let m = failed(score("task_verifier_v1", Value::Null, "x", json!({})));
        assert!(m.contains("verification"), "{m}");
    }

    #[test]
    fn numbers() {
        assert_eq!(last_number("The answer is 1,234."), Some(1234.0));
        assert_eq!(last_number("costs $5.50 total"), Some(5.5));
        assert_eq!(last_number("it fell to -7 degrees"), Some(-7.0));
        assert_eq!(last_number("owes -$3"), Some(-3.0));
        assert_eq!(last_number("pages 3-5"), Some(5.0));
        assert_eq!(last_number("1,2,3"), Some(3.0));
        assert_eq!(last_number("1,234,567.25 and"), Some(1_234_567.25));
        assert_eq!(last_number("about .5 of it"), Some(0.5));
        assert_eq!(last_number("no digits here."), None);
        assert_eq!(last_number(""), None);
    }

    #[test]
    fn gsm8k() {
        let row = |a: &str| json!({"question": "q", "answer": a});
        let r = |c: &str, a: &str| score("gsm8k_v1", Value::Null, c, row(a)).unwrap();
        assert_eq!(r("The answer is 1,234.", "#### 1234").reward, 1.0);
        assert_eq!(
            r("So 2 + 3 = 5, total $5.50", "Work: 11/2\n#### 5.5").reward,
            1.0
        );
        assert_eq!(r("She ends at -4", "-4").reward, 1.0);
        assert_eq!(r("the result is 4", "#### -4").reward, 0.0);
        assert_eq!(r("12 apples, so 13", "#### 12").reward, 0.0);
        let s = r("The answer is 7.", "#### 7");
        assert_eq!(s.metrics.get("format_error"), Some(&0.0));
        let s = r("I don't know.", "#### 7");
        assert_eq!((s.reward, s.metrics.get("format_error")), (0.0, Some(&1.0)));
        let rec = recipe("gsm8k_v1", &Value::Null).unwrap();
        assert!(rec
            .check_row(&row("#### none"))
            .unwrap_err()
            .contains("answer: no number"));
        assert!(rec.check_row(&row("#### 3")).is_ok());
        assert!(failed(score("gsm8k_v1", Value::Null, "3", json!({"q": 1}))).contains("answer"));
    }
}
