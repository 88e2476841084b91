#!/usr/bin/env python3
"""PyTorch + PEFT on the GPU: the side whet is compared against in benches/gpu/run.sh.

  sft     bf16 weights, LoRA r=16 alpha=32 on q/k/v/o/gate/up/down (PEFT), AdamW on the adapter
          (fp32 master weights, as PEFT keeps them), SDPA attention (flash kernels on H100/H200),
          one step = --batch sequences of the datums file, loss = mean token NLL (every sequence
          has the same length, so the batch needs no padding). Timed: --steps
          steps after --warmup, torch.cuda.synchronize() around each.
  sample  model.generate over every prompt in one left-padded batch, greedy, min_new_tokens =
          max_new_tokens (every row makes the same number of tokens), static KV cache off.

Prints one JSON line (trained_tokens_per_s or new_tokens_per_s, plus torch's own
max_memory_allocated); peak GPU memory as the driver sees it comes from gpu_peak.py around the
whole process, the same measurement as whet's.
"""

import argparse
import json
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16,
                                                attn_implementation="sdpa").cuda()


def sft(args):
    import torch
    from peft import LoraConfig, get_peft_model

    rows = [json.loads(l) for l in open(args.data) if l.strip()]
    model = get_peft_model(load(args.model), LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    timed, tokens = 0.0, 0
    for step in range(args.warmup + args.steps):
        batch = [rows[(step * args.batch + i) % len(rows)] for i in range(args.batch)]
        ids = torch.tensor([r["model_input"]["chunks"][0]["tokens"] for r in batch]).cuda()
        tgt = torch.tensor([r["loss_fn_inputs"]["target_tokens"]["data"] for r in batch]).cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n = ids.numel()
        print(f"step {step}: {n} tokens {dt:.3f}s {n / dt:.0f} tok/s loss {loss.item():.4f}",
              file=sys.stderr)
        if step >= args.warmup:
            timed += dt
            tokens += n
    print(json.dumps({"variant": "torch+peft", "trained_tokens_per_s": tokens / timed,
                      "s_per_step": timed / args.steps, "tokens": tokens,
                      "torch_max_memory_allocated": torch.cuda.max_memory_allocated()}))


def sample(args):
    import torch

    model = load(args.model).eval()
    prompts = [json.loads(l)["tokens"] for l in open(args.prompts) if l.strip()]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts]).cuda()
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).cuda()
    with torch.no_grad():
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2,
                       do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens,
                             min_new_tokens=args.max_tokens, do_sample=False)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    new = (out.shape[1] - width) * out.shape[0]
    print(json.dumps({"variant": "torch", "new_tokens_per_s": new / secs, "seconds": secs,
                      "new_tokens": new,
                      "torch_max_memory_allocated": torch.cuda.max_memory_allocated()}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sft")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--rank", type=int, default=16)
    g = sub.add_parser("sample")
    g.add_argument("--model", required=True)
    g.add_argument("--prompts", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    sft(args) if args.cmd == "sft" else sample(args)


if __name__ == "__main__":
    main()
