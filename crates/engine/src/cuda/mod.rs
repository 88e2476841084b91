//! whet's kernels on CUDA: the `cuda_fwd` halves of the engine's custom ops, launching the PTX
//! of `whet-kernels` through cudarc on candle's own stream, so the model code is the same on
//! `Device::Cuda` as on the CPU.
//!
//! - `whet_kernels::plan` (plain Rust, built and tested everywhere): the shape checks and the
//!   attention tables;
//! - `launch`: loading modules, views of storages, launch configs;
//! - `elementwise`: RMSNorm, RoPE, SwiGLU (forward and backward);
//! - `xent`: target log-probabilities over a logits chunk and their gradient;
//! - `gemm`: the projections — cuBLAS GEMMs (bf16 × bf16 → f32 for bf16 base weights), the
//!   bias and the LoRA low-rank product accumulated into the same output;
//! - `attn`: flash-style attention, forward and backward.
//!
//! The CPU op stays the reference each kernel is tested against (`tests/cuda.rs`).

pub(crate) mod attn;
pub(crate) mod elementwise;
pub(crate) mod gemm;
mod launch;
pub(crate) mod xent;

pub use decode::decode_attention_fwd;

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
        let plan = whet_kernels::plan::decode(lq.dims(), lk.dims(), lv.dims(), keys, &mask.pad)
            .map_err(candle_core::Error::Msg)?;
        let p = super::attn::Params {
            window: mask.window.unwrap_or(0),
            scale,
        };
        super::attn::attn_fwd(&plan, p, &Default::default(), (sq, lq), (sk, lk), (sv, lv))
    }
}
