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
use crate::loader::LoadedWeights;
use crate::ops;
use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

/// A frozen projection: `W: (out, in)` and an optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight.
    pub weight: Tensor,
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

/// A loaded base model: frozen f32 weights and the config. Shared by every session and
/// sampler on it (base weights are loaded once).
#[derive(Debug)]
pub struct Model {
    /// The shape.
    pub config: ModelConfig,
    /// Token embedding `(vocab, hidden)`.
    pub embed: Tensor,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final RMSNorm.
    pub norm: Tensor,
    /// Unembedding `(vocab, hidden)`; the embedding itself when tied.
    pub lm_head: Tensor,
    inv_freq: Vec<f32>,
    device: Device,
}

/// Per-layer key/value cache of a batch of sequences. Rows may hold prompts of different
/// lengths: row `i` is left-padded by `pad[i]` slots, which are masked out and do not count
/// as positions.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `(batch, kv_heads, slots, head_dim)`.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Slots per row (padding included).
    pub len: usize,
    /// Left padding per row; empty means none.
    pub pad: Vec<usize>,
}

impl KvCache {
    /// Keeps only the listed rows of the batch (in that order).
    pub fn select(&mut self, keep: &[u32]) -> Result<()> {
        if !self.pad.is_empty() {
            self.pad = keep.iter().map(|&i| self.pad[i as usize]).collect();
        }
        let Some(Some((k0, _))) = self.layers.first() else {
            return Ok(());
        };
        let idx = Tensor::new(keep, k0.device())?;
        for entry in self.layers.iter_mut().flatten() {
            *entry = (
                entry.0.index_select(&idx, 0)?,
                entry.1.index_select(&idx, 0)?,
            );
        }
        Ok(())
    }

    /// Stacks single-row caches of different lengths into one batch, left-padding the
    /// shorter ones with zeros (masked by `pad`).
    pub fn stack_left_padded(caches: &[KvCache]) -> Result<KvCache> {
        let len = caches.iter().map(|c| c.len).max().unwrap_or(0);
        let pad: Vec<usize> = caches.iter().map(|c| len - c.len).collect();
        let layers = caches.first().map(|c| c.layers.len()).unwrap_or(0);
        let mut out = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for (c, &p) in caches.iter().zip(&pad) {
                let Some((k, v)) = &c.layers[l] else {
                    return Err(EngineError::Internal("stacking an empty cache".into()));
                };
                let padded = |t: &Tensor| -> Result<Tensor> {
                    if p == 0 {
                        return Ok(t.clone());
                    }
                    let (b, h, _, d) = t.dims4()?;
                    let z = Tensor::zeros((b, h, p, d), t.dtype(), t.device())?;
                    Ok(Tensor::cat(&[&z, t], 2)?)
                };
                ks.push(padded(k)?);
                vs.push(padded(v)?);
            }
            out.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
        }
        Ok(KvCache {
            layers: out,
            len,
            pad: if pad.iter().any(|&p| p > 0) {
                pad
            } else {
                vec![]
            },
        })
    }
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
    /// Builds the model from loaded weights, checking every tensor's shape against the config.
    /// Tensors the model does not use are refused, so a wrong architecture is caught here.
    pub fn from_weights(w: LoadedWeights, device: &Device) -> Result<Self> {
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
                Ok(Linear { weight, bias })
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
                take(&mut tensors, "lm_head.weight", &[c.vocab_size, h])?
            }
            // A tied checkpoint may still carry a copy of the embedding; it is the same matrix.
            _ if c.tie_word_embeddings => embed.clone(),
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
        Ok(Self {
            config: c,
            embed: embed.to_device(device)?,
            layers,
            norm,
            lm_head,
            inv_freq,
            device: device.clone(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every projection a LoRA can attach to, with its shape.
    pub fn site_shapes(&self) -> Vec<SiteShape> {
        let mut out = Vec::new();
        for (layer, l) in self.layers.iter().enumerate() {
            for (k, &target) in Target::ALL.iter().enumerate() {
                let (out_features, in_features) = l.proj[k].weight.dims2().unwrap_or((0, 0));
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
            return kernels::linear(x, &lin.weight, lin.bias.as_ref(), None);
        };
        match dropout {
            // Dropout masks the adapter's input only, so the low-rank path is composed apart.
            Some((p, rng)) if p > 0.0 => {
                let y = kernels::linear(x, &lin.weight, lin.bias.as_ref(), None)?;
                let mask = rng.mask(x.dims2()?, p, x.device())?;
                let low =
                    ((x * mask)?.matmul(&site.a.t()?)? * site.scaling)?.matmul(&site.b.t()?)?;
                Ok((y + low)?)
            }
            _ => kernels::linear(
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
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
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
                        layers: vec![None; c.num_layers],
                        len,
                        pad: vec![],
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
                    cache.layers = vec![None; c.num_layers];
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
                    let (k_all, v_all) = match cache.layers[li].take() {
                        Some((pk, pv)) => {
                            (Tensor::cat(&[&pk, &kb], 2)?, Tensor::cat(&[&pv, &vb], 2)?)
                        }
                        None => (kb, vb),
                    };
                    let o = self.attend(&qb, &k_all, &v_all, offset, &cache.pad)?;
                    cache.layers[li] = Some((k_all, v_all));
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

    /// Causal attention of `q: (B, H, T, D)` over `k, v: (B, Hkv, S, D)`, where query `t` sits
    /// at slot `offset + t` and key `s` at slot `s`; rows are left-padded by `pad`. Query head
    /// `h` uses kv head `h / (H / Hkv)` (grouped-query attention, no copies of the keys).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
        pad: &[usize],
    ) -> Result<Tensor> {
        kernels::attention(
            q,
            k,
            v,
            AttnMask {
                offset,
                window: self.config.sliding_window,
                pad: pad.to_vec(),
            },
        )
    }

    /// Logits `(tokens, vocab)` of final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        kernels::linear(hidden, &self.lm_head, None, None)
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
