//! Worlds: multi-turn, tool-using environments run as child processes speaking the JSON-lines
//! protocol of `datasets/worlds/README.md` (`reset` → observation and tools; `step` with the
//! policy's assistant message → observation, reward signals, done). A world that crashes, hangs
//! or prints garbage ends its episode with `error`; it never hangs or crashes the job.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::RlError;

/// `world.yaml`, schema 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The file's schema version: 1.
    pub schema: u32,
    /// `^[a-z0-9][a-z0-9-]*$`.
    pub name: String,
    /// Semver.
    pub version: String,
    /// What the world is.
    #[serde(default)]
    pub description: String,
    /// The command that starts the world: an argv list, or one string run by `sh -c`.
    /// A relative program path is taken from the manifest's directory.
    pub entrypoint: Entrypoint,
    /// Appended to the entrypoint.
    #[serde(default)]
    pub args: Vec<String>,
    /// What `reset` receives as `task`; cycled over episodes.
    #[serde(default = "default_tasks")]
    pub tasks: Vec<Value>,
    /// Seeds; one episode per (task, seed).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Held-out seeds: a live-RL job evaluates on one greedy episode per (task, eval seed),
    /// before training, on its eval interval and at the end. None: no world eval.
    #[serde(default)]
    pub eval_seeds: Vec<u64>,
    /// Rollout limits.
    #[serde(default)]
    pub limits: Limits,
    /// How signals become rewards.
    #[serde(default)]
    pub reward_policy: RewardPolicy,
    /// Where the manifest was read from (set by [`Manifest::from_file`]).
    #[serde(skip)]
    pub dir: PathBuf,
}

fn default_tasks() -> Vec<Value> {
    vec![Value::Null]
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// A world's command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Entrypoint {
    /// Program and arguments.
    Argv(Vec<String>),
    /// A shell command line.
    Shell(String),
}

/// `limits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Assistant turns per episode.
    pub max_turns: usize,
    /// Sampled tokens per turn.
    pub max_tokens_per_turn: usize,
    /// Seconds the world may take to answer one request.
    pub timeout_sec: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_turns: 8,
            max_tokens_per_turn: 128,
            timeout_sec: 30.0,
        }
    }
}

/// `reward_policy`: turn reward = Σ `components[source]` over the turn's signals (a source not
/// listed counts its own value); at the end, `terminal[termination_reason]` is added.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardPolicy {
    /// Value per signal source.
    pub components: BTreeMap<String, f64>,
    /// Value per termination reason.
    pub terminal: BTreeMap<String, f64>,
}

impl Manifest {
    /// Reads and checks a `world.yaml`.
    pub fn from_file(path: &Path) -> Result<Self, RlError> {
        let bad = |m: String| RlError::Config(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut m: Self = serde_saphyr::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if m.schema != 1 {
            return Err(bad(format!(
                "schema: {} is not supported (expected 1)",
                m.schema
            )));
        }
        let name_ok = m
            .name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && m.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(bad(format!(
                "name {:?}: lowercase letters, digits and '-'",
                m.name
            )));
        }
        if m.tasks.is_empty() || m.seeds.is_empty() {
            return Err(bad("tasks and seeds must not be empty".into()));
        }
        if m.limits.max_turns == 0
            || m.limits.max_tokens_per_turn == 0
            || m.limits.timeout_sec <= 0.0
        {
            return Err(bad(
                "limits: max_turns, max_tokens_per_turn and timeout_sec must be positive".into(),
            ));
        }
        // Absolute: the world runs in this directory, and a relative program is taken from it
        // (not from the directory the world is started in).
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        m.dir = dir.canonicalize().map_err(|e| bad(e.to_string()))?;
        Ok(m)
    }

    /// The (task, seed) of episode `i`: seeds vary fastest.
    pub fn episode(&self, i: usize) -> (Value, u64) {
        let seed = self.seeds[i % self.seeds.len()];
        let task = self.tasks[(i / self.seeds.len()) % self.tasks.len()].clone();
        (task, seed)
    }

