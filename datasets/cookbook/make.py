#!/usr/bin/env python3
"""Writes the offline stand-ins for the two Hugging Face datasets the cookbook's `sl_loop` and
`rl_loop` recipes load, in those datasets' own row shapes, from this repository's datasets:

  no_robots/{train,test}.jsonl  for `load_dataset("HuggingFaceH4/no_robots")`: rows
      {prompt, prompt_id, messages, category} with chat `messages`, made from
      datasets/arith-format (160 train, 16 test conversations; every fourth one opens with the
      calc capability's system prompt, as no_robots rows sometimes open with a system message).
  gsm8k/{train,test}.jsonl      for `load_dataset("openai/gsm8k", "main")`: rows
      {question, answer}, the answer a worked line ending in `#### N` as in GSM8K, made from
      datasets/rl-sums (49 train, 32 test single-digit sums).

tools/cookbook.py turns these into a Hugging Face datasets cache under the ids above.
Deterministic: python3 make.py regenerates the same files.
"""

import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = os.path.dirname(HERE)
SYSTEM = 'You are a calculator. Reply with "#### " followed by the result, nothing else.'


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def no_robots(rows):
    out = []
    for i, row in enumerate(rows):
        messages = list(row["messages"])
        prompt = messages[0]["content"]
        if i % 4 == 0:
            messages = [{"role": "system", "content": SYSTEM}, *messages]
        out.append({
            "prompt": prompt,
            "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
            "messages": messages,
            "category": "Closed QA",
        })
    return out


def gsm8k(rows):
    out = []
    for row in rows:
        a, b = row["question"].removeprefix("What is ").removesuffix("?").split("+")
        s = int(a) + int(b)
        assert str(s) == row["answer"], row
        answer = f"{a} + {b} = <<{a}+{b}={s}>>{s}\n#### {s}"
        out.append({"question": row["question"], "answer": answer})
    return out


def main():
    arith = os.path.join(DATASETS, "arith-format")
    sums = os.path.join(DATASETS, "rl-sums")
    write(os.path.join(HERE, "no_robots", "train.jsonl"), no_robots(read(os.path.join(arith, "train.jsonl"))))
    write(os.path.join(HERE, "no_robots", "test.jsonl"), no_robots(read(os.path.join(arith, "eval.jsonl"))))
    write(os.path.join(HERE, "gsm8k", "train.jsonl"), gsm8k(read(os.path.join(sums, "train.jsonl"))))
    write(os.path.join(HERE, "gsm8k", "test.jsonl"), gsm8k(read(os.path.join(sums, "eval.jsonl"))))


if __name__ == "__main__":
    main()
