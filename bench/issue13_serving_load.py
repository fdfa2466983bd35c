"""Issue 13: serving many adapters from one MiniLM, and drift watch. Run by hand, bounded in count and time:

    OMP_NUM_THREADS=2 .venv/bin/python bench/issue13_serving_load.py --work /tmp/i13 --serving --memory --drift --peft

--serving  `graftune serve` in a subprocess on 127.0.0.1 with 8 and 32 adapters; closed-loop concurrent clients
           (httpx, asyncio) in this process, each request one text for a random adapter; mixed batching
           (--max-batch 32 --max-wait-ms 5) against one request per forward (--max-batch 1); throughput, p50/p99,
           and the latency of a lone request (one client, one request at a time).
--open     the same two servers under OPEN-loop load: Poisson arrivals at a fixed offered rate (asyncio httpx,
           bounded in requests and seconds per rate), one text for a random adapter each; offered rates go up in
           geometric steps until the server saturates, then bisection finds the highest one whose p99 stays <= 2x a
           lone request's p99 (the lowest lone p99 of the run) with nothing failed and the achieved rate within 5%
           of the offered one: the goodput at that objective per server, and their ratio (also at 3, 5 and 10x,
           read off the coarse steps); the whole sweep is printed as a table. A second reference: the p99 of lone
           requests each sent after the server sat idle for --idle-gap-ms (what a request meets on a quiet server:
           threads asleep, caches cold), with the goodput at multiples of it read off the same sweep.
--memory   RSS of a store holding 1 and 32 adapters on one base, against base + 32 x adapter + 10%.
--forward  in-process: CPU time of one mixed 16-request forward vs 16 one-request forwards (no HTTP).
--thread-cost  in-process: the forward on the one thread that ran torch, then after another thread ran torch.
--peft     in-process: one mixed 8-adapter batch through graftune's routing vs PEFT's `adapter_names=`.
--switch   `graftune serve --registry` under load while the registry promotes v2 and rolls back to v1.
--drift    the server's own summaries (store.classify + DriftTracker.observe) of BBC articles the run did not
           train on (held out) and of another data set (TREC questions, rotten-tomatoes snippets), against the
           run's training split; the false-alarm rate over many random held-out streams.

--correctness  mixed batches of the 32 trained adapters (the same texts to all of them, one text per request,
           through the server's batching path in this process) against each run predicting alone
           (``load_run`` + ``predict``); pass/fail and the label mismatches, in the runs' precision and in float32.

The adapters: ONE LoRA run trained on BBC (8 shots/class, 3 epochs, max length 128), then copied into N adapters,
each with its LoRA tensors and head perturbed by seeded noise (5% of each tensor's std): N distinct adapters of
the real shape and cost, made in seconds instead of N trainings. Serving cost does not depend on what the
adapters learned.

--trained  instead, N real runs trained with ``graftune.runs.train`` (the default LoRA recipe's 10 epochs, no val
           split, so no early stopping; 8 shots per class, max length 128, MiniLM for all, one base served): 4
           data sets with different label sets (bbc-news 5 classes, trec 6, sms-spam 2, rotten-tomatoes 3) x seeds
           0-7 = 32 runs, kept in WORK/trained (a rerun reuses them). With --memory, --serving, --open, --forward
           and --thread-cost, the first N of them in seed-major order (8 = the four data sets x seeds 0 and 1):

    OMP_NUM_THREADS=1 .venv/bin/python bench/issue13_serving_load.py --work /tmp/i13t --trained --memory --correctness
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# --- adapters ------------------------------------------------------------------------------------------------------
def ensure_run(work: Path, seed: int = 0) -> Path:
    out = work / f"run-seed{seed}"
    if not (out / "run.yaml").is_file():
        subprocess.run([PY, "-m", "graftune", "train", "--model", "minilm", "--data", "bbc-news", "--method", "lora",
                        "--shots", "8", "--epochs", "3", "--max-length", "128", "--seed", str(seed), "--out", str(out),
                        "--quiet"], check=True, timeout=1800)
    return out


def make_copies(run: Path, n: int, work: Path) -> dict[str, Path]:
    """N adapters from one run: copy i has every adapter and head tensor perturbed by seeded noise (copy 0 is the
    run itself)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = {}
    for i in range(n):
        dest = work / "copies" / f"a{i:02d}"
        if not (dest / "run.yaml").is_file():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(run, tmp, ignore=shutil.ignore_patterns("log.jsonl", ".checkpoint*"))
            file = tmp / "adapter" / "adapter.safetensors"
            tensors = load_file(file)
            g = torch.Generator().manual_seed(i)
            if i:
                tensors = {k: v + 0.05 * (v.float().std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
                           for k, v in tensors.items()}
            save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        out[f"a{i:02d}"] = dest
    return out


def adapter_bytes(run: Path) -> int:
    return (run / "adapter" / "adapter.safetensors").stat().st_size


# --- truly trained adapters (--trained) ----------------------------------------------------------------------------
#: data set -> served-name prefix: four label sets (5, 6, 2 and 3 classes), so the heads differ in size too
TRAINED_DATA = {"bbc-news": "bbc", "trec": "trec", "sms-spam": "sms", "rotten-tomatoes": "rt"}
TRAINED_SEEDS = range(8)


def trained_config(data: str, seed: int, out: Path):
    """One real run with the default recipe's settings (LoRA's default r and targets, 10 epochs, precision as the
    CPU picks it), 8 shots per class and, as :func:`ensure_run`, 128 tokens, but no val split (``val_size=0``):
    all 10 epochs run and the last weights are kept. With the default val split (8 examples per class) early
    stopping kept the epoch-1 weights in 11 of 32 runs, and in 4 sms-spam runs (16 examples: one step per epoch)
    that epoch's only step ran at learning rate 0 (warm-up), so their LoRA was still its zero init. 20 test examples
    per class, so the scoring at the end takes seconds (the test score is not what this bench measures)."""
    from graftune.config import build_config

    return build_config(model="minilm", data=data, method="lora", shots=8, max_length=128, seed=seed,
                        val_size=0, test_per_class=20, out=str(out), overwrite=True)


#: the settings that make a kept run the one :func:`trained_config` asks for
_RUN_KEYS = ("model", "data", "method", "shots", "epochs", "max_length", "seed", "val_size", "test_per_class")


def trained_runs(work: Path, n: int = 32) -> dict[str, Path]:
    """The first ``n`` of 32 real runs (4 data sets x seeds 0-7), trained with ``graftune.runs.train`` in this
    process and kept in ``work/trained``: a run directory trained with the same settings is reused, not retrained
    (runs are renamed into place only when complete). Seed-major order, so any 4k of them cover the four data
    sets."""
    from graftune.config import build_config
    from graftune.runs import train

    out = {}
    for seed in TRAINED_SEEDS:
        for data, prefix in TRAINED_DATA.items():
            if len(out) == n:
                return out
            run = work / "trained" / f"{prefix}-s{seed}"
            cfg = trained_config(data, seed, run)
            kept = build_config(run / "run.yaml") if (run / "run.yaml").is_file() else None
            if kept is None or any(getattr(kept, k) != getattr(cfg, k) for k in _RUN_KEYS):
                t = time.perf_counter()
                metrics = train(cfg, progress=False)
                print(json.dumps({"trained": run.name, "seconds": round(time.perf_counter() - t, 1),
                                  "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1")}),
                      flush=True)
            out[f"{prefix}-s{seed}"] = run
    return out


