"""Check a file's tensors against its architecture numbers before anything is allocated.

A header states the architecture (layer count, widths, heads); the tensor table states what the file holds. A
crafted header (`llama.block_count = 3000000` over a 14 MB file) must be refused here, by comparing the two,
rather than by building three million layers first. Every loader (GGUF float and packed, HF, Meta) and `pull`
call `check_tensor_shapes` with the names and shapes they found; nothing in this module allocates more than the
tensor table it is given.
"""
from __future__ import annotations

import re
from typing import Mapping

from ..config import ModelConfig
from ..errors import ModelFormatError

_LAYER = re.compile(r"model\.layers\.(\d+)\.")

# The layer-count key of each source format, so the error names what the file says.
LAYER_KEYS = {"gguf": "llama.block_count", "hf": "num_hidden_layers", "meta": "n_layers"}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{HF parameter name: shape} of `Llama(config)`, computed from the numbers alone (no module is built)."""
    C, I, V, D = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
    per_layer = {
        "input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
        "self_attn.q_proj.weight": (q, C), "self_attn.k_proj.weight": (kv, C),
        "self_attn.v_proj.weight": (kv, C), "self_attn.o_proj.weight": (C, q),
        "mlp.gate_proj.weight": (I, C), "mlp.up_proj.weight": (I, C), "mlp.down_proj.weight": (C, I),
    }
    if config.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (C,)})
    if config.mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": (I,), "mlp.up_proj.bias": (I,), "mlp.down_proj.bias": (C,)})
    for i in range(config.num_hidden_layers):
        for k, shape in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = shape
    shapes["model.norm.weight"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def check_layer_count(config: ModelConfig, names, path, source: str = "hf") -> None:
    """The layer count the header states must be the number of layers whose tensors are present.

    Runs in time linear in the tensor table, whatever the header claims."""
    layers = set()
    for n in names:
        m = _LAYER.match(n)
        if m:
            layers.add(int(m.group(1)))
    found = max(layers) + 1 if layers else 0
    key = LAYER_KEYS.get(source, "num_hidden_layers")
    if found != config.num_hidden_layers:
        raise ModelFormatError(path, f"{key} is {config.num_hidden_layers} but the file holds tensors for "
                                     f"{found} layers")
    if len(layers) != found:
        gap = min(set(range(found)) - layers)
        raise ModelFormatError(path, f"the file has no tensors for layer {gap} of {found}")


def check_tensor_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], path,
                        source: str = "hf") -> None:
    """Every tensor the architecture needs is present with its shape, and nothing else is: ModelFormatError
    naming the tensor, the expected and the actual shape. `shapes` maps HF names to shapes; a tied copy of the
    embedding (`lm_head.weight` with tied embeddings) is allowed."""
    check_layer_count(config, shapes, path, source)
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(path, f"missing tensor {missing[0]!r}, expected shape {list(expected[missing[0]])}"
                                     f"{more}")
    for k, shape in shapes.items():
        if k not in expected:
            if k == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise ModelFormatError(path, f"unexpected tensor {k!r} with shape {list(shape)} for this architecture")
        if tuple(shape) != expected[k]:
            raise ModelFormatError(path, f"tensor {k!r} has shape {list(shape)}, expected {list(expected[k])}")

