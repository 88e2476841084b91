//! The job file. Its names are part of whet's interface:
//!
//! ```toml
//! name = "my-run"
//! shape = "sft"
//! model = "path/dir, path.gguf or hub id"
//! capability = "name@1.0.0"          # optional for datums
//! [data]
//! dataset = "name@version or a path"
//! format = "auto"                    # auto | chat | prompt_response | trajectories | datums
//! eval_dataset = "..."               # optional
//! [lora]
//! rank = 16
//! alpha = 32
//! init_adapter = "path to a PEFT adapter to continue from"   # optional
//! [optimizer]
//! learning_rate = 1e-4
//! [schedule]
//! epochs = 1
//! batch_size = 8
//! ```
//!
//! Every section has defaults; an unknown key anywhere is an error naming it, so a misspelt
//! setting never trains silently with its default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whet_data::{Format, Overflow, TrainOn};
use whet_rl::{RewardConfig, RlConfig};
use whet_sft::{OptimizerConfig, ScheduleConfig};

use crate::JobError;

/// The two shapes of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Supervised fine-tuning.
    Sft,
    /// Reinforcement learning.
    Rl,
}

/// `[data]`: where the rows come from and how they become tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// The training rows: `name@version[:split]` or a file path (published and pinned by
    /// hash when the job is submitted). May be empty when `trajectory_datasets` are given.
    pub dataset: String,
    /// The rows' kind.
    pub format: Format,
    /// Rows for the eval loss (same kinds), optional.
    pub eval_dataset: Option<String>,
    /// ATIF trajectory datasets, converted to chat and trained on with the rows of `dataset`.
    pub trajectory_datasets: Vec<String>,
    /// RL: the prompts the policy answers (`name@version[:split]` or a file), each row scored
    /// by the `[reward]` recipe.
    pub prompt_dataset: String,
    /// RL: a world manifest (`world.yaml`) to play live episodes in.
    pub world_manifest: Option<PathBuf>,
    /// Which messages carry loss.
    pub train_on: TrainOn,
    /// Longest sequence in tokens (default: the model's context).
    pub max_length: Option<usize>,
    /// What to do with longer rows.
    pub overflow: Overflow,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            dataset: String::new(),
            format: Format::Auto,
            eval_dataset: None,
            trajectory_datasets: vec![],
            prompt_dataset: String::new(),
            world_manifest: None,
            train_on: TrainOn::AllAssistantMessages,
            max_length: None,
            overflow: Overflow::Truncate,
        }
    }
}

/// `[lora]`: the adapter trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank.
    pub rank: usize,
    /// `lora_alpha` (scaling `alpha / rank`).
    pub alpha: f64,
    /// Dropout on the adapter's input.
    pub dropout: f64,
    /// Projections that carry an adapter (PEFT names).
    pub target_modules: Vec<String>,
    /// Seed of the initialisation and the dropout masks.
    pub seed: u64,
    /// A PEFT adapter to continue training (its rank, alpha and targets then apply).
    pub init_adapter: Option<PathBuf>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            seed: 0,
            init_adapter: None,
        }
    }
}

/// Where a job trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// whet's engine in this process.
    #[default]
    Local,
    /// A Tinker-protocol server (`[tinker]`): `whet serve` on another machine, or a hosted
    /// service.
    Tinker,
}

fn default_key_env() -> String {
    "TINKER_API_KEY".into()
}

/// `[tinker]`: the server of a `backend = "tinker"` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TinkerBackend {
    /// The server, e.g. `http://gpu-box:8000`.
    pub base_url: String,
    /// The model's name on the server (its `base_model`). The job's `model` stays a local
    /// copy: its tokenizer and chat template render the rows here.
    pub base_model: String,
    /// The environment variable that holds the API key (a key is never stored in a job).
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
}

/// A job file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Where it trains: `local` (the default) or `tinker` (then `[tinker]` says where).
    #[serde(default)]
    pub backend: BackendKind,
    /// The server of `backend = "tinker"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tinker: Option<TinkerBackend>,
    /// A name for people.
    pub name: String,
    /// SFT or RL.
    pub shape: Shape,
    /// The base model: a Hugging Face directory, a .gguf file or a cached hub id.
    pub model: String,
    /// The capability `name@version` whose system prompt and tools scaffold every row.
    #[serde(default)]
    pub capability: Option<String>,
    /// Labels for finding the job later.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The rows.
    pub data: DataSpec,
    /// The adapter.
    #[serde(default)]
    pub lora: LoraSpec,
    /// AdamW.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Length, batches, order, schedule, checkpoints.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// RL: the recipe that scores rollouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<RewardConfig>,
    /// RL: rollouts, groups, the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl: Option<RlConfig>,
}

