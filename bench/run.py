"""Side-by-side benchmark: llamaforge vs llama.cpp (llama-cpp-python) vs transformers on the same GGUF.

    python bench/run.py [--reps 3] [--threads 2] [--configs llamaforge,llamaforge:none,llama.cpp,hf-fp32,hf-bf16]

Every (configuration, repetition) runs in its own fresh subprocess, so peak RSS and load time are clean, and the
repetitions are interleaved (rep 1 of every config, then rep 2, ...) so a noisy neighbour hurts all configs alike.
Each worker measures, with the same prompt token ids and thread count: load time, prefill tokens/s at 128 and 512
prompt tokens, time to first token (128-token prompt), greedy decode tokens/s over 128 new tokens, peak RSS.
Perplexity on bench/texts/essay.txt (non-overlapping 512-token windows, the same token ids for every runtime)
runs once per configuration in a separate worker (its full-logit buffers would distort the RSS figures).
Output: a Markdown table on stdout and bench/out/results.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (OUT, TEXT, Timer, nll_sum, peak_rss_mb, perplexity_windows, smollm2_gguf,  # noqa: E402
                    summarize, write_json_atomic, write_text_atomic)

DEFAULT_CONFIGS = ["llamaforge", "llamaforge:eager", "llamaforge:none", "llama.cpp", "hf-fp32", "hf-bf16"]
PEERS = ["llama.cpp", "llama-bench", "hf-fp32", "hf-bf16"]
PROMPT_LENS = (128, 512)
NEW_TOKENS = 128
N_CTX = 1024          # cache / context size for the speed runs (512 prompt + headroom)
PPL_CTX = 512
METRICS = [  # key, label, unit, higher is better
    ("prefill_128", "prefill 128", "tok/s", True), ("prefill_512", "prefill 512", "tok/s", True),
    ("decode", "decode", "tok/s", True), ("ttft_ms", "TTFT (128)", "ms", False),
    ("rss_mb", "peak RSS", "MB", False), ("load_s", "load", "s", False),
    # Process CPU time (all threads): on a shared machine, contention inflates wall time but barely CPU time
    # (with several threads it includes their spin-waiting, so compare like with like).
    ("decode_cpu_ms", "decode CPU/token", "ms", False), ("prefill_512_cpu_ms", "prefill 512 CPU", "ms", False),
]


# --------------------------------------------------------------------------------------------- runtimes
class LlamaforgeRunner:
    """config "llamaforge[:QUANT][:eager]": the default load, which decodes through the AOT-compiled step when its
    artifact is cached (`prepare_compiled` builds it before the timed runs); ":eager" turns that off."""

    def __init__(self, path: Path, quant: str | None, threads: int, compiled: bool = True):
        import llamaforge  # before torch: it sets libgomp's wait policy, which libgomp reads once, when torch loads it
        import torch
        torch.set_num_threads(threads)
        from llamaforge.generate import compiled
        self.torch, self.compiled = torch, compiled
        with Timer() as t:
            kw = {"dtype": "float32"} if quant == "none" else {"quant": quant}
            self.lm = llamaforge.load(str(path), compile=compiled and "auto", **kw)
        self.load_s = t.s
        self.model = self.lm.model
        self.name_detail = (self.lm.metadata.get("quant") or "none") + (", compiled" if self.lm.compiled else "")
        self.cache = self.model.new_cache(1, N_CTX)

    def prefill(self, ids):
        import contextlib
        from llamaforge.generate.engine import DEFAULT_PREFILL_CHUNK as chunk
        from llamaforge.generate.engine import DENSE_PREFILL_TOKENS, dense_prefill_allowed
        from llamaforge.model.quant import dense_matmuls
        # In the engine's chunks and by the engine's path (dense GEMMs for long prompts), as `run` and `serve` do.
        dense = len(ids) >= DENSE_PREFILL_TOKENS and dense_prefill_allowed(self.model, "cpu")
        with self.torch.inference_mode(), dense_matmuls(1) if dense else contextlib.nullcontext():
            for s in range(0, len(ids), chunk):
                logits = self.model(self.torch.tensor([ids[s:s + chunk]]), cache=self.cache, input_pos=s,
                                    last_only=True)
        self.pos = len(ids)
        return int(logits[0, -1].argmax())

    def step(self, tok):
        with self.torch.inference_mode():  # what the engine does for one stream
            logits = self.compiled.decode_one(self.lm, tok, self.cache, self.pos)
        self.pos += 1
        return int(logits.argmax())

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids]))[0].float().numpy()


class LlamaCppRunner:
    def __init__(self, path: Path, threads: int, logits_all: bool = False):
        import llama_cpp
        import numpy as np
        self.np = np
        with Timer() as t:
            self.llm = llama_cpp.Llama(str(path), n_ctx=N_CTX if not logits_all else PPL_CTX, n_batch=512,
                                       n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                                       verbose=False)
        self.load_s = t.s
        self.name_detail = f"llama-cpp-python {llama_cpp.__version__}"

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return int(self.np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def step(self, tok):
        self.llm.eval([tok])
        return int(self.np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self.np.array(self.llm.scores[:len(ids)], dtype=self.np.float32)


class HFRunner:
    def __init__(self, path: Path, dtype: str, threads: int):
        import torch
        torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM
        self.torch = torch
        with Timer() as t:
            self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=getattr(torch, dtype)).eval()
        self.load_s = t.s
        import transformers
        self.name_detail = f"transformers {transformers.__version__} {dtype}"

    def prefill(self, ids):
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        self.pkv = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(self, tok):
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([[tok]]), past_key_values=self.pkv, use_cache=True)
        self.pkv = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids])).logits[0].float().numpy()


def make_runner(config: str, path: Path, threads: int, for_ppl: bool = False):
    if config == "llamaforge" or config.startswith("llamaforge:"):
        parts = config.split(":")[1:]
        quant = next((p for p in parts if p != "eager"), None)
        return LlamaforgeRunner(path, quant, threads, compiled="eager" not in parts)
    if config == "llama.cpp":
        return LlamaCppRunner(path, threads, logits_all=for_ppl)
    if config in ("hf-fp32", "hf-bf16"):
        return HFRunner(path, {"hf-fp32": "float32", "hf-bf16": "bfloat16"}[config], threads)
    raise SystemExit(f"unknown configuration {config!r}")


# --------------------------------------------------------------------------------------------- workers
def worker_llama_bench(path: Path, threads: int) -> dict:
    """config "llama-bench": llama.cpp's own benchmark binary ($LLAMAFORGE_PEER_BIN), for machines without the
    llama-cpp-python wheel. Prefill at 128/512 tokens from an empty cache, decode of NEW_TOKENS tokens after a
    128-token prompt (`-d 128`), as our worker measures; peak RSS of the llama-bench processes. llama-bench
    reports no time to first token and no load time."""
    import resource
    from common import peer_bin, peer_env
    exe = peer_bin("llama-bench")
    if exe is None:
        raise SystemExit("llama-bench not found (set LLAMAFORGE_PEER_BIN)")

    def run(*args) -> list[dict]:
        p = subprocess.run([str(exe), "-m", str(path), "-t", str(threads), "-r", "1", "-o", "json", *args],
                           capture_output=True, text=True, env=peer_env(exe), timeout=1800)
        if p.returncode != 0:
            raise SystemExit((p.stderr or p.stdout)[-500:])
        return json.loads(p.stdout)

    res = {"config": "llama-bench", "load_s": None, "ttft_ms": None, "greedy_ids": None}
    for row in run("-p", ",".join(map(str, PROMPT_LENS)), "-n", "0"):
        res[f"prefill_{row['n_prompt']}"] = float(row["avg_ts"])
    row = run("-p", "0", "-n", str(NEW_TOKENS), "-d", str(PROMPT_LENS[0]))[0]
    res["decode"] = float(row["avg_ts"])
    res["detail"] = f"llama-bench {row.get('build_commit', '?')}, {row.get('type_k', '')} cache"
    res["rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return res


def worker_speed(config: str, path: Path, ids: list[int], threads: int) -> dict:
    if config == "llama-bench":
        return worker_llama_bench(path, threads)
    r = make_runner(config, path, threads)
    # Warm-up: first calls pay for lazy initialisation (kernels, allocator), not what we measure.
    r.prefill(ids[:16])
    tok = r.step(r.prefill(ids[:16]))
    res = {"config": config, "detail": r.name_detail, "load_s": r.load_s}
    for n in PROMPT_LENS:
        cpu = time.process_time()
        with Timer() as t:
            r.prefill(ids[:n])
        res[f"prefill_{n}"] = n / t.s
        res[f"prefill_{n}_cpu_ms"] = 1000 * (time.process_time() - cpu)
    # TTFT and decode on the 128-token prompt: greedy, NEW_TOKENS tokens, the first token is the TTFT.
    with Timer() as t:
        tok = r.prefill(ids[:PROMPT_LENS[0]])
    res["ttft_ms"] = 1000 * t.s
    out = [tok]
    cpu = time.process_time()
    with Timer() as t:
        for _ in range(NEW_TOKENS - 1):
            tok = r.step(tok)
            out.append(tok)
    res["decode"] = (NEW_TOKENS - 1) / t.s
    res["decode_cpu_ms"] = 1000 * (time.process_time() - cpu) / (NEW_TOKENS - 1)
    res["rss_mb"] = peak_rss_mb()
    res["greedy_ids"] = out
    return res


def worker_ppl(config: str, path: Path, ids: list[int], threads: int) -> dict:
    r = make_runner(config, path, threads, for_ppl=True)
    nll, n = 0.0, 0
    for w in perplexity_windows(ids, PPL_CTX):
        lg = r.logits(w)
        nll += nll_sum(lg[:-1], w[1:])
        n += len(w) - 1
    import math
    return {"config": config, "ppl": math.exp(nll / n), "ppl_tokens": n}


# --------------------------------------------------------------------------------------------- GPU
LLAMA3_8B_SHAPE = {  # Meta-Llama-3-8B's config.json shape fields; weights are random (only speed is measured)
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 8192, "tie_word_embeddings": False,
}


def _gpu_bandwidth_gbs(torch) -> float:
    """Device memory bandwidth from a large device-to-device copy (reads + writes)."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (time.perf_counter() - t0) / 1e9


