"""Decode speed with and without a competing CPU-bound process: llamaforge vs llama.cpp, same run, interleaved.

    python bench/contention.py [--rounds 3] [--tokens 48] [--configs lf,lf:eager,lf:spin300k,lf:passive,lf:t1,llama.cpp]

Each configuration runs in its own process (libgomp reads its wait policy when it loads, so a setting cannot
change inside one process), once with the machine as it is ("quiet": nothing started by us) and once next to one
competing CPU-bound process (a Python busy loop), rounds interleaved so that background load drifts over all
configurations alike. Decode tokens/s is greedy, one stream, after a 16-token prefill and 4 warm-up tokens.

Configurations: `lf` is llamaforge as a user gets it (default threads, default spin 0, the compiled step when
its artifact is cached, else eager: the `detail` column says which); `:eager` turns the compiled step off;
`:spin300k` is libgomp's own spin (GOMP_SPINCOUNT=300000, the setting before issue 19); `:spin10k` a short spin;
`:passive` sleeps at once (GOMP_SPINCOUNT=0, our default); `:tN` runs N threads. `llama.cpp` is
`llama-bench -p 0 -n TOKENS` with its default threads, from $LLAMAFORGE_PEER_BIN (default .peers/bin), on the
same GGUF file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, peer_bin, peer_env, smollm2_gguf, write_json_atomic, write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = "lf,lf:eager,lf:spin300k,lf:spin10k,lf:t1,llama.cpp"
SPIN = {"spin300k": "300000", "spin10k": "10000", "passive": "0"}


def worker(a) -> int:
    """One measurement in this process: llamaforge's own defaults except what the configuration names."""
    import llamaforge  # first: it sets the OpenMP spin before torch loads libgomp
    import torch
    from llamaforge.generate import compiled
    from llamaforge.threads import apply_threads
    threads = apply_threads(a.threads)
    lm = llamaforge.load(str(a.model), compile="auto" if a.compiled else False)
    cache = lm.model.new_cache(1, 64 + a.tokens)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([list(range(100, 116))]), cache=cache, input_pos=0, last_only=True)
        tok, pos = int(logits[0, -1].argmax()), 16
        for _ in range(4):
            tok, pos = int(compiled.decode_one(lm, tok, cache, pos).argmax()), pos + 1
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(a.tokens):
            tok, pos = int(compiled.decode_one(lm, tok, cache, pos).argmax()), pos + 1
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"tok_s": a.tokens / dt, "cpu_ms_per_token": 1000 * cpu / a.tokens, "threads": threads,
                      "detail": f"{threads} thr, " + ("compiled" if lm.compiled is not None else "eager")
                                + f", GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"}))
    return 0


def run_llamacpp(model: Path, tokens: int, timeout: int) -> dict:
    exe = peer_bin("llama-bench")
    if exe is None:
        return {"error": "llama-bench not found (set LLAMAFORGE_PEER_BIN)"}
    r = subprocess.run([str(exe), "-m", str(model), "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"],
                       capture_output=True, text=True, timeout=timeout,
                       env=peer_env(exe))
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
    row = json.loads(r.stdout)[0]
    return {"tok_s": float(row["avg_ts"]), "detail": f"llama-bench {row.get('build_commit', '?')}, "
                                                      f"{row.get('n_threads')} thr"}


def run_config(config: str, model: Path, tokens: int, timeout: int) -> dict:
    if config == "llama.cpp":
        return run_llamacpp(model, tokens, timeout)
    parts = config.split(":")[1:]
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                            "LLAMAFORGE_NUM_THREADS")}
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--tokens", str(tokens)]
    for p in parts:
        if p in SPIN:
            env["GOMP_SPINCOUNT"] = SPIN[p]
        elif p == "eager":
            cmd.append("--eager")
        elif p.startswith("t") and p[1:].isdigit():
            cmd += ["--threads", p[1:]]
        else:
            raise SystemExit(f"unknown configuration part {p!r} in {config!r}")
    env["PYTHONWARNINGS"] = "ignore"
    env.setdefault("LLAMAFORGE_COMPILE", "1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_competitor() -> subprocess.Popen:
    """One CPU-bound process that never sleeps (what the issue measured against: a build, a training job)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--scenarios", default="quiet,contended")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per measurement")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.model = a.model or smollm2_gguf()
    if a.worker:
        a.compiled = not a.eager
        return worker(a)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    runs: dict[tuple[str, str], list[dict]] = {(s, c): [] for s in scenarios for c in configs}
    for rnd in range(a.rounds):
        for scen in scenarios:
            comp = start_competitor() if scen == "contended" else None
            try:
                time.sleep(0.5 if comp else 0)
                for c in configs:
                    res = run_config(c, a.model, a.tokens, a.timeout)
                    runs[(scen, c)].append(res)
                    print(f"round {rnd + 1} {scen:9} {c:14} "
                          + (f"{res['tok_s']:7.1f} tok/s  {res.get('detail', '')}" if "tok_s" in res
                             else f"error: {res['error']}"), file=sys.stderr, flush=True)
            finally:
                if comp is not None:
                    comp.kill()
                    comp.wait()
    table = []
    for c in configs:
        row = {"config": c}
        for s in scenarios:
            v = [r["tok_s"] for r in runs[(s, c)] if "tok_s" in r]
            row[s] = statistics.median(v) if v else None
            row[f"{s}_min"], row[f"{s}_max"] = (min(v), max(v)) if v else (None, None)
        row["detail"] = next((r["detail"] for r in runs[(scenarios[-1], c)] if "detail" in r), "")
        table.append(row)
    md = markdown(table, scenarios, a)
    print(md)
    write_text_atomic(a.out / "contention.md", md)
    write_json_atomic(a.out / "contention.json", {"table": table, "runs": {f"{s}|{c}": v for (s, c), v in
                                                                          runs.items()}})
    return 0


def markdown(table, scenarios, a) -> str:
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    head = (f"Decode tokens/s (median of {a.rounds} interleaved rounds, min-max), {a.tokens} tokens, "
            f"{a.model.name}, {os.cpu_count()} CPUs, load average at the end {' '.join(load)} "
            f"(shared machine: other jobs ran too), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
    cols = " | ".join(scenarios)
    lines = [f"| config | {cols} | detail |", "|---" * (len(scenarios) + 2) + "|"]
    for r in table:
        cells = " | ".join("n/a" if r[s] is None else f"{r[s]:.1f} ({r[f'{s}_min']:.1f}-{r[f'{s}_max']:.1f})"
                           for s in scenarios)
        lines.append(f"| {r['config']} | {cells} | {r['detail']} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
