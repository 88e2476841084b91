#!/usr/bin/env python3
"""Prove that PyTorch + PEFT load a LoRA adapter written by whet, and agree with whet's numbers.

Usage:
    python3 tools/check_adapter.py --model M --adapter ADAPTER_DIR --data DATUMS.jsonl \
        --whet WHET_OUTPUT.jsonl [--tol 1e-4] [--loss-fn cross_entropy]

* ``M`` is a Hugging Face model directory (config.json + model.safetensors) or a ``.gguf`` file.
* ``ADAPTER_DIR`` is a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors); it is
  loaded with ``PeftModel.from_pretrained``. Pass ``--adapter none`` to check the bare base model.
* ``DATUMS.jsonl`` holds one Tinker datum per line (see ``read_datums``).
* ``WHET_OUTPUT.jsonl`` holds one line per datum, in the same order: ``{"logprobs": [...], "loss": x}``.
  ``logprobs[i]`` is whet's log-probability of ``target_tokens[i]``; ``loss`` (optional, may be null)
  is whet's loss for that datum alone, for the loss function chosen with ``--loss-fn``.

Prints the maximum absolute logprob difference (and loss difference) and exits 1 when a difference
is over the tolerance (logprobs: ``--tol``; per-datum loss: ``--tol`` times the number of target
positions of that datum, since the loss is a sum of that many terms).

The helpers here (datum parsing, per-position logprobs, the Tinker losses, model loading) are also
imported by ``tools/make_fixtures.py`` so that the fixtures and this checker share one definition.

Conventions (Tinker's contract):
* Position i of the input tokens predicts ``target_tokens[i]``; ``len(target_tokens) == len(tokens)``.
  So ``logprobs[i] = log_softmax(logits[i])[target_tokens[i]]`` where ``logits[i]`` is the model
  output at input position i. There is no extra shift: the caller already shifted the targets.
* Each datum is run as its own sequence: batch of 1, no padding, position ids 0..n-1, causal mask.
* Losses are SUMS over target positions (never means); see ``loss_sum``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")

# The loss configs used throughout the fixtures (clip thresholds for cispo are deliberately not the
# defaults, so an engine that ignores the config shows up).
DEFAULT_LOSS_FN_CONFIG = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "dro": {"beta": 0.1},
}


# --------------------------------------------------------------------------------------------
# Datums
# --------------------------------------------------------------------------------------------

def _tensor_field(field: dict, dtype: torch.dtype) -> torch.Tensor:
    """A Tinker TensorData dict ``{"data": [...], "dtype": ..., "shape": [...]}`` as a torch tensor."""
    t = torch.tensor(field["data"], dtype=dtype)
    shape = field.get("shape")
    if shape is not None:
        t = t.reshape(shape)
    return t


def parse_datum(d: dict) -> dict:
    """Flatten one Tinker datum into tensors.

    Returns ``{"tokens": int64 (n,), "target_tokens": int64 (n,), "weights"/"logprobs"/"advantages":
    float32 (n,) when present}``. The model input is the concatenation of its encoded_text chunks.
    """
    tokens: list[int] = []
    for chunk in d["model_input"]["chunks"]:
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise ValueError(f"unsupported chunk type {chunk.get('type')!r}")
        tokens.extend(int(t) for t in chunk["tokens"])
    out = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
    inputs = d["loss_fn_inputs"]
    out["target_tokens"] = _tensor_field(inputs["target_tokens"], torch.int64)
    for key in ("weights", "logprobs", "advantages"):
        if key in inputs:
            out[key] = _tensor_field(inputs[key], torch.float32)
    n = out["tokens"].numel()
    for key, value in out.items():
        if value.numel() != n:
            raise ValueError(f"datum field {key} has {value.numel()} entries, model input has {n}")
    return out


def read_datums(path: str) -> list[dict]:
    with open(path) as f:
        return [parse_datum(json.loads(line)) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# Forward pass and losses
# --------------------------------------------------------------------------------------------

def target_logprobs(model, tokens: torch.Tensor, targets: torch.Tensor, return_logits: bool = False):
    """Per-position log-probabilities of ``targets`` (shape (n,)), one sequence, no padding.

    logits[i] is the output at input position i (it has seen tokens[0..=i]); it scores targets[i].
    """
    n = tokens.numel()
    out = model(
        input_ids=tokens.view(1, n),
        position_ids=torch.arange(n, dtype=torch.int64).view(1, n),
        use_cache=False,
    )
    logits = out.logits[0].float()  # (n, vocab)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.view(n, 1)).view(n)
    return (lp, logits) if return_logits else lp


def loss_sum(loss_fn: str, lp: torch.Tensor, datum: dict, cfg: dict | None = None) -> torch.Tensor:
    """Tinker's loss for one datum, summed over its target positions (a 0-d tensor).

    lp  = logprob of the target under the current weights (differentiable),
    old = loss_fn_inputs.logprobs (sampling-time logprobs), A = advantages, w = weights,
    r   = exp(lp - old) (the importance ratio).

    cross_entropy:        -sum(w * lp)
    importance_sampling:  -sum(r * A)
    ppo:                  -sum(min(r * A, clamp(r, lo, hi) * A))
    cispo:                -sum(stopgrad(clamp(r, lo, hi)) * lp * A)
    dro:                  -sum(lp * A - 0.5 * beta * (lp - old)^2)
    """
    cfg = DEFAULT_LOSS_FN_CONFIG[loss_fn] if cfg is None else cfg
    if loss_fn == "cross_entropy":
        return -(datum["weights"] * lp).sum()
    old, adv = datum["logprobs"], datum["advantages"]
    ratio = torch.exp(lp - old)
    if loss_fn == "importance_sampling":
        return -(ratio * adv).sum()
    if loss_fn == "ppo":
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        return -torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv).sum()
    if loss_fn == "cispo":
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        return -(torch.clamp(ratio, lo, hi).detach() * lp * adv).sum()
    if loss_fn == "dro":
        beta = cfg["beta"]
        return -(lp * adv - 0.5 * beta * (lp - old) ** 2).sum()
    raise ValueError(f"unknown loss_fn {loss_fn!r}")


# --------------------------------------------------------------------------------------------
# Model loading (HF directory or GGUF file)
# --------------------------------------------------------------------------------------------

def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def load_base_model(model_path: str):
    """Load a causal LM in fp32 with eager attention, from a HF directory or a ``.gguf`` file.

    For GGUF, transformers 5.24 converts the tensors back to HF layout (it un-permutes llama's
    q/k rows) but misses three things that whet's GGUF fixtures use, so they are patched here:
      * ``{arch}.attention.key_length`` is not read for qwen3, so a head_dim != hidden/heads
        (tiny-qwen3 has 32 != 64/4) would be lost -> set config.head_dim from it.
      * without a tokenizer in the file, vocab_size is only known from ``{arch}.vocab_size``, which
        llama.cpp's converter writes for llama but not for qwen2/qwen3 -> take it from
        token_embd's shape.
      * llama.cpp stores llama3 RoPE scaling as a ``rope_freqs.weight`` tensor of per-frequency
        divisors (theta_i = pos * inv_freq_i / rope_freqs_i), which transformers ignores ->
        divide the rotary embedding's inv_freq by it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not model_path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, attn_implementation="eager"
        )
        return model.eval()

    import gguf

    directory, name = os.path.split(os.path.abspath(model_path))
    reader = gguf.GGUFReader(model_path)
    arch = _gguf_field(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}

    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    key_length = _gguf_field(reader, f"{arch}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length)
    # numpy shape of token_embd is (n_vocab, n_embd) (GGUF's ne order reversed)
    config.vocab_size = int(tensors["token_embd.weight"].data.shape[0])
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, config=config, dtype=torch.float32, attn_implementation="eager"
    )
    if "rope_freqs.weight" in tensors:
        factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data, dtype=np.float32))
        patched = 0
        for module in model.modules():
            inv = getattr(module, "inv_freq", None)
            if isinstance(inv, torch.Tensor) and inv.shape == factors.shape:
                module.inv_freq = inv / factors
                if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                    module.original_inv_freq = module.original_inv_freq / factors
                patched += 1
        if patched == 0:
            raise RuntimeError("rope_freqs.weight present but no rotary embedding to apply it to")
    return model.eval()


