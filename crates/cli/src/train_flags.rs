//! `whet train sft ...`: an SFT job given as flags — the job file's keys, one flag each, over
//! the job file's defaults.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::{json, Value};
use whet_jobs::JobSpec;

/// `whet train sft ...`: the job file's keys as flags.
#[derive(Clone, clap::Subcommand)]
pub enum Flags {
    /// An SFT job from flags (the job file's keys; defaults as in a job file).
    Sft(SftFlags),
    /// An RL job from flags (the job file's keys; defaults as in a job file).
    Rl(RlFlags),
}

/// The SFT job file as flags.
#[derive(Clone, clap::Args)]
pub struct SftFlags {
    /// Base model: a Hugging Face directory, a .gguf file or a cached hub id.
    #[arg(long)]
    model: String,
    /// Training rows: a published `name@version[:split]`, or a file (published and pinned by
    /// hash).
    #[arg(long, default_value = "")]
    dataset: String,
    /// Eval rows (same forms).
    #[arg(long)]
    eval_dataset: Option<String>,
    /// ATIF trajectory datasets, converted to chat and trained on too (repeatable).
    #[arg(long = "trajectory-dataset")]
    trajectory_datasets: Vec<String>,
    /// Labels for the job (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// A name for the run.
    #[arg(long, default_value = "sft")]
    name: String,
    /// Capability `name@version`.
    #[arg(long)]
    capability: Option<String>,
    /// Rows' kind: auto, chat, prompt_response, trajectories or datums.
    #[arg(long)]
    format: Option<whet_data::Format>,
    /// all_assistant_messages, last_assistant_message or all_messages.
    #[arg(long)]
    train_on: Option<whet_data::TrainOn>,
    /// Longest sequence in tokens (default: the model's context).
    #[arg(long)]
    max_length: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// A PEFT adapter to continue from.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Peak learning rate.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Passes over the rows.
    #[arg(long)]
    epochs: Option<usize>,
    /// A cap on optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Rows per optimizer step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per optimizer step instead of a row count (rows packed up to the budget).
    #[arg(long, conflicts_with = "batch_size")]
    batch_tokens: Option<usize>,
    /// Forward/backward passes per step.
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    /// constant, linear or cosine.
    #[arg(long)]
    lr_schedule: Option<String>,
    /// Linear warmup steps.
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long)]
    checkpoint_interval: Option<usize>,
    /// Eval every N steps.
    #[arg(long)]
    eval_interval: Option<usize>,
    /// Shuffling seed.
    #[arg(long)]
    seed: Option<u64>,
}

impl SftFlags {
    /// The job these flags describe: a job file's defaults, overridden flag by flag.
    pub fn spec(self) -> Result<JobSpec> {
        let mut s: JobSpec = serde_json::from_value(json!({
            "name": self.name,
            "shape": "sft",
            "model": self.model,
            "capability": self.capability,
            "tags": self.tags,
            "data": {"dataset": self.dataset, "eval_dataset": self.eval_dataset,
                     "trajectory_datasets": self.trajectory_datasets},
        }))?;
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        set(&mut s.data.format, self.format);
        set(&mut s.data.train_on, self.train_on);
        s.data.max_length = self.max_length.or(s.data.max_length);
        set(&mut s.lora.rank, self.lora_rank);
        set(&mut s.lora.alpha, self.lora_alpha);
        s.lora.init_adapter = self.init_adapter;
        set(&mut s.optimizer.learning_rate, self.learning_rate);
        let sc = &mut s.schedule;
        set(&mut sc.epochs, self.epochs);
        sc.steps = self.steps.or(sc.steps);
        set(&mut sc.batch_size, self.batch_size);
        sc.batch_tokens = self.batch_tokens.or(sc.batch_tokens);
        set(
            &mut sc.gradient_accumulation_steps,
            self.gradient_accumulation_steps,
        );
        set(&mut sc.warmup_steps, self.warmup_steps);
        set(&mut sc.checkpoint_interval, self.checkpoint_interval);
        set(&mut sc.eval_interval, self.eval_interval);
        set(&mut sc.seed, self.seed);
        if let Some(l) = self.lr_schedule {
            sc.lr_schedule = serde_json::from_value(Value::String(l.clone())).map_err(|_| {
                anyhow::anyhow!("--lr-schedule {l:?}: expected constant, linear or cosine")
            })?;
        }
        s.check().map_err(anyhow::Error::msg)?;
        Ok(s)
    }
}

