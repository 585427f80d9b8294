"""Load benchmark for `llamaforge serve`: 1, 4 and 16 concurrent streaming clients.

For each concurrency level every client sends `--requests` streaming chat requests one after another; we report
aggregate output tokens/s (all completion tokens / wall time of the level), p50/p95 time to first token, and
p50/p95 per-token latency ((last token - first token) / (tokens - 1) per request). Prints a Markdown table and
writes JSON. By default it starts its own server (`llamaforge serve MODEL`) on a free loopback port.

    .venv/bin/python bench/serve_load.py                      # smollm2, levels 1 4 16
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:11435 --levels 1 8
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

TOPICS = ["a dragon", "the sea", "a lost key", "a robot", "autumn", "a small town", "the moon", "a detective",
          "a garden", "a storm", "a library", "a train journey", "a lighthouse", "a violin", "a desert", "a fox"]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(model: str, max_batch: int, ctx: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "llamaforge", "serve", model, "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", "256", "--ctx", str(ctx), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("server did not become healthy within 300 s")


def one_request(url: str, model: str, topic: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    ttft = (first - t0) if first else float("nan")
    per_token = (last - first) / (tokens - 1) if first and tokens > 1 else float("nan")
    return {"ttft": ttft, "per_token": per_token, "tokens": tokens}


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int):
        for j in range(requests):
            res = one_request(url, model, TOPICS[(i + j) % len(TOPICS)], max_tokens)
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in results)

    def pct(key, q):
        vals = sorted(r[key] for r in results if r[key] == r[key])
        if not vals:
            return float("nan")
        return vals[min(len(vals) - 1, int(round(q * (len(vals) - 1))))]
    return {"clients": clients, "requests": len(results), "output_tokens": total, "wall_s": wall,
            "tokens_per_s": total / wall, "ttft_p50_s": pct("ttft", 0.5), "ttft_p95_s": pct("ttft", 0.95),
            "per_token_p50_s": pct("per_token", 0.5), "per_token_p95_s": pct("per_token", 0.95),
            "mean_tokens_per_request": statistics.mean(r["tokens"] for r in results)}


def markdown(rows: list[dict]) -> str:
    out = ["| clients | requests | output tok/s | TTFT p50 (ms) | TTFT p95 (ms) | per-token p50 (ms) | "
           "per-token p95 (ms) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s'] * 1e3:.0f} | "
                   f"{r['ttft_p95_s'] * 1e3:.0f} | {r['per_token_p50_s'] * 1e3:.1f} | "
                   f"{r['per_token_p95_s'] * 1e3:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server started here")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "serve_load.json"))
    args = p.parse_args(argv)

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, max(args.levels), args.ctx, args.threads)
    try:
        one_request(url, args.model, "warm-up", 4)  # first-call overheads out of the numbers
        rows = []
        for n in args.levels:
            row = run_level(url, args.model, n, args.requests, args.max_tokens)
            rows.append(row)
            print(f"clients={n}: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    table = markdown(rows)
    print(table)
    by = {r["clients"]: r for r in rows}
    ratio = None
    if 1 in by and max(by) > 1:
        ratio = by[max(by)]["tokens_per_s"] / by[1]["tokens_per_s"]
        print(f"\naggregate throughput at {max(by)} clients = {ratio:.2f}x the single-client figure")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"model": args.model, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
                   "levels": rows, "throughput_ratio_max_vs_1": ratio, "time": time.time()}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
