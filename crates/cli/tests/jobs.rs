//! End to end: the home's registries and the job lifecycle — push datasets and capabilities,
//! queue jobs, run them in a worker, cancel, resume, retry, wait — on the tiny Llama fixture's
//! datums (no tokenizer needed, so every step takes milliseconds).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn datasets_and_capabilities_are_immutable_pinned_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let h = s(&home);
    let dir = tmp.path().join("faq");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("train.jsonl"),
        "{\"question\": \"2+2?\", \"answer\": \"4\"}\n{\"question\": \"3+3?\", \"answer\": \"6\"}\n",
    )
    .unwrap();
    std::fs::write(dir.join("eval.csv"), "question,answer\n1+1?,2\n").unwrap();
    std::fs::write(
        dir.join("dataset.yaml"),
        "name: faq\nversion: 1.2.0\nsummary: sums\nsplits:\n  train: train.jsonl\n  eval: eval.csv\n",
    )
    .unwrap();
    let doc = json(&ok(&["datasets", "push", s(&dir), "--home", h, "--json"]));
    assert_eq!(
        (doc["name"].as_str(), doc["version"].as_str()),
        (Some("faq"), Some("1.2.0"))
    );
    assert_eq!(doc["splits"]["train"]["rows"], 2);
    assert_eq!(doc["splits"]["eval"]["rows"], 1);
    assert_eq!(doc["splits"]["train"]["sha256"].as_str().unwrap().len(), 64);
    // The same version with other bytes is refused; the published rows stay as they were.
    std::fs::write(dir.join("eval.csv"), "question,answer\n1+1?,3\n").unwrap();
    let e = fails(&["datasets", "push", s(&dir), "--home", h]);
    assert!(e.contains("faq@1.2.0") && e.contains("immutable"), "{e}");
    let shown = json(&ok(&[
        "datasets",
        "show",
        "faq@1.2.0",
        "--home",
        h,
        "--json",
    ]));
    assert_eq!(shown["digest"], doc["digest"]);
    let e = fails(&["datasets", "show", "faq@9.0.0", "--home", h]);
    assert!(e.contains("published versions: 1.2.0"), "{e}");
    // A malformed row publishes nothing and names file:line and field.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"x\"}\n").unwrap();
    let e = fails(&["datasets", "push", s(&bad), "--home", h]);
    assert!(
        e.contains("bad.jsonl:1") && e.contains("expected_output"),
        "{e}"
    );
    assert_eq!(
        ok(&["datasets", "list", "--home", h, "--json"])
            .lines()
            .count(),
        1
    );

    let cap = tmp.path().join("capability.yaml");
    std::fs::write(
        &cap,
        "schema: 1\nname: calc\nversion: 1.0.0\ndescription: sums\nsystem_prompt: Answer with a number.\n\
         tools:\n  - type: function\n    function:\n      name: add\n      description: Adds.\n      \
         parameters: {type: object, properties: {a: {type: number}}, required: [a]}\n",
    )
    .unwrap();
    ok(&["capabilities", "push", s(&cap), "--home", h]);
    let c = json(&ok(&[
        "capabilities",
        "show",
        "calc@1.0.0",
        "--home",
        h,
        "--json",
    ]));
    assert_eq!(c["tools"][0]["function"]["name"], "add");
    std::fs::write(
        &cap,
        std::fs::read_to_string(&cap)
            .unwrap()
            .replace("number.", "digit."),
    )
    .unwrap();
    let e = fails(&["capabilities", "push", s(&cap), "--home", h]);
    assert!(e.contains("immutable"), "{e}");
    std::fs::write(&cap, "schema: 1\nname: Calc\nversion: 1.0.0\n").unwrap();
    let e = fails(&["capabilities", "push", s(&cap), "--home", h]);
    assert!(e.contains("capability.yaml") && e.contains("name"), "{e}");
}

