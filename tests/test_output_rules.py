"""Outputs of `convert` and `finetune` (issue 19 item 6): files and directories get the permissions the umask
gives, as any Unix tool's output does (not mkstemp's 0600/0700), and an --out whose parent directory does not
exist is refused with one clear line before any work, creating nothing."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from llamaforge.cli.main import main
from test_store import tiny_gguf
from test_train_cli import ENV, _cmd, hf_dir, pretok  # noqa: F401  (module fixtures)


def _modes(root: Path) -> set[tuple[str, int]]:
    """{("d" | "f", permission bits)} of root and everything under it."""
    out = {("d" if root.is_dir() else "f", root.stat().st_mode & 0o777)}
    if root.is_dir():
        for p in root.rglob("*"):
            out.add(("d" if p.is_dir() else "f", p.stat().st_mode & 0o777))
    return out


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o027, 0o002])
def test_convert_outputs_honour_the_umask(tmp_path, umask, mask):
    src = tiny_gguf(tmp_path / "t.gguf")
    umask(mask)
    assert main(["convert", str(src), "--to", "gguf", "--out", str(tmp_path / "o.gguf"), "--type", "f32"]) == 0
    assert main(["convert", str(src), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert _modes(tmp_path / "o.gguf") == {("f", 0o666 & ~mask)}
    assert _modes(tmp_path / "hf") == {("d", 0o777 & ~mask), ("f", 0o666 & ~mask)}


@pytest.mark.parametrize("to, name", [("gguf", "x.gguf"), ("hf", "x")])
def test_convert_into_a_missing_directory_is_refused(tmp_path, capsys, to, name):
    src = tiny_gguf(tmp_path / "t.gguf")
    out = tmp_path / "missing" / "dir" / name
    assert main(["convert", str(src), "--to", to, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and err.count("\n") == 1
    assert f"{tmp_path / 'missing' / 'dir'} does not exist" in err
    assert not (tmp_path / "missing").exists()
    # The check comes before the model is even looked up: a missing model still gets the directory error.
    assert main(["convert", "no-such-model", "--to", to, "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_finetune_and_merge_outputs_honour_the_umask(tmp_path, hf_dir, pretok):  # noqa: F811
    def run(*args):
        r = subprocess.run(_cmd(*args), env=ENV, capture_output=True, text=True, timeout=300,
                           preexec_fn=lambda: os.umask(0o027))
        assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "run"
    run("sft", "--model", hf_dir, "--data", pretok, "--out", out, "--max-steps", 2, "--save-every", 1)
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoints").is_dir()
    run("merge", "--model", hf_dir, "--adapter", out, "--out", tmp_path / "merged")
    run("merge", "--model", hf_dir, "--adapter", out, "--out", tmp_path / "merged.gguf", "--gguf-type", "f32")
    full = tmp_path / "full"
    run("sft", "--model", hf_dir, "--data", pretok, "--out", full, "--max-steps", 1, "--method", "full")
    assert (full / "model" / "config.json").is_file()
    for p in (out, tmp_path / "merged", full):
        assert _modes(p) == {("d", 0o750), ("f", 0o640)}, p
    assert _modes(tmp_path / "merged.gguf") == {("f", 0o640)}


def test_merge_into_a_missing_directory_is_refused_before_loading(tmp_path, hf_dir):  # noqa: F811
    r = subprocess.run(_cmd("merge", "--model", hf_dir, "--adapter", tmp_path / "no-adapter", "--out",
                            tmp_path / "missing" / "m.gguf"), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "missing").exists()
