#!/usr/bin/env python3
"""Regenerate whet's RL parity fixtures under tests/fixtures/rl/ (PyTorch + PEFT, fp32, CPU).

    python3 tools/make_rl_fixtures.py                    # every model
    python3 tools/make_rl_fixtures.py --only tiny-qwen2  # one (tiny-llama, tiny-qwen2, tiny-qwen3)

Needs the packages pinned in tools/requirements.txt, and the tiny fixtures that
tools/make_fixtures.py writes (tests/fixtures/<model>/: config.json, model.safetensors and the
PEFT adapter in adapter/), which are loaded as they are -- this script never changes them.

One full RL step, as whet's RL loop (crates/rl/src/lib.rs `train`) takes it:

  * 2 prompts (token ids < 128), each with a group of 4 "sampled" completions: fixed token ids of
    different lengths (drawn from a seeded torch.Generator, not really sampled), and "sampler
    logprobs" = the current policy's (base + adapter) logprob of each completion token plus a
    seeded perturbation, N(0, 0.1) and, on about 40% of the tokens, an extra +-0.5, so the ratio
    r = exp(lp - old) is on both sides of 1 and leaves PPO's [0.8, 1.2] both ways (asserted).
  * rewards [1, 0, 0, 1] and [0, 0, 1, 0.5]; advantages as whet's `group_advantages` computes them
    (f64): A_i = r_i - mean(r), and in the "normalized" case divided by (population std + 1e-6).
  * scale = 1 / (completion tokens of all 8 rollouts), in f64; every completion target carries
    f32(A * scale).
  * datums as whet's `rollouts::datum` builds them: tokens = prompt ++ completion,
    model_input = tokens[:-1], target_tokens = tokens[1:], `logprobs` = the sampler logprobs on the
    completion's targets (position len(prompt) - 1 + k for completion token k) and 0 on the
    prompt's, `advantages` likewise (0 on the prompt's). Group 0's rollouts first, in order.
  * losses as whet's engine computes them, sums over every target of every datum (each datum its
    own sequence): importance_sampling -sum(r * A), ppo -sum(min(r * A, clamp(r, 0.8, 1.2) * A)).
    Prompt positions (old = 0, A = 0) add exactly 0 to loss and gradient.
  * the gradient w.r.t. every LoRA tensor, and the adapter after one optimizer step:
    torch.optim.AdamW(lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight_decay 0.1) after
    clip_grad_norm_(1.0) over all LoRA tensors together.

What gets written, per model (tests/fixtures/rl/<model>/):

  inputs.json               prompts, groups (completion tokens, sampler logprobs, reward), the
                            loss configs, the AdamW parameters, and per case
                            ("mean": normalize_advantages false, "normalized": true): advantages,
                            scale, loss values, grad norms, clip statistics; plus the
                            sampler-vs-trainer statistics the loop reports
                            (optim/kl_sample_train_v1 = mean(old - lp), v2 = mean((old - lp)^2 / 2)
                            over the completion tokens)
  datums.jsonl              the "mean" case's 8 datums (Tinker JSON), exactly as whet builds them
  normalized.datums.jsonl   the "normalized" case's
  expected.safetensors      fp32, keys ({key}: PEFT *saved* LoRA key, as in the engine fixtures):
      loss.{loss_fn}                        (1,)  "mean" case
      grad.{loss_fn}.{key}                        d loss.{loss_fn} / d LoRA tensor
      adam.{loss_fn}.{key}                        the LoRA tensor after one AdamW step on that grad
      normalized.loss.{loss_fn}, normalized.grad.{loss_fn}.{key}
                                                  the same with normalized advantages
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "rl"
sys.path.insert(0, str(TOOLS))

import check_adapter as ca  # noqa: E402  (datum parsing, forward, losses, model loading)

MODELS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]
SEEDS = {"tiny-llama": 3001, "tiny-qwen2": 3022, "tiny-qwen3": 3003}

VOCAB = 128
PROMPT_LENGTHS = [5, 7]
# Different lengths within each group (and a one-token completion).
COMPLETION_LENGTHS = [[3, 6, 2, 5], [4, 1, 7, 3]]
REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.5]]
SMALL_NOISE, BIG_NOISE, BIG_FRACTION = 0.1, 0.5, 0.4

LOSS_FNS = ["importance_sampling", "ppo"]
# What whet's `RlConfig::loss()` passes with the default config.
LOSS_FN_CONFIG = {
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}
CASES = {"mean": False, "normalized": True}  # case -> normalize_advantages
PREFIX = {"mean": "", "normalized": "normalized."}

ADAM_PARAMS = {
    "learning_rate": 0.001,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.1,
    "grad_clip_norm": 1.0,
}


def saved_lora_key(param_name: str) -> str:
    """PEFT parameter name -> key in adapter_model.safetensors (the adapter name dropped)."""
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def lora_params(peft_model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(saved_lora_key(n), p) for n, p in peft_model.named_parameters() if ".lora_" in n]


def group_advantages(rewards: list[float], normalize: bool) -> list[float]:
    """whet's `advantages::group_advantages`, operation for operation in f64."""
    n = float(len(rewards))
    total = 0.0
    for r in rewards:
        total += r
    mean = total / n
    centered = [r - mean for r in rewards]
    if not normalize:
        return centered
    sq = 0.0
    for a in centered:
        sq += a * a
    std = (sq / n) ** 0.5
    return [a / (std + 1e-6) for a in centered]


