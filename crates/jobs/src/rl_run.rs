//! Running an RL job (`shape = "rl"`): the prompt dataset rendered and every row checked
//! against the recipe before any compute, then [`whet_rl::train`] from the last checkpoint, its
//! metrics and log in the store and every rollout in `runs/<id>/rollouts.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde_json::{json, Value};
use whet_data::Scaffold;
use whet_rl::{Metrics, Prompt, Rollout};
use whet_sft::{Checkpoint, Control};

use crate::recorder::{checkpoints_of, Display, Recorder};
use crate::runner::Backend;
use crate::{capabilities, datasets, Home, JobError, JobSpec, Store};

/// The rollouts log: one JSON line per rollout; a resumed job first drops the lines of the
/// steps it redoes.
fn open_rollouts(path: &Path, keep_through: usize) -> Result<std::fs::File, JobError> {
    let kept: String = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= keep_through)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(|e| JobError::io(path, e))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| JobError::io(path, e))
}

/// The SFT recorder, fed by the RL loop, plus the rollouts log.
struct RlRecorder<'r, 's> {
    inner: &'r mut Recorder<'s>,
    rollouts: std::fs::File,
    rollouts_path: PathBuf,
}

impl whet_rl::Observer for RlRecorder<'_, '_> {
    fn on_step(&mut self, m: &Metrics) -> Control {
        let step = m.get("step").copied().unwrap_or(0.0) as usize;
        let eval = eval_text(m).map(|e| format!("  {e}")).unwrap_or_default();
        let reward = m.get("train/reward_mean").copied().unwrap_or(0.0);
        let success = m
            .get("worlds/success_rate")
            .map(|s| format!(" success {s:.2}"))
            .unwrap_or_default();
        let summary = format!(
            "reward {reward:.3}{success}{eval}  {:.0} tok/s",
            m.get("tokens_per_second").copied().unwrap_or(0.0)
        );
        self.inner.display().step(step, &summary);
        let mut row = json!(m);
        row["step"] = json!(step);
        self.inner.metrics(step, &row);
        self.inner.record["metrics"] = row.clone();
        let data = json!({"event": "step_complete", "metrics": row});
        self.inner
            .log("info", format!("step {step} reward {reward:.3}"), data);
        if let Some(text) = eval_text(m) {
            let data = json!({"event": "eval_complete", "step": step,
                              "eval_reward_mean": m.get("eval/reward_mean"),
                              "eval_success_rate": m.get("eval/success_rate")});
            self.inner
                .log("info", format!("{text} at step {step}"), data);
        }
        if self.inner.cancel_requested() {
            self.inner.cancelled = true;
            Control::Stop
        } else {
            Control::Continue
        }
    }

    fn on_rollouts(&mut self, step: usize, prompts: &[&Prompt], groups: &[Vec<Rollout>]) {
        let mut text = String::new();
        for (g, (prompt, group)) in prompts.iter().zip(groups).enumerate() {
            for r in group {
                let line = json!({"step": step, "group": g, "row": prompt.location,
                                  "prompt": prompt.text, "completion": r.completion,
                                  "reward": r.reward, "advantage": r.advantage,
                                  "tokens": r.tokens.len(), "metrics": r.metrics, "error": r.error});
                text.push_str(&format!("{line}\n"));
            }
        }
        let failed: Vec<&str> = groups
            .iter()
            .flatten()
            .filter_map(|r| r.error.as_deref())
            .collect();
        if let Some(first) = failed.first() {
            let data = json!({"event": "rollout_errors", "step": step, "count": failed.len()});
            let message = format!("{} rollout(s) could not be scored: {first}", failed.len());
            self.inner.log("warn", message, data);
        }
        if let Err(e) = self.rollouts.write_all(text.as_bytes()) {
            tracing::warn!("writing {}: {e}", self.rollouts_path.display());
        }
    }

