"""A fine-tuned model on the fast path: perplexity and decode speed of `create NAME --adapter DIR` models.

    python bench/finetuned.py [--adapter DIR] [--rounds 3] [--tokens 48]

Without --adapter it writes a LoRA adapter for SmolLM2 in PEFT's format (r 16, every projection, random A/B
scaled so that each layer's update is ~2% of its weight's norm, the size a short fine-tune leaves) - quality
and speed of the packing do not depend on what the adapter learned, only on its size. Rows:
* perplexity on bench/texts/essay.txt of the float32 merged model (the reference: dense weights, adapter folded
  in float32), the default load (merged, then packed again as int4 groups of 32), and the base model (q4);
* decode tokens/s (greedy, one stream, compiled step when cached), base and fine-tuned, each in its own
  process, interleaved over rounds.
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
from common import OUT, TEXT, smollm2_gguf, write_text_atomic  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(out: Path, model, r: int = 16, rel: float = 0.02, seed: int = 0) -> Path:
    """A PEFT LoRA adapter for `model` (a llamaforge Llama with dense weights) whose update B@A * alpha/r has
    ~`rel` of each weight's Frobenius norm."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    alpha = 2 * r
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        for block, mod in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name in TARGETS:
                lin = getattr(mod, name, None)
                if lin is None:
                    continue
                w = lin.weight.detach().float()
                a = torch.randn(r, w.shape[1], generator=g) / math.sqrt(w.shape[1])
                b = torch.randn(w.shape[0], r, generator=g)
                delta = (b @ a) * (alpha / r)
                b *= rel * w.norm() / delta.norm()
                key = f"base_model.model.model.layers.{i}.{block}.{name}"
                tensors[f"{key}.lora_A.weight"] = a.contiguous()
                tensors[f"{key}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(TARGETS), "task_type": "CAUSAL_LM"}))
    return out


def ppl_of(lm, ids: list[int], ctx: int = 512) -> float:
    import torch
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, ctx):
            w = ids[s:s + ctx]
            if len(w) < 2:
                break
            logits = lm.model(torch.tensor([w]))[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))
            n += len(w) - 1
    return math.exp(nll / n)


def speed_worker(model: str, tokens: int) -> dict:
    import llamaforge
    import torch
    from llamaforge.generate import compiled
    lm = llamaforge.load(model)
    cache = lm.model.new_cache(1, 64 + tokens)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([list(range(100, 116))]), cache=cache, input_pos=0, last_only=True)
        tok, pos = int(logits[0, -1].argmax()), 16
        for _ in range(4):
            tok, pos = int(compiled.decode_one(lm, tok, cache, pos).argmax()), pos + 1
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok, pos = int(compiled.decode_one(lm, tok, cache, pos).argmax()), pos + 1
        dt = time.perf_counter() - t0
    return {"tok_s": tokens / dt, "quant": lm.metadata.get("quant"), "compiled": lm.compiled is not None,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", type=Path, help="a PEFT LoRA adapter for SmolLM2 (default: a synthetic one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(speed_worker(a.worker, a.tokens)))
        return 0
    import llamaforge
    from llamaforge.store import Store
    gguf = smollm2_gguf()
    tmp = Path(tempfile.mkdtemp(prefix="lf-finetuned-"))
    adapter = a.adapter or write_adapter(tmp / "adapter", llamaforge.load(str(gguf), dtype="float32").model)
    store = Store()
    name = f"bench-finetuned-{os.getpid()}"
    store.create(name, "smollm2", adapter=adapter)
    try:
        ids = llamaforge.load(str(gguf), compile=False).tokenizer.encode(TEXT.read_text())[:a.ppl_tokens]
        ref = llamaforge.load(name, dtype="float32", compile=False)
        packed = llamaforge.load(name, compile=False)
        base = llamaforge.load("smollm2", compile=False)
        ppl = {"float32 merged": ppl_of(ref, ids), f"merged + re-packed ({packed.metadata['quant']})":
               ppl_of(packed, ids), "base (q4)": ppl_of(base, ids)}
        del ref, packed, base
        speeds: dict[str, list[float]] = {"base": [], "fine-tuned": []}
        detail = {}
        for _ in range(a.rounds):
            for label, model in (("base", "smollm2"), ("fine-tuned", name)):
                r = subprocess.run([sys.executable, __file__, "--worker", model, "--tokens", str(a.tokens)],
                                   capture_output=True, text=True, timeout=600,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if r.returncode != 0:
                    raise SystemExit(r.stderr[-2000:])
                res = json.loads(r.stdout.strip().splitlines()[-1])
                speeds[label].append(res["tok_s"])
                detail[label] = res
                print(f"{label:10} {res['tok_s']:6.1f} tok/s {res}", file=sys.stderr, flush=True)
    finally:
        store.remove(name)
    ref_ppl = ppl["float32 merged"]
    lines = [f"Fine-tuned model on the fast path ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs, shared machine, load average {open('/proc/loadavg').read().split()[0]})", "",
             f"| perplexity (essay.txt, {len(ids)} tokens, ctx 512) | value | vs float32 merged |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {100 * (v / ref_ppl - 1):+.2f}% |" for k, v in ppl.items()]
    med = {k: statistics.median(v) for k, v in speeds.items()}
    lines += ["", f"| decode, median of {a.rounds} interleaved rounds | tok/s | detail |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.1f} ({min(v):.1f}-{max(v):.1f}) | {detail[k]} |" for k, v in speeds.items()]
    lines += ["", f"fine-tuned / base decode: {med['fine-tuned'] / med['base']:.2f}x"]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(a.out / "finetuned.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
