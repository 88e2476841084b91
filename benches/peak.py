#!/usr/bin/env python3
"""The machine's matmul ceiling with torch, 2 threads: the denominator of the MFU figures.

Times fp32 (and bf16) 2048x2048 @ 2048x2048 matmuls and reports the best rate over a few repeats
(GFLOP/s = 2*n^3 / s). Also the fp32 (2048x576)@(576x1536) shape of SmolLM2's MLP. One JSON line.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def best_gflops(torch, m, k, n, dtype, repeats, min_seconds=0.5):
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        iters, t = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            iters += 1
            el = time.perf_counter() - t
            if el >= min_seconds:
                break
        best = max(best, 2.0 * m * k * n * iters / el / 1e9)
    return round(best, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line (always on)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(common.THREADS)
    common.emit({
        "variant": "peak",
        "fp32_gflops": best_gflops(torch, 2048, 2048, 2048, torch.float32, args.repeats),
        "bf16_gflops": best_gflops(torch, 2048, 2048, 2048, torch.bfloat16, args.repeats),
        "fp32_mlp_gflops": best_gflops(torch, 2048, 576, 1536, torch.float32, args.repeats),
        "threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
