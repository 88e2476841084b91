//! The Llama-family decoder, with LoRA at each projection.
//!
//! The forward pass is stateless: the adapter view and, for sampling, the KV cache are passed
//! in. Two layouts share one code path:
//! - **packed** (training, scoring): independent sequences concatenated on the token axis,
//!   each attending causally to itself only, positions restarting at 0 — no padding is ever
//!   computed on, and packed rows never attend across boundaries;
//! - **cached** (sampling): `batch` sequences of equal length, each appending `new` tokens to
//!   its KV cache.
//!
//! Activations are `(tokens, hidden)` throughout; heads are split only inside attention.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use whet_lora::{LoraSiteWeights, LoraWeights, Site, SiteShape, Target};

use crate::config::ModelConfig;
use crate::kernels::{self, AttnMask};
use crate::kv_cache;
pub use crate::kv_cache::KvCache;
use crate::linear::{self, Frozen, Precision};
use crate::loader::LoadedWeights;
use crate::ops;
use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

/// A frozen projection: `W: (out, in)` and an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, in the model's precision.
    pub weight: Frozen,
    /// The bias, if the model has one.
    pub bias: Option<Tensor>,
}

/// The frozen weights of one decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// RMSNorm before attention.
    pub input_norm: Tensor,
    /// RMSNorm before the MLP.
    pub post_attention_norm: Tensor,
    /// q, k, v, o, gate, up, down, in [`Target::ALL`] order.
    pub proj: [Linear; 7],
    /// Per-head RMSNorm weights on queries and keys (Qwen3).
    pub qk_norm: Option<(Tensor, Tensor)>,
}

impl Layer {
    fn linear(&self, t: Target) -> &Linear {
        &self.proj[Target::ALL.iter().position(|&x| x == t).unwrap_or(0)]
    }
}

/// A loaded base model: frozen weights and the config. Shared by every session and sampler on
/// it (base weights are loaded once). The projections and the unembedding compute in the
/// model's [`Precision`]; everything else is f32.
#[derive(Debug)]
pub struct Model {
    /// The shape.
    pub config: ModelConfig,
    /// Token embedding `(vocab, hidden)`, in the model's precision (one matrix with the
    /// unembedding when tied).
    pub embed: Frozen,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final RMSNorm.
    pub norm: Tensor,
    /// Unembedding `(vocab, hidden)`; the embedding's values when tied.
    pub lm_head: Frozen,
    precision: Precision,
    inv_freq: Vec<f32>,
    device: Device,
}

/// How the tokens of one forward pass are laid out.
pub enum Layout<'a> {
    /// Independent sequences of these lengths, concatenated.
    Packed(&'a [usize]),
    /// Packed sequences whose keys and values are kept: one single-row cache per sequence,
    /// ready to decode from (prefilling many prompts in one pass).
    Prefill {
        /// Sequence lengths.
        lens: &'a [usize],
        /// Filled with one cache per sequence.
        caches: &'a mut Vec<KvCache>,
    },
    /// `batch` sequences, each adding `tokens / batch` new tokens to the cache.
    Cached {
        /// Number of sequences.
        batch: usize,
        /// Their shared cache.
        cache: &'a mut KvCache,
    },
}

/// A seeded source of LoRA dropout masks; `counter` advances with every mask so a resumed
/// run draws the same masks as one that never stopped.
#[derive(Debug, Clone)]
pub struct DropoutRng {
    /// The adapter's seed.
    pub seed: u64,
    /// Masks drawn so far.
    pub counter: u64,
}

impl DropoutRng {
    fn mask(&mut self, shape: (usize, usize), p: f64, device: &Device) -> Result<Tensor> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        self.counter += 1;
        let keep = (1.0 / (1.0 - p)) as f32;
        let m: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        Ok(Tensor::from_vec(m, shape, device)?)
    }
}