def adapters(work: Path, n: int, args) -> dict[str, Path]:
    """The ``n`` served adapters, name -> run directory: real runs with ``--trained``, else noisy copies of one."""
    return trained_runs(work, n) if args.trained else make_copies(ensure_run(work), n, work)


# --- the server ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, runs: dict[str, Path], max_batch: int, max_wait_ms: float, work: Path, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [PY, "-m", "graftune", "serve", "--port", str(self.port), "--max-batch", str(max_batch),
                "--max-wait-ms", str(max_wait_ms), "--threads", str(threads), "--log-level", "warning",
                "--drift-dir", str(work / "drift-bench"), "--max-inputs", "64"]
        for name, path in runs.items():
            args += ["--run", f"{name}={path}"]
        self.n = len(runs)
        self.log = work / f"server-{self.port}.log"  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text()[-3000:])
            try:
                h = httpx.get(f"{self.url}/health", timeout=2).json()
                if h["adapters"] == self.n:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 300 s")
            time.sleep(0.5)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)

    def cpu_s(self) -> float:
        """CPU seconds the server has used (all its threads): on a shared, overloaded machine, requests per CPU
        second measure the work per request where wall-clock throughput measures the neighbours too."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20


async def closed_loop(url: str, names: list[str], texts: list[str], clients: int, total: int, seconds: float,
                      seed: int = 0) -> dict:
    """``clients`` clients, each sending its next request when the last is answered, until ``total`` requests or
    ``seconds``; one text per request, a random adapter each."""
    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        async def client():
            nonlocal sent, errors
            while sent < total and time.monotonic() < stop:
                sent += 1
                body = {"adapter": rng.choice(names), "inputs": [rng.choice(texts)]}
                t = time.perf_counter()
                r = await c.post("/v1/predict", json=body)
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "wall_s": wall, "rps": len(latencies) / wall,
            **percentiles(latencies)}


def batch_stats(url: str) -> dict:
    """Mean rows and adapters per forward since the server started, from its /metrics histograms."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    vals = {}
    for line in text.splitlines():
        for key in ("graftune_batch_rows_sum", "graftune_batch_rows_count", "graftune_batch_adapters_sum"):
            if line.startswith(key + " "):
                vals[key] = float(line.split()[-1])
    n = max(vals.get("graftune_batch_rows_count", 0.0), 1.0)
    return {"forwards": int(n), "mean_rows_per_forward": vals.get("graftune_batch_rows_sum", 0.0) / n,
            "mean_adapters_per_forward": vals.get("graftune_batch_adapters_sum", 0.0) / n}


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"p50_ms": None, "p99_ms": None}

    def pick(q: float) -> float:
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"p50_ms": 1000 * pick(0.5), "p99_ms": 1000 * pick(0.99), "mean_ms": 1000 * statistics.fmean(xs)}


def texts_for(kind: str, n: int = 400) -> list[str]:
    from graftune.data.sources import load_data

    ds = load_data("bbc-news")
    rng = random.Random(0)
    idx = rng.sample(range(len(ds.inputs)), n)
    if kind == "short":  # titles: the first line of an article (~10 tokens)
        return [ds.inputs[i].split("\n", 1)[0].strip() for i in idx]
    return [ds.inputs[i] for i in idx]  # whole articles, truncated by the run to 128 tokens


def cases(copies: dict, args):
    """(text kind, its texts, adapter count, the first that many adapter names) for every case the flags ask for."""
    for kind in args.lengths:
        texts = texts_for(kind)
        for n in args.adapters:
            yield kind, texts, n, list(copies)[:n]


