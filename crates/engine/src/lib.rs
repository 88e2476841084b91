//! whet's engine: Tinker's training contract in process, on candle.
//!
//! - [`loader`] finds and reads models (Hugging Face directories, GGUF files, the hub cache);
//! - [`model`] is the Llama-family decoder with LoRA at each projection;
//! - [`session::TrainingSession`] implements `TrainingClient` (forward, forward_backward,
//!   optim_step, save/load state, save_weights_for_sampler);
//! - [`sampler::Sampler`] implements `SamplingClient`;
//! - [`merge`] folds an adapter into the base weights and writes a plain HF directory.
//!
//! Numerics: f32 everywhere on CPU by default; with [`Precision::Bf16`] the frozen base
//! projections compute in bf16 (see [`linear`]), everything trained stays f32. With the `cuda`
//! feature the same model runs on `Device::Cuda` through whet's own kernels (the `cuda` module).

mod attention;
pub mod batch;
pub mod bf16;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gguf_export;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod losses;
pub mod merge;
pub mod model;
pub mod ops;
mod prefix_cache;
pub mod sampler;
pub mod session;
#[cfg(test)]
mod test_util;

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use whet_contract::ContractError;
use whet_lora::{LoraAdapter, LoraError};

pub use config::{Architecture, ModelConfig};
pub use linear::Precision;
pub use loader::ModelSource;
pub use model::Model;
pub use sampler::{Detokenize, Sampler, SamplerOptions, DEFAULT_PREFIX_CACHE_BYTES};
pub use session::TrainingSession;

/// Runs `f` on a worker of rayon's global pool (the one candle's GEMM and whet's kernels run
/// on). Called from outside the pool, every parallel operation would hop into it and back, and
/// the idle workers would spin against the calling thread for the cores (on 2 cores, a third
/// of a decoding step went to that); from inside, the caller is one of the workers and small
/// operations run inline.
pub(crate) fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Errors of the engine; each names the file, tensor or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be found or read.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A model config that does not hold together.
    #[error("{0}")]
    Config(String),
    /// A model or option whet does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A weight the model needs is absent.
    #[error("missing tensor {0}")]
    MissingTensor(String),
    /// A weight the model does not use.
    #[error("unexpected tensor {0}")]
    UnexpectedTensor(String),
    /// A weight of the wrong shape.
    #[error("tensor {tensor}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A request field that is invalid.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The field (`data[2].loss_fn_inputs.target_tokens`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// An adapter or optimizer error.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A broken internal invariant.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<EngineError> for ContractError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid { field, message } => {
                ContractError::InvalidInput { field, message }
            }
            EngineError::Unsupported(m) => ContractError::Unsupported(m),
            EngineError::Io { path, message } => ContractError::Io { path, message },
            other => ContractError::Internal(other.to_string()),
        }
    }
}

/// The device a user named: `cpu`, `cuda` (GPU 0) or `cuda:N`. Naming a GPU in a build
/// without the `cuda` feature is an error that says how to get one.
pub fn parse_device(spec: &str) -> Result<Device, EngineError> {
    let ordinal = match spec.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| EngineError::Invalid {
                field: "device".into(),
                message: format!("{s:?}: expected cpu, cuda or cuda:N"),
            })?,
    };
    if !cfg!(feature = "cuda") {
        return Err(EngineError::Unsupported(format!(
            "device {spec}: this whet was built without CUDA (build with `--features cuda`; \
             see the README's CUDA section)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        // candle appends a backtrace when RUST_BACKTRACE is set: keep the error's first line.
        let e = e.to_string();
        let e = e.lines().next().unwrap_or_default();
        let why = if e.contains("STUB_LIBRARY") {
            "no NVIDIA driver: libcuda.so.1 is the link stub of tools/get-cuda.sh".to_string()
        } else {
            e.to_string()
        };
        EngineError::Unsupported(format!("device {spec}: no such CUDA device ({why})"))
    })
}

/// Loads a base model from what a user typed (directory, `.gguf`, hub id) onto `device`.
pub fn load_model(
    spec: &str,
    device: &Device,
    precision: Precision,
) -> Result<(ModelSource, Arc<Model>), EngineError> {
    let source = ModelSource::resolve(spec)?;
    let weights = loader::load(&source, device)?;
    let model =
        Model::from_weights_in(weights, device, precision).map_err(|e| in_source(e, &source))?;
    Ok((source, Arc::new(model)))
}

fn in_source(e: EngineError, source: &ModelSource) -> EngineError {
    let at = source.tokenizer_path().display();
    match e {
        EngineError::MissingTensor(t) => EngineError::MissingTensor(format!("{t} in {at}")),
        EngineError::UnexpectedTensor(t) => EngineError::UnexpectedTensor(format!("{t} in {at}")),
        EngineError::Shape {
            tensor,
            expected,
            found,
        } => EngineError::Shape {
            tensor: format!("{tensor} in {at}"),
            expected,
            found,
        },
        other => other,
    }
}

/// Loads a PEFT adapter directory for `model`, checking its shapes against the model.
pub fn load_adapter(model: &Model, dir: &Path) -> Result<LoraAdapter, EngineError> {
    Ok(whet_lora::peft::load_peft_adapter(
        dir,
        &model.site_shapes(),
        model.device(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_a_cpu_build_refuses_cuda_clearly() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0"] {
            let e = parse_device(bad).unwrap_err().to_string();
            assert!(e.contains("device") && e.contains("cuda:N"), "{e}");
        }
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:1").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
