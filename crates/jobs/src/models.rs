//! The models registry: `whet models publish JOB[:STEP]` turns a job's checkpoint into an
//! immutable `name@version` recording its lineage — the base model (and its content hash), the
//! capability and datasets it was trained on (pinned), the job and its config, its final
//! metrics — with the adapter's files stored as blobs. Aliases (`champion`, `staging`) point at
//! a version and move; `name@version` and `name@alias` are taken wherever a model is.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::home::{sha256_bytes, sha256_file, Home};
use crate::store::{Pushed, Store};
use crate::{check_name, check_version, JobError};

const KIND: &str = "model";

/// A published model resolved for use: its base model and adapter directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// `name@version`.
    pub reference: String,
    /// The base model, as the job that trained it named it.
    pub base_model: String,
    /// The adapter (a PEFT directory in the home, checked against its sha256s).
    pub adapter: PathBuf,
}

/// sha256 of a model's weights: the file for a GGUF, the weight files of a directory.
pub fn model_digest(model: &str) -> Result<Option<String>, JobError> {
    let path = Path::new(model);
    if path.is_file() {
        return sha256_file(path).map(Some);
    }
    if !path.is_dir() {
        return Ok(None); // a hub id: the cache's own content addressing names it
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| JobError::io(path, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "safetensors" || e == "json")
        })
        .collect();
    files.sort();
    let mut joined = String::new();
    for f in files {
        let name = f.file_name().map(|n| n.to_string_lossy().to_string());
        joined.push_str(&format!(
            "{} {}\n",
            name.unwrap_or_default(),
            sha256_file(&f)?
        ));
    }
    Ok(Some(sha256_bytes(joined.as_bytes())))
}

