//! `command_v1`: any program (any language) scores a rollout. It reads
//! `{"prompt": ..., "completion": ..., "row": ...}` as one JSON document on stdin and prints
//! `{"reward": x, "metrics": {...}}` on stdout. A crash, a hang past the timeout (the program and
//! its process group are killed), or output that is not that JSON fails the rollout, quoting
//! stderr's tail; nothing here blocks past the timeout or panics.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Params, Recipe, RewardError, RewardInput, Score};

pub(super) const COMMAND_PARAMS: [&str; 4] = ["command", "timeout_sec", "cwd", "env"];
/// More stdout than this is not a score; reading goes on (so the program never blocks) but
/// the rest is dropped.
const STDOUT_CAP: usize = 1 << 20;
/// How much of stderr errors quote.
const STDERR_TAIL: usize = 2000;

pub(super) struct CommandRecipe {
    argv: Vec<String>,
    timeout: Duration,
    cwd: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl CommandRecipe {
    pub(super) fn new(p: &Params<'_>) -> Result<Self, RewardError> {
        let argv = match p.get("command") {
            None => return Err(p.bad("command", "is required")),
            Some(Value::String(s)) if !s.trim().is_empty() => {
                vec!["sh".to_string(), "-c".to_string(), s.clone()]
            }
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .filter(|argv| !argv[0].is_empty())
                .ok_or_else(|| p.bad("command", "must be an array of strings (an argv)"))?,
            Some(_) => {
                return Err(p.bad("command", "must be a shell command string or an argv array"))
            }
        };
        let secs = p.number("timeout_sec", 30.0)?;
        let timeout = Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| p.bad("timeout_sec", "must be a positive number of seconds"))?;
        let cwd = match p.get("cwd") {
            None => None,
            Some(Value::String(d)) if Path::new(d).is_dir() => Some(PathBuf::from(d)),
            Some(Value::String(d)) => {
                return Err(p.bad("cwd", &format!("`{d}` is not a directory")))
            }
            Some(_) => return Err(p.bad("cwd", "must be a string")),
        };
        let mut env = Vec::new();
        match p.get("env") {
            None => {}
            Some(Value::Object(vars)) => {
                for (k, v) in vars {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(_) | Value::Bool(_) => v.to_string(),
                        _ => return Err(p.bad(&format!("env.{k}"), "must be a string")),
                    };
                    env.push((k.clone(), v));
                }
            }
            Some(_) => return Err(p.bad("env", "must be an object of strings")),
        }
        let recipe = CommandRecipe {
            argv,
            timeout,
            cwd,
            env,
        };
        if !recipe.program_exists() {
            let msg = format!("names a program `{}` that is not found", recipe.argv[0]);
            return Err(p.bad("command", &msg));
        }
        Ok(recipe)
    }

    /// Whether the program would be found, so a typo fails the job before any compute.
    fn program_exists(&self) -> bool {
        let program = Path::new(&self.argv[0]);
        if self.argv[0].contains('/') {
            return match &self.cwd {
                Some(cwd) if program.is_relative() => cwd.join(program).is_file(),
                _ => program.is_file(),
            };
        }
        let path = match self.env.iter().rev().find(|(k, _)| k == "PATH") {
            Some((_, p)) => Some(p.into()),
            None => std::env::var_os("PATH"),
        };
        path.is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
    }

    /// The command as errors show it.
    fn shown(&self) -> String {
        let s = match self.argv.as_slice() {
            [sh, c, cmd] if sh == "sh" && c == "-c" => cmd.clone(),
            argv => argv.join(" "),
        };
        match s.char_indices().nth(80) {
            Some((at, _)) => format!("{}…", &s[..at]),
            None => s,
        }
    }
}

impl Recipe for CommandRecipe {
    fn name(&self) -> &str {
        "command_v1"
    }

