"""Speculative decoding (issue 20 item 4): decode tokens/s with and without drafts, and the acceptance rate.

Two prompts where drafts can come from the prompt: edit-this-code (a function and "rename a variable, return the
whole code") and summarise-this (a passage of bench/texts/essay.txt). SmolLM2-135M-Instruct Q4_1 in the default
packed-int4 format, greedy, one request at a time. Configurations:

  plain        no speculation, eager decode step
  compiled     no speculation, the AOT-compiled decode step (only if an artifact is cached; never built here)
  ngram        prompt-lookup drafts (--speculate ngram), verified by the eager batched decode forward
  draft-self   --draft with the same model: every draft is the target's own guess (a correctness check of the
               draft-model path; it costs a second model's decode per draft token, so it cannot be faster -
               no smaller model with SmolLM2's tokenizer is available offline)

Each measurement runs in its own process, configurations alternate in a rotating order round by round, so all
see the same machine load; medians over rounds. The output tokens of every configuration are compared with
plain decoding's (they must be identical). Reported: decode tokens/s (wall, first token to last), CPU ms per
token (`time.process_time`, less moved by other processes on a shared machine) and the acceptance rate.

    .venv/bin/python bench/speculative.py --rounds 3 --threads 2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json_atomic  # noqa: E402

ESSAY = Path(__file__).resolve().parent / "texts" / "essay.txt"
CONFIGS = ("plain", "compiled", "ngram", "draft-self")
PROMPTS = ("edit-code", "summarise")

CODE = '''import json
from pathlib import Path


def load_orders(path):
    """Read orders from a JSON lines file."""
    records = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def order_total(records, tax_rate=0.2):
    total = 0.0
    for record in records:
        price = record["price"] * record["quantity"]
        if record.get("discount"):
            price -= price * record["discount"]
        total += price
    return total * (1 + tax_rate)


def main():
    records = load_orders(Path("orders.jsonl"))
    print(f"{len(records)} orders, total {order_total(records):.2f}")


if __name__ == "__main__":
    main()
'''


def _messages(name: str) -> list[dict]:
    if name == "edit-code":
        return [{"role": "user", "content": "Rename the variable `records` to `orders` everywhere in this Python "
                 "code and return the whole code, nothing else:\n\n```python\n" + CODE + "```"}]
    text = " ".join(ESSAY.read_text().split()[:260])
    return [{"role": "user", "content": "Summarise this text in a few sentences, using its own words:\n\n" + text}]


def _worker(config: str, prompt: str, threads: int, max_tokens: int, k: int) -> dict:
    import llamaforge  # first: it sets libgomp's spin policy (GOMP_SPINCOUNT=0) before torch loads libgomp
    import torch
    from llamaforge.generate.chat_formats import chat_format
    from llamaforge.generate.engine import BatchEngine
    from llamaforge.generate.sampling import SamplingParams
    torch.set_num_threads(threads)
    lm = llamaforge.load("smollm2", compile=False)
    if config == "compiled":
        lm.attach_compiled(build_missing=False)
        if lm.compiled is None:
            return {"skipped": "no compiled artifact cached for this thread count"}
    kw = {}
    if config == "ngram":
        kw = {"speculate": "ngram", "draft_tokens": k}
    elif config == "draft-self":
        kw = {"speculate": "draft", "draft_lm": llamaforge.load("smollm2", compile=False), "draft_tokens": k}
    engine = BatchEngine(lm, max_batch=1, max_seq_len=2048, **kw)
    ids = chat_format(lm).encode(_messages(prompt))
    req = engine.add(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    while req.state != "decode" and not req.done:  # prefill first, then time decode steps only
        engine.step()
    n0 = req.completion_tokens
    t, c = time.perf_counter(), time.process_time()
    steps = 0
    while not req.done:
        engine.step()
        steps += 1
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    st = engine.speculator.stats() if engine.speculator is not None else {}
    return {"tokens": req.completion_tokens - n0, "steps": steps, "wall": wall, "cpu": cpu,
            "drafted": st.get("drafted_tokens", 0), "accepted": st.get("accepted_tokens", 0),
            "prompt_tokens": len(ids), "output": hashlib.sha256(json.dumps(req.output_ids).encode()).hexdigest()[:16],
            "text": req.text[:200]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=PROMPTS)
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "out" / "speculative.json")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "PROMPT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.threads, args.max_tokens, args.draft_tokens)))
        return 0
    results: dict = {}
    for rnd in range(args.rounds):
        for prompt in args.prompts:
            order = args.configs[rnd % len(args.configs):] + args.configs[:rnd % len(args.configs)]
            for config in order:
                out = subprocess.run([sys.executable, __file__, "--worker", config, prompt, "--threads",
                                      str(args.threads), "--max-tokens", str(args.max_tokens), "--draft-tokens",
                                      str(args.draft_tokens)], capture_output=True, text=True, timeout=900)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault(prompt, {}).setdefault(config, []).append(r)
                if "skipped" in r:
                    print(f"round {rnd + 1} {prompt:9s} {config:10s} skipped: {r['skipped']}", file=sys.stderr)
                    continue
                print(f"round {rnd + 1} {prompt:9s} {config:10s} {r['tokens'] / r['wall']:.1f} tok/s, cpu "
                      f"{r['cpu'] * 1e3 / r['tokens']:.1f} ms/token, accepted {r['accepted']}/{r['drafted']}",
                      file=sys.stderr)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"\nSmolLM2-135M Q4_1 (q4), greedy, {args.max_tokens} tokens max, {args.draft_tokens} draft tokens, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds, median; load average at the end "
          f"{' '.join(load)} (shared machine)\n")
    print("| prompt | configuration | decode tok/s | CPU ms/token | vs plain (tok/s) | acceptance | tokens/step |"
          " output = plain |")
    print("|---|---|---|---|---|---|---|---|")
    for prompt, by in results.items():
        ran = {c: [r for r in rs if "skipped" not in r] for c, rs in by.items()}
        tps = {c: statistics.median(r["tokens"] / r["wall"] for r in rs) for c, rs in ran.items() if rs}
        ref = {r["output"] for r in ran.get("plain", [])}
        for config in args.configs:
            rs = ran.get(config) or []
            if not rs:
                print(f"| {prompt} | {config} | skipped | | | | | |")
                continue
            cpu = statistics.median(r["cpu"] * 1e3 / r["tokens"] for r in rs)
            drafted, accepted = sum(r["drafted"] for r in rs), sum(r["accepted"] for r in rs)
            rate = f"{accepted / drafted:.0%}" if drafted else "-"
            per_step = statistics.median(r["tokens"] / r["steps"] for r in rs)
            same = "yes" if ref and {r["output"] for r in rs} == ref else "NO"
            rel = f"{tps[config] / tps['plain']:.2f}x" if "plain" in tps else "-"
            print(f"| {prompt} | {config} | {tps[config]:.1f} | {cpu:.1f} | {rel} | {rate} | {per_step:.2f} | "
                  f"{same} |")
    write_json_atomic(args.json, {"threads": args.threads, "load": load, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
