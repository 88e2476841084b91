#!/usr/bin/env python3
"""Regenerate whet's PyTorch/PEFT parity fixtures under tests/fixtures/.

    python3 tools/make_fixtures.py                 # everything
    python3 tools/make_fixtures.py --only tiny-qwen3   # one fixture (tiny-llama, tiny-qwen2,
                                                   # tiny-qwen3, tiny-mistral, smollm2)

Everything is fp32 on CPU with 2 threads, and every fixture is seeded on its own (so ``--only``
reproduces exactly what a full run writes). Needs the packages pinned in tools/requirements.txt.

What gets written (per tiny model, e.g. tests/fixtures/tiny-llama/):

  config.json, model.safetensors   the random tiny model, as transformers' save_pretrained writes it
  adapter/                         a PEFT LoRA (adapter_config.json + adapter_model.safetensors)
  datums.jsonl                     3 Tinker datums (one JSON object per line)
  expected.safetensors             fp32 reference numbers (keys below)
  expected.json                    configs used, plus diagnostics
  model.gguf                       (tiny-llama, tiny-qwen3 only) the same weights as llama.cpp's
                                   HF->GGUF converter would write them, f32

expected.safetensors keys ({i} = datum index, {key} = PEFT *saved* LoRA key such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; no adapter name):

  logprobs.base.{i}      (n_i,)        base model logprob of datum i's targets
  logprobs.adapter.{i}   (n_i,)        same with the adapter applied
  logits.base.{i}        (n_i, vocab)  raw logits (extra, for debugging)
  logits.adapter.{i}     (n_i, vocab)
  loss.{loss_fn}         (1,)          loss summed over all target positions of all 3 datums
  grad.{loss_fn}.{key}   LoRA shape    d loss.{loss_fn} / d LoRA tensor, at the saved adapter
  adam.{key}             LoRA shape    the LoRA tensor after 3 AdamW steps (see run_adam)
  adam_given_grads.{key} LoRA shape    after 3 AdamW steps on fixed stored gradients (run_adam_given_grads)

The conventions (Tinker's contract) -- see also tools/check_adapter.py:
  * Position i of the input tokens predicts target_tokens[i], len(target_tokens) == len(tokens):
        logprobs[i] = log_softmax(logits[i])[target_tokens[i]]
    with logits[i] the model output at input position i. NO extra shift inside the engine: the
    datum already carries shifted targets (in these random fixtures targets are simply random).
  * Each datum is its own sequence: batch 1, no padding, position ids 0..n-1, causal attention.
  * Every loss is a SUM over all target positions of all datums, never a mean.

And the smollm2 fixture: tests/fixtures/smollm2/greedy.json, greedy decoding of the real
SmolLM2-135M-Instruct Q4_1 GGUF (models/, fetched by tools/get-smollm2.sh) as transformers does it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(TOOLS))

import check_adapter as ca  # noqa: E402  (shared datum parsing, forward, losses, loading)

# --------------------------------------------------------------------------------------------
# Shared settings
# --------------------------------------------------------------------------------------------

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 128, 64, 112, 2
INIT_STD = 0.1  # also written as initializer_range; big enough that logits are not flat

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 4, 8
LORA_INIT_STD = 0.1  # both lora_A and lora_B ~ N(0, 0.1) so the adapter clearly matters

OLD_LOGPROB_NOISE = 0.3  # "old" logprobs = adapter logprob + N(0, 0.3): ratios on both sides of 1

# lr 1e-3: Adam normalises every element's step to ~lr, so f32 gradient rounding on elements
# far below the tensor's max becomes a weight error of ~lr * (relative gradient error); at 1e-3
# that stays under the 1e-5 the parity test demands, while every step is still 100x the
# tolerance and weight decay (lr * wd * |p|) is visible in adam_given_grads at 1e-6.
ADAM_PARAMS = {
    "learning_rate": 0.001,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.1,
    "grad_clip_norm": 1.0,
}
ADAM_STEPS = 3
ADAM_LOSS_FN = "cross_entropy"

# One fixed seed per fixture, so fixtures are independent of each other and of run order.
SEEDS = {
    "tiny-llama": 1001,
    "tiny-qwen2": 1002,
    "tiny-qwen3": 1003,
    "tiny-mistral": 1004,
    "smollm2": 1005,
}


def _llama_config():
    """Llama: GQA 4 q heads / 2 kv heads, head_dim 16, untied, llama3 RoPE scaling.

    transformers 5.24 writes RoPE settings as one nested dict (``rope_theta`` lives inside it;
    there is no top-level ``rope_theta`` / ``rope_scaling`` any more). config.json holds:

        "rope_parameters": {"factor": 4.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 16, "rope_theta": 10000.0,
                            "rope_type": "llama3"},
        "original_max_position_embeddings": 16,   # top-level copy, see below
        "max_position_embeddings": 64, "head_dim": 16, ...

    The top-level ``original_max_position_embeddings`` duplicates the nested one on purpose:
    llama.cpp's HF->GGUF converter reads it only from the top level (falling back to 8192), so
    with the copy our model.gguf is exactly what that converter writes for this config.json.
    transformers gives the top-level value priority; both are 16, so nothing changes.

    llama3 scaling on head_dim 16 (inv_freq_i = 10000^(-2i/16), wavelen_i = 2*pi / inv_freq_i,
    low_freq_wavelen = 16/1 = 16, high_freq_wavelen = 16/4 = 4):
        i=0: wavelen 6.28 in [4, 16]  -> smoothed: s = (16/wavelen - 1)/(4 - 1),
                                         inv = (1-s)*inv/4 + s*inv  (1.0 -> 0.6366)
        i=1..7: wavelen 19.9 .. 1.99e4 > 16 -> inv / 4
    (no frequency is left unchanged: 2*pi > 4 already for i=0).
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=INIT_STD,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        original_max_position_embeddings=16,
    )


