//! `whet sample`: complete a chat prompt with the model's own template.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use whet_contract::{ModelInput, SamplingClient, SamplingParams, Stop, StopReason};
use whet_engine::Sampler;

use crate::common;

/// Arguments of `whet sample`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: common::ModelArgs,
    #[command(flatten)]
    dev: common::DeviceArgs,
    /// The user message (rendered as one user turn).
    #[arg(
        long,
        conflicts_with = "messages",
        required_unless_present = "messages"
    )]
    prompt: Option<String>,
    /// A JSON list of chat messages (OpenAI format), or @FILE holding one.
    #[arg(long)]
    messages: Option<String>,
    /// A system message put before the prompt.
    #[arg(long)]
    system: Option<String>,
    /// Number of samples.
    #[arg(short = 'n', long, default_value_t = 1)]
    n: usize,
    /// Maximum new tokens per sample.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the k most likely tokens (-1: all).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    top_k: i64,
    /// Seed of the random stream.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable); EOS always stops.
    #[arg(long)]
    stop: Vec<String>,
    /// Print `{"prompt_tokens", "samples": [{tokens, text, logprobs, stop_reason}]}`.
    #[arg(long)]
    json: bool,
}

fn messages(a: &Args) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    if let Some(s) = &a.system {
        out.push(json!({"role": "system", "content": s}));
    }
    if let Some(p) = &a.prompt {
        out.push(json!({"role": "user", "content": p}));
        return Ok(out);
    }
    let Some(m) = &a.messages else {
        bail!("give --prompt or --messages");
    };
    let text = match m.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => m.clone(),
    };
    let v: Value = serde_json::from_str(&text).context("--messages is not valid JSON")?;
    let Value::Array(list) = v else {
        bail!("--messages must be a JSON list of {{\"role\", \"content\"}} objects");
    };
    for (i, msg) in list.iter().enumerate() {
        if msg.get("role").and_then(Value::as_str).is_none() {
            bail!("--messages[{i}]: field 'role' is missing or not a string");
        }
    }
    out.extend(list);
    Ok(out)
}

/// Samples and prints the completions.
pub fn run(mut a: Args) -> Result<()> {
    a.dev.select()?;
    let msgs = messages(&a)?;
    a.m = a.m.resolve_published()?;
    let loaded = common::load(&a.m.model, a.m.precision, true)?;
    let prompt = loaded.tokenizer()?.apply_chat_template(&msgs, None, true)?;
    let lora = match &a.m.adapter {
        Some(dir) => Some(common::load_adapter(&loaded, dir)?.sampling_weights()?),
        None => None,
    };
    let sampler = Sampler::new(loaded.model.clone(), lora, common::sampler_options(&loaded));
    let params = SamplingParams {
        max_tokens: Some(a.max_tokens),
        seed: a.seed,
        stop: (!a.stop.is_empty()).then(|| Stop::Texts(a.stop.clone())),
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    let ints: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let started = std::time::Instant::now();
    let resp = sampler.sample(&ModelInput::from_ints(ints), a.n, &params, false, 0)?;
    let new_tokens: usize = resp.sequences.iter().map(|s| s.tokens.len()).sum();
    tracing::info!(
        "{new_tokens} tokens in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    let mut samples = Vec::new();
    for s in &resp.sequences {
        let ids: Vec<u32> = s.tokens.iter().map(|&t| t as u32).collect();
        let text = loaded.tokenizer()?.decode(&ids, true)?;
        samples.push(json!({
            "tokens": s.tokens,
            "text": text,
            "logprobs": s.logprobs,
            "stop_reason": match s.stop_reason { StopReason::Stop => "stop", StopReason::Length => "length" },
        }));
    }
    if a.json {
        let out = json!({"prompt_tokens": prompt, "samples": samples});
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for (i, s) in samples.iter().enumerate() {
            if a.n > 1 {
                println!(
                    "--- sample {} ({}) ---",
                    i + 1,
                    s["stop_reason"].as_str().unwrap_or("")
                );
            }
            println!("{}", s["text"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}
