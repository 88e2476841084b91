//! Prefilling from stored keys and values: the sampler's side of [`crate::prefix_cache`].

use candle_core::Tensor;
use whet_contract::SampledSequence;

use super::Sampler;
use crate::model::{KvCache, Layout};
use crate::prefix_cache::{PrefixCache, MIN_REUSE};
use crate::EngineError;

impl Sampler {
    /// Prefills prompts: each one that extends a stored sequence from that sequence's keys
    /// and values (only its new tokens go through the model), the others together in one
    /// packed pass. Result: per prompt, its single-row cache and the logits after its last
    /// token.
    pub(super) fn prefill_many(
        &self,
        prompts: &[Vec<u32>],
    ) -> Result<Vec<(KvCache, Vec<f32>)>, EngineError> {
        self.prefill_shared_prefix(prompts)?;
        let mut out: Vec<Option<(KvCache, Vec<f32>)>> = (0..prompts.len()).map(|_| None).collect();
        let mut fresh = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let hit = self.prefix().lookup(prompt)?;
            let Some(mut cache) = hit else {
                fresh.push(i);
                continue;
            };
            let reused = cache.len;
            let hidden = self.extend(&mut cache, &prompt[reused..])?;
            let last = hidden.narrow(0, prompt.len() - reused - 1, 1)?;
            let first = self.model.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?;
            out[i] = Some((cache, first));
        }
        if !fresh.is_empty() {
            // One packed pass; each prompt keeps its own cache.
            let lens: Vec<usize> = fresh.iter().map(|&i| prompts[i].len()).collect();
            let flat: Vec<u32> = fresh
                .iter()
                .flat_map(|&i| prompts[i].iter().copied())
                .collect();
            let mut caches = Vec::new();
            let hidden = self.model.forward_hidden(
                &flat,
                Layout::Prefill {
                    lens: &lens,
                    caches: &mut caches,
                },
                self.lora.as_ref(),
                None,
            )?;
            let last: Vec<u32> = lens
                .iter()
                .scan(0usize, |end, &l| {
                    *end += l;
                    Some((*end - 1) as u32)
                })
                .collect();
            let rows = hidden.index_select(&Tensor::new(last.as_slice(), hidden.device())?, 0)?;
            let firsts: Vec<Vec<f32>> = self.model.logits(&rows)?.to_vec2()?;
            for ((&i, cache), first) in fresh.iter().zip(caches).zip(firsts) {
                out[i] = Some((cache, first));
            }
        }
        tracing::debug!(
            prompts = prompts.len(),
            resumed = prompts.len() - fresh.len(),
            prompt_tokens = prompts.iter().map(Vec::len).sum::<usize>(),
            reused_tokens = self.prefix().reused_tokens,
            "prefilled"
        );
        out.into_iter()
            .map(|p| p.ok_or_else(|| EngineError::Internal("a prompt was not prefilled".into())))
            .collect()
    }

    /// Many new conversations start alike (a world's system message and tool schemas, a
    /// few hundred tokens): their common prefix is prefilled once and stored, so each of them
    /// then prefills only its own tokens.
    fn prefill_shared_prefix(&self, prompts: &[Vec<u32>]) -> Result<(), EngineError> {
        let (Some(first), true) = (prompts.first(), prompts.len() > 1) else {
            return Ok(());
        };
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
        let shared = prompts[1..]
            .iter()
            .map(|p| first.iter().zip(p).take_while(|(a, b)| a == b).count())
            .min()
            .unwrap_or(0)
            .min(shortest.saturating_sub(1));
        if shared < MIN_REUSE
            || !self.prefix().enabled()
            || self.prefix().covered(&first[..shared]) >= shared
        {
            return Ok(());
        }
        let mut cache = KvCache::new(self.model.config.num_layers);
        self.extend(&mut cache, &first[..shared])?;
        self.prefix().insert_row(&first[..shared], &cache, 0)
    }

    /// Prompt tokens this sampler did not recompute because a stored sequence held their keys
    /// and values.
    pub fn reused_prompt_tokens(&self) -> usize {
        self.prefix().reused_tokens
    }

    /// The store of finished sequences (a poisoned lock still holds consistent entries: every
    /// change to the store is made whole before it returns).
    pub(super) fn prefix(&self) -> std::sync::MutexGuard<'_, PrefixCache> {
        self.prefix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores the batch rows that just finished (those of `active` not in `keep`): a row holds
    /// the keys and values of its prompt and of every sampled token but the last (which ended
    /// it and was never fed back). Only one-completion-per-prompt calls store: their next
    /// prompt, if any, continues that one completion.
    pub(super) fn store_finished(
        &self,
        prompts: &[Vec<u32>],
        seqs: &[SampledSequence],
        active: &[usize],
        keep: &[u32],
        cache: &KvCache,
    ) -> Result<(), EngineError> {
        let mut kept = keep.iter().peekable();
        let mut store = self.prefix();
        for (j, &s) in active.iter().enumerate() {
            if kept.peek() == Some(&&(j as u32)) {
                kept.next();
                continue;
            }
            let seq = &seqs[s];
            let mut tokens = prompts[s].clone();
            tokens.extend(seq.tokens[..seq.tokens.len() - 1].iter().map(|&t| t as u32));
            store.insert_row(&tokens, cache, j)?;
        }
        Ok(())
    }
}