def _qwen2_config():
    """Qwen2: 4/2 heads, head_dim 64/4 = 16 (no head_dim key in config.json: derive it),
    q/k/v have biases (always, in Qwen2), tied embeddings (no lm_head.weight in the safetensors)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=INIT_STD,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
    )


def _qwen3_config():
    """Qwen3: 4/2 heads with head_dim 32 != 64/4, so q_proj is 64->128, k/v 64->64, o 128->64.
    Per-head RMSNorm (q_norm/k_norm, weight shape (32,)) on q and k before RoPE. Untied."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=INIT_STD,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_bias=False, use_sliding_window=False,
    )


def _mistral_config():
    """Mistral: 4 q heads / 1 kv head (MQA), head_dim 16, sliding_window 8, untied.

    Sliding-window semantics in transformers 5.24 (masking_utils.sliding_window_overlay):
    query position q may attend key position k iff  q - 8 < k <= q, i.e. itself and the 7
    previous tokens (8 keys at most). make_tiny() verifies this on the length-20 datum.
    """
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=INIT_STD,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=8,
    )


TINY = {
    "tiny-llama": dict(config=_llama_config, lengths=[5, 11, 17], rslora=False, gguf="llama"),
    "tiny-qwen2": dict(config=_qwen2_config, lengths=[5, 11, 17], rslora=False, gguf=None),
    "tiny-qwen3": dict(config=_qwen3_config, lengths=[5, 11, 17], rslora=True, gguf="qwen3"),
    "tiny-mistral": dict(config=_mistral_config, lengths=[5, 11, 20], rslora=False, gguf=None),
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _setup(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _f32_list(t: torch.Tensor) -> list[float]:
    # float(np.float32) is exact in a double, and json writes the shortest repr that round-trips
    # to that double, so reading it back as f32 gives exactly the same f32.
    return [float(x) for x in t.detach().to(torch.float32).numpy()]


def _tensor_data(values: list, dtype: str) -> dict:
    return {"data": values, "dtype": dtype, "shape": [len(values)]}


def randomize_base(model, gen: torch.Generator) -> None:
    """Give every weight a random value (iterating parameters in registration order).

    * RMSNorm weights (input/post_attention layernorms, final norm, qwen3 q_norm/k_norm):
      1 + N(0, 0.1)  -- around 1, but not 1, so a missing or misplaced norm weight shows up.
    * Biases (qwen2 q/k/v): N(0, 0.2)  -- clearly non-zero.
    * Everything else (embeddings, projections, lm_head): N(0, INIT_STD).
    Tied weights (qwen2 embed_tokens == lm_head) are one Parameter and are visited once.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))


def saved_lora_key(param_name: str) -> str:
    """PEFT parameter name -> key in adapter_model.safetensors (the adapter name is dropped):
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
      -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    return param_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def lora_params(peft_model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(saved_lora_key(n), p) for n, p in peft_model.named_parameters() if ".lora_" in n]


def make_datums(lengths, gen: torch.Generator) -> list[dict]:
    """Random tokens/targets in [0, VOCAB); weights drawn from {1.0, 0.0, 0.5}; advantages N(0,1).
    The 'logprobs' (sampling-time) field is filled in later from the adapter model."""
    datums = []
    choices = torch.tensor([1.0, 0.0, 0.5])
    for n in lengths:
        tokens = torch.randint(0, VOCAB, (n,), generator=gen)
        targets = torch.randint(0, VOCAB, (n,), generator=gen)
        weights = choices[torch.multinomial(torch.tensor([0.5, 0.25, 0.25]), n, replacement=True,
                                            generator=gen)]
        advantages = torch.randn(n, generator=gen)
        datums.append({"tokens": tokens, "target_tokens": targets, "weights": weights,
                       "advantages": advantages})
    # make sure the mix really is a mix
    allw = torch.cat([d["weights"] for d in datums])
    for v in (1.0, 0.0, 0.5):
        assert (allw == v).any(), f"weight {v} missing; change the seed"
    return datums


def datum_json(d: dict) -> dict:
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": [int(t) for t in d["tokens"]]}]},
        "loss_fn_inputs": {
            "target_tokens": _tensor_data([int(t) for t in d["target_tokens"]], "int64"),
            "weights": _tensor_data(_f32_list(d["weights"]), "float32"),
            "logprobs": _tensor_data(_f32_list(d["logprobs"]), "float32"),
            "advantages": _tensor_data(_f32_list(d["advantages"]), "float32"),
        },
    }


def total_loss(model, datums, loss_fn: str) -> torch.Tensor:
    """Sum over datums of the per-datum summed loss (each datum its own forward pass)."""
    total = torch.zeros(())
    for d in datums:
        lp = ca.target_logprobs(model, d["tokens"], d["target_tokens"])
        total = total + ca.loss_sum(loss_fn, lp, d, ca.DEFAULT_LOSS_FN_CONFIG[loss_fn])
    return total


def run_adam(peft_model, datums) -> tuple[dict, list[dict]]:
    """Tinker's optim_step, 3 times, from the saved adapter:

        opt = torch.optim.AdamW(lora_params, lr, betas=(beta1, beta2), eps, weight_decay)
        repeat 3: zero grads; loss = cross_entropy summed over all datums; loss.backward();
                  clip_grad_norm_(lora_params, grad_clip_norm) (if > 0); opt.step()

    AdamW (decoupled weight decay), per element, step t (1-based), g = clipped gradient:
        p *= 1 - lr * wd
        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2
        p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    Clipping: total = ||all grads||_2 (one norm over every LoRA tensor together); if it exceeds
    max_norm every grad is multiplied by max_norm / (total + 1e-6) (torch's clip_grad_norm_,
    which in fact multiplies by clamp(max_norm / (total + 1e-6), max=1)).
    """
    named = lora_params(peft_model)
    params = [p for _, p in named]
    a = ADAM_PARAMS
    opt = torch.optim.AdamW(params, lr=a["learning_rate"], betas=(a["beta1"], a["beta2"]),
                            eps=a["eps"], weight_decay=a["weight_decay"])
    log = []
    for step in range(ADAM_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = total_loss(peft_model, datums, ADAM_LOSS_FN)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, a["grad_clip_norm"])) \
            if a["grad_clip_norm"] > 0 else float("nan")
        opt.step()
        log.append({"step": step + 1, "loss": float(loss.detach()), "grad_norm_before_clip": norm,
                    "clipped": bool(norm > a["grad_clip_norm"])})
    out = {f"adam.{k}": p.detach().clone() for k, p in named}
    return out, log


