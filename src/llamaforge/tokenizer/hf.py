"""Hugging Face `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`) backend.

The `tokenizers` library runs normalizer, pre-tokenizer and model. Added tokens are taken out of its hands:
special ones become control tokens matched only with allow_special=True, the others are always matched (as
the library would). BOS/EOS come from tokenizer_config.json, falling back to the post-processor template.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import LlamaforgeError, TokenizerError
from .bytelevel import piece_to_bytes
from .common import FragmentTokenizer
from .._fs import loads_json, read_bounded

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
MAX_JSON_BYTES = 256 << 20


def _read_json(path: Path, required: bool = True) -> dict | None:
    if not path.exists():
        if required:
            raise TokenizerError(f"{path}: no such file")
        return None
    try:
        raw = read_bounded(path, MAX_JSON_BYTES, f"{path.name} (a tokenizer file)")
        data = loads_json(raw.decode("utf-8-sig"))
    except LlamaforgeError as e:
        raise TokenizerError(f"{path}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _walk(node: Any, type_name: str):
    """Yield every sub-config of a normalizer/decoder/post-processor tree with the given "type"."""
    if isinstance(node, dict):
        if node.get("type") == type_name:
            yield node
        for v in node.values():
            yield from _walk(v, type_name)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, type_name)


def _chat_template(cfg: dict) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


class HFTokenizer(FragmentTokenizer):
    """A tokenizer.json model; see the module docstring."""

    def __init__(self, spec: dict, config: dict | None = None, generation_config: dict | None = None,
                 source: str = "tokenizer.json"):
        from tokenizers import Tokenizer as LibTokenizer

        config = config or {}
        self.source = source
        model = spec.get("model")
        if not isinstance(model, dict) or "vocab" not in model:
            raise TokenizerError(f"{source}: no model vocabulary")
        added = spec.get("added_tokens") or []
        if not isinstance(added, list):
            raise TokenizerError(f"{source}: added_tokens must be a list")
        control: dict[str, int] = {}
        always: dict[str, int] = {}
        for a in added:
            if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not isinstance(a.get("id"), int):
                raise TokenizerError(f"{source}: malformed added token {a!r}"[:200])
            (control if a.get("special") else always)[a["content"]] = a["id"]
        lib_spec = dict(spec, added_tokens=[], post_processor=None)
        try:
            self._tk = LibTokenizer.from_str(json.dumps(lib_spec))
        except Exception as e:  # the library raises bare Exception on malformed specs
            raise TokenizerError(f"{source}: invalid tokenizer.json: {e}") from None
        vocab = self._tk.get_vocab(with_added_tokens=False)
        if not vocab:
            raise TokenizerError(f"{source}: the model vocabulary is empty")
        size = max([*vocab.values(), *control.values(), *always.values()]) + 1
        pieces: list[str | None] = [None] * size
        for piece, i in vocab.items():
            pieces[i] = piece
        for piece, i in {**always, **control}.items():
            pieces[i] = piece
        table = self._byte_table(spec, pieces, set(control.values()), set(always.values()))
        bos_text = _token_text(config.get("bos_token"))
        eos_text = _token_text(config.get("eos_token"))
        ids_by_text = {**{p: i for i, p in enumerate(pieces) if p is not None}, **always, **control}
        bos_id = ids_by_text.get(bos_text) if bos_text else None
        eos_id = ids_by_text.get(eos_text) if eos_text else None
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = self._template_adds_bos(spec.get("post_processor"), bos_text)
        eot = set()
        gen_eos = (generation_config or {}).get("eos_token_id")
        for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
            if isinstance(i, int) and 0 <= i < size and i != eos_id:
                eot.add(i)
        from .common import EOT_NAMES
        eot |= {control[n] for n in EOT_NAMES if n in control}
        self._setup(token_bytes=table, control=control, always=always, bos_id=bos_id, eos_id=eos_id,
                    add_bos=bool(add_bos), add_eos=bool(config.get("add_eos_token", False)),
                    chat_template=_chat_template(config), eot_ids=eot)

    def _byte_table(self, spec, pieces, control_ids, always_ids) -> list[bytes]:
        decoder = spec.get("decoder")
        byte_level = any(True for _ in _walk(decoder, "ByteLevel"))
        metaspace = any(True for _ in _walk(decoder, "Metaspace")) or any(
            d.get("content") == " " and (d.get("pattern") or {}).get("String") == "\u2581"
            for d in _walk(decoder, "Replace"))
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        strip = [d for d in _walk(decoder, "Strip") if d.get("content") == " " and d.get("start", 0) >= 1]
        self.strip_leading_space = bool(strip) or any(
            d.get("prepend_scheme", "always" if d.get("add_prefix_space", True) else "never") != "never"
            for d in _walk(decoder, "Metaspace"))
        table = []
        for i, p in enumerate(pieces):
            if p is None or i in control_ids:
                table.append(b"")
            elif i in always_ids:
                table.append(p.encode("utf-8"))
            elif byte_level:
                table.append(piece_to_bytes(p))
            elif metaspace:
                m = _BYTE_PIECE.fullmatch(p) if byte_fallback else None
                table.append(bytes([int(m.group(1), 16)]) if m else p.replace("\u2581", " ").encode("utf-8"))
            else:
                table.append(self._tk.decode([i], skip_special_tokens=False).encode("utf-8"))
        return table

    @staticmethod
    def _template_adds_bos(post, bos_text) -> bool:
        if not bos_text:
            return False
        for tp in _walk(post, "TemplateProcessing"):
            single = tp.get("single") or []
            if single and isinstance(single[0], dict) and (single[0].get("SpecialToken") or {}).get("id") == bos_text:
                return True
        return False

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        path = Path(path)
        spec = _read_json(path)
        config = _read_json(path.parent / "tokenizer_config.json", required=False)
        gen = _read_json(path.parent / "generation_config.json", required=False)
        return cls(spec, config, gen, source=str(path))

    def _encode_fragment(self, text: str, prefix: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids
