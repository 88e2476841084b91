//! Flash-style attention on CUDA (the `cuda_fwd` of `attention.rs`'s ops, and their backward).
//!
//! The forward keeps each query row's log-sum-exp (4 bytes per row and head) for the backward,
//! in the op itself ([`Saved`]); the backward recomputes the probabilities from it in two
//! passes (dQ over query tiles — which also writes `delta = rowsum(dO∘O)` — then dK/dV over key
//! tiles). Nothing of size `heads × T²` ever exists. If the forward ran without keeping lse
//! (an op applied without a graph), the backward runs the forward again for it.

use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use whet_kernels::geometry::AttnPlan;
use whet_kernels::ATTENTION;

use super::launch::{config, device, err, func, launched, output, storage, view, with_cuda};
use whet_kernels::plan::Attn;

/// The log-sum-exp rows a forward pass leaves for its backward pass.
#[derive(Default)]
pub(crate) struct Saved(Mutex<Option<CudaSlice<f32>>>);

impl Saved {
    fn put(&self, lse: CudaSlice<f32>) {
        if let Ok(mut s) = self.0.lock() {
            *s = Some(lse);
        }
    }

    fn take(&self) -> Option<CudaSlice<f32>> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }
}

/// Mask parameters and scale of a call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Sliding window (0: none).
    pub window: usize,
    /// Score scale, 1/√D.
    pub scale: f32,
}

/// The scalar arguments every attention kernel takes after its tensors.
struct Scalars {
    heads: i32,
    kv_heads: i32,
    d: i32,
    q_rs: i64,
    q_hs: i64,
    k_rs: i64,
    k_hs: i64,
    window: i32,
    scale: f32,
}

fn scalars(a: &Attn, p: Params) -> Result<Scalars> {
    let i32_of = |what: &str, v: usize| {
        i32::try_from(v).map_err(|_| err(format!("attention {what} {v} too large")))
    };
    let i64_of = |v: usize| i64::try_from(v).map_err(|_| err("attention stride too large"));
    Ok(Scalars {
        heads: i32_of("heads", a.heads)?,
        kv_heads: i32_of("kv heads", a.kv_heads)?,
        d: i32_of("head_dim", a.head_dim)?,
        q_rs: i64_of(a.strides.q_row)?,
        q_hs: i64_of(a.strides.q_head)?,
        k_rs: i64_of(a.strides.k_row)?,
        k_hs: i64_of(a.strides.k_head)?,
        window: i32_of("window", p.window)?,
        scale: p.scale,
    })
}

/// Runs the forward kernel: `(output, lse)`.
fn forward(
    dev: &CudaDevice,
    a: &Attn,
    p: Params,
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let (qv, kv, vv) = (
        view(q, lq, "attention q")?,
        view(k, lk, "attention k")?,
        view(v, lv, "attention v")?,
    );
    let mut o = output(dev, lq.shape().elem_count())?;
    let mut lse = output(dev, a.rows * a.heads)?;
    if !a.plan.fwd_tiles.is_empty() {
        let s = scalars(a, p)?;
        let seqs = dev.clone_htod(&a.seqs)?;
        let tiles = dev.clone_htod(&a.plan.fwd_tiles)?;
        let f = func(
            dev,
            &ATTENTION,
            &format!("whet_attn_fwd_{}", a.plan.suffix()),
        )?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&mut o)
            .arg(&mut lse)
            .arg(&seqs)
            .arg(&tiles);
        b.arg(&s.heads)
            .arg(&s.kv_heads)
            .arg(&s.d)
            .arg(&s.q_rs)
            .arg(&s.q_hs)
            .arg(&s.k_rs)
            .arg(&s.k_hs);
        b.arg(&s.window).arg(&s.scale);
        let l = AttnPlan::launch(&a.plan.fwd_tiles, a.heads).map_err(|e| err(e.0))?;
        // SAFETY: the plan's descriptors were built from these tensors' shapes; every tile's
        // rows lie inside its sequence.
        launched(unsafe { b.launch(config(l)) }, "attention forward")?;
    }
    Ok((o, lse))
}

/// The forward pass of an op: the output storage, lse kept in `saved`.
pub(crate) fn attn_fwd(
    a: &Attn,
    p: Params,
    saved: &Saved,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = device(q.0);
    let (o, lse) = forward(dev, a, p, q, k, v)?;
    saved.put(lse);
    Ok((storage(o, dev), q.1.shape().clone()))
}

