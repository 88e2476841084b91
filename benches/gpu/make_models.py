#!/usr/bin/env python3
"""Random-weight models of two real shapes, and the token data both sides train and sample on.

  llama-3.2-1b  Llama-3.2-1B's config (16 layers, hidden 2048, 32 heads / 8 kv heads of 64,
                MLP 8192, vocab 128256, llama3 RoPE scaling, tied embedding)
  qwen3-1.7b    Qwen3-1.7B's config (28 layers, hidden 2048, 16 heads / 8 kv heads of 128,
                q/k norm, MLP 6144, vocab 151936, tied embedding)

Weights: transformers' own initialisation (seed 0), saved in bf16 safetensors with config.json.
Data: `datums.jsonl`, 64 Tinker datums of --seq-len random tokens (every position trained), and
`prompts.jsonl`, --prompts prompts of 128 random tokens. The same files feed whet and PyTorch.
No tokenizer is needed: both sides take token ids.

  python3 make_models.py --out /tmp/whet-gpu-bench [--seq-len 2048] [--prompts 32]

--tiny makes the same two architectures at toy sizes (2 layers, hidden 64, vocab 1000; the
config keys unchanged) to smoke-test the pipeline on a CPU.
"""

import argparse
import json
import os
import random

SHAPES = {
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=128000,
        eos_token_id=128001),
    "qwen3-1.7b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2048,
        intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
        hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    shapes = SHAPES
    if args.tiny:
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000)
        shapes = {k: {**v, **small} for k, v in SHAPES.items()}

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, cfg in shapes.items():
        d = os.path.join(args.out, name)
        if os.path.exists(os.path.join(d, "model.safetensors")):
            continue
        os.makedirs(d, exist_ok=True)
        torch.manual_seed(0)
        config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
        config.architectures = cfg["architectures"]
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        model.save_pretrained(d, safe_serialization=True)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {d}")

    rng = random.Random(0)
    vocab = min(c["vocab_size"] for c in shapes.values())
    with open(os.path.join(args.out, "datums.jsonl"), "w") as f:
        for _ in range(args.rows):
            toks = [rng.randrange(vocab) for _ in range(args.seq_len + 1)]
            f.write(json.dumps({
                "model_input": {"chunks": [{"type": "encoded_text", "tokens": toks[:-1]}]},
                "loss_fn_inputs": {
                    "target_tokens": {"data": toks[1:], "dtype": "int64", "shape": [args.seq_len]},
                    "weights": {"data": [1.0] * args.seq_len, "dtype": "float32",
                                "shape": [args.seq_len]}}}) + "\n")
    with open(os.path.join(args.out, "prompts.jsonl"), "w") as f:
        for _ in range(args.prompts):
            f.write(json.dumps({"tokens": [rng.randrange(vocab) for _ in range(128)]}) + "\n")


if __name__ == "__main__":
    main()
