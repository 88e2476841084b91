//! The plumbing every launch shares: a kernel by name (its module loaded once per device),
//! contiguous f32 views of storages, output buffers, and errors that name the tensor.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{Layout, Result, Storage, Tensor};
use whet_kernels::geometry::Launch;
use whet_kernels::Module;

/// A candle error with the message `m`.
pub(crate) fn err(m: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(m.into())
}

/// cudarc's launch config of a geometry.
pub(crate) fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: 0,
    }
}

/// Kernel `name` of module `m` on `dev` (the PTX is loaded and JIT-compiled on first use,
/// then cached by candle under the module's name). Launch it on `dev.cuda_stream()`, candle's
/// stream, so it is ordered with every candle op on the same tensors.
pub(crate) fn func(dev: &CudaDevice, m: &Module, name: &str) -> Result<CudaFunction> {
    debug_assert!(m.functions.contains(&name), "{name} is not in {}", m.name);
    Ok(dev
        .get_or_load_custom_func(name, &format!("whet_{}", m.name), m.ptx())?
        .into_cuda_function())
}

/// The f32 elements of a contiguous storage, as a view (no copy).
pub(crate) fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| err(format!("{what}: the CUDA kernels need a contiguous tensor")))?;
    let slice = s
        .as_cuda_slice::<f32>()
        .map_err(|e| err(format!("{what}: {e} (the CUDA kernels take f32)")))?;
    Ok(slice.slice(a..b))
}

/// An uninitialised f32 buffer for `n` outputs (never empty: a zero-byte allocation is an
/// error for the driver, and the layout, not the buffer, carries the tensor's size).
pub(crate) fn output(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: every kernel writes each of the n outputs before anything reads them.
    unsafe { dev.alloc::<f32>(n.max(1)) }
}

/// Calls `f` with the CUDA storage and layout of `t` (which must live on a CUDA device).
pub(crate) fn with_cuda<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(s, layout),
        _ => Err(err(format!("{what}: expected a tensor on the CUDA device"))),
    }
}

/// Wraps a finished buffer as a storage of `dev`.
pub(crate) fn storage(out: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}

/// The device a storage lives on.
pub(crate) fn device(s: &CudaStorage) -> &CudaDevice {
    s.device()
}

/// Maps a launch's driver error into candle's.
pub(crate) fn launched<T, E: std::fmt::Display>(
    r: std::result::Result<T, E>,
    what: &str,
) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| err(format!("{what}: kernel launch failed: {e}")))
}
