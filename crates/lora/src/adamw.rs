//! AdamW with f32 state, computed exactly as `torch.optim.AdamW` (single-tensor CPU path),
//! plus global gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`.
//!
//! candle-nn's AdamW keeps moments in the parameter dtype, cannot export them and has no
//! clipping; Tinker's `optim_step` needs all three, so whet owns its optimizer.

use std::collections::BTreeMap;

use candle_core::Tensor;
use whet_contract::AdamParams;

use crate::{LoraAdapter, LoraError};

/// The moments of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// First moment (`exp_avg`).
    pub exp_avg: Vec<f32>,
    /// Second moment (`exp_avg_sq`).
    pub exp_avg_sq: Vec<f32>,
}

/// AdamW state: per-parameter moments keyed by PEFT name, and the step count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdamW {
    /// Moments per parameter; created at a parameter's first step.
    pub moments: BTreeMap<String, Moments>,
    /// Steps taken (torch's `state["step"]`, shared by all parameters here).
    pub step: u64,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub clip_coef: f64,
}

fn check_params(p: &AdamParams) -> Result<(), LoraError> {
    let bad = |what: &str| Err(LoraError::Config(format!("adam_params: {what}")));
    if !(p.learning_rate.is_finite() && p.learning_rate >= 0.0) {
        return bad("learning_rate must be finite and >= 0");
    }
    if !(0.0..1.0).contains(&p.beta1) || !(0.0..1.0).contains(&p.beta2) {
        return bad("beta1 and beta2 must be in [0, 1)");
    }
    if !(p.eps.is_finite() && p.eps >= 0.0) {
        return bad("eps must be finite and >= 0");
    }
    if !(p.weight_decay.is_finite() && p.weight_decay >= 0.0) {
        return bad("weight_decay must be finite and >= 0");
    }
    if !p.grad_clip_norm.is_finite() || p.grad_clip_norm < 0.0 {
        return bad("grad_clip_norm must be finite and >= 0");
    }
    Ok(())
}

