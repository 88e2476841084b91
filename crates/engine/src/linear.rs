//! Projections through frozen base weights, with or without their LoRA, as one op — and the
//! precision the base weights compute in.
//!
//! `y = x·Wᵀ + b (+ s·(x·Aᵀ)·Bᵀ)` with `W`, `b` frozen. As one op the graph keeps `x`, `A`, `B`
//! and `y` only (composed, it would keep `x·Wᵀ`, `x·Aᵀ`, the scaled low-rank product and the
//! sum — about four extra output-sized tensors per projection), and the frozen `W` never gets a
//! gradient. Backward: `dx = g·W + s·(g·B)·A`, `dA = s·(g·B)ᵀ·x`, `dB = s·gᵀ·(x·Aᵀ)`.
//!
//! [`Precision::Bf16`] stores `W` in bf16 and rounds the inputs of `x·Wᵀ` and `g·W` to bf16,
//! summing in f32 (see [`crate::bf16`]); the LoRA path, biases, norms, attention, the loss,
//! gradients and optimizer state stay f32.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use serde::{Deserialize, Serialize};

use crate::bf16::PackedBf16;
use crate::kernels::{slice, tensor_of, values, with_values};
use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

/// The number format the frozen base weights compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 weights and products: PyTorch's fp32 numbers (what the parity tests hold to 1e-4).
    #[default]
    F32,
    /// bf16 weights, inputs of the base products rounded to bf16, f32 sums — PyTorch's bf16
    /// `linear`. Half the weight memory; on CPUs with AVX512_BF16 about twice the f32 speed.
    Bf16,
}

impl FromStr for Precision {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(EngineError::Invalid {
                field: "precision".into(),
                message: format!("{other:?}: expected f32 or bf16"),
            }),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// A frozen weight matrix `W: (out, in)` in the precision the model computes with.
#[derive(Debug, Clone)]
pub enum Frozen {
    /// f32, multiplied with candle's GEMM.
    F32(Tensor),
    /// bf16, packed for `x·Wᵀ`; the packing for `g·W` (the input gradient) is built on the
    /// first backward pass, so a model that only samples holds one copy.
    Bf16(Arc<Bf16Weight>),
    /// bf16 on a CUDA device, `(out, in)` as it is: cuBLAS multiplies it with bf16-rounded
    /// inputs, f32 sums and f32 outputs, both ways (`x·Wᵀ` and `g·W`), so one copy serves both.
    #[cfg(feature = "cuda")]
    CudaBf16(Tensor),
}

/// The bf16 packings of one frozen matrix.
#[derive(Debug)]
pub struct Bf16Weight {
    fwd: PackedBf16,
    bwd: OnceLock<PackedBf16>,
}

/// Rows at or below which f32 `x·Wᵀ` is computed as `(W·xᵀ)ᵀ`: with `W` as the tall left
/// operand and the tiny `xᵀ` made contiguous, candle's GEMM runs about 1.5–2× faster at 16
/// rows than with `W` transposed on the right.
const FEW_ROWS: usize = 32;

impl Frozen {
    /// Takes `w: (out, in)` f32 into the given precision.
    pub fn new(w: Tensor, precision: Precision) -> Result<Self> {
        let (n, k) = w.dims2()?;
        match precision {
            Precision::F32 => Ok(Self::F32(w)),
            #[cfg(feature = "cuda")]
            Precision::Bf16 if w.device().is_cuda() => {
                Ok(Self::CudaBf16(w.to_dtype(candle_core::DType::BF16)?))
            }
            Precision::Bf16 if !w.device().is_cpu() => Err(EngineError::Unsupported(
                "bf16 base weights on this device (whet's bf16 kernels are CPU and CUDA kernels)"
                    .into(),
            )),
            Precision::Bf16 => {
                let fwd = with_values(&w, |v| PackedBf16::pack(v, n, k))?;
                Ok(Self::Bf16(Arc::new(Bf16Weight {
                    fwd,
                    bwd: OnceLock::new(),
                })))
            }
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::F32(w) => w.dims2().unwrap_or((0, 0)),
            Self::Bf16(p) => (p.fwd.rows(), p.fwd.cols()),
            #[cfg(feature = "cuda")]
            Self::CudaBf16(w) => w.dims2().unwrap_or((0, 0)),
        }
    }

