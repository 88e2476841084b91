//! The projections on CUDA: `y = x·Wᵀ + b (+ s·(x·Aᵀ)·Bᵀ)` as cuBLAS GEMMs that all
//! accumulate into `y`, and the base product's input gradient `g·W`.
//!
//! - The bias is written into `y` first and the base GEMM adds onto it (beta = 1), and the
//!   low-rank GEMM adds onto that: bias, base and LoRA land in `y` with no elementwise pass
//!   (this is where fusing the LoRA add pays; the rank-r middle `s·x·Aᵀ` is a small (m, r)
//!   buffer, its scale folded into that GEMM's alpha).
//! - bf16 base weights: `x` (or `g`) is rounded to bf16 (round to nearest even, like the CPU
//!   path) and cublasGemmEx multiplies bf16 × bf16 with f32 accumulation **and an f32 output**:
//!   the sums are not rounded back to bf16 (as the CPU bf16 path; PyTorch's bf16 `linear` would
//!   round them, about 2⁻⁹ relative).
//! - f32 base weights: the same call in f32 with CUBLAS_COMPUTE_32F — no TF32, so the f32 path
//!   computes what the CPU computes, within summation order.
//!
//! cuBLAS is column-major; a row-major `(r, c)` matrix is its column-major transpose. So
//! row-major `y(m, n) = x(m, k)·W(n, k)ᵀ` is column-major `yᵀ = W·xᵀ`: `gemm(T, N, n, m, k,
//! W, ld k, x, ld k, y, ld n)`; and `dx(m, k) = g(m, n)·W(n, k)` is `dxᵀ = Wᵀ·gᵀ`:
//! `gemm(N, N, k, m, n, W, ld k, g, ld n, dx, ld k)`.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::cublas::result::gemm_ex;
use candle_core::cuda_backend::cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use whet_kernels::geometry::elementwise;
use whet_kernels::LINEAR;

use super::launch::{config, device, err, func, launched, output, storage, view, with_cuda};
use whet_kernels::plan;

/// One operand: a device pointer and its element type.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    ty: cudaDataType,
}

/// `C = alpha·op(A)·op(B) + beta·C` in column-major terms, f32 accumulation, f32 `C`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dev: &CudaDevice,
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda): (Operand, usize),
    (b, ldb): (Operand, usize),
    beta: f32,
    (c, ldc): (u64, usize),
) -> Result<()> {
    let op = |t| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let blas = dev.cublas_handle();
    let int =
        |v: usize| i32::try_from(v).map_err(|_| err(format!("GEMM size {v} exceeds cuBLAS's int")));
    // SAFETY: the pointers are live device buffers of candle's stream (the cuBLAS handle is
    // bound to it), sized by the callers for these m, n, k and leading dimensions.
    unsafe {
        gemm_ex(
            *blas.handle(),
            op(ta),
            op(tb),
            int(m)?,
            int(n)?,
            int(k)?,
            &alpha as *const f32 as *const c_void,
            a.ptr as *const c_void,
            a.ty,
            int(lda)?,
            b.ptr as *const c_void,
            b.ty,
            int(ldb)?,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            cudaDataType::CUDA_R_32F,
            int(ldc)?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| err(format!("cuBLAS GEMM ({m}×{n}×{k}): {e}")))
}

/// Rounds `n` f32 values to bf16 into a fresh buffer (bf16 bits kept as u16).
fn round_bf16(
    dev: &CudaDevice,
    x: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
    n: usize,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<u16>> {
    // SAFETY: the kernel writes all n values.
    let mut out = unsafe { dev.alloc::<u16>(n.max(1)) }?;
    if n > 0 {
        let f = func(dev, &LINEAR, "whet_f32_to_bf16")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(x).arg(&mut out).arg(&n);
        // SAFETY: x holds n f32, out n bf16; grid-stride loop.
        launched(unsafe { b.launch(config(elementwise(n))) }, "bf16 rounding")?;
    }
    Ok(out)
}

/// Calls `f` with the frozen weight as a GEMM operand (f32, or bf16 on the device).
fn with_weight<R>(w: &Tensor, f: impl FnOnce(Operand) -> Result<R>) -> Result<R> {
    with_cuda(w, "frozen weight", |s, l| {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| err("frozen weight: the CUDA GEMMs need a contiguous weight"))?;
        let stream = device(s).cuda_stream();
        match &s.slice {
            CudaStorageSlice::F32(w) => {
                let v = w.slice(a..b);
                let (ptr, _sync) = v.device_ptr(&stream);
                f(Operand {
                    ptr,
                    ty: cudaDataType::CUDA_R_32F,
                })
            }
            CudaStorageSlice::BF16(w) => {
                let v = w.slice(a..b);
                let (ptr, _sync) = v.device_ptr(&stream);
                f(Operand {
                    ptr,
                    ty: cudaDataType::CUDA_R_16BF,
                })
            }
            _ => Err(err("frozen weight: expected f32 or bf16 on the device")),
        }
    })
}

/// `x` as the base GEMM's operand: itself for f32 weights, rounded to bf16 for bf16 ones.
/// The rounded copy (if any) is returned so it outlives the GEMM.
fn activation(
    dev: &CudaDevice,
    x: &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>,
    n: usize,
    weight_ty: cudaDataType,
    f: impl FnOnce(Operand) -> Result<()>,
) -> Result<()> {
    let stream = dev.cuda_stream();
    if weight_ty == cudaDataType::CUDA_R_16BF {
        let xb = round_bf16(dev, x, n)?;
        let (ptr, _sync) = xb.device_ptr(&stream);
        f(Operand {
            ptr,
            ty: cudaDataType::CUDA_R_16BF,
        })
    } else {
        let (ptr, _sync) = x.device_ptr(&stream);
        f(Operand {
            ptr,
            ty: cudaDataType::CUDA_R_32F,
        })
    }
}

/// The LoRA pair of a projection: storages and layouts of `A (r, in)`, `B (out, r)`, and the
/// scale.
pub(crate) type LoraArgs<'a> = (
    &'a CudaStorage,
    &'a Layout,
    &'a CudaStorage,
    &'a Layout,
    f64,
);

