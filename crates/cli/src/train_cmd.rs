//! `whet train JOB.toml`: an SFT job in the foreground — rows checked and rendered before any
//! compute, a progress bar with loss, tokens/s and ETA, metrics as JSON lines, checkpoints and
//! the final adapter in the run's directory under the home, and the job record at the end.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use whet_data::Scaffold;
use whet_engine::{Precision, TrainingSession};
use whet_jobs::{JobSpec, Shape};
use whet_lora::{LoraConfig, Target};
use whet_sft::{Checkpoint, Rendering};

use crate::common;
use crate::run_dir::{write_record, Progress};
use crate::train_flags::Flags;

/// Arguments of `whet train`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    /// The job file (TOML): name, shape, model, [data], [lora], [optimizer], [schedule].
    #[arg(required_unless_present = "resume")]
    job: Option<PathBuf>,
    /// Resume the run with this id from its last checkpoint (bitwise the run it would have
    /// been): after a crash, a kill or Ctrl-C.
    #[arg(long, conflicts_with = "job")]
    resume: Option<String>,
    /// The job as flags instead of a file.
    #[command(subcommand)]
    flags: Option<Flags>,
    /// whet's home: runs are kept under HOME/runs/ID (default: $WHET_HOME, else ~/.whet).
    #[arg(long, env = "WHET_HOME", global = true)]
    home: Option<PathBuf>,
    /// The base model's precision: f32 or bf16.
    #[arg(long, default_value = "f32", global = true)]
    precision: Precision,
    /// Show the model's greedy answers to the first N eval prompts (training prompts without
    /// an eval set) before and after training.
    #[arg(long, default_value_t = 0, global = true)]
    preview: usize,
    /// Print the final job record as one JSON line.
    #[arg(long, global = true)]
    json: bool,
}

/// Prompts for `--preview`: each conversation up to its last assistant message.
fn preview_prompts(rows: &[(usize, whet_data::Row)], n: usize) -> Vec<Vec<Value>> {
    rows.iter()
        .filter_map(|(_, r)| match r {
            whet_data::Row::Chat(c) => {
                let last = c.messages.iter().rposition(|m| m["role"] == "assistant")?;
                Some(c.messages[..last].to_vec())
            }
            whet_data::Row::Datum(_) => None,
        })
        .take(n)
        .collect()
}

/// Greedy answers (up to 48 tokens) of the session's current weights.
fn answers(
    session: &mut TrainingSession,
    tok: &whet_data::Tokenizer,
    prompts: &[Vec<Value>],
) -> Result<Vec<String>> {
    use whet_contract::{ModelInput, SamplingParams, TrainingClient};
    let sampler = session.sampling_client()?;
    let params = SamplingParams {
        max_tokens: Some(48),
        temperature: 0.0,
        ..SamplingParams::default()
    };
    prompts
        .iter()
        .map(|messages| {
            let ids = tok.apply_chat_template(messages, None, true)?;
            let input = ModelInput::from_ints(ids.iter().map(|&t| t as i64).collect());
            let out = sampler.sample(&input, 1, &params, false, 0)?;
            let tokens: Vec<u32> = out.sequences[0].tokens.iter().map(|&t| t as u32).collect();
            Ok(tok.decode(&tokens, true)?.trim().to_string())
        })
        .collect()
}

