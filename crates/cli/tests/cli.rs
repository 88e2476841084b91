//! End to end: the `whet` binary on the tiny fixtures and on SmolLM2, including the clear
//! errors bad input must get.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

use serde_json::Value;

fn expected_logprobs(model: &str, tag: &str, i: usize) -> Vec<f32> {
    let t = candle_core::safetensors::load(
        fixture(model).join("expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    t[&format!("logprobs.{tag}.{i}")].to_vec1().unwrap()
}

#[test]
fn logprobs_with_adapter_match_peft_and_merge_preserves_them() {
    let model = fixture("tiny-qwen2");
    let adapter = model.join("adapter");
    let data = model.join("datums.jsonl");
    let out = ok(&[
        "logprobs",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--data",
        s(&data),
    ]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        let lp: Vec<f32> = serde_json::from_value(line["logprobs"].clone()).unwrap();
        let want = expected_logprobs("tiny-qwen2", "adapter", i);
        assert!(lp.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4));
        assert!(line["loss"].as_f64().unwrap().is_finite());
    }
    // Merging gives a plain model with the adapter's logprobs.
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    ok(&[
        "adapter",
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ]);
    assert!(merged.join("model.safetensors").is_file() && merged.join("config.json").is_file());
    let out2 = ok(&["logprobs", "--model", s(&merged), "--data", s(&data)]);
    for (a, b) in out.lines().zip(out2.lines()) {
        let a: Vec<f32> =
            serde_json::from_value(serde_json::from_str::<Value>(a).unwrap()["logprobs"].clone())
                .unwrap();
        let b: Vec<f32> =
            serde_json::from_value(serde_json::from_str::<Value>(b).unwrap()["logprobs"].clone())
                .unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4));
    }
    // Writing over an existing directory is refused.
    assert!(fails(&[
        "adapter",
        "merge",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged)
    ])
    .contains("already exists"));
    // --out writes the same lines to a file.
    let file = tmp.path().join("lp.jsonl");
    ok(&[
        "logprobs",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&file),
    ]);
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 3);
}

