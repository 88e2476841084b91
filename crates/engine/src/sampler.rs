//! Sampling: Tinker's `SamplingClient` in process.
//!
//! The prompt is prefilled once; its KV cache is copied to the `n` samples, which then decode
//! in lockstep as one batch, finished sequences leaving the batch. A prompt that extends a
//! sequence this sampler finished earlier (a conversation's next turn) is prefilled from that
//! sequence's keys and values ([`crate::prefix_cache`]); many prompts advance together through
//! `sample_each`. Each token's reported
//! logprob is the model's own (`log_softmax` of the raw logits, before temperature, top-k and
//! top-p), so it agrees with the trainer's `forward` on the same weights — RL's importance
//! ratios depend on that.

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use rand::SeedableRng;
use rayon::prelude::*;
use whet_contract::{
    each_seed, ContractError, ModelInput, SampleResponse, SampledSequence, SamplingClient,
    SamplingParams, Stop, StopReason,
};
use whet_lora::LoraWeights;

use crate::batch::check_tokens;
use crate::model::{KvCache, Layout, Model};
use crate::ops::log_softmax_rows;
use crate::prefix_cache::PrefixCache;

mod pick;
mod prefill;

use crate::EngineError;
use pick::{pick, top_k};

/// Turns token ids back into text (for stop strings).
pub type Detokenize = Arc<dyn Fn(&[u32]) -> String + Send + Sync>;

/// What a sampler needs besides weights.
#[derive(Clone)]
pub struct SamplerOptions {
    /// Tokens that end a sequence by default (EOS, end-of-turn).
    pub eos_token_ids: Vec<u32>,
    /// A detokenizer; stop strings need one.
    pub detokenize: Option<Detokenize>,
    /// Bytes of finished sequences' keys and values kept for prompts that extend them (0: none).
    pub prefix_cache_bytes: usize,
}

/// The default [`SamplerOptions::prefix_cache_bytes`]: 2 GiB, about 45,000 tokens of
/// SmolLM2-135M (46 KB of f32 keys and values per token) — 32 multi-turn episodes of ~1,400
/// tokens each. It is only filled by calls that ask for one completion per prompt.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 2 << 30;

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            eos_token_ids: vec![],
            detokenize: None,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_BYTES,
        }
    }
}

/// A sampler on a base model with an optional adapter snapshot.
pub struct Sampler {
    model: Arc<Model>,
    lora: Option<LoraWeights>,
    options: SamplerOptions,
    prefix: Mutex<PrefixCache>,
}

/// How sequences end.
struct Stops {
    tokens: Vec<u32>,
    strings: Vec<String>,
}

impl Sampler {
    /// A sampler on `model`, with `lora` (detached weights) or none.
    pub fn new(model: Arc<Model>, lora: Option<LoraWeights>, options: SamplerOptions) -> Self {
        let prefix = Mutex::new(PrefixCache::new(options.prefix_cache_bytes));
        Self {
            model,
            lora,
            options,
            prefix,
        }
    }

    fn prompt_tokens(&self, prompt: &ModelInput) -> Result<Vec<u32>, EngineError> {
        let tokens = check_tokens(&prompt.to_ints(), self.model.config.vocab_size, "prompt")?;
        if tokens.is_empty() {
            return Err(EngineError::Invalid {
                field: "prompt".into(),
                message: "is empty".into(),
            });
        }
        let ctx = self.model.config.max_position_embeddings;
        if tokens.len() > ctx {
            return Err(EngineError::Invalid {
                field: "prompt".into(),
                message: format!(
                    "has {} tokens, more than the model's context of {ctx}",
                    tokens.len()
                ),
            });
        }
        Ok(tokens)
    }

