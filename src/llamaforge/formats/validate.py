"""`validate_architecture`: everything a load checks before it allocates, without loading (what `pull` runs).

Kept apart from `architecture.py`, which the format readers themselves import, so that this module can import
the readers without an import circle.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError
from .architecture import check_tensor_shapes


def validate_architecture(fmt: str, path) -> None:
    """Everything a load checks before it allocates, without loading: the config parses, its numbers are in
    range, and the tensor table (GGUF tensor infos, safetensors headers) agrees with it. ModelFormatError
    otherwise. What `pull` runs before a file enters the store."""
    path = Path(path)
    if fmt == "gguf":
        from .gguf import gguf_config, read_gguf
        gf = read_gguf(path)
        try:
            gguf_config(gf)
        finally:
            gf.close()
    elif fmt == "hf":
        from .safetensors import hf_config, hf_tensor_shapes
        config, _ = hf_config(path)
        shapes = {k: v for k, v in hf_tensor_shapes(path).items() if not k.endswith(".rotary_emb.inv_freq")}
        if config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        elif "lm_head.weight" not in shapes:
            raise ModelFormatError(path, "missing tensor 'lm_head.weight' and tie_word_embeddings is false")
        check_tensor_shapes(config, shapes, path, "hf")
    elif fmt == "meta":
        from .meta import meta_params_config
        meta_params_config(path)
