//! The key/value cache of sampling, and attention of one new token over it.
//!
//! Each layer's keys and values live in one buffer `(batch, kv_heads, capacity, head_dim)`
//! with room to grow: a decoding step writes its new slot in place and attends over the
//! buffer where it lies. (Concatenating the new slot onto the old keys would copy the whole
//! cache every step — tens of MB per step for a 135M model at batch 16 — and grouping it into
//! small batched matrix products costs more in dispatch than the arithmetic.)

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::{slice, AttnMask};
use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

/// Per-layer key/value cache of a batch of sequences. Rows may hold prompts of different
/// lengths: row `i` is left-padded by `pad[i]` slots, which are masked out and do not count
/// as positions. Not `Clone`: appending writes into the buffers in place, so two caches must
/// never share one.
#[derive(Debug, Default)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `(batch, kv_heads, capacity, head_dim)`; slots `[0, len)`
    /// hold keys and values, the rest is room to append.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Slots in use per row (padding included).
    pub len: usize,
    /// Left padding per row; empty means none.
    pub pad: Vec<usize>,
}

impl KvCache {
    /// An empty cache of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| None).collect(),
            len: 0,
            pad: vec![],
        }
    }

    /// Slots per row the buffers hold (used or not).
    pub fn capacity(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    /// Keeps only the listed rows of the batch (in that order).
    pub fn select(&mut self, keep: &[u32]) -> Result<()> {
        if !self.pad.is_empty() {
            self.pad = keep.iter().map(|&i| self.pad[i as usize]).collect();
        }
        let Some(Some((k0, _))) = self.layers.first() else {
            return Ok(());
        };
        let idx = Tensor::new(keep, k0.device())?;
        for entry in self.layers.iter_mut().flatten() {
            *entry = (
                entry.0.index_select(&idx, 0)?,
                entry.1.index_select(&idx, 0)?,
            );
        }
        Ok(())
    }

    /// Stacks single-row caches of different lengths into one batch, left-padding the
    /// shorter ones with zeros (masked by `pad`), with room for `extra` more slots per row.
    pub fn stack_left_padded(caches: &[KvCache], extra: usize) -> Result<KvCache> {
        let len = caches.iter().map(|c| c.len).max().unwrap_or(0);
        let pad: Vec<usize> = caches.iter().map(|c| len - c.len).collect();
        let layers = caches.first().map(|c| c.layers.len()).unwrap_or(0);
        let mut out = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for (c, &p) in caches.iter().zip(&pad) {
                let Some((k, v)) = &c.layers[l] else {
                    return Err(EngineError::Internal("stacking an empty cache".into()));
                };
                let padded = |t: &Tensor| -> Result<Tensor> {
                    let t = t.narrow(2, 0, c.len)?;
                    let (b, h, _, d) = t.dims4()?;
                    let z = |n: usize| Tensor::zeros((b, h, n, d), t.dtype(), t.device());
                    Ok(Tensor::cat(&[&z(p)?, &t, &z(extra)?], 2)?)
                };
                ks.push(padded(k)?);
                vs.push(padded(v)?);
            }
            out.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        Ok(KvCache {
            layers: out,
            len,
            pad: if pad.iter().any(|&p| p > 0) {
                pad
            } else {
                vec![]
            },
        })
    }

    /// Writes the new keys and values `(batch, kv_heads, new, head_dim)` of layer `layer` at
    /// slot [`KvCache::len`] (which the caller advances once every layer has appended) and
    /// returns the layer's buffers. A buffer without room is replaced by one with twice the
    /// slots needed.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, new, d) = k.dims4()?;
        let need = self.len + new;
        let entry = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| EngineError::Internal(format!("no cache for layer {layer}")))?;
        let (kc, vc) = match entry.take() {
            None if self.len == 0 => {
                // A fresh cache: these tensors become the buffers (copied, so no other
                // tensor shares the storage later appends write into).
                let own = |t: &Tensor| -> Result<Tensor> { Ok(t.copy()?) };
                let pair = (own(k)?, own(v)?);
                *entry = Some(pair.clone());
                return Ok(pair);
            }
            None => return Err(EngineError::Internal("appending to a missing layer".into())),
            Some((kc, vc)) if kc.dim(2)? >= need => (kc, vc),
            Some((kc, vc)) => {
                let grow = |t: &Tensor| -> Result<Tensor> {
                    let room =
                        Tensor::zeros((b, h, 2 * need - self.len, d), t.dtype(), t.device())?;
                    Ok(Tensor::cat(&[&t.narrow(2, 0, self.len)?, &room], 2)?)
                };
                (grow(&kc)?, grow(&vc)?)
            }
        };
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        *entry = Some((kc.clone(), vc.clone()));
        Ok((kc, vc))
    }
}

