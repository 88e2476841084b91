//! Files: safetensors and JSON written atomically (temp file + rename), sha256 digests.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

use crate::LoraError;

/// A sibling temp path in the same directory, so the final rename is atomic.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes bytes to `path` atomically: a temp file in the same directory, fsync, rename.
/// A crash leaves either the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LoraError> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(LoraError::io(path, e));
    }
    Ok(())
}

/// Writes pretty JSON atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<(), LoraError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| LoraError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes f32 tensors as safetensors with PEFT's conventional `{"format": "pt"}` metadata,
/// atomically. Keys are written in sorted order (safetensors sorts them anyway).
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
) -> Result<(), LoraError> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(candle_core::DType::F32)?;
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        owned.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views = owned
        .iter()
        .map(|(n, shape, bytes)| {
            TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| LoraError::Io {
                    path: path.display().to_string(),
                    message: format!("tensor {n}: {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| LoraError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file, converted to f32.
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, LoraError> {
    let bytes = std::fs::read(path).map_err(|e| LoraError::io(path, e))?;
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| LoraError::Parse {
            path: path.display().to_string(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
    tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(candle_core::DType::F32)?)))
        .collect()
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, LoraError> {
    let bytes = std::fs::read(path).map_err(|e| LoraError::io(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}
