//! `whet`: train and sample LLM adapters locally with Tinker's contract.

mod adapter_cmd;
mod backend;
mod checkpoints_cmd;
mod common;
mod data_cmd;
mod jobs_cmd;
mod logprobs_cmd;
mod model_cmd;
mod models_cmd;
mod registry_cmd;
mod remote;
mod sample_cmd;
mod serve_cmd;
mod train_cmd;
mod train_flags;
mod worlds_cmd;

use clap::{Parser, Subcommand};

/// whet — a native training engine for LLM adapters (Tinker's contract, on your machine).
///
/// A model (M) is a Hugging Face directory, a .gguf file, or a hub id already in the local
/// Hugging Face cache. Get the default model with `tools/get-smollm2.sh`.
#[derive(Parser)]
#[command(name = "whet", version, propagate_version = true)]
struct Cli {
    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score Tinker datums: per-target logprobs and the weighted loss, one JSON line per datum.
    Logprobs(logprobs_cmd::Args),
    /// Sample completions of a prompt rendered with the model's chat template.
    Sample(sample_cmd::Args),
    /// Work with LoRA adapters.
    #[command(subcommand)]
    Adapter(adapter_cmd::Command),
    /// Inspect models.
    #[command(subcommand)]
    Model(model_cmd::Command),
    /// Submit a training job (a job file, or `sft` with flags) and run it in the foreground
    /// (progress, metrics, checkpoints, the final adapter, the job record), or `--detach` it.
    Train(Box<train_cmd::Args>),
    /// Jobs: list, get, logs, metrics, artifacts, cancel, retry, wait, resume.
    #[command(subcommand)]
    Jobs(jobs_cmd::Command),
    /// Run queued jobs (`whet train --detach`), oldest first.
    Worker(jobs_cmd::WorkerArgs),
    /// The dataset registry: push, list, show.
    #[command(subcommand)]
    Datasets(registry_cmd::Datasets),
    /// The capability registry (system prompt and tools): push, list, show.
    #[command(subcommand)]
    Capabilities(registry_cmd::Capabilities),
    /// The models registry: publish a job's checkpoint with its lineage, aliases, export.
    #[command(subcommand)]
    Models(models_cmd::Command),
    /// Worlds: play episodes against a world manifest and write ATIF trajectories.
    #[command(subcommand)]
    Worlds(worlds_cmd::Command),
    /// See what a dataset becomes for a model: tokens and trained tokens per row.
    #[command(subcommand)]
    Data(data_cmd::Command),
    /// Serve the Tinker wire protocol: the official `tinker` SDK and the cookbook's recipes
    /// train and sample on this machine.
    Serve(serve_cmd::Args),
    /// The home's Tinker checkpoints: import a PEFT adapter, list, export, delete.
    #[command(subcommand)]
    Checkpoints(checkpoints_cmd::Command),
    /// API keys of `whet serve` beyond loopback: create, list, revoke.
    #[command(subcommand)]
    Keys(serve_cmd::Keys),
}

fn main() {
    // `whet jobs list --json | head -1`: a closed pipe ends the program quietly, as it does
    // for other command-line tools, instead of a panic on the next print.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    whet::runtime::init();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Logprobs(a) => logprobs_cmd::run(a),
        Command::Sample(a) => sample_cmd::run(a),
        Command::Adapter(c) => adapter_cmd::run(c),
        Command::Model(c) => model_cmd::run(c),
        Command::Data(c) => data_cmd::run(c),
        Command::Train(a) => train_cmd::run(*a),
        Command::Jobs(c) => jobs_cmd::run(c),
        Command::Worker(a) => jobs_cmd::worker(a),
        Command::Datasets(c) => registry_cmd::datasets(c),
        Command::Capabilities(c) => registry_cmd::capabilities(c),
        Command::Worlds(c) => worlds_cmd::run(c),
        Command::Models(c) => models_cmd::run(c),
        Command::Serve(a) => serve_cmd::run(a),
        Command::Keys(c) => serve_cmd::keys(c),
        Command::Checkpoints(c) => checkpoints_cmd::run(c),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    /// Every command's flags are consistent (clap checks this only when a command is used).
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
