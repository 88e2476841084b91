//! whet's CUDA kernels against their CPU references, and the parity fixtures on a GPU.
//!
//! Each kernel runs through the same public op on both devices (the op picks its kernel by the
//! inputs' device), on the same inputs; values and the gradients of every input must agree.
//! Tolerances, relative to the largest magnitude of the CPU result: 1e-5 for values and 1e-4
//! for gradients in f32 — the kernels compute the CPU op's formula, in f32, in another
//! summation order — and the bf16 projection, whose operands are rounded identically on both
//! sides, as f32. The parity fixtures hold the GPU to the CPU tests' own tolerances: logprobs
//! within 1e-4 of PyTorch in f32, gradients within 1e-4 of each tensor's scale; with bf16 base
//! weights the GPU and CPU bf16 paths within 5e-3 of each other (an f32 last-ulp difference
//! before a bf16 rounding moves a logprob by a few 1e-3 on these 64-wide models, as
//! `sampler.rs` explains) and within 2e-2 of f32 PyTorch.
//!
//! Every test skips, saying why, where there is no GPU or no driver (run with
//! `--features cuda`; without a driver the binary still starts when `.cuda/env.sh` has put
//! the link stub on the library path).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{Device, Tensor, Var};
use common::{fixture_on, max_abs_diff, scored, values};
use whet_contract::{LossFn, TrainingClient};
use whet_engine::kernels::{self, AttnMask};
use whet_engine::linear::{linear, Frozen, Precision};
use whet_engine::ops;

/// The first GPU, or `None` (and a line saying why the test is skipped).
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) if e.to_string().contains("STUB_LIBRARY") => {
            eprintln!("skipped: no NVIDIA driver here (libcuda.so.1 is the link stub)");
            None
        }
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Deterministic values in [-1, 1) of `shape` on the CPU.
fn data(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((h >> 40) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Asserts `got` (any device) is within `tol` of `want`'s largest magnitude.
fn close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    let (g, w) = (values(&got.to_device(&Device::Cpu).unwrap()), values(want));
    assert_eq!(g.len(), w.len(), "{what}: sizes");
    let scale = w.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    let d = max_abs_diff(&g, &w);
    assert!(d <= tol * scale, "{what}: max |Δ| = {d} (scale {scale})");
}

/// Runs `f` on the CPU and on `dev` with the same inputs (as variables), and compares values
/// and the gradient of each input under a random projection of the output.
fn same_on_gpu(
    dev: &Device,
    what: &str,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor], &Device) -> Tensor,
) {
    let cpu: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let gpu: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
        .collect();
    let tensors = |vs: &[Var]| vs.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();
    let (yc, yg) = (f(&tensors(&cpu), &Device::Cpu), f(&tensors(&gpu), dev));
    assert!(
        yg.device().is_cuda(),
        "{what}: the GPU result is on {:?}",
        yg.device()
    );
    close(&yg, &yc, 1e-5, what);
    let w = data(yc.dims(), 99);
    let gc = (yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gg = (yg * w.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let (c, g) = (gc.get(c).unwrap(), gg.get(g).unwrap());
        assert!(g.device().is_cuda(), "{what}: gradient {i} left the GPU");
        close(g, c, 1e-4, &format!("{what} gradient {i}"));
    }
}

#[test]
fn rms_norm_matches_cpu() {
    let Some(dev) = gpu() else { return };
    for (shape, seed) in [(vec![7, 3, 96], 1), (vec![5, 2048], 2), (vec![1, 1, 3], 3)] {
        let d = *shape.last().unwrap();
        let w = (data(&[d], seed + 10) + 1.5).unwrap();
        same_on_gpu(
            &dev,
            &format!("rms_norm {shape:?}"),
            &[data(&shape, seed)],
            &|x, dev| kernels::rms_norm(&x[0], &w.to_device(dev).unwrap(), 1e-5).unwrap(),
        );
    }
}

#[test]
fn rope_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let positions: Vec<u32> = (0..9).map(|p| p * 37 % 500).collect();
    let inv: Vec<f32> = (0..32).map(|i| 10000f32.powf(-(i as f32) / 32.0)).collect();
    same_on_gpu(&dev, "rope", &[data(&[9, 4, 64], 4)], &|x, dev| {
        let (c, s) = ops::rope_tables(&inv, &positions, dev).unwrap();
        kernels::rope(&x[0], &c, &s).unwrap()
    });
}