def _gpu_decode(torch, model, bw_gbs: float, compile_mode: str | None) -> dict:
    """Greedy decode tok/s with a static cache (fixed shapes), optionally under torch.compile / CUDA graphs."""
    cfg = model.config
    cache = model.new_cache(1, 1024, static=True)
    prompt = torch.randint(0, cfg.vocab_size, (1, 128), device="cuda")

    def step(tok, pos):
        return model(tok, cache=cache, input_pos=pos, last_only=True)[:, -1].argmax(-1, keepdim=True)

    fn = torch.compile(step, mode=compile_mode) if compile_mode else step
    with torch.inference_mode():
        tok = model(prompt, cache=cache, input_pos=0, last_only=True)[:, -1].argmax(-1, keepdim=True)
        t_compile = time.perf_counter()
        for i in range(3):  # warm-up (and compilation / graph capture)
            tok = fn(tok, torch.tensor([128 + i], device="cuda"))
        torch.cuda.synchronize()
        t_compile = time.perf_counter() - t_compile
        positions = [torch.tensor([131 + i], device="cuda") for i in range(NEW_TOKENS)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p in positions:
            tok = fn(tok, p)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    seen, nbytes = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            nbytes += t.numel() * t.element_size()
    return {"decode_tok_s": NEW_TOKENS / dt, "weight_gb": nbytes / 1e9, "bandwidth_gbs": bw_gbs,
            "bandwidth_limit_tok_s": bw_gbs * 1e9 / nbytes, "warmup_s": t_compile, "compile": compile_mode}


def gpu_main(path: Path, out: Path) -> int:
    """Issue item 4: bf16 decode on CUDA for SmolLM2 and a random Llama-3-8B-shaped model vs the bandwidth limit."""
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark skipped")
        return 0
    import llamaforge
    from llamaforge.config import ModelConfig
    from llamaforge.model import Llama
    bw = _gpu_bandwidth_gbs(torch)
    res = {"device": torch.cuda.get_device_name(), "bandwidth_gbs": bw, "models": {}}
    lm = llamaforge.load(str(path), quant="bf16", device="cuda")
    big_cfg = ModelConfig.from_hf_config(LLAMA3_8B_SHAPE)
    with torch.device("meta"):
        big = Llama(big_cfg)
    big = big.to_empty(device="cuda").to(torch.bfloat16).eval()
    with torch.no_grad():
        for n, p in big.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02)
    for name, model in (("smollm2-135m", lm.model), ("llama3-8b-shape-random", big)):
        res["models"][name] = {mode or "eager": _gpu_decode(torch, model, bw, mode)
                               for mode in (None, "reduce-overhead")}
        print(name, json.dumps(res["models"][name], indent=1), flush=True)
    write_json_atomic(out / "gpu.json", res)
    return 0


