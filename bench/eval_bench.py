"""Perplexity benchmark: llamaforge's `eval perplexity` beside llama.cpp (llama-cpp-python, the computation of
`llama-perplexity`) and transformers, on the same GGUF, the same token ids and the same windows; plus the KL guard
of every quantized in-memory format against the float32 base.

    .venv/bin/python bench/eval_bench.py [--reps 3] [--ctx 512] [--stride 512] [--threads 2] [--no-hf]

Each measurement runs in its own process (llama.cpp can crash with torch loaded beside it), the runtimes
interleaved rep by rep (ABBA order) so a noisy, shared machine slows both alike. Throughput = tokens run through
the model per second of scoring (load time excluded, reported apart). Writes bench/out/eval_bench.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, TEXT, smollm2_gguf, write_json_atomic, write_text_atomic  # noqa: E402

# Every quantized in-memory format, guarded against float32; "q4:kernels" scores through the packed int4 kernels
# generation uses (plain "q4" scores as `eval perplexity` does: dense float32 GEMMs over the same weights).
QUANTS = ("q4", "q4:kernels", "int8", "bf16")


def _windows(n: int, ctx: int, stride: int):
    from llamaforge.eval.perplexity import windows
    return windows(n, ctx, stride)


# --------------------------------------------------------------------------------------------- workers
def worker_llamaforge(path, ids, ctx, stride, threads, quant):
    import llamaforge  # before torch: it sets libgomp's wait policy, which libgomp reads once, when torch loads it
    import torch
    torch.set_num_threads(threads)
    from llamaforge.eval.perplexity import perplexity
    t = time.perf_counter()
    lm = llamaforge.load(str(path), quant=quant if quant != "float32" else None,
                         dtype="float32" if quant == "float32" else None, compile=False)
    load_s = time.perf_counter() - t
    perplexity(lm, ids[:ctx + 1], ctx=ctx)   # warm-up: kernels and allocator, not what we measure
    cpu = time.process_time()
    r = perplexity(lm, ids, ctx=ctx, stride=stride)
    out = {"ppl": r.ppl, "ppl_stderr": r.ppl_stderr, "tokens": r.tokens, "window_tokens": r.window_tokens,
           "seconds": r.seconds, "cpu_seconds": time.process_time() - cpu, "load_s": load_s,
           "detail": f"llamaforge quant={lm.metadata.get('quant')}"}
    out["ppl_llama_cpp_scheme"] = _llama_cpp_scheme(lm, ids, ctx)
    return out


def _llama_cpp_scheme(lm, ids, ctx) -> float:
    """Our perplexity scored the way `llama-perplexity` scores: whole non-overlapping chunks of ctx tokens, each
    token of a chunk's second half predicted from the chunk's tokens before it."""
    from llamaforge.eval.scoring import ModelScorer
    first = ctx // 2 + 1
    seqs = [ids[k:k + ctx] for k in range(0, len(ids) - ctx + 1, ctx)]
    scored = ModelScorer(lm).score([(q, first) for q in seqs])
    lp = [x for s in scored for x in s.logprobs]
    return math.exp(-sum(lp) / len(lp))


def worker_llamacpp(path, ids, ctx, stride, threads, _):
    import llama_cpp
    import numpy as np
    t = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    load_s = time.perf_counter() - t
    llm.reset()
    llm.eval(ids[:ctx])   # warm-up
    nll, n, seen = 0.0, 0, 0
    t, cpu = time.perf_counter(), time.process_time()
    for w in _windows(len(ids), ctx, stride):
        seq = ids[w.begin:w.end]
        llm.reset()
        llm.eval(seq)
        logits = np.asarray(llm.scores[:len(seq)], dtype=np.float64)
        rows = np.arange(w.first - w.begin - 1, len(seq) - 1)
        x = logits[rows]
        m = x.max(-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m).sum(-1))
        nll += float((lse - x[np.arange(len(rows)), np.asarray(seq)[rows + 1]]).sum())
        n += len(rows)
        seen += len(seq)
    return {"ppl": math.exp(nll / n), "tokens": n, "window_tokens": seen, "seconds": time.perf_counter() - t,
            "cpu_seconds": time.process_time() - cpu, "load_s": load_s,
            "detail": f"llama-cpp-python {llama_cpp.__version__}"}


_text = TEXT   # --text


def worker_llama_perplexity(path, ids, ctx, stride, threads, _):
    """llama.cpp's own `llama-perplexity` binary on the same text file (it tokenizes the text itself and scores
    the second half of each non-overlapping window of ctx tokens, so its perplexity is close to, not equal to, a
    stride-`ctx` run; the throughput is over every token it runs through the model, as ours)."""
    import re
    from common import peer_bin, peer_env
    exe = peer_bin("llama-perplexity")
    if exe is None:
        raise SystemExit("llama-perplexity not found (set LLAMAFORGE_PEER_BIN)")
    t = time.perf_counter()
    p = subprocess.run([str(exe), "-m", str(path), "-f", str(_text), "-c", str(ctx), "-t", str(threads),
                        "-tb", str(threads)], capture_output=True, text=True, env=peer_env(exe), timeout=1800)
    wall = time.perf_counter() - t
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise SystemExit(out[-500:])
    ppl = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", out)
    per_pass = re.search(r"([0-9.]+) seconds per pass", out)
    if not (ppl and chunks and per_pass):
        raise SystemExit("could not parse llama-perplexity's output: " + out[-500:])
    n_chunks, n_ctx, batch, n_seq = (int(x) for x in chunks.groups())
    # It times its first pass (n_seq chunks in one batch; every pass does the same work); the process's wall time
    # (load included) bounds that from above: the smaller of the two, in the peer's favour.
    seconds = min(float(per_pass.group(1)) * math.ceil(n_chunks / n_seq), wall)
    return {"ppl": float(ppl.group(1)), "ppl_stderr": float(ppl.group(2)), "tokens": n_chunks * (n_ctx // 2 - 1),
            "window_tokens": n_chunks * n_ctx, "seconds": seconds, "wall_s": wall, "load_s": float("nan"),
            "detail": f"llama-perplexity (llama.cpp, batch {batch}, scores 2nd half of each window)"}


def worker_hf(path, ids, ctx, stride, threads, _):
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    nll, n, seen = 0.0, 0, 0
    t = time.perf_counter()
    for w in _windows(len(ids), ctx, stride):
        seq = torch.tensor([ids[w.begin:w.end]])
        with torch.inference_mode():
            lp = torch.log_softmax(model(seq).logits[0].double(), -1)
        rows = torch.arange(w.first - w.begin - 1, seq.shape[1] - 1)
        nll -= float(lp[rows, seq[0, rows + 1]].sum())
        n += len(rows)
        seen += seq.shape[1]
    return {"ppl": math.exp(nll / n), "tokens": n, "window_tokens": seen, "seconds": time.perf_counter() - t,
            "load_s": load_s, "detail": "transformers float32"}


def worker_kl(path, ids, ctx, stride, threads, quant):
    import llamaforge  # before torch: it sets libgomp's wait policy, which libgomp reads once, when torch loads it
    import torch
    torch.set_num_threads(threads)
    from llamaforge.eval.perplexity import compare
    lm = llamaforge.load(str(path), quant=quant.split(":")[0], compile=False)
    base = llamaforge.load(str(path), dtype="float32")
    c = compare(lm, base, ids, ctx=ctx, stride=stride, dense=not quant.endswith(":kernels"))
    return {"quant": quant, "ratio": c.ratio, "kld_mean": c.kld["mean"], "kld_p99": c.kld["p99"],
            "kld_max": c.kld["max"], "same_top": c.same_top, "ppl": c.ppl, "ppl_base": c.ppl_base}


WORKERS = {"llamaforge": worker_llamaforge, "llama.cpp": worker_llamacpp, "llama-perplexity": worker_llama_perplexity,
           "hf": worker_hf, "kl": worker_kl}


def run_worker(kind: str, arg: str, ids_file: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--arg", arg, "--ids", str(ids_file), "--ctx", str(args.ctx),
           "--stride", str(args.stride), "--threads", str(args.threads), "--text", str(args.text)]
    env = dict(os.environ, LLAMAFORGE_COMPILE="0")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=None, help="default: --ctx (no overlap)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (slow to load)")
    ap.add_argument("--no-kl", action="store_true", help="skip the KL guard of the quantized formats")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per worker process")
    ap.add_argument("--text", type=Path, default=TEXT, help=f"text file (default {TEXT.relative_to(TEXT.parents[2])})")
    ap.add_argument("--worker"), ap.add_argument("--arg"), ap.add_argument("--ids")
    args = ap.parse_args()
    global _text
    _text = args.text
    args.stride = args.stride or args.ctx
    path = smollm2_gguf()
    if args.worker:
        ids = json.loads(Path(args.ids).read_text())
        print(json.dumps(WORKERS[args.worker](path, ids, args.ctx, args.stride, args.threads, args.arg)))
        return 0

    import llamaforge
    from llamaforge.eval.perplexity import text_ids
    ids = text_ids(llamaforge.load(str(path), compile=False), args.text.read_text(encoding="utf-8"))
    ids_file = Path(tempfile.mkstemp(suffix=".json")[1])
    ids_file.write_text(json.dumps(ids))
    import importlib.util
    from common import peer_bin
    sides = [("llamaforge", "default")]
    if importlib.util.find_spec("llama_cpp") is not None:
        sides.append(("llama.cpp", ""))
    if peer_bin("llama-perplexity") is not None:
        sides.append(("llama-perplexity", ""))
    if len(sides) == 1:
        print("no peer: neither llama-cpp-python nor llama-perplexity ($LLAMAFORGE_PEER_BIN) is available",
              file=sys.stderr)
    speed: dict[str, list[dict]] = {s[0]: [] for s in sides}
    try:
        for rep in range(args.reps):
            for kind, arg in (sides if rep % 2 == 0 else sides[::-1]):
                r = run_worker(kind, arg if arg != "default" else "auto", ids_file, args)
                speed[kind].append(r)
                print(f"rep {rep + 1} {kind}: {json.dumps(r)[:300]}", file=sys.stderr, flush=True)
        ppl = {"llamaforge float32": run_worker("llamaforge", "float32", ids_file, args)}
        if not args.no_hf:
            ppl["transformers float32"] = run_worker("hf", "", ids_file, args)
        kl = [] if args.no_kl else [run_worker("kl", q, ids_file, args) for q in QUANTS]
    finally:
        ids_file.unlink(missing_ok=True)
    report = _report(speed, ppl, kl, args, len(ids))
    print(report)
    OUT.mkdir(parents=True, exist_ok=True)
    write_text_atomic(OUT / "eval_bench.md", report)
    write_json_atomic(OUT / "eval_bench.json", {"speed": speed, "ppl": ppl, "kl": kl, "ctx": args.ctx,
                                                "stride": args.stride, "threads": args.threads, "tokens": len(ids),
                                                "text": str(args.text)})
    return 0


def _med(rs: list[dict], key: str):
    v = [r[key] for r in rs if key in r]
    return statistics.median(v) if v else float("nan")


def _report(speed, ppl, kl, args, n_ids) -> str:
    lines = [f"Perplexity of {args.text.name} ({n_ids} tokens), windows of {args.ctx}, stride {args.stride}, "
             f"{args.threads} threads, {args.reps} reps interleaved (a shared machine: medians, with min-max).", "",
             "| runtime | perplexity | tokens scored | throughput (tok/s, median [min-max]) | CPU s | load (s) |",
             "|---|---|---|---|---|---|"]
    for kind, rs in speed.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {kind} | failed: {rs[0].get('error', '')[:80]!r} | | | | |")
            continue
        tps = [r["window_tokens"] / r["seconds"] for r in ok]
        lines.append(f"| {ok[0]['detail']} | {ok[0]['ppl']:.4f} | {ok[0]['tokens']} | {statistics.median(tps):.0f} "
                     f"[{min(tps):.0f}-{max(tps):.0f}] | {_med(ok, 'cpu_seconds'):.1f} | {_med(ok, 'load_s'):.1f} |")
    for name, r in ppl.items():
        lines.append(f"| {name} (reference) | {r.get('ppl', float('nan')):.4f} | {r.get('tokens', '-')} | "
                     f"{r['window_tokens'] / r['seconds']:.0f} | | {r.get('load_s', 0):.1f} |" if "error" not in r
                     else f"| {name} | failed | | | | |")
    ours = [r for r in speed["llamaforge"] if "error" not in r]
    lcpp = [r for r in speed.get("llama-perplexity", []) if "error" not in r]
    if ours and lcpp and "ppl_llama_cpp_scheme" in ours[0]:
        lines += ["", f"Scored as `llama-perplexity` scores (whole chunks of {args.ctx}, second halves): llamaforge "
                      f"{ours[0]['ppl_llama_cpp_scheme']:.4f}, llama.cpp {lcpp[0]['ppl']:.4f} "
                      f"(± {lcpp[0]['ppl_stderr']:.4f}); ratio {ours[0]['ppl_llama_cpp_scheme'] / lcpp[0]['ppl']:.4f}"]
    for kind in [k for k in speed if k != "llamaforge"]:
        peer = [r for r in speed[kind] if "error" not in r]
        if ours and peer:
            a = statistics.median(r["window_tokens"] / r["seconds"] for r in ours)
            b = statistics.median(r["window_tokens"] / r["seconds"] for r in peer)
            lines += ["", f"Throughput ratio llamaforge / {kind}: {a / b:.2f}x (target >= 1.0: "
                          f"{'met' if a >= b else 'missed'})"]
    if kl:
        lines += ["", "KL guard: each in-memory format against the float32 base (same windows)", "",
                  "| quant | PPL(Q)/PPL(base) | mean KLD | KLD p99 | max KLD | same top | guard (ratio within 1%) |",
                  "|---|---|---|---|---|---|---|"]
        for r in kl:
            if "error" in r:
                lines.append(f"| ? | failed: {r['error'][:80]!r} | | | | | |")
                continue
            ok = abs(r["ratio"][0] - 1) < 0.01
            lines.append(f"| {r['quant']} | {r['ratio'][0]:.4f} ± {r['ratio'][1]:.4f} | {r['kld_mean']:.5f} | "
                         f"{r['kld_p99']:.4f} | {r['kld_max']:.3f} | {100 * r['same_top'][0]:.2f}% | "
                         f"{'pass' if ok else 'FAIL'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
