"""The lm-evaluation-harness backend against lm-eval's own `hf` model on the same GGUF (both float32), on a shipped
multiple-choice task; rolling log-likelihood, generation and chat templates against HFLM; the `lm_eval.models`
entry point and `llamaforge eval lm-eval` (lm-eval's own command line)."""
from __future__ import annotations

import importlib.metadata as md
import json

import pytest
from lm_eval import simple_evaluate   # lm-eval is in the [test] extra
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from llamaforge.eval.harness import LlamaforgeLM
from llamaforge.eval.lm_eval_tasks import export_task
from llamaforge.eval.tasks import load_task
from test_generate_support import smollm2, smollm2_transformers


@pytest.fixture(scope="module")
def ours():
    return LlamaforgeLM(pretrained="smollm2", lm=smollm2(), batch_size=16)


@pytest.fixture(scope="module")
def theirs():
    tok, model = smollm2_transformers()
    return HFLM(pretrained=model, tokenizer=tok, batch_size=16)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval_tasks")
    export_task(load_task("world_facts"), d)
    export_task(load_task("capitals"), d)
    return d


def _evaluate(lm, task_dir, task, limit=None):
    from lm_eval.tasks import TaskManager
    return simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(task_dir)),
                           limit=limit, log_samples=True, bootstrap_iters=0)


def test_same_accuracy_as_lm_eval_hf_model(ours, theirs, task_dir):
    a = _evaluate(ours, task_dir, "llamaforge_world_facts")
    b = _evaluate(theirs, task_dir, "llamaforge_world_facts")
    ra, rb = a["results"]["llamaforge_world_facts"], b["results"]["llamaforge_world_facts"]
    assert ra["acc,none"] == rb["acc,none"] and ra["acc_norm,none"] == rb["acc_norm,none"]
    assert 0.25 < ra["acc,none"] < 1.0
    # Every choice's log-likelihood agrees, not only the argmax.
    la = [r[0][0] for s in a["samples"]["llamaforge_world_facts"] for r in s["resps"]]
    lb = [r[0][0] for s in b["samples"]["llamaforge_world_facts"] for r in s["resps"]]
    assert len(la) == len(lb) == 160
    assert max(abs(x - y) for x, y in zip(la, lb)) < 2e-3


def test_rolling_loglikelihood_generation_and_chat_match_hf(ours, theirs):
    text = "The first bridges were made of wood and rope. " * 40
    reqs = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    ours._max_length = theirs._max_length = 128   # several rolling windows
    try:
        a, b = ours.loglikelihood_rolling(reqs), theirs.loglikelihood_rolling(reqs)
    finally:
        ours._max_length, theirs._max_length = ours.backend_impl.max_length, None
    assert a[0] == pytest.approx(b[0], rel=1e-4)
    gen = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}), i)
           for i, p in enumerate(["The capital of France is", "1, 2, 3, 4,"])]
    assert ours.generate_until(gen) == theirs.generate_until(gen)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    tok, _ = smollm2_transformers()
    assert ours.tok_encode(ours.apply_chat_template(chat)) == \
        tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_entry_point_names_the_backend_and_builtins_stay():
    eps = [e for e in md.entry_points(group="lm_eval.models") if e.name == "llamaforge"]
    assert eps and eps[0].load() is LlamaforgeLM
    from lm_eval.api.registry import get_model   # registering ours must not hide lm-eval's own models
    assert get_model("llamaforge") is LlamaforgeLM and get_model("local-completions").__name__ == "LocalCompletionsAPI"


def test_lm_eval_command_line_with_model_llamaforge(task_dir, tmp_path):
    """`llamaforge eval lm-eval` = lm-eval's own CLI with the backend registered; default quantized model."""
    from llamaforge.cli.main import main
    out = tmp_path / "out"
    rc = main(["eval", "lm-eval", "--model", "llamaforge", "--model_args", "pretrained=smollm2,batch_size=8",
               "--tasks", "llamaforge_world_facts,llamaforge_capitals", "--include_path", str(task_dir),
               "--limit", "4", "--output_path", str(out)])
    assert rc == 0
    files = list(out.rglob("results_*.json"))
    assert files, list(out.rglob("*"))
    res = json.loads(files[0].read_text())["results"]
    assert 0 <= res["llamaforge_world_facts"]["acc,none"] <= 1
    assert res["llamaforge_capitals"]["exact_match,none"] >= 0.5
