//! Choosing the next token from a row of logits, and reporting its logprob under the model.

use rand::Rng;
use whet_contract::SamplingParams;

use crate::ops::{exp_nonpos, row_lse};

/// The `k` most likely `(token, logprob)` pairs of a row, most likely first.
pub(super) fn top_k(row: &[f32], k: usize) -> Vec<(i64, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let k = k.min(row.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| row[b].total_cmp(&row[a]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i as i64, row[i])).collect()
}

/// The next token of a row of raw logits and its logprob under the model (`log_softmax` of
/// the raw logits, before temperature, top-k and top-p). Plain sampling (no top-k/top-p) and
/// greedy decoding take two passes over the vocabulary and no allocation beyond one buffer.
pub(super) fn pick(row: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> (u32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let filtered = p.top_k > 0 || p.top_p < 1.0;
    let mut lse = None;
    let tok = if p.temperature == 0.0 || filtered {
        choose(row, p, rng)
    } else {
        // exp((x − max)/T), then a draw by cumulative mass.
        let inv_t = (1.0 / p.temperature) as f32;
        let weights: Vec<f32> = row.iter().map(|&x| exp_nonpos((x - max) * inv_t)).collect();
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        if p.temperature == 1.0 {
            // The same terms as the log-sum-exp of the raw logits.
            lse = Some(max as f64 + total.ln());
        }
        let mut u = rng.random::<f64>() * total;
        let mut tok = row.len() - 1;
        for (i, &w) in weights.iter().enumerate() {
            if u < w as f64 {
                tok = i;
                break;
            }
            u -= w as f64;
        }
        tok as u32
    };
    let lse = lse.unwrap_or_else(|| row_lse(row));
    (tok, (row[tok as usize] as f64 - lse) as f32)
}

/// Picks the next token from raw logits: argmax at temperature 0, else a draw from
/// `softmax(logits / T)` restricted to the top-k tokens and then to the top-p nucleus. Only
/// the candidates top-k/top-p need are ever sorted (a full-vocabulary sort per token would
/// cost more than the model's forward pass at small batch).
fn choose(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> u32 {
    if p.temperature == 0.0 {
        // First maximum wins, as torch.argmax.
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let inv_t = 1.0 / p.temperature;
    let mut cand: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit_desc = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if p.top_k > 0 && (p.top_k as usize) < cand.len() {
        let k = p.top_k as usize;
        cand.select_nth_unstable_by(k - 1, by_logit_desc);
        cand.truncate(k);
    }
    if p.top_p < 1.0 {
        cand.sort_unstable_by(by_logit_desc);
    }
    let max = cand
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp())
        .collect();
    if p.top_p < 1.0 {
        // Smallest prefix (most likely first) whose mass reaches top_p; the token crossing
        // the threshold is kept.
        let total: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q / total;
            if acc >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return cand[i];
        }
        u -= q;
    }
    cand[probs.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn choose_respects_greedy_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 2.9, -1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(choose(&logits, &greedy, &mut rng), 1);
        let k2 = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        for _ in 0..200 {
            let t = choose(&logits, &k2, &mut rng);
            assert!(t == 1 || t == 2);
        }
        let p = SamplingParams {
            top_p: 0.3,
            ..SamplingParams::default()
        };
        for _ in 0..200 {
            assert_eq!(choose(&logits, &p, &mut rng), 1);
        }
        assert_eq!(top_k(&logits, 2), vec![(1, 3.0), (2, 2.9)]);
    }
}