impl JobSpec {
    /// Reads and checks a job file; relative paths in it are taken from the file's directory.
    pub fn from_file(path: &Path) -> Result<Self, JobError> {
        let err = |message: String| JobError::Spec {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut spec = Self::from_toml(&text).map_err(err)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| -> String {
            let candidate = base.join(p);
            if !p.is_empty() && !p.contains('@') && Path::new(p).is_relative() && candidate.exists()
            {
                candidate.display().to_string()
            } else {
                p.to_string()
            }
        };
        spec.model = resolve(&spec.model);
        spec.data.dataset = resolve(&spec.data.dataset);
        spec.data.eval_dataset = spec.data.eval_dataset.as_deref().map(resolve);
        spec.data.prompt_dataset = resolve(&spec.data.prompt_dataset);
        if let Some(w) = &spec.data.world_manifest {
            if w.is_relative() && base.join(w).exists() {
                spec.data.world_manifest = Some(base.join(w));
            }
        }
        spec.data.trajectory_datasets = spec
            .data
            .trajectory_datasets
            .iter()
            .map(|t| resolve(t))
            .collect();
        if let Some(a) = &spec.lora.init_adapter {
            if a.is_relative() && base.join(a).exists() {
                spec.lora.init_adapter = Some(base.join(a));
            }
        }
        Ok(spec)
    }

    /// The RL job's `[reward]`: as given, else `trajectory_imitation_v1` for offline RL on
    /// trajectories alone, else `exact_match_v1`.
    pub fn reward_config(&self) -> RewardConfig {
        self.reward.clone().unwrap_or_else(|| {
            if self.data.prompt_dataset.is_empty() && !self.data.trajectory_datasets.is_empty() {
                RewardConfig {
                    recipe: "trajectory_imitation_v1".into(),
                    ..RewardConfig::default()
                }
            } else {
                RewardConfig::default()
            }
        })
    }

    /// Parses and checks job-file text (errors name the key).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let spec: Self = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        spec.check()?;
        Ok(spec)
    }