/// Publishes a checkpoint of a completed job as `name@version`. `step` picks a checkpoint
/// (default: the final adapter).
pub fn publish(
    home: &Home,
    store: &mut Store,
    job_id: &str,
    step: Option<usize>,
    name: &str,
    version: &str,
) -> Result<(Value, Pushed), JobError> {
    check_name("model name", name)?;
    check_version("model version", version)?;
    let job = store.job(job_id)?;
    let checkpoints = job["artifacts"]["checkpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (adapter, at_step) = match step {
        Some(s) => {
            let c = checkpoints
                .iter()
                .find(|c| c["step"].as_u64() == Some(s as u64))
                .ok_or_else(|| {
                    let have: Vec<String> =
                        checkpoints.iter().map(|c| c["step"].to_string()).collect();
                    JobError::NotFound(format!(
                        "job {job_id} has no checkpoint at step {s} (it has: {})",
                        have.join(", ")
                    ))
                })?;
            (
                c["adapter"].as_str().unwrap_or_default().to_string(),
                s as u64,
            )
        }
        None => {
            if job["status"] != "completed" {
                return Err(JobError::Invalid(format!(
                    "job {job_id} is {}: publish a completed job, or name a checkpoint (JOB:STEP)",
                    job["status"]
                )));
            }
            let a = job["artifacts"]["final_adapter"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let s = checkpoints
                .last()
                .and_then(|c| c["step"].as_u64())
                .unwrap_or(0);
            (a, s)
        }
    };
    let dir = PathBuf::from(&adapter);
    if !dir.join("adapter_config.json").is_file() {
        return Err(JobError::Invalid(format!(
            "{}: not a PEFT adapter directory",
            dir.display()
        )));
    }
    // The adapter's files, stored by content.
    let mut files = serde_json::Map::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| JobError::io(&dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for f in entries {
        let (sha, bytes) = home.put_blob(&f)?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        files.insert(name, json!({"sha256": sha, "bytes": bytes}));
    }
    let base = job["model"].as_str().unwrap_or_default().to_string();
    let content = json!({"base_model": base, "files": files});
    let digest = sha256_bytes(content.to_string().as_bytes());
    let document = json!({
        "name": name,
        "version": version,
        "digest": digest,
        "framework": "safetensors",
        "kind": "peft_lora",
        "base_model": {"model": base, "sha256": model_digest(&base)?},
        "capability": job["capability"],
        "dataset_refs": {
            "dataset": job["dataset_ref"], "eval_dataset": job["eval_dataset_ref"],
            "trajectory_datasets": job["trajectory_dataset_refs"],
            "prompt_dataset": job["prompt_dataset_ref"], "world_manifest": job["world_manifest_id"],
        },
        "job": {"id": job_id, "trainer_type": job["trainer_type"], "step": at_step,
                "config": job["config"]},
        "metrics": job["metrics"],
        "files": {"adapter": files},
        "created_at": crate::now_rfc3339(),
    });
    let pushed = store.push(
        KIND,
        name,
        version,
        &digest,
        &document,
        &crate::now_rfc3339(),
    )?;
    let document = store.registry_get(KIND, name, version)?.unwrap_or(document);
    materialize(home, &document)?;
    Ok((document, pushed))
}

/// `models/<name>/<version>/adapter/`: hard links to the blobs (copies where links fail).
fn materialize(home: &Home, doc: &Value) -> Result<PathBuf, JobError> {
    let name = doc["name"].as_str().unwrap_or_default();
    let version = doc["version"].as_str().unwrap_or_default();
    let dir = home
        .root()
        .join("models")
        .join(name)
        .join(version)
        .join("adapter");
    std::fs::create_dir_all(&dir).map_err(|e| JobError::io(&dir, e))?;
    for (file, entry) in doc["files"]["adapter"].as_object().into_iter().flatten() {
        let sha = entry["sha256"].as_str().unwrap_or_default();
        let dest = dir.join(file);
        if dest.is_file() && sha256_file(&dest)? == sha {
            continue;
        }
        let blob = home.verify_blob(sha)?;
        let _ = std::fs::remove_file(&dest);
        if std::fs::hard_link(&blob, &dest).is_err() {
            std::fs::copy(&blob, &dest).map_err(|e| JobError::io(&dest, e))?;
        }
    }
    Ok(dir)
}

/// Every published model version, with the aliases pointing at it.
pub fn list(store: &Store) -> Result<Vec<Value>, JobError> {
    let mut docs = store.registry_list(KIND, None)?;
    for d in &mut docs {
        let name = d["name"].as_str().unwrap_or_default().to_string();
        let version = d["version"].as_str().unwrap_or_default().to_string();
        let aliases: Vec<String> = store
            .aliases(KIND, &name)?
            .into_iter()
            .filter(|(_, v)| *v == version)
            .map(|(a, _)| a)
            .collect();
        d["aliases"] = json!(aliases);
    }
    Ok(docs)
}

/// The document of `name@version` or `name@alias`.
pub fn get(store: &Store, reference: &str) -> Result<Value, JobError> {
    let (name, which) = reference.split_once('@').ok_or_else(|| {
        JobError::Invalid(format!(
            "model {reference:?}: expected name@version or name@alias"
        ))
    })?;
    let version = if semver::Version::parse(which).is_ok() {
        which.to_string()
    } else {
        store
            .aliases(KIND, name)?
            .into_iter()
            .find(|(a, _)| a == which)
            .map(|(_, v)| v)
            .ok_or_else(|| {
                JobError::NotFound(format!(
                    "model {name} has no alias {which:?} (`whet models alias set`)"
                ))
            })?
    };
    store.registry_require(
        KIND,
        name,
        &version,
        "whet models publish JOB --name N --version V",
    )
}

/// Points `alias` of `name` at `version` (which must be published).
pub fn set_alias(
    store: &mut Store,
    name: &str,
    version: &str,
    alias: &str,
) -> Result<(), JobError> {
    check_name("alias", alias)?;
    if semver::Version::parse(alias).is_ok() {
        return Err(JobError::Invalid(format!(
            "alias {alias:?} looks like a version"
        )));
    }
    store.registry_require(
        KIND,
        name,
        version,
        "whet models publish JOB --name N --version V",
    )?;
    store.set_alias(KIND, name, alias, Some(version), &crate::now_rfc3339())
}

/// Removes `alias` of `name`.
pub fn remove_alias(store: &mut Store, name: &str, alias: &str) -> Result<(), JobError> {
    store.set_alias(KIND, name, alias, None, &crate::now_rfc3339())
}

/// A model reference as a base model and adapter: `name@version` / `name@alias` of a published
/// model (its base and its adapter, checked), or `None` for anything else (a path, a hub id).
pub fn resolve(home: &Home, store: &Store, spec: &str) -> Result<Option<Resolved>, JobError> {
    if Path::new(spec).exists() || !spec.contains('@') {
        return Ok(None);
    }
    let Some((name, _)) = spec.split_once('@') else {
        return Ok(None);
    };
    if store.registry_list(KIND, Some(name))?.is_empty() {
        // `name@version|alias` that is no file: a published model this home does not have
        // (hub ids are `org/name`, and are left to the loader).
        if !name.contains('/') {
            return Err(JobError::Invalid(format!(
                "model {spec:?}: no model named {name:?} is published in {} \
                 (`whet models list`; publish one with `whet models publish JOB --name {name} ...`)",
                home.root().display()
            )));
        }
        return Ok(None);
    }
    let doc = get(store, spec)?;
    let adapter = materialize(home, &doc)?;
    Ok(Some(Resolved {
        reference: format!(
            "{}@{}",
            doc["name"].as_str().unwrap_or_default(),
            doc["version"].as_str().unwrap_or_default()
        ),
        base_model: doc["base_model"]["model"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        adapter,
    }))
}