#[test]
fn bad_input_gets_one_clear_error_and_no_output_file() {
    let model = fixture("tiny-llama");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let datum = |tokens: &str, targets: &str| {
        format!(
            r#"{{"model_input": {{"chunks": [{{"type": "encoded_text", "tokens": {tokens}}}]}}, "loss_fn_inputs": {{"target_tokens": {{"data": {targets}, "dtype": "int64"}}}}}}"#
        )
    };
    let run = |data: &Path| {
        fails(&[
            "logprobs",
            "--model",
            s(&model),
            "--data",
            s(data),
            "--out",
            s(&out),
        ])
    };
    // Missing file.
    let e = run(&tmp.path().join("nope.jsonl"));
    assert!(e.contains("nope.jsonl"), "{e}");
    // Malformed JSON names the line.
    let bad = write(
        "bad.jsonl",
        &format!("{}\n{{not json\n", datum("[1, 2]", "[2, 3]")),
    );
    let e = run(&bad);
    assert!(e.contains("bad.jsonl") && e.contains(":2"), "{e}");
    // A token outside the vocabulary names the field.
    let oov = write("oov.jsonl", &datum("[1, 100000]", "[2, 3]"));
    let e = run(&oov);
    assert!(e.contains("100000") && e.contains("model_input"), "{e}");
    // A sequence longer than the context.
    let long: Vec<String> = (0..70).map(|i| (i % 100).to_string()).collect();
    let long = format!("[{}]", long.join(", "));
    let e = run(&write("long.jsonl", &datum(&long, &long)));
    assert!(e.contains("context"), "{e}");
    // Targets of the wrong length.
    let e = run(&write("len.jsonl", &datum("[1, 2, 3]", "[2, 3]")));
    assert!(e.contains("target_tokens"), "{e}");
    assert!(!out.exists(), "a failed run left an output file");

    // An adapter whose shapes do not fit the model names the tensor.
    let data = model.join("datums.jsonl");
    let e = fails(&[
        "logprobs",
        "--model",
        s(&model),
        "--adapter",
        s(&fixture("tiny-qwen3").join("adapter")),
        "--data",
        s(&data),
    ]);
    assert!(
        e.contains("lora_A.weight") || e.contains("lora_B.weight"),
        "{e}"
    );
    // An unsupported architecture.
    let arch = tmp.path().join("gpt2");
    std::fs::create_dir(&arch).unwrap();
    std::fs::write(arch.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let e = fails(&["model", "info", s(&arch)]);
    assert!(e.contains("gpt2"), "{e}");
    // A missing model.
    let e = fails(&["model", "info", "/no/such/dir"]);
    assert!(e.contains("/no/such/dir"), "{e}");
}

#[test]
fn smollm2_samples_through_its_chat_template() {
    let Some(model) = smollm2() else { return };
    let out = ok(&[
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let greedy: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("smollm2").join("greedy.json")).unwrap(),
    )
    .unwrap();
    let case = &greedy["cases"][0];
    assert_eq!(
        v["prompt_tokens"], case["prompt_tokens"],
        "chat template rendering differs"
    );
    let sample = &v["samples"][0];
    assert_eq!(sample["tokens"], case["greedy_tokens"]);
    assert_eq!(sample["stop_reason"], "stop");
    assert!(sample["text"].as_str().unwrap().contains("Paris"));
    // Several seeded samples are reproducible.
    let args = [
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "Say hi.",
        "-n",
        "2",
        "--seed",
        "7",
        "--max-tokens",
        "8",
        "--json",
    ];
    assert_eq!(ok(&args), ok(&args));
    // In bf16 the answer is the same (greedy tokens may drift late in the reply).
    let out = ok(&[
        "sample",
        "--model",
        s(&model),
        "--precision",
        "bf16",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["samples"][0]["text"].as_str().unwrap().contains("Paris"),
        "{out}"
    );
    let e = fails(&[
        "sample",
        "--model",
        s(&model),
        "--precision",
        "fp16",
        "--prompt",
        "hi",
    ]);
    assert!(e.contains("precision") && e.contains("fp16"), "{e}");
    let info: Value = serde_json::from_str(&ok(&["model", "info", s(&model), "--json"])).unwrap();
    assert_eq!(info["config"]["num_layers"], 30);
    assert_eq!(info["tokenizer"]["chat_template"], true);
}

#[test]
fn data_render_shows_the_trained_tokens_of_every_row_kind() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let rows = tmp.path().join("rows.jsonl");
    std::fs::write(
        &rows,
        concat!(
            r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}"#,
            "\n",
            r#"{"question": "2+2?", "answer": 4}"#,
            "\n"
        ),
    )
    .unwrap();
    let text = ok(&[
        "data",
        "render",
        "--model",
        s(&model),
        s(&rows),
        "--system-prompt",
        "Be brief.",
    ]);
    assert!(
        text.contains("⟦Paris.<|im_end|>⟧") && text.contains("⟦4<|im_end|>⟧"),
        "{text}"
    );
    assert!(text.contains("Be brief."), "{text}");
    let json = ok(&["data", "render", "--model", s(&model), s(&rows), "--json"]);
    let lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let w: Vec<f32> = serde_json::from_value(lines[1]["weights"].clone()).unwrap();
    let t: Vec<u32> = serde_json::from_value(lines[1]["tokens"].clone()).unwrap();
    assert_eq!(w.len(), t.len());
    assert_eq!(w.iter().filter(|&&x| x > 0.0).count(), 2); // "4" and <|im_end|>
                                                           // validate counts rows, tokens and trained tokens.
    let report: Value = serde_json::from_str(&ok(&[
        "data",
        "validate",
        "--model",
        s(&model),
        s(&rows),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["usable_rows"], 2);
    assert_eq!(report["trained_tokens"], 3 + 2);
    // A malformed row is named by file, line and field; validate reports every bad row.
    std::fs::write(
        &rows,
        concat!(
            "{\"prompt\": \"x\"}\n",
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]}"#,
            "\n",
            r#"{"question": "2+2?", "answer": 4}"#,
            "\n"
        ),
    )
    .unwrap();
    let e = fails(&["data", "render", "--model", s(&model), s(&rows)]);
    assert!(
        e.contains("rows.jsonl:1") && e.contains("expected_output"),
        "{e}"
    );
    let out = whet(&["data", "validate", "--model", s(&model), s(&rows)]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rows.jsonl:1: field `expected_output"),
        "{text}"
    );
    assert!(text.contains("rows.jsonl:2: trains on nothing"), "{text}");
    assert!(text.contains("3 rows, 1 usable"), "{text}");
}

#[test]
fn train_runs_an_sft_job_file_and_refuses_bad_input_before_any_compute() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let rows = tmp.path().join("rows.jsonl");
    std::fs::write(
        &rows,
        concat!(
            r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}"#,
            "\n",
            r#"{"question": "2+2?", "answer": "4"}"#,
            "\n",
            r#"{"prompt": "Capital of Italy?", "completion": "Rome."}"#,
            "\n"
        ),
    )
    .unwrap();
    let job = tmp.path().join("job.toml");
    let write_job = |extra: &str| {
        std::fs::write(
            &job,
            format!(
                "name = \"t\"\nshape = \"sft\"\nmodel = {:?}\n{extra}[data]\ndataset = \"rows.jsonl\"\n\
                 eval_dataset = \"rows.jsonl\"\n[lora]\nrank = 4\n[optimizer]\nlearning_rate = 1e-3\n\
                 [schedule]\nepochs = 2\nbatch_size = 2\ncheckpoint_interval = 2\neval_interval = 2\n",
                s(&model)
            ),
        )
        .unwrap()
    };
    write_job("");
    let out = ok(&["train", s(&job), "--home", s(&home), "--json"]);
    let record: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(record["status"], "completed");
    assert_eq!(record["metrics"]["step"], 4);
    let adapter = PathBuf::from(record["artifacts"]["final_adapter"].as_str().unwrap());
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let id = record["id"].as_str().unwrap().to_string();
    let metrics = ok(&["jobs", "metrics", &id, "--home", s(&home), "--json"]);
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5); // the eval before training, then 4 steps
    assert_eq!(lines[0]["step"], 0);
    let evals: Vec<f64> = lines
        .iter()
        .filter_map(|m| m["eval_loss"].as_f64())
        .collect();
    assert_eq!(evals.len(), 3);
    assert!(evals[2] < evals[0], "eval loss falls: {evals:?}");
    assert_eq!(record["initial_eval_loss"].as_f64(), Some(evals[0]));
    let lines = &lines[1..];
    for key in [
        "loss",
        "learning_rate",
        "num_tokens",
        "num_loss_tokens",
        "tokens_per_second",
        "grad_norm",
    ] {
        assert!(lines[0][key].is_number(), "{key} in {}", lines[0]);
    }
    // The log: {timestamp, level, message, data} with the platform's progress events.
    let log = ok(&["jobs", "logs", &id, "--home", s(&home), "--json"]);
    let events: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .inspect(|e| {
            assert!(
                e["timestamp"].is_string() && e["level"].is_string() && e["message"].is_string()
            )
        })
        .map(|e| e["data"]["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(events.first().map(String::as_str), Some("training_start"));
    assert_eq!(events.last().map(String::as_str), Some("training_end"));
    for e in ["step_complete", "eval_complete", "checkpoint_saved"] {
        assert!(events.iter().any(|x| x == e), "{e} in {events:?}");
    }
    // The adapter is a PEFT directory the sampler takes.
    ok(&[
        "sample",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ]);

    // The same job as flags.
    let out = ok(&[
        "train",
        "sft",
        "--model",
        s(&model),
        "--dataset",
        s(&rows),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--lora-rank",
        "2",
        "--lr-schedule",
        "cosine",
        "--home",
        s(&home),
        "--json",
    ]);
    let record: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(record["status"], "completed");
    assert_eq!(record["config"]["schedule"]["steps"], 1);
    assert_eq!(record["config"]["schedule"]["lr_schedule"], "cosine");
    assert_eq!(record["config"]["lora"]["rank"], 2);

    // Bad input: one clear error before any compute, and the job record says why.
    let latest = || -> Value {
        let out = ok(&["jobs", "list", "--home", s(&home), "--json"]);
        serde_json::from_str(out.lines().next().unwrap()).unwrap()
    };
    let jobs = || {
        ok(&["jobs", "list", "--home", s(&home), "--json"])
            .lines()
            .count()
    };
    let before = jobs();
    write_job("epochs = 2\n"); // belongs in [schedule]: no job at all
    let e = fails(&["train", s(&job), "--home", s(&home)]);
    assert!(e.contains("job.toml") && e.contains("epochs"), "{e}");
    assert_eq!(jobs(), before);
    write_job("");
    std::fs::write(&rows, "{\"prompt\": \"x\"}\n").unwrap();
    let e = fails(&["train", s(&job), "--home", s(&home)]);
    assert!(
        e.contains("rows.jsonl:1") && e.contains("expected_output"),
        "{e}"
    );
    let r = latest();
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().contains("rows.jsonl:1"), "{r}");
    assert!(r["metrics"].is_null(), "nothing was trained");
    write_job("capability = \"support@1.0.0\"\n");
    std::fs::write(&rows, "{\"prompt\": \"x\", \"answer\": \"y\"}\n").unwrap();
    let e = fails(&["train", s(&job), "--home", s(&home)]);
    assert!(
        e.contains("support@1.0.0") && e.contains("capabilities push"),
        "{e}"
    );
    assert!(latest()["error"]
        .as_str()
        .unwrap()
        .contains("support@1.0.0"));
    write_job("");
    std::fs::write(
        &rows,
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]}"#,
    )
    .unwrap();
    let e = fails(&["train", s(&job), "--home", s(&home)]);
    assert!(e.contains("train"), "a dataset that trains on nothing: {e}");
    assert_eq!(latest()["status"], "failed");
    let missing = job.with_file_name("missing.toml");
    std::fs::write(
        &missing,
        "name = \"m\"\nshape = \"sft\"\nmodel = \"no/such/model.gguf\"\n[data]\ndataset = \"rows.jsonl\"\n",
    )
    .unwrap();
    let e = fails(&["train", s(&missing), "--home", s(&home)]);
    assert!(e.contains("no/such/model.gguf"), "{e}");
    assert!(latest()["error"]
        .as_str()
        .unwrap()
        .contains("no/such/model.gguf"));
    assert_eq!(jobs(), before + 4);
}

/// A job killed with SIGKILL at several points resumes (`whet jobs resume ID`) from the last
/// checkpoint its record names and ends with the adapter, byte for byte, of a run never stopped
/// (data order, schedule, AdamW moments and LoRA dropout masks all restored).
#[test]
fn a_run_killed_at_any_point_resumes_to_the_same_adapter_bitwise() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let rows = tmp.path().join("rows.jsonl");
    let mut text = String::new();
    for (q, a) in [
        ("Capital of France?", "Paris."),
        ("Capital of Italy?", "Rome."),
        ("2+2?", "4"),
        ("Color of the sky?", "Blue."),
        ("Opposite of hot?", "Cold."),
        ("Capital of Spain?", "Madrid."),
    ] {
        text.push_str(&format!("{{\"prompt\": {q:?}, \"answer\": {a:?}}}\n"));
    }
    std::fs::write(&rows, text).unwrap();
    let job = tmp.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"kill\"\nshape = \"sft\"\nmodel = {:?}\n[data]\ndataset = \"rows.jsonl\"\n\
             [lora]\nrank = 4\ndropout = 0.1\n[optimizer]\nlearning_rate = 1e-3\n\
             [schedule]\nepochs = 2\nbatch_size = 2\ncheckpoint_interval = 1\n",
            s(&model)
        ),
    )
    .unwrap();
    let adapter_bytes = |record: &Value| {
        let dir = PathBuf::from(record["artifacts"]["final_adapter"].as_str().unwrap());
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
    };
    let straight: Value = serde_json::from_str(
        ok(&[
            "train",
            s(&job),
            "--home",
            s(&tmp.path().join("straight")),
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let want = adapter_bytes(&straight);
    // SIGKILL at two points; SIGINT (Ctrl-C) cancels cleanly after the step in progress.
    for (signal, kill_after) in [("KILL", 1usize), ("KILL", 4), ("INT", 2)] {
        let home = tmp.path().join(format!("killed-{signal}-{kill_after}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_whet"))
            .args(["train", s(&job), "--home", s(&home)])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("stderr.txt")).unwrap())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        let id = loop {
            if let Some(status) = child.try_wait().unwrap() {
                let err = std::fs::read_to_string(tmp.path().join("stderr.txt")).unwrap();
                panic!("the run ended before the kill ({status}): {err}");
            }
            assert!(
                started.elapsed().as_secs() < 600,
                "no checkpoint after 10 minutes"
            );
            let listed = whet(&["jobs", "list", "--home", s(&home), "--json"]);
            if !listed.status.success() {
                eprintln!("jobs list: {}", String::from_utf8_lossy(&listed.stderr));
            }
            let named = String::from_utf8_lossy(&listed.stdout)
                .lines()
                .next()
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
                .and_then(|record| {
                    let n = record["artifacts"]["checkpoints"].as_array()?.len();
                    (n >= kill_after).then(|| record["id"].as_str().unwrap().to_string())
                });
            if let Some(id) = named {
                break id;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        if signal == "KILL" {
            child.kill().unwrap();
            child.wait().unwrap();
        } else {
            let pid = child.id().to_string();
            assert!(Command::new("kill")
                .args(["-s", signal, &pid])
                .status()
                .unwrap()
                .success());
            assert!(
                !child.wait().unwrap().success(),
                "a cancelled run exits non-zero"
            );
            let record: Value =
                serde_json::from_str(&ok(&["jobs", "get", &id, "--home", s(&home), "--json"]))
                    .unwrap();
            assert_eq!(record["status"], "cancelled");
            assert!(record["artifacts"]["final_adapter"].is_null());
        }
        let resumed: Value =
            serde_json::from_str(ok(&["jobs", "resume", &id, "--home", s(&home), "--json"]).trim())
                .unwrap();
        assert_eq!(resumed["status"], "completed");
        assert_eq!(resumed["metrics"]["step"], 6);
        assert!(
            adapter_bytes(&resumed) == want,
            "SIG{signal} after {kill_after} checkpoints: the adapter differs"
        );
        let metrics = ok(&["jobs", "metrics", &id, "--home", s(&home), "--json"]);
        let steps: Vec<u64> = metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            steps,
            (1..=6).collect::<Vec<_>>(),
            "one metrics row per step"
        );
        // A completed run has nothing to resume.
        let e = fails(&["jobs", "resume", &id, "--home", s(&home)]);
        assert!(e.contains("completed"), "{e}");
    }
}
