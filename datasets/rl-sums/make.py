#!/usr/bin/env python3
"""Writes train.jsonl and eval.jsonl: single-digit sums ("What is 3+4?"), each with its answer,
for an RL job scored by the `gsm8k_v1` recipe (reward 1 when the completion's last number is
the sum, else 0).

Every pair (a, b) with a, b in 1..9 is used once: 32 held-out eval prompts, the other 49 for
training (a pair and its swap may fall on different sides). SmolLM2-135M-Instruct answers these
right about one time in six at temperature 1 and about half the time greedily: it opens with a
preamble, gets the sum wrong, or states it and then goes on to other numbers within the
16-token completion budget. Groups of rollouts therefore score mixed rewards, and answering
with the sum and nothing numeric after it is what the reward teaches.
Deterministic (seeded); python3 make.py regenerates the same files.
"""

import json
import random


def main():
    rng = random.Random(0)
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    rng.shuffle(pairs)
    splits = [("eval.jsonl", pairs[:32]), ("train.jsonl", pairs[32:])]
    for name, chosen in splits:
        with open(name, "w") as f:
            for a, b in chosen:
                row = {"question": f"What is {a}+{b}?", "answer": str(a + b)}
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
