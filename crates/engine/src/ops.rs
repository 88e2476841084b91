//! Differentiable operations composed from candle's core ops, the logprob-of-target op, and
//! RoPE tables.
//!
//! Trap avoided here (see candle-notes): candle-nn's fused `softmax_last_dim`, `rms_norm` and
//! `rope` cut the autograd graph silently, so whet never uses candle-nn. The composites here
//! are the references the fused kernels in [`crate::kernels`] are tested against.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

/// Returns the contiguous f32 slice behind a CPU tensor's storage and layout.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("expected a contiguous tensor"),
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · w`, composed from core ops
/// so the gradient reaches `x`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Softmax over the last dimension, composed from core ops (candle's fused one has no
/// backward). The max is detached: it only stabilises and cancels in the gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// RoPE in Hugging Face's rotate-half layout on `x: (N, heads, head_dim)` with `cos, sin:
/// (N, head_dim/2)` for each row's position: `x·cos + rotate_half(x)·sin`, where the angle
/// table is the half table repeated and `rotate_half([a, b]) = [−b, a]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    // [a, b]·[cos, cos] + [−b, a]·[sin, sin] = [a·cos − b·sin, b·cos + a·sin]
    let out1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let out2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[&out1, &out2], D::Minus1)?)
}

/// The angle tables for RoPE at the given positions: `(cos, sin)`, each `(N, head_dim/2)`,
/// computed in f32 as transformers does (`position · inv_freq`, then cos/sin).
pub fn rope_tables(
    inv_freq: &[f32],
    positions: &[u32],
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (positions.len(), half), device)?,
        Tensor::from_vec(sin, (positions.len(), half), device)?,
    ))
}

/// `eˣ` for `x ≤ 0` — the only exponent softmax and log-sum-exp need after subtracting the
/// maximum — within 2 ulp (about 2.4e-7 relative), in plain arithmetic so that loops over a row
/// vectorise (libm's `expf` is a call per element: over a 49k vocabulary it cost more than
/// the sampling itself). `x = n·ln2 + r` with `|r| ≤ ln2/2`; `eʳ` by its degree-7 Taylor
/// polynomial (next term < 6e-9); `2ⁿ` by building the float's exponent.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2¹⁰ (Cody–Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    // Below −87.3, eˣ is under the smallest normal float: flush to 0. A NaN stays NaN.
    let (input, underflow) = (x, x < -87.0);
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow {
        0.0
    } else if input.is_nan() {
        input
    } else {
        p * scale
    }
}

/// Log-sum-exp of one row of logits, accumulated in f64.
/// Each term is an f32 [`exp_nonpos`] (`x − max ≤ 0`); the sum is carried in 16 f64 lanes.
pub fn row_lse(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut lanes = [0f64; 16];
    let chunks = row.chunks_exact(16);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| exp_nonpos(x - max) as f64)
        .sum();
    for c in chunks {
        for (lane, &x) in lanes.iter_mut().zip(c) {
            *lane += exp_nonpos(x - max) as f64;
        }
    }
    max as f64 + (lanes.iter().sum::<f64>() + rest).ln()
}

/// `log_softmax(logits)[i, targets[i]]` for each row, with its own backward
/// (`grad_i · (onehot(target_i) − softmax_i)`), so no `(rows, vocab)` intermediate beyond the
/// logits themselves is kept for the gradient.
struct TargetLogprobs {
    targets: Vec<u32>,
}

impl CustomOp1 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "target-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let x = f32_slice(s, l)?;
        let out: Vec<f32> = (0..rows)
            .into_par_iter()
            .map(|i| {
                let row = &x[i * vocab..(i + 1) * vocab];
                (row[self.targets[i] as usize] as f64 - row_lse(row)) as f32
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::xent::target_logprobs(s, l, &self.targets)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let g = arg.detach().apply_op1_no_bwd(&TargetLogprobsGrad {
            targets: self.targets.clone(),
            grad,
        })?;
        Ok(Some(g))
    }
}

