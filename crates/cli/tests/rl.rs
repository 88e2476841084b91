//! End to end: RL jobs on SmolLM2 — a prompt dataset scored by a recipe, metrics and rollouts
//! recorded; bad prompt rows refused before any compute; a verifier that crashes is contained
//! (its rollouts counted as failed, the job goes on, or fails cleanly under a failure policy).

mod common;

use common::*;
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn an_rl_job_samples_scores_trains_and_records_every_rollout() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let h = s(&home);
    let prompts = tmp.path().join("sums.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"question\": \"What is 2+3?\", \"answer\": \"5\"}\n",
            "{\"question\": \"What is 4+4?\", \"answer\": \"8\"}\n",
            "{\"question\": \"What is 7+2?\", \"answer\": \"9\"}\n",
            "{\"question\": \"What is 6+1?\", \"answer\": \"7\"}\n"
        ),
    )
    .unwrap();
    let base = [
        "train",
        "rl",
        "--model",
        s(&model),
        "--prompt-dataset",
        s(&prompts),
        "--num-rollouts",
        "3",
        "--groups-per-step",
        "2",
        "--max-new-tokens",
        "8",
        "--steps",
        "2",
        "--lora-rank",
        "2",
        "--home",
        h,
        "--json",
    ];
    let mut args = base.to_vec();
    args.extend(["--reward-recipe", "gsm8k_v1", "--eval-dataset", s(&prompts)]);
    let r = json(&ok(&args));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["trainer_type"], "rl");
    assert_eq!(r["algorithm"], "importance_sampling");
    assert!(r["prompt_dataset_ref"]
        .as_str()
        .unwrap()
        .starts_with("sums@"));
    let id = r["id"].as_str().unwrap();
    let rows: Vec<Value> = ok(&["jobs", "metrics", id, "--home", h, "--json"])
        .lines()
        .map(json)
        .collect();
    assert_eq!(rows.len(), 3, "the eval before training, then 2 steps");
    assert!(rows[0]["eval/reward_mean"].is_number());
    for key in [
        "train/reward_mean",
        "train/reward_min",
        "train/reward_max",
        "by_group/frac_mixed",
        "optim/kl_sample_train_v1",
        "optim/entropy",
        "rollouts/failed",
        "learning_rate",
        "grad_norm",
        "eval/reward_mean",
    ] {
        assert!(rows[2][key].is_number(), "{key} in {}", rows[2]);
    }
    // Sampler and trainer see the same policy (f32): the sampled tokens' logprobs agree.
    assert!(rows[1]["optim/kl_sample_train_v1"].as_f64().unwrap().abs() < 1e-3);
    // Every rollout is in the job's artifacts: 2 steps × 2 groups × 3 rollouts.
    let path = r["artifacts"]["rollouts"].as_str().unwrap();
    let rollouts: Vec<Value> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(json)
        .collect();
    assert_eq!(rollouts.len(), 12);
    for x in &rollouts {
        assert!(
            x["reward"].is_number() && x["completion"].is_string(),
            "{x}"
        );
    }
    assert!(
        std::path::Path::new(r["artifacts"]["final_adapter"].as_str().unwrap())
            .join("adapter_model.safetensors")
            .is_file()
    );

    // A verifier that crashes: every rollout fails, is counted and logged, and the job goes on.
    let script = tmp.path().join("verify.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncat > /dev/null\necho 'boom' >&2\nexit 3\n",
    )
    .unwrap();
    let params = format!(
        "{{\"command\": [\"sh\", {:?}], \"timeout_sec\": 5}}",
        s(&script)
    );
    let mut args = base.to_vec();
    args.extend(["--reward-recipe", "command_v1", "--reward-params", &params]);
    let r = json(&ok(&args));
    assert_eq!(r["status"], "completed", "{r}");
    let id = r["id"].as_str().unwrap();
    let last = json(
        ok(&["jobs", "metrics", id, "--home", h, "--json"])
            .lines()
            .last()
            .unwrap(),
    );
    assert_eq!(last["rollouts/failed"], 6.0);
    assert_eq!(last["rollouts/trained"], 0.0);
    let log = ok(&["jobs", "logs", id, "--home", h]);
    assert!(
        log.contains("could not be scored") && log.contains("boom"),
        "{log}"
    );

    // The same with a failure policy: the job fails cleanly after the first step, naming the
    // policy; its log and metrics are kept.
    args.extend(["--max-error-rate", "0.5", "--checkpoint-interval", "1"]);
    let err = fails(&args);
    assert!(err.contains("rl.max_error_rate"), "{err}");
    let jobs = ok(&["jobs", "list", "--home", h, "--json"]);
    let failed = jobs
        .lines()
        .map(json)
        .find(|j| j["status"] == "failed")
        .unwrap_or_else(|| panic!("no failed job: {jobs}"));
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("100% of the rollouts failed"),
        "{failed}"
    );
    let id = failed["id"].as_str().unwrap();
    let log = ok(&["jobs", "logs", id, "--home", h]);
    assert!(log.contains("could not be scored"), "{log}");
    let metrics = ok(&["jobs", "metrics", id, "--home", h, "--json"]);
    assert_eq!(metrics.lines().count(), 1, "{metrics}");

    // Bad input is refused before any compute, naming file, line and field.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"question\": \"What is 1+1?\", \"answer\": \"2\"}\n{\"question\": \"Hi\"}\n",
    )
    .unwrap();
    let mut args = base.to_vec();
    args[5] = s(&bad);
    args.extend(["--reward-recipe", "gsm8k_v1"]);
    let e = fails(&args);
    assert!(e.contains("bad.jsonl:2") && e.contains("answer"), "{e}");
    let mut args = base.to_vec();
    args.extend(["--reward-recipe", "exact_match_v9"]);
    let e = fails(&args);
    assert!(
        e.contains("exact_match_v9") && e.contains("gsm8k_v1"),
        "{e}"
    );
}