def serving(work: Path, args) -> list[dict]:
    copies = adapters(work, max(args.adapters), args)
    rows = []
    for kind, texts, n, names in cases(copies, args):
        for label, max_batch, wait in (("mixed batching", 32, 5.0), ("one request per forward", 1, 0.0)):
            with Server({k: copies[k] for k in names}, max_batch, wait, work, args.threads) as srv:
                asyncio.run(closed_loop(srv.url, names, texts, 4, 20, 30))  # warm-up
                lone = asyncio.run(closed_loop(srv.url, names, texts, 1, args.lone, 60, seed=1))
                cpu = srv.cpu_s()
                load = asyncio.run(closed_loop(srv.url, names, texts, args.clients, args.requests, args.seconds,
                                               seed=2))
                cpu = srv.cpu_s() - cpu
                batches = batch_stats(srv.url)
                row = {"texts": kind, "adapters": n, "server": label, "clients": args.clients,
                       "lone_p50_ms": lone["p50_ms"], "lone_p99_ms": lone["p99_ms"], **load,
                       "server_cpu_s": cpu, "requests_per_cpu_s": load["requests"] / max(cpu, 1e-9),
                       **batches, "rss_mb": srv.rss_mb(), "loadavg_1min": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# --- open loop: Poisson arrivals at a fixed offered rate -------------------------------------------------------------
def arrival_times(rate: float, n: int, seed: int) -> list[float]:
    """When ``n`` requests arrive, in seconds from the start: a Poisson process at ``rate`` per second conditioned on
    its n arrivals falling within n / rate seconds, which is n uniform times in [0, n / rate], sorted. Conditioning
    makes the offered rate exactly ``rate``; free exponential gaps would miss it by about 1 / sqrt(n) (4% at
    n = 600), as much as the margin of the backlog test."""
    rng = random.Random(seed)
    return sorted(rng.uniform(0, n / rate) for _ in range(n))


async def open_loop(client, names: list[str], texts: list[str], rate: float, requests: int, seconds: float,
                    seed: int, max_outstanding: int, timeout: float) -> dict:
    """Requests arrive at Poisson times (:func:`arrival_times`) whether or not earlier ones were answered, as a
    service's users do: ``requests`` at most, ``seconds`` worth at most; one text for a random adapter each.

    A request's latency runs from its scheduled arrival, so a send the client made late counts against the server,
    not for it (no coordinated omission); the client's own lateness is reported apart (``send_lag_p99_ms``), to show
    when the client, not the server, fell behind. Sending stops once ``max_outstanding`` requests are unanswered
    (a backlog: the rate is past what the server sustains; the unsent requests are counted); a request still
    unanswered ``timeout`` seconds after the last send is cancelled and counted as failed."""
    import httpx

    n = max(1, min(requests, round(rate * seconds)))
    due = arrival_times(rate, n, seed)
    rng = random.Random(seed + 1)
    bodies = [{"adapter": rng.choice(names), "inputs": [rng.choice(texts)]} for _ in range(n)]
    latencies: list[float] = []
    lags: list[float] = []
    last_answer = 0.0
    failed = outstanding = 0
    start = time.perf_counter()

    async def one(body: dict, at: float) -> None:
        nonlocal failed, outstanding, last_answer
        sent = time.perf_counter()
        try:
            ok = (await client.post("/v1/predict", json=body)).status_code == 200
        except httpx.HTTPError:
            ok = False
        finally:
            outstanding -= 1
        now = time.perf_counter()
        if not ok:
            failed += 1
            return
        latencies.append(now - start - at)
        lags.append(sent - start - at)
        last_answer = max(last_answer, now - start)

    tasks = []
    for body, at in zip(bodies, due):
        wait = start + at - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        if outstanding >= max_outstanding:
            break
        outstanding += 1
        tasks.append(asyncio.create_task(one(body, at)))
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    span = max(n / rate, last_answer)  # the schedule's length, or longer when answers came after it
    lag = percentiles(lags)["p99_ms"]
    return {"offered_rps": rate, "requests": n, "unsent": n - len(tasks), "answered": len(latencies),
            "failed": failed + len(pending), "achieved_rps": len(latencies) / span, **percentiles(latencies),
            "max_ms": 1000 * max(latencies, default=0.0), "send_lag_p99_ms": lag}


def metric_sums(url: str) -> dict[str, float]:
    """The predict batch histograms' sums and counts from /metrics (cumulative since the server started)."""
    import httpx

    keys = ("graftune_batch_rows_sum", "graftune_batch_rows_count", "graftune_batch_adapters_sum")
    out = dict.fromkeys(keys, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in out:
            out[name] = float(value)
    return out


def meets(row: dict, objective_ms: float, tolerance: float) -> bool:
    """The latency objective at one offered rate: every request answered, none left unsent, p99 within the
    objective, and the achieved rate within ``tolerance`` of the offered one (no backlog building up)."""
    return (row["failed"] == 0 and row["unsent"] == 0 and row["p99_ms"] is not None
            and row["p99_ms"] <= objective_ms and row["achieved_rps"] >= (1 - tolerance) * row["offered_rps"])


async def open_sweep(srv: Server, names: list[str], texts: list[str], args, reference_ms: float | None) -> dict:
    """One server: a warm-up, the lone-request latency, then a sweep of offered rates. The objective is p99 <= 2 x
    the reference, the lowest lone-request p99 measured so far in this run (``reference_ms``, from servers measured
    before, or this server's own): the strictest reading, the same absolute bound for every server.

    The sweep: rates up from ``--start-rate`` by ``--rate-factor`` until the server saturates (p99 beyond
    ``--saturation`` x the reference, a backlog or a failure), so the table shows the whole curve and the goodput at
    looser objectives; then ``--bisect`` geometric bisections between the highest rate that met the 2x objective
    (below every rate that missed it) and the lowest rate above it that missed."""
    import httpx

    await closed_loop(srv.url, names, texts, 8, 200, 30)  # warm-up: connections, allocator, batch shapes
    limits = httpx.Limits(max_connections=args.max_outstanding, max_keepalive_connections=args.max_outstanding,
                          keepalive_expiry=60)
    tolerance = args.backlog_tolerance
    async with httpx.AsyncClient(base_url=srv.url, timeout=args.open_timeout, limits=limits) as client:
        rng = random.Random(1)

        async def lone_requests(count: int, gap_s: float) -> list[float]:
            """One request at a time, nothing else in the server, each ``gap_s`` after the previous answer."""
            seconds = []
            for _ in range(count):
                await asyncio.sleep(gap_s)
                body = {"adapter": rng.choice(names), "inputs": [rng.choice(texts)]}
                t = time.perf_counter()
                r = await client.post("/v1/predict", json=body)
                r.raise_for_status()
                seconds.append(time.perf_counter() - t)
            return seconds

        lone = await lone_requests(args.open_lone, 0)
        lone_stats = percentiles(lone)
        idle = await lone_requests(args.open_idle_lone, args.idle_gap_ms / 1000)  # the server sat idle before each
        idle_stats = percentiles(idle) if idle else {"p50_ms": None, "p99_ms": None}
        reference = min(lone_stats["p99_ms"], reference_ms or float("inf"))
        objective = 2 * reference
        points: list[dict] = []

        async def measure(rate: float) -> dict:
            before, cpu, client_cpu = metric_sums(srv.url), srv.cpu_s(), time.process_time()
            row = await open_loop(client, names, texts, rate, args.open_requests, args.open_seconds,
                                  seed=args.open_seed + len(points) + 10, max_outstanding=args.max_outstanding,
                                  timeout=args.open_timeout)
            after = metric_sums(srv.url)
            forwards = after["graftune_batch_rows_count"] - before["graftune_batch_rows_count"]
            row.update(server_cpu_s=srv.cpu_s() - cpu, client_cpu_s=time.process_time() - client_cpu,
                       forwards=int(forwards),
                       rows_per_forward=(after["graftune_batch_rows_sum"] - before["graftune_batch_rows_sum"])
                       / max(forwards, 1),
                       adapters_per_forward=(after["graftune_batch_adapters_sum"]
                                             - before["graftune_batch_adapters_sum"]) / max(forwards, 1),
                       loadavg_1min=os.getloadavg()[0])
            row["meets"] = meets(row, objective, tolerance)
            points.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            return row

        rate = args.start_rate
        while rate <= args.max_rate:
            if not meets(await measure(rate), args.saturation * reference, tolerance):
                break
            rate *= args.rate_factor
        rate = min(p["offered_rps"] for p in points)
        while goodput(points, objective, tolerance) is None and rate / args.rate_factor >= 1.0:
            rate /= args.rate_factor  # even the first rate missed the objective: step down
            await measure(rate)
        for _ in range(args.bisect):
            good = goodput(points, objective, tolerance)
            above = [p["offered_rps"] for p in points if good is not None and p["offered_rps"] > good
                     and not meets(p, objective, tolerance)]
            if good is None or not above:
                break
            await measure((good * min(above)) ** 0.5)
    return {"lone_p50_ms": lone_stats["p50_ms"], "lone_p99_ms": lone_stats["p99_ms"], "lone_requests": len(lone),
            "idle_lone_p50_ms": idle_stats["p50_ms"], "idle_lone_p99_ms": idle_stats["p99_ms"],
            "idle_lone_requests": len(idle), "idle_gap_ms": args.idle_gap_ms,
            "reference_p99_ms": reference, "search_objective_p99_ms": objective, "points": points}


def open_serving(work: Path, args) -> list[dict]:
    """Goodput under a latency objective for one request per forward and for mixed batching: the highest offered
    rate (Poisson arrivals) whose p99 stays within 2 x a lone request's p99, with nothing failed and no backlog.
    One request per forward runs first, so its lone p99 is the reference the mixed server is held to as well when
    it is the lower one. Also the goodput at looser objectives (3, 5, 10 x), read off the coarse sweep."""
    copies = adapters(work, max(args.adapters), args)
    out = []
    for kind, texts, n, names in cases(copies, args):
        configs = [("one request per forward", 1, 0.0)]
        configs += [(f"mixed batching, {w:g} ms window", 32, w) for w in args.mixed_waits]
        reference, results = None, []
        for label, max_batch, wait in configs:
            with Server({k: copies[k] for k in names}, max_batch, wait, work, args.threads) as srv:
                print(f"# {n} adapters, {kind} texts, {label}", flush=True)
                result = asyncio.run(open_sweep(srv, names, texts, args, reference))
            reference = result["reference_p99_ms"]
            results.append({"texts": kind, "adapters": n, "server": label, "max_batch": max_batch,
                            "max_wait_ms": wait, **result})
        # every server against the final reference (the lowest lone p99 of all): a server measured before a
        # lower lone p99 turned up was searched against a looser bound
        final = min(r["lone_p99_ms"] for r in results)
        for r in results:
            r["final_reference_p99_ms"] = final
            r["goodput_by_objective_rps"] = {k: goodput(r["points"], k * final, args.backlog_tolerance)
                                             for k in OBJECTIVES}
            for point in r["points"]:
                point["meets"] = meets(point, 2 * final, args.backlog_tolerance)
        # the same points against a second reference: a lone request that finds the server idle (the lowest idle
        # p99 of all servers); read off the same sweep, whose bisections aimed at the first reference
        idle = min((r["idle_lone_p99_ms"] for r in results if r["idle_lone_p99_ms"]), default=None)
        for r in results:
            r["final_idle_reference_p99_ms"] = idle
            r["goodput_by_idle_objective_rps"] = {k: goodput(r["points"], k * idle, args.backlog_tolerance)
                                                  if idle else None for k in OBJECTIVES}
        for r in results:
            for key in ("", "idle_"):
                r[f"goodput_{key}vs_one_per_forward"] = {
                    k: (g / b if g and b else None) for k, g, b in
                    ((k, r[f"goodput_by_{key}objective_rps"][k], results[0][f"goodput_by_{key}objective_rps"][k])
                     for k in OBJECTIVES)}
            out.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "points"}), flush=True)
    print(open_table(out), flush=True)
    print(goodput_table(out), flush=True)
    if any(r["final_idle_reference_p99_ms"] for r in out):
        print(goodput_table(out, idle=True), flush=True)
    return out


