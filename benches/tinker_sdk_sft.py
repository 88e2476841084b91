"""LoRA SFT steps through the official `tinker` SDK against a Tinker-protocol server.

The SDK side of benches/tinker_overhead.sh: the same datums, batch, rank and learning rate as
`whet-bench sft`, but every `forward_backward` and `optim_step` goes through the SDK, HTTP,
protobuf and `whet serve`'s queue. Prints one JSON line: trained tokens/s, seconds per step.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import tinker
from tinker import types


def datum(row: dict) -> types.Datum:
    tokens = [t for c in row["model_input"]["chunks"] for t in c["tokens"]]
    inputs = row["loss_fn_inputs"]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": np.asarray(inputs["target_tokens"]["data"], dtype=np.int64),
            "weights": np.asarray(inputs["weights"]["data"], dtype=np.float32),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()

    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    data = [datum(r) for r in rows]
    weight_sums = [sum(r["loss_fn_inputs"]["weights"]["data"]) for r in rows]
    need = (args.warmup + args.steps) * args.batch
    if len(data) < need:
        raise SystemExit(f"{args.data}: {len(data)} datums, {need} needed")
    sc = tinker.ServiceClient(base_url=args.base_url)
    tc = sc.create_lora_training_client(
        base_model=args.model, rank=args.rank, train_unembed=False
    ).result()
    adam = types.AdamParams(learning_rate=args.lr)

    def step(i: int) -> tuple[int, float]:
        batch = data[i * args.batch : (i + 1) * args.batch]
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(adam)
        out = fb.result()
        opt.result()
        tokens = sum(d.model_input.length for d in batch)
        # Mean token NLL of the batch, as whet-bench reports it.
        return tokens, out.metrics["loss:sum"] / sum(weight_sums[i * args.batch : (i + 1) * args.batch])

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    tokens = 0
    loss = float("nan")
    for i in range(args.warmup, args.warmup + args.steps):
        n, loss = step(i)
        tokens += n
    elapsed = time.perf_counter() - start
    print(json.dumps({
        "name": "whet-serve-sdk",
        "sdk_version": tinker.__version__,
        "steps": args.steps,
        "trained_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "s_per_step": elapsed / args.steps,
        "last_loss": loss,
    }))
    if hasattr(sc, "close"):
        sc.close("success")


if __name__ == "__main__":
    main()