def run_adam_given_grads(peft_model, grads: dict) -> dict:
    """The optimizer alone, free of gradient noise: 3 AdamW steps (with clipping) where step t
    uses the fixed gradient `t * grads[key]` (the stored `grad.cross_entropy.*`, exactly as
    saved in f32). End-to-end training amplifies f32 gradient rounding on elements whose
    gradient is near zero (Adam divides by sqrt(v) + eps), so this pins the update rule itself
    to ~1e-7, while `adam.*` checks the whole loop."""
    named = lora_params(peft_model)
    start = {k: p.detach().clone() for k, p in named}
    params = [torch.nn.Parameter(start[k].clone()) for k, _ in named]
    a = ADAM_PARAMS
    opt = torch.optim.AdamW(params, lr=a["learning_rate"], betas=(a["beta1"], a["beta2"]),
                            eps=a["eps"], weight_decay=a["weight_decay"])
    for step in range(1, ADAM_STEPS + 1):
        for (k, _), p in zip(named, params):
            p.grad = grads[f"grad.{ADAM_LOSS_FN}.{k}"].detach().clone().to(torch.float32) * step
        if a["grad_clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, a["grad_clip_norm"])
        opt.step()
    return {f"adam_given_grads.{k}": p.detach().clone() for (k, _), p in zip(named, params)}


# --------------------------------------------------------------------------------------------
# GGUF (what llama.cpp's convert_hf_to_gguf.py would write, at f32)
# --------------------------------------------------------------------------------------------

def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row permutation for q_proj/k_proj of the `llama` architecture.

    HF applies RoPE with rotate_half: within each head, dimension j (< d/2) is rotated together
    with j + d/2. llama.cpp's `llama` graph uses "normal" (interleaved) RoPE, which rotates pairs
    (2j, 2j+1). The converter therefore reorders the rows of each head so that new row 2j is old
    row j and new row 2j+1 is old row j + d/2. Viewing the rows as (head, half, j) and swapping to
    (head, j, half) does exactly that. For k_proj, n_head is the number of KV heads.
    qwen2/qwen3 are converted without this (llama.cpp uses NEOX-style RoPE for them).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_interleaved_rope_equivalence(cfg, inv_freq: torch.Tensor, gen: torch.Generator) -> float:
    """Independent check of the permutation: HF scores (rotate_half RoPE, original rows) must equal
    llama.cpp-style scores (pairs (2j, 2j+1) rotated, permuted rows). Returns the max difference."""
    d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    wq = torch.randn(nh * d, cfg.hidden_size, generator=gen, dtype=torch.float64)
    wk = torch.randn(nkv * d, cfg.hidden_size, generator=gen, dtype=torch.float64)
    x = torch.randn(6, cfg.hidden_size, generator=gen, dtype=torch.float64)
    ang = torch.arange(6, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]  # (pos, d/2)
    cos, sin = ang.cos(), ang.sin()

    def hf_rope(v):  # v: (pos, heads, d); dim j pairs with j + d/2
        a, b = v[..., : d // 2], v[..., d // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    def cpp_rope(v):  # dims (2j, 2j+1) form a pair
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.stack([a * c - b * s, b * c + a * s], dim=-1).reshape(v.shape)

    q_hf = hf_rope((x @ wq.T).view(6, nh, d))
    k_hf = hf_rope((x @ wk.T).view(6, nkv, d))
    q_cpp = cpp_rope((x @ llama_cpp_permute(wq, nh).T).view(6, nh, d))
    k_cpp = cpp_rope((x @ llama_cpp_permute(wk, nkv).T).view(6, nkv, d))
    rep = nh // nkv
    s_hf = torch.einsum("qhd,khd->hqk", q_hf, k_hf.repeat_interleave(rep, dim=1))
    s_cpp = torch.einsum("qhd,khd->hqk", q_cpp, k_cpp.repeat_interleave(rep, dim=1))
    return float((s_hf - s_cpp).abs().max())


def llama3_rope_freqs(cfg) -> torch.Tensor:
    """llama.cpp's `rope_freqs.weight` for rope_type llama3: one divisor per frequency,
    theta_i = pos * inv_freq_i / rope_freqs_i, with
        wavelen < high_freq_wavelen -> 1;  wavelen > low_freq_wavelen -> factor;
        otherwise 1 / ((1 - s)/factor + s),  s = (orig_ctx / wavelen - low) / (high - low)
    (the same curve as transformers' llama3 inv_freq, expressed as a divisor)."""
    rp = cfg.rope_parameters
    dim = cfg.head_dim
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    orig = cfg.original_max_position_embeddings  # top-level copy == rope_parameters' value
    low_wl, high_wl = orig / low, orig / high
    out = []
    for f in inv.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            s = (orig / wl - low) / (high - low)
            out.append(1.0 / ((1.0 - s) / factor + s))
    return torch.tensor(out, dtype=torch.float32)


def write_gguf(path: Path, arch_name: str, name: str, cfg, state: dict) -> dict:
    """Write the HF weights in `state` as an all-f32 GGUF the way llama.cpp's converter does:

    metadata (general.architecture is added by GGUFWriter):
      general.name, general.file_type = 0 (ALL_F32), general.quantization_version = 2,
      {arch}.block_count, .context_length, .embedding_length, .feed_forward_length,
      .attention.head_count, .attention.head_count_kv, .rope.freq_base,
      .attention.layer_norm_rms_epsilon, .attention.key_length/.value_length (config.json has
      head_dim), and for llama only: .vocab_size and .rope.dimension_count.
    tensors: HF names mapped with gguf-py's own TensorNameMap (token_embd, blk.N.attn_norm,
      attn_q, attn_k, attn_v, attn_output, [attn_q_norm, attn_k_norm], ffn_norm, ffn_gate, ffn_up,
      ffn_down, output_norm, output); llama additionally gets permuted q/k rows and, for llama3
      RoPE, a rope_freqs tensor. No tokenizer section.
    Tensors are given in PyTorch shape (rows, cols); GGUF stores ne = (cols, rows).
    """
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}[arch_name]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch_name == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    names = []
    if arch_name == "llama" and cfg.rope_parameters.get("rope_type") == "llama3":
        # the converter emits generated tensors first
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(cfg).numpy())
        names.append("rope_freqs.weight")
    for hf_name, t in state.items():
        t = t.detach().to(torch.float32)
        if arch_name == "llama":
            if hf_name.endswith("q_proj.weight"):
                t = llama_cpp_permute(t, cfg.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                t = llama_cpp_permute(t, cfg.num_key_value_heads)
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        w.add_tensor(gname, t.contiguous().numpy())
        names.append(gname)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": path.name, "architecture": gguf.MODEL_ARCH_NAMES[arch], "tensors": names}


# --------------------------------------------------------------------------------------------
# Tiny-model fixtures
# --------------------------------------------------------------------------------------------

def make_tiny(name: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    spec = TINY[name]
    out_dir = FIXTURES / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    gen = _setup(SEEDS[name])
    notes: dict = {}

    # ---- base model --------------------------------------------------------------------------
    cfg = spec["config"]()
    cfg._attn_implementation = "eager"  # runtime only; not written to config.json
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    randomize_base(model, gen)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    saved_base = load_file(out_dir / "model.safetensors")
    notes["model_safetensors_keys"] = sorted(saved_base)

    datums = make_datums(spec["lengths"], gen)
    expected: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, d in enumerate(datums):
            lp, logits = ca.target_logprobs(model, d["tokens"], d["target_tokens"], return_logits=True)
            expected[f"logprobs.base.{i}"] = lp.clone()
            expected[f"logits.base.{i}"] = logits.clone()

    # ---- model-specific checks ---------------------------------------------------------------
    rotary = model.model.rotary_emb
    notes["rope_inv_freq"] = _f32_list(rotary.inv_freq)
    if name == "tiny-llama":
        dim = cfg.head_dim
        plain = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        changed = (rotary.inv_freq - plain).abs() > 1e-9
        notes["rope_inv_freq_unscaled"] = _f32_list(plain)
        notes["rope_llama3_changed_indices"] = [i for i, c in enumerate(changed.tolist()) if c]
        assert changed.any(), "llama3 scaling changed nothing"
    if name == "tiny-mistral":
        notes["sliding_window_check"] = check_sliding_window(model, datums, cfg.sliding_window)

    # ---- LoRA adapter ------------------------------------------------------------------------
    lcfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      use_rslora=spec["rslora"])
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for _, p in lora_params(peft_model):
            p.copy_(LORA_INIT_STD * torch.randn(p.shape, generator=gen))
    peft_model.eval()
    adapter_dir = out_dir / "adapter"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    readme = adapter_dir / "README.md"  # PEFT's boilerplate model card; not needed
    if readme.exists():
        readme.unlink()
    # PEFT keeps target_modules as a set, so its saved order depends on Python's per-process string
    # hashing; sort it (same JSON layout PEFT uses: indent 2, sorted keys) for reproducible bytes.
    acfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(acfg_path.read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])
    acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True))
    saved_keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    keys = [k for k, _ in lora_params(peft_model)]
    assert saved_keys == set(keys), (saved_keys ^ set(keys))
    scaling = LORA_ALPHA / (math.sqrt(LORA_R) if spec["rslora"] else LORA_R)

    with torch.no_grad():
        for i, d in enumerate(datums):
            lp, logits = ca.target_logprobs(peft_model, d["tokens"], d["target_tokens"], return_logits=True)
            expected[f"logprobs.adapter.{i}"] = lp.clone()
            expected[f"logits.adapter.{i}"] = logits.clone()
            # sampling-time logprobs: the adapter's own, plus noise, so that PPO/CISPO clip
            d["logprobs"] = (lp + OLD_LOGPROB_NOISE * torch.randn(lp.shape, generator=gen)).float()
        with peft_model.disable_adapter():
            for i, d in enumerate(datums):
                lp = ca.target_logprobs(peft_model, d["tokens"], d["target_tokens"])
                assert torch.allclose(lp, expected[f"logprobs.base.{i}"], atol=1e-6)

    # Write the datums, then read them back through the checker's parser so every later number is
    # computed from exactly what the Rust side will read.
    with open(out_dir / "datums.jsonl", "w") as f:
        for d in datums:
            f.write(json.dumps(datum_json(d)) + "\n")
    datums = ca.read_datums(str(out_dir / "datums.jsonl"))

    # ---- losses and gradients ----------------------------------------------------------------
    named = lora_params(peft_model)
    losses = {}
    clip_stats = {}
    for fn in ca.LOSS_FNS:
        peft_model.zero_grad(set_to_none=True)
        loss = total_loss(peft_model, datums, fn)
        loss.backward()
        losses[fn] = float(loss.detach())
        expected[f"loss.{fn}"] = loss.detach().reshape(1).clone()
        for k, p in named:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"zero grad {fn} {k}"
            expected[f"grad.{fn}.{k}"] = p.grad.detach().clone()
    peft_model.zero_grad(set_to_none=True)
    with torch.no_grad():
        lp_all = torch.cat([ca.target_logprobs(peft_model, d["tokens"], d["target_tokens"]) for d in datums])
        old_all = torch.cat([d["logprobs"] for d in datums])
        adv_all = torch.cat([d["advantages"] for d in datums])
        r = torch.exp(lp_all - old_all)
        for fn in ("ppo", "cispo"):
            c = ca.DEFAULT_LOSS_FN_CONFIG[fn]
            lo, hi = c["clip_low_threshold"], c["clip_high_threshold"]
            st = {"ratio_below_low": int((r < lo).sum()), "ratio_above_high": int((r > hi).sum()),
                  "positions": int(r.numel())}
            if fn == "ppo":
                # positions where min() picks the clipped term and the gradient is cut
                st["clipped_active_low"] = int(((r < lo) & (adv_all < 0)).sum())
                st["clipped_active_high"] = int(((r > hi) & (adv_all > 0)).sum())
            clip_stats[fn] = st
    assert clip_stats["ppo"]["clipped_active_low"] > 0 and clip_stats["ppo"]["clipped_active_high"] > 0, \
        f"PPO clipping does not trigger in both directions: {clip_stats['ppo']}"

    # ---- AdamW -------------------------------------------------------------------------------
    adam_exact = run_adam_given_grads(peft_model, expected)
    adam_out, adam_log = run_adam(peft_model, datums)
    expected.update(adam_out)
    expected.update(adam_exact)
    assert any(s["clipped"] for s in adam_log), f"grad clipping never triggered: {adam_log}"

    expected = {k: v.detach().to(torch.float32).contiguous() for k, v in expected.items()}
    save_file(expected, out_dir / "expected.safetensors")

    # ---- sanity ------------------------------------------------------------------------------
    for k, v in expected.items():
        assert torch.isfinite(v).all(), k
    adapter_effect = max((expected[f"logprobs.adapter.{i}"] - expected[f"logprobs.base.{i}"]).abs().max().item()
                         for i in range(len(datums)))
    assert adapter_effect > 0.05, f"adapter barely changes logprobs ({adapter_effect})"

    # ---- reload through the checker (what a PEFT user would do) -------------------------------
    rows = [{"logprobs": _f32_list(expected[f"logprobs.adapter.{i}"]),
             "loss": float(ca.loss_sum("cross_entropy", expected[f"logprobs.adapter.{i}"], d))}
            for i, d in enumerate(datums)]
    reloaded = ca.load_model(str(out_dir), str(adapter_dir))
    rl_lp, rl_loss, ok = ca.compare(reloaded, datums, rows, 1e-5, "cross_entropy", verbose=False)
    assert ok, f"reloaded HF+PEFT model disagrees: {rl_lp} {rl_loss}"
    # the checker must also reject a wrong answer
    bad = [dict(r, logprobs=[x + 1e-3 for x in r["logprobs"]]) for r in rows]
    assert not ca.compare(reloaded, datums, bad, 1e-4, "cross_entropy", verbose=False)[2]

    # ---- GGUF --------------------------------------------------------------------------------
    gguf_info = None
    if spec["gguf"]:
        gguf_info = write_gguf(out_dir / "model.gguf", spec["gguf"], name, cfg, base_state)
        gbase = ca.load_model(str(out_dir / "model.gguf"), None)
        gbase_rows = [{"logprobs": _f32_list(expected[f"logprobs.base.{i}"])} for i in range(len(datums))]
        g_lp_base, _, ok_b = ca.compare(gbase, datums, gbase_rows, 1e-4, "cross_entropy", verbose=False)
        gpeft = ca.load_model(str(out_dir / "model.gguf"), str(adapter_dir))
        g_lp_ad, _, ok_a = ca.compare(gpeft, datums, rows, 1e-4, "cross_entropy", verbose=False)
        assert ok_b and ok_a, f"GGUF via transformers disagrees: base {g_lp_base} adapter {g_lp_ad}"
        gguf_info["transformers_max_abs_logprob_diff"] = {"base": g_lp_base, "adapter": g_lp_ad}
        if spec["gguf"] == "llama":
            # uses its own generator so the fixture's random stream is unaffected
            err = check_interleaved_rope_equivalence(cfg, rotary.inv_freq, torch.Generator().manual_seed(7))
            assert err < 1e-9, f"permuted q/k + interleaved RoPE != HF RoPE ({err})"
            gguf_info["permute_check_max_abs_score_diff"] = err
        gguf_info["q_k_rows_permuted"] = spec["gguf"] == "llama"
        gguf_info["rope_style"] = ("llama.cpp 'normal' RoPE: rotate pairs (2j, 2j+1) of the permuted rows"
                                   if spec["gguf"] == "llama" else
                                   "llama.cpp 'neox' RoPE: rotate (j, j + head_dim/2), rows as in HF")

    # ---- expected.json -----------------------------------------------------------------------
    meta = {
        "loss_fn_config": ca.DEFAULT_LOSS_FN_CONFIG,
        "adam_params": ADAM_PARAMS,
        "adam_steps": ADAM_STEPS,
        "adam_loss_fn": ADAM_LOSS_FN,
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "head_dim_in_config_json": getattr(cfg, "head_dim", None) is not None,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "sliding_window": getattr(cfg, "sliding_window", None),
        "datum_lengths": spec["lengths"],
        "lora": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "use_rslora": spec["rslora"],
                 "scaling": scaling, "target_modules": LORA_TARGETS,
                 "formula": "W' = W + scaling * B @ A; scaling = alpha/r, or alpha/sqrt(r) with rslora",
                 "keys": keys},
        "losses": losses,
        "clip_stats": clip_stats,
        "adam_log": adam_log,
        "max_abs_adapter_effect_on_logprobs": adapter_effect,
        "reload_check_max_abs_logprob_diff": rl_lp,
        "gguf": gguf_info,
        "seed": SEEDS[name],
        "versions": _versions(),
        **notes,
    }
    with open(out_dir / "expected.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return meta


def check_sliding_window(model, datums, window: int) -> dict:
    """Run the longest datum with and without the sliding window (config.sliding_window is read at
    forward time to pick the mask). Positions q < window see all of 0..q either way, so their
    logits must agree; from q = window on they see fewer keys and must differ. This pins down the
    transformers semantics k in (q - window, q]."""
    d = max(datums, key=lambda d: d["tokens"].numel())
    n = d["tokens"].numel()
    assert n > window
    with torch.no_grad():
        _, with_w = ca.target_logprobs(model, d["tokens"], d["target_tokens"], return_logits=True)
        model.config.sliding_window = None
        try:
            _, without = ca.target_logprobs(model, d["tokens"], d["target_tokens"], return_logits=True)
        finally:
            model.config.sliding_window = window
    diff = (with_w - without).abs().max(dim=-1).values
    same = [q for q in range(n) if diff[q] < 1e-6]
    assert same == list(range(window)), f"sliding window not applied as expected: {diff.tolist()}"
    return {"datum_length": n, "positions_equal_to_full_causal": same,
            "max_logit_diff_per_position": [float(x) for x in diff],
            "semantics": f"query q attends keys k with q - {window} < k <= q"}


def _versions() -> dict:
    import gguf  # noqa: F401
    import peft
    import safetensors
    import transformers
    from importlib.metadata import version

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__,
            "gguf": version("gguf"), "numpy": np.__version__}


