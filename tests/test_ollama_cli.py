"""`llamaforge ps`, `stop` and `embed` through `llamaforge.cli.main.main([...])`, checked against a running server
(read back with the official `ollama` client) and the compiled-step lock/marker files."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from llamaforge.cli.main import main
from llamaforge.server.app import ServerConfig, create_app
from test_generate_support import tiny_lm
from test_server_e2e import Running


@pytest.fixture()
def server():
    pinned = tiny_lm()
    pinned.name = None
    app = create_app(ServerConfig(max_batch=2, ctx=64), preloaded={"tiny-pinned": pinned},
                     loader=lambda name: tiny_lm(seed=1))
    r = Running(app)
    yield r
    r.stop()


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_ps_lists_loaded_models_and_background_builds(server, capsys, tmp_path):
    import ollama
    from llamaforge.store import home
    c = ollama.Client(host=server.url)
    c.generate(model="smollm2")                                   # an on-demand model (the loader's tiny one)
    folder = home() / "compiled"
    folder.mkdir(parents=True, exist_ok=True)
    # What a background build leaves: a lock holding the builder's pid (its command line names the model), and
    # the marker of one that failed.
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--build-step",
                                str(tmp_path / "model.gguf"), "--threads", "2"])
    try:
        (folder / "decode-aaaa.lock").write_text(str(builder.pid))
        (folder / "decode-bbbb.failed").write_text("out of memory while compiling\n")
        (folder / "decode-cccc.lock").write_text("999999999")  # a dead builder: not listed
        rc, out, err = _run(capsys, "ps", "--host", server.url)
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
        rows = {ln.split()[0]: ln for ln in lines[1:] if ln and not ln.startswith(("COMPILED", "STATE"))
                and ln.split()[0] not in ("building", "failed")}
        assert set(rows) == {"smollm2:latest", "tiny-pinned:latest"}
        assert "Forever" in rows["tiny-pinned:latest"] and "minutes from now" in rows["smollm2:latest"]
        assert "64" in rows["smollm2:latest"].split()
        building = [ln for ln in lines if ln.startswith("building")]
        assert len(building) == 1 and str(builder.pid) in building[0] and "model.gguf" in building[0]
        assert any(ln.startswith("failed") and "out of memory" in ln for ln in lines)
        rc, out, _ = _run(capsys, "ps", "--host", server.url, "--json")
        info = json.loads(out)
        assert {m["model"] for m in info["models"]} == {"smollm2:latest", "tiny-pinned:latest"}
        assert [b["state"] for b in info["builds"]].count("building") == 1
    finally:
        builder.kill()
        builder.wait()


def test_ps_without_a_server_still_lists_builds(capsys):
    rc, out, err = _run(capsys, "ps", "--host", "http://127.0.0.1:9", "--timeout", "2")
    assert rc == 1 and "no llamaforge server at http://127.0.0.1:9" in err and err.count("\n") == 1


def test_stop_unloads_a_model(server, capsys):
    import ollama
    c = ollama.Client(host=server.url)
    c.generate(model="smollm2")
    assert "smollm2:latest" in {m.model for m in c.ps().models}
    rc, out, err = _run(capsys, "stop", "smollm2", "--host", server.url)
    assert rc == 0 and out.strip() == "stopped 'smollm2'", err
    assert {m.model for m in c.ps().models} == {"tiny-pinned:latest"}
    rc, out, err = _run(capsys, "stop", "tiny-pinned", "--host", server.url)
    assert rc == 1 and "named when the server started" in err
    rc, _, err = _run(capsys, "stop", "smollm2", "--host", "http://127.0.0.1:9", "--timeout", "2")
    assert rc == 1 and err.startswith("Error: no llamaforge server")


def test_embed_prints_what_the_api_returns(capsys, tmp_path, vocab_dir, monkeypatch):
    import ollama
    import llamaforge
    from test_convert import _vocab_model
    path = tmp_path / "tiny-vocab.gguf"
    _vocab_model(vocab_dir, "llama-spm", path)
    rc, out, err = _run(capsys, "embed", str(path), "hello world", "a second text", "--quant", "none")
    assert rc == 0, err
    vectors = [json.loads(ln) for ln in out.splitlines()]
    assert len(vectors) == 2 and all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    lm = llamaforge.load(path, quant="none", compile=False)
    r = Running(create_app(ServerConfig(), preloaded={"tv": lm}))
    try:
        ref = ollama.Client(host=r.url).embed(model="tv", input=["hello world", "a second text"])
    finally:
        r.stop()
    assert len(vectors[0]) == lm.config.hidden_size
    for mine, theirs in zip(vectors, ref.embeddings):
        assert max(abs(a - b) for a, b in zip(mine, theirs)) < 1e-5
    assert vectors[0] != vectors[1]
    # stdin, --dimensions, --json
    monkeypatch.setattr(sys, "stdin", type("S", (), {"buffer": __import__("io").BytesIO(b"hello world\n\n")})())
    rc, out, _ = _run(capsys, "embed", str(path), "--dimensions", "8", "--json", "--quant", "none")
    body = json.loads(out)
    assert rc == 0 and len(body["embeddings"]) == 1 and len(body["embeddings"][0]) == 8
    rc, _, err = _run(capsys, "embed", str(path), "x", "--dimensions", "0")
    assert rc == 1 and "--dimensions" in err and err.count("\n") == 1
