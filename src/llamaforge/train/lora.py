"""LoRA (Hu et al. 2021) as wrappers around a model's existing linear layers, and PEFT-format adapter I/O.

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A: [r, in] (Kaiming-uniform init), B: [out, r] (zeros)

Files follow Hugging Face `peft` exactly, so `PeftModel.from_pretrained` loads what we save and vice versa:
`adapter_config.json` and `adapter_model.safetensors` with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. q, k and v stay separate modules. Reading and
checking an adapter directory is `formats.peft` (the store checks adapters with the same code).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from .._fs import atomic_write_bytes
from ..errors import InvalidRequestError, ModelFormatError
from ..formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config, read_adapter_tensors
from .nf4 import NF4Linear

PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear or NF4Linear) plus a trainable low-rank update. The base stays frozen."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise InvalidRequestError(f"LoRA rank must be a positive integer, got {r!r}", field="lora_r")
        if not (0.0 <= dropout < 1.0):
            raise InvalidRequestError(f"LoRA dropout must be in [0, 1), got {dropout}", field="lora_dropout")
        self.base = base
        self.r, self.alpha = r, float(alpha)
        # rsLoRA (Kalajdzievski 2023) scales by alpha/sqrt(r); plain LoRA by alpha/r.
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.use_rslora = use_rslora
        w = base.weight
        dev = w.device
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and peft initialise A
        nn.init.zeros_(self.lora_B.weight)                             # so training starts at the base model
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        for p in base.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_base(cls, linear: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  use_rslora: bool = False) -> "LoRALinear":
        """Wrap an existing layer (kept, not copied)."""
        return cls(linear, r, alpha, dropout, use_rslora)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shaped like the base weight [out, in]."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + (self.dropout(x) @ a.t() @ b.t()) * self.scaling

    def merge(self) -> nn.Linear:
        """A plain nn.Linear equal to this layer's output (base dequantized if it was NF4)."""
        base_w = self.base.dequantized_weight(torch.float32) if isinstance(self.base, NF4Linear) \
            else self.base.weight.detach().float()
        out_dtype = self.lora_A.weight.dtype if isinstance(self.base, NF4Linear) else self.base.weight.dtype
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=base_w.device, dtype=out_dtype)
        with torch.no_grad():
            merged.weight.copy_((base_w + self.delta_weight().detach().float()).to(out_dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias.detach().to(out_dtype))
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


# ---------------------------------------------------------------------------------------------------------------
# Applying LoRA to a model

def _matches(name: str, targets) -> bool:
    # peft semantics: a string is a full-match regex; a list matches a module name or a dotted suffix.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} in the model's order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules=DEFAULT_TARGETS, *, use_rslora: bool = False, freeze_base: bool = True) -> list[str]:
    """Wrap every targeted linear layer of `model` with LoRALinear; returns the wrapped module names.

    Untargeted parameters are frozen. For QLoRA the bases are NF4Linear already (the trainer converts them).
    """
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    names = [n for n, m in model.named_modules()
             if n and isinstance(m, (nn.Linear, NF4Linear)) and not isinstance(m, LoRALinear)
             and ".lora_" not in n and not n.endswith(".base") and _matches(n, target_modules)]
    if not names:
        raise InvalidRequestError(f"no linear layer matches target modules {target_modules!r}",
                                  field="target_modules")
    if tied and "lm_head" in names:
        raise InvalidRequestError("lm_head is tied to the embeddings; LoRA on it would also change the input "
                                  "embeddings. Leave it out of the target modules.", field="target_modules")
    for n in names:
        base = model.get_submodule(n)
        _set_module(model, n, LoRALinear.from_base(base, r, alpha, dropout, use_rslora))
    return names


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model without the LoRA updates (the DPO reference model, without a second copy)."""
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns the model."""
    for name, mod in list(lora_modules(model).items()):
        _set_module(model, name, mod.merge())
    return model


# ---------------------------------------------------------------------------------------------------------------
# PEFT file format

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT key names."""
    out = {}
    for name, mod in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.detach()
    return out


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    mods = lora_modules(model)
    if not mods:
        raise InvalidRequestError("the model has no LoRA layers to save")
    first = next(iter(mods.values()))
    targets = sorted({n.rsplit(".", 1)[-1] for n in mods})
    rank_pattern = {n: m.r for n, m in mods.items() if m.r != first.r}
    alpha_pattern = {n: m.alpha for n, m in mods.items() if m.alpha != first.alpha}
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": first.use_rslora, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }


def save_adapter(model: nn.Module, out_dir, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT format) into out_dir, atomically."""
    from safetensors.torch import save
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    atomic_write_bytes(out / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    cfg = adapter_config(model, base_model)
    atomic_write_bytes(out / ADAPTER_CONFIG, (json.dumps(cfg, indent=2) + "\n").encode())
    return out


def _module_name(key: str, path) -> tuple[str, str]:
    """'base_model.model.X.lora_A[.default].weight' -> ('X', 'A')."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
    if not m:
        raise ModelFormatError(path, f"unexpected tensor {key!r} in the adapter (only LoRA A/B weights)")
    return m.group(1), m.group(2)


def load_adapter(model: nn.Module, adapter_dir, *, dropout: float | None = None) -> list[str]:
    """Wrap `model`'s layers as the adapter says and load its weights; returns the wrapped module names."""
    return load_lora_tensors(model, read_adapter_config(adapter_dir), read_adapter_tensors(adapter_dir),
                             Path(adapter_dir) / ADAPTER_WEIGHTS, dropout=dropout)


def load_lora_tensors(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], path, *,
                      dropout: float | None = None) -> list[str]:
    """load_adapter's work on an already read config and LoRA tensors (`path` names them in errors)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, which = _module_name(key, path)
        pairs.setdefault(name, {})[which] = t
    if not pairs:
        raise ModelFormatError(path, "the adapter holds no LoRA weights")
    modules = dict(model.named_modules())
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ModelFormatError(path, f"module {name!r} has lora_{'A' if 'A' in ab else 'B'} but not the other")
        mod = modules.get(name)
        if isinstance(mod, LoRALinear):
            mod = mod.base
        if not isinstance(mod, (nn.Linear, NF4Linear)):
            raise ModelFormatError(path, f"adapter targets {name!r}, which is not a linear layer of this model")
        r = _pattern(rank_pat, name, cfg["r"])
        a_shape, b_shape = (r, mod.in_features), (mod.out_features, r)
        if tuple(ab["A"].shape) != a_shape or tuple(ab["B"].shape) != b_shape:
            raise ModelFormatError(path, f"{name}: lora_A/lora_B shapes {list(ab['A'].shape)}/{list(ab['B'].shape)}"
                                         f" do not fit this model (expected {list(a_shape)}/{list(b_shape)})")
    for name, ab in pairs.items():
        cur = model.get_submodule(name)
        base = cur.base if isinstance(cur, LoRALinear) else cur
        r = _pattern(rank_pat, name, cfg["r"])
        alpha = _pattern(alpha_pat, name, cfg.get("lora_alpha", 8))
        p = cfg.get("lora_dropout", 0.0) if dropout is None else dropout
        lora = LoRALinear.from_base(base, r, alpha, p, bool(cfg.get("use_rslora", False)))
        with torch.no_grad():
            lora.lora_A.weight.copy_(ab["A"])
            lora.lora_B.weight.copy_(ab["B"])
        _set_module(model, name, lora)
    return list(pairs)


def _pattern(pattern: dict, name: str, default):
    # peft: a pattern key matches a module name exactly or as a dotted suffix.
    for k, v in pattern.items():
        if name == k or name.endswith("." + k) or re.fullmatch(rf"(.*\.)?{k}", name):
            return v
    return default


def apply_adapter(lm, adapter_dir, *, merge: bool = True):
    """Put a PEFT LoRA adapter on a loaded model (a `LoadedModel` or an nn.Module); returns it.

    merge=True folds the update into plain float weights (no inference cost); layers that are not plain
    nn.Linear (e.g. quantized) keep the LoRA wrapper instead.
    """
    model = lm if isinstance(lm, nn.Module) else lm.model
    names = load_adapter(model, adapter_dir, dropout=0.0)
    if merge:
        for name in names:
            mod = model.get_submodule(name)
            if isinstance(mod.base, nn.Linear):
                _set_module(model, name, mod.merge())
    if hasattr(lm, "metadata") and isinstance(lm.metadata, dict):
        lm.metadata["adapter"] = str(adapter_dir)
    model.eval()
    return lm
