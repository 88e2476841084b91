#!/usr/bin/env python3
"""Runs a command and reports its peak GPU memory as the driver sees it (nvidia-smi's
used_memory of the process, polled every 50 ms) — the one measurement both sides of
benches/gpu/run.sh get, whatever their allocators keep in reserve.

  python3 gpu_peak.py -- CMD ARGS...   → the command's stdout, then a line {"peak_gpu_bytes": N}
"""

import json
import subprocess
import sys
import threading
import time


def used_by(pid):
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    return sum(int(m) for p, m in (l.split(",") for l in out.splitlines() if "," in l)
               if int(p) == pid) * 1024 * 1024


def main():
    cmd = sys.argv[sys.argv.index("--") + 1:]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def poll():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], used_by(proc.pid))
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    sys.stdout.write(out)
    print(json.dumps({"peak_gpu_bytes": peak[0]}))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
