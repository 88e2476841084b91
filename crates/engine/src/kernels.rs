//! Fused CPU operations with hand-written backward passes: RMSNorm, RoPE, SwiGLU (and, in
//! `attention.rs`, causal grouped-query attention).
//!
//! Composed from core ops, each of these keeps several full-size intermediates alive for the
//! backward pass (attention keeps `heads × T²` scores several times over). Fused, they keep
//! only their inputs and recompute what the gradient needs, which cuts a training step's
//! activation memory by about half and its elementwise passes by more. Each is tested against
//! the composite it replaces (values and gradients), in `ops` terms.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

pub use crate::attention::{attention, packed_attention, AttnMask};

pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused kernels need contiguous inputs"),
    }
}

/// Calls `f` on the f32 values of a CPU tensor where they lie (no copy when contiguous).
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(slice(cpu, layout)?)),
        _ => candle_core::bail!("a CPU kernel was given a tensor on another device"),
    }
}

/// A contiguous storage slice as a tensor of its own (a copy).
pub(crate) fn tensor_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    Tensor::from_slice(slice(s, l)?, l.shape(), &candle_core::Device::Cpu)
}

pub(crate) fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x · inv · w, inv = 1 / sqrt(mean(x²) + eps), over the last dimension.
// ---------------------------------------------------------------------------------------------

