//! Causal grouped-query attention as fused CPU operations with hand-written backward passes:
//! over a padded batch with a KV-cache offset, and over packed sequences (block-diagonal: packed
//! rows never attend to each other). Only the inputs are kept for the backward pass; the
//! probabilities are recomputed from them.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::{tensor_of, values};
use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

// ---------------------------------------------------------------------------------------------
// Causal grouped-query attention.
// ---------------------------------------------------------------------------------------------

/// Where query `i` of row `b` may look: keys `j` with `j ≤ offset + i`, `j ≥ pad[b]`, and
/// (with a window `w`) `offset + i − j < w`.
#[derive(Clone)]
pub struct AttnMask {
    /// Position of the first query among the keys.
    pub offset: usize,
    /// Sliding window, if any.
    pub window: Option<usize>,
    /// Left padding per batch row (empty: none).
    pub pad: Vec<usize>,
}

struct Attention {
    mask: AttnMask,
    scale: f64,
    /// The log-sum-exp rows a CUDA forward keeps for its backward.
    #[cfg(feature = "cuda")]
    saved: crate::cuda::attn::Saved,
}

#[cfg(feature = "cuda")]
impl Attention {
    fn cuda_params(&self) -> crate::cuda::attn::Params {
        crate::cuda::attn::Params {
            window: self.mask.window.unwrap_or(0),
            scale: self.scale as f32,
        }
    }

    fn cuda_plan(
        &self,
        q: &[usize],
        k: &[usize],
        v: &[usize],
    ) -> candle_core::Result<whet_kernels::plan::Attn> {
        whet_kernels::plan::batched(q, k, v, self.mask.offset, &self.mask.pad)
            .map_err(candle_core::Error::Msg)
    }
}

impl Attention {
    /// `P = softmax(scale·Q·Kᵀ + mask)` for grouped queries `qg: (B, Hkv, rep·T, D)` and
    /// `k: (B, Hkv, S, D)`; returns `P: (B, Hkv, rep·T, S)`.
    fn probs(&self, qg: &Tensor, k: &Tensor, t: usize) -> candle_core::Result<Tensor> {
        let (b, kvh, rt, s) = {
            let (b, kvh, rt, _) = qg.dims4()?;
            (b, kvh, rt, k.dim(2)?)
        };
        let scores = qg.matmul(&k.t()?)?;
        let mut p = values(&scores)?;
        let m = &self.mask;
        let scale = self.scale as f32;
        p.par_chunks_mut(s).enumerate().for_each(|(row, p)| {
            let i = row % rt % t; // query index within its head
            let batch = row / (kvh * rt);
            let q = m.offset + i;
            let lo_pad = m.pad.get(batch).copied().unwrap_or(0);
            let lo_win = m.window.map(|w| (q + 1).saturating_sub(w)).unwrap_or(0);
            let lo = lo_pad.max(lo_win);
            let hi = (q + 1).min(s); // keys [lo, hi) are visible
            let mut max = f32::NEG_INFINITY;
            for x in &mut p[lo..hi] {
                *x *= scale;
                max = max.max(*x);
            }
            let mut sum = 0f32;
            for x in &mut p[lo..hi] {
                *x = crate::ops::exp_nonpos(*x - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            p[lo..hi].iter_mut().for_each(|x| *x *= inv);
            p[..lo].iter_mut().for_each(|x| *x = 0.0);
            p[hi..].iter_mut().for_each(|x| *x = 0.0);
        });
        Tensor::from_vec(p, (b, kvh, rt, s), qg.device())
    }
}

fn group(q: &Tensor, kvh: usize) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    q.contiguous()?.reshape((b, kvh, (h / kvh) * t, d))
}

impl Attention {
    /// `O = P·V` for `q: (B, H, T, D)`, `k, v: (B, Hkv, S, D)` (plain tensors, no graph).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let t = q.dim(2)?;
        let qg = group(q, k.dim(1)?)?;
        self.probs(&qg, k, t)?
            .matmul(&v.contiguous()?)?
            .reshape(q.shape())
    }