/// The gradient of [`TargetLogprobs`] w.r.t. the logits.
struct TargetLogprobsGrad {
    targets: Vec<u32>,
    grad: Vec<f32>,
}

impl CustomOp1 for TargetLogprobsGrad {
    fn name(&self) -> &'static str {
        "target-logprobs-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let x = f32_slice(s, l)?;
        let mut out = vec![0f32; rows * vocab];
        out.par_chunks_mut(vocab).enumerate().for_each(|(i, o)| {
            let g = self.grad[i];
            if g == 0.0 {
                return;
            }
            let row = &x[i * vocab..(i + 1) * vocab];
            let lse = row_lse(row) as f32;
            for (o, &v) in o.iter_mut().zip(row) {
                *o = -g * exp_nonpos(v - lse);
            }
            o[self.targets[i] as usize] += g;
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::xent::target_logprobs_grad(s, l, &self.targets, &self.grad)
    }
}

/// Log-probability of each row's target token: `logits: (rows, vocab)` → `(rows,)`.
pub fn target_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let op = TargetLogprobs {
        targets: targets.to_vec(),
    };
    Ok(if logits.track_op() {
        logits.apply_op1(op)?
    } else {
        logits.apply_op1_no_bwd(&op)?
    })
}

/// Full log-softmax rows of a `(rows, vocab)` tensor, as plain vectors (for sampling).
pub fn log_softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows
        .into_par_iter()
        .map(|row| {
            let lse = row_lse(&row);
            row.iter().map(|&x| (x as f64 - lse) as f32).collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpos_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 90.0 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            if want > f32::MIN_POSITIVE as f64 * 2.0 {
                worst = worst.max((got - want).abs() / want);
            } else {
                assert!(got <= f32::MIN_POSITIVE as f64 * 2.0, "{x}: {got}");
            }
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpos(f32::NAN).is_nan());
    }
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn target_logprobs_matches_composite_and_its_gradient() {
        let dev = Device::Cpu;
        let logits = Var::from_tensor(&Tensor::randn(0f32, 3., (4, 7), &dev).unwrap()).unwrap();
        let targets = [1u32, 6, 0, 3];
        let lp = target_logprobs(logits.as_tensor(), &targets).unwrap();
        let weights = Tensor::new(&[1f32, -2.0, 0.5, 0.0], &dev).unwrap();
        let g = (lp.clone() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // Composite reference.
        let ls = softmax_last_dim(logits.as_tensor()).unwrap().log().unwrap();
        let idx = Tensor::new(&targets, &dev).unwrap().unsqueeze(1).unwrap();
        let lp2 = ls.gather(&idx, 1).unwrap().squeeze(1).unwrap();
        close(&lp, &lp2, 1e-5);
        let g2 = (lp2 * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(g.get(&logits).unwrap(), g2.get(&logits).unwrap(), 1e-5);
    }

    #[test]
    fn composite_ops_pass_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 2, 4), &dev).unwrap()).unwrap();
        let w = Tensor::ones(4, DType::F32, &dev).unwrap();
        let (cos, sin) = rope_tables(&[1.0, 0.1], &[0, 1, 2], &dev).unwrap();
        let y = rope(&rms_norm(x.as_tensor(), &w, 1e-6).unwrap(), &cos, &sin).unwrap();
        let y = softmax_last_dim(&y).unwrap();
        let g = (y * Tensor::randn(0f32, 1., (3, 2, 4), &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(gx.iter().any(|v| v.abs() > 1e-6));
        // Position 0 is the identity rotation.
        let (c0, s0) = rope_tables(&[1.0, 0.1], &[0], &dev).unwrap();
        let z = Tensor::randn(0f32, 1., (1, 2, 4), &dev).unwrap();
        close(&rope(&z, &c0, &s0).unwrap(), &z, 0.0);
    }
}