/// torch's `lerp`: `self + w·(end − self)` for `w < 0.5`, else `end − (end − self)·(1 − w)`.
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one step to every trainable tensor of `adapter`, using `grads` (keyed by PEFT
    /// name; a parameter with no gradient gets a zero one, as Tinker's accumulated buffers
    /// would hold). Frozen base weights are never here: only the adapter has state.
    pub fn step(
        &mut self,
        adapter: &LoraAdapter,
        grads: &BTreeMap<String, Tensor>,
        params: &AdamParams,
    ) -> Result<StepReport, LoraError> {
        check_params(params)?;
        let vars = adapter.named_vars();
        let mut grad_values: Vec<Vec<f32>> = Vec::with_capacity(vars.len());
        for (key, var) in &vars {
            let g = match grads.get(key) {
                Some(g) => {
                    if g.dims() != var.dims() {
                        return Err(LoraError::Shape {
                            tensor: format!("gradient of {key}"),
                            expected: var.dims().to_vec(),
                            found: g.dims().to_vec(),
                        });
                    }
                    g.flatten_all()?.to_vec1::<f32>()?
                }
                None => vec![0.0; var.elem_count()],
            };
            grad_values.push(g);
        }

        // clip_grad_norm_: total = ‖(‖g_i‖₂)_i‖₂; coef = max_norm / (total + 1e-6), clamped to 1.
        let total_sq: f64 = grad_values
            .iter()
            .flat_map(|g| g.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum();
        let grad_norm = total_sq.sqrt();
        let mut clip_coef = 1.0f64;
        if params.grad_clip_norm > 0.0 {
            let total = grad_norm as f32;
            let coef = (params.grad_clip_norm as f32 / (total + 1e-6)).min(1.0);
            clip_coef = coef as f64;
            for g in grad_values.iter_mut() {
                g.iter_mut().for_each(|x| *x *= coef);
            }
        }

        self.step += 1;
        let t = self.step as i32;
        let lr = params.learning_rate;
        // Scalars are computed in f64 as Python does, then cast to f32 as torch's kernels do.
        let decay = (1.0 - lr * params.weight_decay) as f32;
        let one_minus_b1 = (1.0 - params.beta1) as f32;
        let b2 = params.beta2 as f32;
        let one_minus_b2 = (1.0 - params.beta2) as f32;
        let bias_correction1 = 1.0 - params.beta1.powi(t);
        let bias_correction2 = 1.0 - params.beta2.powi(t);
        let step_size = (lr / bias_correction1) as f32;
        let bc2_sqrt = bias_correction2.sqrt() as f32;
        let eps = params.eps as f32;

        for ((key, var), g) in vars.iter().zip(grad_values) {
            let mut p: Vec<f32> = var.flatten_all()?.to_vec1()?;
            let m = self.moments.entry(key.clone()).or_insert_with(|| Moments {
                exp_avg: vec![0.0; p.len()],
                exp_avg_sq: vec![0.0; p.len()],
            });
            if m.exp_avg.len() != p.len() {
                return Err(LoraError::Shape {
                    tensor: format!("optimizer state of {key}"),
                    expected: var.dims().to_vec(),
                    found: vec![m.exp_avg.len()],
                });
            }
            for i in 0..p.len() {
                p[i] *= decay;
                m.exp_avg[i] = lerp(m.exp_avg[i], g[i], one_minus_b1);
                m.exp_avg_sq[i] = m.exp_avg_sq[i] * b2 + one_minus_b2 * g[i] * g[i];
                let denom = m.exp_avg_sq[i].sqrt() / bc2_sqrt + eps;
                p[i] += -step_size * (m.exp_avg[i] / denom);
            }
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
        }
        Ok(StepReport {
            grad_norm,
            clip_coef,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoraConfig, Site, SiteShape, Target};
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // With bias correction, step 1 moves every parameter by lr·sign(g) (up to eps).
        let shapes = [SiteShape {
            site: Site {
                layer: 0,
                target: Target::Q,
            },
            in_features: 4,
            out_features: 4,
        }];
        let cfg = LoraConfig {
            rank: 2,
            target_modules: vec![Target::Q],
            ..LoraConfig::default()
        };
        let adapter = LoraAdapter::init(cfg, &shapes, &Device::Cpu).unwrap();
        let before: Vec<Vec<f32>> = adapter
            .named_vars()
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let mut grads = BTreeMap::new();
        for (k, v) in adapter.named_vars() {
            grads.insert(k, (v.ones_like().unwrap() * -3.0).unwrap());
        }
        let mut opt = AdamW::new();
        let params = AdamParams {
            learning_rate: 0.01,
            ..AdamParams::default()
        };
        let r = opt.step(&adapter, &grads, &params).unwrap();
        assert!((r.grad_norm - 3.0 * (8.0f64 + 8.0).sqrt()).abs() < 1e-9);
        for ((_, v), b) in adapter.named_vars().iter().zip(before) {
            let a: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in a.iter().zip(b) {
                assert!((x - y - 0.01).abs() < 1e-6);
            }
        }
        assert_eq!(opt.step, 1);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let shapes = [SiteShape {
            site: Site {
                layer: 0,
                target: Target::V,
            },
            in_features: 2,
            out_features: 2,
        }];
        let cfg = LoraConfig {
            rank: 1,
            target_modules: vec![Target::V],
            ..LoraConfig::default()
        };
        let adapter = LoraAdapter::init(cfg, &shapes, &Device::Cpu).unwrap();
        let grads: BTreeMap<_, _> = adapter
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, (v.ones_like().unwrap() * 10.0).unwrap()))
            .collect();
        let mut opt = AdamW::new();
        let r = opt
            .step(
                &adapter,
                &grads,
                &AdamParams {
                    grad_clip_norm: 1.0,
                    ..AdamParams::default()
                },
            )
            .unwrap();
        assert!((r.grad_norm - 20.0).abs() < 1e-9);
        assert!((r.clip_coef - 1.0 / 20.0).abs() < 1e-6);
    }
}
