#!/usr/bin/env python3
"""The vault chain's last measurement (benches/rl_world.sh step 6), read from the rollouts.

Each argument is LABEL=TRAIN.jsonl,HELD_OUT.jsonl: one policy's `whet worlds rollout` files (ATIF
trajectories, one per line) on the training seeds and on the held-out seeds; several files of one
set (rollouts with other `--seed`s) are joined with `+`: LABEL=a7.jsonl+a8.jsonl,b7.jsonl+b8.jsonl. Prints, per policy,
the success rate on each seed set and on both, the mean return, the episodes' endings, tool
errors per episode and the most common wrong submissions; then, against the first policy, the
difference in success over both sets in standard errors and the seeds that did better or worse.

  python3 benches/rl_world_report.py sft=a.jsonl,b.jsonl rl=c.jsonl,d.jsonl
"""
import collections
import json
import math
import sys


def read(paths):
    eps = []
    for path in paths.split("+"):
        with open(path) as f:
            eps += [json.loads(line) for line in f if line.strip()]
    return eps


def agent_steps(ep):
    return [s for s in ep["steps"] if s["source"] == "agent"]


def summary(eps):
    n = len(eps)
    wins = sum(bool(e["success"]) for e in eps)
    ret = sum(e["extra"]["total_reward"] for e in eps) / n
    endings = collections.Counter(e["termination_reason"] for e in eps)
    errors = sum(
        sig["source"] == "tool_error"
        for e in eps
        for s in agent_steps(e)
        for sig in (s.get("extra") or {}).get("reward_signals", [])
    )
    wrong = collections.Counter()
    for e in eps:
        if e["termination_reason"] == "wrong_answer":
            calls = agent_steps(e)[-1].get("tool_calls") or [{}]
            wrong[json.dumps(calls[0].get("arguments"))] += 1
    per_seed = collections.Counter()
    for e in eps:
        per_seed[e["seed"]] += bool(e["success"])
    return {"n": n, "wins": wins, "return": ret, "endings": endings,
            "errors_per_episode": errors / n, "wrong": wrong, "per_seed": per_seed}


def main():
    policies = []
    for arg in sys.argv[1:]:
        label, _, files = arg.partition("=")
        train, held = files.split(",")
        policies.append((label, summary(read(train)), summary(read(held))))
    if not policies:
        sys.exit(__doc__)
    for label, tr, ho in policies:
        both = (tr["wins"] + ho["wins"]) / (tr["n"] + ho["n"])
        print(f"{label}: success train {tr['wins'] / tr['n']:.3f} ({tr['wins']}/{tr['n']}), "
              f"held-out {ho['wins'] / ho['n']:.3f} ({ho['wins']}/{ho['n']}), both {both:.3f}; "
              f"mean return {tr['return']:+.3f} / {ho['return']:+.3f}")
        for name, s in (("train", tr), ("held-out", ho)):
            print(f"  {name}: endings {dict(s['endings'])}, tool errors/episode "
                  f"{s['errors_per_episode']:.2f}, wrong answers {s['wrong'].most_common(3)}")
    label0, tr0, ho0 = policies[0]
    for label, tr, ho in policies[1:]:
        n0, n1 = tr0["n"] + ho0["n"], tr["n"] + ho["n"]
        p0, p1 = (tr0["wins"] + ho0["wins"]) / n0, (tr["wins"] + ho["wins"]) / n1
        pooled = (tr0["wins"] + ho0["wins"] + tr["wins"] + ho["wins"]) / (n0 + n1)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
        z = (p1 - p0) / se if se > 0 else 0.0
        line = f"{label0} -> {label}: both {p0:.3f} -> {p1:.3f}, {z:+.1f} standard errors"
        for name, a, b in (("train", tr0, tr), ("held-out", ho0, ho)):
            seeds = set(a["per_seed"]) | set(b["per_seed"])
            up = sum(b["per_seed"][k] > a["per_seed"][k] for k in seeds)
            down = sum(b["per_seed"][k] < a["per_seed"][k] for k in seeds)
            line += f"; {name} seeds better {up}, worse {down}, same {len(seeds) - up - down}"
        print(line)


if __name__ == "__main__":
    main()