OBJECTIVES = (2, 3, 5, 10)  # p99 bounds, in multiples of the lone-request p99


def goodput(points: list[dict], objective_ms: float, tolerance: float) -> float | None:
    """The highest offered rate that met the objective below every rate that missed it: a rate that met it only
    by luck above one that missed does not count."""
    missed = min((p["offered_rps"] for p in points if not meets(p, objective_ms, tolerance)), default=float("inf"))
    return max((p["offered_rps"] for p in points if meets(p, objective_ms, tolerance)
                and p["offered_rps"] < missed), default=None)


def goodput_table(results: list[dict], *, idle: bool = False) -> str:
    """Goodput per server at each objective, and its ratio to one request per forward, for bench/RESULTS.md; with
    ``idle``, the objectives are multiples of the idle lone request's p99 instead of the back-to-back one's."""
    key, lone = ("idle_", "idle lone") if idle else ("", "lone")
    lines = [f"| adapters | server | {lone} p50 / p99 ms | " + " | ".join(f"goodput at p99 <= {k}x (ratio)"
                                                                          for k in OBJECTIVES) + " |",
             "|" + "---|" * (3 + len(OBJECTIVES))]
    for r in results:
        cells = []
        for k in OBJECTIVES:
            g, ratio = r[f"goodput_by_{key}objective_rps"][k], r[f"goodput_{key}vs_one_per_forward"][k]
            cells.append("none" if g is None else f"{g:.1f} req/s ({ratio:.2f}x)" if ratio else f"{g:.1f} req/s")
        p50, p99 = r[f"{key}lone_p50_ms"], r[f"{key}lone_p99_ms"]
        lines.append(f"| {r['adapters']} | {r['server']} | "
                     + (f"{p50:.1f} / {p99:.1f}" if p99 is not None else "not measured") + " | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def open_table(results: list[dict]) -> str:
    """The sweep as a markdown table, for bench/RESULTS.md."""
    head = ("| adapters | server | offered req/s | achieved req/s | p50 ms | p99 ms | failed (unsent) | rows per "
            "forward | server CPU s | client CPU s | meets the 2x objective |")
    lines = [head, "|" + "---|" * 11]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for r in results:
        for p in sorted(r["points"], key=lambda p: p["offered_rps"]):
            lines.append(f"| {r['adapters']} | {r['server']} | {p['offered_rps']:.1f} | {p['achieved_rps']:.1f} | "
                         f"{ms(p['p50_ms'])} | {ms(p['p99_ms'])} | {p['failed']} ({p['unsent']}) | "
                         f"{p['rows_per_forward']:.2f} | {p['server_cpu_s']:.1f} | {p['client_cpu_s']:.1f} | "
                         f"{'yes' if p['meets'] else 'no'} |")
    return "\n".join(lines)


# --- promote and rollback under load -------------------------------------------------------------------------------
def switch_under_load(work: Path, args) -> dict:
    """A registry with two versions of one name (training seeds 0 and 1); `graftune serve --registry` under a
    closed-loop load while this process promotes v2 and rolls back to v1; every answer's version is counted."""
    import threading

    import httpx

    from graftune.registry import Registry

    root = work / "registry-switch"
    shutil.rmtree(root, ignore_errors=True)
    reg = Registry(root)
    reg.push(ensure_run(work, 0), "news")
    reg.promote("news", 1)
    reg.push(ensure_run(work, 1), "news")
    port = free_port()
    log = (work / "server-switch.log").open("w")
    proc = subprocess.Popen([PY, "-m", "graftune", "serve", "--registry", str(root), "--port", str(port), "--threads",
                             str(args.threads), "--log-level", "warning", "--poll", "0.5"], stdout=subprocess.DEVNULL,
                            stderr=log)
    url = f"http://127.0.0.1:{port}"
    texts = texts_for("short")
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["adapters"] == 1:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.5)
        stop, versions, failures, lock = threading.Event(), {}, [], threading.Lock()

        def client(seed):
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=120) as c:
                while not stop.is_set():
                    r = c.post("/v1/predict", json={"adapter": "news", "inputs": [rng.choice(texts)]})
                    with lock:
                        if r.status_code == 200:
                            v = r.json()["version"]
                            versions[v] = versions.get(v, 0) + 1
                        else:
                            failures.append(r.status_code)

        def serving_version():
            return httpx.get(f"{url}/v1/adapters", timeout=30).json()["adapters"][0]["version"]

        def wait_for(v):
            t = time.monotonic()
            while serving_version() != v:
                assert time.monotonic() - t < 120, f"version {v} not served within 120 s"
                time.sleep(0.1)
            return time.monotonic() - t

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(5)
        reg.promote("news", 2, force=True, reason="bench: switch under load")
        to_v2 = wait_for("2")
        time.sleep(5)
        reg.rollback("news")
        to_v1 = wait_for("1")
        time.sleep(5)
        stop.set()
        for t in threads:
            t.join(120)
    finally:
        proc.terminate()
        proc.wait(60)
    out = {"answers_by_version": versions, "failed": len(failures), "promote_seen_after_s": to_v2,
           "rollback_seen_after_s": to_v1, "clients": 8}
    print(json.dumps(out), flush=True)
    return out