    /// Stops for `params.stop`: `None` → EOS; a list → its entries plus EOS; `[]` → none.
    fn stops(&self, stop: &Option<Stop>) -> Result<Stops, EngineError> {
        let eos = self.options.eos_token_ids.clone();
        Ok(match stop {
            None => Stops {
                tokens: eos,
                strings: vec![],
            },
            Some(Stop::Tokens(t)) if t.is_empty() => Stops {
                tokens: vec![],
                strings: vec![],
            },
            Some(Stop::Texts(t)) if t.is_empty() => Stops {
                tokens: vec![],
                strings: vec![],
            },
            Some(Stop::Tokens(t)) => {
                let mut tokens =
                    check_tokens(t, self.model.config.vocab_size, "sampling_params.stop")?;
                tokens.extend(eos);
                Stops {
                    tokens,
                    strings: vec![],
                }
            }
            Some(Stop::Text(s)) => self.string_stops(vec![s.clone()], eos)?,
            Some(Stop::Texts(s)) => self.string_stops(s.clone(), eos)?,
        })
    }

    fn string_stops(&self, strings: Vec<String>, eos: Vec<u32>) -> Result<Stops, EngineError> {
        if self.options.detokenize.is_none() {
            return Err(EngineError::Invalid {
                field: "sampling_params.stop".into(),
                message: "stop strings need the model's tokenizer; this sampler has none".into(),
            });
        }
        if strings.iter().any(String::is_empty) {
            return Err(EngineError::Invalid {
                field: "sampling_params.stop".into(),
                message: "an empty stop string".into(),
            });
        }
        Ok(Stops {
            tokens: eos,
            strings,
        })
    }

    /// Prefills one prompt: its cache and final hidden states.
    fn prefill(&self, tokens: &[u32]) -> Result<(KvCache, Tensor), EngineError> {
        let mut cache = KvCache::new(self.model.config.num_layers);
        let hidden = self.extend(&mut cache, tokens)?;
        Ok((cache, hidden))
    }

    /// Feeds `tokens` to one sequence after what `cache` holds; their final hidden states.
    fn extend(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Tensor, EngineError> {
        self.model.forward_hidden(
            tokens,
            Layout::Cached { batch: 1, cache },
            self.lora.as_ref(),
            None,
        )
    }

    /// `n` completions of each prompt, all decoded as one batch (prompts of different lengths
    /// share it through left-padded, masked caches). Result: per prompt, its `n` sequences.
    pub fn sample_many(
        &self,
        prompts: &[ModelInput],
        n: usize,
        params: &SamplingParams,
    ) -> Result<Vec<Vec<SampledSequence>>, EngineError> {
        crate::in_pool(|| self.sample_batch(prompts, n, params))
    }

    fn sample_batch(
        &self,
        prompts: &[ModelInput],
        n: usize,
        params: &SamplingParams,
    ) -> Result<Vec<Vec<SampledSequence>>, EngineError> {
        let prompts: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.prompt_tokens(p))
            .collect::<Result<_, _>>()?;
        check_params(params)?;
        let prefilled = self.prefill_many(&prompts)?;
        self.decode(&prompts, prefilled, n, params)
    }