#[test]
fn swiglu_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let inputs = [(data(&[13, 300], 5) * 4.0).unwrap(), data(&[13, 300], 6)];
    same_on_gpu(&dev, "swiglu", &inputs, &|x, _| {
        kernels::swiglu(&x[0], &x[1]).unwrap()
    });
}

#[test]
fn target_logprobs_match_cpu() {
    let Some(dev) = gpu() else { return };
    let targets = [3u32, 999, 0, 517, 42, 7];
    // Weights with zeros: their rows take the kernel's no-exp path.
    let weights = Tensor::new(&[1f32, 0.0, -2.0, 0.5, 0.0, 1.0], &Device::Cpu).unwrap();
    let logits = (data(&[6, 1000], 7) * 8.0).unwrap();
    same_on_gpu(&dev, "target logprobs", &[logits], &|x, dev| {
        let lp = ops::target_logprobs(&x[0], &targets).unwrap();
        (lp * weights.to_device(dev).unwrap()).unwrap()
    });
    let bad = ops::target_logprobs(&data(&[2, 10], 8).to_device(&dev).unwrap(), &[1, 10]);
    let e = bad.unwrap_err().to_string();
    assert!(e.contains("target_tokens[1]"), "{e}");
}

#[test]
fn lora_linear_matches_cpu_in_f32_and_bf16() {
    let Some(dev) = gpu() else { return };
    let w = data(&[48, 64], 9);
    let bias = data(&[48], 10);
    let inputs = [data(&[37, 64], 11), data(&[4, 64], 12), data(&[48, 4], 13)];
    for precision in [Precision::F32, Precision::Bf16] {
        for with_bias in [true, false] {
            let what = format!("linear {precision} bias {with_bias}");
            same_on_gpu(&dev, &what, &inputs, &|x, dev| {
                let frozen = Frozen::new(w.to_device(dev).unwrap(), precision).unwrap();
                let b = bias.to_device(dev).unwrap();
                let b = with_bias.then_some(&b);
                linear(&x[0], &frozen, b, Some((&x[1], &x[2], 2.0))).unwrap()
            });
            same_on_gpu(
                &dev,
                &format!("{what} frozen only"),
                &inputs[..1],
                &|x, dev| {
                    let frozen = Frozen::new(w.to_device(dev).unwrap(), precision).unwrap();
                    let b = bias.to_device(dev).unwrap();
                    linear(&x[0], &frozen, with_bias.then_some(&b), None).unwrap()
                },
            );
        }
    }
    // The bf16 weight on the GPU stores what the CPU packing stores.
    let g = Frozen::new(w.to_device(&dev).unwrap(), Precision::Bf16).unwrap();
    let c = Frozen::new(w.clone(), Precision::Bf16).unwrap();
    close(
        &g.to_tensor().unwrap(),
        &c.to_tensor().unwrap(),
        0.0,
        "bf16 weight",
    );
    assert_eq!(g.precision(), Precision::Bf16);
    close(
        &g.rows(&[3, 0, 47]).unwrap(),
        &c.rows(&[3, 0, 47]).unwrap(),
        0.0,
        "bf16 rows",
    );
}

#[test]
fn packed_attention_matches_cpu_for_every_head_class_with_gqa_and_windows() {
    let Some(dev) = gpu() else { return };
    let lens = [5usize, 33, 1, 70];
    let n: usize = lens.iter().sum();
    for d in [64usize, 80, 128, 256] {
        for window in [None, Some(16)] {
            let inputs = [
                data(&[n, 8, d], 20),
                data(&[n, 2, d], 21),
                data(&[n, 2, d], 22),
            ];
            let what = format!("packed attention d{d} window {window:?}");
            same_on_gpu(&dev, &what, &inputs, &|x, _| {
                kernels::packed_attention(&x[0], &x[1], &x[2], &lens, window).unwrap()
            });
        }
    }
}

#[test]
fn batched_attention_matches_cpu_with_cache_offset_and_padding() {
    let Some(dev) = gpu() else { return };
    for (b, t, s, offset, window, pad) in [
        (1, 7, 7, 0, None, vec![]),
        (2, 5, 12, 7, None, vec![3, 0]),
        (2, 5, 12, 7, Some(6), vec![0, 4]),
        (3, 1, 40, 39, None, vec![0, 10, 39]),
    ] {
        let inputs = [
            data(&[b, 6, t, 64], 30),
            data(&[b, 2, s, 64], 31),
            data(&[b, 2, s, 64], 32),
        ];
        let mask = AttnMask {
            offset,
            window,
            pad,
        };
        same_on_gpu(
            &dev,
            &format!("attention b{b} t{t} s{s} offset{offset} {window:?}"),
            &inputs,
            &|x, _| kernels::attention(&x[0], &x[1], &x[2], mask.clone()).unwrap(),
        );
    }
}