/// Offline RL from ATIF trajectories: one prompt per recorded agent step, its action (as the
/// chat template renders it) the reference, rewarded by the episode's outcome.
#[test]
fn offline_rl_trains_on_recorded_trajectories() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let trajectories = tmp.path().join("episodes.jsonl");
    let episode = |id: &str, success: bool, answer: &str| {
        serde_json::json!({
            "schema_version": "ATIF-v1.4", "session_id": id, "trajectory_id": id,
            "agent": {"name": "a", "version": "1"},
            "steps": [
                {"step_id": 1, "source": "user", "message": "What is 3+4?"},
                {"step_id": 2, "source": "agent", "message": answer},
                {"step_id": 3, "source": "user", "message": "And 1+1?"},
                {"step_id": 4, "source": "agent", "message": "2"}
            ],
            "success": success, "termination_reason": "done", "step_count": 4
        })
        .to_string()
    };
    std::fs::write(
        &trajectories,
        format!(
            "{}\n{}\n",
            episode("t1", true, "7"),
            episode("t2", false, "8")
        ),
    )
    .unwrap();
    let r = json(&ok(&[
        "train",
        "rl",
        "--model",
        s(&model),
        "--trajectory-dataset",
        s(&trajectories),
        "--num-rollouts",
        "2",
        "--groups-per-step",
        "2",
        "--max-new-tokens",
        "4",
        "--steps",
        "2",
        "--home",
        s(&home),
        "--json",
    ]));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["data"]["prompts"], 4, "two agent steps per episode");
    let rollouts: Vec<Value> =
        std::fs::read_to_string(r["artifacts"]["rollouts"].as_str().unwrap())
            .unwrap()
            .lines()
            .map(json)
            .collect();
    assert_eq!(rollouts.len(), 2 * 2 * 2);
    assert!(rollouts.iter().all(|x| x["reward"].is_number()));
}

