"""Tasks, metrics, perturbations, the runner and reports: bad task files, scoring against transformers on a tiny
model, batched generation against one-at-a-time generation, and the `llamaforge eval run` command."""
from __future__ import annotations

import json
import math

import pytest
import torch

from llamaforge.eval import metrics as M
from llamaforge.eval.backends import InProcessBackend, generate_batch
from llamaforge.eval.perturb import PERTURBATIONS, perturb
from llamaforge.eval.report import compare_markdown, load_runs, write_reports
from llamaforge.eval.runner import run_task
from llamaforge.eval.tasks import TaskError, load_task, shipped_tasks
from test_generate_support import tiny_lm

MC_YAML = "kind: multiple_choice\ndata: d.jsonl\nprompt: \"Q: {q}\\nA:\"\n"


def _task(tmp_path, yaml_text: str, lines: list[str] | None, name="t"):
    (tmp_path / f"{name}.yaml").write_text(yaml_text, encoding="utf-8")
    if lines is not None:
        (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / f"{name}.yaml"


def test_shipped_tasks_load():
    names = shipped_tasks()
    assert {"world_facts", "sentence_end", "capitals", "past_tense"} <= set(names)
    for n in names:
        t = load_task(n)
        assert t.items and t.license and t.source
        if t.kind == "multiple_choice":
            assert all(len(i.choices) >= 2 and 0 <= i.answer < len(i.choices) for i in t.items)


GOOD = '{"q": "x", "choices": ["a", "b"], "answer": 1}'


@pytest.mark.parametrize("yaml_text,lines,where,msg", [
    (MC_YAML, [GOOD, '{"q": "y", "choices": ["a"], "answer": 0}'], "d.jsonl:2", "at least 2"),
    (MC_YAML, [GOOD, '{"q": "y", "choices": ["a", "b"], "answer": 0', GOOD], "d.jsonl:2", "malformed JSON"),
    (MC_YAML, [GOOD, GOOD, '{"q": "y", "choices": ["a", "b"], "answer": 5}'], "d.jsonl:3", "index"),
    (MC_YAML, ['{"q": "y", "choices": ["a", "b"], "answer": "c"}'], "d.jsonl:1", "not one of the choices"),
    (MC_YAML, ['{"choices": ["a", "b"], "answer": 0}'], "d.jsonl:1", "missing field 'q'"),
    (MC_YAML, ['[1, 2]'], "d.jsonl:1", "JSON object"),
    (MC_YAML, [""], "d.jsonl", "no examples"),
    (MC_YAML, None, "d.jsonl", "does not exist"),
    ("", [GOOD], "t.yaml", "empty"),
    ("kind: [unclosed\n", [GOOD], "t.yaml", "not valid YAML"),
    ("- a\n- b\n", [GOOD], "t.yaml", "mapping"),
    (MC_YAML + "colour: red\n", [GOOD], "t.yaml", "unknown key(s) colour"),
    ("kind: essay\ndata: d.jsonl\nprompt: x\n", [GOOD], "t.yaml", "kind must be"),
    ("kind: multiple_choice\nprompt: x\n", [GOOD], "t.yaml", "missing required key 'data'"),
    ("kind: multiple_choice\ndata: d.jsonl\nprompt: \"{q} }\"\n", [GOOD], "t.yaml", "lone brace"),
    (MC_YAML + "metrics: [bleu]\n", [GOOD], "t.yaml", "not available"),
    (MC_YAML + "max_tokens: 3\n", [GOOD], "t.yaml", "for generation tasks"),
])
def test_bad_task_files_are_refused_with_file_and_line(tmp_path, yaml_text, lines, where, msg):
    path = _task(tmp_path, yaml_text, lines)
    with pytest.raises(TaskError) as e:
        load_task(path)
    assert where in str(e.value) and msg in str(e.value), str(e.value)


def test_missing_task_names_the_shipped_ones(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_task(str(tmp_path / "nope.yaml"))
    with pytest.raises(TaskError, match="world_facts"):
        load_task("no_such_task")


def test_answer_metrics_follow_squad_normalisation():
    assert M.exact_match("The Cat!", ["cat"]) == 1.0 and M.exact_match("a dog", ["cat", "dog"]) == 1.0
    assert M.exact_match("cats", ["cat"]) == 0.0
    # F1: prediction "the big red apple" vs "red apple": tokens big/red/apple vs red/apple -> P 2/3, R 1 -> 0.8
    assert M.token_f1("the big red apple", ["red apple"]) == pytest.approx(0.8)
    assert M.token_f1("nothing here", ["red apple"]) == 0.0
    import sacrebleu
    preds, refs = ["the cat sat on the mat", "a dog ran"], [["the cat sat on the mat"], ["a dog ran fast", "dogs run"]]
    scores, _ = M.generation_scores(preds, refs, ["bleu", "chrf", "rouge_l"])
    assert scores["bleu"][0] == pytest.approx(sacrebleu.corpus_bleu(
        preds, [["the cat sat on the mat", "a dog ran fast"], [None, "dogs run"]]).score)
    assert scores["chrf"][0] == pytest.approx(sacrebleu.corpus_chrf(
        preds, [["the cat sat on the mat", "a dog ran fast"], [None, "dogs run"]]).score)
    from rouge_score import rouge_scorer
    rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = (1.0 + rs.score("a dog ran fast", "a dog ran")["rougeL"].fmeasure) / 2 * 100
    assert scores["rouge_l"][0] == pytest.approx(expected)


def test_choice_metrics_acc_and_byte_normalised_acc():
    # Item 1: choice 0 has the higher total (-3 > -4) but per byte choice 1 wins (-0.4 > -1.5).
    scores, per = M.choice_scores([[-3.0, -4.0], [-1.0, -2.0]], [[2, 10], [3, 3]], [1, 0])
    assert per[0]["pick"] == 0 and per[0]["pick_norm"] == 1
    assert scores["acc"][0] == 50.0 and scores["acc_norm"][0] == 100.0


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbations_are_deterministic_and_keep_the_text(kind):
    text = "Which planet is closest to the Sun in our solar system?"
    a, b = perturb(kind, text, seed=3), perturb(kind, text, seed=3)
    assert a == b and a != text
    if kind == "case":
        assert a.lower() == text.lower()
    elif kind == "whitespace":
        assert a.split() == text.split()
    elif kind == "distractor":
        assert a.endswith(" " + text)
    else:  # one edit per changed word, most words untouched
        changed = [x for x, y in zip(a.split(), text.split()) if x != y]
        assert 1 <= len(changed) <= 4 and len(a.split()) == len(text.split())


class FakeBackend:
    """Scores a continuation by minus its length; interrupts on a chosen call."""

    label, kind = "fake", "fake"

    def __init__(self, interrupt_on=None):
        self.calls, self.interrupt_on = 0, interrupt_on

    def loglikelihood(self, pairs):
        self.calls += 1
        if self.calls == self.interrupt_on:
            raise KeyboardInterrupt
        return [(-float(len(c)), False) for _, c in pairs]


def test_runner_scores_choices_and_stops_cleanly_on_interrupt(tmp_path):
    lines = [json.dumps({"q": str(i), "choices": ["aaa", "b"], "answer": i % 2}) for i in range(40)]
    task = load_task(_task(tmp_path, MC_YAML, lines))
    r = run_task(FakeBackend(), task)
    assert r.items == 40 and r.metrics["acc"][0] == 50.0   # always picks "b" (shorter), right on odd items
    r2 = run_task(FakeBackend(interrupt_on=2), task, robustness=["case"])
    assert r2.interrupted and r2.items == 16 and not r2.robustness


def test_scores_match_transformers_on_a_tiny_model():
    """Log-likelihoods of continuations of different lengths, scored in one padded batch, equal the
    reference model's on each sequence alone."""
    from conftest import make_tiny_hf
    from test_generate_support import ByteTokenizer
    hf = make_tiny_hf("llama31", vocab_size=260, seed=0)
    b = InProcessBackend(tiny_lm("llama31", seed=0, tokenizer=ByteTokenizer()), batch_size=4)
    pairs = [("The sky is", " blue"), ("Two plus two is", " four, of course"), ("x", " y"), ("Hello", "!")]
    got = b.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c_ids, x_ids = b.encode_pair(ctx, cont)
        ids = torch.tensor([c_ids + x_ids])
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0].double(), -1)
        ref = sum(float(lp[len(c_ids) + j - 1, t]) for j, t in enumerate(x_ids))
        ref_greedy = all(int(lp[len(c_ids) + j - 1].argmax()) == t for j, t in enumerate(x_ids))
        assert ll == pytest.approx(ref, abs=1e-3) and greedy == ref_greedy


