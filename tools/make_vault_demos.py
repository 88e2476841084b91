#!/usr/bin/env python3
"""Demonstrations for the vault world: a scripted agent plays it over the JSON-lines protocol
and its episodes are written as ATIF trajectories, the shape `whet worlds rollout` writes.

They are the SFT data that teaches a small model the world's tool-call format before live RL
(SmolLM2-135M never calls a tool unprompted). The agent explores the way a careful person
would, one tool call per turn: list `/`, read the files whose names suggest a code first, then
the others, list the directories it has seen, and submit the first 4-digit number it reads.
It does not peek at the world's state, so its episodes are ordinary world episodes (most take
3 turns, a few take more than the manifest's 6).

    cargo build --release -p whet-world-vault
    python3 tools/make_vault_demos.py --seeds 1000-1199 --out datasets/worlds/vault/demos.jsonl

Only the standard library is needed.
"""

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HINTS = ("code", "secret", "pin", "access", "key", "vault", "pass")


class World:
    def __init__(self, binary):
        self.proc = subprocess.Popen(
            [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def request(self, req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"world error: {reply['error']}")
        return reply

    def close(self):
        self.request({"op": "close"})
        self.proc.wait()


def join(directory, name):
    return "/" + name if directory == "/" else f"{directory}/{name}"


def play(world, seed):
    """One episode; returns (start messages, tools, turns, termination_reason)."""
    reset = world.request({"op": "reset", "seed": seed, "task": {"id": "find-code"}})
    unread_files, unlisted_dirs = [], ["/"]
    turns, reason = [], "max_steps"
    code = None
    for turn in range(12):
        if code is not None:
            name, args = "submit", {"code": code}
        elif unlisted_dirs and not unread_files:
            name, args = "ls", {"path": unlisted_dirs.pop(0)}
        elif unread_files:
            # Names that hint at a code first; otherwise in listing order.
            unread_files.sort(key=lambda p: not any(h in p.rsplit("/", 1)[-1] for h in HINTS))
            name, args = "cat", {"path": unread_files.pop(0)}
        else:
            raise RuntimeError(f"seed {seed}: nothing left to look at and no code found")
        call_id = f"call_{turn}_0"
        message = {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            ],
        }
        answer = world.request({"op": "step", "action": message})
        result = next(m["content"] for m in answer["observation"] if m["role"] == "tool")
        if name == "ls":
            for entry in result.splitlines():
                path = join(args["path"], entry.rstrip("/"))
                (unlisted_dirs if entry.endswith("/") else unread_files).append(path)
        elif name == "cat":
            found = re.search(r"\b\d{4}\b", result)
            code = found.group(0) if found else None
        turns.append((message, answer))
        if answer["done"]:
            reason = answer["termination_reason"]
            break
    return reset["observation"], reset["tools"], turns, reason


def to_atif(seed, start, tools, turns, reason, world_name, world_version):
    steps = []

    def push(source, message, **extra):
        steps.append({"step_id": len(steps) + 1, "source": source, "message": message, **extra})

    for m in start:
        push("system" if m["role"] == "system" else "user", m["content"])
    total = 0.0
    for message, answer in turns:
        reward = sum(s["value"] for s in answer.get("reward_signals") or [])
        total += reward
        calls = [
            {
                "tool_call_id": c["id"],
                "function_name": c["function"]["name"],
                "arguments": c["function"]["arguments"],
            }
            for c in message["tool_calls"]
        ]
        results = [
            {"source_call_id": m["tool_call_id"], "content": m["content"]}
            for m in answer["observation"]
            if m["role"] == "tool"
        ]
        push(
            "agent",
            message["content"],
            tool_calls=calls,
            observation={"results": results},
            extra={"reward": reward, "reward_signals": answer.get("reward_signals") or []},
        )
        for m in answer["observation"]:
            if m["role"] != "tool":
                push("user", m["content"])
    tid = f"vault-expert-{seed}"
    return {
        "schema_version": "ATIF-v1.4",
        "session_id": tid,
        "trajectory_id": tid,
        "agent": {"name": "vault-expert", "version": "1", "model_name": "scripted"},
        "steps": steps,
        "final_metrics": {"total_steps": len(turns)},
        "extra": {
            "world": {"name": world_name, "version": world_version},
            "task": {"id": "find-code"},
            "tools": tools,
            "total_reward": total,
            "error": None,
        },
        "seed": seed,
        "success": reason == "finished",
        "termination_reason": reason,
        "step_count": len(turns),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1000-1199", help="first-last (inclusive)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/whet-world-vault"))
    a = ap.parse_args()
    first, last = (int(x) for x in a.seeds.split("-"))
    world = World(a.binary)
    rows, turn_counts = [], []
    for seed in range(first, last + 1):
        start, tools, turns, reason = play(world, seed)
        if reason != "finished":
            sys.exit(f"seed {seed}: the scripted agent ended with {reason}")
        rows.append(to_atif(seed, start, tools, turns, reason, "vault", "1.0.0"))
        turn_counts.append(len(turns))
    world.close()
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, a.out)
    hist = {n: turn_counts.count(n) for n in sorted(set(turn_counts))}
    print(f"{len(rows)} trajectories -> {a.out}; turns per episode: {hist}")


if __name__ == "__main__":
    main()