/// Live RL against a world process: episodes in groups, per-turn rewards from the manifest's
/// policy, reward-to-go advantages, `worlds/…` metrics, every episode in the rollouts log.
#[test]
fn live_rl_plays_a_world_and_trains_on_its_turns() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // A world whose reward depends on the action (the request line's length, odd or even),
    // finishing on the second turn.
    let script = r#"n=0
while read -r line; do
  case "$line" in
    *'"reset"'*) echo '{"observation": [{"role": "user", "content": "Say something."}], "tools": []}' ;;
    *'"step"'*) n=$((n+1)); v=$(( ${#line} % 2 ))
      if [ "$n" -lt 2 ]; then d=false; r=null; else d=true; r='"finished"'; fi
      echo "{\"observation\": [{\"role\": \"user\", \"content\": \"More.\"}], \"reward_signals\": [{\"source\": \"parity\", \"value\": $v}], \"done\": $d, \"termination_reason\": $r}" ;;
    *) exit 0 ;;
  esac
done
"#;
    std::fs::write(tmp.path().join("world.sh"), script).unwrap();
    let manifest = tmp.path().join("world.yaml");
    std::fs::write(
        &manifest,
        "schema: 1\nname: parity\nversion: 1.0.0\nentrypoint: [\"sh\", \"world.sh\"]\n\
         seeds: [1, 2]\neval_seeds: [7]\nlimits: {max_turns: 3, max_tokens_per_turn: 6, timeout_sec: 10}\n\
         reward_policy:\n  terminal: {finished: 0.5}\n",
    )
    .unwrap();
    let home = tmp.path().join("home");
    let r = json(&ok(&[
        "train",
        "rl",
        "--model",
        s(&model),
        "--world-manifest",
        s(&manifest),
        "--num-rollouts",
        "3",
        "--groups-per-step",
        "2",
        "--steps",
        "1",
        "--home",
        s(&home),
        "--json",
    ]));
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["world_manifest_id"], "parity@1.0.0");
    let id = r["id"].as_str().unwrap();
    let m = json(
        ok(&["jobs", "metrics", id, "--home", s(&home), "--json"])
            .lines()
            .last()
            .unwrap(),
    );
    assert_eq!(m["worlds/success_rate"], 1.0, "{m}");
    assert_eq!(m["worlds/turns_mean"], 2.0, "{m}");
    assert_eq!(m["worlds/reward/terminal"], 0.5, "{m}");
    // The world eval: one greedy episode per eval seed, before training and at the end.
    assert_eq!(m["eval/success_rate"], 1.0, "{m}");
    assert_eq!(m["eval/turns_mean"], 2.0, "{m}");
    assert!(m["eval/reward_mean"].as_f64().unwrap() >= 0.5, "{m}");
    let r = json(&ok(&["jobs", "get", id, "--home", s(&home), "--json"]));
    assert_eq!(r["initial_eval_success_rate"], 1.0, "{r}");
    assert!(m["worlds/reward/parity"].is_number(), "{m}");
    let episodes: Vec<Value> =
        std::fs::read_to_string(r["artifacts"]["rollouts"].as_str().unwrap())
            .unwrap()
            .lines()
            .map(json)
            .collect();
    assert_eq!(episodes.len(), 2 * 3, "2 groups × 3 episodes");
    assert!(episodes
        .iter()
        .all(|e| e["turns"].as_array().unwrap().len() == 2));

    // The held-out eval seeds played on their own, as ATIF trajectories.
    let out = tmp.path().join("held-out.jsonl");
    let summary = json(&ok(&[
        "worlds",
        "rollout",
        s(&manifest),
        "--model",
        s(&model),
        "--eval-seeds",
        "--count",
        "2",
        "--temperature",
        "0",
        "--out",
        s(&out),
        "--json",
    ]));
    assert_eq!(summary["episodes"], 2, "{summary}");
    let seeds: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| json(l)["seed"].clone())
        .collect();
    assert_eq!(seeds, [7, 7], "the eval seed, cycled");
}
