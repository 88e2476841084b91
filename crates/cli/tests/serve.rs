//! `whet serve` at the HTTP level, on the tiny fixture model: the statuses and messages of bad
//! input, keys and ownership, `seq_id` ordering (out of order, refused, retried), expiry of
//! abandoned sessions (their state saved first), `whet checkpoints import/list/export` feeding
//! `create_training_client_from_state`, and jobs on a Tinker backend. The official SDK's full
//! flow, with numbers checked against the engine, is in tests/tinker_sdk.rs; the platform API
//! in tests/platform.rs.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::server::*;
use serde_json::{json, Value};

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
