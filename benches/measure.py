#!/usr/bin/env python3
"""Runs one benchmark command and appends its JSON result line, annotated, to a results file.

    python3 benches/measure.py --name loop --append benches/results/run.jsonl -- python3 benches/torch_sft.py ...

The child's stderr passes through; its stdout's last JSON-object line is the result. Added fields:
`name`, `command`, `wall_s` (the whole child, load included) and `others_cpu_share`: the share of the
machine's CPU time (all cores, /proc/stat) that went to processes other than the child while it ran
-- on a shared 2-core machine a benchmark is only worth its figures when that is near 0. A command
that fails or prints no JSON gets {"name", "command", "error"} instead, so one failure doesn't stop a run.
"""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time


def cpu_jiffies():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields), idle


def wait_quiet(name, limit, window=5.0, threshold=0.10):
    deadline = time.monotonic() + limit
    while True:
        total0, idle0 = cpu_jiffies()
        time.sleep(window)
        total1, idle1 = cpu_jiffies()
        busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
        if busy < threshold:
            return
        if time.monotonic() >= deadline:
            print(f"[bench] {name}: the machine is still {busy:.0%} busy; running anyway", file=sys.stderr, flush=True)
            return
        print(f"[bench] {name}: others use {busy:.0%} of the CPU; waiting", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--append", required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="first wait up to this many seconds for other processes to use < 10%% of the CPU")
    args = ap.parse_args()
    if args.wait_quiet > 0:
        wait_quiet(args.name, args.wait_quiet)
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    command = shlex.join(cmd)
    print(f"[bench] {args.name}: {command}", file=sys.stderr, flush=True)

    hz = os.sysconf("SC_CLK_TCK")
    before_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total0, idle0 = cpu_jiffies()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        rc, out = proc.returncode, proc.stdout
    except OSError as e:
        rc, out = 127, ""
        print(f"[bench] {args.name}: {e}", file=sys.stderr)
    wall = time.perf_counter() - t0
    total1, idle1 = cpu_jiffies()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (usage.ru_utime - before_usage.ru_utime) + (usage.ru_stime - before_usage.ru_stime)
    busy_all = ((total1 - total0) - (idle1 - idle0)) / hz
    capacity = (total1 - total0) / hz
    others = max(0.0, busy_all - child_cpu) / capacity if capacity > 0 else 0.0

    result = None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                pass
    if rc != 0 or not isinstance(result, dict):
        result = {"error": f"exit code {rc}" if rc != 0 else "no JSON result on stdout"}
    result = {"name": args.name, **result, "command": command, "wall_s": round(wall, 1),
              "others_cpu_share": round(others, 3)}
    os.makedirs(os.path.dirname(os.path.abspath(args.append)), exist_ok=True)
    with open(args.append, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"[bench] {args.name}: {json.dumps(result)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
