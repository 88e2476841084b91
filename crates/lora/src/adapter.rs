//! A LoRA adapter: one `(A, B)` pair of trainable f32 matrices per adapted projection.
//!
//! `y = x·Wᵀ + scaling · (x·Aᵀ)·Bᵀ` with `A: (r, in)` and `B: (out, r)`, as PEFT computes it.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::{LoraConfig, LoraError, Site, Target};

/// The input and output width of an adaptable projection, given by the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteShape {
    /// The site.
    pub site: Site,
    /// Input features (columns of the base weight).
    pub in_features: usize,
    /// Output features (rows of the base weight).
    pub out_features: usize,
}

/// The trainable matrices of one site.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `lora_A`, shape `(r, in)`.
    pub a: Var,
    /// `lora_B`, shape `(out, r)`.
    pub b: Var,
    /// `alpha / r` (or rsLoRA's `alpha / sqrt(r)`).
    pub scaling: f64,
}

/// The tensors one forward pass uses for a site: tracked (training) or detached (sampling).
#[derive(Debug, Clone)]
pub struct LoraSiteWeights {
    /// `lora_A`, shape `(r, in)`.
    pub a: Tensor,
    /// `lora_B`, shape `(out, r)`.
    pub b: Tensor,
    /// Output scaling.
    pub scaling: f64,
}

/// A view of an adapter for one forward pass.
#[derive(Debug, Clone, Default)]
pub struct LoraWeights {
    /// Per site.
    pub sites: BTreeMap<Site, LoraSiteWeights>,
    /// Dropout probability on the adapter input (0 when sampling).
    pub dropout: f64,
}

impl LoraWeights {
    /// The weights of a site, if it is adapted.
    pub fn site(&self, layer: usize, target: Target) -> Option<&LoraSiteWeights> {
        self.sites.get(&Site { layer, target })
    }
}

/// A LoRA adapter bound to a model's shapes.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    config: LoraConfig,
    pairs: BTreeMap<Site, LoraPair>,
}

/// Checks that the `(A, B)` shapes fit the site and the configured rank.
fn check_pair_shape(
    shape: &SiteShape,
    rank: usize,
    a: &[usize],
    b: &[usize],
) -> Result<(), LoraError> {
    let want_a = [rank, shape.in_features];
    let want_b = [shape.out_features, rank];
    if a != want_a {
        return Err(LoraError::Shape {
            tensor: shape.site.peft_key('A'),
            expected: want_a.to_vec(),
            found: a.to_vec(),
        });
    }
    if b != want_b {
        return Err(LoraError::Shape {
            tensor: shape.site.peft_key('B'),
            expected: want_b.to_vec(),
            found: b.to_vec(),
        });
    }
    Ok(())
}

impl LoraAdapter {
    /// A fresh adapter with PEFT's initialisation: `A ~ U(−1/√in, 1/√in)` (kaiming-uniform
    /// with `a = √5`, which is what PEFT calls), `B = 0`, so the adapted model starts equal to
    /// the base. Seeded by `config.seed`; the same seed gives the same adapter.
    pub fn init(
        config: LoraConfig,
        shapes: &[SiteShape],
        device: &Device,
    ) -> Result<Self, LoraError> {
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        let mut pairs = BTreeMap::new();
        for shape in shapes.iter().filter(|s| config.targets(s.site.target)) {
            let r = config.rank_of(shape.site);
            // kaiming_uniform_(a=√5): gain = √(2/(1+5)), bound = gain·√(3/fan_in) = 1/√fan_in.
            let bound = 1.0 / (shape.in_features as f64).sqrt();
            let a: Vec<f32> = (0..r * shape.in_features)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            let a = Tensor::from_vec(a, (r, shape.in_features), device)?;
            let b = Tensor::zeros((shape.out_features, r), DType::F32, device)?;
            pairs.insert(
                shape.site,
                LoraPair {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scaling: config.scaling_of(shape.site),
                },
            );
        }
        Ok(Self { config, pairs })
    }