def test_batched_generation_equals_one_at_a_time():
    from test_generate_support import ByteTokenizer
    lm = tiny_lm("llama2", seed=1, tokenizer=ByteTokenizer())
    prompts = ["abc", "hello world", "x", "a longer prompt than the rest of them"]
    batched = generate_batch(lm, prompts, max_tokens=6, batch_size=3)
    single = [lm.generate(p, max_tokens=6, temperature=0).text for p in prompts]
    assert batched == single and any(batched)


def test_reports_and_cli_run(tmp_path, capsys):
    from llamaforge.cli.main import main
    out = tmp_path / "rep"
    assert main(["eval", "run", "smollm2", "--task", "world_facts", "--task", "capitals", "--limit", "3",
                 "--robustness", "typos", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| smollm2 | world_facts | acc |" in text and "exact_match" in text and "typos" in text
    runs = load_runs(out / "results.json")
    assert [r.task for r in runs[0]] == ["world_facts", "capitals"] and runs[0][0].items == 3
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    cmp = compare_markdown([runs[0], runs[0]])
    assert cmp.splitlines()[0].count("smollm2") == 2
    paths = write_reports([runs[0], runs[0]], tmp_path / "cmp")
    assert all(p.exists() for p in paths.values())
    # Bad input is an error line, never a traceback.
    assert main(["eval", "run", "smollm2", "--task", str(tmp_path / "none.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "run", "smollm2", "--task", "world_facts", "--robustness", "shouting"]) == 1
    assert "unknown perturbation" in capsys.readouterr().err
    assert math.isfinite(runs[0][0].metrics["acc"][0])
