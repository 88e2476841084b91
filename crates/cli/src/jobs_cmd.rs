//! `whet jobs …` (list, get, logs, metrics, artifacts, cancel, retry, wait, resume) and
//! `whet worker`: the job lifecycle `queued → running → completed | failed | cancelled`, read
//! and driven from any terminal through the home's database.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use whet_jobs::{Cancel, Home, JobSpec, TERMINAL};

use crate::backend;
use crate::common::HomeArgs;
use crate::train_cmd::{queued, report};
use whet_jobs::runner;

/// `whet jobs …`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Jobs, newest first.
    List {
        /// Only jobs with this status (queued, running, completed, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        common: HomeArgs,
    },
    /// A job's record.
    Get(Job),
    /// A job's log: `{timestamp, level, message, data}` entries.
    Logs {
        #[command(flatten)]
        job: Job,
        /// Keep printing new entries until the job ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// A job's metrics, one row per step (`--json`: JSON lines).
    Metrics(Job),
    /// A job's artifacts: checkpoints and the final adapter.
    Artifacts(Job),
    /// Cancel a queued job, or stop a running one after its current step (it keeps its last
    /// checkpoint).
    Cancel(Job),
    /// Run a failed or cancelled job again from the start, as a new job.
    Retry {
        #[command(flatten)]
        job: Job,
        /// Queue it for `whet worker` instead of running it here.
        #[arg(long)]
        detach: bool,
        /// Show answers to N prompts before and after training.
        #[arg(long, default_value_t = 0)]
        preview: usize,
    },
    /// Wait until a job ends; exits non-zero unless it completed (a timeout included).
    Wait {
        #[command(flatten)]
        job: Job,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Continue a failed, cancelled or killed job from its last checkpoint; it ends with the
    /// same adapter, bitwise, as a run never stopped.
    Resume {
        #[command(flatten)]
        job: Job,
        /// Queue it for `whet worker` instead of running it here.
        #[arg(long)]
        detach: bool,
    },
}

/// A job id with `--home` and `--json`.
#[derive(clap::Args)]
pub struct Job {
    /// The job's id (see `whet jobs list`).
    id: String,
    #[command(flatten)]
    common: HomeArgs,
}

/// `whet worker`: runs queued jobs, oldest first.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// Exit when the queue is empty instead of waiting for more jobs.
    #[arg(long)]
    once: bool,
    /// Seconds between looks at an empty queue.
    #[arg(long, default_value_t = 2.0)]
    poll: f64,
    #[command(flatten)]
    common: HomeArgs,
}

/// The record as the user sees it: a `running` job whose process is gone says so.
fn annotate(home: &Home, mut record: Value) -> Value {
    let id = record["id"].as_str().unwrap_or_default().to_string();
    if record["status"] == "running" && !runner::runner_alive(home, &id) {
        record["runner_gone"] = json!(true);
    }
    record
}

fn duration(record: &Value) -> String {
    let secs = |k: &str| -> Option<i64> {
        let t = record[k].as_str()?;
        // YYYY-MM-DDTHH:MM:SSZ → seconds within comparison (same format, same day math).
        let (date, time) = t.trim_end_matches('Z').split_once('T')?;
        let d: Vec<i64> = date.split('-').filter_map(|x| x.parse().ok()).collect();
        let h: Vec<i64> = time.split(':').filter_map(|x| x.parse().ok()).collect();
        let (y, m, day) = (*d.first()?, *d.get(1)?, *d.get(2)?);
        let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
        let days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * m + 2) / 5 + day;
        Some(days * 86_400 + h.first()? * 3600 + h.get(1)? * 60 + h.get(2)?)
    };
    match (secs("started_at"), secs("completed_at")) {
        (Some(a), Some(b)) => format!("{}s", b - a),
        _ => "-".into(),
    }
}

