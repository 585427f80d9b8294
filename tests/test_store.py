"""Model store: names, resolve, built-in smollm2, crash safety (SIGKILL mid-copy), digest checks, disk full."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llamaforge
from llamaforge import store as store_mod
from llamaforge.errors import ModelNotFoundError, StoreError
from llamaforge.store import Store, parse_name

from conftest import make_tiny_hf

ROOT = Path(__file__).resolve().parent.parent


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def tiny_gguf(path: Path, seed: int = 0, variant: str = "llama32") -> Path:
    """A small random llama GGUF (float32, no vocabulary) written by the formats writer."""
    from llamaforge.config import ModelConfig
    from llamaforge.formats.gguf_write import write_gguf
    m = make_tiny_hf(variant, seed=seed)
    cfg = ModelConfig.from_hf_config(m.config.to_dict())
    write_gguf(path, cfg, m.state_dict(), file_type="f32")
    return path


def tiny_hf_dir(path: Path, seed: int = 0, variant: str = "llama31"):
    m = make_tiny_hf(variant, seed=seed)
    m.save_pretrained(path)
    return m


def _files_under(p: Path) -> set[str]:
    return {str(x.relative_to(p)) for x in p.rglob("*")} if p.exists() else set()


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".partial"))]


# ------------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("bad", [
    "../evil", "../../etc/passwd", "a/../../b", "/abs/path", "/etc/passwd", "a\x00b", "evil\\..\\x", "a\\b",
    "x" * 129, "a" * 65, "ns/" + "m" * 65, "m:" + "t" * 65, "", ".", "..", "a/b/c", "a:b:c", "-lead", ".hidden",
    "sp ace", "ns/:tag", "model:", "ümlaut",
])
def test_invalid_names_rejected_before_touching_disk(bad, tmp_path):
    root = tmp_path / "home"
    src = tiny_gguf(tmp_path / "m.gguf")
    before = _files_under(tmp_path)
    s = Store(root)
    with pytest.raises(StoreError, match="invalid model name"):
        parse_name(bad)
    for op in (lambda: s.pull(src, bad), lambda: s.create(bad, "smollm2"), lambda: s.copy("smollm2", bad),
               lambda: s.remove(bad)):
        with pytest.raises(StoreError):
            op()
    # Nothing written anywhere: not in the store, not next to it.
    assert _files_under(tmp_path) == before
    assert not root.exists()


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=140))
def test_any_accepted_name_stays_inside_the_store(name):
    s = Store("/nonexistent-store-root")
    try:
        n = parse_name(name)
    except StoreError:
        return
    p = s._manifest_path(n).resolve()   # noqa: SLF001 - the path check is the point
    assert p.is_relative_to(Path("/nonexistent-store-root/manifests").resolve())
    assert len(p.relative_to(Path("/nonexistent-store-root/manifests").resolve()).parts) == 3
    assert parse_name(str(n)) == n


def test_name_defaults_and_case():
    assert str(parse_name("Llama3")) == "llama3:latest"
    assert str(parse_name("library/llama3:8b")) == "llama3:8b"
    assert str(parse_name("me/my-model_1.0:q4_1")) == "me/my-model_1.0:q4_1"
    assert parse_name("smollm2").short == "smollm2"


# ------------------------------------------------------------------------------------------------------ resolve
def test_builtin_smollm2_resolves_to_package_file_without_copy(smollm2_gguf):
    s = Store()
    r = s.resolve("smollm2")
    assert r.path == smollm2_gguf and r.builtin and r.name == "smollm2:latest"
    assert r.defaults == {"system": None, "options": {}, "template": None, "adapter": None}
    assert store_mod.resolve("smollm2:latest").path == smollm2_gguf
    rows = {e.name: e for e in s.list()}
    assert rows["smollm2:latest"].builtin and rows["smollm2:latest"].size == smollm2_gguf.stat().st_size
    # Derived models point at the same file: no copy of the 98 MB appears in the store.
    s.create("terse", "smollm2", system="Answer in five words.")
    s.copy("terse", "terse2")
    assert s.resolve("terse2").path == smollm2_gguf
    blobs = s.blobs
    assert not blobs.exists() or not any(blobs.iterdir())
    with pytest.raises(StoreError, match="built in"):
        s.remove("smollm2")


def test_unknown_model_suggests_close_matches(tmp_path):
    s = Store()
    s.pull(tiny_gguf(tmp_path / "t.gguf"), "tinyllama")
    with pytest.raises(ModelNotFoundError) as ei:
        s.resolve("tinylama")
    assert "tinyllama" in ei.value.suggestions
    assert "llamaforge list" in str(ei.value)
    with pytest.raises(ModelNotFoundError) as ei:
        llamaforge.load("smolm2")
    assert ei.value.suggestions == ["smollm2"]
    with pytest.raises(ModelNotFoundError):
        s.resolve("./no/such/file.gguf")


def test_existing_path_resolves_to_itself(tmp_path):
    p = tiny_gguf(tmp_path / "x.gguf")
    r = store_mod.resolve(str(p))
    assert r.path == p and r.name is None and r.defaults["options"] == {}


# ------------------------------------------------------------------------------------------------------ pull
def test_pull_gguf_is_content_addressed_and_loads(tmp_path):
    src = tiny_gguf(tmp_path / "Tiny-Model.Q8.gguf")
    s = Store()
    name = s.pull(src)
    assert name == "tiny-model.q8:latest"
    r = s.resolve("tiny-model.q8")
    assert r.path.parent == s.blobs and r.path.name == f"sha256-{_sha(src)}"
    assert r.path.read_bytes() == src.read_bytes()
    # Same content under another name shares the blob.
    s.pull(src, "again")
    assert len(list(s.blobs.iterdir())) == 1
    m = llamaforge.load("again")
    assert m.name == "again:latest"
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = make_tiny_hf("llama32")(ids).logits
    torch.testing.assert_close(m.model(ids), ref, atol=1e-5, rtol=1e-5)
    # Removing one name keeps the shared blob; removing the last one frees it.
    s.remove("again")
    assert r.path.exists()
    s.remove("tiny-model.q8")
    assert not r.path.exists()


def test_pull_hf_directory_as_tree_of_blobs(tmp_path):
    src = tmp_path / "hfmodel"
    ref_model = tiny_hf_dir(src)
    (src / "pytorch_model.bin").write_bytes(b"pickles are never taken")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    s = Store()
    s.pull(src, "me/tiny-hf:v1")
    r = s.resolve("me/tiny-hf:v1")
    assert r.path.parent == s.trees and r.path.is_dir()
    names = sorted(p.name for p in r.path.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert all((r.path / n).is_symlink() for n in names)
    m = llamaforge.load("me/tiny-hf:v1")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(m.model(ids), ref_model(ids).logits, atol=1e-5, rtol=1e-5)
    # The view is rebuilt if deleted (it is derived data) and survives a move of the whole store.
    import shutil
    shutil.rmtree(r.path)
    assert s.resolve("me/tiny-hf:v1").path.is_dir()
    moved = tmp_path / "moved-home"
    shutil.move(str(s.root), moved)
    r2 = Store(moved).resolve("me/tiny-hf:v1")
    assert (r2.path / "config.json").read_text() == (src / "config.json").read_text()
    Store(moved).remove("me/tiny-hf:v1")
    assert not any((moved / "blobs").iterdir()) and not any((moved / "trees").iterdir())


def test_pull_rejects_non_models(tmp_path, vocab_dir):
    s = Store()
    with pytest.raises(StoreError, match="unsupported architecture 'gpt2'"):
        s.pull(vocab_dir / "ggml-vocab-gpt-2.gguf", "gpt2")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a GGUF"):
        s.pull(tmp_path / "notes.txt", "notes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a model directory"):
        s.pull(tmp_path / "empty", "empty")
    with pytest.raises(StoreError, match="no such file"):
        s.pull(str(tmp_path / "missing.gguf"), "missing")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(llamaforge.ModelFormatError):
        s.pull(bad, "bad")
    assert s.names() == ["smollm2:latest"]


def test_pull_hf_repo_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = Store()
    with pytest.raises(StoreError) as ei:
        s.pull("someone/some-model")
    msg = str(ei.value)
    assert "someone/some-model" in msg and "\n" not in msg
    assert s.names() == ["smollm2:latest"]
    assert not [p for p in s.root.glob(".download*")]


# ------------------------------------------------------------------------------------------------------ digests
def test_digest_mismatch_deletes_blob_and_writes_no_manifest(tmp_path):
    src = tiny_gguf(tmp_path / "t.gguf")
    s = Store()
    with pytest.raises(StoreError, match="digest mismatch"):
        s.pull(src, "checked", digest="sha256:" + "0" * 64)
    assert not s._manifest_path(parse_name("checked")).exists()   # noqa: SLF001
    assert list(s.blobs.iterdir()) == []
    assert s.names() == ["smollm2:latest"]
    # The right digest (with or without the prefix) is accepted.
    s.pull(src, "checked", digest=_sha(src))
    assert s.resolve("checked").path.name == f"sha256-{_sha(src)}"
    with pytest.raises(StoreError):
        s.pull(src, "x", digest="sha256:not-hex")


def test_verify_deletes_corrupt_blob(tmp_path):
    s = Store()
    s.pull(tiny_gguf(tmp_path / "t.gguf"), "t")
    s.verify("t")
    blob = s.resolve("t").path
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        s.verify("t")
    assert not blob.exists()
    with pytest.raises(StoreError, match="missing"):
        s.resolve("t")


# ------------------------------------------------------------------------------------------------------ crashes
_KILL_SCRIPT = """
import sys, time
import llamaforge.store as st
st.CHUNK = 1 << 20
st.Store().pull(sys.argv[1], "big", progress=lambda n: time.sleep(0.05))
"""


def test_sigkill_mid_copy_leaves_no_model_and_no_temp_file(smollm2_gguf, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(smollm2_gguf)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    blobs = Path(os.environ["LLAMAFORGE_HOME"]) / "blobs"
    deadline = time.time() + 60
    partial = None
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list(blobs.glob(".*.partial")) if blobs.exists() else []
            if found and found[0].stat().st_size >= 8 << 20:
                partial = found[0]
                break
            time.sleep(0.02)
        assert partial is not None, f"copy never got going: {proc.communicate(timeout=5)}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert partial.exists() and partial.stat().st_size < smollm2_gguf.stat().st_size  # killed halfway
    s = Store()   # the next start cleans up after the dead writer
    assert not partial.exists() and _temp_files(s.root) == []
    assert "big:latest" not in s.names()
    assert [e.name for e in s.list()] == ["smollm2:latest"]
    with pytest.raises(ModelNotFoundError):
        s.resolve("big")


def test_cleanup_keeps_temp_files_of_live_writers(tmp_path):
    s = Store(tmp_path / "home")
    s.blobs.mkdir(parents=True)
    mine = s.blobs / f".sha256.{os.getpid()}.0123abcd.partial"
    dead = s.blobs / ".sha256.999999999.0123abcd.partial"
    other = s.blobs / "unrelated.partial"
    for p in (mine, dead, other):
        p.write_bytes(b"x")
    dead_download = s.root / ".download.999999999.abc"
    (dead_download / "sub").mkdir(parents=True)
    live_download = s.root / f".download.{os.getpid()}.abc"
    live_download.mkdir()
    Store(s.root)
    assert mine.exists() and other.exists() and not dead.exists()
    assert live_download.exists() and not dead_download.exists()


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_copy_keeps_previous_version(tmp_path, monkeypatch):
    s = Store()
    v1, v2 = tiny_gguf(tmp_path / "v1.gguf", seed=1), tiny_gguf(tmp_path / "v2.gguf", seed=2)
    s.pull(v1, "m")
    before = s._manifest_path(parse_name("m")).read_bytes()   # noqa: SLF001
    monkeypatch.setattr(os, "write", _enospc)
    with pytest.raises(StoreError, match="no space left on device") as ei:
        s.pull(v2, "m")
    assert "\n" not in str(ei.value)
    monkeypatch.undo()
    assert s._manifest_path(parse_name("m")).read_bytes() == before   # noqa: SLF001
    assert _sha(s.resolve("m").path) == _sha(v1)
    assert _temp_files(s.root) == []
    assert [p.name for p in s.blobs.iterdir()] == [f"sha256-{_sha(v1)}"]


def test_disk_full_during_manifest_write_keeps_previous_version(tmp_path, monkeypatch):
    s = Store()
    v1, v2 = tiny_gguf(tmp_path / "v1.gguf", seed=1), tiny_gguf(tmp_path / "v2.gguf", seed=2)
    s.pull(v1, "m")
    s.create("m", "m", system="old system")
    real_import = Store.import_file

    def import_then_fill_disk(self, *a, **k):
        out = real_import(self, *a, **k)
        monkeypatch.setattr(os, "write", _enospc)   # the disk fills up right after the blob
        return out

    monkeypatch.setattr(Store, "import_file", import_then_fill_disk)
    with pytest.raises(StoreError, match="manifest.*no space left"):
        s.pull(v2, "m")
    with pytest.raises(StoreError, match="no space left"):
        s.create("m", "m", system="new system")
    monkeypatch.undo()
    r = s.resolve("m")
    assert _sha(r.path) == _sha(v1) and r.defaults["system"] == "old system"
    assert _temp_files(s.root) == []


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    s = Store()
    s.pull(tiny_gguf(tmp_path / "t.gguf"), "t")
    p = s._manifest_path(parse_name("t"))   # noqa: SLF001
    p.write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        s.resolve("t")
    assert {e.name: e.id for e in s.list()}["t:latest"] == "(corrupt)"   # visible, so it can be removed
    # A manifest that tries to point outside the store is refused.
    p.write_text(json.dumps({"schema_version": 1, "format": "hf", "files": [
        {"path": "../../../etc/passwd", "digest": "sha256:" + "0" * 64, "size": 1}]}))
    with pytest.raises(StoreError, match="bad file path"):
        s.resolve("t")
    # Wrong types anywhere are a clear error too, never a traceback (and never hide other models).
    for bad in ({"weights": "x"}, {"weights": {"digest": "sha256:" + "0" * 64, "size": "big"}},
                {"files": [{"digest": "sha256:" + "0" * 64, "size": 1}]}, {"external": {"path": 3}},
                {"weights": {"digest": "sha256:" + "0" * 64, "size": 1}, "defaults": {"options": []}},
                {"weights": {"digest": "sha256:" + "0" * 64, "size": 1}, "defaults": {"adapter": {"files": 1}}},
                {"weights": {"digest": "sha256:" + "0" * 64, "size": 1}, "files": []}, {}):
        p.write_text(json.dumps({"schema_version": 1, **bad}))
        with pytest.raises(StoreError, match="corrupt"):
            s.resolve("t")
        assert {e.name: e.id for e in s.list()}["t:latest"] == "(corrupt)"
        assert s.prune() == 0
    s.remove("t")
    assert "t:latest" not in s.names()


# ------------------------------------------------------------------------------------------------------ create
def test_create_sets_defaults_and_load_sees_them(tmp_path):
    s = Store()
    s.pull(tiny_gguf(tmp_path / "t.gguf"), "base")
    tmpl = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    s.create("pirate", "base", system="Talk like a pirate.",
             options=store_mod.params_to_options(["temperature=0.3", "top_k=20", "stop=Arr", "stop=</s>",
                                                  "num_predict=64", "seed=7"]),
             template=tmpl)
    m = llamaforge.load("pirate")
    assert m.defaults["system"] == "Talk like a pirate."
    assert m.defaults["options"] == {"temperature": 0.3, "top_k": 20, "stop": ["Arr", "</s>"], "max_tokens": 64,
                                     "seed": 7}
    assert m.defaults["template"] == tmpl and m.defaults["adapter"] is None
    # A model created from a created model inherits, then overrides.
    s.create("pirate2", "pirate", options={"temperature": 0.9})
    d = s.resolve("pirate2").defaults
    assert d["system"] == "Talk like a pirate." and d["options"]["temperature"] == 0.9 and d["options"]["top_k"] == 20
    assert s.resolve("pirate2").path == s.resolve("base").path
    # cp keeps the id (same weights and defaults), rm of the source leaves the copy working.
    s.copy("pirate", "me/pirate:copy")
    ids = {e.name: e.id for e in s.list()}
    assert ids["me/pirate:copy"] == ids["pirate:latest"] != ids["base:latest"]
    s.remove("pirate")
    assert llamaforge.load("me/pirate:copy").defaults["system"] == "Talk like a pirate."
    # --from a file copies it in (content-addressed: the same blob as "base").
    s.create("from-file", str(tmp_path / "t.gguf"), system="From a file.")
    assert s.resolve("from-file").path == s.resolve("base").path


@pytest.mark.parametrize("params, match", [
    (["temperature=-1"], "temperature"), (["temperature=nan"], "temperature"), (["top_p=1.5"], "top_p"),
    (["num_predict=0"], "num_predict must be"), (["bogus=1"], "unknown parameter"), (["top_k=abc"], "top_k"),
    (["noequals"], "KEY=VALUE"),
])
def test_create_rejects_bad_params(params, match):
    s = Store()
    with pytest.raises(StoreError, match=match):
        s.create("x", "smollm2", options=store_mod.params_to_options(params))
    assert s.names() == ["smollm2:latest"]


def test_create_rejects_bad_template_and_adapter(tmp_path):
    s = Store()
    with pytest.raises(StoreError, match="not valid Jinja"):
        s.create("x", "smollm2", template="{% for %}")
    with pytest.raises(StoreError, match="adapter_config.json"):
        s.create("x", "smollm2", adapter=tmp_path)
    with pytest.raises(ModelNotFoundError):
        s.create("x", "no-such-base")
    assert s.names() == ["smollm2:latest"]


def test_create_with_adapter_stores_it_in_blobs(tmp_path):
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                        "target_modules": ["q_proj"]}))
    (ad / "adapter_model.safetensors").write_bytes(b"weights bytes")
    s = Store()
    s.create("with-adapter", "smollm2", adapter=ad)
    r = s.resolve("with-adapter")
    adir = Path(r.defaults["adapter"])
    assert adir.is_relative_to(s.trees)
    assert (adir / "adapter_config.json").read_bytes() == (ad / "adapter_config.json").read_bytes()
    assert {e.name: e.size for e in s.list()}["with-adapter:latest"] > r.path.stat().st_size
    s.remove("with-adapter")
    assert not any(s.blobs.iterdir())


def test_created_adapter_is_applied_by_load(tmp_path):
    """`create --adapter` + `llamaforge.load` gives the logits of PEFT's own adapted model."""
    from peft import LoraConfig, get_peft_model
    base = tiny_hf_dir(tmp_path / "base", variant="llama31")
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    s = Store()
    s.pull(tmp_path / "base", "base")
    s.create("tuned", "base", adapter=tmp_path / "adapter")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        want = peft_model(ids).logits
        plain = llamaforge.load("base").model(ids)
        got = llamaforge.load("tuned").model(ids)
    assert (plain - want).abs().max() > 1e-3       # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_disk_full_mid_directory_removes_the_files_it_added(tmp_path, monkeypatch):
    src = tmp_path / "hf"
    tiny_hf_dir(src)
    s = Store()
    real_write = os.write
    calls = {"n": 0}

    def fill_up(fd, data):
        calls["n"] += 1
        if calls["n"] > 2:   # the first file or two fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", fill_up)
    with pytest.raises(StoreError, match="no space left"):
        s.pull(src, "hf")
    monkeypatch.undo()
    assert calls["n"] > 2 and list(s.blobs.iterdir()) == [] and s.names() == ["smollm2:latest"]