/// The backward pass as an op over `(q, k, v)` holding `out`, its gradient and the forward's
/// lse: its output is `[dq | dk | dv]` flattened into one vector, which [`attn_bwd`] splits.
struct Backward {
    attn: Attn,
    params: Params,
    out: Tensor,
    grad: Tensor,
    lse: Option<CudaSlice<f32>>,
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "flash-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(err("flash-attention-bwd runs on CUDA tensors only"))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (a, p) = (&self.attn, self.params);
        let dev = device(q);
        let recomputed;
        let lse = match &self.lse {
            Some(l) => l,
            None => {
                recomputed = forward(dev, a, p, (q, lq), (k, lk), (v, lv))?.1;
                &recomputed
            }
        };
        let (nq, nk) = (lq.shape().elem_count(), lk.shape().elem_count());
        let mut out = output(dev, nq + 2 * nk)?;
        let mut delta = output(dev, a.rows * a.heads)?;
        let s = scalars(a, p)?;
        let seqs = dev.clone_htod(&a.seqs)?;
        let (qv, kv, vv) = (
            view(q, lq, "attention q")?,
            view(k, lk, "attention k")?,
            view(v, lv, "attention v")?,
        );
        with_cuda(&self.out, "attention output", |os, ol| {
            with_cuda(&self.grad, "attention output gradient", |gs, gl| {
                let (ov, gv) = (
                    view(os, ol, "attention output")?,
                    view(gs, gl, "attention output gradient")?,
                );
                let (mut dq, mut rest) = out.split_at_mut(nq);
                let (mut dk, mut dv) = rest.split_at_mut(nk);
                let suffix = a.plan.suffix();
                if !a.plan.dq_tiles.is_empty() {
                    let tiles = dev.clone_htod(&a.plan.dq_tiles)?;
                    let f = func(dev, &ATTENTION, &format!("whet_attn_dq_{suffix}"))?;
                    let stream = dev.cuda_stream();
                    let mut b = stream.launch_builder(&f);
                    b.arg(&qv)
                        .arg(&kv)
                        .arg(&vv)
                        .arg(&ov)
                        .arg(&gv)
                        .arg(lse)
                        .arg(&mut delta)
                        .arg(&mut dq);
                    b.arg(&seqs).arg(&tiles);
                    b.arg(&s.heads)
                        .arg(&s.kv_heads)
                        .arg(&s.d)
                        .arg(&s.q_rs)
                        .arg(&s.q_hs)
                        .arg(&s.k_rs)
                        .arg(&s.k_hs);
                    b.arg(&s.window).arg(&s.scale);
                    let l = AttnPlan::launch(&a.plan.dq_tiles, a.heads).map_err(|e| err(e.0))?;
                    // SAFETY: as the forward; dq has q's layout, delta lse's.
                    launched(unsafe { b.launch(config(l)) }, "attention dQ")?;
                }
                if !a.plan.dkv_tiles.is_empty() {
                    let tiles = dev.clone_htod(&a.plan.dkv_tiles)?;
                    let f = func(dev, &ATTENTION, &format!("whet_attn_dkv_{suffix}"))?;
                    let stream = dev.cuda_stream();
                    let mut b = stream.launch_builder(&f);
                    b.arg(&qv)
                        .arg(&kv)
                        .arg(&vv)
                        .arg(&gv)
                        .arg(lse)
                        .arg(&delta)
                        .arg(&mut dk)
                        .arg(&mut dv);
                    b.arg(&seqs).arg(&tiles);
                    b.arg(&s.heads)
                        .arg(&s.kv_heads)
                        .arg(&s.d)
                        .arg(&s.q_rs)
                        .arg(&s.q_hs)
                        .arg(&s.k_rs)
                        .arg(&s.k_hs);
                    b.arg(&s.window).arg(&s.scale);
                    let l =
                        AttnPlan::launch(&a.plan.dkv_tiles, a.kv_heads).map_err(|e| err(e.0))?;
                    // SAFETY: as the forward; dk and dv have k's layout. Runs after the dQ
                    // pass on the same stream, so delta is complete.
                    launched(unsafe { b.launch(config(l)) }, "attention dK/dV")?;
                }
                Ok(())
            })
        })?;
        Ok((storage(out, dev), Shape::from(nq + 2 * nk)))
    }
}

/// `(dq, dk, dv)` of an attention call on the device, from its inputs, output and output
/// gradient; `saved` is the op's forward lse (taken: a second backward recomputes it).
pub(crate) fn attn_bwd(
    attn: &Attn,
    params: Params,
    saved: &Saved,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = Backward {
        attn: attn.clone(),
        params,
        out: out.contiguous()?,
        grad: grad.contiguous()?,
        lse: saved.take(),
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let flat = q.apply_op3_no_bwd(&k, &v, &op)?;
    let (nq, nk) = (q.elem_count(), k.elem_count());
    Ok((
        flat.narrow(0, 0, nq)?.reshape(q.shape())?,
        flat.narrow(0, nq, nk)?.reshape(k.shape())?,
        flat.narrow(0, nq + nk, nk)?.reshape(k.shape())?,
    ))
}