# --------------------------------------------------------------------------------------------- driver
def text_ids(path: Path) -> list[int]:
    """Token ids of the perplexity text (also the prompts), with the GGUF's own vocabulary."""
    text = TEXT.read_text(encoding="utf-8")
    try:
        import llama_cpp
        vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    except ImportError:
        from llamaforge.formats.load import load_model  # tokenizer only; weights are not the point here
        return load_model(path, quant="q4").tokenizer.encode(text)


def prepare_compiled(configs, path: Path, threads: int) -> dict:
    """Build the AOT-compiled decode step of each compiled llamaforge config once, before anything is timed
    (a one-time cost per machine, like installing; it is reported, not hidden). Returns seconds per config."""
    out = {}
    for c in configs:
        if not c.startswith("llamaforge") or "eager" in c.split(":") or c.split(":")[1:2] == ["none"]:
            continue
        quant = next((p for p in c.split(":")[1:] if p != "eager"), None)
        code = ("import sys, time, llamaforge, torch; torch.set_num_threads(int(sys.argv[2])); "
                "t = time.perf_counter(); lm = llamaforge.load(sys.argv[1], quant=sys.argv[3] or None, compile=True); "
                "print(round(time.perf_counter() - t, 1) if lm.compiled else 'none')")
        r = subprocess.run([sys.executable, "-c", code, str(path), str(threads), quant or ""],
                           capture_output=True, text=True)
        out[c] = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else "failed"
        print(f"[compile] {c}: {out[c]} s (load + build if not cached)", file=sys.stderr, flush=True)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
    return out


