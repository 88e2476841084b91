//! Fused CPU operations with hand-written backward passes: RMSNorm, RoPE, SwiGLU and causal
//! grouped-query attention.
//!
//! Composed from core ops, each of these keeps several full-size intermediates alive for the
//! backward pass (attention keeps `heads × T²` scores several times over). Fused, they keep
//! only their inputs and recompute what the gradient needs, which cuts a training step's
//! activation memory by about half and its elementwise passes by more. Each is tested against
//! the composite it replaces (values and gradients), in `ops` terms.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

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
    w: Arc<Vec<f32>>,
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

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
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
    let op = RmsNorm {
        w: Arc::new(values(w)?),
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
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
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

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, heads, d) = x.dims3()?;
        let g = self.rotate(&values(grad)?, heads, d, -1.0);
        Ok(Some(Tensor::from_vec(g, x.shape(), x.device())?))
    }
}

/// RoPE on `x: (N, heads, D)` with `cos, sin: (N, D/2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let op = Rope {
        cos: Arc::new(values(cos)?),
        sin: Arc::new(values(sin)?),
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

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
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

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
    use crate::test_util::{close, var};
    use candle_core::{Device, Var};

    /// Value and gradient of `f` (fused) and `g` (composite) w.r.t. the vars agree.
    fn check(vars: &[&Var], f: &dyn Fn() -> Tensor, g: &dyn Fn() -> Tensor, what: &str) {
        let (yf, yg) = (f(), g());
        close(&yf, &yg, 1e-5, what);
        let w = Tensor::randn(0f32, 1.0, yf.shape(), &Device::Cpu).unwrap();
        let gf = (yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (yg * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            close(
                gf.get(v).unwrap(),
                gg.get(v).unwrap(),
                1e-4,
                &format!("{what} grad {i}"),
            );
        }
    }

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
