//! The built binary, driven over stdin/stdout exactly as whet drives a world.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{json, Value};

struct World {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl World {
    fn spawn(args: &[&str]) -> World {
        let mut child = Command::new(env!("CARGO_BIN_EXE_whet-world-vault"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the world");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        World {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one raw line and reads one response line.
    fn raw(&mut self, line: &str) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let mut reply = String::new();
        self.stdout.read_line(&mut reply).unwrap();
        assert!(reply.ends_with('\n'), "no full response line: {reply:?}");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad response {reply:?}: {e}"))
    }

    fn send(&mut self, request: Value) -> Value {
        self.raw(&request.to_string())
    }

    fn reset(&mut self, seed: u64) -> Value {
        self.send(json!({"op": "reset", "seed": seed, "task": {"id": "find-code"}}))
    }

    fn call(&mut self, id: &str, name: &str, arguments: Value) -> Value {
        let call = json!({"id": id, "type": "function",
                          "function": {"name": name, "arguments": arguments}});
        self.send(json!({"op": "step", "action":
            {"role": "assistant", "content": "", "tool_calls": [call]}}))
    }

    /// Closes stdin (or sends `close`) and returns the exit code.
    fn finish(mut self, send_close: bool) -> Option<i32> {
        if send_close {
            assert_eq!(self.send(json!({"op": "close"})), json!({"ok": true}));
        }
        drop(self.stdin.take());
        self.child.wait().unwrap().code()
    }
}

fn content(reply: &Value) -> String {
    reply["observation"][0]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

fn sources(reply: &Value) -> Vec<&str> {
    reply["reward_signals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source"].as_str().unwrap())
        .collect()
}

/// A 4-digit number in `text`, if any.
fn find_code(text: &str) -> Option<String> {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 4)
        .map(str::to_string)
}

/// Plays a whole episode the way a good policy would: list, read everything, submit.
/// Returns the transcript (every response) for determinism checks.
fn solve(world: &mut World, seed: u64) -> Vec<Value> {
    let start = world.reset(seed);
    assert!(content(&start).contains("4-digit"));
    assert_eq!(start["tools"].as_array().unwrap().len(), 3);
    let mut transcript = vec![start];

    let mut pending = vec!["/".to_string()];
    let mut files = Vec::new();
    let mut n = 0;
    while let Some(dir) = pending.pop() {
        n += 1;
        let r = world.call(&format!("ls{n}"), "ls", json!({"path": dir}));
        assert_eq!(r["observation"][0]["tool_call_id"], format!("ls{n}"));
        assert_eq!(sources(&r), ["tool_observation"]);
        for entry in content(&r).lines() {
            let path = format!("{}/{}", dir.trim_end_matches('/'), entry);
            match path.strip_suffix('/') {
                Some(sub) => pending.push(sub.to_string()),
                None => files.push(path),
            }
        }
        transcript.push(r);
    }
    let mut code = None;
    for (i, file) in files.iter().enumerate() {
        let r = world.call(&format!("cat{i}"), "cat", json!({"path": file}));
        assert_eq!(r["done"], false);
        if let Some(found) = find_code(&content(&r)) {
            assert_eq!(sources(&r), ["tool_observation", "discovery"]);
            code = Some(found);
        } else {
            assert_eq!(sources(&r), ["tool_observation"]);
        }
        transcript.push(r);
    }
    let code = code.expect("some file holds the code");
    let r = world.call("sub", "submit", json!({"code": code}));
    assert_eq!(r["done"], true, "{r}");
    assert_eq!(r["termination_reason"], "finished");
    transcript.push(r);
    transcript
}

#[test]
fn a_scripted_policy_solves_every_manifest_seed() {
    let mut world = World::spawn(&[]);
    for seed in 1..=16 {
        solve(&mut world, seed);
    }
    assert_eq!(world.finish(true), Some(0));
}

#[test]
fn the_same_seed_replays_identically_across_processes() {
    let mut a = World::spawn(&[]);
    let mut b = World::spawn(&[]);
    assert_eq!(solve(&mut a, 9), solve(&mut b, 9));
    assert_ne!(solve(&mut a, 9), solve(&mut b, 10));
    assert_eq!(a.finish(false), Some(0));
    assert_eq!(b.finish(false), Some(0));
}

#[test]
fn a_wrong_code_ends_with_wrong_answer() {
    let mut world = World::spawn(&[]);
    world.reset(3);
    // No tree holds a code with a leading zero (codes are 1000-9999).
    let r = world.call("c1", "submit", json!({"code": "0000"}));
    assert_eq!(r["done"], true);
    assert_eq!(r["termination_reason"], "wrong_answer");
    assert_eq!(r["reward_signals"][0]["source"], "wrong_answer");
    assert_eq!(r["reward_signals"][0]["value"], -0.5);
    // The episode is over; another step is an error, a reset starts afresh.
    assert!(world.call("c2", "ls", json!({"path": "/"}))["error"].is_string());
    assert!(world.reset(3)["observation"].is_array());
    assert_eq!(world.finish(false), Some(0));
}

#[test]
fn protocol_and_tool_errors() {
    let mut world = World::spawn(&[]);
    // Before any reset.
    assert!(world.call("c0", "ls", json!({"path": "/"}))["error"].is_string());
    // A malformed line gets an error and the world keeps reading.
    let r = world.raw("{\"op\": \"reset\", \"seed\": ");
    assert!(
        r["error"].as_str().unwrap().contains("malformed JSON"),
        "{r}"
    );
    let r = world.send(json!({"op": "reset", "seed": 1, "task": {"id": "nope"}}));
    assert!(r["error"].as_str().unwrap().contains("unknown task"), "{r}");
    world.reset(1);

    let r = world.call("c1", "rm", json!({"path": "/"}));
    assert_eq!(r["observation"][0]["tool_call_id"], "c1");
    assert!(content(&r).contains("unknown tool"));
    assert_eq!(sources(&r), ["tool_error"]);
    assert_eq!(r["reward_signals"][0]["value"], -0.2);
    let r = world.call("c2", "cat", json!({"path": "/missing.txt"}));
    assert_eq!(sources(&r), ["tool_error"]);
    assert_eq!(r["done"], false);

    // Arguments as JSON text, as many chat templates' parsers produce them.
    let r = world.call("c3", "ls", Value::String("{\"path\": \"/\"}".into()));
    assert_eq!(sources(&r), ["tool_observation"]);
    let r = world.call("c4", "ls", Value::String("{\"path\": ".into()));
    assert!(content(&r).contains("not valid JSON"));
    assert_eq!(sources(&r), ["tool_error"]);

    // No tool call: a reminder, not the end.
    let r = world.send(json!({"op": "step", "action": {"role": "assistant", "content": "hm"}}));
    assert_eq!(r["observation"][0]["role"], "user");
    assert_eq!(sources(&r), ["no_tool_call"]);
    assert_eq!(r["done"], false);
    // EOF ends the process cleanly.
    assert_eq!(world.finish(false), Some(0));
}

#[test]
fn files_flag_sets_the_tree_size_and_bad_flags_exit_2() {
    let mut world = World::spawn(&["--files", "6"]);
    world.reset(4);
    let mut count = 0;
    let root = content(&world.call("a", "ls", json!({"path": "/"})));
    for entry in root.lines() {
        match entry.strip_suffix('/') {
            Some(dir) => {
                let r = world.call("b", "ls", json!({"path": dir}));
                count += content(&r).lines().count();
            }
            None => count += 1,
        }
    }
    assert_eq!(count, 6);
    assert_eq!(world.finish(true), Some(0));

    let status = Command::new(env!("CARGO_BIN_EXE_whet-world-vault"))
        .args(["--files", "99"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}