def load_model(model_path: str, adapter_dir: str | None):
    model = load_base_model(model_path)
    if adapter_dir and adapter_dir.lower() != "none":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------

def compare(model, datums: list[dict], whet_rows: list[dict], tol: float, loss_fn: str,
            loss_cfg: dict | None = None, verbose: bool = True) -> tuple[float, float, bool]:
    """Return (max logprob diff, max loss diff, ok)."""
    if len(whet_rows) != len(datums):
        raise ValueError(f"{len(datums)} datums but {len(whet_rows)} whet output lines")
    max_lp, max_loss, ok = 0.0, 0.0, True
    with torch.no_grad():
        for i, (datum, row) in enumerate(zip(datums, whet_rows)):
            lp = target_logprobs(model, datum["tokens"], datum["target_tokens"])
            theirs = torch.tensor(row["logprobs"], dtype=torch.float64)
            if theirs.numel() != lp.numel():
                raise ValueError(f"datum {i}: whet gave {theirs.numel()} logprobs, expected {lp.numel()}")
            if not torch.isfinite(theirs).all():
                ok = False
            d = (lp.double() - theirs).abs().max().item() if lp.numel() else 0.0
            max_lp = max(max_lp, d)
            if d > tol or math.isnan(d):
                ok = False
            line = f"datum {i}: n={lp.numel():3d} max|dlogprob|={d:.3e}"
            if row.get("loss") is not None:
                ref = loss_sum(loss_fn, lp, datum, loss_cfg).item()
                dl = abs(ref - float(row["loss"]))
                max_loss = max(max_loss, dl)
                if dl > tol * max(1, lp.numel()) or math.isnan(dl):
                    ok = False
                line += f" loss(ref)={ref:.6f} loss(whet)={float(row['loss']):.6f} |d|={dl:.3e}"
            if verbose:
                print(line)
    return max_lp, max_loss, ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model dir or .gguf file")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter dir ('none' for the base model)")
    p.add_argument("--data", required=True, help="datums.jsonl (Tinker datums, one per line)")
    p.add_argument("--whet", required=True, help="whet output jsonl: {\"logprobs\": [...], \"loss\": x} per line")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs logprob difference (default 1e-4)")
    p.add_argument("--loss-fn", default="cross_entropy", choices=LOSS_FNS,
                   help="loss the per-datum 'loss' field is checked against (default cross_entropy)")
    p.add_argument("--loss-config", default=None,
                   help="JSON loss_fn_config for --loss-fn (default: the fixtures' config)")
    args = p.parse_args(argv)

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    datums = read_datums(args.data)
    with open(args.whet) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    model = load_model(args.model, args.adapter)
    cfg = json.loads(args.loss_config) if args.loss_config else None
    max_lp, max_loss, ok = compare(model, datums, rows, args.tol, args.loss_fn, cfg)
    print(f"max abs logprob diff: {max_lp:.3e} (tol {args.tol:g})")
    print(f"max abs loss diff:    {max_loss:.3e} ({args.loss_fn})")
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
