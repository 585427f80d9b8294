"""PEFT LoRA adapter directories: the one validator (`check_adapter_dir`) and readers, shared by the store
(`create --adapter`) and training (`train.lora.load_adapter`).

An adapter is `adapter_config.json` (a LORA config Hugging Face `peft` writes) + `adapter_model.safetensors`
(keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). Pickled `adapter_model.bin`
files are refused, never unpickled. Checking a directory reads only the config: no torch import.
"""
from __future__ import annotations

from pathlib import Path

from .._fs import read_bounded, loads_json
from ..errors import LlamaforgeError, ModelFormatError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20


def read_adapter_config(adapter_dir, *, modules_to_save: tuple[str, ...] = ()) -> dict:
    """The validated `adapter_config.json` of an adapter directory; ModelFormatError says what is wrong.
    modules_to_save: whole modules the caller loads itself (a reward model's `score` head); any other is refused."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ModelFormatError(d, "not a LoRA adapter directory (not a directory)")
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelFormatError(d, f"not a LoRA adapter directory: {ADAPTER_CONFIG} is missing")
    try:
        cfg = loads_json(read_bounded(path, MAX_CONFIG_BYTES, ADAPTER_CONFIG))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(path, f"not valid JSON: {e}") from None
    except LlamaforgeError as e:  # unreadable, or larger than any adapter config
        raise ModelFormatError(path, str(e)) from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(path, "expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelFormatError(path, f"unsupported adapter type {cfg.get('peft_type')!r} (only LORA)")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise ModelFormatError(path, f"unsupported adapter option {key}={bad}")
    saved = cfg.get("modules_to_save") or []
    if cfg.get("bias", "none") != "none" or not isinstance(saved, list) or set(map(str, saved)) - set(modules_to_save):
        raise ModelFormatError(path, "adapters that train biases or save whole modules are not supported"
                               + (f" (other than {', '.join(modules_to_save)})" if modules_to_save else ""))
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)):
        raise ModelFormatError(path, f"invalid rank r={r!r} or lora_alpha={alpha!r}")
    return cfg


def _weights_file(adapter_dir) -> Path:
    d = Path(adapter_dir)
    st = d / ADAPTER_WEIGHTS
    if not st.is_file():
        if (d / "adapter_model.bin").is_file():
            raise ModelFormatError(d / "adapter_model.bin", "pickled adapters are not loaded (unsafe); convert to "
                                                            "safetensors")
        raise ModelFormatError(d, f"{ADAPTER_WEIGHTS} is missing")
    return st


def check_adapter_dir(adapter_dir) -> dict:
    """A usable PEFT LoRA adapter directory: valid config and a safetensors weights file. Returns the config."""
    cfg = read_adapter_config(adapter_dir)
    _weights_file(adapter_dir)
    return cfg


def read_adapter_tensors(adapter_dir) -> dict:
    """The adapter's tensors by PEFT key (torch tensors, read with safetensors: no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    st = _weights_file(adapter_dir)
    try:
        return load_file(str(st))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFormatError(st, f"unreadable safetensors file: {e}") from None
