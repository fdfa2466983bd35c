"""Issue 13: /v1/generate batched across causal-LM adapters vs one request per generation. Run by hand, bounded in
count and time:

    OMP_NUM_THREADS=1 .venv/bin/python bench/issue13_generate_batching.py --work /tmp/i13gen

`graftune serve` in a subprocess on 127.0.0.1 and a free port, serving N LoRA adapters on SmolLM2-135M-Instruct;
closed-loop concurrent clients (httpx, asyncio) in this process, each request one prompt for a random adapter and a
fixed max_new_tokens. Mixed batching (--max-batch 32 --max-wait-ms 5) against one request per generation
(--max-batch 1), side by side in one run: throughput, p50/p99 latency, rows per batched generation, and the answers
of both modes compared prompt by prompt (identical in fp32: batching changes when, not what; in bf16 rounding depends
on the batch's shape, so an answer can turn at a near-tie).

--precision fp32|bf16|auto  written into every adapter's run.yaml (the server serves a run in its precision; auto is
                            bf16 on a CPU with native bf16).

The adapters: ONE LoRA run trained briefly on a dozen prompt/answer pairs (serving cost does not depend on what it
learned), copied into N adapters with seeded noise on their tensors (issue13_serving_load.make_copies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from issue13_serving_load import PY, Server, make_copies, percentiles

TOPICS = {"sport": "goal match team player league cup", "business": "bank market share price profit fund",
          "tech": "chip phone software data network app"}


def ensure_run(work: Path) -> Path:
    out = work / "run"
    if (out / "run.yaml").is_file():
        return out
    rng = random.Random(0)
    data = work / "pairs.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(12):
            topic = list(TOPICS)[i % 3]
            words = " ".join(rng.choice(TOPICS[topic].split()) for _ in range(8))
            f.write(json.dumps({"prompt": f"Which topic is this: {words}?", "response": json.dumps({"topic": topic})})
                    + "\n")
    subprocess.run([PY, "-m", "graftune", "train", "--model", "smollm2", "--data", str(data), "--method", "lora",
                    "--epochs", "1", "--test-size", "2", "--val-size", "0", "--batch-size", "4", "--max-length", "64",
                    "--max-new-tokens", "8", "--out", str(out), "--quiet"], check=True, timeout=1200)
    return out


def prompts(n: int = 40) -> list[str]:
    rng = random.Random(1)
    words = " ".join(TOPICS.values()).split()
    return [f"Which topic is this: {' '.join(rng.choice(words) for _ in range(rng.randint(3, 12)))}?"
            for _ in range(n)]


async def closed_loop(url: str, names: list[str], texts: list[str], clients: int, total: int, seconds: float,
                      max_new_tokens: int, seed: int = 0) -> dict:
    """``clients`` clients, each sending its next request when the last is answered, until ``total`` requests or
    ``seconds``; one prompt per request for a random adapter (the same sequence of requests in every mode)."""
    import httpx

    rng = random.Random(seed)
    plan = [(rng.choice(names), rng.choice(texts)) for _ in range(total)]
    latencies: list[float] = []
    answers: dict[tuple[str, str], str] = {}
    errors, sent = 0, 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        async def client():
            nonlocal sent, errors
            while sent < total and time.monotonic() < stop:
                name, text = plan[sent]
                sent += 1
                t = time.perf_counter()
                r = await c.post("/v1/generate", json={"adapter": name, "inputs": [text],
                                                       "max_new_tokens": max_new_tokens})
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                answers[(name, text)] = r.json()["outputs"][0]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "wall_s": wall, "rps": len(latencies) / wall,
            **percentiles(latencies), "answers": answers}


def generation_counts(url: str) -> tuple[float, float, float]:
    """Batched generations, and the rows and distinct adapters they held, since the server started (/metrics)."""
    import httpx

    vals = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        vals[name] = value
    return tuple(float(vals.get(f"graftune_generate_batch_{k}", 0)) for k in ("rows_count", "rows_sum",
                                                                            "adapters_sum"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=180, help="per mode, at most")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = make_copies(ensure_run(args.work), args.adapters, args.work)
    for run in runs.values():
        yaml = run / "run.yaml"
        yaml.write_text(re.sub(r"(?m)^precision: .*$", f"precision: {args.precision}", yaml.read_text()))
    names, texts = list(runs), prompts()
    results = {}
    for mode, max_batch in (("batched", 32), ("one-per-generation", 1)):
        with Server(runs, max_batch, 5, args.work, args.threads) as server:
            # a lone request first (one client, one at a time): the latency a request pays without company
            lone = asyncio.run(closed_loop(server.url, names, texts, 1, 3, args.seconds, args.max_new_tokens, seed=9))
            before, cpu0 = generation_counts(server.url), server.cpu_s()
            load = asyncio.run(closed_loop(server.url, names, texts, args.clients, args.requests, args.seconds,
                                           args.max_new_tokens))
            cpu = server.cpu_s() - cpu0
            n, rows, adapters = (x - y for x, y in zip(generation_counts(server.url), before))
        results[mode] = {"lone_p50_ms": lone["p50_ms"], **{k: v for k, v in load.items() if k != "answers"},
                         "server_cpu_s": cpu, "generations": int(n), "mean_rows": rows / max(n, 1),
                         "mean_adapters": adapters / max(n, 1), "answers": load["answers"]}
        print(mode, json.dumps({k: v for k, v in results[mode].items() if k != "answers"}), flush=True)
    a, b = results["batched"]["answers"], results["one-per-generation"]["answers"]
    same = sum(a[k] == b[k] for k in a.keys() & b.keys())
    print(f"answers identical in both modes: {same} of {len(a.keys() & b.keys())} (adapter, prompt) pairs")
    ratio = results["batched"]["rps"] / results["one-per-generation"]["rps"]
    print(f"throughput ratio batched / one-per-generation: {ratio:.2f}x")
    (args.work / f"generate_batching_{args.precision}.json").write_text(json.dumps(
        {m: {k: v for k, v in r.items() if k != "answers"} for m, r in results.items()}, indent=2))
    return 0 if same == len(a.keys() & b.keys()) else 1


if __name__ == "__main__":
    sys.exit(main())
