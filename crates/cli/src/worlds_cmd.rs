//! `whet worlds rollout`: episodes of a policy against a world, written as ATIF trajectories
//! (per-step rewards and the outcome in `extra`) — a trajectory dataset for SFT or offline RL.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use whet_engine::Sampler;
use whet_rl::episode;
use whet_rl::world::Manifest;

use crate::common;

/// `whet worlds …`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Play N episodes of a world (its world.yaml) with a model and write them as ATIF
    /// trajectories, one JSON line each.
    Rollout(RolloutArgs),
}

/// Arguments of `whet worlds rollout`.
#[derive(clap::Args)]
pub struct RolloutArgs {
    /// The world's manifest (world.yaml).
    manifest: PathBuf,
    #[command(flatten)]
    m: common::ModelArgs,
    /// A system prompt put first in every episode.
    #[arg(long)]
    system_prompt: Option<String>,
    /// Episodes to play (the manifest's (task, seed) pairs, cycled).
    #[arg(long, default_value_t = 8)]
    count: usize,
    /// Play the manifest's held-out `eval_seeds` (every task with each) instead of its `seeds`.
    #[arg(long)]
    eval_seeds: bool,
    /// Where the trajectories go (JSONL, written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Episodes played at once, in lockstep (their turns sampled as one batch).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `whet worlds …`.
pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Rollout(a) => rollout(a),
    }
}

fn rollout(mut a: RolloutArgs) -> Result<()> {
    let manifest = Manifest::from_file(&a.manifest)?;
    a.m = a.m.resolve_published()?;
    let loaded = common::load(&a.m.model, a.m.precision, true)?;
    let tok = loaded.tokenizer()?;
    let lora = match &a.m.adapter {
        Some(dir) => Some(common::load_adapter(&loaded, dir)?.sampling_weights()?),
        None => None,
    };
    let sampler = Sampler::new(loaded.model.clone(), lora, common::sampler_options(&loaded));
    let bar = indicatif::ProgressBar::new(a.count as u64);
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut lines = String::new();
    let (mut successes, mut total_reward) = (0usize, 0.0);
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    let slots: Vec<(Value, u64)> = if a.eval_seeds {
        manifest.eval_episodes()
    } else {
        let n = manifest.tasks.len() * manifest.seeds.len();
        (0..n).map(|i| manifest.episode(i)).collect()
    };
    if slots.is_empty() {
        anyhow::bail!(
            "{}: --eval-seeds, but the manifest has no eval_seeds",
            a.manifest.display()
        );
    }
    let specs: Vec<episode::EpisodeSpec> = (0..a.count)
        .map(|i| {
            let (task, seed) = slots[i % slots.len()].clone();
            episode::EpisodeSpec {
                task,
                seed,
                sample_seed: a.seed.wrapping_mul(1_000_003).wrapping_add(i as u64 * 7919),
            }
        })
        .collect();
    let mut i = 0;
    for chunk in specs.chunks(a.batch as usize) {
        let played = episode::play_many(
            &manifest,
            &sampler,
            tok,
            a.system_prompt.as_deref(),
            chunk,
            a.temperature,
        )
        .with_context(|| format!("episodes {i}..{}", i + chunk.len()))?;
        for ep in played {
            if let Some(e) = &ep.error {
                tracing::warn!("episode {i}: {e}");
            }
            successes += usize::from(ep.success);
            total_reward += ep.total_reward();
            *reasons.entry(ep.termination_reason.clone()).or_default() += 1;
            let id = format!("{}-{}-{i}", manifest.name, a.seed);
            let atif = episode::to_atif(&ep, &manifest, &a.m.model, &id);
            lines.push_str(&format!("{atif}\n"));
            i += 1;
            bar.inc(1);
            bar.set_message(format!("success {successes}/{i}"));
        }
    }
    bar.finish_and_clear();
    common::emit(Some(&a.out), &lines)?;
    let n = a.count.max(1) as f64;
    let summary: Value = json!({
        "episodes": a.count, "success_rate": successes as f64 / n,
        "reward_mean": total_reward / n, "termination_reasons": reasons,
        "out": a.out.display().to_string(),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "{} episodes of {}@{}: success {:.0}%, mean reward {:.3}; {reasons:?}; trajectories in {}",
            a.count,
            manifest.name,
            manifest.version,
            100.0 * successes as f64 / n,
            total_reward / n,
            a.out.display()
        );
    }
    Ok(())
}
