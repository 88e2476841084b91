//! Unit tests for [`super::Episode`]: rewards, termination, argument forms.

use super::*;

fn episode(seed: u64) -> Episode {
    Episode::new(seed, &Task { files: None })
}

fn call(id: &str, name: &str, arguments: Value) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

fn act(calls: Vec<Value>) -> Value {
    json!({"role": "assistant", "content": "", "tool_calls": calls})
}

fn sources(reply: &Value) -> Vec<(String, f64)> {
    reply["reward_signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["source"].as_str().unwrap().to_string(),
                s["value"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_solving_episode_earns_observation_discovery_and_finishes() {
    let mut ep = episode(5);
    let path = format!("/{}", ep.vault().code_path);
    let code = ep.vault().code.clone();

    let r = ep
        .step(&act(vec![call("c1", "ls", json!({"path": "/"}))]))
        .unwrap();
    assert_eq!(r["observation"][0]["tool_call_id"], "c1");
    assert_eq!(sources(&r), [("tool_observation".into(), TOOL_OBSERVATION)]);
    assert_eq!(r["done"], false);
    assert_eq!(r["termination_reason"], Value::Null);

    let r = ep
        .step(&act(vec![call("c2", "cat", json!({"path": path}))]))
        .unwrap();
    assert!(r["observation"][0]["content"]
        .as_str()
        .unwrap()
        .contains(&code));
    assert_eq!(
        sources(&r),
        [
            ("tool_observation".into(), TOOL_OBSERVATION),
            ("discovery".into(), DISCOVERY)
        ]
    );

    // Reading it again shows it again but earns nothing.
    let r = ep
        .step(&act(vec![call("c3", "cat", json!({"path": path}))]))
        .unwrap();
    assert!(sources(&r).is_empty());

    let r = ep
        .step(&act(vec![call("c4", "submit", json!({"code": code}))]))
        .unwrap();
    assert_eq!(r["done"], true);
    assert_eq!(r["termination_reason"], "finished");
    assert!(sources(&r).is_empty());
    assert!(ep.step(&act(vec![])).unwrap_err().contains("over"));
}

#[test]
fn a_wrong_code_ends_the_episode_with_wrong_answer() {
    let mut ep = episode(1);
    let wrong = if ep.vault().code == "1234" {
        "4321"
    } else {
        "1234"
    };
    let r = ep
        .step(&act(vec![call("c1", "submit", json!({"code": wrong}))]))
        .unwrap();
    assert_eq!(r["done"], true);
    assert_eq!(r["termination_reason"], "wrong_answer");
    assert_eq!(sources(&r), [("wrong_answer".into(), WRONG_ANSWER)]);
}

#[test]
fn the_code_may_be_a_number_and_arguments_json_text() {
    let mut ep = episode(2);
    let code: u64 = ep.vault().code.parse().unwrap();
    let r = ep
        .step(&act(vec![call("c1", "submit", json!({"code": code}))]))
        .unwrap();
    assert_eq!(r["termination_reason"], "finished");

    let mut ep = episode(2);
    let text = json!({"path": "/"}).to_string();
    let r = ep
        .step(&act(vec![call("c1", "ls", Value::String(text))]))
        .unwrap();
    assert_eq!(sources(&r), [("tool_observation".into(), TOOL_OBSERVATION)]);
}

#[test]
fn policy_mistakes_are_tool_errors_not_protocol_errors() {
    let bad = [
        call("a", "rm", json!({"path": "/"})),
        call("b", "ls", json!({})),
        call("c", "ls", json!({"path": 3})),
        call("d", "ls", json!({"path": "/", "all": true})),
        call("e", "cat", Value::String("{\"path\": ".into())),
        call("f", "cat", Value::String("[\"/\"]".into())),
        call("g", "cat", json!({"path": "/no/such.txt"})),
        call("h", "cat", json!({"path": "/"})),
        call("i", "submit", json!({"code": "  "})),
        json!({"id": "j", "type": "function"}),
    ];
    let mut ep = episode(3);
    let r = ep.step(&act(bad.to_vec())).unwrap();
    let obs = r["observation"].as_array().unwrap();
    assert_eq!(obs.len(), bad.len());
    for (msg, call) in obs.iter().zip(&bad) {
        assert_eq!(msg["role"], "tool");
        assert_eq!(msg["tool_call_id"], call["id"]);
        assert!(
            msg["content"].as_str().unwrap().starts_with("error: "),
            "{msg}"
        );
    }
    let signals = sources(&r);
    assert_eq!(signals.len(), bad.len());
    assert!(signals
        .iter()
        .all(|s| *s == ("tool_error".into(), TOOL_ERROR)));
    assert_eq!(r["done"], false);
}

#[test]
fn no_tool_call_reminds_and_three_idle_turns_stall() {
    let mut ep = episode(4);
    let text = json!({"role": "assistant", "content": "I think the code is 1234."});
    let r = ep.step(&text).unwrap();
    assert_eq!(r["observation"][0]["role"], "user");
    assert_eq!(sources(&r), [("no_tool_call".into(), NO_TOOL_CALL)]);
    assert_eq!(r["done"], false);
    // A productive turn resets the count...
    ep.step(&act(vec![call("c1", "ls", json!({"path": "/"}))]))
        .unwrap();
    // ...then a repeat, a bare message and an error make three idle turns in a row.
    let r = ep
        .step(&act(vec![call("c2", "ls", json!({"path": "."}))]))
        .unwrap();
    assert_eq!(r["done"], false);
    let r = ep
        .step(&json!({"role": "assistant", "content": null, "tool_calls": []}))
        .unwrap();
    assert_eq!(r["done"], false);
    let r = ep
        .step(&act(vec![call("c3", "ls", json!({"path": "/x"}))]))
        .unwrap();
    assert_eq!(r["done"], true);
    assert_eq!(r["termination_reason"], "stalled");
}

#[test]
fn calls_after_submit_are_answered_but_not_run_and_ids_are_invented_when_missing() {
    let mut ep = episode(6);
    let code = ep.vault().code.clone();
    let calls = vec![
        json!({"function": {"name": "submit", "arguments": {"code": code}}}),
        call("late", "ls", json!({"path": "/"})),
    ];
    let r = ep.step(&act(calls)).unwrap();
    assert_eq!(r["termination_reason"], "finished");
    assert_eq!(r["observation"][0]["tool_call_id"], "call_0");
    assert_eq!(r["observation"][1]["tool_call_id"], "late");
    assert!(r["observation"][1]["content"]
        .as_str()
        .unwrap()
        .starts_with("not run"));
    assert!(sources(&r).is_empty());
}

#[test]
fn malformed_actions_are_protocol_errors() {
    let mut ep = episode(7);
    assert!(ep.step(&json!("ls /")).is_err());
    assert!(ep.step(&json!({"tool_calls": {"id": "x"}})).is_err());
    assert!(ep.step(&json!({"tool_calls": ["ls"]})).is_err());
    // The episode is still playable afterwards.
    assert!(ep
        .step(&act(vec![call("c", "ls", json!({"path": "/"}))]))
        .is_ok());
}

#[test]
fn start_states_the_goal_and_offers_three_tools() {
    let start = episode(8).start();
    assert_eq!(start["observation"][0]["role"], "user");
    assert!(start["observation"][0]["content"]
        .as_str()
        .unwrap()
        .contains("submit"));
    let names: Vec<&str> = start["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ls", "cat", "submit"]);
}

/// The manifest's reward components must be the values the world actually emits, or the
/// reward whet computes and the README's description drift apart.
#[test]
fn manifest_components_match_the_emitted_signals() {
    let manifest = include_str!("../world.yaml");
    let value = |key: &str| -> f64 {
        let components = manifest.split("components:").nth(1).unwrap();
        let line = components
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("{key} not in world.yaml's components"));
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    };
    assert_eq!(value("tool_observation"), TOOL_OBSERVATION);
    assert_eq!(value("discovery"), DISCOVERY);
    assert_eq!(value("tool_error"), TOOL_ERROR);
    assert_eq!(value("no_tool_call"), NO_TOOL_CALL);
    assert_eq!(value("wrong_answer"), WRONG_ANSWER);
}

/// Regression: world.yaml 1.0.0 had no terminal value for `wrong_answer`, so a wrong submit
/// cost −0.5 in all (less than stalling with errors) instead of the README's −1.0, and live RL
/// learned to guess. Every ending must have its terminal value, and a wrong submit must cost
/// more than a stall after three failed calls.
#[test]
fn every_ending_has_a_terminal_value_and_guessing_never_pays() {
    let manifest = include_str!("../world.yaml");
    // The block under `terminal:`: its indented lines, up to the next top-level key.
    let terminal: Vec<&str> = manifest
        .split("terminal:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .map(str::trim_start)
        .collect();
    let value = |key: &str| -> f64 {
        let line = terminal
            .iter()
            .find(|l| l.starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("{key} not in world.yaml's terminal values"));
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    };
    for reason in ["finished", "wrong_answer", "stalled", "max_steps", "error"] {
        value(reason);
    }
    let wrong_submit = WRONG_ANSWER + value("wrong_answer");
    let stall = f64::from(STALL_TURNS) * TOOL_ERROR + value("stalled");
    assert_eq!(wrong_submit, -1.0, "the README's table");
    assert!(wrong_submit < stall, "{wrong_submit} vs {stall}");
}
