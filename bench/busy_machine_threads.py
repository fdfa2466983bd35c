"""torch's threads on a busy machine: `graftune demo` beside a busy process, with torch's default thread count
forced (``OMP_NUM_THREADS`` = the machine's cores, graftune's behaviour before session 12) and with graftune's own
choice (no variable set: ``speed/threads.py`` samples the load and runs on the free cores), then the same on a quiet
machine. Each demo runs as a subprocess; the competitor is a Python busy loop on one core, started before and killed
after each busy run (bounded by ``--timeout`` too).

    .venv/bin/python bench/busy_machine_threads.py --out /tmp/busy

Prints one JSON line per run: the setting, wall seconds, the demo's job time, pick and accuracy, and the note.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from graftune.speed.threads import usable_cores

BUSY = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def run_demo(out: Path, threads: str | None, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    graftune = Path(sys.executable).with_name("graftune")
    t0 = time.perf_counter()
    p = subprocess.run([str(graftune), "demo", "--out", str(out), "--quiet"], env=env, capture_output=True, check=False,
                       text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    text = p.stdout + p.stderr
    job = re.search(r"total (\d+) s", text)
    pick = re.search(r"auto's pick \((\w[\w-]*)\)\s+([0-9.]+)", text)
    note = next((line for line in text.splitlines() if line.startswith("note: other programs")), None)
    return {"threads_variable": threads, "exit": p.returncode, "wall_s": round(wall, 1),
            "job_s": int(job.group(1)) if job else None, "pick": pick.group(1) if pick else None,
            "accuracy": float(pick.group(2)) if pick else None, "note": note}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="graftune-busy-"))
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per demo run (and per competitor)")
    a = ap.parse_args()
    cores = str(usable_cores())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for machine in ("busy", "quiet"):
        for threads in (cores, None):
            busy = None
            if machine == "busy":
                busy = subprocess.Popen([sys.executable, "-c", BUSY.format(limit=a.timeout)])
                time.sleep(1.0)
            try:
                row = run_demo(out / f"{machine}-{threads or 'auto'}", threads, a.timeout)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            row = {"machine": machine, **row, "loadavg": os.getloadavg(),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            print(json.dumps(row), flush=True)
            time.sleep(2.0)


if __name__ == "__main__":
    main()
