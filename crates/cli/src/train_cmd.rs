//! `whet train JOB.toml` (or `whet train sft --flags…`): submits a job — its record in the
//! home's database, its data pinned, its capability resolved — and runs it in the foreground
//! with a progress bar (loss, tokens/s, ETA), or queues it for `whet worker` with `--detach`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::Value;
use whet_engine::Precision;
use whet_jobs::{Home, JobSpec, Store};

use crate::backend;
use crate::train_flags::Flags;

/// Arguments of `whet train`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    /// The job file (TOML): name, shape, model, capability, [data], [lora], [optimizer],
    /// [schedule].
    #[arg(required = true)]
    job: Option<PathBuf>,
    /// The job as flags instead of a file.
    #[command(subcommand)]
    flags: Option<Flags>,
    /// Queue the job for `whet worker` instead of running it here.
    #[arg(long, global = true)]
    detach: bool,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    dev: crate::common::DeviceArgs,
}

/// Flags shared by the commands that run jobs.
#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// whet's home: the database, the registries and the jobs' checkpoints
    /// (default: $WHET_HOME, else ~/.whet).
    #[arg(long, env = "WHET_HOME", global = true)]
    pub home: Option<PathBuf>,
    /// The base model's precision: f32 or bf16.
    #[arg(long, default_value = "f32", global = true)]
    pub precision: Precision,
    /// Show the model's greedy answers to the first N eval prompts (training prompts without
    /// an eval set) before and after training.
    #[arg(long, default_value_t = 0, global = true)]
    pub preview: usize,
    /// Print the final job record as one JSON line.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Submits and runs (or queues) the job.
pub fn run(a: Args) -> Result<()> {
    a.dev.select()?;
    let spec = match (&a.job, &a.flags) {
        (Some(file), _) => JobSpec::from_file(file)?,
        (None, Some(Flags::Sft(f))) => f.clone().spec()?,
        (None, Some(Flags::Rl(f))) => f.clone().spec()?,
        (None, None) => bail!(
            "give a job file, or `whet train sft --model M --dataset D ...`, or `whet train rl ...`"
        ),
    };
    let home = Home::resolve(a.run.home.clone())?;
    let mut store = Store::open(&home.db())?;
    let record = whet_jobs::runner::submit(
        &home,
        &mut store,
        &mut backend::Local::default(),
        &spec,
        &a.run.precision.to_string(),
        a.run.preview,
        None,
    )?;
    drop(store);
    let id = record["id"].as_str().unwrap_or_default().to_string();
    if a.detach {
        return queued(&record, a.run.json);
    }
    backend::catch_interrupts();
    let record = backend::run_job(&home, &id, a.run.json)?;
    report(&record, a.run.json)
}

/// Says a job was queued.
pub fn queued(record: &Value, json: bool) -> Result<()> {
    if json {
        println!("{record}");
    } else {
        let id = record["id"].as_str().unwrap_or_default();
        println!("{id}: queued (`whet worker` runs it; `whet jobs wait {id}` waits for it)");
    }
    Ok(())
}

/// Prints a finished job (its record with `--json`; the preview and a summary otherwise) and
/// fails unless it completed.
pub fn report(record: &Value, json: bool) -> Result<()> {
    let id = record["id"].as_str().unwrap_or_default();
    let status = record["status"].as_str().unwrap_or("unknown");
    if json {
        println!("{record}");
    }
    match status {
        "completed" => {}
        "cancelled" => bail!(
            "{id}: cancelled after step {}; its last checkpoint is kept: `whet jobs resume {id}`",
            record["metrics"]["step"].as_u64().unwrap_or(0)
        ),
        _ => bail!(
            "{id}: {status}: {}",
            record["error"].as_str().unwrap_or("(no error recorded)")
        ),
    }
    if json {
        return Ok(());
    }
    for p in record["preview"].as_array().into_iter().flatten() {
        println!("Q: {}", p["prompt"].as_str().unwrap_or_default());
        let line = |k: &str| p[k].as_str().unwrap_or_default().replace('\n', " ");
        println!("   before: {}", line("before"));
        println!("   after:  {}", line("after"));
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
        "{id}: completed {} steps, loss {:.4}{eval}; adapter {}",
        m["step"],
        m["loss"].as_f64().unwrap_or(f64::NAN),
        record["artifacts"]["final_adapter"].as_str().unwrap_or("-")
    );
    Ok(())
}