    /// The precision it computes in.
    pub fn precision(&self) -> Precision {
        match self {
            Self::F32(_) => Precision::F32,
            Self::Bf16(_) => Precision::Bf16,
            #[cfg(feature = "cuda")]
            Self::CudaBf16(_) => Precision::Bf16,
        }
    }

    /// The values it computes with, as an f32 tensor `(out, in)` (bf16 values widened).
    pub fn to_tensor(&self) -> Result<Tensor> {
        match self {
            Self::F32(w) => Ok(w.clone()),
            Self::Bf16(p) => Ok(Tensor::from_vec(
                p.fwd.unpack(),
                self.dims(),
                &candle_core::Device::Cpu,
            )?),
            #[cfg(feature = "cuda")]
            Self::CudaBf16(w) => Ok(w.to_dtype(candle_core::DType::F32)?),
        }
    }

    /// The weight where the CUDA kernels read it (f32 or bf16 on the device).
    #[cfg(feature = "cuda")]
    fn cuda_weight(&self) -> candle_core::Result<&Tensor> {
        match self {
            Self::F32(w) | Self::CudaBf16(w) => Ok(w),
            Self::Bf16(_) => candle_core::bail!("a CPU-packed bf16 weight was given CUDA inputs"),
        }
    }

    /// Rows of `W` (`ids` must be below `out`): an embedding lookup, `(ids, in)` f32.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::F32(w) => Ok(w.index_select(&Tensor::new(ids, w.device())?, 0)?),
            Self::Bf16(p) if ids.iter().any(|&i| i as usize >= p.fwd.rows()) => Err(
                EngineError::Internal(format!("token id out of range for {} rows", p.fwd.rows())),
            ),
            Self::Bf16(p) => Ok(Tensor::from_vec(
                p.fwd.gather_rows(ids),
                (ids.len(), p.fwd.cols()),
                &candle_core::Device::Cpu,
            )?),
            #[cfg(feature = "cuda")]
            Self::CudaBf16(w) => Ok(w
                .index_select(&Tensor::new(ids, w.device())?, 0)?
                .to_dtype(candle_core::DType::F32)?),
        }
    }

    /// `x·Wᵀ` for row-major `x: (m, in)` → row-major `(m, out)`.
    fn forward(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::F32(w) => {
                let x = Tensor::from_slice(x, (m, w.dim(1)?), w.device())?;
                let y = if m <= FEW_ROWS && w.device().is_cpu() {
                    w.matmul(&x.t()?.contiguous()?)?.t()?
                } else {
                    x.matmul(&w.t()?)?
                };
                values(&y)
            }
            Self::Bf16(p) => Ok(p.fwd.matmul_xwt(x, m)),
            #[cfg(feature = "cuda")]
            Self::CudaBf16(_) => candle_core::bail!("a CUDA weight was given CPU inputs"),
        }
    }

    /// `g·W` for `g: (m, out)` → `(m, in)`.
    fn input_grad(&self, g: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::F32(w) => g.matmul(w),
            Self::Bf16(p) => {
                let bwd = p.bwd.get_or_init(|| p.fwd.transposed());
                let m = g.dim(0)?;
                let dx = with_values(g, |g| bwd.matmul_xwt(g, m))?;
                Tensor::from_vec(dx, (m, bwd.rows()), g.device())
            }
            #[cfg(feature = "cuda")]
            Self::CudaBf16(w) => crate::cuda::gemm::input_grad(g, w),
        }
    }
}

struct LinearOp {
    w: Frozen,
    /// The bias on the host (CPU inputs only).
    bias: Option<Vec<f32>>,
    /// The bias as given, where the CUDA kernels read it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    bias_t: Option<Tensor>,
    scale: f64,
}

