#!/usr/bin/env python3
"""Builds the benchmark data deterministically (run from anywhere):

* benches/data/sft_rows.jsonl       256 chat rows, {"messages": [user, assistant]}, for TRL's SFTTrainer
* benches/data/sft_datums.jsonl     the same rows through SmolLM2's chat template, truncated to 512
                                    tokens, as Tinker datums (train on every token), for the padding-free
                                    torch loop and for whet-bench
* benches/data/sample_prompts.jsonl 16 prompts as token ids (chat template, add_generation_prompt=True)

Source text: `data/alpaca_en_demo.json` from the sdist of PyPI's `llamafactory` 0.9.5 (LLaMA-Factory's
999-row English demo set in Alpaca format: real instructions with GPT-4-written answers, from the
Alpaca-GPT4 data). pip fetches the sdist; the file's sha256 is checked, so the output is the same on
every machine. Pass --source PATH to use a copy of alpaca_en_demo.json you already have.

Selection (seeded, so reproducible): rows whose template length is 80..360 tokens, plus 22 rows longer
than 480 tokens (truncated to 512), shuffled together. That lands close to the length profile of the
data in shared/reference/cpu-baseline.md (mean 228, median 189, p90 351): see the stats printed at the end.
"""

import argparse
import glob
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

SDIST = "llamafactory==0.9.5"
MEMBER = "llamafactory-0.9.5/data/alpaca_en_demo.json"
SOURCE_SHA256 = "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318"
CACHED_SOURCE = os.path.join(common.BENCHES, ".cache", "alpaca_en_demo.json")

N_ROWS = 256
MAX_LEN = 512
MID_RANGE = (80, 360)  # template tokens of the bulk of the rows
LONG_OVER = 480  # the long tail: rows longer than this, truncated to MAX_LEN
N_LONG = 22
N_PROMPTS = 16
PROMPT_MAX = 64
SEED = 1


def fetch_source():
    if os.path.exists(CACHED_SOURCE):
        return CACHED_SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        common.log(f"pip download --no-binary :all: --no-deps {SDIST}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", tmp, SDIST],
            check=True,
        )
        (sdist,) = glob.glob(os.path.join(tmp, "llamafactory-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            data = tar.extractfile(MEMBER).read()
    os.makedirs(os.path.dirname(CACHED_SOURCE), exist_ok=True)
    with open(CACHED_SOURCE, "wb") as f:
        f.write(data)
    return CACHED_SOURCE


def to_messages(row):
    user = row["instruction"].strip()
    if row.get("input", "").strip():
        user += "\n\n" + row["input"].strip()
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"].strip()}]


def template_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def write_jsonl(path, items):
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def percentile(sorted_values, q):
    # linear interpolation, as numpy.percentile's default
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="path to alpaca_en_demo.json (default: fetch the llamafactory sdist)")
    args = ap.parse_args()

    path = args.source or fetch_source()
    raw = open(path, "rb").read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {SOURCE_SHA256}")
    source = json.loads(raw)

    tok = common.load_tokenizer()
    convs = [to_messages(r) for r in source]
    lengths = [len(template_ids(tok, m)) for m in convs]

    rng = random.Random(SEED)
    mid = [i for i, n in enumerate(lengths) if MID_RANGE[0] <= n <= MID_RANGE[1]]
    long = [i for i, n in enumerate(lengths) if n > LONG_OVER]
    chosen = rng.sample(mid, N_ROWS - N_LONG) + rng.sample(long, N_LONG)
    rng.shuffle(chosen)

    rows, datums, kept = [], [], []
    for i in chosen:
        ids = template_ids(tok, convs[i])[:MAX_LEN]
        n = len(ids) - 1
        rows.append({"messages": convs[i]})
        datums.append({
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": ids[:-1]}]},
            "loss_fn_inputs": {
                "target_tokens": {"data": ids[1:], "dtype": "int64", "shape": [n]},
                "weights": {"data": [1.0] * n, "dtype": "float32", "shape": [n]},
            },
        })
        kept.append(len(ids))

    # Sampling prompts: instructions without an input field, from rows not used for training, spread
    # over the prompt lengths (up to PROMPT_MAX template tokens, so the one left-padded batch isn't
    # mostly padding) -- the batch still needs left padding.
    used = set(chosen)
    pool = []
    for i, r in enumerate(source):
        if i in used or r.get("input", "").strip():
            continue
        ids = template_ids(tok, [convs[i][0]], add_generation_prompt=True)
        if len(ids) <= PROMPT_MAX:
            pool.append((len(ids), i, ids))
    pool.sort()
    picks = [pool[round(k * (len(pool) - 1) / (N_PROMPTS - 1))] for k in range(N_PROMPTS)]
    prompts = [{"tokens": ids} for _, _, ids in picks]

    write_jsonl(os.path.join(HERE, "sft_rows.jsonl"), rows)
    write_jsonl(os.path.join(HERE, "sft_datums.jsonl"), datums)
    write_jsonl(os.path.join(HERE, "sample_prompts.jsonl"), prompts)

    s = sorted(kept)
    plen = [len(p["tokens"]) for p in prompts]
    common.log(
        f"sft rows: {len(s)}, template tokens after truncation to {MAX_LEN}: mean {statistics.mean(s):.1f}, "
        f"median {statistics.median(s):.1f}, p90 {percentile(s, 90):.1f}, min {s[0]}, max {s[-1]}, "
        f"truncated {sum(n >= MAX_LEN for n in s)}, total {sum(s)}; datum tokens (n = len - 1): {sum(s) - len(s)}"
    )
    common.log(f"prompts: {len(plen)}, tokens min {min(plen)}, max {max(plen)}, mean {statistics.mean(plen):.1f}")


if __name__ == "__main__":
    main()
