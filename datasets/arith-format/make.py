#!/usr/bin/env python3
"""Writes train.jsonl and eval.jsonl: arithmetic questions in plain words, each answered in one
fixed, terse format -- `#### <number>` and nothing else.

A small instruct model answers such questions with a sentence or a worked explanation; after a
minute or two of LoRA SFT on these rows it answers in the format. The effect is visible at a
glance, and the eval loss (on questions it never trained on) falls. Deterministic (seeded);
python3 make.py regenerates the same files.
"""

import json
import random

OPS = [
    ("What is {a} plus {b}?", lambda a, b: a + b),
    ("What is {a} minus {b}?", lambda a, b: a - b),
    ("What is {a} times {b}?", lambda a, b: a * b),
    ("Add {a} and {b}.", lambda a, b: a + b),
    ("Subtract {b} from {a}.", lambda a, b: a - b),
    ("Multiply {a} by {b}.", lambda a, b: a * b),
    ("How much is {a} + {b}?", lambda a, b: a + b),
    ("Compute {a} * {b}.", lambda a, b: a * b),
]


def rows(rng, n, seen):
    out = []
    while len(out) < n:
        template, f = rng.choice(OPS)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = template.format(a=a, b=b)
        if q in seen:
            continue
        seen.add(q)
        out.append({"messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"#### {f(a, b)}"},
        ]})
    return out


def main():
    rng = random.Random(0)
    seen = set()
    for name, n in [("train.jsonl", 160), ("eval.jsonl", 16)]:
        with open(name, "w") as f:
            for r in rows(rng, n, seen):
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
