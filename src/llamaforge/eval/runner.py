"""Run a task against a backend (in process or a server) and score it; optionally re-run it with perturbed prompts.

Examples go through the backend in chunks, so Ctrl-C stops after the current chunk and the result covers the
examples finished so far (`interrupted=True`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from .metrics import choice_scores, generation_scores
from .perturb import PERTURBATIONS, perturb_record
from .tasks import Item, Task

CHUNK_ITEMS = 16


@dataclass
class RunScores:
    """Scores of one pass over the task (clean, or one perturbation)."""

    metrics: dict[str, tuple[float, float]]   # name -> (value, stderr), in percent / 0-100
    items: int
    samples: list[dict] = field(default_factory=list)


@dataclass
class TaskResult:
    """Everything a report needs about one model on one task."""

    task: str
    kind: str
    model: str
    backend: str
    items: int
    metrics: dict[str, tuple[float, float]]
    seconds: float
    interrupted: bool = False
    # perturbation -> {"items", "example" (first perturbed prompt), "metrics": {name: {value, stderr, drop}}}
    robustness: dict[str, dict] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["metrics"] = {k: {"value": v, "stderr": se} for k, (v, se) in self.metrics.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TaskResult":
        d = dict(d)
        d["metrics"] = {k: (v["value"], v["stderr"]) for k, v in d["metrics"].items()}
        return cls(**d)


def _chunks(items: Sequence[Item], n: int):
    for a in range(0, len(items), n):
        yield items[a:a + n]


def score_choices(backend, task: Task, items: Sequence[Item], records: Sequence[dict] | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[RunScores, bool]:
    """Multiple choice by log-likelihood. Returns (scores of the items done, interrupted)."""
    records = records or [it.record for it in items]
    logliks, nbytes, answers, prompts, done = [], [], [], [], 0
    interrupted = False
    try:
        for chunk in _chunks(list(zip(items, records)), CHUNK_ITEMS):
            pairs, counts = [], []
            for it, rec in chunk:
                ctx = task.render(rec)
                pairs += [(ctx, task.continuation(c)) for c in it.choices]
                counts.append(len(it.choices))
                prompts.append(ctx)
            scores = backend.loglikelihood(pairs)
            k = 0
            for (it, _), n in zip(chunk, counts):
                logliks.append([s for s, _ in scores[k:k + n]])
                nbytes.append([len(c.encode("utf-8")) for c in it.choices])
                answers.append(it.answer)
                k += n
            done += len(chunk)
            if progress is not None:
                progress(len(chunk))
    except KeyboardInterrupt:
        interrupted = True
    prompts = prompts[:done]
    metrics, per = choice_scores(logliks, nbytes, answers)
    samples = [dict(line=it.line, prompt=p, choices=it.choices, answer=it.answer, logliks=ll, **s)
               for it, p, ll, s in zip(items, prompts, logliks, per)]
    return RunScores({m: metrics[m] for m in task.metrics}, done, samples), interrupted


def score_generation(backend, task: Task, items: Sequence[Item], records: Sequence[dict] | None = None,
                     progress: Callable[[int], None] | None = None) -> tuple[RunScores, bool]:
    """Generation scored against the references. Returns (scores of the items done, interrupted)."""
    records = records or [it.record for it in items]
    preds: list[str] = []
    prompts: list[str] = []
    interrupted = False
    try:
        for chunk in _chunks(list(zip(items, records)), CHUNK_ITEMS):
            texts = [task.render(rec) for _, rec in chunk]
            inputs = [[{"role": "user", "content": t}] for t in texts] if task.chat else texts
            out = backend.generate(inputs, max_tokens=task.max_tokens, stop=task.stop)
            preds += [o.strip() for o in out]
            prompts += texts
            if progress is not None:
                progress(len(chunk))
    except KeyboardInterrupt:
        interrupted = True
    done = len(preds)
    refs = [it.references for it in items[:done]]
    metrics, per = generation_scores(preds, refs, task.metrics) if done else ({}, [])
    samples = [dict(line=it.line, prompt=p, prediction=x, references=it.references, **s)
               for it, p, x, s in zip(items, prompts, preds, per)]
    return RunScores(metrics, done, samples), interrupted


def run_task(backend, task: Task, *, limit: int | None = None, robustness: Sequence[str] = (), seed: int = 0,
             progress: Callable[[int], None] | None = None) -> TaskResult:
    """Score `task` with `backend`; `robustness` lists perturbations (see eval.perturb) to re-run it with.

    progress(n) is called as examples finish (each pass counts its examples again).
    """
    items = task.items[:limit] if limit else task.items
    score = score_choices if task.kind == "multiple_choice" else score_generation
    t0 = time.perf_counter()
    clean, interrupted = score(backend, task, items, progress=progress)
    result = TaskResult(task=task.name, kind=task.kind, model=getattr(backend, "label", "model"),
                        backend=getattr(backend, "kind", "?"), items=clean.items, metrics=clean.metrics,
                        seconds=0.0, interrupted=interrupted, samples=clean.samples,
                        info={"task_file": str(task.path), "license": task.license, "source": task.source,
                              "examples_in_task": len(task.items)})
    for kind in robustness:
        if interrupted:
            break
        if kind not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {kind!r}")
        records = [perturb_record(kind, it.record, task.perturb_fields, seed) for it in items]
        pert, interrupted = score(backend, task, items, records, progress=progress)
        result.robustness[kind] = {
            "items": pert.items, "example": pert.samples[0]["prompt"] if pert.samples else "",
            "metrics": {m: {"value": v, "stderr": se, "drop": clean.metrics[m][0] - v}
                        for m, (v, se) in pert.metrics.items()}}
    result.interrupted = interrupted
    result.seconds = time.perf_counter() - t0
    return result
