"""The served model: lm-eval's `local-completions` against `llamaforge serve` gives the in-process backend's numbers,
`llamaforge eval --server` gives the in-process runner's, and the /tokenize routes behave (and refuse bad input)."""
from __future__ import annotations

import httpx
import pytest

from llamaforge.eval.backends import InProcessBackend
from llamaforge.eval.remote import ServerBackend, ServerError
from llamaforge.eval.runner import run_task
from llamaforge.eval.tasks import load_task
from llamaforge.server.app import ServerConfig, create_app
from test_generate_support import smollm2
from test_server_e2e import Running


@pytest.fixture(scope="module")
def srv():
    r = Running(create_app(ServerConfig(max_batch=8, max_queue=64, ctx=512), preloaded={"smollm2": smollm2()}))
    yield r
    r.stop()


def test_tokenize_routes(srv):
    tok = smollm2().tokenizer
    r = httpx.post(f"{srv.url}/tokenize", json={"prompt": "Hello world", "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("Hello world")
    r = httpx.post(f"{srv.url}/detokenize", json={"model": "smollm2", "tokens": tok.encode("Hello world")})
    assert r.json()["prompt"] == "Hello world"
    info = httpx.get(f"{srv.url}/tokenizer_info").json()
    assert info["eos_token"] == tok.id_to_piece(tok.eos_id) and info["model_max_length"] == 512
    for path, body, param in [("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"prompt": "a", "x": 1}, "x"),
                              ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
                              ("/tokenize", {"prompt": "a", "model": "nope"}, None)]:
        r = httpx.post(f"{srv.url}{path}", json=body)
        assert 400 <= r.status_code < 500, (body, r.text)
        if param:
            assert param in r.text


def test_local_completions_equals_in_process_backend(srv, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llamaforge.eval.harness import LlamaforgeLM
    from llamaforge.eval.lm_eval_tasks import export_task
    export_task(load_task("world_facts"), tmp_path)
    tm = TaskManager(include_path=str(tmp_path))
    remote = simple_evaluate(model="local-completions", model_args=f"base_url={srv.url}/v1/completions,"
                             "model=smollm2,num_concurrent=2,max_retries=1", tasks=["llamaforge_world_facts"],
                             task_manager=tm, limit=12, log_samples=True, bootstrap_iters=0)
    local = simple_evaluate(model=LlamaforgeLM(pretrained="smollm2", lm=smollm2()), tasks=["llamaforge_world_facts"],
                            task_manager=tm, limit=12, log_samples=True, bootstrap_iters=0)
    ra, rb = remote["results"]["llamaforge_world_facts"], local["results"]["llamaforge_world_facts"]
    assert ra["acc,none"] == rb["acc,none"] and ra["acc_norm,none"] == rb["acc_norm,none"]
    la = [r[0] for s in remote["samples"]["llamaforge_world_facts"] for r in s["resps"]]
    lb = [r[0] for s in local["samples"]["llamaforge_world_facts"] for r in s["resps"]]
    assert len(la) == len(lb) == 48
    assert max(abs(x[0] - y[0]) for x, y in zip(la, lb)) < 1e-3
    assert [x[1] for x in la] == [y[1] for y in lb]   # is_greedy too


def test_eval_run_against_the_server_equals_in_process(srv):
    remote, local = ServerBackend(srv.url, "smollm2"), InProcessBackend(smollm2())
    for name, limit in (("sentence_end", 6), ("capitals", 4)):
        task = load_task(name)
        a, b = run_task(remote, task, limit=limit), run_task(local, task, limit=limit)
        assert a.metrics.keys() == b.metrics.keys(), name
        for m in a.metrics:
            assert a.metrics[m] == pytest.approx(b.metrics[m]), (name, m)
        if task.kind == "generation":
            assert [s["prediction"] for s in a.samples] == [s["prediction"] for s in b.samples]
        else:
            for x, y in zip(a.samples, b.samples):
                assert x["logliks"] == pytest.approx(y["logliks"], abs=1e-3)
    with pytest.raises(ServerError, match="cannot reach"):
        ServerBackend("http://127.0.0.1:9", "smollm2").loglikelihood([("a", " b")])
