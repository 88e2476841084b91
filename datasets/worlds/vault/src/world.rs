//! The JSON-lines protocol (datasets/worlds/README.md): one request line in, one response
//! line out. A bad request gets `{"error": ...}` and the world keeps reading; whet decides
//! what an error means for the episode.

use serde_json::{json, Value};

use crate::episode::{Episode, Task};

/// What to do with one input line.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// Write this response and read the next request.
    Send(Value),
    /// Write this response, then exit 0 (`close`).
    Close(Value),
    /// Nothing to answer (a blank line).
    Skip,
}

/// The process's state: the current episode, if `reset` has started one.
pub struct World {
    default_files: Option<usize>,
    episode: Option<Episode>,
}

impl World {
    /// A world with no episode yet; `default_files` comes from `--files` and applies to every
    /// `reset` whose task does not say otherwise.
    pub fn new(default_files: Option<usize>) -> World {
        World {
            default_files,
            episode: None,
        }
    }

    /// Answers one raw line (without or with its `\n`).
    pub fn handle(&mut self, line: &[u8]) -> Reply {
        let Ok(text) = std::str::from_utf8(line) else {
            return error("request is not UTF-8");
        };
        if text.trim().is_empty() {
            return Reply::Skip;
        }
        let request: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return error(&format!("malformed JSON: {e}")),
        };
        match self.dispatch(&request) {
            Ok(reply) => reply,
            Err(message) => error(&message),
        }
    }

    fn dispatch(&mut self, request: &Value) -> Result<Reply, String> {
        let op = request
            .get("op")
            .and_then(Value::as_str)
            .ok_or("request needs a string \"op\" (reset, step or close)")?;
        match op {
            "reset" => {
                let seed = match request.get("seed") {
                    None | Some(Value::Null) => 0,
                    Some(seed) => seed
                        .as_u64()
                        .ok_or("\"seed\" must be a non-negative integer")?,
                };
                let task = Task::parse(request.get("task"), self.default_files)?;
                let episode = Episode::new(seed, &task);
                let reply = episode.start();
                self.episode = Some(episode);
                Ok(Reply::Send(reply))
            }
            "step" => {
                let episode = self
                    .episode
                    .as_mut()
                    .ok_or("step before reset: send reset first")?;
                let action = request.get("action").ok_or("step needs an \"action\"")?;
                Ok(Reply::Send(episode.step(action)?))
            }
            "close" => Ok(Reply::Close(json!({"ok": true}))),
            other => Err(format!("unknown op {other:?} (reset, step or close)")),
        }
    }
}

fn error(message: &str) -> Reply {
    Reply::Send(json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(world: &mut World, line: &str) -> Value {
        match world.handle(line.as_bytes()) {
            Reply::Send(v) => v,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_get_errors_and_the_world_goes_on() {
        let mut w = World::new(None);
        for line in [
            "{not json",
            "[1, 2]",
            r#"{"op": "jump"}"#,
            r#"{"op": "step", "action": {"role": "assistant", "content": "hi"}}"#,
            r#"{"op": "reset", "seed": -1, "task": {"id": "find-code"}}"#,
            r#"{"op": "reset", "seed": 1, "task": {"id": "open-door"}}"#,
            r#"{"op": "reset", "seed": 1, "task": {"id": "find-code", "filez": 3}}"#,
            r#"{"op": "reset", "seed": 1, "task": {"id": "find-code", "files": 0}}"#,
        ] {
            let reply = send(&mut w, line);
            assert!(reply["error"].is_string(), "{line} -> {reply}");
        }
        assert_eq!(w.handle(b"\xff\xfe\n"), error("request is not UTF-8"));
        assert_eq!(w.handle(b"   \n"), Reply::Skip);
        let reply = send(
            &mut w,
            r#"{"op": "reset", "seed": 1, "task": {"id": "find-code"}}"#,
        );
        assert!(reply["observation"].is_array(), "{reply}");
        let reply = send(&mut w, r#"{"op": "step"}"#);
        assert!(reply["error"].is_string());
        let reply = send(&mut w, r#"{"op": "step", "action": "ls /"}"#);
        assert!(reply["error"].is_string());
        assert_eq!(
            w.handle(br#"{"op": "close"}"#),
            Reply::Close(json!({"ok": true}))
        );
    }

    #[test]
    fn task_forms_and_the_files_option() {
        let mut w = World::new(Some(6));
        for task in [
            r#""find-code""#,
            "null",
            r#"{"id": "find-code"}"#,
            r#"{"id": "find-code", "files": 3}"#,
        ] {
            let line = format!(r#"{{"op": "reset", "seed": 2, "task": {task}}}"#);
            assert!(send(&mut w, &line)["tools"].is_array(), "{task}");
        }
        // The last reset asked for 3 files, overriding --files 6.
        let files = w.episode.as_ref().map(|e| e.vault().files.len());
        assert_eq!(files, Some(3));
        send(&mut w, r#"{"op": "reset", "seed": 2}"#);
        let files = w.episode.as_ref().map(|e| e.vault().files.len());
        assert_eq!(files, Some(6));
    }
}