def build_datum(prompt: list[int], completion: list[int], logprobs: list[float], adv_scaled: float) -> dict:
    """whet's `rollouts::datum` (Tinker JSON); `adv_scaled` is advantage * scale, in f64."""
    tokens = prompt + completion
    n = len(tokens) - 1
    first = len(prompt) - 1
    lp = [0.0] * n
    adv = [0.0] * n
    a32 = float(np.float32(adv_scaled))
    for k, x in enumerate(logprobs):
        lp[first + k] = float(np.float32(x))
        adv[first + k] = a32
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:n]}]},
        "loss_fn_inputs": {
            "advantages": {"data": adv, "dtype": "float32", "shape": [n]},
            "logprobs": {"data": lp, "dtype": "float32", "shape": [n]},
            "target_tokens": {"data": tokens[1:], "dtype": "int64", "shape": [n]},
        },
    }


def load_policy(name: str):
    from peft import PeftModel

    base = ca.load_base_model(str(FIXTURES / name))
    model = PeftModel.from_pretrained(base, str(FIXTURES / name / "adapter"), is_trainable=True)
    model.eval()  # lora_dropout is 0; eval only to be explicit
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return model


def check_against_engine_fixture(model, name: str) -> float:
    """The policy loaded here must be the one tools/make_fixtures.py built (its logprobs)."""
    from safetensors.torch import load_file

    expected = load_file(FIXTURES / name / "expected.safetensors")
    datums = ca.read_datums(str(FIXTURES / name / "datums.jsonl"))
    worst = 0.0
    with torch.no_grad():
        for i, d in enumerate(datums):
            lp = ca.target_logprobs(model, d["tokens"], d["target_tokens"])
            worst = max(worst, float((lp - expected[f"logprobs.adapter.{i}"]).abs().max()))
    assert worst < 1e-5, f"{name}: loaded policy disagrees with the engine fixture ({worst})"
    return worst


def total_loss(model, datums: list[dict], loss_fn: str) -> torch.Tensor:
    total = torch.zeros(())
    for d in datums:
        lp = ca.target_logprobs(model, d["tokens"], d["target_tokens"])
        total = total + ca.loss_sum(loss_fn, lp, d, LOSS_FN_CONFIG[loss_fn])
    return total


def one_adam_step(named, grads: dict) -> tuple[dict, float]:
    """torch's AdamW, one step from the current LoRA values with the given gradients (after
    clip_grad_norm_ over all of them). Returns the new values and the pre-clip norm."""
    a = ADAM_PARAMS
    params = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    for (k, _), p in zip(named, params):
        p.grad = grads[k].detach().clone()
    norm = float(torch.nn.utils.clip_grad_norm_(params, a["grad_clip_norm"]))
    opt = torch.optim.AdamW(params, lr=a["learning_rate"], betas=(a["beta1"], a["beta2"]),
                            eps=a["eps"], weight_decay=a["weight_decay"])
    opt.step()
    return {k: p.detach().clone() for (k, _), p in zip(named, params)}, norm