/// Polls `whet jobs get` until `done` holds (at most a minute).
fn until(home: &str, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let r = json(&ok(&["jobs", "get", id, "--home", home, "--json"]));
        if done(&r) {
            return r;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{what}: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn jobs_queue_run_in_a_worker_cancel_resume_retry_and_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let h = s(&home);
    let model = fixture("tiny-llama");
    ok(&[
        "datasets",
        "push",
        s(&model.join("datums.jsonl")),
        "--name",
        "datums",
        "--format",
        "datums",
        "--home",
        h,
    ]);
    let job = tmp.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"long\"\nshape = \"sft\"\nmodel = {:?}\n[data]\ndataset = \"datums@1.0.0\"\n\
             format = \"datums\"\n[lora]\nrank = 2\n[schedule]\nepochs = 2000\nbatch_size = 1\n\
             checkpoint_interval = 100\neval_interval = 0\n",
            s(&model)
        ),
    )
    .unwrap();
    let queue = || json(&ok(&["train", s(&job), "--detach", "--home", h, "--json"]));
    let first = queue();
    assert_eq!(first["status"], "queued");
    assert_eq!(first["dataset_ref"], "datums@1.0.0:train");
    let id = first["id"].as_str().unwrap().to_string();
    let second = queue()["id"].as_str().unwrap().to_string();
    // A queued job is cancelled at once.
    assert!(ok(&["jobs", "cancel", &second, "--home", h]).contains("cancelled"));

    // A worker runs the first; `whet jobs cancel` from here stops it after a step.
    let mut worker = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(["worker", "--once", "--home", h])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until(h, &id, "a first checkpoint", |r| {
        r["artifacts"]["checkpoints"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    });
    assert!(ok(&["jobs", "cancel", &id, "--home", h]).contains("stopping"));
    assert!(
        worker.wait().unwrap().success(),
        "the worker ends with an empty queue"
    );
    let r = json(&ok(&["jobs", "get", &id, "--home", h, "--json"]));
    assert_eq!(r["status"], "cancelled", "{r}");
    assert!(r["artifacts"]["final_adapter"].is_null());
    let kept = r["artifacts"]["checkpoints"].as_array().unwrap().len();
    assert!(kept >= 1);
    let stopped_at = r["metrics"]["step"].as_u64().unwrap();
    assert!(stopped_at < 6000, "stopped early, at {stopped_at}");
    let e = fails(&["jobs", "wait", &id, "--home", h]);
    assert!(e.contains("cancelled") && e.contains("jobs resume"), "{e}");

    // Resumed through the queue, it runs to the end from its last checkpoint.
    ok(&["jobs", "resume", &id, "--detach", "--home", h]);
    assert_eq!(
        json(&ok(&["jobs", "get", &id, "--home", h, "--json"]))["status"],
        "queued"
    );
    ok(&["worker", "--once", "--home", h]);
    let done = json(&ok(&[
        "jobs",
        "wait",
        &id,
        "--home",
        h,
        "--json",
        "--timeout",
        "60",
    ]));
    assert_eq!(done["status"], "completed");
    assert_eq!(done["metrics"]["step"], 6000);
    let steps: Vec<u64> = ok(&["jobs", "metrics", &id, "--home", h, "--json"])
        .lines()
        .map(|l| json(l)["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=6000).collect::<Vec<_>>(),
        "one row per step, none twice"
    );
    let artifacts = json(&ok(&["jobs", "artifacts", &id, "--home", h, "--json"]));
    let adapter = std::path::PathBuf::from(artifacts["final_adapter"].as_str().unwrap());
    assert!(adapter.join("adapter_config.json").is_file());
    let events: Vec<String> = ok(&["jobs", "logs", &id, "--home", h, "--json"])
        .lines()
        .map(|l| json(l)["data"]["event"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(events.iter().filter(|e| *e == "training_start").count(), 2);
    assert_eq!(events.iter().filter(|e| *e == "training_end").count(), 2);

    // Only failed or cancelled jobs are retried: as a new job pointing back at the old one.
    let e = fails(&["jobs", "retry", &id, "--home", h]);
    assert!(e.contains("completed"), "{e}");
    let retried = json(&ok(&[
        "jobs", "retry", &second, "--detach", "--home", h, "--json",
    ]));
    assert_eq!(retried["retry_of"], second.as_str());
    let listed = ok(&["jobs", "list", "--status", "queued", "--home", h, "--json"]);
    assert_eq!(listed.lines().count(), 1);
    let e = fails(&[
        "jobs",
        "wait",
        retried["id"].as_str().unwrap(),
        "--timeout",
        "0.2",
        "--home",
        h,
    ]);
    assert!(e.contains("still queued"), "{e}");
    assert!(fails(&["jobs", "get", "no-such-job", "--home", h]).contains("no-such-job"));
}

/// The acceptance point, through the whole job path (job file, pinned dataset, store,
/// foreground run): three AdamW steps on the fixture's datums from its PEFT adapter give
/// PyTorch's per-step losses and gradient norms (tools/make_fixtures.py, `adam_log`).
#[test]
fn a_job_from_a_peft_adapter_reproduces_torch_step_by_step() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let dir = fixture(name);
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let p = &meta["adam_params"];
        let job = tmp.path().join("job.toml");
        std::fs::write(
            &job,
            format!(
                "name = \"parity\"\nshape = \"sft\"\nmodel = {:?}\n[data]\ndataset = {:?}\n\
                 format = \"datums\"\n[lora]\ninit_adapter = {:?}\n[optimizer]\n\
                 learning_rate = {}\nbeta1 = {}\nbeta2 = {}\neps = {}\nweight_decay = {}\n\
                 grad_clip_norm = {}\n[schedule]\nepochs = {}\nbatch_size = 3\nshuffle = false\n\
                 lr_schedule = \"constant\"\neval_interval = 0\n",
                s(&dir),
                s(&dir.join("datums.jsonl")),
                s(&dir.join("adapter")),
                p["learning_rate"],
                p["beta1"],
                p["beta2"],
                p["eps"],
                p["weight_decay"],
                p["grad_clip_norm"],
                meta["adam_steps"],
            ),
        )
        .unwrap();
        let record = json(&ok(&["train", s(&job), "--home", s(&home), "--json"]));
        let id = record["id"].as_str().unwrap();
        let rows: Vec<Value> = ok(&["jobs", "metrics", id, "--home", s(&home), "--json"])
            .lines()
            .map(json)
            .collect();
        let want = meta["adam_log"].as_array().unwrap();
        assert_eq!(rows.len(), want.len());
        for (m, w) in rows.iter().zip(want) {
            let (loss, want_loss) = (m["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap());
            assert!(
                (loss - want_loss).abs() < 1e-5 * want_loss.abs(),
                "{name}: {m} vs {w}"
            );
            let (norm, want_norm) = (
                m["grad_norm"].as_f64().unwrap(),
                w["grad_norm_before_clip"].as_f64().unwrap(),
            );
            assert!(
                (norm - want_norm).abs() < 1e-4 * want_norm,
                "{name}: {m} vs {w}"
            );
        }
    }
}

/// Regression: a job submitted with a relative model path recorded it as given, so a worker
/// started elsewhere could not find the model. Records hold absolute paths.
#[test]
fn a_queued_job_records_absolute_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let out = Command::new(env!("CARGO_BIN_EXE_whet"))
        .current_dir(root().join("tests"))
        .args([
            "train",
            "sft",
            "--model",
            "fixtures/tiny-llama",
            "--dataset",
        ])
        .args(["fixtures/tiny-llama/datums.jsonl", "--format", "datums"])
        .args([
            "--init-adapter",
            "fixtures/tiny-llama/adapter",
            "--detach",
            "--json",
        ])
        .args(["--home", s(&home)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&String::from_utf8_lossy(&out.stdout));
    let model = std::path::PathBuf::from(r["model"].as_str().unwrap());
    assert!(
        model.is_absolute() && model.join("config.json").is_file(),
        "{r}"
    );
    let adapter = r["config"]["lora"]["init_adapter"].as_str().unwrap();
    assert!(std::path::Path::new(adapter).is_absolute(), "{r}");
    // And the worker, elsewhere, runs it.
    ok(&["worker", "--once", "--home", s(&home)]);
    let id = r["id"].as_str().unwrap();
    assert_eq!(
        json(&ok(&["jobs", "get", id, "--home", s(&home), "--json"]))["status"],
        "completed"
    );
}
