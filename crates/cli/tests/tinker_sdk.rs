//! Conformance of `whet serve` with the official `tinker` Python SDK (0.38.0 and 0.34.0).
//!
//! Each test starts `whet serve` on the tiny-llama fixture (served as `Qwen/Qwen3-8B`), runs
//! `tests/tinker_sdk/drive.py` with that SDK version against it, and reads the driver's JSON
//! report. It then replays the driver's calls in process on whet's engine (the same contract
//! traits the server sits on) and requires the server's numbers to equal the engine's: a
//! server that answers every call but computes something else fails here.
//!
//! The SDK virtualenvs come from `tools/get-tinker-sdk.sh`; without them the tests fail (they
//! do not skip) and say so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde_json::{json, Value};
use whet_contract::{
    AdamParams, Datum, ForwardBackwardOutput, LossFn, LossFnConfig, ModelInput, SampleResponse,
    SamplingClient, SamplingParams, Stop, TrainingClient,
};
use whet_engine::{Model, Precision, SamplerOptions, TrainingSession};

/// The name the fixture is served under (a name the SDK and cookbook know).
const MODEL: &str = "Qwen/Qwen3-8B";
/// The driver's learning rate; every other AdamParams field is left at the SDK's default,
/// which is the contract's default (beta1 0.9, beta2 0.95, eps 1e-12, no decay, no clipping).
const LEARNING_RATE: f64 = 1e-2;
/// Both sides compute in f32 with the same kernels: absolute 1e-4 on values up to 1, relative
/// 1e-4 above (`loss:sum` ~100, `grad_norm:mean` ~180).
const TOL: f64 = 1e-4;
/// The driver's limit for the whole run (each SDK call has its own 120 s limit inside).
const DRIVER_TIMEOUT: Duration = Duration::from_secs(600);
/// The driver's steps, in order: a report with all of them and no `fatal` ran to the end.
const STEPS: [&str; 13] = [
    "step_a_create",
    "step_b_forward_losses",
    "step_b2_train_every_loss",
    "step_c_pipelined_step",
    "step_d_save",
    "step_e_second_step",
    "step_f_resume",
    "step_g_ephemeral_sampler",
    "step_h_named_and_base_samplers",
    "step_i_rest",
    "step_j_download",
    "step_k_bad_input",
    "step_l_close",
];

#[test]
fn tinker_sdk_0_38_0() {
    conformance("0.38.0");
}

#[test]
fn tinker_sdk_0_34_0() {
    conformance("0.34.0");
}

fn root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/tiny-llama")
}