    /// Checks what the types cannot: non-empty names, a positive rank and rate, a dropout in
    /// [0, 1), `name@version` capability refs. Errors name the key.
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("`name` is empty".into());
        }
        if self.model.trim().is_empty() {
            return Err("`model` is empty".into());
        }
        match (self.backend, &self.tinker) {
            (BackendKind::Local, Some(_)) => {
                return Err("`[tinker]` is for `backend = \"tinker\"` jobs".into())
            }
            (BackendKind::Tinker, None) => return Err(
                "`backend = \"tinker\"` needs a `[tinker]` table with `base_url` and `base_model`"
                    .into(),
            ),
            (BackendKind::Tinker, Some(t)) => {
                if !(t.base_url.starts_with("http://") || t.base_url.starts_with("https://")) {
                    return Err(format!(
                        "`tinker.base_url` {:?} is not an http:// or https:// URL",
                        t.base_url
                    ));
                }
                if t.base_model.trim().is_empty() {
                    return Err("`tinker.base_model` is empty".into());
                }
            }
            (BackendKind::Local, None) => {}
        }
        match self.shape {
            Shape::Sft => {
                if self.data.dataset.trim().is_empty() && self.data.trajectory_datasets.is_empty() {
                    return Err(
                        "`data.dataset` is empty (and no `data.trajectory_datasets`)".into(),
                    );
                }
                if !self.data.prompt_dataset.is_empty()
                    || self.rl.is_some()
                    || self.reward.is_some()
                {
                    return Err(
                        "`data.prompt_dataset`, `[rl]` and `[reward]` belong to `shape = \"rl\"` jobs".into(),
                    );
                }
            }
            Shape::Rl => {
                let sources = usize::from(!self.data.prompt_dataset.trim().is_empty())
                    + usize::from(!self.data.trajectory_datasets.is_empty())
                    + usize::from(self.data.world_manifest.is_some());
                if sources == 0 {
                    return Err(
                        "an RL job needs `data.prompt_dataset` (prompts to answer), \
                                `data.trajectory_datasets` (offline RL) or `data.world_manifest` \
                                (live episodes)"
                            .into(),
                    );
                }
                if self.data.world_manifest.is_some() && sources > 1 {
                    return Err("`data.world_manifest` is the job's only experience source \
                                (leave out prompt_dataset and trajectory_datasets)"
                        .into());
                }
                if !self.data.dataset.is_empty() {
                    return Err("an RL job takes its rows from `data.prompt_dataset` or \
                                `data.trajectory_datasets`; `data.dataset` is for SFT"
                        .into());
                }
                self.rl.clone().unwrap_or_default().check()?;
                let reward = self.reward_config();
                whet_rl::recipe(&reward.recipe, &reward.params)
                    .map_err(|e| format!("`[reward]`: {e}"))?;
            }
        }
        if self.lora.rank == 0 {
            return Err("`lora.rank` must be at least 1".into());
        }
        const PROJECTIONS: [&str; 7] = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        if self.lora.target_modules.is_empty() {
            return Err("`lora.target_modules` is empty".into());
        }
        if let Some(t) = self
            .lora
            .target_modules
            .iter()
            .find(|t| !PROJECTIONS.contains(&t.as_str()))
        {
            return Err(format!(
                "`lora.target_modules`: {t:?} is not one of {}",
                PROJECTIONS.join(", ")
            ));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err("`lora.dropout` must be in [0, 1)".into());
        }
        if self.optimizer.learning_rate.is_nan() || self.optimizer.learning_rate <= 0.0 {
            return Err("`optimizer.learning_rate` must be positive".into());
        }
        if let Some(c) = &self.capability {
            if !c.contains('@') {
                return Err(format!("`capability` = {c:?}: expected name@version"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "demo"
shape = "sft"
model = "models/m.gguf"
[data]
dataset = "rows.jsonl"
"#;

    #[test]
    fn a_minimal_file_takes_every_default() {
        let s = JobSpec::from_toml(MINIMAL).unwrap();
        assert_eq!(s.shape, Shape::Sft);
        assert_eq!((s.lora.rank, s.lora.alpha), (16, 32.0));
        assert_eq!(s.schedule.epochs, 1);
        assert_eq!(s.optimizer.learning_rate, 1e-4);
        assert_eq!(s.data.format, Format::Auto);
    }

    #[test]
    fn the_documented_file_parses() {
        let text = r#"
name = "my-run"
shape = "sft"
model = "m.gguf"
capability = "support@1.0.0"
[data]
dataset = "faq@1.0.0"
format = "chat"
eval_dataset = "faq-eval@1.0.0"
[lora]
rank = 8
alpha = 16
[optimizer]
learning_rate = 2e-4
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.0
grad_clip_norm = 1.0
[schedule]
epochs = 2
steps = 100
batch_size = 4
shuffle = true
seed = 0
lr_schedule = "cosine"
warmup_steps = 5
checkpoint_interval = 50
"#;
        let s = JobSpec::from_toml(text).unwrap();
        assert_eq!(s.lora.rank, 8);
        assert_eq!(s.schedule.steps, Some(100));
        assert_eq!(s.schedule.lr_schedule, whet_sft::LrSchedule::Cosine);
        assert_eq!(s.data.format, Format::Chat);
    }

    #[test]
    fn mistakes_name_the_key() {
        let typo = MINIMAL.replace("[data]", "[schedule]\nepoch = 2\n[data]");
        let e = JobSpec::from_toml(&typo).unwrap_err();
        assert!(e.contains("epoch"), "{e}");
        let e = JobSpec::from_toml(&MINIMAL.replace("\"sft\"", "\"dpo\"")).unwrap_err();
        assert!(e.contains("shape") || e.contains("dpo"), "{e}");
        let e = JobSpec::from_toml(&format!("{MINIMAL}[lora]\nrank = 0\n")).unwrap_err();
        assert!(e.contains("lora.rank"), "{e}");
        let e = JobSpec::from_toml(&format!("{MINIMAL}[lora]\ntarget_modules = [\"qproj\"]\n"))
            .unwrap_err();
        assert!(
            e.contains("lora.target_modules") && e.contains("qproj"),
            "{e}"
        );
        let e = JobSpec::from_toml(&MINIMAL.replace("rows.jsonl", "")).unwrap_err();
        assert!(e.contains("data.dataset"), "{e}");
        let e = JobSpec::from_toml(&format!("capability = \"support\"\n{MINIMAL}")).unwrap_err();
        assert!(e.contains("name@version"), "{e}");
    }

    #[test]
    fn a_tinker_backend_needs_its_server() {
        let remote = format!("backend = \"tinker\"\n{MINIMAL}[tinker]\nbase_url = \"http://box:8000\"\nbase_model = \"org/m\"\n");
        let s = JobSpec::from_toml(&remote).unwrap();
        assert_eq!(s.backend, BackendKind::Tinker);
        let t = s.tinker.unwrap();
        assert_eq!(
            (t.base_model.as_str(), t.api_key_env.as_str()),
            ("org/m", "TINKER_API_KEY")
        );
        let e = JobSpec::from_toml(&format!("backend = \"tinker\"\n{MINIMAL}")).unwrap_err();
        assert!(e.contains("[tinker]"), "{e}");
        let e = JobSpec::from_toml(&remote.replace("http://box:8000", "box:8000")).unwrap_err();
        assert!(e.contains("tinker.base_url"), "{e}");
        let e = JobSpec::from_toml(&remote.replace("backend = \"tinker\"\n", "")).unwrap_err();
        assert!(e.contains("[tinker]"), "{e}");
        assert_eq!(
            JobSpec::from_toml(MINIMAL).unwrap().backend,
            BackendKind::Local
        );
    }
}
