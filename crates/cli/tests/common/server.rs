//! A `whet serve` child for the end-to-end tests, and a minimal HTTP/1.1 client to talk to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const MODEL: &str = "tiny/llama";

/// A `whet serve` child, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `host:port` to connect to.
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(home: &std::path::Path, extra: &[&str]) -> Server {
    let model = format!("{MODEL}={}", super::fixture("tiny-llama").display());
    serve_models(home, &["--model", &model], extra)
}

/// `whet serve` with these `--model` flags (none: the home's published models).
pub fn serve_models(home: &std::path::Path, models: &[&str], extra: &[&str]) -> Server {
    let listen = if extra.contains(&"--listen") {
        vec![]
    } else {
        vec!["--listen", "127.0.0.1:0"]
    };
    let mut args = vec!["serve"];
    args.extend(listen);
    args.extend([
        "--json",
        "--poll-hold-secs",
        "2",
        "--home",
        home.to_str().unwrap(),
    ]);
    args.extend_from_slice(models);
    args.extend_from_slice(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("whet serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: Value = serde_json::from_str(&line).expect("whet serve prints its url");
    // A server on every interface is reached through loopback.
    let addr = ready["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .replace("0.0.0.0", "127.0.0.1");
    Server { child, addr }
}

/// One HTTP/1.1 request; returns the status and the body as JSON (`Value::Null` if not JSON).
pub fn http(s: &Server, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(&s.addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        s.addr,
        body.len()
    );
    if let Some(k) = key {
        head.push_str(&format!("X-API-Key: {k}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

pub fn post(s: &Server, path: &str, key: &str, body: Value) -> (u16, Value) {
    http(s, "POST", path, Some(key), body.to_string().as_bytes())
}

/// Polls a future until it resolves.
pub fn result(s: &Server, key: &str, submitted: &Value) -> Value {
    let id = submitted["request_id"]
        .as_str()
        .unwrap_or_else(|| panic!("not a future: {submitted}"));
    let start = Instant::now();
    loop {
        let (status, v) = post(s, "/api/v1/retrieve_future", key, json!({"request_id": id}));
        assert_eq!(status, 200, "{v}");
        if v["type"] != "try_again" {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "future {id} never resolved"
        );
    }
}

pub fn session(s: &Server, key: &str) -> String {
    let (status, v) = post(s, "/api/v1/create_session", key, json!({"tags": []}));
    assert_eq!(status, 200, "{v}");
    v["session_id"].as_str().unwrap().to_string()
}

/// A LoRA training client; returns its model id.
pub fn create_model(s: &Server, key: &str, session: &str, n: u32) -> String {
    let (status, v) = post(
        s,
        "/api/v1/create_model",
        key,
        json!({"session_id": session, "model_seq_id": n, "base_model": MODEL,
               "lora_config": {"rank": 4, "train_unembed": true}}),
    );
    assert_eq!(status, 200, "{v}");
    let r = result(s, key, &v);
    assert!(r["error"].is_null(), "{r}");
    r["model_id"].as_str().unwrap().to_string()
}

pub fn optim(s: &Server, key: &str, model: &str, seq: i64, lr: f64) -> (u16, Value) {
    post(
        s,
        "/api/v1/optim_step",
        key,
        json!({"model_id": model, "seq_id": seq, "adam_params": {"learning_rate": lr}}),
    )
}

pub fn save_state(s: &Server, key: &str, model: &str, seq: i64, name: &str) -> String {
    let (status, v) = post(
        s,
        "/api/v1/save_weights",
        key,
        json!({"model_id": model, "seq_id": seq, "path": name}),
    );
    assert_eq!(status, 200, "{v}");
    let r = result(s, key, &v);
    r["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}
