//! The sampler against the trainer: sampled logprobs equal `forward`'s, batched decoding
//! equals decoding alone, and prompts resumed from stored keys and values sample what a
//! fresh prefill samples.

mod common;

use common::*;
use whet_contract::{ModelInput, SamplingClient, SamplingParams, TrainingClient};
use whet_engine::{Precision, SamplerOptions};

#[test]
fn sampled_logprobs_equal_forward_logprobs() {
    for name in ["tiny-qwen3", "tiny-mistral"] {
        let f = fixture(name);
        let mut s = f.session(true);
        let sampler = s.sampling_client().unwrap();
        let prompt: Vec<i64> = vec![3, 17, 42, 9, 100, 5];
        let params = SamplingParams {
            max_tokens: Some(12),
            seed: Some(1),
            stop: Some(whet_contract::Stop::Tokens(vec![])),
            ..SamplingParams::default()
        };
        let resp = sampler
            .sample(&ModelInput::from_ints(prompt.clone()), 3, &params, true, 0)
            .unwrap();
        assert_eq!(resp.sequences.len(), 3);
        // The prompt logprobs equal compute_logprobs.
        let cl = sampler
            .compute_logprobs(&ModelInput::from_ints(prompt.clone()))
            .unwrap();
        let pl = resp.prompt_logprobs.clone().unwrap();
        assert_eq!(pl[0], None);
        for (a, b) in pl.iter().zip(&cl).skip(1) {
            assert!((a.unwrap() - b.unwrap()).abs() < 1e-4);
        }
        for seq in &resp.sequences {
            assert_eq!(seq.tokens.len(), 12);
            let lp = continuation_logprobs(&mut s, &prompt, &seq.tokens);
            let d = max_abs_diff(&lp, &seq.logprobs);
            assert!(
                d < 1e-4,
                "{name}: sampler vs forward logprobs differ by {d}"
            );
        }
        // Same seed, same samples.
        let again = sampler
            .sample(&ModelInput::from_ints(prompt.clone()), 3, &params, false, 0)
            .unwrap();
        assert_eq!(
            again
                .sequences
                .iter()
                .map(|s| &s.tokens)
                .collect::<Vec<_>>(),
            resp.sequences.iter().map(|s| &s.tokens).collect::<Vec<_>>()
        );
    }
}

/// Prompts of different lengths decoded as one batch (prefilled together, left-padded caches)
/// give each sequence the logprobs `forward` gives, and greedy decoding the same tokens as
/// decoding each prompt alone.
#[test]
fn batched_prompts_of_different_lengths_decode_like_single_ones() {
    for name in ["tiny-llama", "tiny-mistral"] {
        let f = fixture(name);
        let prompts = [vec![5, 9, 2], vec![7, 1, 3, 8, 60, 11, 4, 90, 12], vec![40]];
        let (sampler, inputs, params) = batch_matches_forward(&f, &prompts, 3, 1e-4, name);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params
        };
        let together = sampler.sample_many(&inputs, 1, &greedy).unwrap();
        for (input, seqs) in inputs.iter().zip(&together) {
            let alone = sampler.sample(input, 1, &greedy, false, 0).unwrap();
            assert_eq!(seqs[0].tokens, alone.sequences[0].tokens, "{name}");
        }
    }
}

/// With bf16 base weights the sampler's logprobs still match `forward`'s, and the model stays
/// close to its f32 self (bf16 keeps 8 mantissa bits: logprobs move by about 1e-2 here).
/// Sampler and forward use the same kernels, and each row's bf16 products do not depend on the
/// batch it is in, so most logprobs agree to the last bit; but attention sums in a different
/// order when decoding (one query over the cache) than when scoring (packed sequences), and
/// rounding to bf16 turns an f32 last-ulp difference into a one-bf16-ulp one now and then —
/// on these 64-wide random models that moves a logprob by up to a few 1e-3. Hence 5e-3 here
/// (the f32 path holds 1e-4).
#[test]
fn bf16_models_sample_what_forward_scores_and_stay_near_f32() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let exact = fixture(name);
        let f = fixture_in(name, Precision::Bf16);
        assert_eq!(f.model.precision(), Precision::Bf16);
        let d = max_abs_diff(&scored(&f).concat(), &scored(&exact).concat());
        assert!(
            d > 0.0 && d < 2e-2,
            "{name}: bf16 vs f32 logprobs differ by {d}"
        );
        let prompts = [vec![5, 9, 2], vec![7, 1, 3, 8, 60, 11, 4, 90, 12]];
        batch_matches_forward(&f, &prompts, 5, 5e-3, &format!("{name} bf16"));
    }
}

