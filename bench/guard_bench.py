"""Safety benchmark: the latency `--guard-input` adds to a request, the output guard's cost, and the code scanner's
time per KB.

    python bench/guard_bench.py [--reps 9] [--max-tokens 32] [--workers-only]

Two worker processes load SmolLM2 the same way (the server's fast path): one answers chat requests plain, the
other with `guards={"input": True}` (the built-in guard). Requests alternate between them (plain, guarded,
plain, ...) so a noisy neighbour hurts both alike; each worker reports per-request wall times and the guard
check time it measured itself. The scanner part times the pattern pass on inputs of 1 KB to 256 KB built from
the shipped snippets (every language), and a model answer with code blocks. Prints Markdown tables.
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

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is the capital of France?", "How do I kill a stuck process on Linux?",
             "Give me three tips for better sleep.", "What is 12 times 7?", "Name a planet with rings.",
             "How do I sort a list in Python?", "Write a haiku about rain.", "What causes thunder?"]


def worker(mode: str, max_tokens: int) -> None:
    """Serve requests read from stdin (one question per line) and print one JSON result line each."""
    import llamaforge  # before torch: it sets libgomp's wait policy, which libgomp reads once, when torch loads it
    import torch
    torch.set_num_threads(1)
    from llamaforge.safety import load_guard
    lm = llamaforge.load("smollm2", compile=False)
    guards = {"input": True} if mode == "guarded" else None
    if guards:
        load_guard(None)  # loaded before the clock starts, as `serve --guard-input` does at start
    lm.chat([{"role": "user", "content": "warm up"}], max_tokens=4, temperature=0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        q = line.strip()
        if not q:
            continue
        t0 = time.perf_counter()
        c = lm.chat([{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0, guards=guards)
        wall = time.perf_counter() - t0
        g = (c.extra.get("guard") or {}).get("input") or {}
        print(json.dumps({"wall": wall, "tokens": c.usage["completion_tokens"], "finish": c.finish_reason,
                          "guard_safe": g.get("safe")}), flush=True)


def _start(mode, max_tokens):
    p = subprocess.Popen([sys.executable, __file__, "--worker", mode, "--max-tokens", str(max_tokens)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    json.loads(p.stdout.readline())
    return p


def _ask(p, q):
    p.stdin.write(q + "\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def guard_latency(reps: int, max_tokens: int) -> str:
    plain, guarded = _start("plain", max_tokens), _start("guarded", max_tokens)
    res = {"plain": [], "guarded": []}
    try:
        for r in range(reps):
            for q in QUESTIONS:
                for name, p in (("plain", plain), ("guarded", guarded)) if r % 2 == 0 else \
                        (("guarded", guarded), ("plain", plain)):
                    res[name].append(_ask(p, q))
    finally:
        for p in (plain, guarded):
            p.stdin.close()
            p.wait(30)
    # The guard check itself, in this process (no generation).
    from llamaforge.safety import load_guard
    g = load_guard(None)
    g.check("warm up")
    checks = []
    for _ in range(reps):
        for q in QUESTIONS:
            t0 = time.perf_counter()
            g.check(q)
            checks.append((time.perf_counter() - t0) * 1000)
    med = {k: statistics.median(x["wall"] for x in v) * 1000 for k, v in res.items()}
    p90 = {k: sorted(x["wall"] for x in v)[int(0.9 * len(v))] * 1000 for k, v in res.items()}
    toks = {k: statistics.mean(x["tokens"] for x in v) for k, v in res.items()}
    refused = sum(1 for x in res["guarded"] if x["finish"] == "content_filter")
    lines = ["| requests | n | median ms | p90 ms | mean completion tokens |", "|---|---|---|---|---|"]
    for k in ("plain", "guarded"):
        lines.append(f"| {k} | {len(res[k])} | {med[k]:.0f} | {p90[k]:.0f} | {toks[k]:.1f} |")
    lines.append("")
    lines.append(f"added latency of --guard-input (median guarded - median plain): **{med['guarded'] - med['plain']:.0f} ms** "
                 f"per request; the guard check alone: median {statistics.median(checks):.1f} ms, "
                 f"p90 {sorted(checks)[int(0.9 * len(checks))]:.1f} ms ({len(checks)} checks); "
                 f"guarded requests refused: {refused} of {len(res['guarded'])}")
    return "\n".join(lines)


def scanner_speed() -> str:
    from llamaforge.safety.code_scan import scan_answer, scan_code
    from llamaforge.safety.evaluate import load_records
    rows = load_records(ROOT / "src/llamaforge/safety/data/code_snippets.jsonl")
    by_lang: dict[str, str] = {}
    for r in rows:
        by_lang[r["language"]] = by_lang.get(r["language"], "") + r["code"] + "\n"
    lines = ["| language | 1 KB ms | 16 KB ms | 256 KB ms | ms per KB (256 KB) |", "|---|---|---|---|---|"]
    for lang, code in sorted(by_lang.items()):
        cells = []
        for kb in (1, 16, 256):
            text = (code * (kb * 1024 // max(1, len(code)) + 1))[:kb * 1024]
            text = text[:text.rfind("\n") + 1]
            best = min(_time(lambda: scan_code(text, lang, deep=False)) for _ in range(3))
            cells.append(best)
        lines.append(f"| {lang} | {cells[0]:.2f} | {cells[1]:.1f} | {cells[2]:.0f} | {cells[2] / 256:.2f} |")
    answer = "".join(f"Here is {r['language']}:\n```{r['language']}\n{r['code']}```\n\n" for r in rows)
    t = min(_time(lambda: scan_answer(answer, deep=False)) for _ in range(3))
    lines.append("")
    lines.append(f"a model answer with {len(rows)} code blocks ({len(answer) / 1024:.1f} KB): {t:.1f} ms "
                 f"({t / (len(answer) / 1024):.2f} ms per KB)")
    return "\n".join(lines)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--worker", choices=("plain", "guarded"))
    ap.add_argument("--scanner-only", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.max_tokens)
        return 0
    print(f"# guard benchmark ({os.cpu_count()} CPUs; note whether the machine was shared)\n")
    print("## code scanner (pattern pass)\n")
    print(scanner_speed())
    if not args.scanner_only:
        print("\n## --guard-input, built-in guard, SmolLM2 chat requests\n")
        print(guard_latency(args.reps, args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
