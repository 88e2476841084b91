//! RMSNorm, RoPE and SwiGLU on CUDA: the forward launches behind the ops of `kernels.rs`, and
//! their backward passes as gradient-free ops of their own (a backward pass computes on the
//! device the gradient lives on; the CPU ops' backward code reads host slices).

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use whet_kernels::geometry::{elementwise, per_row};
use whet_kernels::{RMSNORM, ROPE, SWIGLU};

use super::launch::{config, device, err, func, launched, output, storage, view, with_cuda};
use whet_kernels::plan;

fn cuda_only(name: &str) -> Result<(CpuStorage, Shape)> {
    Err(err(format!(
        "{name} runs on CUDA tensors only (the CPU op has its own backward)"
    )))
}

/// RMSNorm forward of a contiguous `x` with weight `w` (on the same device).
pub(crate) fn rms_norm_fwd(
    x: &CudaStorage,
    l: &Layout,
    w: &Tensor,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let (rows, d) = plan::rows_of("rms_norm input", l.dims(), w.elem_count()).map_err(err)?;
    let dev = device(x);
    let xv = view(x, l, "rms_norm input")?;
    let mut out = output(dev, rows * d)?;
    if rows > 0 {
        with_cuda(w, "rms_norm weight", |ws, wl| {
            let wv = view(ws, wl, "rms_norm weight")?;
            let f = func(dev, &RMSNORM, "whet_rmsnorm_fwd_f32")?;
            let di = d as i32;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv).arg(&mut out).arg(&di).arg(&eps);
            // SAFETY: x and out hold rows·d f32, w holds d; one block per row.
            launched(
                unsafe { b.launch(config(per_row(rows, d).map_err(|e| err(e.0))?)) },
                "rms_norm",
            )
        })?;
    }
    Ok((storage(out, dev), l.shape().clone()))
}

/// `dx` of RMSNorm, given `x` and the output gradient `g` (both contiguous, same shape).
pub(crate) struct RmsNormBwd {
    /// The frozen weight.
    pub w: Tensor,
    /// The epsilon of the forward pass.
    pub eps: f32,
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, d) =
            plan::rows_of("rms_norm input", lx.dims(), self.w.elem_count()).map_err(err)?;
        if lg.dims() != lx.dims() {
            return Err(err(format!(
                "rms_norm gradient: shape {:?} for input {:?}",
                lg.dims(),
                lx.dims()
            )));
        }
        let dev = device(x);
        let (xv, gv) = (
            view(x, lx, "rms_norm input")?,
            view(g, lg, "rms_norm gradient")?,
        );
        let mut out = output(dev, rows * d)?;
        if rows > 0 {
            with_cuda(&self.w, "rms_norm weight", |ws, wl| {
                let wv = view(ws, wl, "rms_norm weight")?;
                let f = func(dev, &RMSNORM, "whet_rmsnorm_bwd_f32")?;
                let di = d as i32;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&xv)
                    .arg(&wv)
                    .arg(&gv)
                    .arg(&mut out)
                    .arg(&di)
                    .arg(&self.eps);
                // SAFETY: x, g and out hold rows·d f32, w holds d; one block per row.
                launched(
                    unsafe { b.launch(config(per_row(rows, d).map_err(|e| err(e.0))?)) },
                    "rms_norm backward",
                )
            })?;
        }
        Ok((storage(out, dev), lx.shape().clone()))
    }
}

