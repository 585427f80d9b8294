"""The store never follows a link planted inside it, and a bare name on the CLI means the store model even when
a file of that name sits in the current directory (issue 17, smaller items)."""
from __future__ import annotations

import logging
import os

import pytest

from hostile_support import write_llama_gguf
from llamaforge.errors import StoreError
from llamaforge.store import Store


@pytest.fixture()
def store(tmp_path):
    s = Store()
    s.pull(write_llama_gguf(tmp_path / "m.gguf"), "good")
    return s


def _outside(tmp_path):
    out = tmp_path / "outside"
    out.mkdir()
    (out / "latest.json").write_text('{"format": "gguf", "weights": {"digest": "sha256:' + "0" * 64 + '"}}')
    (out / "precious.txt").write_text("keep me")
    return out


@pytest.mark.parametrize("level", ["model", "namespace"])
def test_rm_and_cp_refuse_links_planted_in_the_manifests(store, tmp_path, level):
    out = _outside(tmp_path)
    if level == "model":
        os.symlink(out, store.manifests / "library" / "evil")
    else:
        (out / "evil").mkdir()
        (out / "evil" / "latest.json").write_text((out / "latest.json").read_text())
        os.symlink(out, store.manifests / "planted")
    name = "evil" if level == "model" else "planted/evil"
    with pytest.raises(StoreError, match="symbolic link"):
        store.remove(name)
    with pytest.raises(StoreError, match="symbolic link"):
        store.copy("good", name)
    with pytest.raises(StoreError, match="symbolic link"):
        store.resolve(name)
    assert (out / "latest.json").exists() and (out / "precious.txt").read_text() == "keep me"
    assert not any("evil" in n for n in store.names())
    store.remove("good")  # pruning with the link in place touches nothing outside
    assert (out / "latest.json").exists() and (out / "precious.txt").read_text() == "keep me"


def test_prune_removes_planted_blob_and_tree_links_not_their_targets(store, tmp_path):
    out = _outside(tmp_path)
    os.symlink(out / "precious.txt", store.blobs / ("sha256-" + "1" * 64))
    store.trees.mkdir(exist_ok=True)
    os.symlink(out, store.trees / ("2" * 64))
    store.prune()
    assert (out / "precious.txt").read_text() == "keep me" and (out / "latest.json").exists()
    assert not (store.blobs / ("sha256-" + "1" * 64)).is_symlink()
    assert not (store.trees / ("2" * 64)).is_symlink()


def test_a_file_named_like_a_store_model_does_not_shadow_it(store, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    write_llama_gguf(tmp_path / "good", {"llama.context_length": (32, "UINT32")})  # a GGUF without the suffix
    with caplog.at_level(logging.WARNING, logger="llamaforge.store"):
        r = store.resolve("good")
    assert r.name == "good:latest" and r.path != tmp_path / "good"
    assert "./good" in caplog.text                      # says which was used, and how to get the other
    assert store.resolve("./good").path.resolve() == (tmp_path / "good").resolve()
    assert store.resolve("m.gguf").name is None         # not a store model: the file, as before


@pytest.mark.parametrize("to", ["gguf", "hf"])
def test_convert_on_a_full_disk_is_one_line_and_keeps_the_old_output(tmp_path, monkeypatch, capsys, to):
    import errno

    import gguf
    import safetensors.torch
    from llamaforge.cli.main import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    src = write_llama_gguf(tmp_path / "m.gguf")
    out = tmp_path / ("out.gguf" if to == "gguf" else "out_hf")
    assert main(["convert", str(src), "--to", to, "--out", str(out), "--type", "f32"]) == 0
    before = sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir()))
    capsys.readouterr()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    rc = main(["convert", str(src), "--to", to, "--out", str(out), "--type", "f32", "--force"])
    err = capsys.readouterr().err
    assert rc != 0 and "no space left on device" in err and "Traceback" not in err
    after = sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir()))
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary leftovers