/// Samples two continuations of each prompt as one batch (10 tokens, no stop, seed `seed`)
/// on the fixture's adapter and holds every sampled logprob to `forward`'s within `tol`;
/// returns the sampler, the inputs and the parameters for more checks.
fn batch_matches_forward(
    f: &Fixture,
    prompts: &[Vec<i64>],
    seed: u64,
    tol: f32,
    what: &str,
) -> (whet_engine::Sampler, Vec<ModelInput>, SamplingParams) {
    let mut s = f.session(true);
    let sampler = whet_engine::Sampler::new(
        f.model.clone(),
        Some(s.adapter().sampling_weights().unwrap()),
        SamplerOptions::default(),
    );
    let inputs: Vec<ModelInput> = prompts.iter().cloned().map(ModelInput::from_ints).collect();
    let params = SamplingParams {
        max_tokens: Some(10),
        seed: Some(seed),
        stop: Some(whet_contract::Stop::Tokens(vec![])),
        ..SamplingParams::default()
    };
    let batch = sampler.sample_many(&inputs, 2, &params).unwrap();
    for (prompt, seqs) in prompts.iter().zip(&batch) {
        for seq in seqs {
            let lp = continuation_logprobs(&mut s, prompt, &seq.tokens);
            let d = max_abs_diff(&lp, &seq.logprobs);
            assert!(d < tol, "{what}: batched sampler vs forward differ by {d}");
        }
    }
    (sampler, inputs, params)
}

/// Two samplers on the session's adapter: one keeping finished sequences for prompts that
/// extend them (the default), one that prefills every prompt in full.
fn caching_and_fresh(
    f: &Fixture,
    s: &whet_engine::TrainingSession,
) -> (whet_engine::Sampler, whet_engine::Sampler) {
    let weights = s.adapter().sampling_weights().unwrap();
    let caching = whet_engine::Sampler::new(
        f.model.clone(),
        Some(weights.clone()),
        SamplerOptions::default(),
    );
    let fresh = whet_engine::Sampler::new(
        f.model.clone(),
        Some(weights),
        SamplerOptions {
            prefix_cache_bytes: 0,
            ..SamplerOptions::default()
        },
    );
    (caching, fresh)
}

/// `sample_each` decodes its prompts as one batch; each row gets what sampling its prompt
/// alone with `each_seed(seed, i)` gives (the contract's default), and `forward`'s logprobs.
#[test]
fn sample_each_samples_what_each_prompt_alone_samples() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        let f = fixture(name);
        let mut s = f.session(true);
        let weights = s.adapter().sampling_weights().unwrap();
        let sampler = whet_engine::Sampler::new(
            f.model.clone(),
            Some(weights.clone()),
            SamplerOptions::default(),
        );
        let prompts: Vec<Vec<i64>> = vec![vec![5, 9, 2], vec![7, 1, 3, 8, 60, 11, 4], vec![40]];
        let inputs: Vec<ModelInput> = prompts.iter().cloned().map(ModelInput::from_ints).collect();
        let params = SamplingParams {
            max_tokens: Some(9),
            seed: Some(11),
            stop: Some(whet_contract::Stop::Tokens(vec![])),
            ..SamplingParams::default()
        };
        let each = sampler.sample_each(&inputs, &params).unwrap();
        assert_eq!(each.len(), 3);
        for (i, (prompt, seq)) in prompts.iter().zip(&each).enumerate() {
            let alone = SamplingParams {
                seed: Some(whet_contract::each_seed(11, i)),
                ..params.clone()
            };
            let fresh = whet_engine::Sampler::new(
                f.model.clone(),
                Some(weights.clone()),
                SamplerOptions::default(),
            );
            let want = fresh.sample(&inputs[i], 1, &alone, false, 0).unwrap();
            assert_eq!(seq.tokens, want.sequences[0].tokens, "{name}: prompt {i}");
            let lp = continuation_logprobs(&mut s, prompt, &seq.tokens);
            let d = max_abs_diff(&lp, &seq.logprobs);
            assert!(d < 1e-4, "{name}: sample_each vs forward differ by {d}");
        }
        assert!(sampler.sample_each(&[], &params).unwrap().is_empty());
    }
}