def test_pull_hf_repo_success_path(tmp_path, monkeypatch):
    """The repo-id path around `snapshot_download` (faked: no network here): files land in blobs, the download
    directory is removed, the name comes from the repo."""
    import huggingface_hub
    src = tmp_path / "repo"
    ref_model = tiny_hf_dir(src)
    seen = {}

    def fake_snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None, **kw):
        import fnmatch
        import shutil
        seen.update(repo_id=repo_id, revision=revision, local_dir=Path(local_dir), patterns=allow_patterns)
        for f in src.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, Path(local_dir) / f.name)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    s = Store()
    name = s.pull("SomeOrg/Tiny-Llama-3.1", revision="main")
    assert name == "tiny-llama-3.1:latest" and seen["repo_id"] == "SomeOrg/Tiny-Llama-3.1"
    assert "*.safetensors" in seen["patterns"] and not any(p.endswith(".bin") for p in seen["patterns"])
    assert not seen["local_dir"].exists()
    assert s.manifest("tiny-llama-3.1")["source"] == "hf://SomeOrg/Tiny-Llama-3.1@main"
    ids = torch.tensor([[2, 4, 6, 8]])
    with torch.no_grad():
        torch.testing.assert_close(llamaforge.load("tiny-llama-3.1").model(ids), ref_model(ids).logits,
                                   atol=1e-5, rtol=1e-5)
