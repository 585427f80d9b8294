"""Rejection-sampling fine-tuning (Llama 2, Touvron et al. 2023, sec. 3.2.3): rounds of
sample K answers per prompt -> score them -> keep the best (if it reaches the threshold) -> SFT on the kept ones.

Sampling goes through the batched engine (rollout.py) from the current policy, so round r+1 samples from the
model round r trained. Each round writes `OUT/round-N/kept.jsonl` (prompt, kept completion, its reward and the
rewards of all K samples) so a person can read what the model learned from, then trains with the one training
loop (SFT strategy, LoRA adapters carried over between rounds) into `OUT/round-N/`; the final model is saved
in `OUT/` like any SFT run, with `OUT/rejection_sampling.json` summarising the rounds.
A sample whose reward raises or is not a finite number is dropped and counted; the run goes on.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from .._fs import atomic_write_text, loads_json
from ..errors import InvalidRequestError
from .config import TrainConfig
from .data import DataReport, DatasetError, Example, load_dataset
from .grpo import prompt_of
from .rewards import RewardFailure, check_records, make_reward, safe_scores
from .rollout import sample_completions
from .base_model import LazyChatFormat, load_base_model
from .registry import make_strategy
from .trainer import Trainer, TrainResult

SUMMARY_FILE = "rejection_sampling.json"
ROUND_FILE = "round.json"


def _score_each(reward, records, texts, failures: Counter) -> list[float | None]:
    # Batched first; if the batch fails, one by one so that only the bad samples are dropped.
    try:
        return safe_scores(reward, [prompt_of(r) for r in records], texts, records)
    except RewardFailure:
        pass
    out: list[float | None] = []
    for rec, t in zip(records, texts):
        try:
            out.append(safe_scores(reward, [prompt_of(rec)], [t], [rec])[0])
        except RewardFailure as e:
            failures[str(e)] += 1
            out.append(None)
    return out


def select_best(scores: list[list[float | None]], threshold: float | None) -> list[int | None]:
    """Index of the best-scoring sample per prompt, None when no sample scored or the best is below threshold.
    Ties go to the earliest sample."""
    best = []
    for row in scores:
        valid = [(s, -j) for j, s in enumerate(row) if s is not None]
        if not valid:
            best.append(None)
            continue
        s, j = max(valid)
        best.append(-j if threshold is None or s >= threshold else None)
    return best


def rejection_sampling(cfg: TrainConfig, lm=None, chat_format=None, examples: list[Example] | None = None
                       ) -> TrainResult:
    """Run cfg.rs_rounds rounds (see the module docstring). `examples`: prompt examples (kind "prompt"),
    instead of reading cfg.data. Returns a TrainResult whose `rounds` lists each round's statistics."""
    required = ("out", "reward") + (("model",) if lm is None else ()) + (("data",) if examples is None else ())
    cfg = cfg.validate(required)
    if examples is None and not Path(cfg.data).is_file():
        raise DatasetError(cfg.data, None, "no such file")
    reward = make_reward(cfg.reward)  # before the slow model load: a bad spec fails fast
    lm = lm if lm is not None else load_base_model(cfg.model)
    chat = chat_format or LazyChatFormat(lm)
    report = DataReport()
    prompts = list(examples) if examples is not None else load_dataset(
        cfg.data, chat, kind="prompt", max_seq_len=cfg.max_seq_len, skip_bad=cfg.skip_bad, report=report,
        reserve=cfg.max_new_tokens)
    check_records(reward, [(e.line, e.record or {}) for e in prompts], cfg.data or "<examples>")
    stop_ids = tuple(sorted(getattr(chat, "stop_ids", ()) or ()))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = TrainResult(out=out, steps=0, data_report=report)
    sft_cfg = dataclasses.replace(cfg, task="sft", data="")
    strategy = make_strategy(sft_cfg)
    if cfg.resume and cfg.method == "full":
        raise InvalidRequestError("resuming rejection sampling needs LoRA/QLoRA (rounds restart from their "
                                  "saved adapters)", field="resume")
    for r in range(1, cfg.rs_rounds + 1):
        rdir = out / f"round-{r}"
        if cfg.resume and _resume_round(rdir, lm, strategy, result):
            continue
        torch.manual_seed(cfg.seed + r)
        groups = sample_completions(lm, [e.ids for e in prompts], cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, seed=cfg.seed, salt=(r,), stop_ids=stop_ids)
        failures: Counter = Counter()
        scores = []
        for e, group in zip(prompts, groups):
            scores.append(_score_each(reward, [e.record or {}] * len(group), [c.text for c in group], failures))
        best = select_best(scores, cfg.rs_threshold)
        kept_rows, kept_examples = [], []
        for e, group, row, b in zip(prompts, groups, scores, best):
            if b is None:
                continue
            c = group[b]
            kept_rows.append({"line": e.line, "prompt": prompt_of(e.record or {}), "completion": c.text,
                              "reward": row[b], "finish_reason": c.finish_reason,
                              "rewards": row})
            kept_examples.append(Example(e.ids + c.token_ids, [False] * len(e.ids) + [True] * len(c.token_ids),
                                         e.line))
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rdir / "kept.jsonl", "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept_rows))
        valid = [s for row in scores for s in row if s is not None]
        stats = {"round": r, "prompts": len(prompts), "samples": len(prompts) * cfg.group_size,
                 "kept": len(kept_rows), "kept_reward_mean": _mean([k["reward"] for k in kept_rows]),
                 "sample_reward_mean": _mean(valid), "reward_failures": dict(failures)}
        trainable = [k for k in kept_examples if any(k.mask[1:])]
        if trainable:
            res = Trainer(dataclasses.replace(sft_cfg, out=str(rdir), seed=cfg.seed + r), lm=lm,
                          chat_format=chat, examples=trainable).run()
            result.losses += res.losses
            result.steps += res.steps
            stats.update(steps=res.steps, last_loss=res.losses[-1] if res.losses else None)
        else:
            print(f"rejection sampling round {r}: no sample was kept (threshold {cfg.rs_threshold}); "
                  "nothing to train on this round", file=sys.stderr)
            stats.update(steps=0, last_loss=None)
        for why, n in failures.items():
            result.skipped[f"round {r}: {why} (sample dropped)"] += n
        result.rounds.append(stats)
        atomic_write_text(rdir / ROUND_FILE, json.dumps(stats, indent=2) + "\n")  # last: the round is complete
        atomic_write_text(out / SUMMARY_FILE, json.dumps({"rounds": result.rounds}, indent=2) + "\n")
    if result.steps:
        result.saved = strategy.save_final(lm.model, out, lm)
    atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    return result


def _resume_round(rdir: Path, lm, strategy, result: TrainResult) -> bool:
    """A round finished by an earlier run: put its adapter on the model and take its statistics."""
    f = rdir / ROUND_FILE
    if not f.is_file():
        return False
    from .lora import ADAPTER_WEIGHTS, load_adapter, lora_modules
    stats = loads_json(f.read_text())
    if stats.get("steps"):
        if not (rdir / ADAPTER_WEIGHTS).is_file():
            return False
        if not lora_modules(lm.model):
            strategy.prepare(lm.model)   # same LoRA layout (and NF4 base for QLoRA) as the run that wrote it
        load_adapter(lm.model, rdir, dropout=strategy.cfg.lora_dropout)
        result.steps += stats["steps"]
    result.rounds.append(stats)
    return True


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
