//! `whet serve` at the HTTP level, on the tiny fixture model: the statuses and messages of bad
//! input, keys and ownership, `seq_id` ordering (out of order, refused, retried), expiry of
//! abandoned sessions (their state saved first), and `whet checkpoints import/list/export`
//! feeding `create_training_client_from_state`. The official SDK's full flow, with numbers
//! checked against the engine, is in tests/tinker_sdk.rs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const MODEL: &str = "tiny/llama";

/// A `whet serve` child, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(home: &std::path::Path, extra: &[&str]) -> Server {
    let model = format!("{MODEL}={}", common::fixture("tiny-llama").display());
    serve_models(home, &["--model", &model], extra)
}

/// `whet serve` with these `--model` flags (none: the home's published models).
fn serve_models(home: &std::path::Path, models: &[&str], extra: &[&str]) -> Server {
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
fn http(s: &Server, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, Value) {
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

fn post(s: &Server, path: &str, key: &str, body: Value) -> (u16, Value) {
    http(s, "POST", path, Some(key), body.to_string().as_bytes())
}

/// Polls a future until it resolves.
fn result(s: &Server, key: &str, submitted: &Value) -> Value {
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

fn session(s: &Server, key: &str) -> String {
    let (status, v) = post(s, "/api/v1/create_session", key, json!({"tags": []}));
    assert_eq!(status, 200, "{v}");
    v["session_id"].as_str().unwrap().to_string()
}

/// A LoRA training client; returns its model id.
fn create_model(s: &Server, key: &str, session: &str, n: u32) -> String {
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

fn optim(s: &Server, key: &str, model: &str, seq: i64, lr: f64) -> (u16, Value) {
    post(
        s,
        "/api/v1/optim_step",
        key,
        json!({"model_id": model, "seq_id": seq, "adam_params": {"learning_rate": lr}}),
    )
}

fn save_state(s: &Server, key: &str, model: &str, seq: i64, name: &str) -> String {
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

#[test]
fn bad_input_keys_ownership_and_seq_order() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &[]);
    let (a, b) = ("tml-alice", "tml-bob");

    // No key, or not a Tinker-style key: 401 with a message.
    let (status, v) = http(&s, "POST", "/api/v1/create_session", None, b"{}");
    assert_eq!(status, 401);
    assert!(v["error"].as_str().unwrap().contains("X-API-Key"), "{v}");
    assert_eq!(
        post(&s, "/api/v1/create_session", "sk-123", json!({})).0,
        401
    );

    let sa = session(&s, a);
    // An unknown model: 400 naming the field and the served models.
    let (status, v) = post(
        &s,
        "/api/v1/create_model",
        a,
        json!({"session_id": sa, "model_seq_id": 0, "base_model": "no/such"}),
    );
    assert_eq!(status, 400);
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("base_model") && msg.contains(MODEL), "{msg}");
    assert_eq!(v["category"], "user");

    let model = create_model(&s, a, &sa, 0);
    let (status, info) = post(&s, "/api/v1/get_info", a, json!({"model_id": model}));
    assert_eq!(status, 200);
    assert_eq!(info["model_data"]["model_name"], MODEL);
    assert_eq!(info["lora_rank"], 4);

    // A body that is not a ForwardBackwardRequest: 400, and the server goes on.
    let (status, v) = http(
        &s,
        "POST",
        "/api/v1/forward_backward",
        Some(a),
        b"\xff\x00junk",
    );
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("ForwardBackwardRequest"),
        "{v}"
    );

    // seq 2 arrives before seq 1: it waits (try_again), then both run in order.
    let (status, second) = optim(&s, a, &model, 2, 1e-3);
    assert_eq!(status, 200);
    let (_, pending) = post(
        &s,
        "/api/v1/retrieve_future",
        a,
        json!({"request_id": second["request_id"]}),
    );
    assert_eq!(pending["type"], "try_again", "{pending}");
    let (_, first) = optim(&s, a, &model, 1, 1e-3);
    assert!(result(&s, a, &first)["metrics"].is_object());
    assert!(result(&s, a, &second)["metrics"].is_object());
    // A retry of seq 2 is the same future (the step is not applied twice).
    let (_, again) = optim(&s, a, &model, 2, 1e-3);
    assert_eq!(again["request_id"], second["request_id"]);
    // A refused request uses up its seq id: seq 4 does not wait for it.
    let (status, v) = optim(&s, a, &model, 3, -1.0);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("learning_rate"),
        "{v}"
    );
    let path = save_state(&s, a, &model, 4, "s1");
    assert_eq!(path, format!("tinker://{model}/weights/s1"));

    // Another key: the run and the checkpoint are not theirs.
    let sb = session(&s, b);
    assert_eq!(
        post(&s, "/api/v1/get_info", b, json!({"model_id": model})).0,
        404
    );
    let (status, v) = post(&s, "/api/v1/weights_info", b, json!({"tinker_path": path}));
    assert_eq!(status, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("another API key"));
    let (status, _) = post(
        &s,
        "/api/v1/load_weights",
        b,
        json!({"session_id": sb, "model_seq_id": 0, "path": path, "optimizer": true}),
    );
    assert_eq!(status, 403);
    let rest = format!("/api/v1/training_runs/{model}/checkpoints/weights/s1");
    assert_eq!(http(&s, "DELETE", &rest, Some(b), b"").0, 403);
    let (_, listed) = http(&s, "GET", "/api/v1/checkpoints", Some(b), b"");
    assert_eq!(listed["checkpoints"].as_array().unwrap().len(), 0);

    // A missing checkpoint: 404 naming it.
    let missing = format!("tinker://{model}/weights/nope");
    let (status, v) = post(
        &s,
        "/api/v1/load_weights",
        a,
        json!({"session_id": sa, "model_seq_id": 1, "path": missing, "optimizer": true}),
    );
    assert_eq!(status, 404);
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");

    // The owner continues from its state, then deletes it.
    let (status, v) = post(
        &s,
        "/api/v1/load_weights",
        a,
        json!({"session_id": sa, "model_seq_id": 1, "path": path, "optimizer": true}),
    );
    assert_eq!(status, 200, "{v}");
    let loaded = result(&s, a, &v);
    assert_eq!(loaded["model_id"], format!("{sa}:train:1"));
    let (_, w) = post(&s, "/api/v1/weights_info", a, json!({"tinker_path": path}));
    assert_eq!(
        (w["lora_rank"].as_u64(), w["train_unembed"].as_bool()),
        (Some(4), Some(false))
    );
    assert_eq!(http(&s, "DELETE", &rest, Some(a), b"").0, 200);
    assert_eq!(
        post(&s, "/api/v1/weights_info", a, json!({"tinker_path": path})).0,
        404
    );
    let (status, v) = http(&s, "GET", "/api/v1/no_such_thing", Some(a), b"");
    assert_eq!(status, 404);
    assert!(v["error"].is_string());
}

