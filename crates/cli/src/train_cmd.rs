//! `whet train JOB.toml`: an SFT job in the foreground — rows checked and rendered before any
//! compute, a progress bar with loss, tokens/s and ETA, metrics as JSON lines, checkpoints and
//! the final adapter in the run's directory under the home, and the job record at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use whet_data::Scaffold;
use whet_engine::{Precision, TrainingSession};
use whet_jobs::{JobSpec, Shape};
use whet_lora::{LoraConfig, Target};
use whet_sft::{Checkpoint, Control, Observer, Rendering, StepMetrics};

use crate::common;
use crate::train_flags::Flags;

/// Arguments of `whet train`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    /// The job file (TOML): name, shape, model, [data], [lora], [optimizer], [schedule].
    #[arg(required = true)]
    job: Option<PathBuf>,
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

fn now() -> u64 {
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

/// Progress and metrics of the running job.
struct Progress {
    bar: ProgressBar,
    metrics: std::fs::File,
    log: std::fs::File,
    last: Option<StepMetrics>,
    checkpoints: Vec<Checkpoint>,
    initial_eval: Option<f64>,
    /// The run's directory and its record, rewritten (atomically) at the start and after each
    /// checkpoint: a run killed at any moment leaves a record naming its last good checkpoint.
    dir: PathBuf,
    record: Value,
}

impl Progress {
    fn save(&self) {
        if let Err(e) = write_record(&self.dir, &self.record) {
            tracing::warn!("writing the job record: {e:#}");
        }
    }

    /// One log entry, `{timestamp, level, message, data}`; `data.event` names the platform's
    /// progress events (training_start, step_complete, eval_complete, checkpoint_saved,
    /// training_error, training_end).
    fn log(&mut self, level: &str, message: String, data: Value) {
        let line =
            json!({"timestamp": rfc3339(now()), "level": level, "message": message, "data": data});
        if let Err(e) = writeln!(self.log, "{line}") {
            tracing::warn!("writing the log: {e}");
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (days to civil date: Howard Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Observer for Progress {
    fn on_step(&mut self, m: &StepMetrics) -> Control {
        self.bar.set_position(m.step as u64);
        let eval = m
            .eval_loss
            .map(|e| format!("  eval {e:.4}"))
            .unwrap_or_default();
        self.bar.set_message(format!(
            "loss {:.4}{eval}  {:.0} tok/s",
            m.loss, m.tokens_per_second
        ));
        let line = serde_json::to_string(m).unwrap_or_default();
        if let Err(e) = writeln!(self.metrics, "{line}") {
            tracing::warn!("writing metrics: {e}");
        }
        self.last = Some(m.clone());
        let data = json!({"event": "step_complete", "metrics": m});
        self.log("info", format!("step {} loss {:.4}", m.step, m.loss), data);
        if let Some(e) = m.eval_loss {
            let data = json!({"event": "eval_complete", "step": m.step, "eval_loss": e});
            self.log("info", format!("eval loss {e:.4} at step {}", m.step), data);
        }
        Control::Continue
    }

    fn on_checkpoint(&mut self, c: &Checkpoint) {
        self.checkpoints.push(c.clone());
        self.record["artifacts"]["checkpoints"] = json!(self.checkpoints);
        self.record["metrics"] = json!(self.last);
        self.save();
        let data = json!({"event": "checkpoint_saved", "checkpoint": c});
        self.log("info", format!("checkpoint at step {}", c.step), data);
    }

    fn on_initial_eval(&mut self, eval_loss: f64) {
        self.initial_eval = Some(eval_loss);
        self.bar
            .set_message(format!("eval {eval_loss:.4} before training"));
        let line = json!({"step": 0, "eval_loss": eval_loss});
        if let Err(e) = writeln!(self.metrics, "{line}") {
            tracing::warn!("writing metrics: {e}");
        }
    }
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

/// Runs the job; on failure after the run directory exists, the record says why.
pub fn run(a: Args) -> Result<()> {
    let (spec, origin) = match (&a.job, a.flags) {
        (Some(file), _) => (JobSpec::from_file(file)?, file.display().to_string()),
        (None, Some(Flags::Sft(f))) => (f.spec()?, "flags".to_string()),
        (None, None) => bail!("give a job file, or `whet train sft --model M --dataset D ...`"),
    };
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
    let lora = lora_config(&spec)?;
    let rows = whet_data::read_rows(&dataset, spec.data.format)?;
    let eval_rows = match &eval_file {
        Some(f) => whet_data::read_rows(f, spec.data.format)?,
        None => vec![],
    };
    // Conversations need the tokenizer; datums alone do not.
    let chats = rows
        .iter()
        .chain(&eval_rows)
        .any(|(_, r)| matches!(r, whet_data::Row::Chat(_)));
    let loaded = common::load(&spec.model, a.precision, chats)?;
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
    let (examples, prepared) = whet_sft::prepare(&rows, &dataset, tok, &rendering)?;
    let eval = match &eval_file {
        Some(f) => whet_sft::prepare(&eval_rows, f, tok, &rendering)?.0,
        None => vec![],
    };
    let plan = whet_sft::Plan::new(examples.len(), &spec.schedule)?;
    let adapter = match &spec.lora.init_adapter {
        Some(dir) => Some(common::load_adapter(&loaded, dir)?),
        None => None,
    };

    let created = now();
    let slug: String = spec
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
    let dir = home(a.home)?.join("runs").join(&id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ckpt = dir.join("checkpoints");
    let mut session = match adapter {
        Some(ad) => TrainingSession::with_adapter(
            loaded.model.clone(),
            &spec.model,
            ad,
            &ckpt,
            common::sampler_options(&loaded),
        ),
        None => TrainingSession::new(
            loaded.model.clone(),
            &spec.model,
            lora,
            &ckpt,
            common::sampler_options(&loaded),
        )?,
    };
    tracing::info!(
        "{id}: {} rows ({} tokens, {} trained; {} truncated, {} dropped), {} steps",
        examples.len(),
        prepared.tokens,
        prepared.trained_tokens,
        prepared.truncated.len(),
        prepared.dropped.len(),
        plan.total_steps()
    );
    let bar = ProgressBar::new(plan.total_steps() as u64).with_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let prompts = match tok {
        Some(_) if a.preview > 0 => preview_prompts(
            if eval_rows.is_empty() {
                &rows
            } else {
                &eval_rows
            },
            a.preview,
        ),
        _ => vec![],
    };
    let before = match tok {
        Some(t) if !prompts.is_empty() => answers(&mut session, t, &prompts)?,
        _ => vec![],
    };
    let mut progress = Progress {
        bar,
        metrics: std::fs::File::create(dir.join("metrics.jsonl"))?,
        log: std::fs::File::create(dir.join("log.jsonl"))?,
        last: None,
        checkpoints: vec![],
        initial_eval: None,
        record: json!({
            "id": id,
            "status": "running",
            "name": spec.name,
            "trainer_type": "sft",
            "model": spec.model,
            "precision": a.precision.to_string(),
            "dataset_ref": dataset.display().to_string(),
            "config": spec,
            "data": prepared,
            "artifacts": {
                "checkpoints": [],
                "metrics": dir.join("metrics.jsonl").display().to_string(),
                "logs": dir.join("log.jsonl").display().to_string(),
            },
            "created_at": created,
        }),
        dir: dir.clone(),
    };
    progress.save();
    progress.log(
        "info",
        format!(
            "training {} on {} rows, {} steps",
            spec.model,
            examples.len(),
            plan.total_steps()
        ),
        json!({"event": "training_start", "rows": examples.len(), "tokens": prepared.tokens,
               "trained_tokens": prepared.trained_tokens, "steps": plan.total_steps()}),
    );
    let result = whet_sft::train(
        &mut session,
        &examples,
        &eval,
        &spec.optimizer,
        &spec.schedule,
        0,
        &mut progress,
    );
    progress.bar.finish_and_clear();
    let (status, error) = match &result {
        Ok(_) => ("completed", Value::Null),
        Err(e) => ("failed", Value::String(e.to_string())),
    };
    match &result {
        Ok(o) => progress.log(
            "info",
            format!("completed {} steps", o.steps),
            json!({"event": "training_end", "steps": o.steps}),
        ),
        Err(e) => progress.log("error", e.to_string(), json!({"event": "training_error"})),
    }
    let after = match tok {
        Some(t) if result.is_ok() && !prompts.is_empty() => answers(&mut session, t, &prompts)?,
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
    let last = progress.checkpoints.last();
    let record = json!({
        "id": id,
        "status": status,
        "name": spec.name,
        "trainer_type": "sft",
        "model": spec.model,
        "precision": a.precision.to_string(),
        "dataset_ref": dataset.display().to_string(),
        "config": spec,
        "data": prepared,
        "metrics": progress.last,
        "initial_eval_loss": progress.initial_eval,
        "artifacts": {
            "final_adapter": last.filter(|_| result.is_ok()).map(|c| c.adapter.clone()),
            "checkpoints": progress.checkpoints,
            "metrics": dir.join("metrics.jsonl").display().to_string(),
            "logs": dir.join("log.jsonl").display().to_string(),
        },
        "error": error,
        "preview": preview,
        "created_at": created,
        "completed_at": now(),
    });
    write_record(&dir, &record)?;
    result?;
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
        let eval = match (progress.initial_eval, m["eval_loss"].as_f64()) {
            (Some(a), Some(b)) => format!(", eval loss {a:.4} → {b:.4}"),
            (None, Some(b)) => format!(", eval loss {b:.4}"),
            _ => String::new(),
        };
        println!(
            "{id}: completed {} steps, loss {:.4}{eval}; adapter {}",
            m["step"],
            m["loss"].as_f64().unwrap_or(f64::NAN),
            record["artifacts"]["final_adapter"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}

fn write_record(dir: &Path, record: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(record)?;
    whet_lora::io::write_atomic(&dir.join("job.json"), text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_996_800 + 3661), "2026-11-30T01:01:01Z");
    }
}
