"""Background builds of the compiled decode step are not silent (issue 19 item 4): one line when a build starts,
`compiled.builds()` lists the running ones (for `llamaforge ps`), and `llamaforge compile` shows progress.
The build itself is faked here (tests/test_aot.py builds and checks real artifacts)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import llamaforge
from llamaforge.cli import compile as compile_cli
from llamaforge.generate import compiled


@pytest.fixture
def fake_builds(monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_COMPILE", "1")
    started = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            started.append(cmd)
            self.pid = os.getpid()  # alive, so the lock and the listing stay valid

    monkeypatch.setattr(compiled.subprocess, "Popen", FakePopen)
    return started


def test_a_background_build_is_announced_once_and_listed(smollm2_gguf, fake_builds, capsys):
    import torch
    assert compiled.builds() == []
    lm = llamaforge.load(str(smollm2_gguf))
    err = capsys.readouterr().err
    assert lm.compiled is None and len(fake_builds) == 1
    lines = [line for line in err.splitlines() if "compiled decode step" in line]
    assert len(lines) == 1, err
    assert f"({torch.get_num_threads()} threads)" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert "llamaforge ps" in lines[0] and "LLAMAFORGE_COMPILE=0" in lines[0]
    [b] = compiled.builds()
    cmd = fake_builds[0]
    assert b["state"] == "building" and b["pid"] == os.getpid()
    assert b["artifact"] == cmd[cmd.index("--out") + 1]
    assert int(cmd[cmd.index("--threads") + 1]) == torch.get_num_threads()
    # A second process (or load) waiting on the same build says nothing more and starts nothing.
    llamaforge.load(str(smollm2_gguf))
    assert "compiled decode step" not in capsys.readouterr().err and len(fake_builds) == 1
    # A build whose process died is not listed (and its lock is ignored).
    from llamaforge.store import pid_alive
    dead = next(p for p in range(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1, 1, -1) if not pid_alive(p))
    Path(b["artifact"]).with_suffix(".lock").write_text(str(dead))
    assert compiled.builds() == []


def test_a_failed_build_releases_its_lock_and_is_listed_as_failed(tmp_path, capsys):
    out = Path(os.environ["LLAMAFORGE_HOME"]) / "compiled" / "decode-x.pt2"
    out.parent.mkdir(parents=True)
    lock = out.with_suffix(".lock")
    lock.write_text(str(os.getpid()))
    assert [b["state"] for b in compiled.builds()] == ["building"]
    rc = compile_cli.main(["--build-step", str(tmp_path / "missing.gguf"), "--out", str(out), "--lock", str(lock)])
    assert rc == 1 and "error:" in capsys.readouterr().err
    assert not lock.exists() and compiled.failed_marker(out).exists()
    assert [b["state"] for b in compiled.builds()] == ["failed"]   # listed by `llamaforge ps` for a day


def test_compile_progress_line_without_a_terminal(capsys):
    with compile_cli._Progress("compiling the decode step for m (2 threads)"):
        pass
    assert capsys.readouterr().err == "compiling the decode step for m (2 threads) ...\n"