fn take(t: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<Tensor> {
    let w = t
        .remove(name)
        .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
    if w.dims() != shape {
        return Err(EngineError::Shape {
            tensor: name.to_string(),
            expected: shape.to_vec(),
            found: w.dims().to_vec(),
        });
    }
    Ok(w)
}

impl Model {
    /// Builds the model from loaded weights in f32 (see [`Model::from_weights_in`]).
    pub fn from_weights(w: LoadedWeights, device: &Device) -> Result<Self> {
        Self::from_weights_in(w, device, Precision::F32)
    }

    /// Builds the model from loaded weights, checking every tensor's shape against the config.
    /// Tensors the model does not use are refused, so a wrong architecture is caught here.
    /// The projections and the unembedding are converted to `precision`.
    pub fn from_weights_in(
        w: LoadedWeights,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let LoadedWeights {
            config: c,
            mut tensors,
        } = w;
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let q = c.num_heads * hd;
        let kv = c.num_kv_heads * hd;
        let embed = take(
            &mut tensors,
            "model.embed_tokens.weight",
            &[c.vocab_size, h],
        )?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                let weight = take(&mut tensors, &format!("{p}.{name}.weight"), &[out, inp])?;
                let bias_name = format!("{p}.{name}.bias");
                let bias = if tensors.contains_key(&bias_name) {
                    Some(take(&mut tensors, &bias_name, &[out])?)
                } else {
                    None
                };
                Ok(Linear {
                    weight: Frozen::new(weight, precision)?,
                    bias,
                })
            };
            let proj = [
                lin("self_attn.q_proj", q, h)?,
                lin("self_attn.k_proj", kv, h)?,
                lin("self_attn.v_proj", kv, h)?,
                lin("self_attn.o_proj", h, q)?,
                lin("mlp.gate_proj", i, h)?,
                lin("mlp.up_proj", i, h)?,
                lin("mlp.down_proj", h, i)?,
            ];
            let qk_norm = if c.qk_norm {
                Some((
                    take(&mut tensors, &format!("{p}.self_attn.q_norm.weight"), &[hd])?,
                    take(&mut tensors, &format!("{p}.self_attn.k_norm.weight"), &[hd])?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                input_norm: take(&mut tensors, &format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_norm: take(
                    &mut tensors,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                proj,
                qk_norm,
            });
        }
        let norm = take(&mut tensors, "model.norm.weight", &[h])?;
        let lm_head = match tensors.remove("lm_head.weight") {
            Some(t) if !c.tie_word_embeddings => {
                tensors.insert("lm_head.weight".into(), t);
                Some(take(&mut tensors, "lm_head.weight", &[c.vocab_size, h])?)
            }
            // A tied checkpoint may still carry a copy of the embedding; it is the same matrix.
            _ if c.tie_word_embeddings => None,
            _ => return Err(EngineError::MissingTensor("lm_head.weight".into())),
        };
        // Non-persistent buffers some exporters leave behind are harmless.
        tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if let Some(name) = tensors.keys().min() {
            return Err(EngineError::UnexpectedTensor(format!(
                "{name} (not part of a {:?} model with this config)",
                c.architecture
            )));
        }
        let inv_freq = c.rope_inv_freq();
        let embed = Frozen::new(embed.to_device(device)?, precision)?;
        Ok(Self {
            config: c,
            lm_head: match lm_head {
                Some(w) => Frozen::new(w, precision)?,
                None => embed.clone(),
            },
            embed,
            layers,
            norm,
            precision,
            inv_freq,
            device: device.clone(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The precision the projections compute in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Every projection a LoRA can attach to, with its shape.
    pub fn site_shapes(&self) -> Vec<SiteShape> {
        let mut out = Vec::new();
        for (layer, l) in self.layers.iter().enumerate() {
            for (k, &target) in Target::ALL.iter().enumerate() {
                let (out_features, in_features) = l.proj[k].weight.dims();
                out.push(SiteShape {
                    site: Site { layer, target },
                    in_features,
                    out_features,
                });
            }
        }
        out
    }

    /// A projection with its LoRA: `x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`.
    fn project(
        &self,
        x: &Tensor,
        lin: &Linear,
        lora: Option<&LoraSiteWeights>,
        dropout: Option<(f64, &mut DropoutRng)>,
    ) -> Result<Tensor> {
        let Some(site) = lora else {
            return linear::linear(x, &lin.weight, lin.bias.as_ref(), None);
        };
        match dropout {
            // Dropout masks the adapter's input only, so the low-rank path is composed apart.
            Some((p, rng)) if p > 0.0 => {
                let y = linear::linear(x, &lin.weight, lin.bias.as_ref(), None)?;
                let mask = rng.mask(x.dims2()?, p, x.device())?;
                let low =
                    ((x * mask)?.matmul(&site.a.t()?)? * site.scaling)?.matmul(&site.b.t()?)?;
                Ok((y + low)?)
            }
            _ => linear::linear(
                x,
                &lin.weight,
                lin.bias.as_ref(),
                Some((&site.a, &site.b, site.scaling)),
            ),
        }
    }

    /// Runs the decoder over `tokens` and returns the final-normed hidden states
    /// `(tokens, hidden)`. Token ids must be validated by the caller.
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        layout: Layout<'_>,
        lora: Option<&LoraWeights>,
        mut dropout: Option<&mut DropoutRng>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = tokens.len();
        let mut x = self.embed.rows(tokens)?;
        // Positions: restart per packed sequence; continue the cache otherwise.
        let (positions, mut layout) = match layout {
            Layout::Packed(lens) => {
                let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
                (pos, Layout::Packed(lens))
            }
            Layout::Prefill { lens, caches } => {
                let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
                *caches = lens
                    .iter()
                    .map(|&len| KvCache {
                        len,
                        ..KvCache::new(c.num_layers)
                    })
                    .collect();
                (pos, Layout::Prefill { lens, caches })
            }
            Layout::Cached { batch, cache } => {
                if batch == 0 || !n.is_multiple_of(batch) {
                    return Err(EngineError::Internal(format!(
                        "{n} tokens for a batch of {batch}"
                    )));
                }
                let new = n / batch;
                let pos: Vec<u32> = (0..batch)
                    .flat_map(|row| {
                        let start = (cache.len - cache.pad.get(row).copied().unwrap_or(0)) as u32;
                        start..start + new as u32
                    })
                    .collect();
                if cache.layers.len() != c.num_layers {
                    *cache = KvCache::new(c.num_layers);
                }
                (pos, Layout::Cached { batch, cache })
            }
        };
        if positions.len() != n {
            return Err(EngineError::Internal(format!(
                "layout covers {} tokens, got {n}",
                positions.len()
            )));
        }
        let (cos, sin) = ops::rope_tables(&self.inv_freq, &positions, &self.device)?;
        let p = lora.map(|l| l.dropout).unwrap_or(0.0);
        for (li, layer) in self.layers.iter().enumerate() {
            let site = |t: Target| lora.and_then(|l| l.site(li, t));
            let mut proj = |x: &Tensor, t: Target| {
                let d = dropout.as_deref_mut().map(|r| (p, r));
                self.project(x, layer.linear(t), site(t), d)
            };
            // Attention block.
            let h = kernels::rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let q = proj(&h, Target::Q)?.reshape((n, c.num_heads, c.head_dim))?;
            let k = proj(&h, Target::K)?.reshape((n, c.num_kv_heads, c.head_dim))?;
            let v = proj(&h, Target::V)?.reshape((n, c.num_kv_heads, c.head_dim))?;
            let (q, k) = match &layer.qk_norm {
                Some((qn, kn)) => (
                    kernels::rms_norm(&q, qn, c.rms_norm_eps)?,
                    kernels::rms_norm(&k, kn, c.rms_norm_eps)?,
                ),
                None => (q, k),
            };
            let q = kernels::rope(&q, &cos, &sin)?;
            let k = kernels::rope(&k, &cos, &sin)?;
            let attn = match &mut layout {
                Layout::Packed(lens) => {
                    kernels::packed_attention(&q, &k, &v, lens, c.sliding_window)?
                }
                Layout::Prefill { lens, caches } => {
                    let mut start = 0;
                    for (&len, cache) in lens.iter().zip(caches.iter_mut()) {
                        // (len, Hkv, D) → (1, Hkv, len, D), the cache layout.
                        let seq = |t: &Tensor| -> Result<Tensor> {
                            Ok(t.narrow(0, start, len)?
                                .transpose(0, 1)?
                                .unsqueeze(0)?
                                .contiguous()?)
                        };
                        cache.layers[li] = Some((seq(&k)?, seq(&v)?));
                        start += len;
                    }
                    kernels::packed_attention(&q, &k, &v, lens, c.sliding_window)?
                }
                Layout::Cached { batch, cache } => {
                    let b = *batch;
                    let new = n / b;
                    let split = |t: &Tensor, heads: usize| -> Result<Tensor> {
                        Ok(t.reshape((b, new, heads, c.head_dim))?
                            .transpose(1, 2)?
                            .contiguous()?)
                    };
                    let (qb, kb, vb) = (
                        split(&q, c.num_heads)?,
                        split(&k, c.num_kv_heads)?,
                        split(&v, c.num_kv_heads)?,
                    );
                    let offset = cache.len;
                    let (kc, vc) = cache.append(li, &kb, &vb)?;
                    let keys = offset + new;
                    let o = if new == 1 {
                        // Decoding: one query per row, over the cache where it lies.
                        kv_cache::decode_attention(&qb, &kc, &vc, keys, self.mask(0, &cache.pad))?
                    } else {
                        let used = |t: &Tensor| t.narrow(2, 0, keys);
                        kernels::attention(
                            &qb,
                            &used(&kc)?,
                            &used(&vc)?,
                            self.mask(offset, &cache.pad),
                        )?
                    };
                    o.transpose(1, 2)?.reshape((n, c.num_heads, c.head_dim))?
                }
            };
            let attn = attn.reshape((n, c.num_heads * c.head_dim))?;
            x = (x + proj(&attn, Target::O)?)?;
            // MLP block: down(silu(gate(h)) · up(h)).
            let h = kernels::rms_norm(&x, &layer.post_attention_norm, c.rms_norm_eps)?;
            let g = proj(&h, Target::Gate)?;
            let u = proj(&h, Target::Up)?;
            x = (x + proj(&kernels::swiglu(&g, &u)?, Target::Down)?)?;
        }
        if let Layout::Cached { batch, cache } = layout {
            cache.len += n / batch;
        }
        kernels::rms_norm(&x, &self.norm, c.rms_norm_eps)
    }

    /// The attention mask of cached decoding: query `t` sits at slot `offset + t`, key `s` at
    /// slot `s`; rows are left-padded by `pad`.
    fn mask(&self, offset: usize, pad: &[usize]) -> AttnMask {
        AttnMask {
            offset,
            window: self.config.sliding_window,
            pad: pad.to_vec(),
        }
    }

    /// Logits `(tokens, vocab)` of final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear::linear(hidden, &self.lm_head, None, None)
    }

    /// Logprobs of `targets` (one per row of `hidden`).
    pub fn target_logprobs(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        // Chunk the unembedding so the (tokens, vocab) logits of one chunk at a time are alive
        // in the forward pass (the graph still keeps each chunk's logits for the backward).
        const CHUNK: usize = 1024;
        let n = hidden.dim(0)?;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let logits = self.logits(&hidden.narrow(0, start, len)?)?;
            parts.push(ops::target_logprobs(&logits, &targets[start..start + len])?);
            start += len;
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        })
    }
}
