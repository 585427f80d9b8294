"""Reports of evaluation runs: a Markdown table, a JSON file and a PNG chart, for one run or several side by side.

A "run" is a list of `TaskResult`s of one model (or quantization); `compare` lays several runs out in columns.
Files are written atomically.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .._fs import atomic_file, atomic_write_text, read_text_bounded, loads_json
from .runner import TaskResult
from .tasks import TaskError

MAX_RESULT_BYTES = 64 << 20


def _fmt(v: float, se: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{v:.2f}"
    if se is not None and not math.isnan(se):
        s += f" ± {se:.2f}"
    return s


def markdown(results: Sequence[TaskResult]) -> str:
    """One run: a row per task and metric, then the robustness drops if any."""
    lines = ["| model | task | metric | value | items |", "|---|---|---|---|---|"]
    for r in results:
        for m, (v, se) in r.metrics.items():
            lines.append(f"| {r.model} | {r.task} | {m} | {_fmt(v, se)} | {r.items}"
                         f"{' (interrupted)' if r.interrupted else ''} |")
    rob = [(r, k, d) for r in results for k, d in r.robustness.items()]
    if rob:
        lines += ["", "Robustness (the same task with perturbed prompts; drop = clean - perturbed, in points):", "",
                  "| model | task | perturbation | metric | clean | perturbed | drop |", "|---|---|---|---|---|---|---|"]
        for r, k, d in rob:
            for m, x in d["metrics"].items():
                lines.append(f"| {r.model} | {r.task} | {k} | {m} | {_fmt(r.metrics[m][0])} | "
                             f"{_fmt(x['value'], x['stderr'])} | {_fmt(x['drop'])} |")
    return "\n".join(lines) + "\n"


def compare_markdown(runs: Sequence[Sequence[TaskResult]]) -> str:
    """Several runs side by side: a row per task and metric, a column per run (model or quantization)."""
    labels = [_label(run, i) for i, run in enumerate(runs)]
    rows: dict[tuple[str, str], list[str]] = {}
    for i, run in enumerate(runs):
        for r in run:
            for m, (v, se) in r.metrics.items():
                rows.setdefault((r.task, m), ["-"] * len(runs))[i] = _fmt(v, se)
            for k, d in r.robustness.items():
                for m, x in d["metrics"].items():
                    rows.setdefault((r.task, f"{m} drop ({k})"), ["-"] * len(runs))[i] = _fmt(x["drop"])
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    lines += [f"| {t} | {m} | " + " | ".join(vals) + " |" for (t, m), vals in rows.items()]
    return "\n".join(lines) + "\n"


def _label(run: Sequence[TaskResult], i: int) -> str:
    names = {r.model for r in run}
    return next(iter(names)) if len(names) == 1 else f"run {i + 1}"


def chart(runs: Sequence[Sequence[TaskResult]], path: Path) -> None:
    """A grouped bar chart (one group per task and metric, one bar per run, standard errors as whiskers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys: list[tuple[str, str]] = []
    for run in runs:
        for r in run:
            keys += [(r.task, m) for m in r.metrics if (r.task, m) not in keys]
    labels = [_label(run, i) for i, run in enumerate(runs)]
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.9 * len(keys) * max(1, len(runs)) ** 0.5), 4.0))
    for i, run in enumerate(runs):
        found = {(r.task, m): r.metrics[m] for r in run for m in r.metrics}
        vals = [found.get(k, (float("nan"), float("nan"))) for k in keys]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))]
        errs = [0.0 if math.isnan(se) else se for _, se in vals]
        ax.bar(xs, [v for v, _ in vals], width, yerr=errs, capsize=3, label=labels[i])
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{t}\n{m}" for t, m in keys], fontsize=8)
    ax.set_ylabel("score (0-100)")
    ax.set_ylim(0, 100)
    ax.set_title("llamaforge eval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_reports(runs: Sequence[Sequence[TaskResult]], out_dir: Path, stem: str = "results") -> dict[str, Path]:
    """Write STEM.md, STEM.json and STEM.png into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{stem}.md", "json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png"}
    md = markdown(runs[0]) if len(runs) == 1 else compare_markdown(runs)
    atomic_write_text(paths["md"], md)
    payload = {"runs": [[r.to_json() for r in run] for run in runs]}
    atomic_write_text(paths["json"], json.dumps(payload, indent=1, default=_json_default))
    chart(runs, paths["png"])
    return paths


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def load_runs(path: Path) -> list[list[TaskResult]]:
    """The runs of a results JSON written by `write_reports` (for --compare)."""
    text = read_text_bounded(path, MAX_RESULT_BYTES, f"results file {path}")
    try:
        data = loads_json(text)
        return [[TaskResult.from_json(d) for d in run] for run in data["runs"]]
    except (ValueError, KeyError, TypeError) as e:
        raise TaskError(path, f"not a llamaforge eval results file ({e})") from None
