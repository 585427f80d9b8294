"""Public Python API: `load()` and the `LoadedModel` it returns.

The format loaders (`formats.load.load_model`) return the plain `formats.loaded.LoadedModel`; this floor wraps it
with what a user calls: generation (`generate/stream/chat`, the request seam in `llamaforge.generate`), adapters
(`apply_adapter`) and the compiled decode step (`attach_compiled`).
"""
from __future__ import annotations

import dataclasses

import torch

from .formats.loaded import LoadedModel as _LoadedModel


class LoadedModel(_LoadedModel):
    """A model ready to use: `config`, `model` (the nn.Module), `tokenizer`, `path`, `name`, `metadata` (format
    facts: file type / quantization, license, template...), `defaults` (from a store manifest: system prompt,
    parameters, template, adapter) and `compiled` (the AOT-compiled decode step, when attached)."""

    @classmethod
    def wrap(cls, loaded: _LoadedModel) -> "LoadedModel":
        """The same model (no copy) as the public class."""
        if isinstance(loaded, cls):
            return loaded
        return cls(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(_LoadedModel)})

    # generate / stream / chat are implemented in llamaforge.generate (see there).
    def generate(self, prompt, **sampling):
        from .generate.api import generate
        return generate(self, prompt, **sampling)

    def stream(self, prompt, **sampling):
        from .generate.api import stream
        return stream(self, prompt, **sampling)

    def chat(self, messages, *, stream: bool = False, **sampling):
        from .generate.api import chat
        return chat(self, messages, stream=stream, **sampling)

    def apply_adapter(self, adapter_dir, *, merge: bool = True) -> "LoadedModel":
        """Put a PEFT LoRA adapter on this model (`train.lora.apply_adapter`); returns self."""
        from .train.lora import apply_adapter
        apply_adapter(self, adapter_dir, merge=merge)
        return self

    def attach_compiled(self, build_missing: bool | str = "background"):
        """Give this model its compiled decode step (`generate.compiled.attach`); returns it or None."""
        from .generate.compiled import attach
        return attach(self, build_missing=build_missing)


def load(path_or_name, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         quant: str | None = None, compile: bool | str = "auto", threads: int | None = None,
         **kwargs) -> LoadedModel:
    """Load by store name (e.g. "smollm2") or path (GGUF file, HF directory, Meta checkpoint directory).

    dtype: activation/weight dtype for dequantized weights (default float32 on CPU).
    quant: in-memory weight format for the fast path (see llamaforge.model.quant), None = the default.
    compile: the AOT-compiled decode step (llamaforge.generate.compiled) for quantized CPU models: "auto" uses a
        cached one and otherwise builds it in a background process for next time; True builds it now if missing
        (30-120 s); False never uses it. LLAMAFORGE_COMPILE=0 turns it off.
    threads: CPU threads for this process (PyTorch's thread count is process-wide); None uses the model's stored
        `num_thread` parameter if it has one, else keeps the current count, lowered to the usable cores
        (`llamaforge.threads`). Set before the compiled step is chosen: its code is built per thread count.
    """
    from .formats.load import load_model
    from .store import Resolved, resolve
    # A store.Resolved (what the server resolved by name) is used as is; anything else is resolved here.
    ref = path_or_name if isinstance(path_or_name, Resolved) else resolve(path_or_name)
    _set_threads(threads, ref)
    adapter = (ref.defaults or {}).get("adapter")
    repack = None
    if quant is None and dtype is None:
        # The fast in-memory format for this file (model.quant.default_quant). A store model with an adapter is
        # loaded dense, the adapter merged in float32, then packed again into that same format (below).
        quant = "auto"
        if adapter:
            quant, repack = None, "auto"
    lm = LoadedModel.wrap(load_model(ref.path, dtype=dtype, device=device, quant=quant, **kwargs))
    lm.name = ref.name
    lm.defaults = dict(ref.defaults or {})
    if adapter:
        # A store model created with `--adapter`: a PEFT LoRA adapter directory applied on top of the base.
        lm.apply_adapter(adapter)
        if repack is not None:
            _repack(lm, device)
    if compile and (lm.metadata.get("quant") or "none") != "none":
        lm.attach_compiled(build_missing=True if compile is True else "background")
    return lm


def _repack(lm, device) -> None:
    """Merged adapter -> the base file's fast format (int4 groups of 32 for Q4_0/Q4_1 files, int8 rows for other
    quantized files): the fine-tuned model keeps the packed base's speed and its compiled step (the weights are
    the step's inputs, so it shares the base's artifact). Measured in bench/NOTES.md (fine-tuned fast path)."""
    from .formats.repack import repack_merged
    from .model.quant import resolve_quant
    target = resolve_quant("auto", None, device, lm.metadata.get("file_type"))
    if target not in ("q4", "int8"):
        return
    repack_merged(lm.model, target, device=device)
    lm.metadata["quant"] = getattr(lm.model, "_quant", target)
    lm.metadata["repacked_after_adapter"] = True


def _set_threads(threads, ref) -> None:
    from .threads import apply_threads, limit_to_usable_cores, parse_threads
    stored = ((ref.defaults or {}).get("options") or {}).get("num_thread")
    if threads is not None:
        apply_threads(parse_threads(threads))
    elif stored is not None:
        apply_threads(parse_threads(stored, "num_thread"))
    else:
        limit_to_usable_cores()


# Features above the seam's floor register their stages here, so every front end (all above this module) runs them.
from .generate.pipeline import register as _register_stage  # noqa: E402
from .rag.grounding import RetrievalStage as _RetrievalStage  # noqa: E402

_register_stage(_RetrievalStage())
from .safety.stages import register_stages as _register_safety_stages  # noqa: E402
_register_safety_stages(_register_stage)  # guard_input, code_shield, guard_output, injection filter (issue 15)
