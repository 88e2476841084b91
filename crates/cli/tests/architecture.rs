//! The dependency arrows point one way (cli → engine → lora → contract; cli → server → jobs → rl →
//! sft → data → contract), and the tensor library stays out of the crates that only move data and talk the
//! contract — so they build and test without candle. Checked on the real graph (`cargo metadata`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Every package reachable from `root` through normal (non-dev) dependencies.
fn closure(graph: &BTreeMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_string()];
    while let Some(p) = stack.pop() {
        if seen.insert(p.clone()) {
            stack.extend(graph.get(&p).cloned().unwrap_or_default());
        }
    }
    seen.remove(root);
    seen
}

#[test]
fn dependency_arrows_point_one_way() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The host's triple, so cargo does not need other platforms' crates (offline).
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &host,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let name = names[node["id"].as_str().unwrap()].clone();
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| names[d["pkg"].as_str().unwrap()].clone())
            .collect();
        graph.insert(name, deps);
    }
    let whet = |deps: &BTreeSet<String>| -> BTreeSet<String> {
        deps.iter()
            .filter(|d| d.starts_with("whet"))
            .cloned()
            .collect()
    };
    let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|s| s.to_string()).collect() };

    assert_eq!(whet(&closure(&graph, "whet-contract")), set(&[]));
    assert_eq!(whet(&closure(&graph, "whet-data")), set(&["whet-contract"]));
    assert_eq!(whet(&closure(&graph, "whet-lora")), set(&["whet-contract"]));
    assert_eq!(
        whet(&closure(&graph, "whet-engine")),
        set(&["whet-contract", "whet-lora"])
    );
    assert_eq!(
        whet(&closure(&graph, "whet-sft")),
        set(&["whet-contract", "whet-data"])
    );
    // RL reuses the SFT crate's optimizer, schedule and plan.
    assert_eq!(
        whet(&closure(&graph, "whet-rl")),
        set(&["whet-contract", "whet-data", "whet-sft"])
    );
    assert_eq!(
        whet(&closure(&graph, "whet-jobs")),
        set(&["whet-contract", "whet-data", "whet-sft", "whet-rl"])
    );
    // The server speaks the contract and the home; the engine reaches it only through the CLI.
    assert_eq!(
        whet(&closure(&graph, "whet-server")),
        set(&[
            "whet-contract",
            "whet-data",
            "whet-sft",
            "whet-rl",
            "whet-jobs"
        ])
    );
    for light in [
        "whet-contract",
        "whet-data",
        "whet-sft",
        "whet-rl",
        "whet-jobs",
        "whet-server",
    ] {
        let deps = closure(&graph, light);
        assert!(
            !deps.iter().any(|d| d.starts_with("candle")),
            "{light} must not depend on candle"
        );
    }
    // The HTTP stack stays in the server and the binary.
    for name in [
        "whet-contract",
        "whet-data",
        "whet-lora",
        "whet-engine",
        "whet-sft",
        "whet-rl",
        "whet-jobs",
    ] {
        assert!(
            !closure(&graph, name)
                .iter()
                .any(|d| d == "axum" || d == "tokio"),
            "{name} must not depend on axum or tokio"
        );
    }
    let deps = closure(&graph, "whet-contract");
    assert!(
        deps.iter()
            .all(|d| !d.starts_with("tokenizers") && !d.starts_with("minijinja")),
        "whet-contract depends on serde only"
    );
}
