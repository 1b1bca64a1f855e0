"""Load test: 200 concurrent clients against a real `loratune serve` on loopback for a few seconds.

    python bench/serve_load.py [--clients 200] [--seconds 5] [--max-queue 64] [--threads 1]
    python bench/serve_load.py --floods 3 [--seconds 3]   # RSS across repeated hostile floods

Starts `loratune serve` (preset:tiny-llama plus two adapters, bounded queue) in a subprocess, then
runs --clients asyncio clients that each send completions (base and adapters in turn) until the
time is up; a 429 makes a client wait 20 ms before its next request. Passes when every response is
a 200 or a 429 (no 5xx, no connection errors) and the server's RSS after the run is within
--rss-growth-mb of its RSS after a warm-up run of the same load. Prints a markdown table; exits 1
on failure.

With --floods N (bounded: N rounds of --seconds each, loopback only), every round adds hostile
traffic beside the load: malformed and deeply nested bodies, non-ASCII Authorization bytes,
over-long names and paths, adapters with a NaN lora_alpha or a backtracking target_modules regex,
and connections that never finish their headers. Hostile requests must get a 4xx, never a 5xx,
and the server's RSS after the last round must be within --rss-growth-mb of its RSS after the
first (so repeated floods do not leak).
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
FLOOD_KEY = "bench-key"  # --floods: the server requires it, so a bad Authorization header must get 401


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


def hostile_requests() -> list[tuple[str, bytes, dict]]:
    """(path, body, headers) of requests that must each get a 4xx."""
    as_json = {"Content-Type": "application/json"}
    return [
        ("/v1/completions", b"{", as_json),
        ("/v1/completions", b"[" * 20_000 + b"]" * 20_000, as_json),
        ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', as_json),
        ("/v1/completions", json.dumps({"model": "m" * 50_000, "prompt": "x"}).encode(), as_json),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', as_json),
        ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x"}).encode(),
         {**as_json, "Authorization": b"Bearer \xff\xfe\x80"}),
        *[("/v1/load_lora_adapter", json.dumps({"lora_name": name, "lora_path": path}).encode(), as_json)
          for name, path in (("n" * 10_000, "a"), ("bad", "x" * 6000), ("bad", "../../etc"),
                             ("bad", "nan-alpha"), ("bad", "regex-bomb"))],
    ]


async def hostile_loop(http: httpx.AsyncClient, url: str, until: float, stats) -> None:
    requests = hostile_requests()
    i = 0
    while time.monotonic() < until:
        path, body, headers = requests[i % len(requests)]
        i += 1
        try:
            r = await http.post(f"{url}{path}", content=body, headers=headers)
            stats["hostile 4xx" if 400 <= r.status_code < 500 else f"hostile {r.status_code}"] += 1
        except httpx.HTTPError as exc:
            stats[f"hostile {type(exc).__name__}"] += 1


async def slow_headers(port: int, count: int) -> None:
    """Open connections that send half a request line and stall (the server must close them)."""
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        writers.append(writer)
    await asyncio.sleep(0.1)
    for writer in writers:
        writer.close()


async def load(url: str, clients: int, seconds: float, *, hostile: int = 0):
    stats: collections.Counter = collections.Counter()
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients + hostile, max_keepalive_connections=clients + hostile)
    headers = {"Authorization": f"Bearer {FLOOD_KEY}"} if hostile else {}
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as http:
        until = time.monotonic() + seconds
        models = ["tiny", "a1", "a2"]
        tasks = [client_loop(http, url, models, until, stats, latencies) for _ in range(clients)]
        tasks += [hostile_loop(http, url, until, stats) for _ in range(hostile)]
        if hostile:
            tasks.append(slow_headers(int(url.rsplit(":", 1)[1]), 20))
        await asyncio.gather(*tasks)
    return stats, sorted(latencies)


def write_hostile_adapters(root: Path, adapters: dict[str, Path]) -> None:
    """Copies of a good adapter with a NaN lora_alpha and a backtracking target_modules regex."""
    import shutil

    good = next(iter(adapters.values()))
    for name, field in (("nan-alpha", {"lora_alpha": float("nan")}),
                        ("regex-bomb", {"target_modules": r"(.|..)+\d"})):
        shutil.copytree(good, root / name)
        config = json.loads((root / name / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **field}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss-growth-mb", type=float, default=50.0)
    parser.add_argument("--floods", type=int, default=0,
                        help="rounds of load plus hostile traffic; RSS must stay flat across them")
    args = parser.parse_args()
    if args.floods:
        return floods(args)

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


def start_server(tmp: Path, args, extra: list[str]) -> tuple[subprocess.Popen, str] | None:
    adapters = save_adapters(tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loratune.cli.main", "serve", "--model", MODEL,
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--threads", str(args.threads),
           "--max-queue", str(args.max_queue), "--max-batch-size", str(args.max_batch_size),
           "--log-level", "error", *extra]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    write_hostile_adapters(tmp, adapters)
    server = subprocess.Popen(cmd, env={**os.environ, "LORATUNE_API_KEY": ""})
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.terminate()
            return None
        time.sleep(0.2)


def floods(args) -> int:
    """Run --floods rounds of load plus hostile traffic; RSS after the last within growth of the first."""
    clients = min(args.clients, 50)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        started = start_server(Path(tmp), args, ["--adapter-root", tmp, "--header-timeout", "1",
                                                   "--api-key", FLOOD_KEY])
        if started is None:
            print("the server did not start", file=sys.stderr)
            return 1
        server, url = started
        try:
            proc = psutil.Process(server.pid)
            for _ in range(args.floods):
                stats, _ = asyncio.run(load(url, clients, args.seconds, hostile=10))
                rounds.append((stats, proc.memory_info().rss))
            health = httpx.get(f"{url}/health", timeout=5).status_code
        finally:
            server.terminate()
            server.wait(15)
    print(f"\nserve_load --floods: {args.floods} rounds of {args.seconds:g} s, {clients} clients + 10 "
          f"hostile + 20 slow-header connections a round, loopback, {MODEL}\n")
    print("| round | 200 | 429 | hostile 4xx | other | RSS after |")
    print("|---:|---:|---:|---:|---:|---:|")
    ok = health == 200
    for i, (stats, rss) in enumerate(rounds, 1):
        bad = {k: v for k, v in stats.items() if k not in ("200", "429", "hostile 4xx")}
        ok = ok and not bad and stats["200"] > 0 and stats["hostile 4xx"] > 0
        print(f"| {i} | {stats['200']} | {stats['429']} | {stats['hostile 4xx']} "
              f"| {json.dumps(bad) if bad else 0} | {rss / 2**20:.0f} MiB |")
    growth = (rounds[-1][1] - rounds[0][1]) / 2**20
    ok = ok and growth <= args.rss_growth_mb
    print(f"\nRSS growth from round 1 to round {len(rounds)}: {growth:+.1f} MiB "
          f"(limit {args.rss_growth_mb:g}); /health after: {health}; {'pass' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