    /// With P recomputed: dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP − rowsum(dO∘O)),
    /// dQ = scale·dS·K, dK = scale·dSᵀ·Q. Grouped queries make dK, dV sum over the group.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let kvh = k.dim(1)?;
        let t = q.dim(2)?;
        let qg = group(q, kvh)?;
        let dog = group(grad, kvh)?;
        let og = group(out, kvh)?;
        let p = self.probs(&qg, &k, t)?;
        let dv = p.t()?.matmul(&dog)?;
        let dp = dog.matmul(&v.t()?)?;
        let dsum = (&dog * &og)?.sum_keepdim(3)?;
        let ds = (p * dp.broadcast_sub(&dsum)?)?;
        let dq = (ds.matmul(&k)? * self.scale)?.reshape(q.shape())?;
        let dk = (ds.t()?.matmul(&qg)? * self.scale)?;
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let o = self.forward(
            &tensor_of(s1, l1)?,
            &tensor_of(s2, l2)?,
            &tensor_of(s3, l3)?,
        )?;
        Ok((CpuStorage::F32(values(&o)?), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let plan = self.cuda_plan(l1.dims(), l2.dims(), l3.dims())?;
        let p = self.cuda_params();
        crate::cuda::attn::attn_fwd(&plan, p, &self.saved, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let plan = self.cuda_plan(q.dims(), k.dims(), v.dims())?;
            let (dq, dk, dv) = crate::cuda::attn::attn_bwd(
                &plan,
                self.cuda_params(),
                &self.saved,
                (&q.detach(), &k.detach(), &v.detach()),
                &out.detach(),
                &grad.detach(),
            )?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let (dq, dk, dv) = self.backward(
            &q.detach(),
            &k.detach(),
            &v.detach(),
            &out.detach(),
            &grad.detach(),
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Attention over packed sequences in the projections' own layout: `q: (N, H, D)`,
/// `k, v: (N, Hkv, D)`, sequences of `lens` tokens concatenated on `N`, each causal within
/// itself and blind to the others. One graph node for the whole batch: the per-sequence
/// slicing and head-major transposes happen inside, where they cost no gradient buffers.
struct PackedAttention {
    lens: Vec<usize>,
    inner: Attention,
}

impl PackedAttention {
    /// `(1, heads, len, D)` views of one sequence of a `(N, heads, D)` tensor.
    fn seq(t: &Tensor, start: usize, len: usize) -> candle_core::Result<Tensor> {
        t.narrow(0, start, len)?
            .transpose(0, 1)?
            .unsqueeze(0)?
            .contiguous()
    }

    /// Back from `(1, heads, len, D)` pieces to `(N, heads, D)`.
    fn unseq(parts: &[Tensor]) -> candle_core::Result<Tensor> {
        let parts: Vec<Tensor> = parts
            .iter()
            .map(|p| p.squeeze(0)?.transpose(0, 1))
            .collect::<candle_core::Result<_>>()?;
        Tensor::cat(&parts, 0)
    }
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (tensor_of(s1, l1)?, tensor_of(s2, l2)?, tensor_of(s3, l3)?);
        let mut outs = Vec::with_capacity(self.lens.len());
        let mut start = 0;
        for &len in &self.lens {
            let seg = |t: &Tensor| Self::seq(t, start, len);
            outs.push(self.inner.forward(&seg(&q)?, &seg(&k)?, &seg(&v)?)?);
            start += len;
        }
        let o = Self::unseq(&outs)?;
        Ok((CpuStorage::F32(values(&o)?), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let plan = whet_kernels::plan::packed(l1.dims(), l2.dims(), l3.dims(), &self.lens)
            .map_err(candle_core::Error::Msg)?;
        let (p, saved) = (self.inner.cuda_params(), &self.inner.saved);
        crate::cuda::attn::attn_fwd(&plan, p, saved, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let plan = whet_kernels::plan::packed(q.dims(), k.dims(), v.dims(), &self.lens)
                .map_err(candle_core::Error::Msg)?;
            let (dq, dk, dv) = crate::cuda::attn::attn_bwd(
                &plan,
                self.inner.cuda_params(),
                &self.inner.saved,
                (&q.detach(), &k.detach(), &v.detach()),
                &out.detach(),
                &grad.detach(),
            )?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let (q, k, v, out, grad) = (
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            grad.detach(),
        );
        let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
        let mut start = 0;
        for &len in &self.lens {
            let seg = |t: &Tensor| Self::seq(t, start, len);
            let (dq, dk, dv) =
                self.inner
                    .backward(&seg(&q)?, &seg(&k)?, &seg(&v)?, &seg(&out)?, &seg(&grad)?)?;
            dqs.push(dq);
            dks.push(dk);
            dvs.push(dv);
            start += len;
        }
        Ok((
            Some(Self::unseq(&dqs)?),
            Some(Self::unseq(&dks)?),
            Some(Self::unseq(&dvs)?),
        ))
    }
}

/// Causal attention over packed sequences: `q: (N, H, D)`, `k, v: (N, Hkv, D)` → `(N, H, D)`.
pub fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    window: Option<usize>,
) -> Result<Tensor> {
    let d = q.dim(2)?;
    let op = PackedAttention {
        lens: lens.to_vec(),
        inner: Attention {
            mask: AttnMask {
                offset: 0,
                window,
                pad: vec![],
            },
            scale: 1.0 / (d as f64).sqrt(),
            #[cfg(feature = "cuda")]
            saved: Default::default(),
        },
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(if q.track_op() || k.track_op() || v.track_op() {
        q.apply_op3(&k, &v, op)?
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)?
    })
}

/// Causal attention of `q: (B, H, T, D)` over `k, v: (B, Hkv, S, D)`, `scale = 1/√D`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: AttnMask) -> Result<Tensor> {
    let d = q.dim(3)?;
    let op = Attention {
        mask,
        scale: 1.0 / (d as f64).sqrt(),
        #[cfg(feature = "cuda")]
        saved: Default::default(),
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    Ok(if q.track_op() || k.track_op() || v.track_op() {
        q.apply_op3(&k, &v, op)?
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
    use crate::test_util::{check, var};
    use candle_core::Device;

    #[test]
    fn packed_attention_equals_attention_per_sequence() {
        let lens = [3usize, 5, 1];
        let n: usize = lens.iter().sum();
        let (q, k, v) = (
            var(&[n, 4, 4], 21),
            var(&[n, 2, 4], 22),
            var(&[n, 2, 4], 23),
        );
        let per_seq = || {
            let mut outs = vec![];
            let mut start = 0;
            for &len in &lens {
                let seg = |t: &Tensor| {
                    t.narrow(0, start, len)
                        .unwrap()
                        .transpose(0, 1)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap()
                };
                let m = AttnMask {
                    offset: 0,
                    window: Some(2),
                    pad: vec![],
                };
                let o = reference(
                    &seg(q.as_tensor()),
                    &seg(k.as_tensor()),
                    &seg(v.as_tensor()),
                    &m,
                );
                outs.push(o.squeeze(0).unwrap().transpose(0, 1).unwrap());
                start += len;
            }
            Tensor::cat(&outs, 0).unwrap()
        };
        check(
            &[&q, &k, &v],
            &|| {
                packed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &lens, Some(2))
                    .unwrap()
            },
            &per_seq,
            "packed attention",
        );
    }

    /// The composite reference: scores, additive mask, softmax, weighted sum, per head.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, m: &AttnMask) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (kvh, s) = (k.dim(1).unwrap(), k.dim(2).unwrap());
        let rep = h / kvh;
        let mut mask = vec![0f32; b * t * s];
        for bb in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let qp = m.offset + i;
                    let hidden = j > qp
                        || j < m.pad.get(bb).copied().unwrap_or(0)
                        || m.window.is_some_and(|w| qp - j.min(qp) >= w);
                    if hidden {
                        mask[(bb * t + i) * s + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, s), &Device::Cpu).unwrap();
        let idx: Vec<u32> = (0..h).map(|x| (x / rep) as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
        let kr = k.contiguous().unwrap().index_select(&idx, 1).unwrap();
        let vr = v.contiguous().unwrap().index_select(&idx, 1).unwrap();
        let scores = (q.matmul(&kr.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let p = ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        p.matmul(&vr).unwrap()
    }

    #[test]
    fn attention_matches_composite_with_gqa_window_offset_and_padding() {
        for (b, t, s, offset, window, pad) in [
            (1, 7, 7, 0, None, vec![]),
            (1, 9, 9, 0, Some(4), vec![]),
            (2, 1, 6, 5, None, vec![0, 3]),
            (2, 3, 8, 5, Some(5), vec![2, 0]),
        ] {
            let (q, k, v) = (
                var(&[b, 6, t, 4], 7),
                var(&[b, 2, s, 4], 8),
                var(&[b, 2, s, 4], 9),
            );
            let m = AttnMask {
                offset,
                window,
                pad,
            };
            check(
                &[&q, &k, &v],
                &|| attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), m.clone()).unwrap(),
                &|| reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m),
                &format!("attention b{b} t{t} s{s} offset{offset} window{window:?}"),
            );
        }
    }
}