#[test]
fn an_abandoned_session_expires_and_its_state_is_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(tmp.path(), &["--session-timeout-secs", "1"]);
    let key = "tml-gone";
    let sid = session(&s, key);
    let model = create_model(&s, key, &sid, 0);
    let (_, step) = optim(&s, key, &model, 1, 1e-3);
    result(&s, key, &step);
    // No heartbeats: the session ends, the client goes, its state stays.
    let start = Instant::now();
    loop {
        let (status, _) = post(
            &s,
            "/api/v1/session_heartbeat",
            key,
            json!({"session_id": sid}),
        );
        if status == 410 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the session never expired"
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert_eq!(optim(&s, key, &model, 2, 1e-3).0, 404);
    let start = Instant::now();
    let saved = loop {
        let (_, v) = http(
            &s,
            "GET",
            &format!("/api/v1/training_runs/{model}/checkpoints"),
            Some(key),
            b"",
        );
        if let Some(c) = v["checkpoints"].as_array().and_then(|c| c.first()) {
            break c.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no autosave: {v}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(saved["checkpoint_type"], "training");
    assert!(saved["checkpoint_id"]
        .as_str()
        .unwrap()
        .starts_with("weights/autosave-"));

    // A run whose last step is saved already is not saved twice.
    let sid = session(&s, key);
    let model = create_model(&s, key, &sid, 0);
    let (_, step) = optim(&s, key, &model, 1, 1e-3);
    result(&s, key, &step);
    save_state(&s, key, &model, 2, "kept");
    let start = Instant::now();
    while post(
        &s,
        "/api/v1/session_heartbeat",
        key,
        json!({"session_id": sid}),
    )
    .0 != 410
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the session never expired"
        );
        // Longer than the timeout: a heartbeat would keep the session alive.
        std::thread::sleep(Duration::from_millis(1500));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (_, v) = http(
        &s,
        "GET",
        &format!("/api/v1/training_runs/{model}/checkpoints"),
        Some(key),
        b"",
    );
    let ids: Vec<&str> = v["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["checkpoint_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["weights/kept"]);
}

#[test]
fn imported_adapters_continue_and_keys_guard_a_public_address() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let home_s = home.to_str().unwrap();
    let model = format!("{MODEL}={}", common::fixture("tiny-llama").display());
    let adapter = common::fixture("tiny-llama/adapter");
    let out = common::ok(&[
        "checkpoints",
        "import",
        "--model",
        &model,
        "--adapter",
        adapter.to_str().unwrap(),
        "--name",
        "peft",
        "--home",
        home_s,
        "--json",
    ]);
    let imported: Value = serde_json::from_str(&out).unwrap();
    let path = imported["tinker_path"].as_str().unwrap().to_string();
    assert!(
        path.starts_with("tinker://import-") && path.ends_with("/weights/peft"),
        "{path}"
    );
    let listed = common::ok(&["checkpoints", "list", "--home", home_s, "--json"]);
    assert!(listed.contains(&path), "{listed}");
    // Exported again as PEFT: the same tensors as the adapter that came in.
    let exported = tmp.path().join("exported");
    common::ok(&[
        "checkpoints",
        "export",
        &path,
        "--out",
        exported.to_str().unwrap(),
        "--home",
        home_s,
    ]);
    let read = |dir: &std::path::Path| {
        let tensors = candle_core::safetensors::load(
            dir.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut t: Vec<(String, Vec<f32>)> = tensors
            .into_iter()
            .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    assert_eq!(read(&adapter), read(&exported));
    // A bad adapter is refused before anything is written.
    let err = common::fails(&[
        "checkpoints",
        "import",
        "--model",
        &model,
        "--adapter",
        "/nonexistent",
        "--home",
        home_s,
    ]);
    assert!(err.contains("nonexistent"), "{err}");

    // Beyond loopback only the home's keys are accepted.
    let err = common::fails(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--model",
        &model,
        "--home",
        home_s,
    ]);
    assert!(err.contains("whet keys create"), "{err}");
    let made: Value = serde_json::from_str(&common::ok(&[
        "keys", "create", "--name", "ci", "--home", home_s, "--json",
    ]))
    .unwrap();
    let key = made["key"].as_str().unwrap();
    let s = serve(&home, &["--listen", "0.0.0.0:0"]);
    assert_eq!(
        post(&s, "/api/v1/create_session", "tml-guess", json!({})).0,
        401
    );
    let sid = session(&s, key);
    // The imported state (the home's own) continues on the server.
    let (status, v) = post(
        &s,
        "/api/v1/load_weights",
        key,
        json!({"session_id": sid, "model_seq_id": 0, "path": path, "optimizer": false}),
    );
    assert_eq!(status, 200, "{v}");
    let r = result(&s, key, &v);
    assert!(r["error"].is_null(), "{r}");
    let (_, info) = post(
        &s,
        "/api/v1/get_info",
        key,
        json!({"model_id": format!("{sid}:train:0")}),
    );
    assert_eq!(info["lora_rank"], imported["lora_rank"]);
}

/// `backend = "tinker"`: the same job file trains on a server instead of in process, and
/// gives the same losses and gradient norms step by step; its final adapter lands in the
/// job's run directory as with the local backend.
#[test]
fn a_job_on_a_tinker_backend_matches_the_local_run() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(&tmp.path().join("server-home"), &[]);
    let dir = common::fixture("tiny-llama");
    let job = |backend: &str| {
        format!(
            "name = \"remote\"\nshape = \"sft\"\nmodel = {:?}\n{backend}[data]\ndataset = {:?}\n\
             format = \"datums\"\n[lora]\nrank = 2\n[optimizer]\nlearning_rate = 0.01\n\
             [schedule]\nepochs = 3\nbatch_size = 3\nshuffle = false\nlr_schedule = \"constant\"\n\
             eval_interval = 0\n",
            dir.display().to_string(),
            dir.join("datums.jsonl").display().to_string(),
        )
    };
    let remote = format!(
        "backend = \"tinker\"\n[tinker]\nbase_url = \"http://{}\"\nbase_model = \"{MODEL}\"\n",
        s.addr
    );
    // TOML: the [tinker] table must come after the top-level keys and before [data].
    let run = |name: &str, text: String| -> Vec<Value> {
        let file = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let home = tmp.path().join(format!("{name}-home"));
        let out = Command::new(env!("CARGO_BIN_EXE_whet"))
            .args([
                "train",
                file.to_str().unwrap(),
                "--home",
                home.to_str().unwrap(),
                "--json",
            ])
            .env("TINKER_API_KEY", "tml-job")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let record: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(record["status"], "completed", "{record}");
        assert_eq!(record["backend"], name, "{record}");
        let adapter = record["artifacts"]["final_adapter"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            std::path::Path::new(&adapter)
                .join("adapter_model.safetensors")
                .is_file(),
            "{name}: the final adapter is not on this machine: {adapter}"
        );
        let id = record["id"].as_str().unwrap();
        common::ok(&[
            "jobs",
            "metrics",
            id,
            "--home",
            home.to_str().unwrap(),
            "--json",
        ])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
    };
    let local = run("local", job(""));
    let tinker = run("tinker", job(&remote));
    assert_eq!(local.len(), 3);
    assert_eq!(local.len(), tinker.len());
    for (l, t) in local.iter().zip(&tinker) {
        for key in ["loss", "grad_norm"] {
            let (a, b) = (l[key].as_f64().unwrap(), t[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{key}: local {l} vs tinker {t}"
            );
        }
    }
    // A job naming a model the server does not serve fails with the served names.
    let bad = job(&remote.replace(MODEL, "other/model"));
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args([
            "train",
            file.to_str().unwrap(),
            "--home",
            tmp.path().join("bad-home").to_str().unwrap(),
        ])
        .env("TINKER_API_KEY", "tml-job")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tinker.base_model") && err.contains(MODEL),
        "{err}"
    );
}

