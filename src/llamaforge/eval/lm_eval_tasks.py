"""Write a llamaforge task as an lm-evaluation-harness task (a YAML file and its JSONL data), so the same examples
run under `lm_eval --include_path DIR --tasks llamaforge_NAME` with any of lm-eval's models.

Multiple choice maps one to one (lm-eval's `target_delimiter` is our `choice_prefix`; acc and acc_norm are lm-eval's
own). Generation maps to `generate_until` greedy with our stop strings and max_tokens, scored by lm-eval's
exact_match, bleu and chrf (lm-eval has no token-F1 or ROUGE-L metric of its own: those stay llamaforge's).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .._fs import atomic_write_text
from .tasks import Task, template_fields

_LM_EVAL_GEN_METRICS = {"exact_match": {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                        "ignore_case": True, "ignore_punctuation": True},
                        "bleu": {"metric": "bleu", "aggregation": "bleu", "higher_is_better": True},
                        "chrf": {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True}}


def jinja_prompt(task: Task) -> str:
    """Our `{field}` template as lm-eval's Jinja: fields become `{{field}}`, literal braces are quoted."""
    out, i, t = [], 0, task.prompt
    while i < len(t):
        if t.startswith("{{", i) or t.startswith("}}", i):
            out.append("{{ '" + t[i] + "' }}")
            i += 2
        elif t[i] == "{":
            j = t.index("}", i)
            out.append("{{" + t[i + 1:j] + "}}")
            i = j + 1
        else:
            out.append(t[i])
            i += 1
    return "".join(out)


def export_task(task: Task, out_dir: Path) -> Path:
    """Write llamaforge_NAME.yaml and llamaforge_NAME.jsonl into out_dir; returns the YAML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"llamaforge_{task.name}"
    data = out_dir / f"{name}.jsonl"
    fields = template_fields(task.prompt)
    rows = []
    for it in task.items:
        row = {f: it.record[f] for f in fields}
        if task.kind == "multiple_choice":
            row.update(lf_choices=it.choices, lf_gold=it.answer)
        else:
            row.update(lf_target=it.references[0], lf_references=it.references)
        rows.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(data, "\n".join(rows) + "\n")
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", "doc_to_text": jinja_prompt(task)}
    if task.kind == "multiple_choice":
        spec.update(output_type="multiple_choice", doc_to_choice="lf_choices", doc_to_target="lf_gold",
                    target_delimiter=task.choice_prefix,
                    metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                 for m in task.metrics])
    else:
        spec.update(output_type="generate_until", doc_to_target="lf_target", target_delimiter="",
                    generation_kwargs={"until": task.stop, "max_gen_toks": task.max_tokens, "do_sample": False},
                    metric_list=[_LM_EVAL_GEN_METRICS[m] for m in task.metrics if m in _LM_EVAL_GEN_METRICS],
                    # Our runner strips the answer; lm-eval compares raw text unless a filter does it.
                    filter_list=[{"name": "none", "filter": [{"function": "remove_whitespace"},
                                                             {"function": "take_first"}]}])
    spec["metadata"] = {"version": 1.0, "source": task.source, "license": task.license}
    path = out_dir / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path