/// The RL job file as flags.
#[derive(Clone, clap::Args)]
pub struct RlFlags {
    /// Base model: a Hugging Face directory, a .gguf file or a cached hub id.
    #[arg(long)]
    model: String,
    /// Prompts: a published `name@version[:split]`, or a file.
    #[arg(
        long,
        default_value = "",
        required_unless_present_any = ["trajectory_datasets", "world_manifest"]
    )]
    prompt_dataset: String,
    /// A world manifest (world.yaml): live RL on its episodes.
    #[arg(long)]
    world_manifest: Option<std::path::PathBuf>,
    /// ATIF trajectory datasets for offline RL (repeatable): one prompt per recorded agent
    /// step, scored by `trajectory_imitation_v1` unless another recipe is given.
    #[arg(long = "trajectory-dataset")]
    trajectory_datasets: Vec<String>,
    /// Eval prompts (scored greedily).
    #[arg(long)]
    eval_dataset: Option<String>,
    /// A name for the run.
    #[arg(long, default_value = "rl")]
    name: String,
    /// Capability `name@version`: its system prompt and tools.
    #[arg(long)]
    capability: Option<String>,
    /// Labels for the job (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Reward recipe: exact_match_v1 (the default with prompts), contains_v1, row_reward_v1,
    /// trajectory_imitation_v1 (the default for trajectories alone), task_verifier_v1,
    /// gsm8k_v1 or command_v1.
    #[arg(long)]
    reward_recipe: Option<String>,
    /// The recipe's parameters as JSON, e.g. '{"needle": "!"}'.
    #[arg(long)]
    reward_params: Option<String>,
    /// importance_sampling, ppo, cispo or dro.
    #[arg(long)]
    algorithm: Option<String>,
    /// Rollouts per prompt (the group).
    #[arg(long)]
    num_rollouts: Option<usize>,
    /// Prompts per step.
    #[arg(long)]
    groups_per_step: Option<usize>,
    /// Longest completion in tokens.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Sampling temperature.
    #[arg(long)]
    temperature: Option<f64>,
    /// sync, one_step_off_async or fully_async.
    #[arg(long)]
    execution_mode: Option<String>,
    /// Staleness bound of the async modes.
    #[arg(long)]
    max_steps_off_policy: Option<usize>,
    /// Sampling temperature of the evals (0, the default: greedy).
    #[arg(long)]
    eval_temperature: Option<f64>,
    /// Rollouts per eval prompt or world eval seed (needs --eval-temperature above 0).
    #[arg(long)]
    eval_num_rollouts: Option<usize>,
    /// β of a KL penalty against the base model (0: off).
    #[arg(long)]
    kl_penalty_coef: Option<f64>,
    /// Fail the job after a step whose share of failed rollouts is above this (0–1;
    /// default 1: failures are counted and logged, and the job goes on).
    #[arg(long)]
    max_error_rate: Option<f64>,
    /// LoRA rank.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Passes over the prompts.
    #[arg(long)]
    epochs: Option<usize>,
    /// A cap on optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long)]
    checkpoint_interval: Option<usize>,
    /// Eval every N steps.
    #[arg(long)]
    eval_interval: Option<usize>,
    /// Seed of the prompt order and the sampler.
    #[arg(long)]
    seed: Option<u64>,
}

impl RlFlags {
    /// The job these flags describe: a job file's defaults, overridden flag by flag.
    pub fn spec(self) -> Result<JobSpec> {
        let params: Value = match &self.reward_params {
            Some(p) => serde_json::from_str(p)
                .map_err(|e| anyhow::anyhow!("--reward-params: not JSON: {e}"))?,
            None => Value::Null,
        };
        let rl = given(&[
            ("algorithm", json!(self.algorithm)),
            ("num_rollouts", json!(self.num_rollouts)),
            ("groups_per_step", json!(self.groups_per_step)),
            ("max_new_tokens", json!(self.max_new_tokens)),
            ("temperature", json!(self.temperature)),
            ("execution_mode", json!(self.execution_mode)),
            ("max_steps_off_policy", json!(self.max_steps_off_policy)),
            ("eval_temperature", json!(self.eval_temperature)),
            ("eval_num_rollouts", json!(self.eval_num_rollouts)),
            ("kl_penalty_coef", json!(self.kl_penalty_coef)),
            ("max_error_rate", json!(self.max_error_rate)),
        ]);
        let schedule = given(&[
            ("epochs", json!(self.epochs)),
            ("steps", json!(self.steps)),
            ("checkpoint_interval", json!(self.checkpoint_interval)),
            ("eval_interval", json!(self.eval_interval)),
            ("seed", json!(self.seed)),
        ]);
        let lora = given(&[("rank", json!(self.lora_rank))]);
        let optimizer = given(&[("learning_rate", json!(self.learning_rate))]);
        let s: JobSpec = serde_json::from_value(json!({
            "name": self.name,
            "shape": "rl",
            "model": self.model,
            "capability": self.capability,
            "tags": self.tags,
            "data": {"prompt_dataset": self.prompt_dataset, "eval_dataset": self.eval_dataset,
                     "trajectory_datasets": self.trajectory_datasets,
                     "world_manifest": self.world_manifest},
            "reward": self.reward_recipe.map(|r| json!({"recipe": r, "params": params})),
            "rl": rl,
            "schedule": schedule,
            "lora": lora,
            "optimizer": optimizer,
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        s.check().map_err(anyhow::Error::msg)?;
        Ok(s)
    }
}

/// The flags that were given, as a job-file table (a flag left out keeps the file's default).
fn given(pairs: &[(&str, Value)]) -> serde_json::Map<String, Value> {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}