    fn on_episodes(&mut self, step: usize, episodes: &[Vec<whet_rl::episode::Episode>]) {
        let mut text = String::new();
        for (g, group) in episodes.iter().enumerate() {
            for (k, ep) in group.iter().enumerate() {
                let line = json!({"step": step, "group": g, "episode": k, "task": ep.task,
                                  "seed": ep.seed, "success": ep.success,
                                  "termination_reason": ep.termination_reason,
                                  "total_reward": ep.total_reward(), "turns": ep.turns,
                                  "error": ep.error});
                text.push_str(&format!("{line}\n"));
            }
        }
        if let Some(e) = episodes.iter().flatten().find_map(|e| e.error.as_deref()) {
            let n = episodes
                .iter()
                .flatten()
                .filter(|e| e.error.is_some())
                .count();
            let data = json!({"event": "world_errors", "step": step, "count": n});
            let message = format!("{n} episode(s) ended with a world error: {e}");
            self.inner.log("warn", message, data);
        }
        if let Err(e) = self.rollouts.write_all(text.as_bytes()) {
            tracing::warn!("writing {}: {e}", self.rollouts_path.display());
        }
    }

    fn on_checkpoint(&mut self, c: &Checkpoint) {
        whet_sft::Observer::on_checkpoint(self.inner, c);
    }

    fn on_initial_eval(&mut self, m: &Metrics) {
        let e = m.get("eval/reward_mean").copied().unwrap_or(0.0);
        self.inner.record["initial_eval_reward"] = json!(e);
        if let Some(s) = m.get("eval/success_rate") {
            self.inner.record["initial_eval_success_rate"] = json!(s);
        }
        let mut row = json!(m);
        row["step"] = json!(0);
        self.inner.metrics(0, &row);
        let text = eval_text(m).unwrap_or_default();
        self.inner
            .display()
            .step(0, &format!("{text} before training"));
    }
}

/// `eval reward R` (and `success S` for a world), when the metrics hold an eval.
fn eval_text(m: &Metrics) -> Option<String> {
    let reward = m.get("eval/reward_mean")?;
    Some(match m.get("eval/success_rate") {
        Some(s) => format!("eval reward {reward:.3} success {s:.2}"),
        None => format!("eval reward {reward:.3}"),
    })
}