def run_worker(task: str, config: str, ids_file: Path, threads: int, path: Path, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--task", task, "--ids-file", str(ids_file),
           "--threads", str(threads), "--model", str(path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"config": config, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"config": config, "error": f"exit {p.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "ms" or unit == "MB":
        return f"{v:.0f}"
    if unit == "s":
        return f"{v:.2f}"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def aggregate(configs, runs, ppl):
    table = {}
    for c in configs:
        rs = [r for r in runs if r["config"] == c and "error" not in r]
        row = {k: summarize([r.get(k) for r in rs]) for k, *_ in METRICS}
        row["detail"] = rs[0]["detail"] if rs else None
        row["errors"] = [r["error"] for r in runs if r["config"] == c and "error" in r]
        row["ppl"] = ppl.get(c, {}).get("ppl")
        row["ppl_error"] = ppl.get(c, {}).get("error")
        row["greedy_ids"] = rs[0]["greedy_ids"] if rs else None
        table[c] = row
    return table


def ratios(table, ours: str) -> dict:
    """ours / peer for every metric (for tok/s higher is better; for RSS, TTFT, load lower is better)."""
    out = {}
    for peer in PEERS:
        if peer not in table or ours not in table:
            continue
        r = {}
        for k, *_ in METRICS:
            a, b = table[ours][k]["median"], table[peer][k]["median"]
            r[k] = a / b if a and b else None
        out[peer] = r
    return out


def markdown(table, rat, ours, meta) -> str:
    lines = [f"# llamaforge benchmark: {meta['model']}", "",
             f"{meta['date']} · {meta['threads']} threads · {meta['reps']} interleaved repetitions · "
             f"median (± half-range %) · CPU: {meta['cpu']}", ""]
    head = "| config | " + " | ".join(f"{lab} ({unit})" for _, lab, unit, _ in METRICS) + " | perplexity |"
    lines += [head, "|" + "---|" * (len(METRICS) + 2)]
    for c, row in table.items():
        cells = []
        for k, _, unit, _ in METRICS:
            s = row[k]
            cell = fmt(s["median"], unit)
            if s.get("spread_pct") is not None and s["n"] > 1:
                cell += f" ±{s['spread_pct']:.0f}%"
            cells.append(cell)
        ppl = f"{row['ppl']:.3f}" if row["ppl"] else (row["ppl_error"] or "-")
        lines.append(f"| {c} ({row['detail']}) | " + " | ".join(cells) + f" | {ppl} |")
    if not rat:
        return "\n".join(lines) + "\n"
    lines += ["", f"Ratios, {ours} / peer (tok/s: higher is better; TTFT, RSS, load: lower is better):", "",
              "| peer | " + " | ".join(lab for _, lab, _, _ in METRICS) + " | perplexity |",
              "|" + "---|" * (len(METRICS) + 2)]
    for peer, r in rat.items():
        p0, p1 = table[ours]["ppl"], table[peer]["ppl"]
        pr = f"{p0 / p1:.4f}" if p0 and p1 else "-"
        lines.append(f"| {peer} | " + " | ".join("-" if r[k] is None else f"{r[k]:.2f}x" for k, *_ in METRICS)
                     + f" | {pr} |")
    errs = [(c, e) for c, row in table.items() for e in row["errors"]]
    if errs:
        lines += ["", "Errors:"] + [f"- {c}: {e}" for c, e in errs]
    return "\n".join(lines) + "\n"


def chart(table, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = list(table)
    panels = [("prefill_128", "prefill 128 (tok/s)"), ("prefill_512", "prefill 512 (tok/s)"),
              ("decode", "decode (tok/s)"), ("rss_mb", "peak RSS (MB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (k, title) in zip(axes, panels):
        med = [table[c][k]["median"] or 0 for c in configs]
        lo = [m - (table[c][k]["min"] or m) for c, m in zip(configs, med)]
        hi = [(table[c][k]["max"] or m) - m for c, m in zip(configs, med)]
        ax.bar(range(len(configs)), med, yerr=[lo, hi], capsize=3,
               color=["C0" if c.startswith("llamaforge") else "C7" for c in configs])
        ax.set_xticks(range(len(configs)), configs, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma list: llamaforge[:QUANT] (QUANT: none, bf16, int8, q4), llama.cpp "
                         "(llama-cpp-python), llama-bench (llama.cpp's binary), hf-fp32, hf-bf16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", "-t", type=int, default=None,
                    help="threads for every side (default: llamaforge's default, one per usable core)")
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the SmolLM2-135M Q4_1 file)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity column")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per worker process")
    ap.add_argument("--gpu", action="store_true", help="CUDA decode benchmark (bf16, static cache, CUDA graphs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads is None:
        from llamaforge.threads import default_threads
        a.threads = default_threads()
    path = a.model or smollm2_gguf()
    if a.reps < 1 or a.threads < 1:
        ap.error("--reps and --threads must be >= 1")
    if not path.is_file():
        ap.error(f"no such model file: {path}")

    if a.gpu:
        return gpu_main(path, a.out)
    if a.worker:
        ids = json.loads(a.ids_file.read_text())
        if a.task != "speed" and a.worker == "llama-bench":
            raise SystemExit("llama-bench measures no perplexity (bench/eval_bench.py runs llama-perplexity)")
        res = (worker_speed if a.task == "speed" else worker_ppl)(a.worker, path, ids, a.threads)
        print(json.dumps(res))
        return 0

    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    ours = next((c for c in configs if c.startswith("llamaforge")), None)
    ids = text_ids(path)
    if len(ids) < max(PROMPT_LENS):
        raise SystemExit(f"{TEXT} has only {len(ids)} tokens; need {max(PROMPT_LENS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    compile_s = prepare_compiled(configs, path, a.threads)
    ids_file = a.out / "text_ids.json"
    write_json_atomic(ids_file, ids)
    runs = []
    for rep in range(a.reps):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]  # rotate: no config always first
        for c in order:
            t0 = time.perf_counter()
            r = run_worker("speed", c, ids_file, a.threads, path, a.timeout)
            r["rep"] = rep
            runs.append(r)
            msg = r.get("error") or (f"prefill128 {r['prefill_128']:.0f} prefill512 {r['prefill_512']:.0f} "
                                     f"decode {r['decode']:.1f} tok/s rss {r['rss_mb']:.0f} MB load {r['load_s'] or 0:.2f} s")
            print(f"[rep {rep + 1}/{a.reps}] {c}: {msg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
    ppl = {}
    if not a.no_ppl:
        for c in [c for c in configs if c != "llama-bench"]:
            ppl[c] = run_worker("ppl", c, ids_file, a.threads, path, a.timeout)
            print(f"[ppl] {c}: {ppl[c].get('ppl') or ppl[c].get('error')}", file=sys.stderr, flush=True)
    table = aggregate(configs, runs, ppl)
    rat = ratios(table, ours) if ours else {}
    import platform
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    meta = {"model": path.name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": a.threads,
            "reps": a.reps, "cpu": cpu, "loadavg": os.getloadavg(), "prompt_lens": PROMPT_LENS,
            "new_tokens": NEW_TOKENS, "compile_s": compile_s, "ppl_text": TEXT.name, "ppl_tokens": len(ids), "ppl_ctx": PPL_CTX}
    md = markdown(table, rat, ours, meta)
    write_text_atomic(a.out / "results.md", md)
    write_json_atomic(a.out / "results.json", {"meta": meta, "results": table, "ratios": rat, "runs": runs})
    try:
        chart(table, a.out / "results.png")
    except ImportError as e:
        print(f"chart skipped: {e}", file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