/// `x·Wᵀ + b (+ s·(x·Aᵀ)·Bᵀ)` for a contiguous `x: (m, in)`; `w` f32 or bf16 `(out, in)` and
/// `bias` f32 `(out,)`, all on `x`'s device.
pub(crate) fn linear_fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<LoraArgs<'_>>,
) -> Result<(CudaStorage, Shape)> {
    let wd = w.dims2()?;
    let (m, n, k) = plan::linear_dims(
        lx.dims(),
        wd,
        lora.map(|(_, la, _, lb, _)| (la.dims(), lb.dims())),
    )
    .map_err(err)?;
    let dev = device(x);
    let stream = dev.cuda_stream();
    let xv = view(x, lx, "linear input")?;
    let mut y = output(dev, m * n)?;
    if m == 0 || n == 0 {
        return Ok((storage(y, dev), Shape::from((m, n))));
    }
    let beta = match bias {
        Some(bias) => {
            if bias.elem_count() != n {
                return Err(err(format!(
                    "linear bias: {} values for {n} outputs",
                    bias.elem_count()
                )));
            }
            with_cuda(bias, "linear bias", |bs, bl| {
                let bv = view(bs, bl, "linear bias")?;
                let f = func(dev, &LINEAR, "whet_fill_rows_f32")?;
                let (rows, ni) = (m, n as i32);
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&mut y).arg(&bv).arg(&rows).arg(&ni);
                // SAFETY: y holds m·n f32, the bias n; grid-stride loop.
                launched(
                    unsafe { b.launch(config(elementwise(m * n))) },
                    "linear bias",
                )
            })?;
            1.0
        }
        None => 0.0,
    };
    {
        let (yp, _sync) = y.device_ptr_mut(&stream);
        with_weight(w, |wo| {
            activation(dev, &xv, m * k, wo.ty, |xo| {
                gemm(
                    dev,
                    (true, false),
                    (n, m, k),
                    1.0,
                    (wo, k),
                    (xo, k),
                    beta,
                    (yp, n),
                )
            })
        })?;
    }
    if let Some((sa, la, sb, lb, scale)) = lora {
        let r = la.dims()[0];
        let (av, bv) = (view(sa, la, "lora A")?, view(sb, lb, "lora B")?);
        let mut xa = output(dev, m * r)?;
        if r > 0 {
            let f32op = |p| Operand {
                ptr: p,
                ty: cudaDataType::CUDA_R_32F,
            };
            let (xp, _s1) = xv.device_ptr(&stream);
            let (ap, _s2) = av.device_ptr(&stream);
            let (bp, _s3) = bv.device_ptr(&stream);
            {
                let (xap, _s4) = xa.device_ptr_mut(&stream);
                // xa(m, r) = s · x(m, k)·A(r, k)ᵀ
                gemm(
                    dev,
                    (true, false),
                    (r, m, k),
                    scale as f32,
                    (f32op(ap), k),
                    (f32op(xp), k),
                    0.0,
                    (xap, r),
                )?;
            }
            let (xap, _s5) = xa.device_ptr(&stream);
            let (yp, _s6) = y.device_ptr_mut(&stream);
            // y(m, n) += xa(m, r)·B(n, r)ᵀ
            gemm(
                dev,
                (true, false),
                (n, m, r),
                1.0,
                (f32op(bp), r),
                (f32op(xap), r),
                1.0,
                (yp, n),
            )?;
        }
    }
    Ok((storage(y, dev), Shape::from((m, n))))
}

/// `g·W` for `g: (m, out)` and a frozen `W: (out, in)` on the device, as a gradient-free op on
/// `g` (the frozen weight never gets a gradient). bf16 weights take `g` rounded to bf16.
pub(crate) struct InputGrad {
    /// The frozen weight, f32 or bf16.
    pub w: Tensor,
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "frozen-linear-input-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(err("frozen-linear-input-grad runs on CUDA tensors only"))
    }

    fn cuda_fwd(&self, g: &CudaStorage, lg: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, k) = self.w.dims2()?;
        let &[m, gn] = lg.dims() else {
            return Err(err(format!(
                "linear output gradient: expected (rows, {n}), got {:?}",
                lg.dims()
            )));
        };
        if gn != n {
            return Err(err(format!(
                "linear output gradient: {gn} columns for {n} outputs"
            )));
        }
        let dev = device(g);
        let stream = dev.cuda_stream();
        let gv = view(g, lg, "linear output gradient")?;
        let mut dx = output(dev, m * k)?;
        if m > 0 && k > 0 {
            let (dxp, _sync) = dx.device_ptr_mut(&stream);
            with_weight(&self.w, |wo| {
                activation(dev, &gv, m * n, wo.ty, |go| {
                    gemm(
                        dev,
                        (false, false),
                        (k, m, n),
                        1.0,
                        (wo, k),
                        (go, n),
                        0.0,
                        (dxp, k),
                    )
                })
            })?;
        }
        Ok((storage(dx, dev), Shape::from((m, k))))
    }
}

/// `g·W` on the device (see [`InputGrad`]).
pub(crate) fn input_grad(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    g.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&InputGrad { w: w.clone() })
}