    /// An adapter from given tensors keyed by PEFT names (as read from a file). Every site the
    /// config targets must be present with fitting shapes; unknown keys are refused.
    pub fn from_tensors(
        config: LoraConfig,
        shapes: &[SiteShape],
        mut tensors: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, LoraError> {
        config.validate()?;
        let mut pairs = BTreeMap::new();
        for shape in shapes.iter().filter(|s| config.targets(s.site.target)) {
            let take = |tensors: &mut BTreeMap<String, Tensor>, which: char| {
                let key = shape.site.peft_key(which);
                tensors
                    .remove(&key)
                    .ok_or_else(|| LoraError::MissingTensor(key.clone()))
            };
            let a = take(&mut tensors, 'A')?;
            let b = take(&mut tensors, 'B')?;
            let r = config.rank_of(shape.site);
            check_pair_shape(shape, r, a.dims(), b.dims())?;
            let a = a.to_dtype(DType::F32)?.to_device(device)?;
            let b = b.to_dtype(DType::F32)?.to_device(device)?;
            pairs.insert(
                shape.site,
                LoraPair {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scaling: config.scaling_of(shape.site),
                },
            );
        }
        if let Some(key) = tensors.keys().next() {
            return Err(LoraError::UnexpectedTensor(key.clone()));
        }
        Ok(Self { config, pairs })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The trainable pairs, in site order.
    pub fn pairs(&self) -> &BTreeMap<Site, LoraPair> {
        &self.pairs
    }

    /// Every trainable tensor with its PEFT key, in a fixed order (site order, A then B).
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        self.pairs
            .iter()
            .flat_map(|(site, p)| [(site.peft_key('A'), &p.a), (site.peft_key('B'), &p.b)])
            .collect()
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.pairs
            .values()
            .map(|p| p.a.elem_count() + p.b.elem_count())
            .sum()
    }

    /// A view for a training forward pass: the tensors are the `Var`s, so gradients reach them.
    pub fn training_weights(&self) -> LoraWeights {
        self.weights(false, self.config.dropout)
    }

    /// A detached snapshot for sampling: no graph is recorded, and later training does not
    /// change it (`Var::set` replaces the storage the snapshot does not share).
    pub fn sampling_weights(&self) -> Result<LoraWeights, LoraError> {
        let mut w = self.weights(true, 0.0);
        for s in w.sites.values_mut() {
            s.a = s.a.copy()?;
            s.b = s.b.copy()?;
        }
        Ok(w)
    }

    fn weights(&self, detached: bool, dropout: f64) -> LoraWeights {
        let get = |v: &Var| {
            if detached {
                v.as_detached_tensor()
            } else {
                v.as_tensor().clone()
            }
        };
        LoraWeights {
            sites: self
                .pairs
                .iter()
                .map(|(site, p)| {
                    (
                        *site,
                        LoraSiteWeights {
                            a: get(&p.a),
                            b: get(&p.b),
                            scaling: p.scaling,
                        },
                    )
                })
                .collect(),
            dropout,
        }
    }

    /// The dense update `scaling · B·A` (shape `(out, in)`) of a site, for merging.
    pub fn delta(&self, site: Site) -> Result<Option<Tensor>, LoraError> {
        match self.pairs.get(&site) {
            None => Ok(None),
            Some(p) => Ok(Some(
                (p.b.as_tensor().matmul(p.a.as_tensor())? * p.scaling)?,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> Vec<SiteShape> {
        Target::ALL
            .iter()
            .map(|&t| SiteShape {
                site: Site {
                    layer: 0,
                    target: t,
                },
                in_features: 8,
                out_features: 6,
            })
            .collect()
    }

    #[test]
    fn init_is_seeded_and_starts_at_zero_delta() {
        let cfg = LoraConfig {
            rank: 2,
            target_modules: vec![Target::Q, Target::Down],
            seed: 7,
            ..LoraConfig::default()
        };
        let a = LoraAdapter::init(cfg.clone(), &shapes(), &Device::Cpu).unwrap();
        let b = LoraAdapter::init(cfg, &shapes(), &Device::Cpu).unwrap();
        assert_eq!(a.pairs().len(), 2);
        let site = Site {
            layer: 0,
            target: Target::Q,
        };
        let av: Vec<f32> = a.pairs()[&site].a.flatten_all().unwrap().to_vec1().unwrap();
        let bv: Vec<f32> = b.pairs()[&site].a.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(av, bv);
        let bound = 1.0 / 8f32.sqrt();
        assert!(av.iter().all(|x| x.abs() <= bound) && av.iter().any(|&x| x != 0.0));
        let d: Vec<f32> = a
            .delta(site)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(d.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn wrong_shapes_name_the_tensor() {
        let cfg = LoraConfig {
            rank: 2,
            target_modules: vec![Target::Q],
            ..LoraConfig::default()
        };
        let site = Site {
            layer: 0,
            target: Target::Q,
        };
        let mut t = BTreeMap::new();
        t.insert(
            site.peft_key('A'),
            Tensor::zeros((2, 9), DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            site.peft_key('B'),
            Tensor::zeros((6, 2), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = LoraAdapter::from_tensors(cfg, &shapes(), t, &Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("layers.0.self_attn.q_proj.lora_A"),
            "{err}"
        );
    }
}