    /// The decode loop from prefilled prompts: sequence `p·n + k` is sample `k` of prompt `p`.
    fn decode(
        &self,
        prompts: &[Vec<u32>],
        prefilled: Vec<(KvCache, Vec<f32>)>,
        n: usize,
        params: &SamplingParams,
    ) -> Result<Vec<Vec<SampledSequence>>, EngineError> {
        let stops = self.stops(&params.stop)?;
        let ctx = self.model.config.max_position_embeddings;
        let total = prompts.len() * n;
        let limit: Vec<usize> = (0..total)
            .map(|s| {
                let room = ctx - prompts[s / n.max(1)].len();
                params.max_tokens.unwrap_or(room).min(room)
            })
            .collect();
        let mut seqs: Vec<SampledSequence> = (0..total)
            .map(|_| SampledSequence {
                stop_reason: StopReason::Length,
                tokens: vec![],
                logprobs: vec![],
            })
            .collect();
        // `active[j]` is the sequence of batch row j.
        let mut active: Vec<usize> = (0..total).filter(|&s| limit[s] > 0).collect();
        if !active.is_empty() {
            let base_seed = params.seed.unwrap_or_else(rand::random);
            // One random stream per sequence, ordered like the batch rows (`active`).
            let mut rngs: Vec<rand::rngs::StdRng> = active
                .iter()
                .map(|&i| rand::rngs::StdRng::seed_from_u64(each_seed(base_seed, i)))
                .collect();
            let (caches, firsts): (Vec<KvCache>, Vec<Vec<f32>>) = prefilled.into_iter().unzip();
            // Room for the whole completion up front (bounded: beyond it the buffers double).
            let extra = active
                .iter()
                .map(|&s| limit[s])
                .max()
                .unwrap_or(0)
                .min(1024);
            let mut cache = KvCache::stack_left_padded(&caches, extra)?;
            drop(caches);
            let rows_of: Vec<u32> = active.iter().map(|&s| (s / n) as u32).collect();
            cache.select(&rows_of)?;
            let mut rows: Vec<Vec<f32>> = active.iter().map(|&s| firsts[s / n].clone()).collect();
            loop {
                let mut next = Vec::with_capacity(active.len());
                let mut keep = Vec::with_capacity(active.len());
                // Rows are independent: pick their tokens in parallel.
                let picks: Vec<(u32, f32)> = rows
                    .par_iter()
                    .zip(rngs.par_iter_mut())
                    .map(|(row, rng)| pick(row, params, rng))
                    .collect();
                for (j, &s) in active.iter().enumerate() {
                    let (tok, logprob) = picks[j];
                    let seq = &mut seqs[s];
                    seq.tokens.push(tok as i64);
                    seq.logprobs.push(logprob);
                    if stops.tokens.contains(&tok) || self.hits_stop_string(seq, &stops) {
                        seq.stop_reason = StopReason::Stop;
                    } else if seq.tokens.len() < limit[s] {
                        next.push(tok);
                        keep.push(j as u32);
                    }
                }
                if n == 1 && self.prefix().enabled() {
                    self.store_finished(prompts, &seqs, &active, &keep, &cache)?;
                }
                if next.is_empty() {
                    break;
                }
                if keep.len() != active.len() {
                    cache.select(&keep)?;
                    active = keep.iter().map(|&j| active[j as usize]).collect();
                    let mut old: Vec<Option<rand::rngs::StdRng>> =
                        rngs.into_iter().map(Some).collect();
                    rngs = keep
                        .iter()
                        .filter_map(|&j| old[j as usize].take())
                        .collect();
                }
                let hidden = self.model.forward_hidden(
                    &next,
                    Layout::Cached {
                        batch: next.len(),
                        cache: &mut cache,
                    },
                    self.lora.as_ref(),
                    None,
                )?;
                rows = self.model.logits(&hidden)?.to_vec2()?;
            }
        }
        let mut out: Vec<Vec<SampledSequence>> = Vec::with_capacity(prompts.len());
        let mut it = seqs.into_iter();
        for _ in prompts {
            out.push(it.by_ref().take(n).collect());
        }
        Ok(out)
    }

    fn run(
        &self,
        prompt: &ModelInput,
        n: usize,
        params: &SamplingParams,
        prompt_logprobs: bool,
        topk_prompt: usize,
    ) -> Result<SampleResponse, EngineError> {
        let tokens = self.prompt_tokens(prompt)?;
        check_params(params)?;
        if !prompt_logprobs && topk_prompt == 0 {
            // No prompt logprobs wanted: the prompt may resume from a stored prefix.
            let prefilled = self.prefill_many(std::slice::from_ref(&tokens))?;
            let mut seqs = self.decode(&[tokens], prefilled, n, params)?;
            return Ok(SampleResponse {
                sequences: seqs.pop().unwrap_or_default(),
                prompt_logprobs: None,
                topk_prompt_logprobs: None,
            });
        }
        let (cache, hidden) = self.prefill(&tokens)?;
        let l = tokens.len();
        let (prompt_lp, topk) = if (prompt_logprobs || topk_prompt > 0) && l > 1 {
            let h = hidden.narrow(0, 0, l - 1)?;
            let lp: Vec<f32> = self.model.target_logprobs(&h, &tokens[1..])?.to_vec1()?;
            let mut out = vec![None];
            out.extend(lp.into_iter().map(Some));
            let topk = if topk_prompt > 0 {
                let rows = log_softmax_rows(&self.model.logits(&h)?)?;
                let mut t = vec![None];
                t.extend(rows.iter().map(|r| Some(top_k(r, topk_prompt))));
                Some(t)
            } else {
                None
            };
            (Some(out), topk)
        } else if prompt_logprobs || topk_prompt > 0 {
            (Some(vec![None]), (topk_prompt > 0).then(|| vec![None]))
        } else {
            (None, None)
        };
        let last = self.model.logits(&hidden.narrow(0, l - 1, 1)?)?;
        let first = last.squeeze(0)?.to_vec1::<f32>()?;
        let mut seqs = self.decode(&[tokens], vec![(cache, first)], n, params)?;
        Ok(SampleResponse {
            sequences: seqs.pop().unwrap_or_default(),
            prompt_logprobs: if prompt_logprobs { prompt_lp } else { None },
            topk_prompt_logprobs: topk,
        })
    }

