//! Resumable training state: the adapter (a PEFT directory), the optimizer moments and step,
//! and whatever else the trainer needs to continue bitwise where it stopped.
//!
//! A state is a directory written whole or not at all (built beside its final name, then
//! renamed), with a sha256 of every file checked on load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::{read_safetensors, sha256_file, write_atomic, write_safetensors_atomic};
use crate::peft::{load_peft_adapter, save_peft_adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::{AdamW, LoraAdapter, LoraConfig, LoraError, Moments, SiteShape};

/// The optimizer file of a state directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The manifest of a state directory.
pub const STATE_FILE: &str = "whet_state.json";
/// The marker Tinker's downloads carry once a checkpoint is complete.
pub const COMPLETE_MARKER: &str = "checkpoint_complete";
const FORMAT: &str = "whet-state-v1";

/// The manifest of a saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateManifest {
    /// Always `whet-state-v1`.
    pub format: String,
    /// The base model the adapter belongs to.
    pub base_model: String,
    /// The adapter's hyper-parameters (whet's full form, beyond PEFT's file).
    pub lora: LoraConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// Trainer counters (e.g. the dropout stream position), opaque to this crate.
    pub trainer: serde_json::Value,
    /// sha256 of each file of the directory.
    pub sha256: BTreeMap<String, String>,
}

/// A loaded state.
#[derive(Debug)]
pub struct TrainingState {
    /// The adapter.
    pub adapter: LoraAdapter,
    /// The optimizer (moments and step).
    pub optimizer: AdamW,
    /// The manifest.
    pub manifest: StateManifest,
}

/// Writes a state directory at `dir` atomically (an existing one is replaced).
pub fn save_state(
    dir: &Path,
    base_model: &str,
    adapter: &LoraAdapter,
    optimizer: &AdamW,
    trainer: serde_json::Value,
) -> Result<(), LoraError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| LoraError::Io {
            path: dir.display().to_string(),
            message: "a state needs a directory name".into(),
        })?;
    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&parent).map_err(|e| LoraError::io(&parent, e))?;
    let tmp: PathBuf = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| LoraError::io(&tmp, e))?;
    }
    let result = (|| {
        save_peft_adapter(adapter, base_model, &tmp)?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (key, m) in &optimizer.moments {
            let n = m.exp_avg.len();
            tensors.push((
                format!("{key}.exp_avg"),
                Tensor::from_vec(m.exp_avg.clone(), n, &Device::Cpu)?,
            ));
            tensors.push((
                format!("{key}.exp_avg_sq"),
                Tensor::from_vec(m.exp_avg_sq.clone(), n, &Device::Cpu)?,
            ));
        }
        write_safetensors_atomic(&tmp.join(OPTIMIZER_FILE), &tensors)?;
        let mut sha256 = BTreeMap::new();
        for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER_FILE] {
            sha256.insert(f.to_string(), sha256_file(&tmp.join(f))?);
        }
        let manifest = StateManifest {
            format: FORMAT.into(),
            base_model: base_model.into(),
            lora: adapter.config().clone(),
            step: optimizer.step,
            trainer,
            sha256,
        };
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| LoraError::Parse {
            path: STATE_FILE.into(),
            message: e.to_string(),
        })?;
        write_atomic(&tmp.join(STATE_FILE), text.as_bytes())?;
        write_atomic(&tmp.join(COMPLETE_MARKER), b"")?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Swap in: the old state (if any) stays whole until the new one is in place.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| LoraError::io(dir, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        return Err(LoraError::io(dir, e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Reads a state directory, verifying every checksum, for a model with adaptable `shapes`.
pub fn load_state(
    dir: &Path,
    shapes: &[SiteShape],
    device: &Device,
) -> Result<TrainingState, LoraError> {
    let manifest_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| LoraError::Io {
        path: manifest_path.display().to_string(),
        message: format!("{e} (is {} a state saved by save_state?)", dir.display()),
    })?;
    let manifest: StateManifest = serde_json::from_str(&text).map_err(|e| LoraError::Parse {
        path: manifest_path.display().to_string(),
        message: e.to_string(),
    })?;
    if manifest.format != FORMAT {
        return Err(LoraError::Parse {
            path: manifest_path.display().to_string(),
            message: format!("format '{}' is not {FORMAT}", manifest.format),
        });
    }
    for (file, want) in &manifest.sha256 {
        let path = dir.join(file);
        let got = sha256_file(&path)?;
        if &got != want {
            return Err(LoraError::Checksum {
                path: path.display().to_string(),
                expected: want.clone(),
                found: got,
            });
        }
    }
    let peft = load_peft_adapter(dir, shapes, device)?;
    // The PEFT file has PEFT's fields; the manifest has whet's full config (seed, patterns).
    let adapter = LoraAdapter::from_tensors(
        manifest.lora.clone(),
        shapes,
        peft.named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect(),
        device,
    )?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let mut tensors = read_safetensors(&opt_path, &Device::Cpu)?;
    let mut optimizer = AdamW {
        moments: BTreeMap::new(),
        step: manifest.step,
    };
    for (key, var) in adapter.named_vars() {
        let mut take = |suffix: &str| -> Result<Option<Vec<f32>>, LoraError> {
            match tensors.remove(&format!("{key}.{suffix}")) {
                None => Ok(None),
                Some(t) => {
                    if t.elem_count() != var.elem_count() {
                        return Err(LoraError::Shape {
                            tensor: format!("{key}.{suffix} in {}", opt_path.display()),
                            expected: var.dims().to_vec(),
                            found: t.dims().to_vec(),
                        });
                    }
                    Ok(Some(t.flatten_all()?.to_vec1()?))
                }
            }
        };
        match (take("exp_avg")?, take("exp_avg_sq")?) {
            (Some(exp_avg), Some(exp_avg_sq)) => {
                optimizer.moments.insert(
                    key,
                    Moments {
                        exp_avg,
                        exp_avg_sq,
                    },
                );
            }
            (None, None) => {}
            _ => {
                return Err(LoraError::MissingTensor(format!(
                    "{key}.exp_avg / .exp_avg_sq (one without the other) in {}",
                    opt_path.display()
                )))
            }
        }
    }
    if let Some(key) = tensors.keys().next() {
        return Err(LoraError::UnexpectedTensor(format!(
            "{key} in {}",
            opt_path.display()
        )));
    }
    Ok(TrainingState {
        adapter,
        optimizer,
        manifest,
    })
}