# --- memory --------------------------------------------------------------------------------------------------------
_MEMORY = r"""
import gc, json, sys, psutil
from graftune.serve import ModelStore
runs = json.loads(sys.argv[1])
rss = lambda: psutil.Process().memory_info().rss / 2**20
store = ModelStore()
names = sorted(runs)
store.sync({names[0]: ("1", runs[names[0]])}); gc.collect(); one = rss()
slot = next(iter(store.slots.values()))
base_params = sum(p.numel() * p.element_size() for p in slot.model.base.parameters()) / 2**20
store.sync({n: ("1", runs[n]) for n in names}); gc.collect(); many = rss()
adapter_params = sum(p.numel() * p.element_size() for p in slot.model.adapters.parameters()) / 2**20
heads = sum(p.numel() * p.element_size() for e in store.entries.values() for p in e.head.parameters()) / 2**20
print(json.dumps({"rss_1_mb": one, "rss_32_mb": many, "base_params_mb": base_params, "bases": len(store.slots),
                  "adapter_params_32_mb": adapter_params, "heads_32_mb": heads}))
store.close()
"""


def memory(work: Path, args) -> dict:
    copies = adapters(work, 32, args)
    out = subprocess.run([PY, "-c", _MEMORY, json.dumps({k: str(v) for k, v in copies.items()})], check=True,
                         capture_output=True, text=True, timeout=600)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    sizes = {k: adapter_bytes(v) / 2**20 for k, v in copies.items()}
    first = min(copies)  # the one adapter of rss_1 (_MEMORY loads the sorted names' first)
    m["adapter_file_mb"] = sizes[first]
    m["adapter_file_mb_min_max"] = [min(sizes.values()), max(sizes.values())]
    m["other_31_files_mb"] = sum(v for k, v in sizes.items() if k != first)
    # the budget: the process with its base and one adapter, plus the other 31 adapters' files, plus 10%
    # (trained adapters' heads differ in size with their label sets: the real files are summed)
    m["budget_mb"] = (m["rss_1_mb"] + m["other_31_files_mb"]) * 1.10
    m["met"] = m["rss_32_mb"] <= m["budget_mb"]
    m["extra_31_mb"] = m["rss_32_mb"] - m["rss_1_mb"]
    m["naive_32_processes_mb"] = 32 * m["rss_1_mb"]
    print(json.dumps(m), flush=True)
    return m


# --- mixed batches answer as each run alone ------------------------------------------------------------------------
#: probability tolerance of a mixed-batch answer against its run alone, by precision. float32: the two paths sum in
#: different orders (a 256-row forward against an 8-row one; LoRA merged into W alone, x A B beside x W in the
#: batch), ~1e-7 relative per op over 6 layers, and both round probabilities to 6 decimals: 1e-4 is ~100x that, and
#: far below what another adapter's weights would change (``closest_other_adapter`` shows how far). bf16 (the
#: precision "auto" picks on a CPU with native bf16): activations and the bf16 base round at 2^-9 relative per op,
#: and ``load_run`` merges LoRA into the bf16 weights (W + BA rounded to bf16) where the server adds x A B unrounded:
#: differences of ~1e-2 are expected, so 0.05, and a label may differ only where the run's top two classes are
#: within it (a near tie).
TOLERANCE = {"fp32": 1e-4, "bf16": 0.05}


