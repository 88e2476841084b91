#!/usr/bin/env python3
"""Sampling throughput of transformers' `generate` on this CPU (the cost of an RL rollout).

The 16 prompts of benches/data/sample_prompts.jsonl (chat-templated token ids) in one left-padded
batch, `--max-tokens` new tokens each (min_new_tokens = max_new_tokens, so every row makes them all),
plain sampling at temperature 1 (do_sample, top_k=0, top_p=1), fp32 (or the model cast to bfloat16
with --bf16), KV cache on, 2 threads. One short
warm-up generate runs first and is not timed. Prints one JSON line on stdout.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=os.path.join(common.DATA, "sample_prompts.jsonl"))
    ap.add_argument("--bf16", action="store_true", help="cast the model to bfloat16 (oneDNN's bf16 matmuls)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line (always on)")
    args = ap.parse_args()

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(common.THREADS)
    tok = common.load_tokenizer()
    model = common.load_model().eval()
    if args.bf16:
        model = model.to(torch.bfloat16)
    prompts = [p["tokens"] for p in common.read_jsonl(args.prompts)]

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def generate(n):
        with torch.inference_mode():
            return model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
            )

    generate(4)  # warm-up
    t = time.perf_counter()
    out = generate(args.max_tokens)
    seconds = time.perf_counter() - t
    new = out[:, width:]
    # min_new_tokens keeps EOS away, so every row makes max_tokens; count what is there all the same.
    new_tokens = int(new.numel())
    common.log(f"generated {tuple(new.shape)} in {seconds:.2f} s; first row: {tok.decode(new[0])!r}")
    common.emit({
        "variant": "generate-bf16" if args.bf16 else "generate",
        "new_tokens_per_s": round(new_tokens / seconds, 2),
        "seconds": round(seconds, 3),
        "new_tokens": new_tokens,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
