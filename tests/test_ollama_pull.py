"""/api/pull through the official `ollama` client: NDJSON progress, local paths only from allowed directories
(never a file-existence oracle), Hugging Face repo ids, names from Ollama's library answered clearly."""
from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from llamaforge.cli.main import main
from llamaforge.server.app import ServerConfig, create_app
from llamaforge.store import Store
from test_server_e2e import Running
from test_store import tiny_gguf


@pytest.fixture()
def dirs(tmp_path):
    allowed, outside = tmp_path / "models", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    tiny_gguf(allowed / "tiny.gguf")
    tiny_gguf(outside / "secret.gguf", seed=1)
    (allowed / "link.gguf").symlink_to(outside / "secret.gguf")   # inside by name, outside in fact
    return allowed, outside


def _serve(allowed):
    return Running(create_app(ServerConfig(allow_pull_from=[str(a) for a in allowed])))


def test_pull_a_local_file_with_ndjson_progress(dirs):
    import ollama
    allowed, _ = dirs
    r = _serve([allowed])
    try:
        c = ollama.Client(host=r.url, timeout=60)
        src = allowed / "tiny.gguf"
        lines = list(c.pull(str(src), stream=True))
        statuses = [p.status for p in lines]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        sized = [p for p in lines if p.status == "pulling tiny.gguf"]
        assert sized and all(p.total == src.stat().st_size for p in sized)
        assert sized[-1].completed == src.stat().st_size
        assert [p.completed for p in sized] == sorted(p.completed for p in sized)
        rows = {m.model: m for m in c.list().models}
        assert "tiny:latest" in rows and rows["tiny:latest"].details.quantization_level == "F32"
        assert Store().resolve("tiny").path.read_bytes() == src.read_bytes()
        # the raw stream is NDJSON, one object per line, as Ollama sends it
        raw = httpx.post(r.url + "/api/pull", json={"model": str(src)}, timeout=60)
        assert raw.headers["content-type"].startswith("application/x-ndjson")
        assert raw.text.strip().splitlines()[-1].startswith('{"status":"success"')
        assert c.pull(str(src)).status == "success"                          # stream=False
        assert c.pull("smollm2").status == "success"                         # already here: nothing to do
    finally:
        r.stop()


def _error(url, model):
    resp = httpx.post(url + "/api/pull", json={"model": model, "stream": False}, timeout=60)
    return resp.status_code, resp.json()["error"].replace(repr(model), "SOURCE")


def test_paths_outside_the_allowed_directories_get_one_answer(dirs, tmp_path):
    allowed, outside = dirs
    r = _serve([allowed])
    try:
        probes = [str(outside / "secret.gguf"),            # exists, outside
                  str(outside / "missing.gguf"),           # does not exist, outside
                  "/etc/passwd", "/definitely/not/here.gguf",
                  str(allowed / ".." / "private" / "secret.gguf"),   # traversal out of the allowed directory
                  str(allowed / "link.gguf"),              # a symlink leading out
                  "tiny.gguf", "./models/tiny.gguf", "~/x.gguf"]   # relative to something unknown
        answers = {_error(r.url, p) for p in probes}
        assert len(answers) == 1, answers
        refusal = answers.pop()
        assert refusal[0] == 400 and "--allow-pull-from" in refusal[1]
        assert Store().present("secret") is None and Store().present("link") is None
        # inside an allowed directory the operator chose to expose, a missing file may say so
        status, message = _error(r.url, str(allowed / "missing.gguf"))
        assert status == 404 and "no such file" in message
    finally:
        r.stop()
    closed = _serve([])   # nothing allowed: every path, existing or not, gets that same answer
    try:
        assert {_error(closed.url, p) for p in (str(allowed / "tiny.gguf"), "/nope.gguf")} == {refusal}
    finally:
        closed.stop()


def test_ollama_library_names_and_hugging_face_ids(dirs, monkeypatch):
    import ollama
    allowed, _ = dirs
    r = _serve([allowed])
    try:
        c = ollama.Client(host=r.url, timeout=60)
        for name in ("llama3.2", "llama3.2:1b", "registry.ollama.ai/library/qwen3"):
            with pytest.raises(ollama.ResponseError) as ei:
                c.pull(name)
            assert ei.value.status_code == 404 and "not available offline" in str(ei.value)
            assert "Hugging Face repo id" in str(ei.value)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # no network here: the download fails, clearly
        with pytest.raises(ollama.ResponseError) as ei:
            list(c.pull("HuggingFaceTB/SmolLM2-135M-Instruct", stream=True))
        assert "cannot download 'HuggingFaceTB/SmolLM2-135M-Instruct' from Hugging Face" in str(ei.value)
        empty = httpx.post(r.url + "/api/pull", json={"model": ""}, timeout=60)
        assert empty.status_code == 400 and "model" in empty.json()["error"]
    finally:
        r.stop()


def test_cli_pull_of_a_library_name_and_serve_flag(capsys, tmp_path):
    assert main(["pull", "llama3.2:1b"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not available offline" in err
    assert main(["pull", "smollm2"]) == 0 and "smollm2:latest" in capsys.readouterr().out
    assert main(["serve", "--allow-pull-from", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_cancelled_pull_leaves_nothing_behind(dirs):
    from llamaforge.server.ollama_pull import run_pull
    allowed, _ = dirs
    store = Store()
    with pytest.raises(Exception, match="cancelled"):
        run_pull(store, "path", allowed / "tiny.gguf", lambda line: None, lambda: True)
    assert store.present("tiny") is None
    assert not any(p.name.startswith("sha256-") for p in (store.root / "blobs").glob("*")) \
        if (store.root / "blobs").exists() else True
    assert hashlib.sha256((allowed / "tiny.gguf").read_bytes()).hexdigest()   # the source is untouched
    assert os.path.exists(allowed / "tiny.gguf")