def correctness_texts(per_set: int = 2) -> list[str]:
    """``per_set`` texts from each trained data set (seeded), cut to 2,000 characters (the runs read 128 tokens)."""
    from graftune.data.sources import load_data

    rng = random.Random(7)
    out = []
    for data in TRAINED_DATA:
        inputs = load_data(data).inputs
        out += [inputs[i][:2000] for i in rng.sample(range(len(inputs)), per_set)]
    return out


def fp32_views(runs: dict[str, Path], work: Path) -> dict[str, Path]:
    """The same runs with ``precision: fp32`` in run.yaml (run.yaml and adapter/ copied afresh into ``work/fp32``):
    the adapters unchanged, served and loaded in float32 where float rounding is small enough for a tight check."""
    import yaml

    out = {}
    for name, run in runs.items():
        dest = work / "fp32" / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(run / "adapter", dest / "adapter")
        cfg = yaml.safe_load((run / "run.yaml").read_text())
        (dest / "run.yaml").write_text(yaml.safe_dump({**cfg, "precision": "fp32"}, sort_keys=False))
        out[name] = dest
    return out


async def served_mixed(runs: dict[str, Path], texts: list[str], max_batch: int, max_wait_ms: float,
                       seed: int) -> tuple[dict, list]:
    """Every (adapter, text) pair as its own one-text request, in shuffled order, all at once, through the server
    in this process (``create_app``: validation, the batching window, ``ModelStore.classify``; httpx's ASGI
    transport instead of a socket). Returns {(name, text index): prediction} and the batcher's records (what each
    forward held)."""
    import httpx

    from graftune.serve import ModelStore
    from graftune.serve.app import Settings, StaticSource, create_app

    app = create_app(ModelStore(), StaticSource(runs), Settings(max_batch=max_batch, max_wait_ms=max_wait_ms))
    pairs = [(name, i) for name in runs for i in range(len(texts))]
    random.Random(seed).shuffle(pairs)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench",
                                     timeout=600) as client:
            async def one(name: str, i: int) -> dict:
                r = await client.post("/v1/predict", json={"adapter": name, "inputs": [texts[i]]})
                r.raise_for_status()
                return r.json()["predictions"][0]

            got = await asyncio.gather(*(one(n, i) for n, i in pairs))
        records = list(app.state.batcher.history)
    return dict(zip(pairs, got)), records


def differences(served: dict, alone: dict[str, list[dict]], tolerance: float) -> dict:
    """Served answers against each run alone: label mismatches (and how many of them are near ties: the run's own
    top two probabilities within ``tolerance``), the largest probability difference, and the count beyond
    ``tolerance``."""
    mismatches, ties, beyond, worst = [], 0, 0, 0.0
    for (name, i), got in served.items():
        ref = alone[name][i]
        gap = max(abs(got["probabilities"][k] - v) for k, v in ref["probabilities"].items())
        worst = max(worst, gap)
        beyond += gap > tolerance
        if got["label"] != ref["label"]:
            top = sorted(ref["probabilities"].values(), reverse=True)
            tie = top[0] - top[1] <= tolerance
            ties += tie
            mismatches.append({"adapter": name, "text": i, "served": got["label"], "alone": ref["label"],
                               "alone_top2_margin": round(top[0] - top[1], 6), "near_tie": tie})
    return {"rows": len(served), "label_mismatches": len(mismatches), "of_them_near_ties": ties,
            "max_prob_diff": worst, "beyond_tolerance": beyond, "tolerance": tolerance, "mismatched": mismatches[:10]}


def largest_gap(a: list[dict], b: list[dict]) -> float:
    """The largest probability difference between two lists of answers to the same texts."""
    return max(abs(x["probabilities"][k] - y["probabilities"][k]) for x, y in zip(a, b) for k in x["probabilities"])


def closest_other_adapter(alone: dict[str, list[dict]]) -> float:
    """The smallest, over pairs of adapters with the same labels, of the largest probability difference between
    their answers to the same texts: how much a row read by the wrong adapter would move at least."""
    best = float("inf")
    names = sorted(alone)
    for a in names:
        for b in names:
            if a < b and list(alone[a][0]["probabilities"]) == list(alone[b][0]["probabilities"]):
                best = min(best, largest_gap(alone[a], alone[b]))
    return best


def mixed_correctness(work: Path, args) -> dict:
    """Mixed batches answer as each run alone: the same texts (2 from each trained data set) sent to all 32
    adapters, one text per request in shuffled order, through the server's batching path, (a) as ONE forward
    (max batch = every row) and (b) as served (max batch 32, 5 ms window); each answer against what its run predicts
    alone (``graftune.evaluate.load_run`` + ``predict``, adapters merged as ``graftune predict`` does; and unmerged,
    ``merge=False``). In the runs' own precision and in float32 (:func:`fp32_views`); tolerances: ``TOLERANCE``.

    How sensitive the check is: ``closest_other_adapter`` (two runs with the same labels, answering the same texts),
    and ``smallest_lora_effect``: over the adapters, the least that switching a run's LoRA off (its head on the bare
    base, ``AdapterModel.disabled``) moves its answers, what a row routed to no adapter, or to another's LoRA
    under the right head, would risk."""
    from graftune.evaluate import load_run, predict

    runs = adapters(work, 32, args)
    texts = correctness_texts()
    report = {"adapters": len(runs), "texts": len(texts), "checks": []}
    for views in ("as trained", "fp32"):
        served_runs = runs if views == "as trained" else fp32_views(runs, work)
        alone, precision, lora_effect = {}, set(), {}
        for merge in (True, False):
            for name, run in served_runs.items():
                loaded = load_run(run, merge=merge)
                precision.add(loaded.policy.name)
                alone[merge, name] = predict(loaded, texts)
                if not merge:
                    with loaded.model.disabled():
                        lora_effect[name] = largest_gap(alone[merge, name], predict(loaded, texts))
        (policy,) = precision
        tolerance = TOLERANCE[policy]
        merged = {n: alone[True, n] for n in served_runs}
        sensitivity = closest_other_adapter(merged)
        least = min(lora_effect, key=lora_effect.get)
        for label, max_batch, wait in (("one forward", len(runs) * len(texts), 2000.0), ("max batch 32", 32, 5.0)):
            served, records = asyncio.run(served_mixed(served_runs, texts, max_batch, wait, seed=1))
            for merge in (True, False):
                d = differences(served, {n: alone[merge, n] for n in served_runs}, tolerance)
                check = {"precision": policy, "batching": label, "alone": "merged" if merge else "unmerged",
                         "forwards": len(records), "max_rows_per_forward": max(r.rows for r in records),
                         "max_adapters_per_forward": max(len(r.adapters) for r in records),
                         "closest_other_adapter": sensitivity,
                         "smallest_lora_effect": [least, lora_effect[least]], **d,
                         "passed": d["beyond_tolerance"] == 0 and d["label_mismatches"] == d["of_them_near_ties"]}
                report["checks"].append(check)
                print(("PASS" if check["passed"] else "FAIL") + ": " + json.dumps(check), flush=True)
    report["passed"] = all(c["passed"] for c in report["checks"])
    print(f"mixed-batch correctness: {'PASS' if report['passed'] else 'FAIL'} "
          f"({sum(c['label_mismatches'] for c in report['checks'])} label mismatches in "
          f"{sum(c['rows'] for c in report['checks'])} rows over {len(report['checks'])} checks)", flush=True)
    return report


