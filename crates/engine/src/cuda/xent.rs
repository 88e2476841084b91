//! Target log-probabilities of a logits chunk on CUDA, and their gradient (the `cuda_fwd` of
//! `ops::TargetLogprobs` and `ops::TargetLogprobsGrad`). The targets (and the per-row output
//! gradient) are a few KB per chunk: they are copied to the device per call, on candle's stream.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{Layout, Result, Shape};
use whet_kernels::geometry::per_row;
use whet_kernels::XENT;

use super::launch::{config, device, err, func, launched, output, storage, view};
use whet_kernels::plan;

/// `log_softmax(logits)[r, targets[r]]` for each row of a contiguous `(rows, vocab)` chunk.
pub(crate) fn target_logprobs(
    s: &CudaStorage,
    l: &Layout,
    targets: &[u32],
) -> Result<(CudaStorage, Shape)> {
    let (rows, vocab) = plan::logits_dims(l.dims(), targets).map_err(err)?;
    let dev = device(s);
    let x = view(s, l, "logits")?;
    let mut out = output(dev, rows)?;
    if rows > 0 && vocab > 0 {
        let t = dev.clone_htod(targets)?;
        let f = func(dev, &XENT, "whet_target_logprobs_f32")?;
        let vi = vocab as i32;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&t).arg(&mut out).arg(&vi);
        // SAFETY: x holds rows·vocab f32, t and out hold rows; one block per row.
        launched(
            unsafe { b.launch(config(per_row(rows, vocab).map_err(|e| err(e.0))?)) },
            "target logprobs",
        )?;
    }
    Ok((storage(out, dev), Shape::from(rows)))
}

/// `grad[r] · (onehot(targets[r]) − softmax(logits[r]))`, `(rows, vocab)`.
pub(crate) fn target_logprobs_grad(
    s: &CudaStorage,
    l: &Layout,
    targets: &[u32],
    grad: &[f32],
) -> Result<(CudaStorage, Shape)> {
    let (rows, vocab) = plan::logits_dims(l.dims(), targets).map_err(err)?;
    if grad.len() != rows {
        return Err(err(format!(
            "target logprobs gradient: {} values for {rows} rows",
            grad.len()
        )));
    }
    let dev = device(s);
    let x = view(s, l, "logits")?;
    let mut out = output(dev, rows * vocab)?;
    if rows > 0 && vocab > 0 {
        let t = dev.clone_htod(targets)?;
        let g = dev.clone_htod(grad)?;
        let f = func(dev, &XENT, "whet_target_logprobs_bwd_f32")?;
        let vi = vocab as i32;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&t).arg(&g).arg(&mut out).arg(&vi);
        // SAFETY: x and out hold rows·vocab f32, t and g hold rows; one block per row.
        launched(
            unsafe { b.launch(config(per_row(rows, vocab).map_err(|e| err(e.0))?)) },
            "target logprobs backward",
        )?;
    }
    Ok((storage(out, dev), l.shape().clone()))
}