    fn score(&self, input: &RewardInput<'_>) -> Result<Score, RewardError> {
        let doc = json!({"prompt": input.prompt, "completion": input.completion, "row": input.row});
        let doc = doc.to_string().into_bytes();
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        // Its own process group, so a timeout kills whatever the program started too.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let fail = |what: String| RewardError::Failed(format!("command `{}` {what}", self.shown()));
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("could not start: {e}")))?;
        // Stdin is written and the outputs read on their own threads: a program that writes
        // before it reads, or never reads, must not deadlock against us on full pipes. The
        // writer ends by itself once the pipe closes (a program that never reads gets EPIPE).
        if let Some(mut stdin) = child.stdin.take() {
            thread::spawn(move || {
                let _ = stdin.write_all(&doc);
            });
        }
        let stdout = child.stdout.take().map(|s| read_capped(s, false));
        let stderr = child.stderr.take().map(|s| read_capped(s, true));
        let done = |h: &Option<JoinHandle<Vec<u8>>>| h.as_ref().is_none_or(JoinHandle::is_finished);
        let deadline = Instant::now() + self.timeout;
        let (mut status, mut pause) = (None, Duration::from_millis(1));
        loop {
            if status.is_none() {
                match child.try_wait() {
                    Ok(s) => status = s,
                    Err(e) => {
                        kill(&mut child);
                        return Err(fail(format!("could not be waited on: {e}")));
                    }
                }
            }
            if status.is_some() && done(&stdout) && done(&stderr) {
                break;
            }
            if Instant::now() >= deadline {
                kill(&mut child);
                let what = match status {
                    None => format!("timed out after {:?}", self.timeout),
                    Some(_) => format!("left processes holding its output past {:?}", self.timeout),
                };
                return Err(fail(format!("{what}{}", stderr_tail(stderr, true))));
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        let out = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
        let err = stderr_tail(stderr, false);
        match status {
            Some(s) if s.success() => {}
            Some(s) => return Err(fail(format!("failed ({s}){err}"))),
            None => return Err(fail(format!("was not waited on{err}"))),
        }
        parse_output(&out).map_err(|what| fail(format!("{what}{err}")))
    }
}

/// Reads a pipe to its end on a thread: stdout's first [`STDOUT_CAP`] bytes, or stderr's last
/// [`STDERR_TAIL`] ones.
fn read_capped(mut pipe: impl Read + Send + 'static, tail: bool) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let (mut kept, mut chunk) = (Vec::new(), [0u8; 8192]);
        loop {
            let n = match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if tail {
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > 2 * STDERR_TAIL {
                    kept.drain(..kept.len() - STDERR_TAIL);
                }
            } else if kept.len() <= STDOUT_CAP {
                // One byte past the cap marks it as over.
                kept.extend_from_slice(&chunk[..n.min(STDOUT_CAP + 1 - kept.len())]);
            }
        }
        kept
    })
}

/// `; stderr: ...` from the stderr reader, waiting for it a moment when the program was killed.
fn stderr_tail(reader: Option<JoinHandle<Vec<u8>>>, killed: bool) -> String {
    let Some(reader) = reader else {
        return String::new();
    };
    if killed {
        let until = Instant::now() + Duration::from_secs(1);
        while !reader.is_finished() && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        if !reader.is_finished() {
            // Something outside the process group still holds stderr: don't wait on it.
            return String::new();
        }
    }
    let bytes = reader.join().unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(STDERR_TAIL)..]);
    match text.trim() {
        "" => "; stderr empty".into(),
        t => format!("; stderr: {t}"),
    }
}

