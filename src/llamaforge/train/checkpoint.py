"""Training checkpoints: written to a temporary directory, manifest last, then renamed into place.

A checkpoint directory `checkpoints/step-000120/` is complete iff its `manifest.json` exists and every file it
lists has the recorded size and sha256. A kill at any moment leaves either a complete checkpoint or a
`.step-*.tmp-*` directory, which `latest_checkpoint` ignores and the next save removes.
Nothing is pickled: tensors are safetensors, everything else JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import LlamaforgeError
from .._fs import fsync_dir as _fsync_dir, loads_json

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(LlamaforgeError):
    """A checkpoint cannot be used to resume (corrupt, or from a different run configuration)."""


def _write(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(root, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int | None = None) -> Path:
    """Write `tensors` (file stem -> {name: tensor}) and `state` (JSON) as checkpoint `step` under root."""
    from safetensors.torch import save
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp-*"):  # leftovers of a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    files = {}
    for stem, tdict in tensors.items():
        data = save({k: v.detach().contiguous().cpu() for k, v in tdict.items()}, metadata={"format": "pt"})
        files[f"{stem}.safetensors"] = _write(tmp / f"{stem}.safetensors", data)
    files["state.json"] = _write(tmp / "state.json", json.dumps(state).encode())
    _write(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1).encode())  # last: marks complete
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # re-saving a step after a resume: the old copy is equivalent
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root) -> list[Path]:
    """Checkpoint directories that have a manifest, oldest first (contents not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> dict:
    """The manifest if every listed file is present with the right size and hash; else CheckpointError."""
    try:
        manifest = loads_json((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    for fname, info in files.items():
        f = path / fname
        if not f.is_file() or f.stat().st_size != info["size"]:
            raise CheckpointError(f"{path}: {fname} is missing or truncated")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != info["sha256"]:
            raise CheckpointError(f"{path}: {fname} does not match its checksum")
    return manifest


def latest_checkpoint(root) -> Path | None:
    """The newest complete, intact checkpoint; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    return None


def load_checkpoint(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors by file stem, state dict) of a verified checkpoint."""
    from safetensors.torch import load_file
    path = Path(path)
    manifest = verify_checkpoint(path)
    tensors = {f[:-len(".safetensors")]: load_file(str(path / f)) for f in manifest["files"]
               if f.endswith(".safetensors")}
    state = loads_json((path / "state.json").read_text())
    return tensors, state


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and RNG state <-> tensors + JSON

def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
