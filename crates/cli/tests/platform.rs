//! The platform API of `whet serve` (beside the Tinker protocol): jobs listed, streamed,
//! submitted, run, cancelled and retried; the registries; the home's published models served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::server::*;
use serde_json::{json, Value};

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

/// Jobs through the platform API: submitted (a job file as JSON), run by the server's own
/// worker to completion; a long one cancelled while it runs, then retried as a new job.
#[test]
fn jobs_are_submitted_run_cancelled_and_retried_through_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let s = serve(&home, &[]);
    let dir = common::fixture("tiny-llama");
    let config = |name: &str, epochs: u64| {
        json!({"name": name, "shape": "sft", "model": dir.display().to_string(),
               "data": {"dataset": dir.join("datums.jsonl").display().to_string(), "format": "datums"},
               "lora": {"rank": 2}, "schedule": {"epochs": epochs, "batch_size": 3, "eval_interval": 0}})
    };
    let wait = |id: &str, want: &str| -> Value {
        let start = Instant::now();
        loop {
            let (_, r) = http(&s, "GET", &format!("/v1/jobs/{id}"), Some("tml-a"), b"");
            if r["status"] == want {
                return r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{id} never became {want}: {r}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let (status, queued) = post(
        &s,
        "/v1/jobs",
        "tml-a",
        json!({"config": config("short", 2)}),
    );
    assert_eq!(status, 200, "{queued}");
    let short = queued["id"].as_str().unwrap().to_string();
    let done = wait(&short, "completed");
    assert_eq!(done["metrics"]["step"], 2);

    // Bad input: 400 naming what is wrong.
    let mut bad = config("bad", 1);
    bad["lora"]["rank"] = json!(0);
    let (status, v) = post(&s, "/v1/jobs", "tml-a", json!({"config": bad}));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("lora.rank"), "{v}");
    let (status, v) = post(&s, "/v1/jobs", "tml-a", json!({"toml": "name = 1"}));
    assert_eq!(status, 400, "{v}");

    let (_, long) = post(
        &s,
        "/v1/jobs",
        "tml-a",
        json!({"config": config("long", 1_000_000)}),
    );
    let long = long["id"].as_str().unwrap().to_string();
    wait(&long, "running");
    let (_, c) = post(&s, &format!("/v1/jobs/{long}/cancel"), "tml-a", json!({}));
    assert_eq!(c["result"], "stopping after the current step", "{c}");
    wait(&long, "cancelled");
    let (status, again) = post(&s, &format!("/v1/jobs/{long}/retry"), "tml-a", json!({}));
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["retry_of"], long.as_str());
    let again = again["id"].as_str().unwrap().to_string();
    wait(&again, "running");
    post(&s, &format!("/v1/jobs/{again}/cancel"), "tml-a", json!({}));
    wait(&again, "cancelled");
    let (status, _) = post(&s, &format!("/v1/jobs/{short}/retry"), "tml-a", json!({}));
    assert_eq!(status, 400, "a completed job is not retried");
}

/// The App is one embedded page at `/`, whatever the key (it asks for one itself).
#[test]
fn the_app_is_served_at_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let s = serve(&tmp.path().join("home"), &[]);
    let mut stream = std::net::TcpStream::connect(&s.addr).unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..100.min(text.len())]
    );
    assert!(text.contains("text/html"));
    assert!(text.contains("/v1/jobs") && text.contains("<title>whet</title>"));
}