impl LinearOp {
    /// `x·Wᵀ + b` of a contiguous `x: (m, in)`.
    fn base(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(Vec<f32>, usize)> {
        let (m, _) = l.shape().dims2()?;
        let mut y = self.w.forward(slice(s, l)?, m)?;
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
        Ok((y, m))
    }
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, m) = self.base(s, l)?;
        Ok((CpuStorage::F32(y), (m, self.w.dims().0).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let w = self.w.cuda_weight()?;
        crate::cuda::gemm::linear_fwd(s, l, w, self.bias_t.as_ref(), None)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.w.input_grad(&g.detach().contiguous()?)?))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let (mut y, m) = self.base(s1, l1)?;
        let (x, a, b) = (tensor_of(s1, l1)?, tensor_of(s2, l2)?, tensor_of(s3, l3)?);
        let low = values(&(x.matmul(&a.t()?)? * self.scale)?.matmul(&b.t()?)?)?;
        y.iter_mut().zip(&low).for_each(|(y, l)| *y += l);
        Ok((CpuStorage::F32(y), (m, self.w.dims().0).into()))
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
        let w = self.w.cuda_weight()?;
        let lora = Some((s2, l2, s3, l3, self.scale));
        crate::cuda::gemm::linear_fwd(s1, l1, w, self.bias_t.as_ref(), lora)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, g) = (x.detach(), a.detach(), b.detach(), g.detach().contiguous()?);
        let gb = (g.matmul(&b)? * self.scale)?; // (N, r)
        let dx = (self.w.input_grad(&g)? + gb.matmul(&a)?)?;
        let da = gb.t()?.matmul(&x)?;
        let xa = (x.matmul(&a.t()?)? * self.scale)?; // (N, r)
        let db = g.t()?.matmul(&xa)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x·Wᵀ + b`, plus `scale·(x·Aᵀ)·Bᵀ` when a LoRA pair is given; `x: (N, in)`.
pub fn linear(
    x: &Tensor,
    w: &Frozen,
    bias: Option<&Tensor>,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let on_cpu = x.device().is_cpu();
    let mut op = LinearOp {
        w: w.clone(),
        bias: bias.filter(|_| on_cpu).map(values).transpose()?,
        bias_t: bias.map(Tensor::contiguous).transpose()?,
        scale: 0.0,
    };
    Ok(match lora {
        None if x.track_op() => x.apply_op1(op)?,
        None => x.apply_op1_no_bwd(&op)?,
        Some((a, b, scale)) => {
            op.scale = scale;
            let (a, b) = (a.contiguous()?, b.contiguous()?);
            if x.track_op() || a.track_op() || b.track_op() {
                x.apply_op3(&a, &b, op)?
            } else {
                x.apply_op3_no_bwd(&a, &b, &op)?
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::{from_bf16, to_bf16};
    use crate::test_util::{close, var};
    use candle_core::{Device, Var};

    fn round_bf16(t: &Tensor) -> Tensor {
        let v: Vec<f32> = values(t)
            .unwrap()
            .into_iter()
            .map(|x| from_bf16(to_bf16(x)))
            .collect();
        Tensor::from_vec(v, t.shape(), t.device()).unwrap()
    }

    /// Value and gradients of the fused op against a composite, for `x`, `A`, `B`.
    fn check(
        vars: &[&Var],
        fused: &dyn Fn() -> Tensor,
        composite: &dyn Fn() -> Tensor,
        tol: f32,
        what: &str,
    ) {
        let (yf, yc) = (fused(), composite());
        close(&yf, &yc, tol, what);
        let w = Tensor::randn(0f32, 1.0, yf.shape(), &Device::Cpu).unwrap();
        let gf = (yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            close(
                gf.get(v).unwrap(),
                gc.get(v).unwrap(),
                10.0 * tol,
                &format!("{what} grad {i}"),
            );
        }
    }

    #[test]
    fn lora_linear_matches_composite_and_spares_the_frozen_weight() {
        let (x, a, b) = (var(&[5, 8], 11), var(&[3, 8], 12), var(&[6, 3], 13));
        let w = var(&[6, 8], 14);
        let bias = var(&[6], 15).as_tensor().detach();
        let wt = w.as_tensor().detach();
        let frozen = Frozen::new(wt.clone(), Precision::F32).unwrap();
        let composite_base = |x: &Tensor| {
            x.matmul(&wt.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
        };
        check(
            &[&x, &a, &b],
            &|| {
                let lora = Some((a.as_tensor(), b.as_tensor(), 2.0));
                linear(x.as_tensor(), &frozen, Some(&bias), lora).unwrap()
            },
            &|| {
                let low = x
                    .as_tensor()
                    .matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&b.t().unwrap())
                    .unwrap();
                (composite_base(x.as_tensor()) + (low * 2.0).unwrap()).unwrap()
            },
            1e-5,
            "lora linear",
        );
        check(
            &[&x],
            &|| linear(x.as_tensor(), &frozen, Some(&bias), None).unwrap(),
            &|| composite_base(x.as_tensor()),
            1e-5,
            "frozen linear",
        );
        // A 1-row and a 40-row input take the two f32 GEMM arrangements.
        for m in [1, 40] {
            let x = var(&[m, 8], 16).as_tensor().detach();
            let got = linear(&x, &frozen, Some(&bias), None).unwrap();
            close(&got, &composite_base(&x), 1e-5, "few and many rows");
        }
        // The frozen weight is a Var here, and still gets no gradient.
        let y = linear(
            x.as_tensor(),
            &Frozen::new(w.as_tensor().clone(), Precision::F32).unwrap(),
            None,
            Some((a.as_tensor(), b.as_tensor(), 1.0)),
        )
        .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn bf16_linear_is_the_f32_product_of_bf16_rounded_operands() {
        let (x, a, b) = (var(&[7, 40], 21), var(&[4, 40], 22), var(&[36, 4], 23));
        let wt = var(&[36, 40], 24).as_tensor().detach();
        let bias = var(&[36], 25).as_tensor().detach();
        let frozen = Frozen::new(wt.clone(), Precision::Bf16).unwrap();
        assert_eq!(frozen.dims(), (36, 40));
        assert_eq!(frozen.precision(), Precision::Bf16);
        close(
            &frozen.to_tensor().unwrap(),
            &round_bf16(&wt),
            0.0,
            "stored values",
        );
        // Reference: the f32 product of the bf16-rounded operands — x and W forward, the
        // output gradient g and W for the input gradient; the LoRA path in f32.
        let wr = round_bf16(&wt);
        let scale = 0.5;
        let y = linear(
            x.as_tensor(),
            &frozen,
            Some(&bias),
            Some((a.as_tensor(), b.as_tensor(), scale)),
        )
        .unwrap();
        let (xs, at, bt) = (x.as_tensor().detach(), a.as_tensor(), b.as_tensor());
        let xa = xs.matmul(&at.t().unwrap()).unwrap();
        let want = (round_bf16(&xs)
            .matmul(&wr.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            + (xa.matmul(&bt.t().unwrap()).unwrap() * scale).unwrap())
        .unwrap();
        close(&y, &want, 1e-5, "bf16 value");
        let g = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu).unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (g.matmul(bt).unwrap() * scale).unwrap();
        let dx = (round_bf16(&g).matmul(&wr).unwrap() + gb.matmul(at).unwrap()).unwrap();
        close(grads.get(&x).unwrap(), &dx, 1e-5, "bf16 dx");
        let da = gb.t().unwrap().matmul(&xs).unwrap();
        close(grads.get(&a).unwrap(), &da, 1e-5, "bf16 dA");
        let db = g.t().unwrap().matmul(&(xa * scale).unwrap()).unwrap();
        close(grads.get(&b).unwrap(), &db, 1e-5, "bf16 dB");
    }

    #[test]
    fn precision_parses_and_prints() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("fp32".parse::<Precision>().unwrap(), Precision::F32);
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        let e = "fp16".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("precision") && e.contains("fp16"), "{e}");
    }
}