def make(name: str) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(SEEDS[name])
    gen = torch.Generator().manual_seed(SEEDS[name])
    out_dir = OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)

    model = load_policy(name)
    engine_fixture_diff = check_against_engine_fixture(model, name)
    named = lora_params(model)
    assert named and all(p.requires_grad for _, p in named)

    # ---- prompts, completions, sampler logprobs ------------------------------------------------
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    groups = []
    with torch.no_grad():
        for prompt, lengths, rewards in zip(prompts, COMPLETION_LENGTHS, REWARDS):
            group = []
            for n, reward in zip(lengths, rewards):
                completion = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
                seq = torch.tensor(prompt + completion)
                lp = ca.target_logprobs(model, seq[:-1], seq[1:])[len(prompt) - 1:]
                noise = SMALL_NOISE * torch.randn(n, generator=gen)
                big = torch.rand(n, generator=gen) < BIG_FRACTION
                sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
                noise = noise + big.float() * sign * BIG_NOISE
                sampler_lp = (lp + noise).to(torch.float32)
                group.append({"tokens": completion,
                              "logprobs": [float(x) for x in sampler_lp.numpy()],
                              "reward": reward})
            groups.append(group)

    completion_tokens = sum(len(r["tokens"]) for g in groups for r in g)
    scale = 1.0 / completion_tokens

    # sampler-vs-trainer statistics (independent of the case: same weights, same tokens)
    d1, d2, n_kl = 0.0, 0.0, 0
    with torch.no_grad():
        for prompt, group in zip(prompts, groups):
            for r in group:
                seq = torch.tensor(prompt + r["tokens"])
                lp = ca.target_logprobs(model, seq[:-1], seq[1:])[len(prompt) - 1:]
                for old, new in zip(r["logprobs"], lp.tolist()):
                    d = float(np.float32(old)) - new
                    d1 += d
                    d2 += 0.5 * d * d
                    n_kl += 1

    # ---- the step, per case and loss -----------------------------------------------------------
    expected: dict[str, torch.Tensor] = {}
    cases = {}
    for case, normalize in CASES.items():
        pre = PREFIX[case]
        advantages = [group_advantages([r["reward"] for r in g], normalize) for g in groups]
        datums_json = [build_datum(prompt, r["tokens"], r["logprobs"], a * scale)
                       for prompt, g, adv in zip(prompts, groups, advantages)
                       for r, a in zip(g, adv)]
        path = out_dir / f"{pre}datums.jsonl"
        with open(path, "w") as f:
            for d in datums_json:
                f.write(json.dumps(d) + "\n")
        datums = ca.read_datums(str(path))  # exactly the f32 values the Rust side reads

        info = {"normalize_advantages": normalize, "advantages": advantages, "scale": scale,
                "losses": {}, "grad_norm": {}, "clipped": {}}
        for fn in LOSS_FNS:
            model.zero_grad(set_to_none=True)
            loss = total_loss(model, datums, fn)
            loss.backward()
            expected[f"{pre}loss.{fn}"] = loss.detach().reshape(1).clone()
            grads = {}
            for k, p in named:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"zero grad {case} {fn} {k}"
                grads[k] = p.grad.detach().clone()
                expected[f"{pre}grad.{fn}.{k}"] = grads[k]
            new, norm = one_adam_step(named, grads)
            if case == "mean":  # (the normalized case's update is left out: fixture size)
                for k, v in new.items():
                    expected[f"adam.{fn}.{k}"] = v
            info["losses"][fn] = float(loss.detach())
            info["grad_norm"][fn] = norm
            info["clipped"][fn] = norm > ADAM_PARAMS["grad_clip_norm"]
        model.zero_grad(set_to_none=True)

        # where PPO's clip bites: min() takes the clipped term and the gradient is cut
        with torch.no_grad():
            lo = LOSS_FN_CONFIG["ppo"]["clip_low_threshold"]
            hi = LOSS_FN_CONFIG["ppo"]["clip_high_threshold"]
            st = {"ratio_below_low": 0, "ratio_above_high": 0, "cut_low": 0, "cut_high": 0,
                  "completion_tokens": completion_tokens}
            for d in datums:
                lp = ca.target_logprobs(model, d["tokens"], d["target_tokens"])
                mask = d["advantages"] != 0
                r = torch.exp(lp - d["logprobs"])[mask]
                a = d["advantages"][mask]
                st["ratio_below_low"] += int((r < lo).sum())
                st["ratio_above_high"] += int((r > hi).sum())
                st["cut_low"] += int(((r < lo) & (a < 0)).sum())
                st["cut_high"] += int(((r > hi) & (a > 0)).sum())
        assert st["cut_low"] > 0 and st["cut_high"] > 0, f"{name} {case}: PPO clip idle {st}"
        info["ppo_clip_stats"] = st
        cases[case] = info

    expected = {k: v.detach().to(torch.float32).contiguous() for k, v in expected.items()}
    for k, v in expected.items():
        assert torch.isfinite(v).all(), k
    save_file(expected, out_dir / "expected.safetensors")

    meta = {
        "model": name,
        "fixture": f"tests/fixtures/{name} (model.safetensors + adapter/)",
        "seed": SEEDS[name],
        "prompts": prompts,
        "groups": groups,
        "completion_tokens": completion_tokens,
        "loss_fn_config": LOSS_FN_CONFIG,
        "adam_params": ADAM_PARAMS,
        "cases": cases,
        "kl_sample_train_v1": d1 / n_kl,
        "kl_sample_train_v2": d2 / n_kl,
        "engine_fixture_max_abs_logprob_diff": engine_fixture_diff,
        "lora_keys": [k for k, _ in named],
        "versions": _versions(),
    }
    with open(out_dir / "inputs.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return meta


def _versions() -> dict:
    import peft
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Regenerate tests/fixtures/rl/")
    p.add_argument("--only", action="append", choices=MODELS, help="one model (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    for name in args.only or MODELS:
        meta = make(name)
        for case, info in meta["cases"].items():
            print(f"{name} {case}: losses {info['losses']}, grad norms {info['grad_norm']}, "
                  f"ppo clip {info['ppo_clip_stats']}")
    print(f"total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
