"""A bigger model than SmolLM2-135M, offline: SmolLM2-1.7B's shape with random weights, quantized by llama.cpp.

    .venv/bin/python bench/big_model.py [--reps 2] [--quant Q4_1] [--threads N]

No 1.7B checkpoint exists on this machine, and speed does not depend on the weights' values, so this writes a
GGUF of SmolLM2-1.7B's shape (24 layers, hidden 2048, 32 heads, MLP 8192, the SmolLM2 vocabulary of 49,152,
tied embeddings) with random weights in F16, quantizes it with llama.cpp's `llama-quantize` (from
$LLAMAFORGE_PEER_BIN) and caches the result under bench/out/models/. Then, in one run:

- the machine's read bandwidth with the same thread count (a large tensor summed by torch, best of several),
- `bench/run.py --configs llamaforge,llama-bench` on that file (decode, prefill 128/512, peak RSS; each side in
  its own process, repetitions interleaved),
- decode as a fraction of the read bandwidth: bytes of weights read per token (every tensor of the file; the
  tied embedding table counts once, as the output head reads all of it) x tokens/s.

Only speed and memory mean anything here: the text such a model writes is noise.
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
from common import OUT, peer_bin, peer_env, smollm2_gguf, write_text_atomic  # noqa: E402

SMOLLM2_1_7B = {  # HuggingFaceTB/SmolLM2-1.7B-Instruct config.json, shape fields
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
    "rms_norm_eps": 1e-5, "rope_theta": 130000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def write_random_f16(path: Path, seed: int = 0) -> None:
    """SmolLM2-1.7B-shaped GGUF, F16, random weights (N(0, 0.02); norms 1), SmolLM2's tokenizer metadata."""
    import torch
    from llamaforge.config import ModelConfig
    from llamaforge.formats.gguf import read_gguf
    from llamaforge.formats.gguf_write import write_gguf
    src = read_gguf(smollm2_gguf())
    tok = {k: v for k, v in src.metadata.items() if k.startswith("tokenizer.")}
    types = {k: v for k, v in src.value_types.items() if k in tok}
    src.close()
    c = SMOLLM2_1_7B
    h, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    sd = {"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": torch.ones(h)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(h, h),
                   p + "self_attn.v_proj.weight": w(h, h), p + "self_attn.o_proj.weight": w(h, h),
                   p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h),
                   p + "mlp.down_proj.weight": w(h, f), p + "input_layernorm.weight": torch.ones(h),
                   p + "post_attention_layernorm.weight": torch.ones(h)})
    cfg = ModelConfig.from_hf_config(c)
    write_gguf(path, cfg, sd, tokenizer_metadata=tok, value_types=types, file_type="f16")


def quantized_model(quant: str) -> tuple[Path, str]:
    """(path of the cached quantized file, who quantized it)."""
    models = OUT / "models"
    models.mkdir(parents=True, exist_ok=True)
    out = models / f"smollm2-1.7b-shape-random.{quant}.gguf"
    if out.is_file():
        return out, "cached"
    f16 = models / "smollm2-1.7b-shape-random.F16.gguf"
    if not f16.is_file():
        t = time.perf_counter()
        write_random_f16(f16)
        print(f"[model] wrote {f16.name} ({f16.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s",
              file=sys.stderr, flush=True)
    exe = peer_bin("llama-quantize")
    if exe is None:
        raise SystemExit("llama-quantize not found (set LLAMAFORGE_PEER_BIN to llama.cpp's tools)")
    tmp = out.with_name(out.name + ".part")
    p = subprocess.run([str(exe), str(f16), str(tmp), quant], capture_output=True, text=True, env=peer_env(exe))
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit("llama-quantize failed: " + (p.stderr or p.stdout)[-800:])
    os.replace(tmp, out)
    f16.unlink()
    return out, "llama-quantize"


def weight_bytes(path: Path) -> int:
    from llamaforge.formats.gguf import read_gguf
    gf = read_gguf(path)
    try:
        return sum(t.nbytes for t in gf.tensors.values())
    finally:
        gf.close()


def read_bandwidth_gbs(threads: int, gib: float = 2.0, reps: int = 7) -> float:
    """Best-of-`reps` rate at which `threads` torch threads read a `gib`-GiB float32 tensor (sum)."""
    code = ("import sys, time, torch; torch.set_num_threads(int(sys.argv[1])); "
            "x = torch.ones(int(float(sys.argv[2]) * 2**28)); x.sum(); best = 1e9\n"
            "for _ in range(int(sys.argv[3])):\n"
            "    t = time.perf_counter(); x.sum(); best = min(best, time.perf_counter() - t)\n"
            "print(x.numel() * 4 / best / 1e9)")
    p = subprocess.run([sys.executable, "-c", code, str(threads), str(gib), str(reps)], capture_output=True,
                       text=True, check=True)
    return float(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quant", default="Q4_1", help="llama-quantize type (default Q4_1, as the default model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=1800)
    a = ap.parse_args()
    if a.threads is None:
        from llamaforge.threads import default_threads
        a.threads = default_threads()
    path, how = quantized_model(a.quant)
    wbytes = weight_bytes(path)
    bw_before = read_bandwidth_gbs(a.threads)
    out = OUT / "big_model"
    cmd = [sys.executable, str(Path(__file__).with_name("run.py")), "--model", str(path), "--configs",
           "llamaforge,llama-bench", "--reps", str(a.reps), "--threads", str(a.threads), "--no-ppl",
           "--timeout", str(a.timeout), "--out", str(out)]
    p = subprocess.run(cmd, text=True)
    if p.returncode != 0:
        return p.returncode
    bw_after = read_bandwidth_gbs(a.threads)
    bw = max(bw_before, bw_after)
    res = json.loads((out / "results.json").read_text())["results"]
    lines = ["", f"{path.name} ({how}; {wbytes / 1e9:.2f} GB of weights), {a.threads} threads; "
             f"read bandwidth {bw:.1f} GB/s (best of before/after: {bw_before:.1f} / {bw_after:.1f}); "
             f"load average {os.getloadavg()[0]:.1f}", "",
             "| config | decode tok/s | weights read GB/s | share of read bandwidth | prefill 128 | prefill 512 "
             "| peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for c, row in res.items():
        d = row["decode"]["median"]
        if not d:
            lines.append(f"| {c} | failed: {row.get('errors')} | | | | | |")
            continue
        gbs = wbytes * d / 1e9
        lines.append(f"| {c} | {d:.2f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | {row['prefill_128']['median']:.0f} | "
                     f"{row['prefill_512']['median']:.0f} | {row['rss_mb']['median']:.0f} |")
    if all(res.get(k, {}).get("decode", {}).get("median") for k in ("llamaforge", "llama-bench")):
        r = {k: res["llamaforge"][k]["median"] / res["llama-bench"][k]["median"]
             for k in ("decode", "prefill_128", "prefill_512")}
        lines += ["", "llamaforge / llama.cpp: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text_atomic(out / "bandwidth.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