/// A conversation's next turn — the previous prompt, its completion, new tokens — is
/// prefilled from the keys and values kept when the completion finished: only the new tokens
/// go through the model, and it samples the tokens and logprobs a full prefill gives.
#[test]
fn a_next_turn_resumes_from_the_finished_turn_and_samples_the_same() {
    for (name, precision, tol) in [
        ("tiny-llama", Precision::F32, 1e-4),
        ("tiny-mistral", Precision::F32, 1e-4),
        ("tiny-qwen2", Precision::Bf16, 5e-3),
    ] {
        let f = fixture_in(name, precision);
        let mut s = f.session(true);
        let (caching, fresh) = caching_and_fresh(&f, &s);
        let first: Vec<Vec<i64>> = vec![
            (0..24).map(|t| (t * 7 + 3) % 128).collect(),
            (0..30).map(|t| (t * 5 + 1) % 128).collect(),
        ];
        let params = SamplingParams {
            max_tokens: Some(6),
            seed: Some(2),
            stop: Some(whet_contract::Stop::Tokens(vec![])),
            ..SamplingParams::default()
        };
        let inputs = |p: &[Vec<i64>]| -> Vec<ModelInput> {
            p.iter().cloned().map(ModelInput::from_ints).collect()
        };
        let turn1 = caching.sample_each(&inputs(&first), &params).unwrap();
        assert_eq!(caching.reused_prompt_tokens(), 0);
        // Turn 2: history, the completion, then "the world's answer".
        let second: Vec<Vec<i64>> = first
            .iter()
            .zip(&turn1)
            .map(|(p, seq)| {
                let mut next = p.clone();
                next.extend(&seq.tokens);
                next.extend([17, 99, 4]);
                next
            })
            .collect();
        let greedy = SamplingParams {
            temperature: 0.0,
            ..params
        };
        let resumed = caching.sample_each(&inputs(&second), &greedy).unwrap();
        // Each prompt reused its history but the completion's last token (never fed back).
        let reused: usize = first.iter().map(|p| p.len() + 6 - 1).sum();
        assert_eq!(caching.reused_prompt_tokens(), reused, "{name}");
        let full = fresh.sample_each(&inputs(&second), &greedy).unwrap();
        for ((prompt, a), b) in second.iter().zip(&resumed).zip(&full) {
            assert_eq!(a.tokens, b.tokens, "{name}");
            let d = max_abs_diff(&a.logprobs, &b.logprobs);
            assert!(d < tol, "{name}: resumed vs full prefill differ by {d}");
            let lp = continuation_logprobs(&mut s, prompt, &a.tokens);
            let d = max_abs_diff(&lp, &a.logprobs);
            assert!(d < tol, "{name}: resumed vs forward differ by {d}");
        }
        assert_eq!(fresh.reused_prompt_tokens(), 0);
    }
}

/// New conversations that open alike (a system message, tool schemas) share one prefill of
/// their common opening; each then prefills only its own tokens, and samples what a full
/// prefill samples.
#[test]
fn new_prompts_with_a_common_opening_prefill_it_once() {
    let f = fixture("tiny-llama");
    let mut s = f.session(true);
    let (caching, fresh) = caching_and_fresh(&f, &s);
    let opening: Vec<i64> = (0..20).map(|t| (t * 11 + 2) % 128).collect();
    let prompts: Vec<Vec<i64>> = [vec![5, 9], vec![7, 1, 3], vec![40, 41, 42, 43]]
        .into_iter()
        .map(|own| opening.iter().chain(&own).copied().collect())
        .collect();
    let inputs: Vec<ModelInput> = prompts.iter().cloned().map(ModelInput::from_ints).collect();
    let greedy = SamplingParams {
        max_tokens: Some(5),
        temperature: 0.0,
        stop: Some(whet_contract::Stop::Tokens(vec![])),
        ..SamplingParams::default()
    };
    let shared = caching.sample_each(&inputs, &greedy).unwrap();
    assert_eq!(caching.reused_prompt_tokens(), 3 * opening.len());
    let full = fresh.sample_each(&inputs, &greedy).unwrap();
    for ((prompt, a), b) in prompts.iter().zip(&shared).zip(&full) {
        assert_eq!(a.tokens, b.tokens);
        let d = max_abs_diff(&a.logprobs, &b.logprobs);
        assert!(d < 1e-4, "shared opening vs full prefill differ by {d}");
        let lp = continuation_logprobs(&mut s, prompt, &a.tokens);
        assert!(max_abs_diff(&lp, &a.logprobs) < 1e-4);
    }
}