/// Kills the program and its process group, and reaps it.
pub(crate) fn kill(child: &mut Child) {
    #[cfg(unix)]
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours. The group is the
        // one the child leads (process_group(0)); its id is not reused while members live.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `{"reward": x, "metrics": {...}}` from a program's stdout; as a courtesy to programs that
/// print while they work, the last non-empty line is tried when the whole output is not JSON.
fn parse_output(out: &[u8]) -> Result<Score, String> {
    if out.len() > STDOUT_CAP {
        return Err(format!("printed more than {STDOUT_CAP} bytes"));
    }
    let text = String::from_utf8_lossy(out);
    let last_line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let doc: Value = match serde_json::from_str(&text).or_else(|_| serde_json::from_str(last_line))
    {
        Ok(doc) => doc,
        Err(_) => {
            let start = text.char_indices().rev().nth(199).map_or(0, |(i, _)| i);
            return Err(format!(
                "printed no {{\"reward\": <number>}} JSON; stdout ends: {:?}",
                &text[start..]
            ));
        }
    };
    let reward = match doc.get("reward").map(|r| r.as_f64()) {
        Some(Some(r)) if r.is_finite() => r,
        Some(_) => {
            return Err(format!(
                "printed a reward that is not a finite number: {doc}"
            ))
        }
        None => return Err(format!("printed JSON without `reward`: {doc}")),
    };
    let mut score = Score::new(reward);
    match doc.get("metrics") {
        None | Some(Value::Null) => {}
        Some(Value::Object(metrics)) => {
            for (k, v) in metrics {
                match v.as_f64().filter(|x| x.is_finite()) {
                    Some(x) => score.metrics.insert(k.clone(), x),
                    None => return Err(format!("printed metric `{k}` that is not a number: {v}")),
                };
            }
        }
        Some(m) => return Err(format!("printed `metrics` that is not an object: {m}")),
    }
    Ok(score)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::{json, Value};

    use crate::recipes::{recipe, RewardError, RewardInput, Score};

    fn run(params: Value, completion: &str) -> Result<Score, RewardError> {
        let r = recipe("command_v1", &params).expect("recipe");
        let row = json!({"id": 7, "question": "q"});
        r.score(&RewardInput {
            prompt: "p",
            completion,
            row: &row,
        })
    }

    fn sh(script: &str) -> Value {
        json!({"command": script, "timeout_sec": 10})
    }

    fn failed(r: Result<Score, RewardError>) -> String {
        match r {
            Err(RewardError::Failed(m)) => m,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    fn config_err(params: Value) -> String {
        match recipe("command_v1", &params) {
            Err(RewardError::Config(m)) => m,
            Err(e) => panic!("expected a config error, got {e}"),
            Ok(_) => panic!("expected a config error for {params}"),
        }
    }

    #[test]
    fn good_script_and_its_metrics() {
        let s = run(
            sh(r#"cat >/dev/null; printf '{"reward": 0.5, "metrics": {"x": 1}}'"#),
            "hi",
        );
        let s = s.unwrap();
        assert_eq!((s.reward, s.metrics.get("x")), (0.5, Some(&1.0)));
        // Chatter before the JSON line is tolerated.
        let s = run(sh(r#"echo working; echo; printf '{"reward": -1}\n'"#), "hi").unwrap();
        assert_eq!((s.reward, s.metrics.len()), (-1.0, 0));
    }

    #[test]
    fn the_program_gets_prompt_completion_and_row() {
        let script = r#"in=$(cat); case "$in" in
            *'"prompt":"p"'*'"completion":"hello world"'*'"row":{"id":7'*) printf '{"reward": 1}';;
            *) echo "bad input: $in" >&2; exit 1;; esac"#;
        assert_eq!(run(sh(script), "hello world").unwrap().reward, 1.0);
        assert!(failed(run(sh(script), "bye")).contains("bad input"));
        let grep = sh(r#"grep -q hello && printf '{"reward": 1}' || printf '{"reward": 0}'"#);
        assert_eq!(run(grep.clone(), "say hello").unwrap().reward, 1.0);
        assert_eq!(run(grep, "say bye").unwrap().reward, 0.0);
    }

    #[test]
    fn argv_cwd_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let script = r#"test "$FOO" = bar && test -f marker && printf '{"reward": 2}'"#;
        fs::write(dir.path().join("score.sh"), script).unwrap();
        fs::write(dir.path().join("marker"), "").unwrap();
        let cwd = dir.path().to_str().unwrap();
        let p = json!({"command": ["sh", "score.sh"], "cwd": cwd, "env": {"FOO": "bar"}});
        assert_eq!(run(p, "x").unwrap().reward, 2.0);
        let p = json!({"command": ["sh", "score.sh"], "cwd": cwd, "env": {"FOO": "baz"}});
        assert!(failed(run(p, "x")).contains("exit status: 1"));
    }

    #[test]
    fn crash_names_status_and_stderr() {
        let m = failed(run(sh("echo something broke >&2; exit 3"), "x"));
        assert!(
            m.contains("exit status: 3") && m.contains("something broke"),
            "{m}"
        );
    }

    #[test]
    fn hang_is_killed_with_its_children() {
        for script in ["sleep 30", "sleep 30 | cat", "sh -c 'sleep 30'; echo"] {
            let start = std::time::Instant::now();
            let m = failed(run(json!({"command": script, "timeout_sec": 0.5}), "x"));
            assert!(m.contains("timed out"), "{m}");
            assert!(
                start.elapsed().as_secs_f64() < 5.0,
                "{script}: {:?}",
                start.elapsed()
            );
        }
        // Exits, but a background child keeps stdout open.
        let start = std::time::Instant::now();
        let p = json!({"command": r#"sleep 30 & printf '{"reward": 1}'"#, "timeout_sec": 0.5});
        assert!(failed(run(p, "x")).contains("holding its output"));
        assert!(start.elapsed().as_secs_f64() < 5.0);
    }

    #[test]
    fn bad_output_fails() {
        let m = failed(run(sh("echo not json; echo oops >&2"), "x"));
        assert!(m.contains("not json") && m.contains("oops"), "{m}");
        assert!(failed(run(sh(r#"printf '{"reward": "high"}'"#), "x")).contains("finite"));
        assert!(failed(run(sh(r#"printf '{"score": 1}'"#), "x")).contains("without `reward`"));
        assert!(failed(run(sh(r#"printf '{"reward": 1e999}'"#), "x")).contains("reward"));
        let m = failed(run(
            sh(r#"printf '{"reward": 1, "metrics": {"a": "b"}}'"#),
            "x",
        ));
        assert!(m.contains("metric `a`"), "{m}");
        assert!(failed(run(sh("head -c 3000000 /dev/zero"), "x")).contains("more than"));
    }

    #[test]
    fn large_input_does_not_deadlock() {
        let big = "y".repeat(4 << 20);
        // Never reads stdin.
        assert_eq!(
            run(sh(r#"printf '{"reward": 1}'"#), &big).unwrap().reward,
            1.0
        );
        // Writes a lot before reading.
        let script = r#"head -c 500000 /dev/zero >&2; n=$(wc -c); printf '{"reward": %s}' "$n""#;
        assert!(run(sh(script), &big).unwrap().reward > (4 << 20) as f64);
    }

    #[test]
    fn params_are_checked() {
        assert!(config_err(json!({})).contains("`command` is required"));
        assert!(config_err(json!({"command": ""})).contains("`command`"));
        assert!(config_err(json!({"command": 3})).contains("`command`"));
        assert!(config_err(json!({"command": []})).contains("`command`"));
        assert!(config_err(json!({"command": ["sh", 1]})).contains("`command`"));
        let m = config_err(json!({"command": ["no-such-program-whet-test"]}));
        assert!(m.contains("not found"), "{m}");
        for t in [json!(0), json!(-1), json!("5"), json!(1e300)] {
            let m = config_err(json!({"command": "true", "timeout_sec": t}));
            assert!(m.contains("`timeout_sec`"), "{m}");
        }
        let m = config_err(json!({"command": "true", "cwd": "/no/such/dir/whet"}));
        assert!(m.contains("`cwd`"), "{m}");
        assert!(config_err(json!({"command": "true", "env": ["A"]})).contains("`env`"));
        let m = config_err(json!({"command": "true", "env": {"A": [1]}}));
        assert!(m.contains("`env.A`"), "{m}");
        let m = config_err(json!({"command": "true", "timeout": 3}));
        assert!(m.contains("`timeout`") && m.contains("timeout_sec"), "{m}");
    }
}
