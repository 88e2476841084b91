//! `whet datasets …` and `whet capabilities …`: publish immutable `name@version`s to the home's
//! registries, list them, show one.

use std::path::PathBuf;

use crate::common::HomeArgs;
use anyhow::Result;
use serde_json::Value;
use whet_jobs::{capabilities, datasets, Capability, Pushed};

/// `whet datasets …`.
#[derive(clap::Subcommand)]
pub enum Datasets {
    /// Publish a file, or a directory (with an optional dataset.yaml), as an immutable
    /// name@version. Every row is checked first; a malformed one publishes nothing.
    #[command(disable_version_flag = true)]
    Push {
        /// A .jsonl/.json/.csv file, or a directory of them.
        path: PathBuf,
        /// The name (default: dataset.yaml's, else the file or directory name).
        #[arg(long)]
        name: Option<String>,
        /// The semver version (default: dataset.yaml's, else the next patch version; the same
        /// content again keeps its version).
        #[arg(long)]
        version: Option<String>,
        /// The rows' kind: auto, chat, prompt_response, trajectories or datums.
        #[arg(long)]
        format: Option<whet_data::Format>,
        #[command(flatten)]
        common: HomeArgs,
    },
    /// Published datasets.
    List(HomeArgs),
    /// One dataset version: its files, sha256s, splits and row counts.
    Show {
        /// name@version
        reference: String,
        #[command(flatten)]
        common: HomeArgs,
    },
}

/// `whet capabilities …`.
#[derive(clap::Subcommand)]
pub enum Capabilities {
    /// Publish a capability.yaml (schema 1: name, version, description, system_prompt, tools).
    Push {
        /// The capability.yaml file.
        file: PathBuf,
        #[command(flatten)]
        common: HomeArgs,
    },
    /// Published capabilities.
    List(HomeArgs),
    /// One capability version.
    Show {
        /// name@version
        reference: String,
        #[command(flatten)]
        common: HomeArgs,
    },
}

fn pushed_word(p: Pushed) -> &'static str {
    match p {
        Pushed::Created => "published",
        Pushed::Unchanged => "already published (same content)",
    }
}

fn table(docs: &[Value], json: bool, extra: impl Fn(&Value) -> String) {
    for d in docs {
        if json {
            println!("{d}");
        } else {
            println!(
                "{}@{}  {}  {}",
                d["name"].as_str().unwrap_or(""),
                d["version"].as_str().unwrap_or(""),
                extra(d),
                d["created_at"].as_str().unwrap_or("")
            );
        }
    }
}

/// Runs `whet datasets …`.
pub fn datasets(c: Datasets) -> Result<()> {
    match c {
        Datasets::Push {
            path,
            name,
            version,
            format,
            common,
        } => {
            let (home, mut store) = common.open()?;
            let req = datasets::PushRequest {
                path,
                name,
                version,
                format,
            };
            let (doc, pushed) = datasets::push(&home, &mut store, &req)?;
            if common.json {
                println!("{doc}");
            } else {
                let splits: Vec<String> = doc["splits"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(s, d)| format!("{s}: {} rows", d["rows"]))
                    .collect();
                println!(
                    "{}@{}: {} ({}; sha256 {})",
                    doc["name"].as_str().unwrap_or(""),
                    doc["version"].as_str().unwrap_or(""),
                    pushed_word(pushed),
                    splits.join(", "),
                    &doc["digest"].as_str().unwrap_or("")
                        [..12.min(doc["digest"].as_str().unwrap_or("").len())]
                );
            }
            Ok(())
        }
        Datasets::List(common) => {
            let (_, store) = common.open()?;
            table(&datasets::list(&store)?, common.json, |d| {
                format!("{} rows", d["row_count"])
            });
            Ok(())
        }
        Datasets::Show { reference, common } => {
            let (_, store) = common.open()?;
            let (name, version, _) = datasets::parse_ref(&reference)
                .ok_or_else(|| anyhow::anyhow!("{reference:?}: expected name@version"))?;
            let doc = datasets::get(&store, name, version)?;
            if common.json {
                println!("{doc}");
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            Ok(())
        }
    }
}

/// Runs `whet capabilities …`.
pub fn capabilities(c: Capabilities) -> Result<()> {
    match c {
        Capabilities::Push { file, common } => {
            let (_, mut store) = common.open()?;
            let cap = Capability::from_file(&file)?;
            let pushed = capabilities::push(&mut store, &cap)?;
            if common.json {
                let (_, digest) = capabilities::get(&store, &cap.reference())?;
                println!(
                    "{}",
                    serde_json::json!({"name": cap.name, "version": cap.version, "digest": digest, "result": pushed_word(pushed)})
                );
            } else {
                println!("{}: {}", cap.reference(), pushed_word(pushed));
            }
            Ok(())
        }
        Capabilities::List(common) => {
            let (_, store) = common.open()?;
            table(&capabilities::list(&store)?, common.json, |d| {
                format!("{} tools", d["tools"].as_array().map(Vec::len).unwrap_or(0))
            });
            Ok(())
        }
        Capabilities::Show { reference, common } => {
            let (_, store) = common.open()?;
            let (cap, digest) = capabilities::get(&store, &reference)?;
            let mut doc = serde_json::to_value(&cap)?;
            doc["digest"] = Value::String(digest);
            if common.json {
                println!("{doc}");
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            Ok(())
        }
    }
}
