"""Load benchmark for `llamaforge serve`: 1, 4 and 16 concurrent streaming clients.

For each concurrency level every client sends `--requests` streaming chat requests one after another; we report
aggregate output tokens/s (all completion tokens / wall time of the level), p50/p95 time to first token, and
p50/p95 per-token latency ((last token - first token) / (tokens - 1) per request). Prints a Markdown table and
writes JSON. By default it starts its own server (`llamaforge serve MODEL`) on a free loopback port.

    .venv/bin/python bench/serve_load.py                      # smollm2, levels 1 4 16
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:11435 --levels 1 8
    .venv/bin/python bench/serve_load.py --peer               # and llama.cpp's llama-server, side by side

With --peer, llama.cpp's `llama-server` (from $LLAMAFORGE_PEER_BIN, default .peers/bin; built from the
llama-cpp-python 0.3.36 sdist's vendored sources, never by `make test`) serves the same GGUF with one slot per
client at the largest level (`-np`, continuous batching) and the same thread count. Both servers get the same
requests; at each level the two run one after the other, in alternating order, never at the same time.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peer_bin, peer_env  # noqa: E402

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
    return proc, _wait_healthy(proc, f"http://127.0.0.1:{port}", "server", 300)


def _wait_healthy(proc: subprocess.Popen, url: str, name: str, timeout: float) -> str:
    """`url` once its /health answers 200; SystemExit if the process dies or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"{name} did not become healthy within {timeout:g} s")


def gguf_path(model: str) -> Path:
    """The GGUF file behind a store name or path (llama-server needs the file itself)."""
    if Path(model).is_file():
        return Path(model)
    import llamaforge
    return Path(llamaforge.load(model, compile=False).path)


def start_peer(gguf: Path, slots: int, ctx: int, threads: int) -> tuple[subprocess.Popen, str]:
    exe = peer_bin("llama-server")
    if exe is None:
        raise SystemExit("llama-server not found: build llama.cpp's tools from the llama-cpp-python 0.3.36 sdist "
                         "into it, or point LLAMAFORGE_PEER_BIN at them")
    port = _free_port()
    # -c is the total context shared by the slots: ctx tokens each, as our server gives every row.
    cmd = [str(exe), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-np", str(slots),
           "-c", str(ctx * slots), "-t", str(threads), "-tb", str(threads), "--cont-batching", "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=peer_env(exe))
    return proc, _wait_healthy(proc, f"http://127.0.0.1:{port}", "llama-server", 120)


def one_request(url: str, model: str, topic: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                chunks += 1
                now = time.perf_counter()
                first = first or now
                last = now
    tokens = tokens or chunks  # a server that sends no usage: one content chunk per token
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
    out = ["| server | clients | requests | output tok/s | TTFT p50 (ms) | TTFT p95 (ms) | per-token p50 (ms) | "
           "per-token p95 (ms) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.get('server', 'llamaforge')} | {r['clients']} | {r['requests']} | "
                   f"{r['tokens_per_s']:.1f} | {r['ttft_p50_s'] * 1e3:.0f} | "
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
    p.add_argument("--peer", action="store_true", help="also run llama.cpp's llama-server on the same GGUF")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "serve_load.json"))
    args = p.parse_args(argv)

    servers: dict[str, tuple] = {}
    try:
        if args.url is not None:
            servers["llamaforge"] = (None, args.url)
        else:
            servers["llamaforge"] = start_server(args.model, max(args.levels), args.ctx, args.threads)
        if args.peer:
            servers["llama-server"] = start_peer(gguf_path(args.model), max(args.levels), args.ctx, args.threads)
        for _, url in servers.values():
            one_request(url, args.model, "warm-up", 4)  # first-call overheads out of the numbers
        rows = []
        for i, n in enumerate(args.levels):
            names = list(servers) if i % 2 == 0 else list(servers)[::-1]
            for name in names:
                row = dict(run_level(servers[name][1], args.model, n, args.requests, args.max_tokens), server=name)
                rows.append(row)
                print(f"{name} clients={n}: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    table = markdown(sorted(rows, key=lambda r: (r["clients"], r["server"] != "llamaforge")))
    print(f"{args.model}, {args.threads} threads, {args.requests} requests per client, max_tokens "
          f"{args.max_tokens}; load average at the end {load} (shared machine)\n")
    print(table)
    ours = {r["clients"]: r for r in rows if r["server"] == "llamaforge"}
    peer = {r["clients"]: r for r in rows if r["server"] == "llama-server"}
    ratio = None
    if 1 in ours and max(ours) > 1:
        ratio = ours[max(ours)]["tokens_per_s"] / ours[1]["tokens_per_s"]
        print(f"\naggregate throughput at {max(ours)} clients = {ratio:.2f}x the single-client figure")
    for n in sorted(peer):
        print(f"clients={n}: llamaforge / llama-server tokens/s "
              f"{ours[n]['tokens_per_s'] / peer[n]['tokens_per_s']:.2f}x, "
              f"TTFT p50 {ours[n]['ttft_p50_s'] / peer[n]['ttft_p50_s']:.2f}x")
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
