"""Alignment benchmarks on SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to float32; CPU is fine), with TRL as
the peer. Every configuration runs in its own process (`_worker`), so one side's memory and threads never
touch the other's; each prints one RESULT line of JSON that the driver collects into a table.

    python bench/align_bench.py rm          # reward model on examples/data/quorvath_prefs.jsonl: held-out pairwise
                                            # accuracy (quorvath_prefs_heldout.jsonl), llamaforge vs TRL RewardTrainer,
                                            # same base, tokens, LoRA, optimizer, schedule and steps
    python bench/align_bench.py grpo        # GRPO on examples/data/arith_train.jsonl with the `exact` reward:
                                            # held-out greedy reward (arith_heldout.jsonl) before and after (llamaforge);
                                            # defaults (24 steps x 2 prompts x group 8, temperature 0.7, lr 1e-3,
                                            # 12 new tokens) are the run in bench/NOTES.md: 0.19 -> 0.86, ~28 min at
                                            # load average 8 on 2 cores
    python bench/align_bench.py grpo-speed  # GRPO training tokens/s (prompt + completion tokens per second of whole
                                            # steps: sampling, scoring, reference, update), llamaforge vs TRL
                                            # GRPOTrainer on the same config; chunks of steps alternate between sides

Results go to --out (JSON per mode) and a table on stdout. The peer is `pip install trl==1.16.0` (CPU torch stays).
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

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
sys.path.insert(0, str(ROOT / "bench"))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------------------
# Shared set-up (inside workers)

def _setup_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def _load():
    """(LoadedModel with dense float32 weights, its chat format)."""
    from common import smollm2_gguf
    from llamaforge.formats.load import load_model
    from llamaforge.tokenizer.chat import chat_format_for
    lm = load_model(smollm2_gguf())
    return lm, chat_format_for(lm.tokenizer)


def _hf_tokenizer():
    from common import smollm2_gguf
    from transformers import AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    g = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)


def _hf_state(lm) -> dict:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _lora_kwargs(a) -> dict:
    return dict(r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules=ALL_LINEAR, lora_dropout=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Reward model

def worker_rm_ours(a) -> dict:
    from common import smollm2_gguf
    from llamaforge.train.config import TrainConfig
    from llamaforge.train.data import load_dataset
    from llamaforge.train.reward_model import RewardModel
    from llamaforge.train.jobs import train
    lm, fmt = _load()
    held = load_dataset(DATA / "quorvath_prefs_heldout.jsonl", fmt, kind="preference")
    cfg = TrainConfig(model=str(smollm2_gguf()), data=str(DATA / "quorvath_prefs.jsonl"), out=str(a.out / "rm-ours"),
                      task="rm", method="lora", lora_r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules=ALL_LINEAR,
                      lr=a.lr, max_steps=a.steps, batch_size=a.batch_size, warmup_steps=a.warmup, min_lr_ratio=0.0,
                      seed=a.seed, max_seq_len=256)
    t0 = time.perf_counter()
    res = train(cfg, lm=lm, chat_format=fmt)
    secs = time.perf_counter() - t0
    acc = RewardModel(lm, fmt).pairwise_accuracy(held)   # the trained model in memory (reload is tested elsewhere)
    return {"side": "llamaforge", "accuracy": acc["accuracy"], "mean_margin": acc["mean_margin"],
            "pairs": acc["pairs"], "first_loss": res.losses[0], "last_loss": res.losses[-1], "train_s": secs}


def worker_rm_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    from llamaforge.train.data import load_dataset
    lm, fmt = _load()
    tok = _hf_tokenizer()
    train_ex = load_dataset(DATA / "quorvath_prefs.jsonl", fmt, kind="preference")
    held = load_dataset(DATA / "quorvath_prefs_heldout.jsonl", fmt, kind="preference")
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(**lm.config.to_hf_config(), num_labels=1, pad_token_id=tok.pad_token_id or 0)
    model = LlamaForSequenceClassification(cfg)   # `score` initialised N(0, 0.02), as ours
    sd = {k[len("model."):]: v for k, v in _hf_state(lm).items() if k.startswith("model.")}
    model.model.load_state_dict(sd)
    del lm
    ds = Dataset.from_list([{"chosen_ids": e.ids, "rejected_ids": e.rejected_ids} for e in train_ex])
    args = RewardConfig(output_dir=str(a.out / "rm-trl"), per_device_train_batch_size=a.batch_size,
                        max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=a.warmup,
                        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                        use_cpu=True, bf16=False, seed=a.seed, dataloader_num_workers=0, max_length=256,
                        gradient_checkpointing=False,  # TRL's default is on; ours is off (same maths, less time)
                        disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                            peft_config=LoraConfig(task_type="SEQ_CLS", **_lora_kwargs(a)))
    t0 = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    m = trainer.model.eval()
    with torch.no_grad():
        r = [float(m(input_ids=torch.tensor([ids])).logits[0, 0])
             for ids in [e.ids for e in held] + [e.rejected_ids for e in held]]
    n = len(held)
    diff = [r[i] - r[n + i] for i in range(n)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"side": "TRL RewardTrainer", "accuracy": sum(d > 0 for d in diff) / n, "mean_margin": sum(diff) / n,
            "pairs": n, "first_loss": losses[0], "last_loss": losses[-1], "train_s": secs}


# ---------------------------------------------------------------------------------------------------------------
# GRPO

def _heldout_reward(lm, fmt, examples, max_new_tokens) -> tuple[float, list[dict]]:
    from llamaforge.train.rewards import ExactReward
    from llamaforge.train.rollout import greedy_completions
    comps = greedy_completions(lm, [e.ids for e in examples], max_new_tokens=max_new_tokens,
                               stop_ids=sorted(fmt.stop_ids))
    r = ExactReward()
    rows = [{"answer": e.record["answer"], "got": c.text, "reward": r(None, c.text, e.record)}
            for e, c in zip(examples, comps)]
    return sum(x["reward"] for x in rows) / len(rows), rows


def _grpo_cfg(a, out: Path, steps: int):
    from common import smollm2_gguf
    from llamaforge.train.config import TrainConfig
    return TrainConfig(model=str(smollm2_gguf()), data=str(DATA / "arith_train.jsonl"), out=str(out), task="grpo",
                       method="lora", lora_r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules=ALL_LINEAR, lr=a.lr,
                       max_steps=steps, batch_size=a.prompts, group_size=a.group, max_new_tokens=a.max_new_tokens,
                       temperature=a.temperature, grpo_beta=a.beta, reward="exact", warmup_steps=a.warmup,
                       min_lr_ratio=0.0, seed=a.seed, max_seq_len=128, save_every=a.save_every, resume=a.resume)


def worker_grpo_quality(a) -> dict:
    from llamaforge.train.data import load_dataset
    from llamaforge.train.jobs import train
    lm, fmt = _load()
    held = load_dataset(DATA / "arith_heldout.jsonl", fmt, kind="prompt", reserve=a.max_new_tokens)
    before, before_rows = _heldout_reward(lm, fmt, held, a.max_new_tokens)
    print(f"held-out reward before: {before:.3f}", file=sys.stderr, flush=True)
    out = a.out / "grpo-ours"
    t0 = time.perf_counter()
    res = train(_grpo_cfg(a, out, a.steps), lm=lm, chat_format=fmt)
    secs = time.perf_counter() - t0
    after, after_rows = _heldout_reward(lm, fmt, held, a.max_new_tokens)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"side": "llamaforge", "heldout_reward_before": before, "heldout_reward_after": after,
            "max_reward": 1.0, "steps": res.steps, "skipped": dict(res.skipped), "train_s": secs,
            "per_step": [{k: r[k] for k in ("step", "reward_mean", "reward_std", "kl", "completion_len", "loss",
                                            "tokens_per_s", "rollout_s")
                          if k in r} for r in rows], "before": before_rows, "after": after_rows}


def worker_grpo_speed_ours(a) -> dict:
    from llamaforge.train.jobs import train
    lm, fmt = _load()
    out = a.out / f"grpo-speed-ours-{a.chunk}"
    train(_grpo_cfg(a, out, a.steps), lm=lm, chat_format=fmt)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"tokens"' in x]
    timed = rows[1:]  # the first step warms up allocators and kernels
    tokens = sum(r["tokens"] for r in timed)
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"side": "llamaforge", "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
            "steps_timed": len(timed), "reward_mean": [r["reward_mean"] for r in rows]}


def worker_grpo_speed_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    lm, fmt = _load()
    tok = _hf_tokenizer()
    recs = [json.loads(x) for x in (DATA / "arith_train.jsonl").read_text().splitlines()]
    # Same prompt tokens on both sides (the GGUF's chat template through transformers vs ours).
    msgs = [{"role": "user", "content": recs[0]["prompt"]}]
    theirs = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    if list(theirs) != fmt.encode(msgs):
        print("warning: transformers' chat template gives other prompt ids than llamaforge's", file=sys.stderr)
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(LlamaConfig(**lm.config.to_hf_config()))
    model.load_state_dict(_hf_state(lm), strict=False)
    model.tie_weights()
    del lm
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                            for r in recs])

    def exact(prompts, completions, answer, **kw):
        return [1.0 if c[-1]["content"].strip() == str(ans).strip() else 0.0 for c, ans in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    args = GRPOConfig(output_dir=str(a.out / f"grpo-speed-trl-{a.chunk}"), per_device_train_batch_size=a.prompts * a.group,
                      num_generations=a.group, max_completion_length=a.max_new_tokens, temperature=a.temperature,
                      top_p=1.0, beta=a.beta, loss_type="grpo", epsilon=0.2, scale_rewards="group",
                      learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=a.warmup, max_steps=a.steps,
                      weight_decay=0.0, max_grad_norm=1.0, gradient_accumulation_steps=1, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=a.seed,
                      gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=args, train_dataset=ds, processing_class=tok,
                          peft_config=LoraConfig(task_type="CAUSAL_LM", **_lora_kwargs(a)),
                          callbacks=[timer])
    trainer.train()
    seen = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    per_step = [seen[0]] + [b - c for b, c in zip(seen[1:], seen[:-1])]
    tokens = sum(per_step[1:])
    secs = sum(timer.times[1:])
    rewards = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    return {"side": "TRL GRPOTrainer", "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
            "steps_timed": len(timer.times) - 1, "reward_mean": rewards}


WORKERS = {"rm-ours": worker_rm_ours, "rm-trl": worker_rm_trl, "grpo-quality": worker_grpo_quality,
           "grpo-speed-ours": worker_grpo_speed_ours, "grpo-speed-trl": worker_grpo_speed_trl}


# ---------------------------------------------------------------------------------------------------------------
# Driver

def _run_worker(name: str, a, **over) -> dict:
    argv = [sys.executable, __file__, "_worker", name]
    for k, v in {**vars(a), **over}.items():
        if k in ("mode", "worker") or v is None or v is False:
            continue
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    # GOMP_SPINCOUNT=0 for both sides: the worker imports torch before llamaforge (which would set it), and on a
    # busy machine libgomp's default spin makes 2 threads collapse (5 vs 35 tokens/s measured here; bench/NOTES.md).
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore", "LLAMAFORGE_COMPILE": "0", "GOMP_SPINCOUNT": "0"}
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"worker {name} failed with exit code {p.returncode}")
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["process_s"] = round(time.perf_counter() - t0, 1)
    return res


def run_rm(a) -> dict:
    sides = [_run_worker("rm-ours", a), _run_worker("rm-trl", a)]
    print(f"\nreward model, SmolLM2-135M, LoRA r{a.lora_r} all linear, {a.steps} steps x batch {a.batch_size}, "
          f"lr {a.lr}, {a.threads} threads")
    print(f"{'':20} {'held-out acc':>12} {'mean margin':>12} {'first loss':>10} {'last loss':>10} {'train s':>8}")
    for s in sides:
        print(f"{s['side']:20} {s['accuracy']:12.3f} {s['mean_margin']:12.3f} {s['first_loss']:10.4f} "
              f"{s['last_loss']:10.4f} {s['train_s']:8.0f}")
    return {"config": _config(a), "sides": sides}


def run_grpo(a) -> dict:
    r = _run_worker("grpo-quality", a)
    print(f"\nGRPO on arith_train ({a.steps} steps, {a.prompts} prompts x group {a.group}), exact reward, "
          f"{a.threads} threads")
    print(f"held-out greedy reward: before {r['heldout_reward_before']:.3f}, after {r['heldout_reward_after']:.3f} "
          f"(max 1.0, target >= 0.8); trained in {r['train_s']:.0f} s")
    print(f"{'step':>5} {'reward':>8} {'std':>6} {'kl':>8} {'len':>5}")
    for s in r["per_step"]:
        if "reward_mean" in s:
            print(f"{s['step']:5d} {s['reward_mean']:8.3f} {s['reward_std']:6.3f} {s['kl']:8.4f} "
                  f"{s['completion_len']:5.1f}")
    return {"config": _config(a), "result": r}


def run_grpo_speed(a) -> dict:
    chunks = {"llamaforge": [], "TRL GRPOTrainer": []}
    for c in range(a.rounds):
        order = [("grpo-speed-ours", "llamaforge"), ("grpo-speed-trl", "TRL GRPOTrainer")]
        for worker, side in (order if c % 2 == 0 else order[::-1]):
            res = _run_worker(worker, a, chunk=c)
            chunks[side].append(res)
            print(f"chunk {c} {side:16} {res['tokens_per_s']:8.1f} tok/s over {res['steps_timed']} steps",
                  flush=True)
    print(f"\nGRPO training tokens/s (prompt + completion tokens / whole-step time), SmolLM2-135M fp32, LoRA "
          f"r{a.lora_r}, {a.prompts} prompts x group {a.group}, {a.max_new_tokens} new tokens, beta {a.beta}, "
          f"{a.threads} threads, {a.rounds} interleaved chunks of {a.steps} steps (first step of each untimed)")
    table = {}
    for side, rs in chunks.items():
        tps = [r["tokens_per_s"] for r in rs]
        table[side] = {"median_tokens_per_s": statistics.median(tps), "chunks": tps}
        print(f"{side:20} median {statistics.median(tps):8.1f} tok/s   chunks {[round(t, 1) for t in tps]}")
    ratio = table["llamaforge"]["median_tokens_per_s"] / table["TRL GRPOTrainer"]["median_tokens_per_s"]
    print(f"llamaforge / TRL: {ratio:.2f}x")
    return {"config": _config(a), "table": table, "ratio": ratio, "chunks": chunks}


def _config(a) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["rm", "grpo", "grpo-speed", "_worker"])
    p.add_argument("worker", nargs="?", choices=sorted(WORKERS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "align_bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 for rm, 1e-3 for grpo, 5e-4 for grpo-speed")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="rm: 40; grpo: 24; grpo-speed: steps per chunk (4)")
    p.add_argument("--batch-size", type=int, default=4, help="rm: pairs per step")
    p.add_argument("--prompts", type=int, default=2, help="grpo: prompts per step")
    p.add_argument("--group", type=int, default=8, help="grpo: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.04, help="grpo: KL coefficient")
    p.add_argument("--rounds", type=int, default=4, help="grpo-speed: interleaved chunks per side")
    p.add_argument("--save-every", type=int, default=None, help="grpo: checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="grpo: continue from the last checkpoint in --out")
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    defaults = {"rm": (2e-4, 40, 0), "grpo": (1e-3, 24, 0), "grpo-speed": (5e-4, 4, 0)}
    name = a.worker or "" if a.mode == "_worker" else a.mode
    kind = "rm" if name.startswith("rm") else "grpo-speed" if name.startswith("grpo-speed") else "grpo"
    lr, steps, warmup = defaults[kind]
    a.lr = lr if a.lr is None else a.lr
    a.steps = steps if a.steps is None else a.steps
    a.warmup = warmup if a.warmup is None else a.warmup
    a.out.mkdir(parents=True, exist_ok=True)
    if a.mode == "_worker":
        _setup_threads(a.threads)
        print("RESULT " + json.dumps(WORKERS[a.worker](a)), flush=True)
        return 0
    result = {"rm": run_rm, "grpo": run_grpo, "grpo-speed": run_grpo_speed}[a.mode](a)
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
                         "note": "shared machine; sides measured in the same run, in separate processes"}
    path = a.out / f"{a.mode}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
