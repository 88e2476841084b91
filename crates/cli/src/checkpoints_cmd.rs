//! `whet checkpoints`: the home's Tinker checkpoints (what `whet serve` saves and loads) —
//! import a PEFT adapter to continue with `create_training_client_from_state`, list, export,
//! delete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use whet_jobs::checkpoints::{check_name, CheckpointKind, Checkpoints, RunRecord, TinkerPath};
use whet_lora::{state, AdamW, Target};

use crate::common::{self, HomeArgs};

/// `whet checkpoints …`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Import a PEFT adapter as a training state; prints its `tinker://…/weights/…` path, which
    /// the SDK's `create_training_client_from_state` continues from (fresh optimizer).
    Import {
        /// The base model, `NAME=M` as given to `whet serve --model` (or just M, served under
        /// the same name): the adapter is checked against M's shapes.
        #[arg(long, value_name = "NAME=M")]
        model: String,
        /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The checkpoint's name (default: the adapter directory's name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        home: HomeArgs,
    },
    /// List the checkpoints in the home, oldest first.
    List {
        #[command(flatten)]
        home: HomeArgs,
    },
    /// Write a checkpoint's adapter as a PEFT directory (loadable by PEFT and vLLM).
    Export {
        /// The checkpoint (`tinker://RUN/weights|sampler_weights|external_weights/NAME`).
        path: String,
        /// The directory to create.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        home: HomeArgs,
    },
    /// Delete a checkpoint.
    Delete {
        /// The checkpoint's `tinker://` path.
        path: String,
        #[command(flatten)]
        home: HomeArgs,
    },
}

/// Runs `whet checkpoints …`.
pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Import {
            model,
            adapter,
            name,
            home,
        } => import(&model, &adapter, name, &home),
        Command::List { home } => {
            let h = whet_jobs::Home::resolve(home.home.clone())?;
            let store = Checkpoints::new(&h);
            for c in store.list_all() {
                let run = c.path().ok().and_then(|p| store.run(&p.run_id).ok());
                let base = run.map(|r| r.base_model).unwrap_or_default();
                if home.json {
                    let mut v = serde_json::to_value(&c)?;
                    v["base_model"] = json!(base);
                    println!("{v}");
                } else {
                    println!(
                        "{}  {}  {} bytes  {}",
                        c.tinker_path, c.time, c.size_bytes, base
                    );
                }
            }
            Ok(())
        }
        Command::Export { path, out, home } => {
            let h = whet_jobs::Home::resolve(home.home.clone())?;
            let store = Checkpoints::new(&h);
            let p = TinkerPath::parse(&path)?;
            store.get(&p)?;
            export(&store.dir(&p), &out)?;
            if home.json {
                println!("{}", json!({"tinker_path": path, "out": out}));
            } else {
                println!("{}", out.display());
            }
            Ok(())
        }
        Command::Delete { path, home } => {
            let h = whet_jobs::Home::resolve(home.home.clone())?;
            Checkpoints::new(&h).delete(&TinkerPath::parse(&path)?)?;
            Ok(())
        }
    }
}

fn import(model: &str, adapter: &Path, name: Option<String>, home: &HomeArgs) -> Result<()> {
    let (served, spec) = model.split_once('=').unwrap_or((model, model));
    if !adapter.join("adapter_config.json").is_file() {
        bail!(
            "{}: not a PEFT adapter directory (no adapter_config.json)",
            adapter.display()
        );
    }
    let name = match name {
        Some(n) => n,
        None => adapter
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .context("--name is needed (the adapter path has no directory name)")?,
    };
    check_name("--name", &name)?;
    // The adapter is loaded against the model: wrong shapes fail here, not on the server.
    let loaded = common::load(spec, whet_engine::Precision::F32, false)?;
    let lora = common::load_adapter(&loaded, adapter)?;
    let h = whet_jobs::Home::resolve(home.home.clone())?;
    let store = Checkpoints::new(&h);
    let run_id = format!(
        "import-{}",
        whet_jobs::keys::fingerprint(&format!(
            "{}{:?}{}",
            adapter.display(),
            std::time::SystemTime::now(),
            std::process::id()
        ))
    );
    let config = lora.config();
    let targets = &config.target_modules;
    let run = RunRecord {
        training_run_id: run_id.clone(),
        base_model: served.to_string(),
        lora_rank: config.rank,
        train_attn: Target::ATTN.iter().any(|t| targets.contains(t)),
        train_mlp: Target::MLP.iter().any(|t| targets.contains(t)),
        train_unembed: false,
        owner: None,
        created_at: whet_jobs::now_rfc3339(),
        user_metadata: Some(json!({"imported_from": adapter.display().to_string()})),
    };
    store.write_run(&run)?;
    let path = TinkerPath {
        run_id,
        kind: CheckpointKind::Training,
        name,
    };
    state::save_state(
        &store.dir(&path),
        served,
        &lora,
        &AdamW::new(),
        json!({"dropout_counter": 0}),
    )?;
    store.record(&path, None, None, run.user_metadata.clone())?;
    if home.json {
        println!(
            "{}",
            json!({"tinker_path": path.to_uri(), "base_model": served, "lora_rank": config.rank})
        );
    } else {
        println!("{}", path.to_uri());
    }
    Ok(())
}

/// Copies the PEFT files of a checkpoint directory into a new directory `out`, whole or not
/// at all (built beside it, then renamed).
fn export(dir: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        bail!("{}: exists already", out.display());
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".export-")
        .tempdir_in(parent)?;
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        let src = dir.join(file);
        if !src.is_file() {
            bail!("{}: missing (not an adapter checkpoint)", src.display());
        }
        std::fs::copy(&src, tmp.path().join(file))
            .with_context(|| format!("copying {}", src.display()))?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, out).with_context(|| format!("creating {}", out.display()))?;
    Ok(())
}