struct RmsNorm {
    /// The weight's values on the host (CPU inputs only; empty on a GPU).
    w: Arc<Vec<f32>>,
    /// The weight as given, where the device kernels read it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    wt: Tensor,
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|x| x * x).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let d = self.w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let inv = inv_rms(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(self.w.iter()) {
                *y = x * inv * w;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::elementwise::rms_norm_fwd(s, l, &self.wt, self.eps)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let op = crate::cuda::elementwise::RmsNormBwd {
                w: self.wt.clone(),
                eps: self.eps,
            };
            let (x, g) = (x.detach().contiguous()?, grad.detach().contiguous()?);
            return Ok(Some(x.apply_op2_no_bwd(&g, &op)?));
        }
        // dx_j = inv·w_j·g_j − inv³·x_j·mean_k(w_k·g_k·x_k)
        let (xv, gv) = (values(x)?, values(grad)?);
        let d = self.w.len();
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(d)
            .zip(xv.par_chunks(d).zip(gv.par_chunks(d)))
            .for_each(|(dx, (x, g))| {
                let inv = inv_rms(x, self.eps);
                let dot: f32 = x
                    .iter()
                    .zip(g)
                    .zip(self.w.iter())
                    .map(|((x, g), w)| x * g * w)
                    .sum();
                let c = inv * inv * inv * dot / d as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(self.w.iter()) {
                    *dx = inv * w * g - c * x;
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// RMSNorm over the last dimension with a frozen weight `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let on_cpu = x.device().is_cpu();
    let op = RmsNorm {
        w: Arc::new(if on_cpu { values(w)? } else { vec![] }),
        wt: w.clone(),
        eps: eps as f32,
    };
    let x = x.contiguous()?;
    Ok(if x.track_op() {
        x.apply_op1(op)?
    } else {
        x.apply_op1_no_bwd(&op)?
    })
}

// ---------------------------------------------------------------------------------------------
// RoPE, rotate-half layout, on (N, heads, D) with per-row angle tables (N, D/2).
// ---------------------------------------------------------------------------------------------

struct Rope {
    /// The tables' values on the host (CPU inputs only; empty on a GPU).
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    /// The tables as given, where the device kernels read them.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    tables: (Tensor, Tensor),
}

impl Rope {
    /// Rotates every (i, i + D/2) pair of each head of each row by the row's angle; `sign`
    /// −1 rotates backwards (the gradient of a rotation is the inverse rotation).
    fn rotate(&self, x: &[f32], heads: usize, d: usize, sign: f32) -> Vec<f32> {
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(heads * d)
            .zip(x.par_chunks(heads * d))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let c = &self.cos[row * half..(row + 1) * half];
                let s = &self.sin[row * half..(row + 1) * half];
                for h in 0..heads {
                    let (xh, oh) = (&x[h * d..(h + 1) * d], &mut o[h * d..(h + 1) * d]);
                    for i in 0..half {
                        let (a, b) = (xh[i], xh[i + half]);
                        let si = sign * s[i];
                        oh[i] = a * c[i] - b * si;
                        oh[i + half] = b * c[i] + a * si;
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, heads, d) = l.shape().dims3()?;
        let out = self.rotate(slice(s, l)?, heads, d, 1.0);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::elementwise::rope(s, l, &self.tables.0, &self.tables.1, 1.0)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let op = crate::cuda::elementwise::RopeBwd {
                cos: self.tables.0.clone(),
                sin: self.tables.1.clone(),
            };
            return Ok(Some(grad.detach().contiguous()?.apply_op1_no_bwd(&op)?));
        }
        let (_, heads, d) = x.dims3()?;
        let g = self.rotate(&values(grad)?, heads, d, -1.0);
        Ok(Some(Tensor::from_vec(g, x.shape(), x.device())?))
    }
}

/// RoPE on `x: (N, heads, D)` with `cos, sin: (N, D/2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let on_cpu = x.device().is_cpu();
    let host = |t: &Tensor| -> Result<Arc<Vec<f32>>> {
        Ok(Arc::new(if on_cpu { values(t)? } else { vec![] }))
    };
    let op = Rope {
        cos: host(cos)?,
        sin: host(sin)?,
        tables: (cos.contiguous()?, sin.contiguous()?),
    };
    let x = x.contiguous()?;
    Ok(if x.track_op() {
        x.apply_op1(op)?
    } else {
        x.apply_op1_no_bwd(&op)?
    })
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: silu(g) · u.
// ---------------------------------------------------------------------------------------------

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(y, (g, u))| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(*g) * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::elementwise::swiglu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() {
            let (gd, ud) = (g.detach().contiguous()?, u.detach().contiguous()?);
            let dy = grad.detach().contiguous()?;
            // One op, two gradients: stacked as (2, …) and split here.
            let both = gd.apply_op3_no_bwd(&ud, &dy, &crate::cuda::elementwise::SwiGluBwd)?;
            return Ok((Some(both.get(0)?), Some(both.get(1)?)));
        }
        // d/dg = grad·u·σ(g)·(1 + g·(1 − σ(g))), d/du = grad·silu(g)
        let (gv, uv, dy) = (values(g)?, values(u)?, values(grad)?);
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(
                gv.par_chunks(4096)
                    .zip(uv.par_chunks(4096))
                    .zip(dy.par_chunks(4096)),
            )
            .for_each(|((dg, du), ((g, u), dy))| {
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                    du[i] = dy[i] * g[i] * s;
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (g, u) = (gate.contiguous()?, up.contiguous()?);
    Ok(if g.track_op() || u.track_op() {
        g.apply_op2(&u, SwiGlu)?
    } else {
        g.apply_op2_no_bwd(&u, &SwiGlu)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
    use crate::test_util::{check, var};
    use candle_core::Device;

    #[test]
    fn rms_norm_matches_composite() {
        let x = var(&[5, 3, 8], 1);
        let w = (var(&[8], 2).as_tensor() + 1.5).unwrap().detach();
        check(
            &[&x],
            &|| rms_norm(x.as_tensor(), &w, 1e-5).unwrap(),
            &|| ops::rms_norm(x.as_tensor(), &w, 1e-5).unwrap(),
            "rms_norm",
        );
    }

    #[test]
    fn rope_matches_composite() {
        let x = var(&[4, 3, 8], 3);
        let (cos, sin) =
            ops::rope_tables(&[1.0, 0.3, 0.1, 0.01], &[0, 5, 2, 9], &Device::Cpu).unwrap();
        check(
            &[&x],
            &|| rope(x.as_tensor(), &cos, &sin).unwrap(),
            &|| ops::rope(x.as_tensor(), &cos, &sin).unwrap(),
            "rope",
        );
    }

    #[test]
    fn swiglu_matches_composite() {
        let (g, u) = (var(&[6, 10], 4), var(&[6, 10], 5));
        check(
            &[&g, &u],
            &|| swiglu(g.as_tensor(), u.as_tensor()).unwrap(),
            &|| (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap(),
            "swiglu",
        );
    }
}