/// Runs an RL job from its last checkpoint to the end; leaves the final record in the store.
pub fn run(
    home: &Home,
    store: &mut Store,
    backend: &mut dyn Backend,
    record: &mut Value,
    spec: &JobSpec,
    display: &mut dyn Display,
    interrupted: &AtomicBool,
) -> Result<(), JobError> {
    let id = record["id"].as_str().unwrap_or_default().to_string();
    let rl = spec.rl.clone().unwrap_or_default();
    let reward = spec.reward_config();
    let recipe = whet_rl::recipe(&reward.recipe, &reward.params)
        .map_err(|e| JobError::Invalid(format!("[reward]: {e}")))?;
    let (system_prompt, tools) = match &spec.capability {
        Some(c) => {
            let (cap, _) = capabilities::get(store, c)?;
            (cap.system_prompt, cap.tools)
        }
        None => (None, vec![]),
    };
    let precision = record["precision"].as_str().unwrap_or("f32").to_string();
    let base = backend.load_model(&spec.model, &precision, true)?;
    let tok = base
        .tokenizer
        .clone()
        .ok_or_else(|| JobError::Backend("the backend loaded no tokenizer".into()))?;
    let scaffold = Scaffold {
        system_prompt: system_prompt.as_deref(),
        tools: &tools,
    };
    // Every row checked (prompt, recipe fields, length) before any compute.
    let room = base.context_length.saturating_sub(rl.max_new_tokens);
    let load = |store: &mut Store, what: &str, r: &str| -> Result<Vec<Prompt>, JobError> {
        let resolved = datasets::resolve_or_pin(home, store, what, r, whet_data::Format::Auto)?;
        whet_rl::load_prompts(&resolved.path, &tok, &scaffold, recipe.as_ref(), room)
            .map_err(|e| JobError::Invalid(e.to_string()))
    };
    let mut prompts = if spec.data.prompt_dataset.is_empty() {
        vec![]
    } else {
        load(store, "data.prompt_dataset", &spec.data.prompt_dataset)?
    };
    // Offline RL: one prompt per recorded agent step, its action the reference.
    for t in &spec.data.trajectory_datasets {
        let resolved = datasets::resolve_or_pin(
            home,
            store,
            "data.trajectory_datasets",
            t,
            whet_data::Format::Trajectories,
        )?;
        let rows = whet_rl::trajectory_rows(&resolved.path, &tok)
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        prompts.extend(
            whet_rl::prompts_from_rows(rows, &tok, &scaffold, recipe.as_ref(), room)
                .map_err(|e| JobError::Invalid(e.to_string()))?,
        );
    }
    let eval = match &spec.data.eval_dataset {
        Some(e) => load(store, "data.eval_dataset", e)?,
        None => vec![],
    };
    let mut session =
        backend.training_client(&spec.lora, &home.run_dir(&id).join("checkpoints"))?;
    let start = match checkpoints_of(record).last() {
        Some(c) => {
            session
                .load_state_with_optimizer(&c.state)
                .map_err(|e| JobError::Invalid(format!("loading checkpoint {}: {e}", c.state)))?;
            c.step
        }
        None => 0,
    };
    store.truncate_metrics(&id, start)?;
    let rollouts_path = home.run_dir(&id).join("rollouts.jsonl");
    let rollouts = open_rollouts(&rollouts_path, start)?;
    record["artifacts"]["rollouts"] = json!(rollouts_path.display().to_string());
    record["data"] = json!({"prompts": prompts.len(), "eval_prompts": eval.len()});
    let manifest = match &spec.data.world_manifest {
        Some(w) => Some(
            whet_rl::world::Manifest::from_file(w).map_err(|e| JobError::Invalid(e.to_string()))?,
        ),
        None => None,
    };
    if manifest.is_none() && prompts.is_empty() {
        return Err(JobError::Invalid(
            "the job has no prompts to train on".into(),
        ));
    }
    let run = whet_rl::Run {
        world: manifest.as_ref().map(|m| whet_rl::WorldRun {
            manifest: m,
            system_prompt: system_prompt.as_deref(),
        }),
        prompts: &prompts,
        eval: &eval,
        tokenizer: &tok,
        recipe: recipe.as_ref(),
        rl: &rl,
        optimizer: &spec.optimizer,
        schedule: &spec.schedule,
    };
    let mut recorder = Recorder::new(store, record.clone(), display, interrupted);
    let slots = match &manifest {
        Some(m) => m.tasks.len() * m.seeds.len(),
        None => prompts.len(),
    };
    let total = whet_sft::Plan::new(
        slots,
        &whet_sft::ScheduleConfig {
            batch_size: rl.groups_per_step,
            batch_tokens: None,
            gradient_accumulation_steps: 1,
            ..spec.schedule.clone()
        },
    )?
    .total_steps();
    recorder.display().start(total, start);
    recorder.save()?;
    let (message, data) = if start == 0 {
        // A world job has no prompts: its slots are the manifest's (task, seed) pairs.
        let source = match &manifest {
            Some(m) => format!("world {}@{} ({slots} task/seed slots)", m.name, m.version),
            None => format!("{slots} prompts"),
        };
        (
            format!(
                "RL on {} with {source}, {total} steps of {} groups × {} rollouts",
                spec.model, rl.groups_per_step, rl.num_rollouts
            ),
            json!({"event": "training_start", "prompts": prompts.len(), "slots": slots, "steps": total}),
        )
    } else {
        (
            format!("resumed at step {start}"),
            json!({"event": "training_start", "resumed_from_step": start}),
        )
    };
    recorder.log("info", message, data);
    let result = {
        let mut observer = RlRecorder {
            inner: &mut recorder,
            rollouts,
            rollouts_path,
        };
        whet_rl::train(session.as_mut(), &run, start, &mut observer)
    };
    recorder.display().finish();
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            *record = recorder.record.clone();
            record["artifacts"]["checkpoints"] = json!(recorder.checkpoints);
            return Err(JobError::Invalid(e.to_string()));
        }
    };
    let cancelled = outcome.stopped;
    *record = recorder.finish(outcome.steps, cancelled)?;
    Ok(())
}
