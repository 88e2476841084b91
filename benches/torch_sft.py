#!/usr/bin/env python3
"""LoRA SFT throughput of PyTorch on this CPU, the side whet is compared against.

Variants (all: SmolLM2-135M-Instruct in fp32 weights, LoRA on q/k/v/o/gate/up/down, batch of 8 rows,
AdamW, 2 threads, max length 512, loss on every token of each chat -- TRL's default for a
"messages" dataset, assistant_only_loss=False):

  trl       TRL's SFTTrainer with its defaults except bf16=False (fp32): padded batches, gradient
            checkpointing on, random sampler (seed 42). Rows: benches/data/sft_rows.jsonl.
  trl-bf16  the same with TRL's real default on this CPU, bf16=True (autocast to bfloat16).
  loop      a hand-written PyTorch + PEFT loop, padding-free: each row of the batch is its own forward
            (no padding, no attention mask, no gradient checkpointing), loss = the mean token NLL over
            the batch (sum over the batch's target tokens / their count, as TRL normalizes), one
            backward per row, one optimizer step per batch. Rows: benches/data/sft_datums.jsonl, in
            file order (the same token ids whet-bench trains on).
  loop-bf16 the same loop under CPU autocast to bfloat16 (the matmuls in bf16, weights kept fp32):
            the peer of whet's --precision bf16.

Timing covers `--steps` optimizer steps after `--warmup` steps; model load and data preparation are not
timed. Prints one JSON line on stdout; progress goes to stderr.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(args):
    from peft import LoraConfig

    # lora_dropout is PEFT's default (0.0); TRL doesn't change it.
    return LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, task_type="CAUSAL_LM")


def run_trl(args, bf16):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = common.read_jsonl(os.path.join(common.DATA, "sft_rows.jsonl"))
    dataset = Dataset.from_list(rows)
    tok = common.load_tokenizer()
    model = common.load_model()

    step_ends = []  # perf_counter at the end of each optimizer step
    real_tokens = []  # non-padding tokens per step (attention_mask sum)
    padded_tokens = []  # input_ids.numel() per step

    class StepTimer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            step_ends.append(time.perf_counter())
            common.log(f"step {state.global_step}: {step_ends[-1] - step_ends[0]:.1f} s since step 1 ended, "
                       f"{real_tokens[-1]} tokens ({padded_tokens[-1]} with padding)")

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            real_tokens.append(int(inputs["attention_mask"].sum()))
            padded_tokens.append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    out = tempfile.mkdtemp(prefix="whet-bench-trl-")
    config = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=args.lr,
        max_length=args.max_length,
        bf16=bf16,
        # No GPU here, but transformers refuses bf16 without an accelerator unless told use_cpu=True
        # (then bf16 means CPU autocast to bfloat16); it changes nothing else on this machine.
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = CountingSFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tok, peft_config=lora_config(args),
        callbacks=[StepTimer()],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    common.log(f"trl: bf16={config.bf16} gradient_checkpointing={config.gradient_checkpointing} "
               f"assistant_only_loss={config.assistant_only_loss} padding_free={config.padding_free} "
               f"packing={config.packing} optim={config.optim} trainable={trainable} threads={torch.get_num_threads()}")
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its summary dict: keep stdout for our JSON
        trainer.train()
    threads_after = torch.get_num_threads()

    timed = slice(args.warmup, args.warmup + args.steps)
    if len(step_ends) != args.warmup + args.steps or len(real_tokens) != len(step_ends):
        raise SystemExit(f"expected {args.warmup + args.steps} steps, timed {len(step_ends)}, counted {len(real_tokens)}")
    # From the end of the last warm-up step to the end of the last step: everything the trainer does.
    seconds = step_ends[-1] - step_ends[args.warmup - 1]
    tokens = sum(real_tokens[timed])
    padded = sum(padded_tokens[timed])
    return {
        "tokens": tokens,
        "seconds": seconds,
        "padded_tokens": padded,
        "padding_fraction": round(1 - tokens / padded, 4),
        "trainable_params": trainable,
        "threads": threads_after,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "bf16": bool(config.bf16),
    }


def run_loop(args, bf16):
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model

    datums = common.read_jsonl(os.path.join(common.DATA, "sft_datums.jsonl"))
    need = (args.warmup + args.steps) * args.batch
    if len(datums) < need:
        raise SystemExit(f"need {need} datums, have {len(datums)}")
    seqs = []
    for d in datums[:need]:
        tokens = [t for c in d["model_input"]["chunks"] for t in c["tokens"]]
        lfi = d["loss_fn_inputs"]
        seqs.append((
            torch.tensor(tokens, dtype=torch.long)[None],
            torch.tensor(lfi["target_tokens"]["data"], dtype=torch.long),
            torch.tensor(lfi["weights"]["data"], dtype=torch.float32),
        ))

    model = get_peft_model(common.load_model(), lora_config(args))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr)
    common.log(f"loop: trainable={trainable} threads={torch.get_num_threads()} bf16={bf16}")

    def autocast():
        if bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    tokens = 0
    t0 = None
    losses = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            t0 = time.perf_counter()
        batch = seqs[step * args.batch:(step + 1) * args.batch]
        denom = float(sum(w.sum() for _, _, w in batch))
        total = 0.0
        for input_ids, targets, weights in batch:
            with autocast():
                logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
            nll = F.cross_entropy(logits, targets, reduction="none")
            loss = (nll * weights).sum() / denom
            loss.backward()
            total += loss.item()
            if step >= args.warmup:
                tokens += input_ids.shape[1]
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        common.log(f"step {step + 1}: loss {total:.4f}, {time.perf_counter() - (t0 or time.perf_counter()):.1f} s timed")
    seconds = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "seconds": seconds,
        "padded_tokens": tokens,
        "padding_fraction": 0.0,
        "trainable_params": trainable,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": False,
        "bf16": bf16,
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["trl", "trl-bf16", "loop", "loop-bf16"], required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line (always on)")
    args = ap.parse_args()
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1")

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(common.THREADS)

    if args.variant in ("loop", "loop-bf16"):
        r = run_loop(args, bf16=args.variant == "loop-bf16")
    else:
        r = run_trl(args, bf16=args.variant == "trl-bf16")

    common.emit({
        "variant": args.variant,
        "trained_tokens_per_s": round(r["tokens"] / r["seconds"], 2),
        "s_per_step": round(r["seconds"] / args.steps, 3),
        "peak_rss_bytes": common.peak_rss_bytes(),
        "steps": args.steps,
        "tokens": r["tokens"],
        **{k: v for k, v in r.items() if k not in ("tokens",)},
        "batch": args.batch,
        "rank": args.rank,
        "alpha": args.alpha,
    })


if __name__ == "__main__":
    main()
