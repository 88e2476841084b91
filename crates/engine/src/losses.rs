//! Tinker's losses over per-token logprobs. Every loss is a **sum** over tokens (the client
//! normalises through the weights or advantages), with `lp` the logprob of the target under the
//! current weights, `old` the sampler's `logprobs` input, `A` the `advantages` and
//! `r = exp(lp − old)` the importance ratio.

use candle_core::Tensor;
use whet_contract::{LossFn, LossFnConfig};

use crate::EngineError;

/// A loss with its configuration checked and defaulted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// `−Σ w·lp`.
    CrossEntropy,
    /// `−Σ r·A`.
    ImportanceSampling,
    /// `−Σ min(r·A, clip(r, lo, hi)·A)`.
    Ppo {
        /// Lower ratio clip.
        lo: f64,
        /// Upper ratio clip.
        hi: f64,
    },
    /// `−Σ sg(clip(r, lo, hi))·lp·A` (the clipped ratio is a constant weight).
    Cispo {
        /// Lower ratio clip.
        lo: f64,
        /// Upper ratio clip.
        hi: f64,
    },
    /// `−Σ (lp·A − ½β(lp − old)²)`.
    Dro {
        /// Strength of the quadratic penalty.
        beta: f64,
    },
}

impl Loss {
    /// Checks `loss_fn_config` for this loss: unknown keys are refused, defaults applied.
    pub fn new(loss_fn: LossFn, config: &LossFnConfig) -> Result<Self, EngineError> {
        let allowed: &[&str] = match loss_fn {
            LossFn::CrossEntropy | LossFn::ImportanceSampling => &[],
            LossFn::Ppo | LossFn::Cispo => &["clip_low_threshold", "clip_high_threshold"],
            LossFn::Dro => &["beta"],
        };
        if let Some(k) = config.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(EngineError::Invalid {
                field: format!("loss_fn_config.{k}"),
                message: format!(
                    "not a parameter of {} (it takes: {})",
                    loss_fn.name(),
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                ),
            });
        }
        let get = |k: &str, default: f64| config.get(k).copied().unwrap_or(default);
        let clip = |lo_default: f64, hi_default: f64| -> Result<(f64, f64), EngineError> {
            let (lo, hi) = (
                get("clip_low_threshold", lo_default),
                get("clip_high_threshold", hi_default),
            );
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(EngineError::Invalid {
                    field: "loss_fn_config".into(),
                    message: format!("clip_low_threshold {lo} must be <= clip_high_threshold {hi}"),
                });
            }
            Ok((lo, hi))
        };
        Ok(match loss_fn {
            LossFn::CrossEntropy => Loss::CrossEntropy,
            LossFn::ImportanceSampling => Loss::ImportanceSampling,
            LossFn::Ppo => {
                let (lo, hi) = clip(0.8, 1.2)?;
                Loss::Ppo { lo, hi }
            }
            LossFn::Cispo => {
                let (lo, hi) = clip(0.0, 4.0)?;
                Loss::Cispo { lo, hi }
            }
            LossFn::Dro => {
                let beta = config
                    .get("beta")
                    .copied()
                    .ok_or_else(|| EngineError::Invalid {
                        field: "loss_fn_config.beta".into(),
                        message: "dro needs beta (the weight of its quadratic penalty)".into(),
                    })?;
                if !beta.is_finite() || beta < 0.0 {
                    return Err(EngineError::Invalid {
                        field: "loss_fn_config.beta".into(),
                        message: format!("{beta} must be finite and >= 0"),
                    });
                }
                Loss::Dro { beta }
            }
        })
    }

    /// The summed loss (a scalar tensor) from `lp` and the per-token inputs, all `(tokens,)`.
    /// `weights` is used by cross-entropy; `old` and `advantages` by the others.
    pub fn sum(
        &self,
        lp: &Tensor,
        weights: &Tensor,
        old: &Tensor,
        advantages: &Tensor,
    ) -> Result<Tensor, EngineError> {
        let ratio = || -> Result<Tensor, EngineError> { Ok((lp - old)?.exp()?) };
        let per_token = match *self {
            Loss::CrossEntropy => (lp * weights)?,
            Loss::ImportanceSampling => (ratio()? * advantages)?,
            Loss::Ppo { lo, hi } => {
                let r = ratio()?;
                let unclipped = (&r * advantages)?;
                let clipped = (r.clamp(lo as f32, hi as f32)? * advantages)?;
                unclipped.minimum(&clipped)?
            }
            Loss::Cispo { lo, hi } => {
                let coef = ratio()?.detach().clamp(lo as f32, hi as f32)?;
                ((coef * lp)? * advantages)?
            }
            Loss::Dro { beta } => {
                let penalty = ((lp - old)?.sqr()? * (0.5 * beta))?;
                ((lp * advantages)? - penalty)?
            }
        };
        Ok(per_token.sum_all()?.neg()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn values_follow_the_formulas() {
        let lp = t(&[-1.0, -2.0, -0.5]);
        let old = t(&[-1.5, -1.0, -0.5]);
        let adv = t(&[1.0, -1.0, 2.0]);
        let w = t(&[1.0, 0.0, 0.5]);
        let v = |l: Loss| {
            l.sum(&lp, &w, &old, &adv)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((v(Loss::CrossEntropy) - 1.25).abs() < 1e-6);
        let r = [0.5f32.exp(), (-1.0f32).exp(), 1.0];
        let is = -(r[0] - r[1] + r[2] * 2.0); // A = [1, -1, 2]
        assert!((v(Loss::ImportanceSampling) - is).abs() < 1e-6);
        // PPO: token 0 (A>0, r=1.65) clipped to 1.2; token 1 (A<0, r=0.37): min picks the
        // clipped −0.8; token 2 r=1.
        let ppo = -(1.2 - 0.8 + 2.0); // clipped 1.2·1, clipped 0.8·(−1), 1·2
        assert!((v(Loss::Ppo { lo: 0.8, hi: 1.2 }) - ppo).abs() < 1e-6);
        let dro = -((-1.0 - 0.5 * 0.1 * 0.25) + (2.0 - 0.5 * 0.1 * 1.0) + (-1.0));
        assert!((v(Loss::Dro { beta: 0.1 }) - dro).abs() < 1e-6);
    }

    #[test]
    fn cispo_weight_is_a_constant() {
        let lp = Var::new(&[-1.0f32, -2.0], &Device::Cpu).unwrap();
        let old = t(&[-1.5, -1.0]);
        let adv = t(&[1.0, 1.0]);
        let loss = Loss::Cispo { lo: 0.0, hi: 4.0 }
            .sum(lp.as_tensor(), &adv, &old, &adv)
            .unwrap();
        let g: Vec<f32> = loss
            .backward()
            .unwrap()
            .get(&lp)
            .unwrap()
            .to_vec1()
            .unwrap();
        // d/dlp of −sg(r)·lp·A is −r·A.
        assert!((g[0] + 0.5f32.exp()).abs() < 1e-6 && (g[1] + (-1.0f32).exp()).abs() < 1e-6);
    }

    #[test]
    fn config_is_checked() {
        let mut c = LossFnConfig::new();
        c.insert("beta".into(), 0.1);
        assert!(Loss::new(LossFn::Ppo, &c).is_err());
        assert!(Loss::new(LossFn::Dro, &LossFnConfig::new()).is_err());
        assert_eq!(Loss::new(LossFn::Dro, &c).unwrap(), Loss::Dro { beta: 0.1 });
        assert_eq!(
            Loss::new(LossFn::Cispo, &LossFnConfig::new()).unwrap(),
            Loss::Cispo { lo: 0.0, hi: 4.0 }
        );
    }
}
