//! LoRA adapters for Llama-family models: sites and PEFT key names, PEFT's initialisation,
//! PEFT adapter files, AdamW with f32 state as torch computes it, resumable state, merging.

mod adamw;
mod adapter;
mod config;
pub mod io;
pub mod peft;
pub mod state;

pub use adamw::{AdamW, Moments, StepReport};
pub use adapter::{LoraAdapter, LoraPair, LoraSiteWeights, LoraWeights, SiteShape};
pub use config::{LoraConfig, Site, Target};

use std::path::Path;

/// Errors of adapters, their files and the optimizer. Each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Invalid hyper-parameters.
    #[error("LoRA config: {0}")]
    Config(String),
    /// A tensor whose shape does not fit the model.
    #[error("tensor {tensor}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor (PEFT key).
        tensor: String,
        /// What the model needs.
        expected: Vec<usize>,
        /// What the file has.
        found: Vec<usize>,
    },
    /// A tensor the config requires is absent.
    #[error("missing tensor {0}")]
    MissingTensor(String),
    /// A tensor that belongs to no adapted site.
    #[error("unexpected tensor {0}: it matches no adapted projection of this model")]
    UnexpectedTensor(String),
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A file is malformed.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A file does not match its recorded checksum.
    #[error("{path}: checksum mismatch (expected sha256 {expected}, found {found}); the file is corrupt or was changed")]
    Checksum {
        /// The file.
        path: String,
        /// The recorded sha256.
        expected: String,
        /// The actual sha256.
        found: String,
    },
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl LoraError {
    /// An I/O error on a path.
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Adds the file to tensor-level errors.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            LoraError::Shape {
                tensor,
                expected,
                found,
            } => LoraError::Shape {
                tensor: format!("{tensor} in {}", path.display()),
                expected,
                found,
            },
            LoraError::MissingTensor(t) => {
                LoraError::MissingTensor(format!("{t} in {}", path.display()))
            }
            LoraError::UnexpectedTensor(t) => {
                LoraError::UnexpectedTensor(format!("{t} in {}", path.display()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::collections::BTreeMap;
    use whet_contract::AdamParams;

    #[test]
    fn state_roundtrip_is_exact_and_checksummed() {
        let shapes: Vec<SiteShape> = Target::ALL
            .iter()
            .map(|&target| SiteShape {
                site: Site { layer: 0, target },
                in_features: 5,
                out_features: 7,
            })
            .collect();
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            seed: 3,
            ..LoraConfig::default()
        };
        let adapter = LoraAdapter::init(cfg, &shapes, &Device::Cpu).unwrap();
        let grads: BTreeMap<String, Tensor> = adapter
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, (v.ones_like().unwrap() * 0.5).unwrap()))
            .collect();
        let mut opt = AdamW::new();
        opt.step(&adapter, &grads, &AdamParams::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("step-1");
        state::save_state(&at, "tiny", &adapter, &opt, serde_json::json!({"k": 1})).unwrap();
        // Saving again over it replaces it whole.
        state::save_state(&at, "tiny", &adapter, &opt, serde_json::json!({"k": 1})).unwrap();
        let loaded = state::load_state(&at, &shapes, &Device::Cpu).unwrap();
        assert_eq!(loaded.optimizer, opt);
        assert_eq!(loaded.manifest.trainer["k"], 1);
        for ((_, a), (_, b)) in adapter.named_vars().iter().zip(loaded.adapter.named_vars()) {
            let x: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y);
        }
        // A corrupted file is refused with its name.
        let opt_file = at.join(state::OPTIMIZER_FILE);
        let mut bytes = std::fs::read(&opt_file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&opt_file, bytes).unwrap();
        let err = state::load_state(&at, &shapes, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
    }
}