    /// The (task, seed) pairs of the world eval: every task with every eval seed.
    pub fn eval_episodes(&self) -> Vec<(Value, u64)> {
        self.tasks
            .iter()
            .flat_map(|t| self.eval_seeds.iter().map(move |&s| (t.clone(), s)))
            .collect()
    }

    /// The reward of a turn's signals.
    pub fn turn_reward(&self, signals: &[Signal]) -> f64 {
        signals
            .iter()
            .map(|s| {
                self.reward_policy
                    .components
                    .get(&s.source)
                    .copied()
                    .unwrap_or(s.value)
            })
            .sum()
    }

    /// The terminal reward of a termination reason.
    pub fn terminal_reward(&self, reason: &str) -> f64 {
        self.reward_policy
            .terminal
            .get(reason)
            .copied()
            .unwrap_or(0.0)
    }

    fn command(&self) -> Command {
        let mut cmd = match &self.entrypoint {
            Entrypoint::Shell(line) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(line);
                c
            }
            Entrypoint::Argv(argv) => {
                let program = argv.first().cloned().unwrap_or_default();
                // A relative path with a separator is the manifest's; a bare name is looked
                // up on PATH.
                let program = if program.contains('/') && Path::new(&program).is_relative() {
                    self.dir.join(&program).display().to_string()
                } else {
                    program
                };
                let mut c = Command::new(program);
                c.args(argv.iter().skip(1));
                c
            }
        };
        cmd.args(&self.args).current_dir(&self.dir);
        cmd
    }
}

/// A reward signal of a turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// Its component's name.
    pub source: String,
    /// The world's own value for it.
    #[serde(default)]
    pub value: f64,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A running world process.
pub struct World {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    timeout: Duration,
}

impl World {
    /// Starts the world of `manifest`.
    pub fn start(manifest: &Manifest) -> Result<Self, String> {
        let mut cmd = manifest.command();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {:?}: {e}", manifest.entrypoint))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr_pipe = child.stderr.take().ok_or("no stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The last lines of stderr, for the log when the world misbehaves.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let keep = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut v) = keep.lock() {
                    v.push(line);
                    let n = v.len();
                    if n > 20 {
                        v.drain(..n - 20);
                    }
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
            stderr,
            timeout: Duration::from_secs_f64(manifest.limits.timeout_sec),
        })
    }

    fn stderr_tail(&self) -> String {
        self.stderr.lock().map(|v| v.join("\n")).unwrap_or_default()
    }

    /// One request, one response (within the timeout); an `{"error"}` answer is an error.
    pub fn request(&mut self, request: &Value) -> Result<Value, String> {
        let line = format!("{request}\n");
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|_| self.stdin.flush())
            .map_err(|e| {
                format!(
                    "the world stopped reading ({e}); stderr: {}",
                    self.stderr_tail()
                )
            })?;
        let answer = self.lines.recv_timeout(self.timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => format!("no answer within {:?}", self.timeout),
            mpsc::RecvTimeoutError::Disconnected => {
                format!("the world exited; stderr: {}", self.stderr_tail())
            }
        })?;
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| format!("not a JSON answer ({e}): {:.200}", answer))?;
        if let Some(e) = v.get("error") {
            return Err(format!("the world refused: {e}"));
        }
        Ok(v)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "close"}));
        crate::recipes::command::kill(&mut self.child);
    }
}

