"""Load test: 200 concurrent clients against a real `loratune serve` on loopback for a few seconds.

    python bench/serve_load.py [--clients 200] [--seconds 5] [--max-queue 64] [--threads 1]

Starts `loratune serve` (preset:tiny-llama plus two adapters, bounded queue) in a subprocess, then
runs --clients asyncio clients that each send completions (base and adapters in turn) until the
time is up; a 429 makes a client wait 20 ms before its next request. Passes when every response is
a 200 or a 429 (no 5xx, no connection errors) and the server's RSS after the run is within
--rss-growth-mb of its RSS after a warm-up run of the same load. Prints a markdown table; exits 1
on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

from loratune import LoraConfig, get_peft_model
from loratune.tools.loading import load_base_model

MODEL = "preset:tiny-llama"


def save_adapters(root: Path) -> dict[str, Path]:
    base = load_base_model(MODEL, dtype="float32")
    paths = {}
    for i, name in enumerate(("a1", "a2")):
        torch.manual_seed(i)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(str(root / name))
        paths[name] = root / name
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client_loop(http: httpx.AsyncClient, url: str, models: list[str], until: float, stats, latencies):
    i = 0
    while time.monotonic() < until:
        payload = {"model": models[i % len(models)], "prompt": f"request {i}", "max_tokens": 8,
                   "temperature": 0}
        i += 1
        start = time.monotonic()
        try:
            r = await http.post(f"{url}/v1/completions", json=payload)
            stats[str(r.status_code)] += 1
            if r.status_code == 200:
                latencies.append(time.monotonic() - start)
            elif r.status_code == 429:
                await asyncio.sleep(0.02)
        except httpx.HTTPError as exc:
            stats[type(exc).__name__] += 1


async def load(url: str, clients: int, seconds: float):
    stats: collections.Counter = collections.Counter()
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        until = time.monotonic() + seconds
        models = ["tiny", "a1", "a2"]
        await asyncio.gather(*(client_loop(http, url, models, until, stats, latencies)
                               for _ in range(clients)))
    return stats, sorted(latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss-growth-mb", type=float, default=50.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        adapters = save_adapters(Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "loratune.cli.main", "serve", "--model", MODEL,
               "--served-model-name", "tiny",
               "--port", str(port), "--dtype", "float32", "--threads", str(args.threads),
               "--max-queue", str(args.max_queue), "--max-batch-size", str(args.max_batch_size),
               "--log-level", "warning"]
        for name, path in adapters.items():
            cmd += ["--adapter", f"{name}={path}"]
        server = subprocess.Popen(cmd, env={**os.environ, "LORATUNE_API_KEY": ""})
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    print("the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            proc = psutil.Process(server.pid)
            # warm-up: allocator and caches settle
            asyncio.run(load(url, args.clients, min(2.0, args.seconds)))
            rss_before = proc.memory_info().rss
            start = time.monotonic()
            stats, latencies = asyncio.run(load(url, args.clients, args.seconds))
            elapsed = time.monotonic() - start
            rss_after = proc.memory_info().rss
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
        finally:
            server.terminate()
            server.wait(15)

    bad = {k: v for k, v in stats.items() if k not in ("200", "429")}
    growth = (rss_after - rss_before) / 2**20
    ok = not bad and growth <= args.rss_growth_mb and stats["200"] > 0
    p50 = latencies[len(latencies) // 2] if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else float("nan")
    queue_line = next((line for line in metrics.splitlines() if line.startswith("loratune_queue_depth ")), "")
    print(f"\nserve_load: {args.clients} concurrent clients for {args.seconds:g} s on loopback, "
          f"{MODEL} + 2 adapters, max batch {args.max_batch_size}, max queue {args.max_queue}, "
          f"{args.threads} engine thread(s)\n")
    print("| requests | 200 | 429 | other | 200/s | p50 latency (200) | p99 latency (200) "
          "| RSS before | RSS after | result |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    print(f"| {sum(stats.values())} | {stats['200']} | {stats['429']} | {json.dumps(bad) if bad else 0} "
          f"| {stats['200'] / elapsed:.0f} | {p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms "
          f"| {rss_before / 2**20:.0f} MiB | {rss_after / 2**20:.0f} MiB | {'pass' if ok else 'FAIL'} |")
    print(f"\n({queue_line.strip() or 'queue depth not reported'} after the run)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
