//! `whet-bench`: whet's side of the benchmarks that `benches/run.sh` (CPU) and
//! `benches/gpu/run.sh` (one NVIDIA GPU; build with `--features cuda`) run side by side with
//! PyTorch + PEFT on the same model and the same token sequences.
//!
//! - `sft`: LoRA SFT through the Tinker contract (`forward_backward` + `optim_step`) on
//!   pre-tokenized datums, batch by batch; reports trained tokens/s, seconds per optimizer step,
//!   peak RSS and the model FLOPs per token (which the GPU report turns into MFU), timed after
//!   warm-up steps with the device synchronised before each clock reading.
//! - `sample`: completions of several prompts decoded as one batch; reports new tokens/s.
//!
//! Peak GPU memory is measured from outside, the same way for both sides (`gpu/gpu_peak.py`).

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
#[command(name = "whet-bench", about = "whet's side of benches/run.sh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// LoRA SFT steps on pre-tokenized Tinker datums.
    Sft {
        /// Base model (directory, .gguf or cached hub id).
        #[arg(long)]
        model: String,
        /// Datums JSONL (each row one datum).
        #[arg(long)]
        data: PathBuf,
        /// Rows per optimizer step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Timed optimizer steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// LoRA alpha.
        #[arg(long, default_value_t = 32.0)]
        alpha: f64,
        /// Learning rate.
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        /// Tokens per micro-batch inside forward_backward.
        #[arg(long)]
        token_budget: Option<usize>,
        /// Save the trained adapter (PEFT format) here afterwards.
        #[arg(long)]
        save_adapter: Option<PathBuf>,
        /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The base model's precision: f32 or bf16.
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Sampling throughput: every prompt, one batch.
    Sample {
        /// Base model.
        #[arg(long)]
        model: String,
        /// JSONL of `{"tokens": [...]}` prompts.
        #[arg(long)]
        prompts: PathBuf,
        /// New tokens per prompt.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The base model's precision: f32 or bf16.
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
    },
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
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
    whet::runtime::init();
    match Cli::parse().command {
        Cmd::Sft {
            model,
            data,
            batch,
            steps,
            warmup,
            rank,
            alpha,
            lr,
            token_budget,
            save_adapter,
            device,
            precision,
            json,
        } => {
            let dev = parse_device(&device)?;
            let datums = whet_data::read_datums_jsonl(&data)?;
            anyhow::ensure!(!datums.is_empty(), "{}: no datums", data.display());
            let (_, m) = load_model(&model, &dev, precision)?;
            let flops = flops_per_token(&m, rank, datums[0].model_input.length());
            let cfg = LoraConfig {
                rank,
                alpha,
                target_modules: Target::ALL.to_vec(),
                seed: 0,
                ..LoraConfig::default()
            };
            let ckpt = std::env::temp_dir().join(format!("whet-bench-{}", std::process::id()));
            let mut session =
                TrainingSession::new(m, &model, cfg, &ckpt, SamplerOptions::default())?;
            if let Some(t) = token_budget {
                session.set_token_budget(t);
            }
            let params = AdamParams {
                learning_rate: lr,
                ..AdamParams::default()
            };
            let mut cursor = 0;
            let mut timed_tokens = 0usize;
            let mut timed = 0f64;
            for step in 0..warmup + steps {
                let rows: Vec<_> = (0..batch)
                    .map(|i| datums[(cursor + i) % datums.len()].clone())
                    .collect();
                cursor += batch;
                let tokens: usize = rows.iter().map(|d| d.model_input.length()).sum();
                dev.synchronize()?;
                let t0 = Instant::now();
                let out =
                    session.forward_backward(&rows, LossFn::CrossEntropy, &LossFnConfig::new())?;
                session.optim_step(&params)?;
                dev.synchronize()?;
                let dt = t0.elapsed().as_secs_f64();
                let loss = out.metrics["loss:sum"] / tokens as f64;
                eprintln!(
                    "step {step:>3} {} tokens {dt:.2}s {:.0} tok/s  loss/token {loss:.4}",
                    tokens,
                    tokens as f64 / dt
                );
                if step >= warmup {
                    timed += dt;
                    timed_tokens += tokens;
                }
            }
            if let Some(dir) = &save_adapter {
                let path = session.save_weights_for_sampler("bench")?;
                let src = PathBuf::from(path);
                std::fs::create_dir_all(dir)?;
                for f in ["adapter_config.json", "adapter_model.safetensors"] {
                    std::fs::copy(src.join(f), dir.join(f))
                        .with_context(|| format!("copying {f} to {}", dir.display()))?;
                }
            }
            let _ = std::fs::remove_dir_all(&ckpt);
            let report = json!({
                "variant": "whet",
                "precision": precision.to_string(),
                "trained_tokens_per_s": timed_tokens as f64 / timed,
                "s_per_step": timed / steps.max(1) as f64,
                "peak_rss_bytes": peak_rss_bytes(),
                "flops_per_token": flops,
                "steps": steps,
                "tokens": timed_tokens,
            });
            print_report(&report, json);
        }
        Cmd::Sample {
            model,
            prompts,
            max_tokens,
            device,
            precision,
            json,
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
                // No stops: every sequence produces max_tokens, as generate with min_new_tokens.
                stop: Some(Stop::Tokens(vec![])),
                ..SamplingParams::default()
            };
            // Warm-up: a couple of tokens.
            sampler.sample_many(
                &prompts[..1],
                1,
                &SamplingParams {
                    max_tokens: Some(2),
                    ..params.clone()
                },
            )?;
            dev.synchronize()?;
            let t0 = Instant::now();
            let out = sampler.sample_many(&prompts, 1, &params)?;
            dev.synchronize()?;
            let secs = t0.elapsed().as_secs_f64();
            let new_tokens: usize = out.iter().flatten().map(|s| s.tokens.len()).sum();
            let report = json!({
                "variant": "whet",
                "precision": precision.to_string(),
                "new_tokens_per_s": new_tokens as f64 / secs,
                "seconds": secs,
                "new_tokens": new_tokens,
                "peak_rss_bytes": peak_rss_bytes(),
            });
            print_report(&report, json);
        }
    }
    Ok(())
}

fn print_report(report: &serde_json::Value, json: bool) {
    if json {
        println!("{report}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    }
}