/// The platform API beside the protocol: a job trained in the home shows in the list (with
/// search), its record, metrics and log, its live stream (ending once it has ended), the
/// dataset it pinned, and the OpenAPI document.
#[test]
fn the_platform_api_shows_jobs_and_registries() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let dir = common::fixture("tiny-llama");
    let job = tmp.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"api-demo\"\nshape = \"sft\"\nmodel = {:?}\ntags = [\"apitest\"]\n[data]\n\
             dataset = {:?}\nformat = \"datums\"\n[lora]\nrank = 2\n[schedule]\nepochs = 2\n\
             batch_size = 3\neval_interval = 0\n",
            dir.display().to_string(),
            dir.join("datums.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let record: Value = serde_json::from_str(&common::ok(&[
        "train",
        job.to_str().unwrap(),
        "--home",
        home.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let id = record["id"].as_str().unwrap();
    let s = serve(&home, &[]);
    let key = Some("tml-app");

    assert_eq!(http(&s, "GET", "/v1/jobs", None, b"").0, 401);
    let (status, list) = http(&s, "GET", "/v1/jobs?q=APITEST", key, b"");
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 1);
    let row = &list["jobs"][0];
    assert_eq!(
        (row["id"].as_str(), row["status"].as_str()),
        (Some(id), Some("completed"))
    );
    assert_eq!(row["step"], 2);
    assert!(
        row["dataset"].as_str().unwrap().starts_with("datums@"),
        "{row}"
    );
    assert_eq!(
        http(&s, "GET", "/v1/jobs?q=nomatch", key, b"").1["total"],
        0
    );
    let (_, full) = http(&s, "GET", &format!("/v1/jobs/{id}"), key, b"");
    assert_eq!(full["config"]["lora"]["rank"], 2);
    assert_eq!(http(&s, "GET", "/v1/jobs/nope", key, b"").0, 404);
    let (_, m) = http(
        &s,
        "GET",
        &format!("/v1/jobs/{id}/metrics?after_step=1"),
        key,
        b"",
    );
    assert_eq!(m["rows"].as_array().unwrap().len(), 1);
    let (_, logs) = http(&s, "GET", &format!("/v1/jobs/{id}/logs"), key, b"");
    assert!(!logs["events"].as_array().unwrap().is_empty());
    let (_, c) = post(&s, &format!("/v1/jobs/{id}/cancel"), "tml-app", json!({}));
    assert_eq!(c["result"], "already completed");

    // The live stream of an ended job: its log, its metrics, its status, then `end`.
    let mut stream = TcpStream::connect(&s.addr).unwrap();
    write!(
        stream,
        "GET /v1/jobs/{id}/stream HTTP/1.1\r\nHost: x\r\nX-API-Key: tml-app\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.contains("text/event-stream"), "{text}");
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "metrics").count(),
        2,
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"log") && kinds.contains(&"status"),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"end"));

    let (_, ds) = http(&s, "GET", "/v1/datasets", key, b"");
    assert_eq!(ds["items"].as_array().unwrap().len(), 1, "{ds}");
    let (_, doc) = http(&s, "GET", "/v1/openapi.json", key, b"");
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/jobs/{id}/stream"]["get"].is_object());
}

