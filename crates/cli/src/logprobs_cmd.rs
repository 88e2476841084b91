//! `whet logprobs`: score Tinker datums with a model (and adapter).

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use whet_contract::{LossFn, LossFnConfig, TrainingClient};
use whet_engine::TrainingSession;

use crate::common;

/// Arguments of `whet logprobs`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: common::ModelArgs,
    #[command(flatten)]
    dev: common::DeviceArgs,
    /// Tinker datums, one JSON object per line.
    #[arg(long)]
    data: PathBuf,
    /// Write the JSON lines here (atomically) instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Datums scored per engine call (and per progress tick).
const CHUNK: usize = 16;

/// Prints `{"logprobs": [...], "loss": −Σ weights·lp}` per datum, in order.
pub fn run(mut a: Args) -> Result<()> {
    a.dev.select()?;
    let data = whet_data::read_datums_jsonl(&a.data)?;
    a.m = a.m.resolve_published()?;
    let loaded = common::load(&a.m.model, a.m.precision, false)?;
    // Every datum is checked before any compute.
    whet_engine::batch::prepare(&data, LossFn::CrossEntropy, &loaded.model.config)
        .with_context(|| format!("checking {}", a.data.display()))?;
    let ckpt = tempfile::tempdir()?;
    let adapter = match &a.m.adapter {
        Some(dir) => common::load_adapter(&loaded, dir)?,
        None => whet_lora::LoraAdapter::init(
            whet_lora::LoraConfig {
                rank: 1,
                ..Default::default()
            },
            &[],
            loaded.model.device(),
        )?,
    };
    let mut session = TrainingSession::with_adapter(
        loaded.model.clone(),
        &loaded.spec,
        adapter,
        ckpt.path(),
        common::sampler_options(&loaded),
    );
    let bar = ProgressBar::new(data.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} datums  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut lines = String::new();
    for (c, chunk) in data.chunks(CHUNK).enumerate() {
        let out = session
            .forward(chunk, LossFn::CrossEntropy, &LossFnConfig::new())
            .with_context(|| format!("scoring datums {}..", c * CHUNK))?;
        for (d, o) in chunk.iter().zip(&out.loss_fn_outputs) {
            let lp = o["logprobs"].to_f32_vec();
            let w = d
                .loss_fn_inputs
                .get("weights")
                .map(|w| w.to_f32_vec())
                .unwrap_or_else(|| vec![1.0; lp.len()]);
            let loss: f64 = -lp
                .iter()
                .zip(&w)
                .map(|(l, w)| (*l as f64) * (*w as f64))
                .sum::<f64>();
            lines.push_str(&serde_json::to_string(
                &serde_json::json!({"logprobs": lp, "loss": loss}),
            )?);
            lines.push('\n');
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    common::emit(a.out.as_ref(), &lines)
}