/// Attention of one new token per row, `q: (B, H, 1, D)`, over the first `keys` slots of
/// cache buffers `k, v: (B, Hkv, capacity, D)`, read in place. The query sits at slot
/// `keys − 1`; the mask's `pad` and `window` apply as in [`crate::kernels::attention`].
struct DecodeAttention {
    keys: usize,
    mask: AttnMask,
    scale: f32,
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
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
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (b, h, t, d) = l1.shape().dims4()?;
        let (_, kvh, cap, _) = l2.shape().dims4()?;
        if t != 1 || self.keys > cap || kvh == 0 || h % kvh != 0 {
            candle_core::bail!("decode attention: q {:?}, cache {:?}", l1.dims(), l2.dims());
        }
        let rep = h / kvh;
        let mut out = vec![0f32; b * h * d];
        let query = self.keys - 1;
        let head = |(i, o): (usize, &mut [f32])| {
            let (row, hd) = (i / h, i % h);
            let base = (row * kvh + hd / rep) * cap * d;
            let lo_pad = self.mask.pad.get(row).copied().unwrap_or(0);
            let lo_win = self
                .mask
                .window
                .map(|w| (query + 1).saturating_sub(w))
                .unwrap_or(0);
            let lo = lo_pad.max(lo_win);
            let qv = &q[i * d..(i + 1) * d];
            let mut p: Vec<f32> = (lo..self.keys)
                .map(|s| {
                    let kv = &k[base + s * d..base + (s + 1) * d];
                    qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * self.scale
                })
                .collect();
            let max = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in &mut p {
                *x = crate::ops::exp_nonpos(*x - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            for (j, s) in (lo..self.keys).enumerate() {
                let w = p[j] * inv;
                let vv = &v[base + s * d..base + (s + 1) * d];
                o.iter_mut().zip(vv).for_each(|(o, v)| *o += w * v);
            }
        };
        // Worth a second thread only past a few hundred thousand multiply-adds.
        if b * h * self.keys * d >= 1 << 18 {
            out.par_chunks_mut(d).enumerate().for_each(head);
        } else {
            out.chunks_mut(d).enumerate().for_each(head);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// On the GPU the flash forward kernel reads the cache buffers in place, as here.
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
        crate::cuda::decode_attention_fwd(
            self.keys,
            &self.mask,
            self.scale,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )
    }
}

/// Attention of the one new token of each row over the cache buffers (see
/// [`KvCache::append`]): `q: (B, H, 1, D)`, `k, v: (B, Hkv, capacity, D)` of which the first
/// `keys` slots are used; `scale = 1/√D`. Inference only (no backward).
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keys: usize,
    mask: AttnMask,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    let op = DecodeAttention {
        keys,
        mask,
        scale: 1.0 / (d as f32).sqrt(),
    };
    Ok(q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention;
    use candle_core::Device;

    fn t(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn appending_step_by_step_attends_like_the_full_attention() {
        // Two rows (the second left-padded by 2), 4 query heads over 2 kv heads, a window.
        let (b, h, kvh, d) = (2, 4, 2, 8);
        let steps = 7;
        let keys = t(&[b, kvh, steps, d], 1);
        let vals = t(&[b, kvh, steps, d], 2);
        let qs = t(&[b, h, steps, d], 3);
        let mask = |offset| AttnMask {
            offset,
            window: Some(5),
            pad: vec![0, 2],
        };
        let mut cache = KvCache::new(1);
        cache.pad = vec![0, 2];
        // A 3-slot prefill, then one slot at a time (growing the buffers on the way).
        let (kc, vc) = cache
            .append(
                0,
                &keys.narrow(2, 0, 3).unwrap(),
                &vals.narrow(2, 0, 3).unwrap(),
            )
            .unwrap();
        assert_eq!(kc.dim(2).unwrap(), 3);
        drop((kc, vc));
        cache.len = 3;
        for s in 3..steps {
            let (kc, vc) = cache
                .append(
                    0,
                    &keys.narrow(2, s, 1).unwrap(),
                    &vals.narrow(2, s, 1).unwrap(),
                )
                .unwrap();
            let q = qs.narrow(2, s, 1).unwrap();
            let got = decode_attention(&q, &kc, &vc, s + 1, mask(s)).unwrap();
            // What the general kernel computes over the first s + 1 keys.
            let upto = |t: &Tensor| t.narrow(2, 0, s + 1).unwrap();
            let want = attention(&q, &upto(&keys), &upto(&vals), mask(s)).unwrap();
            assert!(max_diff(&got, &want) < 1e-6, "step {s}");
            cache.len += 1;
        }
        assert!(cache.capacity() >= steps);
        // The buffers hold exactly the keys appended.
        let (kc, _) = cache.layers[0].as_ref().unwrap();
        assert_eq!(max_diff(&kc.narrow(2, 0, steps).unwrap(), &keys), 0.0);
    }

    #[test]
    fn stacking_pads_on_the_left_and_leaves_room() {
        let mk = |len: usize, seed: u64| {
            let mut c = KvCache::new(1);
            c.append(0, &t(&[1, 2, len, 4], seed), &t(&[1, 2, len, 4], seed + 1))
                .unwrap();
            c.len = len;
            c
        };
        let (a, b) = (mk(3, 1), mk(5, 3));
        let s = KvCache::stack_left_padded(&[a, b], 4).unwrap();
        assert_eq!((s.len, s.capacity(), s.pad.clone()), (5, 9, vec![2, 0]));
        let (k, _) = s.layers[0].as_ref().unwrap();
        let row0 = k.narrow(0, 0, 1).unwrap();
        assert_eq!(
            max_diff(&row0.narrow(2, 2, 3).unwrap(), &t(&[1, 2, 3, 4], 1)),
            0.0
        );
        assert_eq!(
            row0.narrow(2, 0, 2)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