# --- the forward alone ---------------------------------------------------------------------------------------------
def forward_cpu(work: Path, args, rows: int = 16, repeats: int = 3) -> dict:
    """In-process, no HTTP: CPU time of ONE mixed forward of ``rows`` single-text requests over 8 adapters
    (store.classify, as the batcher calls it) against ``rows`` one-request forwards. CPU time, not wall time: on a
    shared machine it measures the work, not the neighbours."""
    from graftune.serve import ModelStore
    from graftune.serve.store import Rows

    copies = adapters(work, 8, args)
    texts = texts_for("short", rows)
    store = ModelStore()
    store.sync({k: ("1", v) for k, v in copies.items()})
    entries = [store.acquire(k) for k in sorted(copies)]
    batch = [Rows(entries[i % 8], [texts[i]]) for i in range(rows)]

    def cpu_ms(fn):
        fn()
        t = time.process_time()
        for _ in range(repeats):
            fn()
        return 1000 * (time.process_time() - t) / repeats

    out = {"rows": rows, "adapters": 8, "mixed_one_forward_cpu_ms": cpu_ms(lambda: store.classify(batch)),
           "one_request_per_forward_cpu_ms": cpu_ms(lambda: [store.classify([b]) for b in batch])}
    out["ratio"] = out["one_request_per_forward_cpu_ms"] / out["mixed_one_forward_cpu_ms"]
    store.close()
    print(json.dumps(out), flush=True)
    return out


def thread_cost(work: Path, args, repeats: int = 60) -> dict:
    """Wall time of the server's forward (``ModelStore.classify``, 8 adapters) on one thread that has loaded the
    models and is the only one to have run torch, then again once another live thread has run one parallel torch op,
    as in the server (runs are loaded on one thread, forwards run on the store's worker). Torch's OpenMP keeps a team
    of threads per thread that ran a parallel op; with two teams on 2 cores its threads stop spinning between ops.
    Median of ``repeats`` forwards per batch size."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from graftune.serve import ModelStore
    from graftune.serve.store import Rows

    copies = adapters(work, 8, args)
    texts = texts_for("short")
    store = ModelStore()
    mine = ThreadPoolExecutor(1)  # loads and runs every forward below
    mine.submit(store.sync, {k: ("1", v) for k, v in copies.items()}).result()
    entries = [store.acquire(k) for k in sorted(copies)]

    def median_ms(rows: int) -> float:
        def one(i: int) -> float:
            batch = [Rows(entries[(i + j) % 8], [texts[(i + j) % len(texts)]]) for j in range(rows)]
            t = time.perf_counter()
            store.classify(batch)
            return 1000 * (time.perf_counter() - t)

        return statistics.median(mine.submit(one, i).result() for i in range(repeats))

    sizes = (1, 4, 16, 32)
    median_ms(1)  # warm-up
    out = {"torch_threads": torch.get_num_threads(), "one_thread_ran_torch_ms": {n: median_ms(n) for n in sizes}}
    other = ThreadPoolExecutor(1)
    other.submit(lambda: torch.ones(1 << 22).mul_(2)).result()  # one parallel op on another thread, kept alive
    out["after_another_thread_ms"] = {n: median_ms(n) for n in sizes}
    for pool in (other, mine):
        pool.shutdown()
    store.close()
    print(json.dumps(out), flush=True)
    return out


# --- PEFT's adapter_names= -------------------------------------------------------------------------------------------
def peft_compare(work: Path, batch: int = 32, repeats: int = 20) -> dict:
    """One forward of a mixed batch (8 adapters, 4 rows each, BBC titles) through graftune's AdapterModel and
    through PEFT's LoRA with ``adapter_names=``; the same base, rank 8 on query and value."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from graftune.core.model import AdapterModel
    from graftune.zoo import load_base

    texts = texts_for("short", batch)
    base = load_base("minilm")
    tok = AutoTokenizer.from_pretrained(base.source)
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    names = [f"a{i % 8}" for i in range(batch)]
    g = AdapterModel(base.model)
    for i in range(8):
        g.add_adapter(f"a{i}", "lora", r=8, alpha=16, targets=["query", "value"])
    for p in g.adapters.parameters():
        torch.nn.init.normal_(p, std=0.02)
    p_model = AutoModel.from_pretrained(base.source).eval()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    pm = get_peft_model(p_model, cfg, adapter_name="a0")
    for i in range(1, 8):
        pm.add_adapter(f"a{i}", cfg)
    pm.eval()

    def timeit(fn):
        with torch.inference_mode():
            fn()
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
        return 1000 * (time.perf_counter() - t) / repeats

    out = {"batch": batch, "adapters": 8, "tokens": int(enc["input_ids"].shape[1]),
           "graftune_mixed_ms": timeit(lambda: g(**enc, adapter_names=names)),
           "peft_mixed_ms": timeit(lambda: pm(**enc, adapter_names=names)),
           "base_alone_ms": timeit(lambda: base.model(**enc))}
    print(json.dumps(out), flush=True)
    return out


# --- drift ---------------------------------------------------------------------------------------------------------
class RowRecorder:
    """A store observer that keeps every row's features and stats, so many random streams can be summarized
    from one pass (``Summary.add`` on a subset of rows is what the server's tracker does on those rows)."""

    def __init__(self):
        self.rows = []

    def observe(self, entry, features, texts, input_ids, predictions):
        for i, p in enumerate(predictions):
            self.rows.append((features[i].double().numpy(), texts[i], input_ids[i], p["label"]))