// ---------------------------------------------------------------------------------------------
// Processes: the server and the driver, killed on drop so a failing test leaves nothing behind.

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The SDK's interpreter, from a complete `tools/get-tinker-sdk.sh` install.
fn sdk_python(version: &str) -> PathBuf {
    let venv = root().join(".venv").join(format!("tinker-{version}"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file() && venv.join(".complete").is_file(),
        "the tinker {version} SDK is not installed at {}: run tools/get-tinker-sdk.sh",
        venv.display()
    );
    python
}

/// A `whet serve` on the fixture with a fresh home; its stdout and stderr go to files in `dir`.
struct Server {
    _child: KillOnDrop,
    url: String,
    stderr: PathBuf,
}

fn start_server(dir: &Path) -> Server {
    let (stdout, stderr) = (dir.join("server.out"), dir.join("server.err"));
    let child = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(["serve", "--listen", "127.0.0.1:0", "--json", "--model"])
        .arg(format!("{MODEL}={}", fixture().display()))
        .arg("--home")
        .arg(dir.join("home"))
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("whet serve starts");
    let mut child = KillOnDrop(child);
    // It prints one JSON line ({"url", "models", "home"}) once it listens.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = read(&stdout);
        if let Some(line) = out.lines().next().filter(|_| out.contains('\n')) {
            let v: Value = serde_json::from_str(line).expect("whet serve --json prints JSON");
            assert_eq!(v["models"], json!([MODEL]), "served models");
            let url = v["url"].as_str().expect("url").to_string();
            return Server {
                _child: child,
                url,
                stderr,
            };
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "whet serve exited ({status}) before listening:\n{}",
                read(&stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "whet serve printed no URL in 60 s:\n{}",
            read(&stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs drive.py against the server and returns its report (work files under `work`).
fn run_driver(python: &Path, server: &Server, work: &Path) -> Value {
    let (out, err, report) = (
        work.join("driver.out"),
        work.join("driver.err"),
        work.join("report.json"),
    );
    let child = Command::new(python)
        .arg(root().join("crates/cli/tests/tinker_sdk/drive.py"))
        .args(["--base-url", &server.url, "--model", MODEL, "--datums"])
        .arg(fixture().join("datums.jsonl"))
        .arg("--out")
        .arg(&report)
        .arg("--work")
        .arg(work.join("drive"))
        .env("TINKER_API_KEY", "tml-test")
        .env("TINKER_TELEMETRY", "0")
        .env_remove("TINKER_BASE_URL")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("the SDK's python starts");
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + DRIVER_TIMEOUT;
    let status = loop {
        match child.0.try_wait().unwrap() {
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            status => break status,
        }
    };
    let logs = || {
        format!(
            "--- driver stdout:\n{}\n--- driver stderr:\n{}\n--- server stderr:\n{}",
            read(&out),
            read(&err),
            read(&server.stderr)
        )
    };
    match status {
        None => panic!("drive.py ran past {DRIVER_TIMEOUT:?}\n{}", logs()),
        Some(s) if !s.success() => panic!("drive.py failed ({s})\n{}", logs()),
        Some(_) => {}
    }
    let report: Value = serde_json::from_str(&read(&report))
        .unwrap_or_else(|e| panic!("drive.py wrote no readable report ({e})\n{}", logs()));
    assert!(
        report.get("fatal").is_none(),
        "drive.py: {}\n{}",
        report["fatal"],
        logs()
    );
    assert_eq!(report["steps_done"], json!(STEPS), "steps done\n{}", logs());
    report
}

// ---------------------------------------------------------------------------------------------
// Comparing the report with the engine's values.

/// Walks `want` and requires `got` to hold the same values: integers (token ids) and strings
/// exactly, floats within TOL; objects may hold more keys than `want` (sequence ids, types).
fn compare(at: &str, got: &Value, want: &Value) {
    match want {
        Value::Object(w) => {
            for (k, v) in w {
                let g = got
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}: no key {k:?} in {got}"));
                compare(&format!("{at}.{k}"), g, v);
            }
        }
        Value::Array(w) => {
            let g = got
                .as_array()
                .unwrap_or_else(|| panic!("{at}: {got} is not an array"));
            assert_eq!(g.len(), w.len(), "{at}: length");
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                compare(&format!("{at}[{i}]"), g, w);
            }
        }
        Value::Number(n) if n.is_f64() => {
            let (g, w) = (got.as_f64(), n.as_f64().unwrap());
            let ok = g.is_some_and(|g| (g - w).abs() <= TOL * w.abs().max(1.0));
            assert!(ok, "{at}: server {got}, engine {w}");
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

/// A forward / forward_backward result in the driver's record shape.
fn fb_record(out: &ForwardBackwardOutput) -> Value {
    let logprobs: Vec<Vec<f32>> = out
        .loss_fn_outputs
        .iter()
        .map(|o| o["logprobs"].to_f32_vec())
        .collect();
    json!({"logprobs": logprobs, "metrics": out.metrics})
}

/// A sample response in the driver's record shape.
fn sample_record(r: &SampleResponse) -> Value {
    let seqs: Vec<Value> = r
        .sequences
        .iter()
        .map(|s| json!({"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason}))
        .collect();
    json!({
        "sequences": seqs,
        "prompt_logprobs": r.prompt_logprobs,
        "topk_prompt_logprobs": r.topk_prompt_logprobs,
    })
}

// ---------------------------------------------------------------------------------------------
// The driver's calls, replayed in process.

/// The fixture's datums, each with only the inputs its kind of loss is given (as drive.py).
fn datums(keys: &[&str]) -> Vec<Datum> {
    let text = std::fs::read_to_string(fixture().join("datums.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut d: Datum = serde_json::from_str(l).unwrap();
            d.loss_fn_inputs.retain(|k, _| keys.contains(&k.as_str()));
            assert_eq!(d.loss_fn_inputs.len(), keys.len(), "datum lacks {keys:?}");
            d
        })
        .collect()
}

/// drive.py's LOSS_CONFIGS.
fn loss_configs() -> Vec<(LossFn, LossFnConfig)> {
    let cfg = |kv: &[(&str, f64)]| kv.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    vec![
        (LossFn::CrossEntropy, cfg(&[])),
        (LossFn::ImportanceSampling, cfg(&[])),
        (
            LossFn::Ppo,
            cfg(&[("clip_low_threshold", 0.8), ("clip_high_threshold", 1.2)]),
        ),
        (
            LossFn::Cispo,
            cfg(&[("clip_low_threshold", 0.0), ("clip_high_threshold", 4.0)]),
        ),
        (LossFn::Dro, cfg(&[("beta", 0.05)])),
    ]
}

fn adam() -> AdamParams {
    AdamParams {
        learning_rate: LEARNING_RATE,
        ..AdamParams::default()
    }
}

/// The engine as the server builds it: f32 on CPU, EOS ids from the model config only (the
/// fixture has no tokenizer, so no detokenizer and no tokenizer EOS ids).
struct Engine {
    model: Arc<Model>,
    options: SamplerOptions,
    ce: Vec<Datum>,
    rl: Vec<Datum>,
    prompt: ModelInput,
    dir: tempfile::TempDir,
}

impl Engine {
    fn new() -> Self {
        let path = fixture().display().to_string();
        let (_, model) = whet_engine::load_model(&path, &Device::Cpu, Precision::F32).unwrap();
        let ce = datums(&["target_tokens", "weights"]);
        let rl = datums(&["target_tokens", "logprobs", "advantages"]);
        let prompt = ce[0].model_input.clone();
        Self {
            options: SamplerOptions {
                eos_token_ids: model.config.eos_token_ids.clone(),
                detokenize: None,
                ..Default::default()
            },
            model,
            ce,
            rl,
            prompt,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A fresh LoRA client as `create_lora_training_client(rank=4, seed=7, train_unembed=False)`.
    fn session(&self, name: &str) -> TrainingSession {
        let tinker = whet_contract::LoraConfig {
            rank: 4,
            seed: Some(7),
            train_unembed: false,
            train_mlp: true,
            train_attn: true,
        };
        let config = whet_lora::LoraConfig::from_tinker(&tinker).unwrap();
        let dir = self.dir.path().join(name);
        TrainingSession::new(
            self.model.clone(),
            MODEL,
            config,
            &dir,
            self.options.clone(),
        )
        .unwrap()
    }

    fn forward_ce(&self, tc: &mut dyn TrainingClient) -> Value {
        fb_record(
            &tc.forward(&self.ce, LossFn::CrossEntropy, &BTreeMap::new())
                .unwrap(),
        )
    }

    /// drive.py's train_step: forward_backward(ce) + optim_step, then forward(ce).
    fn train_step(&self, tc: &mut dyn TrainingClient) -> Value {
        let fb = tc.forward_backward(&self.ce, LossFn::CrossEntropy, &BTreeMap::new());
        let optim = tc.optim_step(&adam()).unwrap();
        json!({"fb": fb_record(&fb.unwrap()), "optim": optim.metrics, "after": self.forward_ce(tc)})
    }

    /// What a sampler answers to drive.py's sampling calls of step g (greedy, seeded, compute
    /// logprobs, prompt logprobs with top-3).
    fn sampler_record(&self, s: &dyn SamplingClient) -> Value {
        let greedy = SamplingParams {
            max_tokens: Some(6),
            temperature: 0.0,
            seed: Some(1),
            ..SamplingParams::default()
        };
        // The engine's sampling is a function of the seed: one StdRng per sequence, seeded from
        // the request's seed and the sequence's index in the request, over the same f32 logits
        // (the server runs each sample request on its own, as here). So the server's T=1
        // samples must be the very tokens sampled here, not merely look plausible.
        let seeded = SamplingParams {
            max_tokens: Some(6),
            temperature: 1.0,
            seed: Some(3),
            stop: Some(Stop::Tokens(vec![])),
            ..SamplingParams::default()
        };
        let first = SamplingParams {
            max_tokens: Some(1),
            ..greedy.clone()
        };
        let p = &self.prompt;
        json!({
            "greedy": sample_record(&s.sample(p, 2, &greedy, false, 0).unwrap()),
            "seeded": sample_record(&s.sample(p, 2, &seeded, false, 0).unwrap()),
            "compute_logprobs": s.compute_logprobs(p).unwrap(),
            "prompt_logprobs": sample_record(&s.sample(p, 1, &first, true, 3).unwrap()),
        })
    }

    /// Everything drive.py computes, in its report's shape (the numeric parts).
    fn expected(&self) -> Value {
        let mut r = json!({});
        let mut tc = self.session("run");
        // b. forward with every loss on the fresh adapter.
        for (loss, config) in loss_configs() {
            let data = if loss == LossFn::CrossEntropy {
                &self.ce
            } else {
                &self.rl
            };
            r["forward"][loss.name()] = fb_record(&tc.forward(data, loss, &config).unwrap());
        }
        // b2. a second client: forward_backward + optim_step with each loss in turn.
        let mut every = self.session("every-loss");
        for (loss, config) in loss_configs() {
            let data = if loss == LossFn::CrossEntropy {
                &self.ce
            } else {
                &self.rl
            };
            let fb = fb_record(&every.forward_backward(data, loss, &config).unwrap());
            let optim = every.optim_step(&adam()).unwrap();
            r["every_loss"][loss.name()] = json!({"fb": fb, "optim": optim.metrics});
        }
        // c. two accumulated forward_backward calls, one optim_step, then a forward.
        let fb_ce = tc.forward_backward(&self.ce, LossFn::CrossEntropy, &BTreeMap::new());
        let ppo = &loss_configs()[2].1;
        let fb_ppo = tc.forward_backward(&self.rl, LossFn::Ppo, ppo);
        let optim = tc.optim_step(&adam()).unwrap();
        r["step1"] = json!({
            "fb_ce": fb_record(&fb_ce.unwrap()),
            "fb_ppo": fb_record(&fb_ppo.unwrap()),
            "optim": optim.metrics,
        });
        r["after_step1"] = self.forward_ce(&mut tc);
        // d. the state "s1" and the weights of the named sampler "w1" (a snapshot).
        let state = tc.save_state("s1").unwrap();
        let named = tc.sampling_client().unwrap();
        // e. one more step on the same client.
        r["tc_step2"] = self.train_step(&mut tc);
        // f. resumed with the optimizer: the very same step. Weights only: a fresh AdamW.
        let mut tc2 = self.session("resumed");
        tc2.load_state_with_optimizer(&state).unwrap();
        r["tc2_step2"] = self.train_step(&mut tc2);
        let mut tc3 = self.session("weights-only");
        tc3.load_state(&state).unwrap();
        r["tc3_step2"] = self.train_step(&mut tc3);
        // The optimizer state must matter, or f would not tell the two resumes apart.
        let loss_after = |k: &str| r[k]["after"]["metrics"]["loss:sum"].as_f64().unwrap();
        assert!(
            (loss_after("tc2_step2") - loss_after("tc3_step2")).abs() > 1e-3,
            "resuming with and without the optimizer gave the same step"
        );
        // g. a sampler on the weights after step 2.
        r["ephemeral_sampler"] = self.sampler_record(tc.sampling_client().unwrap().as_ref());
        // h. the named sampler (weights after step 1) and the base model.
        let named = self.sampler_record(named.as_ref());
        r["named_sampler"] = json!({
            "greedy": named["greedy"],
            "compute_logprobs": named["compute_logprobs"],
        });
        let base = tc.base_sampling_client().unwrap();
        r["base_sampler"] =
            json!({"compute_logprobs": base.compute_logprobs(&self.prompt).unwrap()});
        r
    }

    /// Forward(ce) logprobs with the PEFT adapter in `dir`, loaded as `whet_engine::load_adapter`.
    fn forward_with_adapter(&self, dir: &Path) -> Value {
        let adapter = whet_engine::load_adapter(&self.model, dir)
            .unwrap_or_else(|e| panic!("loading the downloaded adapter {}: {e}", dir.display()));
        let ckpt = self.dir.path().join("downloaded");
        let mut tc = TrainingSession::with_adapter(
            self.model.clone(),
            MODEL,
            adapter,
            &ckpt,
            self.options.clone(),
        );
        self.forward_ce(&mut tc)
    }
}

// ---------------------------------------------------------------------------------------------
// The test.

fn conformance(version: &str) {
    let python = sdk_python(version);
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let server = start_server(tmp.path());
    let r = run_driver(&python, &server, tmp.path());
    drop(server);
    eprintln!(
        "tinker {version}: server + driver in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(r["sdk_version"], version, "the driver ran another SDK");

    // a. The LoRA client: rank and base model as asked.
    let run_id = r["tc_model_id"].as_str().expect("tc_model_id");
    assert_eq!(r["info"]["lora_rank"], 4, "get_info");
    assert_eq!(r["info"]["model_data"]["model_name"], MODEL, "get_info");

    // b.–h. Every number the server computed equals the engine's, in process.
    let started = Instant::now();
    let engine = Engine::new();
    let expected = engine.expected();
    compare("report", &r, &expected);
    eprintln!(
        "tinker {version}: numbers equal the engine's ({:.1} s in process)",
        started.elapsed().as_secs_f64()
    );
    // f. Resuming with the optimizer continues the run exactly: tc2 == tc, step for step.
    compare("tc2_step2 vs tc_step2", &r["tc2_step2"], &r["tc_step2"]);
    for id in ["tc2_model_id", "tc3_model_id"] {
        assert!(
            r[id].is_string() && r[id] != run_id,
            "{id}: a new run, got {}",
            r[id]
        );
    }

    // d./i. Checkpoint paths, and the REST listing: exactly this run's two checkpoints.
    let state_path = format!("tinker://{run_id}/weights/s1");
    let sampler_path = format!("tinker://{run_id}/sampler_weights/w1");
    assert_eq!(r["state_path"], state_path);
    assert_eq!(r["sampler_path"], sampler_path);
    let want = json!([
        {"checkpoint_id": "sampler_weights/w1", "checkpoint_type": "sampler", "tinker_path": sampler_path},
        {"checkpoint_id": "weights/s1", "checkpoint_type": "training", "tinker_path": state_path},
    ]);
    let rest = &r["rest"];
    for list in ["list_checkpoints", "list_user_checkpoints"] {
        // The home is fresh: the user's checkpoints are this run's.
        let mut got = rest[list].as_array().cloned().unwrap_or_default();
        got.sort_by_key(|c| c["checkpoint_id"].as_str().unwrap_or("").to_string());
        assert_eq!(Value::Array(got), want, "rest.{list}");
    }
    for run in ["training_run", "training_run_by_path"] {
        assert_eq!(rest[run]["training_run_id"], run_id, "rest.{run}");
        assert_eq!(rest[run]["base_model"], MODEL, "rest.{run}");
        assert_eq!(rest[run]["lora_rank"], 4, "rest.{run}");
    }
    assert_eq!(rest["weights_info"]["lora_rank"], 4, "rest.weights_info");
    assert_eq!(
        rest["weights_info"]["train_unembed"], false,
        "rest.weights_info"
    );

    // j. `tinker checkpoint download`: a PEFT adapter (0.34's archive also holds the marker of
    // a complete checkpoint), and it is the adapter of state s1: same logprobs as after step 1.
    let dl = &r["download"];
    assert_eq!(dl["returncode"], 0, "download: {dl}");
    let files: Vec<&str> = dl["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let has = |name: &str| {
        files
            .iter()
            .find(|f| Path::new(f).file_name().unwrap() == name)
    };
    let mut needed = vec!["adapter_config.json", "adapter_model.safetensors"];
    if version == "0.34.0" {
        needed.push("checkpoint_complete");
    }
    for name in needed {
        assert!(has(name).is_some(), "download lacks {name}: {files:?}");
    }
    let config = tmp
        .path()
        .join("drive/dl")
        .join(has("adapter_config.json").unwrap());
    let downloaded = engine.forward_with_adapter(config.parent().unwrap());
    compare("downloaded adapter", &downloaded, &expected["after_step1"]);

    // k. Bad input: the SDK's own error types, from 400s naming the field and a 404.
    let errors = &r["errors"];
    for (case, error_type, needles) in [
        ("unknown_model", "BadRequestError", ["400", "base_model"]),
        (
            "out_of_vocab",
            "BadRequestError",
            ["400", "data[0].model_input.tokens[0]"],
        ),
        (
            "missing_checkpoint",
            "NotFoundError",
            ["404", "nonexistent"],
        ),
    ] {
        let e = &errors[case];
        assert_eq!(e["ok"], false, "errors.{case}: the call succeeded: {e}");
        assert_eq!(e["error_type"], error_type, "errors.{case}: {e}");
        let message = e["message"].as_str().unwrap_or("");
        for needle in needles {
            assert!(
                message.contains(needle),
                "errors.{case}: {message:?} lacks {needle:?}"
            );
        }
    }
}
