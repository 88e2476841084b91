//! Keys and values kept across sampling calls, so a prompt that extends an earlier one is
//! prefilled from where that one ended.
//!
//! Conversations advance a turn at a time: a world episode's next prompt is the previous
//! prompt, the completion sampled for it, the world's answer and the next generation header.
//! Re-reading the whole conversation every turn costs a forward pass over hundreds of tokens
//! (the tool schemas of the system message alone are ~400 for the vault world) to produce
//! keys and values the sampler computed moments ago. A sampler keeps the finished sequences'
//! caches here, bounded in bytes and evicted least recently used first, and a new prompt
//! starts from the longest stored prefix it shares — the same idea as vLLM's prefix caching,
//! at the granularity of tokens rather than blocks.
//!
//! The stored caches belong to one sampler and so to one set of weights: a sampler never
//! changes its adapter, so an entry can never hold keys of other weights.

use candle_core::Tensor;

use crate::kv_cache::KvCache;
use crate::EngineError;

/// Below this many shared tokens a lookup is not worth its copy.
pub(crate) const MIN_REUSE: usize = 16;

/// One stored sequence: its tokens and, per layer, keys and values `(1, kv_heads, len,
/// head_dim)` of exactly those tokens.
struct Entry {
    tokens: Vec<u32>,
    layers: Vec<(Tensor, Tensor)>,
    bytes: usize,
    used_at: u64,
}

/// The store of one sampler.
pub(crate) struct PrefixCache {
    budget: usize,
    used: usize,
    clock: u64,
    entries: Vec<Entry>,
    /// Prompt tokens that lookups served from the store (not recomputed), over the store's life.
    pub(crate) reused_tokens: usize,
}