# --------------------------------------------------------------------------------------------
# SmolLM2 greedy fixture
# --------------------------------------------------------------------------------------------

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_MAX_NEW = 32
SMOL_CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "List three prime numbers greater than 100."}],
    [
        {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."},
        {"role": "user", "content": "Hi! My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ],
]


def make_smollm2() -> dict | None:
    """Greedy-decode 3 chat prompts with the real SmolLM2-135M-Instruct Q4_1 GGUF in transformers.

    transformers dequantizes the Q4_1 blocks to fp32 (and un-permutes llama's q/k rows), so this is
    the fp32 forward of exactly the weights in the GGUF. For each case we record
      prompt_tokens    apply_chat_template(messages, add_generation_prompt=True)
      greedy_tokens    model.generate(do_sample=False, num_beams=1, max_new_tokens=32) new tokens;
                       generation stops after emitting EOS, and the EOS token IS included
      greedy_logprobs  log_softmax logprob of each chosen token, from one full (no KV cache) forward
                       pass over prompt + generated tokens
      prompt_logprobs  [null, logprob of prompt token i given tokens < i, ...]
      greedy_margin    top1 - top2 logit gap at each generated step (small = near-tie, an engine
                       with slightly different arithmetic may legitimately pick the other token)
    The greedy tokens are cross-checked against a plain argmax loop over full forward passes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = ROOT / "models" / SMOL_GGUF
    if not gguf_path.exists():
        print(f"  skipping smollm2: {gguf_path} missing (run tools/get-smollm2.sh)")
        return None
    _setup(SEEDS["smollm2"])
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=SMOL_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=SMOL_GGUF,
                                                 dtype=torch.float32, attn_implementation="eager").eval()
    eos = tok.eos_token_id
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=SMOL_MAX_NEW,
                               repetition_penalty=1.0, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id)
    cases = []
    for messages in SMOL_CASES:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True)
        prompt = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
        new = out[0, len(prompt):].tolist()
        # plain argmax loop (no KV cache) as a cross-check of generate()
        seq = list(prompt)
        manual = []
        with torch.no_grad():
            for _ in range(SMOL_MAX_NEW):
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                t = int(logits.argmax())
                manual.append(t)
                seq.append(t)
                if t == eos:
                    break
        full = prompt + new
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full]), use_cache=False).logits[0].float()
        lps = torch.log_softmax(logits, dim=-1)
        # logits at position p predict token p+1
        prompt_lp = [None] + [float(lps[p - 1, full[p]]) for p in range(1, len(prompt))]
        greedy_lp = [float(lps[len(prompt) - 1 + j, t]) for j, t in enumerate(new)]
        top2 = logits[len(prompt) - 1: len(full) - 1].topk(2, dim=-1).values
        margin = [float(x) for x in (top2[:, 0] - top2[:, 1])]
        assert all(math.isfinite(x) for x in greedy_lp + prompt_lp[1:])
        cases.append({
            "messages": messages,
            "prompt_text": tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            "prompt_tokens": prompt,
            "greedy_tokens": new,
            "greedy_text": tok.decode(new),
            "greedy_logprobs": greedy_lp,
            "greedy_margin": margin,
            "prompt_logprobs": prompt_lp,
            "stopped_at_eos": bool(new and new[-1] == eos),
            "generate_matches_argmax_loop": manual == new,
        })
        if manual != new:
            print(f"  WARNING: generate() and the argmax loop differ: {new} vs {manual}")
    result = {
        "gguf": SMOL_GGUF,
        "eos_token_id": eos,
        "eos_token": tok.eos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_included_in_greedy_tokens": True,
        "max_new_tokens": SMOL_MAX_NEW,
        "generation": "greedy: do_sample=False, num_beams=1, repetition_penalty=1.0, no other "
                      "logits processors; stop after emitting eos_token_id (kept in greedy_tokens) "
                      "or after max_new_tokens",
        "notes": "fp32 forward of the dequantized Q4_1 weights, eager attention, batch 1, no "
                 "padding; the chat template (from the GGUF) injects SmolLM2's default system "
                 "prompt when there is no system message. *_logprobs come from one full forward "
                 "pass without KV cache.",
        "versions": _versions(),
        "cases": cases,
    }
    out_dir = FIXTURES / "smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "greedy.json", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return result


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Regenerate tests/fixtures/")
    p.add_argument("--only", action="append", choices=list(TINY) + ["smollm2"],
                   help="regenerate only this fixture (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    names = args.only or (list(TINY) + ["smollm2"])
    t0 = time.time()
    for name in names:
        t = time.time()
        print(f"{name} ...", flush=True)
        if name == "smollm2":
            res = make_smollm2()
            if res:
                for c in res["cases"]:
                    print(f"  {len(c['prompt_tokens'])} prompt + {len(c['greedy_tokens'])} new tokens, "
                          f"eos={c['stopped_at_eos']}: {c['greedy_text']!r}")
        else:
            meta = make_tiny(name)
            print(f"  losses: " + ", ".join(f"{k}={v:.4f}" for k, v in meta["losses"].items()))
            print(f"  adam grad norms: {[round(s['grad_norm_before_clip'], 3) for s in meta['adam_log']]}; "
                  f"adapter effect {meta['max_abs_adapter_effect_on_logprobs']:.3f}; "
                  f"ppo clip {meta['clip_stats']['ppo']}")
            if meta["gguf"]:
                print(f"  gguf via transformers: {meta['gguf']['transformers_max_abs_logprob_diff']}")
        print(f"  done in {time.time() - t:.1f}s", flush=True)
    print(f"total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