/// `whet_engine::cuda::decode_attention_fwd` as an op, the way `kv_cache.rs`'s decode op
/// would call it on a GPU.
struct Decode {
    keys: usize,
    mask: AttnMask,
}

impl candle_core::CustomOp3 for Decode {
    fn name(&self) -> &'static str {
        "test-decode"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("GPU only")
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let scale = 1.0 / (l1.dims()[3] as f32).sqrt();
        whet_engine::cuda::decode_attention_fwd(
            self.keys,
            &self.mask,
            scale,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )
    }
}

#[test]
fn decoding_over_a_cache_in_place_matches_cpu_attention() {
    let Some(dev) = gpu() else { return };
    let (cap, keys) = (48, 30);
    for (window, pad) in [(None, vec![0, 5]), (Some(8), vec![2, 0])] {
        let (q, k, v) = (
            data(&[2, 6, 1, 64], 40),
            data(&[2, 2, cap, 64], 41),
            data(&[2, 2, cap, 64], 42),
        );
        let mask = AttnMask {
            offset: keys - 1,
            window,
            pad: pad.clone(),
        };
        let want = kernels::attention(
            &q,
            &k.narrow(2, 0, keys).unwrap(),
            &v.narrow(2, 0, keys).unwrap(),
            mask.clone(),
        )
        .unwrap();
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let got = on(&q)
            .apply_op3_no_bwd(&on(&k), &on(&v), &Decode { keys, mask })
            .unwrap();
        close(&got, &want, 1e-5, &format!("decode window {window:?}"));
    }
}

/// A tensor's values, flattened.
#[test]
fn parity_fixtures_match_torch_on_the_gpu_in_f32() {
    let Some(dev) = gpu() else { return };
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"] {
        let f = fixture_on(name, &dev, Precision::F32);
        for (i, lp) in scored(&f).iter().enumerate() {
            let d = max_abs_diff(lp, &f.tensor(&format!("logprobs.adapter.{i}")));
            assert!(d < 1e-4, "{name} datum {i}: max |Δ logprob| = {d}");
        }
        let mut s = f.session(true);
        let out = s
            .forward_backward(
                &f.datums,
                LossFn::CrossEntropy,
                &f.loss_config("cross_entropy"),
            )
            .unwrap();
        let want = f.tensor("loss.cross_entropy")[0];
        let got = out.metrics["loss:sum"] as f32;
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{name}: loss {got} vs {want}"
        );
        for (key, g) in s.accumulated_grads() {
            let want = f.tensor(&format!("grad.cross_entropy.{key}"));
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = max_abs_diff(&values(&g.to_device(&Device::Cpu).unwrap()), &want);
            assert!(
                d <= 1e-4 * scale.max(1e-6),
                "{name} {key}: max |Δ grad| = {d} (scale {scale})"
            );
        }
    }
}

#[test]
fn parity_fixtures_in_bf16_on_the_gpu_stay_near_the_cpu_bf16_path_and_torch() {
    let Some(dev) = gpu() else { return };
    for name in ["tiny-llama", "tiny-qwen2"] {
        let g = scored(&fixture_on(name, &dev, Precision::Bf16)).concat();
        let c = scored(&fixture_on(name, &Device::Cpu, Precision::Bf16)).concat();
        let d = max_abs_diff(&g, &c);
        assert!(d < 5e-3, "{name}: GPU vs CPU bf16 logprobs differ by {d}");
        let f = fixture_on(name, &Device::Cpu, Precision::F32);
        let torch: Vec<f32> = (0..f.datums.len())
            .flat_map(|i| f.tensor(&format!("logprobs.adapter.{i}")))
            .collect();
        let d = max_abs_diff(&g, &torch);
        assert!(
            d < 2e-2,
            "{name}: GPU bf16 vs torch f32 logprobs differ by {d}"
        );
    }
    // The frozen base weights really are bf16 on the device.
    let f = fixture_on("tiny-llama", &dev, Precision::Bf16);
    assert_eq!(f.model.precision(), Precision::Bf16);
}