fn home(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(h) = arg {
        return Ok(h);
    }
    let user = std::env::var_os("HOME").context("neither --home, WHET_HOME nor HOME is set")?;
    Ok(PathBuf::from(user).join(".whet"))
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A local file the job names (registries of `name@version` come with the store).
fn local_file(what: &str, spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_file() {
        return Ok(p);
    }
    if spec.contains('@') {
        bail!("{what} {spec:?}: this home has no dataset registry yet; name the file instead");
    }
    bail!("{what} {spec:?}: no such file")
}

fn lora_config(spec: &JobSpec) -> Result<LoraConfig> {
    let target_modules = spec
        .lora
        .target_modules
        .iter()
        .map(|t| {
            serde_json::from_value::<Target>(Value::String(t.clone())).map_err(|_| {
                anyhow::anyhow!(
                    "lora.target_modules: {t:?} is not one of q_proj, k_proj, v_proj, o_proj, \
                     gate_proj, up_proj, down_proj"
                )
            })
        })
        .collect::<Result<_>>()?;
    Ok(LoraConfig {
        rank: spec.lora.rank,
        alpha: spec.lora.alpha,
        dropout: spec.lora.dropout,
        seed: spec.lora.seed,
        target_modules,
        ..LoraConfig::default()
    })
}

/// Everything a run needs, checked and loaded before any compute.
struct Prepared {
    spec: JobSpec,
    dataset: PathBuf,
    rows: Vec<(usize, whet_data::Row)>,
    eval_rows: Vec<(usize, whet_data::Row)>,
    examples: Vec<whet_sft::Example>,
    eval: Vec<whet_sft::Example>,
    report: whet_sft::Prepared,
    plan: whet_sft::Plan,
    loaded: common::Loaded,
    /// sha256 of the dataset files, so a resumed run refuses data that changed.
    data_sha256: Value,
}

fn prepare(spec: JobSpec, origin: &str, precision: Precision) -> Result<Prepared> {
    if spec.shape != Shape::Sft {
        bail!("{origin}: shape = \"rl\": RL jobs are not available yet");
    }
    if let Some(c) = &spec.capability {
        bail!("capability {c:?}: this home has no capability registry yet; leave it out");
    }
    // Everything that can be wrong with the input is found before any compute.
    let dataset = local_file("data.dataset", &spec.data.dataset)?;
    let eval_file = match &spec.data.eval_dataset {
        Some(e) => Some(local_file("data.eval_dataset", e)?),
        None => None,
    };
    lora_config(&spec)?;
    let rows = whet_data::read_rows(&dataset, spec.data.format)?;
    let eval_rows = match &eval_file {
        Some(f) => whet_data::read_rows(f, spec.data.format)?,
        None => vec![],
    };
    let sha = |p: &Path| -> Result<String> { Ok(whet_lora::io::sha256_file(p)?) };
    let data_sha256 = json!({
        "dataset": sha(&dataset)?,
        "eval_dataset": eval_file.as_deref().map(sha).transpose()?,
    });
    // Conversations need the tokenizer; datums alone do not.
    let chats = rows
        .iter()
        .chain(&eval_rows)
        .any(|(_, r)| matches!(r, whet_data::Row::Chat(_)));
    let loaded = common::load(&spec.model, precision, chats)?;
    let tok = loaded.tokenizer.as_deref();
    let rendering = Rendering {
        scaffold: Scaffold::default(),
        train_on: spec.data.train_on,
        max_length: spec
            .data
            .max_length
            .unwrap_or(loaded.model.config.max_position_embeddings),
        overflow: spec.data.overflow,
    };
    let (examples, report) = whet_sft::prepare(&rows, &dataset, tok, &rendering)?;
    let eval = match &eval_file {
        Some(f) => whet_sft::prepare(&eval_rows, f, tok, &rendering)?.0,
        None => vec![],
    };
    let plan = whet_sft::Plan::new(examples.len(), &spec.schedule)?;
    Ok(Prepared {
        spec,
        dataset,
        rows,
        eval_rows,
        examples,
        eval,
        report,
        plan,
        loaded,
        data_sha256,
    })
}

/// A fresh session: the job's new LoRA, or its `init_adapter`.
fn new_session(p: &Prepared, ckpt: &Path) -> Result<TrainingSession> {
    let loaded = &p.loaded;
    Ok(match &p.spec.lora.init_adapter {
        Some(dir) => TrainingSession::with_adapter(
            loaded.model.clone(),
            &p.spec.model,
            common::load_adapter(loaded, dir)?,
            ckpt,
            common::sampler_options(loaded),
        ),
        None => TrainingSession::new(
            loaded.model.clone(),
            &p.spec.model,
            lora_config(&p.spec)?,
            ckpt,
            common::sampler_options(loaded),
        )?,
    })
}

/// Runs the job; on failure after the run directory exists, the record says why.
pub fn run(a: Args) -> Result<()> {
    let home = home(a.home.clone())?;
    if let Some(id) = &a.resume {
        return resume(&a, &home, id);
    }
    let (spec, origin) = match (&a.job, &a.flags) {
        (Some(file), _) => (JobSpec::from_file(file)?, file.display().to_string()),
        (None, Some(Flags::Sft(f))) => (f.clone().spec()?, "flags".to_string()),
        (None, None) => bail!("give a job file, or `whet train sft --model M --dataset D ...`"),
    };
    let p = prepare(spec, &origin, a.precision)?;
    let created = now();
    let slug: String = p
        .spec
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let id = format!("{slug}-{created:x}");
    let dir = home.join("runs").join(&id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut session = new_session(&p, &dir.join("checkpoints"))?;
    let record = json!({
        "id": id,
        "status": "running",
        "name": p.spec.name,
        "trainer_type": "sft",
        "model": p.spec.model,
        "precision": a.precision.to_string(),
        "dataset_ref": p.dataset.display().to_string(),
        "data_sha256": p.data_sha256,
        "config": p.spec,
        "data": p.report,
        "artifacts": {
            "checkpoints": [],
            "metrics": dir.join("metrics.jsonl").display().to_string(),
            "logs": dir.join("log.jsonl").display().to_string(),
        },
        "created_at": created,
    });
    let progress = Progress::open(&dir, record, p.plan.total_steps(), false)?;
    execute(&a, &p, &mut session, progress, 0, vec![])
}

/// Continues run `id` from the last checkpoint its record names.
fn resume(a: &Args, home: &Path, id: &str) -> Result<()> {
    let dir = home.join("runs").join(id);
    let path = dir.join("job.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("run {id}: reading {}", path.display()))?;
    let mut record: Value =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    match record["status"].as_str() {
        Some("running" | "failed" | "cancelled") => {}
        other => bail!(
            "run {id} is {}: nothing to resume",
            other.unwrap_or("unknown")
        ),
    }
    let spec: JobSpec = serde_json::from_value(record["config"].clone())
        .with_context(|| format!("{}: config", path.display()))?;
    let precision: Precision = record["precision"].as_str().unwrap_or("f32").parse()?;
    let p = prepare(spec, &path.display().to_string(), precision)?;
    if p.data_sha256 != record["data_sha256"] {
        bail!("run {id}: the dataset files changed since the run started; resuming would not be the same run");
    }
    let checkpoints: Vec<Checkpoint> = record["artifacts"]["checkpoints"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    Some(Checkpoint {
                        step: c["step"].as_u64()? as usize,
                        state: c["state"].as_str()?.to_string(),
                        adapter: c["adapter"].as_str()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut session = new_session(&p, &dir.join("checkpoints"))?;
    let start = match checkpoints.last() {
        Some(c) => {
            use whet_contract::TrainingClient;
            session
                .load_state_with_optimizer(&c.state)
                .with_context(|| format!("run {id}: loading checkpoint {}", c.state))?;
            c.step
        }
        None => 0,
    };
    // Metrics past the checkpoint are redone: keep the rows up to it.
    let metrics_path = dir.join("metrics.jsonl");
    let kept: String = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|m| m["step"].as_u64())
                .is_some_and(|s| (s as usize) <= start)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    whet_lora::io::write_atomic(&metrics_path, kept.as_bytes())?;
    record["status"] = json!("running");
    record["error"] = Value::Null;
    let mut progress = Progress::open(&dir, record, p.plan.total_steps(), true)?;
    progress.bar.set_position(start as u64);
    progress.log(
        "info",
        format!("resumed at step {start}"),
        json!({"event": "training_start", "resumed_from_step": start}),
    );
    execute(a, &p, &mut session, progress, start, checkpoints)
}

/// Trains from `start` to the end and writes the final record.
fn execute(
    a: &Args,
    p: &Prepared,
    session: &mut TrainingSession,
    mut progress: Progress,
    start: usize,
    checkpoints: Vec<Checkpoint>,
) -> Result<()> {
    let tok = p.loaded.tokenizer.as_deref();
    let prompts = match tok {
        Some(_) if a.preview > 0 => preview_prompts(
            if p.eval_rows.is_empty() {
                &p.rows
            } else {
                &p.eval_rows
            },
            a.preview,
        ),
        _ => vec![],
    };
    let before = match tok {
        Some(t) if !prompts.is_empty() => answers(session, t, &prompts)?,
        _ => vec![],
    };
    progress.checkpoints = checkpoints;
    progress.save();
    if start == 0 {
        progress.log(
            "info",
            format!(
                "training {} on {} rows, {} steps",
                p.spec.model,
                p.examples.len(),
                p.plan.total_steps()
            ),
            json!({"event": "training_start", "rows": p.examples.len(), "tokens": p.report.tokens,
                   "trained_tokens": p.report.trained_tokens, "steps": p.plan.total_steps()}),
        );
    }
    crate::run_dir::catch_interrupts();
    let result = whet_sft::train(
        session,
        &p.examples,
        &p.eval,
        &p.spec.optimizer,
        &p.spec.schedule,
        start,
        &mut progress,
    );
    progress.bar.finish_and_clear();
    let cancelled = result.as_ref().is_ok_and(|o| o.stopped);
    let error = match &result {
        Ok(o) if o.stopped => {
            let data = json!({"event": "training_end", "steps": o.steps, "cancelled": true});
            progress.log("warn", format!("cancelled after step {}", o.steps), data);
            Value::Null
        }
        Ok(o) => {
            let data = json!({"event": "training_end", "steps": o.steps});
            progress.log("info", format!("completed {} steps", o.steps), data);
            Value::Null
        }
        Err(e) => {
            progress.log("error", e.to_string(), json!({"event": "training_error"}));
            Value::String(e.to_string())
        }
    };
    let after = match tok {
        Some(t) if result.is_ok() && !cancelled && !prompts.is_empty() => {
            answers(session, t, &prompts)?
        }
        _ => vec![],
    };
    let preview: Vec<Value> = prompts
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(p, (b, a))| {
            let question = p.last().map(|m| m["content"].clone()).unwrap_or_default();
            json!({"prompt": question, "before": b, "after": a})
        })
        .collect();
    let final_adapter = progress
        .checkpoints
        .last()
        .filter(|_| result.is_ok() && !cancelled)
        .map(|c| c.adapter.clone());
    let r = &mut progress.record;
    r["status"] = json!(match &result {
        Ok(_) if cancelled => "cancelled",
        Ok(_) => "completed",
        Err(_) => "failed",
    });
    r["metrics"] = json!(progress.last);
    if progress.initial_eval.is_some() {
        r["initial_eval_loss"] = json!(progress.initial_eval);
    }
    r["artifacts"]["checkpoints"] = json!(progress.checkpoints);
    r["artifacts"]["final_adapter"] = json!(final_adapter);
    r["error"] = error;
    r["preview"] = json!(preview);
    r["completed_at"] = json!(now());
    let record = r.clone();
    write_record(&progress.dir, &record)?;
    let outcome = result?;
    if cancelled {
        bail!(
            "{}: cancelled after step {}; its last checkpoint is kept: `whet train --resume {}`",
            record["id"].as_str().unwrap_or_default(),
            outcome.steps,
            record["id"].as_str().unwrap_or_default()
        );
    }
    if a.json {
        println!("{record}");
    } else {
        for p in &preview {
            println!("Q: {}", p["prompt"].as_str().unwrap_or_default());
            println!(
                "   before: {}",
                p["before"].as_str().unwrap_or_default().replace('\n', " ")
            );
            println!(
                "   after:  {}",
                p["after"].as_str().unwrap_or_default().replace('\n', " ")
            );
        }
        let m = &record["metrics"];
        let eval = match (
            record["initial_eval_loss"].as_f64(),
            m["eval_loss"].as_f64(),
        ) {
            (Some(a), Some(b)) => format!(", eval loss {a:.4} → {b:.4}"),
            (None, Some(b)) => format!(", eval loss {b:.4}"),
            _ => String::new(),
        };
        println!(
            "{}: completed {} steps, loss {:.4}{eval}; adapter {}",
            record["id"].as_str().unwrap_or_default(),
            m["step"],
            m["loss"].as_f64().unwrap_or(f64::NAN),
            record["artifacts"]["final_adapter"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}