    fn hits_stop_string(&self, seq: &SampledSequence, stops: &Stops) -> bool {
        if stops.strings.is_empty() {
            return false;
        }
        let Some(decode) = &self.options.detokenize else {
            return false;
        };
        let ids: Vec<u32> = seq.tokens.iter().map(|&t| t as u32).collect();
        let text = decode(&ids);
        stops.strings.iter().any(|s| text.contains(s.as_str()))
    }
}

fn check_params(p: &SamplingParams) -> Result<(), EngineError> {
    let bad = |field: &str, message: String| {
        Err(EngineError::Invalid {
            field: format!("sampling_params.{field}"),
            message,
        })
    };
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return bad("temperature", format!("{} must be >= 0", p.temperature));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return bad("top_p", format!("{} must be in (0, 1]", p.top_p));
    }
    if p.top_k < -1 {
        return bad(
            "top_k",
            format!("{} must be -1 (no limit) or positive", p.top_k),
        );
    }
    Ok(())
}

impl SamplingClient for Sampler {
    fn sample(
        &self,
        prompt: &ModelInput,
        num_samples: usize,
        params: &SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: usize,
    ) -> Result<SampleResponse, ContractError> {
        Ok(crate::in_pool(|| {
            self.run(
                prompt,
                num_samples,
                params,
                include_prompt_logprobs,
                topk_prompt_logprobs,
            )
        })?)
    }

    fn compute_logprobs(&self, prompt: &ModelInput) -> Result<Vec<Option<f32>>, ContractError> {
        crate::in_pool(|| self.logprobs_of(prompt))
    }

    /// All prompts decoded as one batch, each prefilled from the longest sequence of this
    /// sampler's it extends; row `i` is seeded with `each_seed(seed, i)`, as the contract's
    /// default does prompt by prompt.
    fn sample_each(
        &self,
        prompts: &[ModelInput],
        params: &SamplingParams,
    ) -> Result<Vec<SampledSequence>, ContractError> {
        if prompts.is_empty() {
            return Ok(vec![]);
        }
        let out = crate::in_pool(|| self.sample_batch(prompts, 1, params))?;
        Ok(out.into_iter().flatten().collect())
    }
}

impl Sampler {
    fn logprobs_of(&self, prompt: &ModelInput) -> Result<Vec<Option<f32>>, ContractError> {
        let tokens = self.prompt_tokens(prompt).map_err(ContractError::from)?;
        let l = tokens.len();
        let mut out = vec![None];
        if l > 1 {
            let hidden = self
                .model
                .forward_hidden(
                    &tokens[..l - 1],
                    Layout::Packed(&[l - 1]),
                    self.lora.as_ref(),
                    None,
                )
                .map_err(ContractError::from)?;
            let lp: Vec<f32> = self
                .model
                .target_logprobs(&hidden, &tokens[1..])
                .and_then(|t| Ok(t.to_vec1()?))
                .map_err(ContractError::from)?;
            out.extend(lp.into_iter().map(Some));
        }
        Ok(out)
    }
}
