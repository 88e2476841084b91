//! `whet models …`: publish a job's checkpoint as an immutable `name@version` with its lineage,
//! list and show versions, move aliases, export (a PEFT directory, the merged model, or the
//! merged model as GGUF).

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use whet_engine::gguf_export::GgufType;
use whet_jobs::models;

use crate::common::HomeArgs;

/// `whet models …`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Publish a job's final adapter (or the checkpoint of JOB:STEP) as name@version, with its
    /// lineage: base model and hash, capability, datasets, job and config, metrics.
    #[command(disable_version_flag = true)]
    Publish {
        /// JOB_ID, or JOB_ID:STEP for a checkpoint.
        job: String,
        /// The model's name.
        #[arg(long)]
        name: String,
        /// Its semver version (immutable once published).
        #[arg(long)]
        version: String,
        #[command(flatten)]
        common: HomeArgs,
    },
    /// Published models, with their aliases.
    List(HomeArgs),
    /// One model version (name@version or name@alias): lineage, files, metrics.
    Show {
        /// name@version or name@alias.
        reference: String,
        #[command(flatten)]
        common: HomeArgs,
    },
    /// Aliases: `set name@version champion` moves `champion` there; `rm name champion`.
    #[command(subcommand)]
    Alias(Alias),
    /// Write a published model out: `peft` (the adapter directory, as PEFT and vLLM load it),
    /// `merged` (the adapter folded into the base: a plain Hugging Face directory) or `gguf`
    /// (the merged model as OUT/model-<type>.gguf, for llama.cpp).
    Export {
        /// name@version or name@alias.
        reference: String,
        /// peft, merged or gguf.
        #[arg(long, default_value = "peft")]
        format: String,
        /// With --format gguf: how the weight matrices are stored, f16 (the default) or q8_0
        /// (norms and biases stay f32).
        #[arg(long)]
        gguf_type: Option<GgufType>,
        /// The output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        common: HomeArgs,
    },
}

/// `whet models alias …`.
#[derive(clap::Subcommand)]
pub enum Alias {
    /// Point an alias at a version.
    Set {
        /// name@version
        reference: String,
        /// The alias (e.g. champion, staging).
        alias: String,
        #[command(flatten)]
        common: HomeArgs,
    },
    /// Remove an alias.
    Rm {
        /// The model's name.
        name: String,
        /// The alias.
        alias: String,
        #[command(flatten)]
        common: HomeArgs,
    },
}

/// Runs `whet models …`.
pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Publish {
            job,
            name,
            version,
            common,
        } => {
            let (home, mut store) = common.open()?;
            let (id, step) =
                match job.split_once(':') {
                    Some((id, s)) => (
                        id.to_string(),
                        Some(s.parse::<usize>().map_err(|_| {
                            anyhow::anyhow!("{job:?}: expected JOB_ID or JOB_ID:STEP")
                        })?),
                    ),
                    None => (job.clone(), None),
                };
            let (doc, pushed) = models::publish(&home, &mut store, &id, step, &name, &version)?;
            if common.json {
                println!("{doc}");
            } else {
                let word = match pushed {
                    whet_jobs::Pushed::Created => "published",
                    whet_jobs::Pushed::Unchanged => "already published (same content)",
                };
                println!(
                    "{name}@{version}: {word} from job {id} (step {})",
                    doc["job"]["step"]
                );
            }
            Ok(())
        }
        Command::List(common) => {
            let (_, store) = common.open()?;
            for d in models::list(&store)? {
                if common.json {
                    println!("{d}");
                } else {
                    println!(
                        "{}@{}  {}  base {}  job {}",
                        d["name"].as_str().unwrap_or(""),
                        d["version"].as_str().unwrap_or(""),
                        d["aliases"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default(),
                        d["base_model"]["model"].as_str().unwrap_or(""),
                        d["job"]["id"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        Command::Show { reference, common } => {
            let (_, store) = common.open()?;
            let doc = models::get(&store, &reference)?;
            if common.json {
                println!("{doc}");
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            Ok(())
        }
        Command::Alias(Alias::Set {
            reference,
            alias,
            common,
        }) => {
            let (_, mut store) = common.open()?;
            let (name, version) = reference
                .split_once('@')
                .ok_or_else(|| anyhow::anyhow!("{reference:?}: expected name@version"))?;
            models::set_alias(&mut store, name, version, &alias)?;
            if common.json {
                println!(
                    "{}",
                    json!({"name": name, "alias": alias, "version": version})
                );
            } else {
                println!("{name}@{alias} → {version}");
            }
            Ok(())
        }
        Command::Alias(Alias::Rm {
            name,
            alias,
            common,
        }) => {
            let (_, mut store) = common.open()?;
            models::remove_alias(&mut store, &name, &alias)?;
            println!("{name}@{alias}: removed");
            Ok(())
        }
        Command::Export {
            reference,
            format,
            gguf_type,
            out,
            common,
        } => {
            let ty =
                crate::adapter_cmd::gguf_type_for(&format, gguf_type, &["peft", "merged", "gguf"])?;
            let (home, store) = common.open()?;
            let r = models::resolve(&home, &store, &reference)?
                .ok_or_else(|| anyhow::anyhow!("{reference:?} is not a published model"))?;
            if out.exists() {
                bail!(
                    "{}: already exists; choose a new output directory",
                    out.display()
                );
            }
            let mut file = None;
            match (format.as_str(), ty) {
                ("gguf", Some(ty)) => {
                    file = Some(crate::adapter_cmd::merge_to_gguf(
                        &r.base_model,
                        &r.adapter,
                        &out,
                        ty,
                        &r.reference,
                    )?);
                }
                ("merged", _) => crate::adapter_cmd::merge_to(&r.base_model, &r.adapter, &out)?,
                _ => {
                    std::fs::create_dir_all(&out)?;
                    for e in std::fs::read_dir(&r.adapter)?.flatten() {
                        std::fs::copy(e.path(), out.join(e.file_name()))?;
                    }
                }
            }
            if common.json {
                let mut doc = json!({"model": r.reference, "format": format, "out": out});
                if let (Some(f), Some(ty)) = (&file, ty) {
                    doc["file"] = json!(f);
                    doc["gguf_type"] = json!(ty.to_string());
                }
                println!("{doc}");
            } else {
                let shown = file.as_deref().unwrap_or(&out).display();
                println!("{} → {shown} ({format})", r.reference);
            }
            Ok(())
        }
    }
}