def drift(work: Path, args) -> dict:
    import numpy as np

    from graftune.config import build_config
    from graftune.data.sources import load_data
    from graftune.data.splits import make_splits
    from graftune.serve import ModelStore
    from graftune.serve.drift import Summary, compare, reference_summary
    from graftune.serve.store import Rows

    results = {}
    for train_seed in args.train_seeds:
        run = ensure_run(work, train_seed)
        cfg = build_config(run / "run.yaml")
        splits = make_splits(load_data("bbc-news"), **cfg.split_args())
        pools = {"bbc held out (test split)": list(splits.test.inputs),
                 "trec questions": list(load_data("trec").inputs),
                 "rotten-tomatoes snippets": list(load_data("rotten-tomatoes").inputs)}
        rng = random.Random(train_seed)
        pools = {k: rng.sample(v, min(len(v), args.pool)) for k, v in pools.items()}
        ref = reference_summary(run)
        store = ModelStore()
        store.sync({"news": ("1", run)})
        entry = store.acquire("news")
        unk = entry.task.tokenizer.unk_token_id
        for kind, texts in pools.items():
            rec = RowRecorder()
            store.observer = rec
            for i in range(0, len(texts), 16):
                store.submit(store.classify, [Rows(entry, texts[i:i + 16])]).result()
            flags, moved_dims = [], []
            for s in range(args.streams):
                pick = np.random.default_rng(1000 * train_seed + s).choice(len(rec.rows), args.stream, replace=False)
                summary = Summary()
                chosen = [rec.rows[j] for j in pick]
                summary.add(np.stack([r[0] for r in chosen]), [r[1] for r in chosen], [r[2] for r in chosen],
                            [r[3] for r in chosen], unk)
                report = compare(ref, summary, alpha=args.alpha)
                flags.append(bool(report["drift"]))
                moved_dims.append(report["checks"]["embedding"]["dims_moved"])
            results.setdefault(kind, []).append({"train_seed": train_seed, "flagged": sum(flags),
                                                 "streams": len(flags), "median_dims_moved":
                                                 float(np.median(moved_dims))})
            print(json.dumps({"train_seed": train_seed, "stream": kind, "flagged": sum(flags), "of": len(flags),
                              "median_dims_moved": float(np.median(moved_dims)), "reference_n": ref.n}), flush=True)
        store.release(entry)
        store.close()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/i13")
    ap.add_argument("--serving", action="store_true")
    ap.add_argument("--open", action="store_true", help="open loop: goodput at p99 <= 2x a lone request")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--peft", action="store_true")
    ap.add_argument("--forward", action="store_true", help="CPU time of one mixed forward vs one per request")
    ap.add_argument("--thread-cost", action="store_true", help="the forward on the only thread that ran torch, "
                    "and after another thread did")
    ap.add_argument("--drift", action="store_true")
    ap.add_argument("--switch", action="store_true", help="promote and rollback under load")
    ap.add_argument("--trained", action="store_true", help="serve 32 really trained runs (4 data sets x seeds 0-7) "
                    "instead of noisy copies of one")
    ap.add_argument("--correctness", action="store_true", help="mixed batches of the 32 trained adapters against "
                    "each run alone (implies --trained)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=600, help="requests per load test at most")
    ap.add_argument("--seconds", type=float, default=45, help="seconds per load test at most")
    ap.add_argument("--lone", type=int, default=40, help="requests of the lone-request latency")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--open-seconds", type=float, default=15, help="open loop: seconds of arrivals per rate at most")
    ap.add_argument("--open-requests", type=int, default=3000, help="open loop: requests per rate at most")
    ap.add_argument("--open-lone", type=int, default=300, help="open loop: lone requests (the p99 reference)")
    ap.add_argument("--open-idle-lone", type=int, default=100, help="open loop: lone requests each sent after the "
                    "server sat idle for --idle-gap-ms (a second reference: what a request finds on a quiet server)")
    ap.add_argument("--idle-gap-ms", type=float, default=200, help="open loop: the idle time before each of those")
    ap.add_argument("--open-timeout", type=float, default=30, help="open loop: seconds a request may take")
    ap.add_argument("--start-rate", type=float, default=10, help="open loop: first offered rate, requests/s")
    ap.add_argument("--rate-factor", type=float, default=1.5, help="open loop: step between coarse rates")
    ap.add_argument("--bisect", type=int, default=3, help="open loop: bisections after the coarse sweep")
    ap.add_argument("--saturation", type=float, default=10, help="open loop: the coarse sweep stops at a p99 beyond "
                    "this many lone p99s (or a backlog)")
    ap.add_argument("--max-rate", type=float, default=2000, help="open loop: the highest rate tried")
    ap.add_argument("--max-outstanding", type=int, default=256, help="open loop: unanswered requests before "
                    "sending stops (a backlog)")
    ap.add_argument("--backlog-tolerance", type=float, default=0.05, help="open loop: achieved rate may fall short "
                    "of the offered one by this share")
    ap.add_argument("--open-seed", type=int, default=0, help="open loop: the k-th rate of every server's sweep "
                    "uses arrivals seeded with this + k + 10 (the servers see the same arrivals at the same step)")
    ap.add_argument("--mixed-waits", type=float, nargs="+", default=[5.0], help="open loop: the mixed server's "
                    "--max-wait-ms values (one server each)")
    ap.add_argument("--lengths", nargs="+", default=["short", "long"])
    ap.add_argument("--adapters", type=int, nargs="+", default=[8, 32], help="served adapter counts (at most 32)")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--streams", type=int, default=200, help="random served streams per pool and training seed")
    ap.add_argument("--stream", type=int, default=200, help="inputs per served stream")
    ap.add_argument("--pool", type=int, default=600, help="texts embedded per pool")
    ap.add_argument("--alpha", type=float, default=0.01)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = {}
    if args.serving:
        out["serving"] = serving(work, args)
    if args.open:
        out["open"] = open_serving(work, args)
    if args.memory:
        out["memory"] = memory(work, args)
    if args.forward:
        out["forward"] = forward_cpu(work, args)
    if args.thread_cost:
        out["thread_cost"] = thread_cost(work, args)
    if args.peft:
        out["peft"] = peft_compare(work)
    if args.switch:
        out["switch"] = switch_under_load(work, args)
    if args.correctness:
        args.trained = True
        out["correctness"] = mixed_correctness(work, args)
    if args.drift:
        out["drift"] = drift(work, args)
    (work / "results.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
