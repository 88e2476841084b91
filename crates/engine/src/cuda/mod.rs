//! whet's kernels on CUDA: the `cuda_fwd` halves of the engine's custom ops, launching the PTX
//! of `whet-kernels` through cudarc on candle's own stream, so the model code is the same on
//! `Device::Cuda` as on the CPU.
//!
//! - [`plan`]: the shape checks and attention tables, plain Rust (built and tested everywhere);
//! - `launch`: loading modules, views of storages, launch configs;
//! - `elementwise`: RMSNorm, RoPE, SwiGLU (forward and backward);
//! - `xent`: target log-probabilities over a logits chunk and their gradient;
//! - `gemm`: the projections — cuBLAS GEMMs (bf16 × bf16 → f32 for bf16 base weights), the
//!   bias and the LoRA low-rank product accumulated into the same output;
//! - `attn`: flash-style attention, forward and backward.
//!
//! The CPU op stays the reference each kernel is tested against (`tests/cuda.rs`).

pub mod plan;

#[cfg(feature = "cuda")]
pub(crate) mod attn;
#[cfg(feature = "cuda")]
pub(crate) mod elementwise;
#[cfg(feature = "cuda")]
pub(crate) mod gemm;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub(crate) mod xent;

#[cfg(feature = "cuda")]
pub use decode::decode_attention_fwd;

#[cfg(feature = "cuda")]
mod decode {
    use candle_core::{CudaStorage, Layout, Result, Shape};

    use crate::kernels::AttnMask;

    /// The CUDA forward of decoding attention over a KV cache (`kv_cache::decode_attention`):
    /// `q: (B, H, T, D)` over the first `keys` slots of `k, v: (B, Hkv, capacity, D)`, read in
    /// place, the newest `T` tokens at slots `keys − T ..`, masked by `mask`'s `pad` and
    /// `window` (its `offset` is implied by `keys`). The flash forward kernel does the work;
    /// nothing is kept for a backward pass (decoding has none).
    pub fn decode_attention_fwd(
        keys: usize,
        mask: &AttnMask,
        scale: f32,
        (sq, lq): (&CudaStorage, &Layout),
        (sk, lk): (&CudaStorage, &Layout),
        (sv, lv): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let plan = super::plan::decode(lq.dims(), lk.dims(), lv.dims(), keys, &mask.pad)
            .map_err(candle_core::Error::Msg)?;
        let p = super::attn::Params {
            window: mask.window.unwrap_or(0),
            scale,
        };
        super::attn::attn_fwd(&plan, p, &Default::default(), (sq, lq), (sk, lk), (sv, lv))
    }
}