/// Splits a completion into its text and its tool calls: `<tool_call>{…}</tool_call>` blocks
/// (Hermes / Qwen), or a completion that is a single JSON object with `name` and `arguments`
/// (or `parameters`, Llama 3.1's). Calls get ids `call_<turn>_<k>`.
pub fn parse_tool_calls(completion: &str, turn: usize) -> (String, Vec<Value>) {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = completion;
    while let Some(start) = rest.find("<tool_call>") {
        content.push_str(&rest[..start]);
        let after = &rest[start + "<tool_call>".len()..];
        let (body, next) = match after.find("</tool_call>") {
            Some(end) => (&after[..end], &after[end + "</tool_call>".len()..]),
            None => (after, ""),
        };
        if let Some(call) = call_of(body.trim()) {
            calls.push(call);
        }
        rest = next;
    }
    content.push_str(rest);
    if calls.is_empty() {
        if let Some(call) = call_of(completion.trim().trim_start_matches("<|python_tag|>")) {
            calls.push(call);
            content.clear();
        }
    }
    for (k, c) in calls.iter_mut().enumerate() {
        c["id"] = json!(format!("call_{turn}_{k}"));
    }
    (content.trim().to_string(), calls)
}

fn call_of(text: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(text).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or(json!({}));
    let args = match args {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(json!({})),
        other => other,
    };
    Some(json!({"type": "function", "function": {"name": name, "arguments": args}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_are_parsed_in_the_common_formats() {
        let (c, calls) = parse_tool_calls(
            "Let me look.\n<tool_call>\n{\"name\": \"ls\", \"arguments\": {\"path\": \"/\"}}\n</tool_call>",
            1,
        );
        assert_eq!(c, "Let me look.");
        assert_eq!(calls[0]["function"]["name"], "ls");
        assert_eq!(calls[0]["function"]["arguments"]["path"], "/");
        assert_eq!(calls[0]["id"], "call_1_0");
        let (_, calls) =
            parse_tool_calls("{\"name\": \"cat\", \"parameters\": {\"path\": \"a\"}}", 2);
        assert_eq!(calls[0]["function"]["arguments"]["path"], "a");
        let (c, calls) = parse_tool_calls("just text", 3);
        assert!(calls.is_empty());
        assert_eq!(c, "just text");
    }

    #[test]
    fn rewards_follow_the_policy() {
        let m = Manifest {
            schema: 1,
            name: "w".into(),
            version: "1.0.0".into(),
            description: String::new(),
            entrypoint: Entrypoint::Shell("true".into()),
            args: vec![],
            tasks: vec![json!({"id": "a"}), json!({"id": "b"})],
            seeds: vec![1, 2],
            eval_seeds: vec![],
            limits: Limits::default(),
            reward_policy: RewardPolicy {
                components: BTreeMap::from([("tool_observation".into(), 0.02)]),
                terminal: BTreeMap::from([("finished".into(), 1.0)]),
            },
            dir: PathBuf::from("."),
        };
        let s = |source: &str, value: f64| Signal {
            source: source.into(),
            value,
            reason: None,
        };
        assert!(
            (m.turn_reward(&[s("tool_observation", 5.0), s("other", -0.5)]) + 0.48).abs() < 1e-12
        );
        assert_eq!(m.terminal_reward("finished"), 1.0);
        assert_eq!(m.terminal_reward("unknown"), 0.0);
        assert_eq!(m.episode(3), (json!({"id": "b"}), 2));
    }

    #[test]
    fn a_world_that_hangs_or_lies_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |line: &str| {
            let mut m = Manifest::from_file(&{
                let p = dir.path().join("world.yaml");
                std::fs::write(
                    &p,
                    format!("schema: 1\nname: w\nversion: 1.0.0\nentrypoint: {line:?}\nlimits: {{timeout_sec: 0.5}}\n"),
                )
                .unwrap();
                p
            })
            .unwrap();
            m.limits.timeout_sec = 0.5;
            World::start(&m).unwrap()
        };
        let started = std::time::Instant::now();
        let e = mk("sleep 30").request(&json!({"op": "reset"})).unwrap_err();
        assert!(e.contains("no answer"), "{e}");
        let e = mk("echo garbage; sleep 30")
            .request(&json!({"op": "reset"}))
            .unwrap_err();
        assert!(e.contains("not a JSON answer"), "{e}");
        let e = mk("echo oops >&2; exit 3")
            .request(&json!({"op": "reset"}))
            .unwrap_err();
        assert!(e.contains("exited") || e.contains("stopped reading"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
