"""What batch-invariant attention costs (issue 20): the default (`Llama.batch_invariant = True`: decode
attention row by row over each row's own keys, prompt attention in 64-position blocks) against one SDPA call per
layer (the previous behaviour), on SmolLM2 Q4_1 in the default packed-int4 format, eager (the compiled decode
step is not affected: its trace keeps one call per layer).

Each measurement runs in its own process; the two modes alternate round by round, so both see the same machine
load. Reported: CPU milliseconds (`time.process_time`, what contention moves least on a shared machine) and
wall-clock tokens/s, median over rounds.

    .venv/bin/python bench/determinism.py --rounds 3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json_atomic  # noqa: E402

ESSAY = Path(__file__).resolve().parent / "texts" / "essay.txt"
CASES = ("prefill512", "decode1", "decode8", "decode16")


def _worker(mode: str, case: str, threads: int) -> dict:
    import llamaforge  # before torch: it sets libgomp's wait policy, which libgomp reads once, when torch loads it
    import torch
    from llamaforge.generate.engine import BatchEngine
    from llamaforge.generate.sampling import SamplingParams
    torch.set_num_threads(threads)
    lm = llamaforge.load("smollm2", compile=False)
    lm.model.batch_invariant = mode == "invariant"
    ids = lm.tokenizer.encode(ESSAY.read_text())
    if case == "prefill512":
        engine = BatchEngine(lm, max_batch=1, max_seq_len=1024)
        req = engine.add(ids[:513], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        t, c = time.perf_counter(), time.process_time()
        while not req.done:
            engine.step()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        return {"tokens": 513, "wall": wall, "cpu": cpu}
    rows = int(case[len("decode"):])
    engine = BatchEngine(lm, max_batch=rows, max_seq_len=1024)
    reqs = [engine.add(ids[7 * i: 7 * i + 100 + 13 * i], SamplingParams(max_tokens=33, temperature=0.0,
                                                                       ignore_eos=True)) for i in range(rows)]
    while any(r.state != "decode" for r in reqs):  # prefill everyone first, then time decode steps only
        engine.step()
    t, c = time.perf_counter(), time.process_time()
    steps = 0
    while not all(r.done for r in reqs):
        engine.step()
        steps += 1
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"tokens": steps * rows, "steps": steps, "wall": wall, "cpu": cpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "out" / "determinism.json")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.threads)))
        return 0
    results: dict = {}
    for rnd in range(args.rounds):
        for case in args.cases:
            modes = ("invariant", "one-call") if rnd % 2 == 0 else ("one-call", "invariant")
            for mode in modes:
                out = subprocess.run([sys.executable, __file__, "--worker", mode, case, "--threads",
                                      str(args.threads)], capture_output=True, text=True, timeout=900)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault(case, {}).setdefault(mode, []).append(r)
                print(f"round {rnd + 1} {case:10s} {mode:9s} cpu {r['cpu'] * 1e3 / r['tokens']:.2f} ms/token, "
                      f"{r['tokens'] / r['wall']:.1f} tok/s", file=sys.stderr)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"\nSmolLM2 Q4_1 (q4, eager), {args.threads} thread(s), {args.rounds} interleaved rounds, median; "
          f"load average at the end {' '.join(load)} (shared machine)\n")
    print("| case | invariant CPU ms/token | one-call CPU ms/token | CPU cost | invariant tok/s | one-call tok/s |")
    print("|---|---|---|---|---|---|")
    for case, by in results.items():
        cpu = {m: statistics.median(r["cpu"] * 1e3 / r["tokens"] for r in rs) for m, rs in by.items()}
        tps = {m: statistics.median(r["tokens"] / r["wall"] for r in rs) for m, rs in by.items()}
        print(f"| {case} | {cpu['invariant']:.2f} | {cpu['one-call']:.2f} | "
              f"{cpu['invariant'] / cpu['one-call'] - 1:+.1%} | {tps['invariant']:.1f} | {tps['one-call']:.1f} |")
    write_json_atomic(args.json, {"threads": args.threads, "load": load, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