/// RoPE of a contiguous `x: (n, heads, d)` with tables `cos, sin: (n, d/2)`; `sign` −1 is the
/// backward rotation.
pub(crate) fn rope(
    x: &CudaStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    sign: f32,
) -> Result<(CudaStorage, Shape)> {
    let (n, heads, d) = plan::rope_dims(l.dims(), cos.dims(), sin.dims()).map_err(err)?;
    let dev = device(x);
    let xv = view(x, l, "rope input")?;
    let total = n * heads * d;
    let mut out = output(dev, total)?;
    if total > 0 {
        with_cuda(cos, "rope cos table", |cs, cl| {
            with_cuda(sin, "rope sin table", |ss, sl| {
                let (cv, sv) = (
                    view(cs, cl, "rope cos table")?,
                    view(ss, sl, "rope sin table")?,
                );
                let f = func(dev, &ROPE, "whet_rope_f32")?;
                let (ni, hi, di) = (n as i32, heads as i32, d as i32);
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&xv)
                    .arg(&cv)
                    .arg(&sv)
                    .arg(&mut out)
                    .arg(&ni)
                    .arg(&hi)
                    .arg(&di)
                    .arg(&sign);
                // SAFETY: x and out hold n·heads·d f32, the tables n·d/2; grid-stride loop.
                launched(unsafe { b.launch(config(elementwise(total / 2))) }, "rope")
            })
        })?;
    }
    Ok((storage(out, dev), l.shape().clone()))
}

/// RoPE's backward as an op: the inverse rotation of the gradient.
pub(crate) struct RopeBwd {
    /// The forward's cos table.
    pub cos: Tensor,
    /// The forward's sin table.
    pub sin: Tensor,
}

impl candle_core::CustomOp1 for RopeBwd {
    fn name(&self) -> &'static str {
        "fused-rope-bwd"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, g: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        rope(g, l, &self.cos, &self.sin, -1.0)
    }
}

/// SwiGLU forward of contiguous `g`, `u` of one shape.
pub(crate) fn swiglu_fwd(
    g: &CudaStorage,
    lg: &Layout,
    u: &CudaStorage,
    lu: &Layout,
) -> Result<(CudaStorage, Shape)> {
    if lg.dims() != lu.dims() {
        return Err(err(format!(
            "swiglu: gate {:?} and up {:?} differ",
            lg.dims(),
            lu.dims()
        )));
    }
    let dev = device(g);
    let (gv, uv) = (view(g, lg, "swiglu gate")?, view(u, lu, "swiglu up")?);
    let n = lg.shape().elem_count();
    let mut out = output(dev, n)?;
    if n > 0 {
        let f = func(dev, &SWIGLU, "whet_swiglu_fwd_f32")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&gv).arg(&uv).arg(&mut out).arg(&n);
        // SAFETY: g, u and out hold n f32; grid-stride loop.
        launched(unsafe { b.launch(config(elementwise(n))) }, "swiglu")?;
    }
    Ok((storage(out, dev), lg.shape().clone()))
}

/// SwiGLU's backward as an op over `(g, u, dy)`: its output stacks `dg` and `du` as
/// `(2, shape…)` (an op has one output), which the caller splits.
pub(crate) struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
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
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        lg: &Layout,
        u: &CudaStorage,
        lu: &Layout,
        dy: &CudaStorage,
        ld: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if lg.dims() != lu.dims() || lg.dims() != ld.dims() {
            return Err(err(format!(
                "swiglu backward: gate {:?}, up {:?}, gradient {:?} differ",
                lg.dims(),
                lu.dims(),
                ld.dims()
            )));
        }
        let dev = device(g);
        let (gv, uv, dv) = (
            view(g, lg, "swiglu gate")?,
            view(u, lu, "swiglu up")?,
            view(dy, ld, "swiglu gradient")?,
        );
        let n = lg.shape().elem_count();
        let mut out = output(dev, 2 * n)?;
        if n > 0 {
            let f = func(dev, &SWIGLU, "whet_swiglu_bwd_f32")?;
            let (mut dg, mut du) = out.split_at_mut(n);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&gv)
                .arg(&uv)
                .arg(&dv)
                .arg(&mut dg)
                .arg(&mut du)
                .arg(&n);
            // SAFETY: every input holds n f32, dg and du are the two halves of 2n.
            launched(
                unsafe { b.launch(config(elementwise(n))) },
                "swiglu backward",
            )?;
        }
        let mut dims = vec![2];
        dims.extend_from_slice(lg.dims());
        Ok((storage(out, dev), Shape::from(dims)))
    }
}