/// The home's published models are served without `--model` (`name@version` and
/// `name@alias`): their base with their adapter merged, so sampling gives the published
/// model's logprobs and a new LoRA (zero at start) trains on top of it.
#[test]
fn published_models_are_served_to_sample_and_train_on() {
    use whet_contract::{LossFn, LossFnConfig, SamplingClient, TrainingClient};

    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let h = home.to_str().unwrap();
    let dir = common::fixture("tiny-llama");
    let job = tmp.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"pub\"\nshape = \"sft\"\nmodel = {:?}\n[data]\ndataset = {:?}\n\
             format = \"datums\"\n[lora]\nrank = 2\n[optimizer]\nlearning_rate = 0.01\n\
             [schedule]\nepochs = 3\nbatch_size = 3\neval_interval = 0\n",
            dir.display().to_string(),
            dir.join("datums.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let record: Value = serde_json::from_str(&common::ok(&[
        "train",
        job.to_str().unwrap(),
        "--home",
        h,
        "--json",
    ]))
    .unwrap();
    let id = record["id"].as_str().unwrap();
    let adapter = std::path::PathBuf::from(record["artifacts"]["final_adapter"].as_str().unwrap());
    common::ok(&[
        "models",
        "publish",
        id,
        "--name",
        "tinypub",
        "--version",
        "1.0.0",
        "--home",
        h,
    ]);
    common::ok(&[
        "models",
        "alias",
        "set",
        "tinypub@1.0.0",
        "champion",
        "--home",
        h,
    ]);

    let s = serve_models(&home, &[], &[]);
    let (_, caps) = http(
        &s,
        "GET",
        "/api/v1/get_server_capabilities",
        Some("tml-x"),
        b"",
    );
    let names: Vec<&str> = caps["supported_models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"tinypub@1.0.0") && names.contains(&"tinypub@champion"),
        "{names:?}"
    );

    // The engine in process: the base with the published adapter applied.
    let (_, base) = whet_engine::load_model(
        dir.to_str().unwrap(),
        &candle_core::Device::Cpu,
        whet_engine::Precision::F32,
    )
    .unwrap();
    let lora = whet_engine::load_adapter(&base, &adapter).unwrap();
    let local = whet_engine::Sampler::new(
        base.clone(),
        Some(lora.sampling_weights().unwrap()),
        whet_engine::SamplerOptions::default(),
    );
    let datum: whet_contract::Datum = serde_json::from_str(
        std::fs::read_to_string(dir.join("datums.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let want = local.compute_logprobs(&datum.model_input).unwrap();
    // The published adapter moved the model (so the comparison below can fail).
    let plain =
        whet_engine::Sampler::new(base.clone(), None, whet_engine::SamplerOptions::default())
            .compute_logprobs(&datum.model_input)
            .unwrap();
    assert!(plain
        .iter()
        .zip(&want)
        .any(|(a, b)| matches!((a, b), (Some(a), Some(b)) if (a - b).abs() > 1e-3)));

    let conn =
        whet_server::client::Connection::open(&format!("http://{}", s.addr), "tml-x").unwrap();
    let got = conn
        .base_sampler("tinypub@champion")
        .unwrap()
        .compute_logprobs(&datum.model_input)
        .unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        match (g, w) {
            (Some(g), Some(w)) => assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}"),
            (None, None) => {}
            _ => panic!("{got:?} vs {want:?}"),
        }
    }
    // A new adapter on the published model starts from it: its logprobs are the same.
    let cfg = whet_contract::LoraConfig {
        rank: 2,
        train_unembed: false,
        ..Default::default()
    };
    let mut tc = conn.training_client("tinypub@1.0.0", &cfg).unwrap();
    let mut ce = datum.clone();
    ce.loss_fn_inputs
        .retain(|k, _| k == "target_tokens" || k == "weights");
    let ce_local = ce.clone();
    let out = tc
        .forward(&[ce], LossFn::CrossEntropy, &LossFnConfig::new())
        .unwrap();
    // In process: the base with the published adapter, on the same datum.
    let ckpt = tmp.path().join("ckpt");
    let mut session = whet_engine::TrainingSession::with_adapter(
        base.clone(),
        "tiny",
        whet_engine::load_adapter(&base, &adapter).unwrap(),
        &ckpt,
        whet_engine::SamplerOptions::default(),
    );
    let want_lp = session
        .forward(&[ce_local], LossFn::CrossEntropy, &LossFnConfig::new())
        .unwrap()
        .loss_fn_outputs[0]["logprobs"]
        .to_f32_vec();
    let lp = out.loss_fn_outputs[0]["logprobs"].to_f32_vec();
    assert_eq!(lp.len(), want_lp.len());
    for (i, (x, w)) in lp.iter().zip(&want_lp).enumerate() {
        assert!((x - w).abs() < 1e-4, "position {i}: {x} vs {w}");
    }
}