impl PrefixCache {
    /// A store holding at most `budget` bytes of keys and values (0 turns it off).
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            clock: 0,
            entries: vec![],
            reused_tokens: 0,
        }
    }

    /// Whether it stores anything at all.
    pub(crate) fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// A fresh single-row cache of the longest stored prefix of `prompt` — at most
    /// `prompt.len() − 1` tokens, so at least one token is left to prefill and give the first
    /// logits — or `None` when no entry shares [`MIN_REUSE`] tokens with it. The caller owns
    /// the copy (caches are appended to in place, so none may share a stored buffer).
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Result<Option<KvCache>, EngineError> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)));
        let Some((i, n)) = best.filter(|&(_, n)| n >= MIN_REUSE) else {
            return Ok(None);
        };
        self.clock += 1;
        self.reused_tokens += n;
        let entry = &mut self.entries[i];
        entry.used_at = self.clock;
        // `force_contiguous`, not `copy`: candle's `copy` clones the whole underlying storage
        // and keeps the view's layout.
        let copy = |t: &Tensor| -> Result<Tensor, EngineError> {
            Ok(t.narrow(2, 0, n)?.force_contiguous()?)
        };
        let layers = entry
            .layers
            .iter()
            .map(|(k, v)| Ok(Some((copy(k)?, copy(v)?))))
            .collect::<Result<_, EngineError>>()?;
        Ok(Some(KvCache {
            layers,
            len: n,
            pad: vec![],
        }))
    }

    /// How many leading tokens of `tokens` the best stored entry holds.
    pub(crate) fn covered(&self, tokens: &[u32]) -> usize {
        self.entries
            .iter()
            .map(|e| common_prefix(&e.tokens, tokens))
            .max()
            .unwrap_or(0)
    }

    /// Stores row `row` of `cache`, which holds the keys and values of `tokens` (after the
    /// row's left padding). An entry that `tokens` extends is dropped (the new one covers
    /// it); an entry that already extends `tokens` makes storing it pointless.
    pub(crate) fn insert_row(
        &mut self,
        tokens: &[u32],
        cache: &KvCache,
        row: usize,
    ) -> Result<(), EngineError> {
        let pad = cache.pad.get(row).copied().unwrap_or(0);
        if !self.enabled() || tokens.len() < MIN_REUSE || cache.len < pad + tokens.len() {
            return Ok(());
        }
        self.clock += 1;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.len() >= tokens.len() && e.tokens[..tokens.len()] == *tokens)
        {
            e.used_at = self.clock;
            return Ok(());
        }
        let mut layers = Vec::with_capacity(cache.layers.len());
        let mut bytes = 0;
        for layer in &cache.layers {
            let Some((k, v)) = layer else {
                return Ok(());
            };
            // Only this row's slots: `copy` would clone the whole batch buffer behind the
            // view (a regression once: 32 episodes' store held 32 batch caches each).
            let own = |t: &Tensor| -> Result<Tensor, EngineError> {
                Ok(t.narrow(0, row, 1)?
                    .narrow(2, pad, tokens.len())?
                    .force_contiguous()?)
            };
            let (k, v) = (own(k)?, own(v)?);
            bytes += (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
            layers.push((k, v));
        }
        if bytes > self.budget {
            return Ok(());
        }
        self.remove_where(|e| {
            e.tokens.len() < tokens.len() && e.tokens == tokens[..e.tokens.len()]
        });
        while self.used + bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used_at)
                .map(|(i, _)| i)
            else {
                break;
            };
            let gone = self.entries.swap_remove(oldest);
            self.used -= gone.bytes;
        }
        self.used += bytes;
        self.entries.push(Entry {
            tokens: tokens.to_vec(),
            layers,
            bytes,
            used_at: self.clock,
        });
        Ok(())
    }

    fn remove_where(&mut self, drop: impl Fn(&Entry) -> bool) {
        let mut used = self.used;
        self.entries.retain(|e| {
            let gone = drop(e);
            if gone {
                used -= e.bytes;
            }
            !gone
        });
        self.used = used;
    }

    /// Bytes of keys and values held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.used
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A one-layer cache of `rows` rows whose slot `s` of row `r` holds the value `100 r + s`
    /// (keys) and its negative (values), left-padded per `pad`.
    fn cache(rows: usize, len: usize, pad: Vec<usize>) -> KvCache {
        let data: Vec<f32> = (0..rows)
            .flat_map(|r| (0..len).map(move |s| (100 * r + s) as f32))
            .collect();
        let k = Tensor::from_vec(data, (rows, 1, len, 1), &Device::Cpu).unwrap();
        let v = k.neg().unwrap();
        KvCache {
            layers: vec![Some((k, v))],
            len,
            pad,
        }
    }

    /// Elements of the storage behind `t` (not of the view).
    fn storage_len(t: &Tensor) -> usize {
        let (storage, _) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => s.as_slice::<f32>().unwrap().len(),
            _ => unreachable!("CPU tests"),
        }
    }

    #[test]
    fn a_stored_row_and_a_lookup_hold_only_their_own_slots() {
        let mut store = PrefixCache::new(1 << 20);
        let tokens: Vec<u32> = (0..20).collect();
        // Row 2 of a 4-row batch buffer of 64 slots per row, 30 in use.
        let mut batch = cache(4, 64, vec![0, 0, 10, 0]);
        batch.len = 30;
        store.insert_row(&tokens, &batch, 2).unwrap();
        let (k, v) = &store.entries[0].layers[0];
        assert_eq!((storage_len(k), storage_len(v)), (20, 20));
        assert_eq!(store.bytes(), 2 * 20 * 4);
        let hit = store
            .lookup(&(0..40).collect::<Vec<u32>>())
            .unwrap()
            .unwrap();
        let (k, _) = hit.layers[0].as_ref().unwrap();
        assert_eq!(storage_len(k), 20);
        assert_eq!(
            slots(&hit),
            (210..230).map(|x| x as f32).collect::<Vec<_>>()
        );
    }

    fn slots(c: &KvCache) -> Vec<f32> {
        let (k, _) = c.layers[0].as_ref().unwrap();
        k.narrow(2, 0, c.len)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn a_prompt_resumes_from_the_longest_stored_prefix_without_its_padding() {
        let mut store = PrefixCache::new(1 << 20);
        let tokens: Vec<u32> = (0..20).collect();
        // Row 1 of a batch, left-padded by 2 slots.
        store
            .insert_row(&tokens, &cache(2, 22, vec![0, 2]), 1)
            .unwrap();
        assert_eq!(store.len(), 1);
        // A prompt that extends it: all 20 tokens are reused, slots 2.. of row 1.
        let prompt: Vec<u32> = (0..25).collect();
        let hit = store.lookup(&prompt).unwrap().unwrap();
        assert_eq!(hit.len, 20);
        assert!(hit.pad.is_empty());
        assert_eq!(
            slots(&hit),
            (102..122).map(|x| x as f32).collect::<Vec<_>>()
        );
        // The copy is the caller's: writing it leaves the store untouched.
        let (k, _) = hit.layers[0].as_ref().unwrap();
        k.slice_set(
            &Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap(),
            2,
            0,
        )
        .unwrap();
        assert_eq!(slots(&store.lookup(&prompt).unwrap().unwrap())[0], 102.0);
        // A prompt sharing 17 tokens reuses 17; the same prompt reuses all but its last.
        let mut other: Vec<u32> = (0..17).collect();
        other.extend([99, 98, 97]);
        assert_eq!(store.lookup(&other).unwrap().unwrap().len, 17);
        assert_eq!(store.lookup(&tokens).unwrap().unwrap().len, 19);
        // Too little in common: nothing.
        assert!(store.lookup(&[0, 1, 2, 50, 51]).unwrap().is_none());
    }

    #[test]
    fn an_extension_replaces_its_prefix_and_the_budget_evicts_the_least_recently_used() {
        let per_token = 2 * 4; // one key and one value of one f32 each
        let mut store = PrefixCache::new(60 * per_token);
        let a: Vec<u32> = (0..20).collect();
        store.insert_row(&a, &cache(1, 20, vec![]), 0).unwrap();
        let a2: Vec<u32> = (0..30).collect();
        store.insert_row(&a2, &cache(1, 30, vec![]), 0).unwrap();
        assert_eq!((store.len(), store.bytes()), (1, 30 * per_token));
        // Storing a prefix of what is held changes nothing.
        store.insert_row(&a, &cache(1, 20, vec![]), 0).unwrap();
        assert_eq!(store.len(), 1);
        let b: Vec<u32> = (1000..1025).collect();
        store.insert_row(&b, &cache(1, 25, vec![]), 0).unwrap();
        assert_eq!(store.len(), 2);
        // Touch a2, then a third entry must evict b (the least recently used).
        store
            .lookup(&(0..40).collect::<Vec<u32>>())
            .unwrap()
            .unwrap();
        let c: Vec<u32> = (2000..2020).collect();
        store.insert_row(&c, &cache(1, 20, vec![]), 0).unwrap();
        assert!(store.bytes() <= 60 * per_token);
        assert!(store
            .lookup(&(1000..1030).collect::<Vec<u32>>())
            .unwrap()
            .is_none());
        assert!(store
            .lookup(&(0..40).collect::<Vec<u32>>())
            .unwrap()
            .is_some());
        // Off: nothing is kept.
        let mut off = PrefixCache::new(0);
        off.insert_row(&a, &cache(1, 20, vec![]), 0).unwrap();
        assert!(off.lookup(&a2).unwrap().is_none());
    }
}
