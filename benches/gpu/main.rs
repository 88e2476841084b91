//! `whet-gpu-bench`: whet's side of `benches/gpu/run.sh`, which runs it and PyTorch + PEFT
//! (`torch_gpu.py`) one after the other on the same GPU, the same random models and the same
//! token sequences.
//!
//! - `sft`: LoRA SFT through the Tinker contract (`forward_backward` + `optim_step`), rank 16
//!   on all seven projections, one packed step of `--batch` sequences at a time; reports trained
//!   tokens/s and seconds per step over the timed steps (the device synchronised before each
//!   clock reading), and the model FLOPs per token the report turns into MFU.
//! - `sample`: new tokens/s of a batch of prompts decoded together.
//!
//! Peak GPU memory is measured from outside, the same way for both sides (`gpu_peak.py`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use whet_contract::{
    AdamParams, LossFn, LossFnConfig, ModelInput, SamplingParams, Stop, TrainingClient,
};
use whet_engine::{load_model, parse_device, Precision, Sampler, SamplerOptions, TrainingSession};
use whet_lora::{LoraConfig, Target};

#[derive(Parser)]
#[command(name = "whet-gpu-bench", about = "whet's side of benches/gpu/run.sh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// LoRA SFT steps on pre-tokenized Tinker datums.
    Sft {
        /// Base model directory.
        #[arg(long)]
        model: String,
        /// Datums JSONL.
        #[arg(long)]
        data: PathBuf,
        /// Sequences per optimizer step.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first (the PTX JIT and cuBLAS heuristics run here).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// The base weights' precision.
        #[arg(long, default_value = "bf16")]
        precision: Precision,
    },
    /// Sampling throughput: every prompt in one batch.
    Sample {
        /// Base model directory.
        #[arg(long)]
        model: String,
        /// JSONL of `{"tokens": [...]}` prompts.
        #[arg(long)]
        prompts: PathBuf,
        /// New tokens per prompt.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// The base weights' precision.
        #[arg(long, default_value = "bf16")]
        precision: Precision,
    },
}

/// Forward + input-gradient FLOPs per trained token of a LoRA step: each frozen matrix costs
/// 2 FLOPs per weight forward and 2 more for the input gradient (no weight gradient); the
/// adapters add 6 per LoRA weight (forward, and both gradients); causal attention over a
/// sequence of `s` costs 2·2·(s/2)·D per head forward (scores and values, half the keys on
/// average) and twice that backward. The embedding lookup costs nothing.
fn flops_per_token(m: &whet_engine::Model, rank: usize, seq: usize) -> f64 {
    let c = &m.config;
    let frozen: usize = m
        .site_shapes()
        .iter()
        .map(|s| s.in_features * s.out_features)
        .sum::<usize>()
        + c.vocab_size * c.hidden_size;
    let lora: usize = m
        .site_shapes()
        .iter()
        .map(|s| rank * (s.in_features + s.out_features))
        .sum();
    let attn_fwd =
        4.0 * (seq as f64 / 2.0) * (c.num_heads * c.head_dim) as f64 * c.num_layers as f64;
    4.0 * frozen as f64 + 6.0 * lora as f64 + 3.0 * attn_fwd
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Sft {
            model,
            data,
            batch,
            steps,
            warmup,
            rank,
            device,
            precision,
        } => {
            let dev = parse_device(&device)?;
            let datums = whet_data::read_datums_jsonl(&data)?;
            anyhow::ensure!(!datums.is_empty(), "{}: no datums", data.display());
            let (_, m) = load_model(&model, &dev, precision)?;
            let seq = datums[0].model_input.length();
            let flops = flops_per_token(&m, rank, seq);
            let cfg = LoraConfig {
                rank,
                alpha: 2.0 * rank as f64,
                target_modules: Target::ALL.to_vec(),
                seed: 0,
                ..LoraConfig::default()
            };
            let ckpt = std::env::temp_dir().join(format!("whet-gpu-bench-{}", std::process::id()));
            let mut session =
                TrainingSession::new(m, &model, cfg, &ckpt, SamplerOptions::default())?;
            let params = AdamParams {
                learning_rate: 1e-4,
                ..AdamParams::default()
            };
            let (mut timed, mut timed_tokens) = (0f64, 0usize);
            for step in 0..warmup + steps {
                let rows: Vec<_> = (0..batch)
                    .map(|i| datums[(step * batch + i) % datums.len()].clone())
                    .collect();
                let tokens: usize = rows.iter().map(|d| d.model_input.length()).sum();
                dev.synchronize()?;
                let t0 = Instant::now();
                let out =
                    session.forward_backward(&rows, LossFn::CrossEntropy, &LossFnConfig::new())?;
                session.optim_step(&params)?;
                dev.synchronize()?;
                let dt = t0.elapsed().as_secs_f64();
                eprintln!(
                    "step {step:>3}: {tokens} tokens in {dt:.3}s, {:.0} tok/s, loss/token {:.4}",
                    tokens as f64 / dt,
                    out.metrics["loss:sum"] / tokens as f64
                );
                if step >= warmup {
                    timed += dt;
                    timed_tokens += tokens;
                }
            }
            let _ = std::fs::remove_dir_all(&ckpt);
            println!(
                "{}",
                json!({
                    "variant": "whet",
                    "precision": precision.to_string(),
                    "trained_tokens_per_s": timed_tokens as f64 / timed,
                    "s_per_step": timed / steps.max(1) as f64,
                    "flops_per_token": flops,
                    "steps": steps,
                    "tokens": timed_tokens,
                })
            );
        }
        Cmd::Sample {
            model,
            prompts,
            max_tokens,
            device,
            precision,
        } => {
            let dev = parse_device(&device)?;
            let text = std::fs::read_to_string(&prompts)
                .with_context(|| format!("reading {}", prompts.display()))?;
            let prompts: Vec<ModelInput> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
                .map(|(i, l)| {
                    let v: serde_json::Value = serde_json::from_str(l)
                        .with_context(|| format!("prompts line {}", i + 1))?;
                    let tokens: Vec<i64> = serde_json::from_value(v["tokens"].clone())
                        .with_context(|| format!("prompts line {}: field 'tokens'", i + 1))?;
                    Ok(ModelInput::from_ints(tokens))
                })
                .collect::<Result<_>>()?;
            let (_, m) = load_model(&model, &dev, precision)?;
            let sampler = Sampler::new(m, None, SamplerOptions::default());
            let params = SamplingParams {
                max_tokens: Some(max_tokens),
                seed: Some(0),
                // No stops: every sequence makes max_tokens, as generate with min_new_tokens.
                stop: Some(Stop::Tokens(vec![])),
                ..SamplingParams::default()
            };
            let warm = SamplingParams {
                max_tokens: Some(2),
                ..params.clone()
            };
            sampler.sample_many(&prompts[..1], 1, &warm)?;
            dev.synchronize()?;
            let t0 = Instant::now();
            let out = sampler.sample_many(&prompts, 1, &params)?;
            dev.synchronize()?;
            let secs = t0.elapsed().as_secs_f64();
            let new_tokens: usize = out.iter().flatten().map(|s| s.tokens.len()).sum();
            println!(
                "{}",
                json!({
                    "variant": "whet",
                    "precision": precision.to_string(),
                    "new_tokens_per_s": new_tokens as f64 / secs,
                    "seconds": secs,
                    "new_tokens": new_tokens,
                })
            );
        }
    }
    Ok(())
}