/// Runs `whet jobs …`.
pub fn run(c: Command) -> Result<()> {
    match c {
        Command::List { status, common } => {
            if let Some(s) = &status {
                if !["queued", "running"].contains(&s.as_str()) && !TERMINAL.contains(&s.as_str()) {
                    bail!(
                        "--status {s:?}: expected queued, running, completed, failed or cancelled"
                    );
                }
            }
            let (home, store) = common.open()?;
            let jobs = store.jobs(status.as_deref())?;
            if common.json {
                for j in jobs {
                    println!("{}", annotate(&home, j));
                }
                return Ok(());
            }
            println!(
                "{:<36} {:<10} {:>6} {:>8}  {:<20}  model",
                "id", "status", "step", "time", "created"
            );
            for j in jobs {
                let j = annotate(&home, j);
                let status = if j["runner_gone"] == true {
                    "killed"
                } else {
                    j["status"].as_str().unwrap_or("")
                };
                println!(
                    "{:<36} {:<10} {:>6} {:>8}  {:<20}  {}",
                    j["id"].as_str().unwrap_or(""),
                    status,
                    j["metrics"]["step"]
                        .as_u64()
                        .map(|s| s.to_string())
                        .unwrap_or("-".into()),
                    duration(&j),
                    j["created_at"].as_str().unwrap_or(""),
                    j["model"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Command::Get(j) => {
            let (home, store) = j.common.open()?;
            let record = annotate(&home, store.job(&j.id)?);
            if j.common.json {
                println!("{record}");
            } else {
                println!("{}", serde_json::to_string_pretty(&record)?);
            }
            Ok(())
        }
        Command::Logs { job, follow } => logs(&job, follow),
        Command::Metrics(j) => {
            let (_, store) = j.common.open()?;
            store.job(&j.id)?;
            let rows = store.metrics(&j.id)?;
            if j.common.json {
                for r in rows {
                    println!("{r}");
                }
                return Ok(());
            }
            println!(
                "{:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "step", "loss", "lr", "tok/s", "grad_norm", "eval_loss"
            );
            let f =
                |v: &Value, p: usize| v.as_f64().map(|x| format!("{x:.p$}")).unwrap_or("-".into());
            for r in rows {
                println!(
                    "{:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
                    r["step"],
                    f(&r["loss"], 4),
                    r["learning_rate"]
                        .as_f64()
                        .map(|x| format!("{x:.2e}"))
                        .unwrap_or("-".into()),
                    f(&r["tokens_per_second"], 1),
                    f(&r["grad_norm"], 4),
                    f(&r["eval_loss"], 4)
                );
            }
            Ok(())
        }
        Command::Artifacts(j) => {
            let (_, store) = j.common.open()?;
            let artifacts = store.job(&j.id)?["artifacts"].clone();
            if j.common.json {
                println!("{artifacts}");
            } else {
                println!("{}", serde_json::to_string_pretty(&artifacts)?);
            }
            Ok(())
        }
        Command::Cancel(j) => {
            let (home, mut store) = j.common.open()?;
            let now = whet_jobs::now_rfc3339();
            let outcome = store.cancel(&j.id, &now)?;
            let message = match &outcome {
                Cancel::Cancelled => "cancelled".to_string(),
                Cancel::Requested if !runner::runner_alive(&home, &j.id) => {
                    // Its process was killed: nobody will see the request; end it here.
                    let mut record = store.job(&j.id)?;
                    record["status"] = json!("cancelled");
                    record["completed_at"] = json!(now);
                    store.save_job(&record)?;
                    "cancelled (its process was gone; its last checkpoint is kept)".to_string()
                }
                Cancel::Requested => "stopping after the current step".to_string(),
                Cancel::AlreadyEnded(s) => format!("already {s}"),
            };
            if j.common.json {
                println!("{}", json!({"id": j.id, "result": message}));
            } else {
                println!("{}: {message}", j.id);
            }
            Ok(())
        }
        Command::Retry {
            job,
            detach,
            preview,
        } => {
            let (home, mut store) = job.common.open()?;
            let old = store.job(&job.id)?;
            match old["status"].as_str() {
                Some("failed" | "cancelled") => {}
                other => bail!(
                    "job {} is {}: only failed or cancelled jobs are retried",
                    job.id,
                    other.unwrap_or("unknown")
                ),
            }
            let spec: JobSpec = serde_json::from_value(old["config"].clone())?;
            let precision = old["precision"].as_str().unwrap_or("f32").to_string();
            let record = runner::submit(
                &home,
                &mut store,
                &mut backend::Local::default(),
                &spec,
                &precision,
                preview,
                Some(&job.id),
            )?;
            drop(store);
            if detach {
                return queued(&record, job.common.json);
            }
            backend::catch_interrupts();
            let id = record["id"].as_str().unwrap_or_default().to_string();
            report(
                &backend::run_job(&home, &id, job.common.json)?,
                job.common.json,
            )
        }
        Command::Wait { job, timeout } => wait(&job, timeout),
        Command::Resume { job, detach } => {
            let (home, mut store) = job.common.open()?;
            let record = store.job(&job.id)?;
            let status = record["status"].as_str().unwrap_or("unknown");
            let killed = status == "running" && !runner::runner_alive(&home, &job.id);
            if !(killed || status == "failed" || status == "cancelled") {
                bail!("job {} is {status}: nothing to resume", job.id);
            }
            let to = if detach { "queued" } else { "running" };
            if !store.transition(&job.id, &["running", "failed", "cancelled"], to)? {
                bail!("job {} changed status meanwhile", job.id);
            }
            drop(store);
            if detach {
                return queued(&record, job.common.json);
            }
            backend::catch_interrupts();
            report(
                &backend::run_job(&home, &job.id, job.common.json)?,
                job.common.json,
            )
        }
    }
}

fn logs(job: &Job, follow: bool) -> Result<()> {
    let (home, store) = job.common.open()?;
    store.job(&job.id)?;
    let mut after = 0;
    loop {
        for (seq, e) in store.events(&job.id, after)? {
            after = seq;
            if job.common.json {
                println!("{e}");
            } else {
                println!(
                    "{} {:<5} {}",
                    e["timestamp"].as_str().unwrap_or(""),
                    e["level"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                );
            }
        }
        if !follow {
            return Ok(());
        }
        let record = store.job(&job.id)?;
        let status = record["status"].as_str().unwrap_or("");
        let gone = status == "running" && !runner::runner_alive(&home, &job.id);
        if TERMINAL.contains(&status) || gone {
            // One last look: entries written just before the end.
            for (_, e) in store.events(&job.id, after)? {
                println!(
                    "{}",
                    if job.common.json {
                        e.to_string()
                    } else {
                        e["message"].as_str().unwrap_or("").to_string()
                    }
                );
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait(job: &Job, timeout: Option<f64>) -> Result<()> {
    let (home, store) = job.common.open()?;
    let started = Instant::now();
    loop {
        let record = store.job(&job.id)?;
        let status = record["status"].as_str().unwrap_or("unknown").to_string();
        if TERMINAL.contains(&status.as_str()) {
            return report(&record, job.common.json);
        }
        if status == "running" && !runner::runner_alive(&home, &job.id) {
            bail!(
                "job {}: its process is gone (killed?); `whet jobs resume {}` continues it",
                job.id,
                job.id
            );
        }
        if timeout.is_some_and(|t| started.elapsed().as_secs_f64() >= t) {
            bail!(
                "job {} is still {status} after {}s",
                job.id,
                timeout.unwrap_or(0.0)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs queued jobs one after another in this process.
pub fn worker(a: WorkerArgs) -> Result<()> {
    let (home, mut store) = a.common.open()?;
    backend::catch_interrupts();
    let cancel = || backend::CANCEL.load(std::sync::atomic::Ordering::SeqCst);
    loop {
        if cancel() {
            return Ok(());
        }
        let Some(id) = store.claim_queued()? else {
            if a.once {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs_f64(a.poll.max(0.1)));
            continue;
        };
        eprintln!("{id}: running");
        match backend::run_job(&home, &id, true) {
            Ok(record) => {
                let status = record["status"].as_str().unwrap_or("unknown");
                if a.common.json {
                    println!("{record}");
                } else {
                    eprintln!(
                        "{id}: {status}{}",
                        record["error"]
                            .as_str()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    );
                }
            }
            Err(e) => eprintln!("{id}: {e:#}"),
        }
    }
}
