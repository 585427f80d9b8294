"""Threads (issue 19 item 2): the default follows the cores this process may use, `--threads` / a model's
`num_thread` / the environment override it in that order, OpenMP threads sleep instead of spinning (set before torch loads
libgomp), and bad values are clear errors. Speed under contention is measured by bench/contention.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import llamaforge
from llamaforge import store as store_mod
from llamaforge import threads as T
from llamaforge.errors import InvalidRequestError, StoreError
from llamaforge.store import Store

from test_store import tiny_gguf

ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LLAMAFORGE_NUM_THREADS",
                                                        "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def _py(code: str, env=None) -> str:
    r = subprocess.run([sys.executable, "-c", code], env={**ENV, **(env or {})}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_default_follows_the_affinity_mask_not_the_machine():
    # A process pinned to one CPU (taskset, a cpuset) gets one thread, whatever os.cpu_count() says.
    out = _py("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from llamaforge import threads; print(threads.usable_cores(), threads.default_threads())")
    assert out == "1 1"
    assert T.usable_cores() == len(os.sched_getaffinity(0))


def test_cgroup_quota_caps_the_cores():
    assert T._parse_cpu_max("150000 100000\n", "") == 1.5
    assert T._parse_cpu_max("max 100000\n", "") is None
    assert T._parse_cpu_max("garbage", "") is None


def test_environment_order(monkeypatch):
    monkeypatch.delenv("LLAMAFORGE_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert T.default_threads() == 3
    monkeypatch.setenv("LLAMAFORGE_NUM_THREADS", "5")
    assert T.default_threads() == 5
    monkeypatch.setenv("LLAMAFORGE_NUM_THREADS", "many")
    with pytest.raises(InvalidRequestError, match="LLAMAFORGE_NUM_THREADS"):
        T.default_threads()


@pytest.mark.parametrize("bad", [0, -2, "x", "1.5", True, 5000])
def test_bad_thread_counts_are_named_errors(bad):
    with pytest.raises(InvalidRequestError, match="num_thread") as e:
        T.parse_threads(bad, "num_thread")
    assert e.value.field == "num_thread"


def test_import_sets_the_openmp_spin_before_torch_loads():
    out = _py("import os, sys; import llamaforge; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    assert out == f"{T.DEFAULT_SPINCOUNT} False"
    # The user's own choice wins.
    assert _py("import os, llamaforge; print(os.environ.get('GOMP_SPINCOUNT'))",
               {"OMP_WAIT_POLICY": "ACTIVE"}) == "None"
    env = {"LLAMAFORGE_SPINCOUNT": "500"}
    assert T.prepare_openmp(env, modules={}) and env["GOMP_SPINCOUNT"] == "500"   # our own knob
    assert not T.prepare_openmp({"GOMP_SPINCOUNT": "5"}, modules={})
    # Too late once torch is loaded: nothing is pretended.
    assert _py("import os, torch, llamaforge; print(os.environ.get('GOMP_SPINCOUNT'))") == "None"


def test_cli_threads_flag_is_applied_and_validated(smollm2_gguf, keep_threads, capsys):
    from llamaforge.cli import eval as eval_cli
    from llamaforge.cli import finetune, generate, run, serve
    torch.set_num_threads(2)
    assert generate.main([str(smollm2_gguf), "Hi", "--max-tokens", "1", "--threads", "1", "--json"]) == 0
    assert torch.get_num_threads() == 1
    parsers = {"generate": generate.build_parser(), "run": run.build_parser(), "serve": serve.build_parser(),
               "eval": eval_cli._parser(), "finetune": finetune._train_parser("sft"),
               "merge": finetune._merge_parser()}
    args = {"generate": ["m", "p"], "eval": ["perplexity", "m", "--file", "f"],
            "merge": ["--model", "m", "--adapter", "a", "--out", "o"]}
    for name, p in parsers.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            p.parse_args([*args.get(name, []), "--threads", "0"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--threads" in err and "between 1 and 1024, got 0" in err, (name, err)
        assert p.parse_args([*args.get(name, []), "-t", "3"]).threads == 3


def test_model_num_thread_parameter(tmp_path, keep_threads):
    s = Store()
    s.pull(tiny_gguf(tmp_path / "t.gguf"), "base")
    s.create("one", "base", options=store_mod.params_to_options(["num_thread=1", "temperature=0"]))
    assert s.resolve("one").defaults["options"]["num_thread"] == 1
    torch.set_num_threads(2)
    lm = llamaforge.load("one")
    assert torch.get_num_threads() == 1               # applied before the model (and its compiled step) loads
    ids = lm.model(torch.tensor([[1, 2, 3]]))[0, -1]  # and a request with the stored options still plans fine
    from llamaforge.generate.pipeline import plan
    from llamaforge.generate.request import GenerationRequest
    p = plan(lm, GenerationRequest(prompt=[1, 2, 3], options={"max_tokens": 2}))
    assert p.params.temperature == 0 and ids.shape[0] == lm.config.vocab_size
    # An explicit `threads` (the CLI's --threads, serve --threads) wins over the stored parameter.
    torch.set_num_threads(1)
    llamaforge.load("one", threads=2)
    assert torch.get_num_threads() == 2
    for bad in (["num_thread=0"], ["num_thread=two"]):
        with pytest.raises(StoreError, match="num_thread"):
            s.create("bad", "base", options=store_mod.params_to_options(bad))


def test_request_num_thread_stays_refused_by_name(smollm2_gguf):
    """Per request it cannot apply: torch's thread pool is process-wide (shared by every request in a batch) and
    the compiled step's loops are built for one thread count. The refusal names the option."""
    from fastapi.testclient import TestClient

    from llamaforge.server.app import ServerConfig, create_app
    app = create_app(ServerConfig(models=[str(smollm2_gguf)]))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post("/api/generate", json={"model": str(smollm2_gguf), "prompt": "hi", "stream": False,
                                          "options": {"num_thread": 2, "num_predict": 1}})
    assert r.status_code == 400, r.text
    assert "num_thread" in json.dumps(r.json())
