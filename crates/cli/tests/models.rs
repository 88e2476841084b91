//! End to end: the models registry — publish a job's adapter with its lineage, alias it, train
//! on `name@champion`, sample from it; versions are immutable, aliases move.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn publish_alias_train_on_champion_and_sample() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let h = s(&home);
    let rows = tmp.path().join("rows.jsonl");
    std::fs::write(&rows, "{\"question\": \"2+2?\", \"answer\": \"#### 4\"}\n").unwrap();
    let train = |model: &str, lr: &str| {
        json(&ok(&[
            "train",
            "sft",
            "--model",
            model,
            "--dataset",
            s(&rows),
            "--steps",
            "1",
            "--lora-rank",
            "2",
            "--learning-rate",
            lr,
            "--home",
            h,
            "--json",
        ]))
    };
    let first = train(s(&model), "1e-3");
    let id = first["id"].as_str().unwrap();
    let doc = json(&ok(&[
        "models",
        "publish",
        id,
        "--name",
        "fmt",
        "--version",
        "1.0.0",
        "--home",
        h,
        "--json",
    ]));
    assert_eq!(doc["job"]["id"], id);
    assert!(doc["base_model"]["sha256"].as_str().unwrap().len() == 64);
    assert!(doc["dataset_refs"]["dataset"]
        .as_str()
        .unwrap()
        .starts_with("rows@"));
    assert!(doc["files"]["adapter"]["adapter_model.safetensors"]["sha256"].is_string());
    // Immutable: the same version with other weights is refused (the same weights again are
    // the same version).
    ok(&[
        "models",
        "publish",
        id,
        "--name",
        "fmt",
        "--version",
        "1.0.0",
        "--home",
        h,
    ]);
    let second = train(s(&model), "2e-3");
    let e = fails(&[
        "models",
        "publish",
        second["id"].as_str().unwrap(),
        "--name",
        "fmt",
        "--version",
        "1.0.0",
        "--home",
        h,
    ]);
    assert!(e.contains("immutable"), "{e}");
    ok(&[
        "models",
        "alias",
        "set",
        "fmt@1.0.0",
        "champion",
        "--home",
        h,
    ]);
    let shown = json(&ok(&[
        "models",
        "show",
        "fmt@champion",
        "--home",
        h,
        "--json",
    ]));
    assert_eq!(shown["version"], "1.0.0");

    // Train on top of the champion: its base, continuing its adapter; the record says so.
    let on_top = train("fmt@champion", "1e-3");
    assert_eq!(on_top["status"], "completed");
    assert_eq!(on_top["model_ref"], "fmt@1.0.0");
    assert!(on_top["config"]["lora"]["init_adapter"]
        .as_str()
        .unwrap()
        .contains("models/fmt/1.0.0/adapter"));

    // Sample from it (WHET_HOME finds the registry).
    let out = Command::new(env!("CARGO_BIN_EXE_whet"))
        .env("WHET_HOME", &home)
        .args([
            "sample",
            "--model",
            "fmt@champion",
            "--prompt",
            "2+2?",
            "--max-tokens",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(json(&String::from_utf8_lossy(&out.stdout))["samples"][0]["text"].is_string());

    // Export: the PEFT directory as published.
    let out_dir = tmp.path().join("export");
    ok(&[
        "models",
        "export",
        "fmt@champion",
        "--out",
        s(&out_dir),
        "--home",
        h,
    ]);
    assert!(out_dir.join("adapter_model.safetensors").is_file());
    assert!(out_dir.join("adapter_config.json").is_file());
    ok(&["models", "alias", "rm", "fmt", "champion", "--home", h]);
    let e = fails(&["models", "show", "fmt@champion", "--home", h]);
    assert!(e.contains("no alias"), "{e}");
    let listed = ok(&["models", "list", "--home", h, "--json"]);
    assert_eq!(listed.lines().count(), 1);
}

/// Regression: a job naming a model that was never published (`name@alias` in an empty home)
/// was refused as a missing file or hub id; it is refused as an unpublished model.
#[test]
fn an_unpublished_model_reference_is_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"response\": \"b\"}\n").unwrap();
    let home = tmp.path().join("home");
    let e = fails(&[
        "train",
        "sft",
        "--model",
        "vault-sft@champion",
        "--dataset",
        s(&data),
        "--home",
        s(&home),
    ]);
    assert!(
        e.contains("no model named \"vault-sft\" is published"),
        "{e}"
    );
}
