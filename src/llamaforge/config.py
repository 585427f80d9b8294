"""Architecture configuration. Runtime choices (dtype, device, batch, context used) live elsewhere."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    rope_type:
      "llama3"  - Llama 3.1/3.2 wavelength-dependent scaling (factor, low/high_freq_factor, original context).
      "linear"  - positions divided by `factor` (equivalently all frequencies divided by it).
      "factors" - explicit per-frequency divisors, as GGUF files store them in the `rope_freqs` tensor.
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear", "factors"):
            raise ConfigError(None, f"unsupported rope scaling type {self.rope_type!r}")
        if self.rope_type == "factors" and not self.freq_factors:
            raise ConfigError(None, "rope scaling type 'factors' needs freq_factors")
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ConfigError(None, f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(None, f"rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                                    f"{self.high_freq_factor} and {self.low_freq_factor}")
        if self.freq_factors is not None and not all(f > 0 and math.isfinite(f) for f in self.freq_factors):
            raise ConfigError(None, "rope_freqs factors must be positive finite numbers")

    def to_hf(self) -> dict | None:
        if self.rope_type == "llama3":
            return {
                "rope_type": "llama3",
                "factor": self.factor,
                "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return None  # explicit factors have no HF config spelling


@dataclass(frozen=True)
class ModelConfig:
    """Llama-architecture hyper-parameters (HF `LlamaConfig` names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Informational, not architectural: which family this came from ("llama", "smollm", ...).
    name: str = field(default="llama", compare=False)

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(None, f"{f} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(None, f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                                    f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(None, f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(None, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(None, f"rope_theta must be positive, got {self.rope_theta}")
        rs = self.rope_scaling
        if rs is not None and rs.freq_factors is not None and len(rs.freq_factors) != self.head_dim // 2:
            raise ConfigError(None, f"rope_freqs has {len(rs.freq_factors)} factors, expected head_dim / 2 = "
                                    f"{self.head_dim // 2}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], path=None) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (LlamaConfig)."""
        req = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in req if k not in cfg]
        if missing:
            raise ConfigError(path, f"config.json is missing required keys: {', '.join(missing)}")
        mt = cfg.get("model_type", "llama")
        archs = cfg.get("architectures") or []
        if mt not in ("llama", "mistral") and not (isinstance(archs, list) and "LlamaForCausalLM" in archs):
            raise ConfigError(path, f"unsupported model_type {_show(mt)} (only Llama-architecture models)")
        heads = _int(cfg, "num_attention_heads", path, hi=MAX_HEADS)
        hidden = _int(cfg, "hidden_size", path)
        kv_heads = _int(cfg, "num_key_value_heads", path, default=heads, hi=MAX_HEADS)
        head_dim = _int(cfg, "head_dim", path, default=hidden // heads)
        rs = cfg.get("rope_scaling") or (cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None)
        theta_src, theta_key = cfg, "rope_theta"
        if cfg.get("rope_theta") is None and isinstance(cfg.get("rope_parameters"), dict):
            theta_src, theta_key = cfg["rope_parameters"], "rope_theta"
        try:
            return cls(
                vocab_size=_int(cfg, "vocab_size", path, hi=MAX_VOCAB),
                hidden_size=hidden,
                intermediate_size=_int(cfg, "intermediate_size", path),
                num_hidden_layers=_int(cfg, "num_hidden_layers", path, hi=MAX_LAYERS),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=_float(cfg, "rms_norm_eps", path, default=1e-6),
                rope_theta=_float(theta_src, theta_key, path, default=10000.0),
                rope_scaling=_rope_scaling_from_hf(rs, path),
                max_position_embeddings=_int(cfg, "max_position_embeddings", path, default=2048, hi=MAX_CONTEXT),
                tie_word_embeddings=_bool(cfg, "tie_word_embeddings", path),
                attention_bias=_bool(cfg, "attention_bias", path),
                mlp_bias=_bool(cfg, "mlp_bias", path),
            )
        except ConfigError as e:
            raise ConfigError(path, e.reason) from None
        except (TypeError, ValueError) as e:
            raise ConfigError(path, f"invalid value in config.json: {e}") from None

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], *, vocab_size: int | None = None,
                  freq_factors: tuple[float, ...] | None = None, path=None) -> "ModelConfig":
        """Build from GGUF key/value metadata (already decoded to Python values).

        `vocab_size` is used when `llama.vocab_size` is absent (it is optional in GGUF; the token list or the
        embedding tensor then decides). `freq_factors` are the values of a `rope_freqs.weight` tensor.
        """
        arch = meta.get("general.architecture")
        if arch is None:
            raise ConfigError(path, "GGUF metadata has no general.architecture")
        if arch != "llama":
            raise ConfigError(path, f"unsupported GGUF architecture {_show(arch)} (only 'llama')")
        p = "llama."
        req = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count")
        missing = [p + k for k in req if p + k not in meta]
        if missing:
            raise ConfigError(path, f"GGUF metadata is missing required keys: {', '.join(missing)}")
        heads = _int(meta, p + "attention.head_count", path, hi=MAX_HEADS)
        hidden = _int(meta, p + "embedding_length", path)
        if p + "vocab_size" in meta:
            vs = _int(meta, p + "vocab_size", path, hi=MAX_VOCAB)
        elif vocab_size is None:
            raise ConfigError(path, "vocabulary size unknown: no llama.vocab_size and no token list")
        else:
            vs = vocab_size
        if meta.get(p + "attention.key_length") is not None:
            head_dim = _int(meta, p + "attention.key_length", path)
        else:
            head_dim = _int(meta, p + "rope.dimension_count", path, default=hidden // heads or 1)
        scaling = None
        stype = meta.get(p + "rope.scaling.type")
        if freq_factors is not None:
            scaling = RopeScaling("factors", freq_factors=tuple(float(x) for x in freq_factors))
        elif stype == "linear":
            scaling = RopeScaling("linear", factor=_float(meta, p + "rope.scaling.factor", path, default=1.0))
        elif stype not in (None, "none"):
            raise ConfigError(path, f"unsupported rope scaling type {_show(stype)}")
        try:
            return cls(
                vocab_size=vs,
                hidden_size=hidden,
                intermediate_size=_int(meta, p + "feed_forward_length", path),
                num_hidden_layers=_int(meta, p + "block_count", path, hi=MAX_LAYERS),
                num_attention_heads=heads,
                num_key_value_heads=_int(meta, p + "attention.head_count_kv", path, default=heads, hi=MAX_HEADS),
                head_dim=head_dim,
                rms_norm_eps=_float(meta, p + "attention.layer_norm_rms_epsilon", path, default=1e-5),
                rope_theta=_float(meta, p + "rope.freq_base", path, default=10000.0),
                rope_scaling=scaling,
                max_position_embeddings=_int(meta, p + "context_length", path, hi=MAX_CONTEXT),
                tie_word_embeddings=False,  # decided by the loader: no output.weight tensor means tied
                name=str(meta.get("general.basename") or meta.get("general.name") or "llama")[:200],
            )
        except ConfigError as e:
            raise ConfigError(path, _gguf_names(e.reason)) from None

    @classmethod
    def from_meta_params(cls, params: Mapping[str, Any], *, vocab_size: int | None = None,
                         path=None) -> "ModelConfig":
        """Build from Meta's `params.json` (llama / llama-models reference code).

        FFN size follows Meta's rule: 2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of.
        """
        req = ("dim", "n_layers", "n_heads")
        missing = [k for k in req if k not in params]
        if missing:
            raise ConfigError(path, f"params.json is missing required keys: {', '.join(missing)}")
        dim = _int(params, "dim", path)
        heads = _int(params, "n_heads", path, hi=MAX_HEADS)
        vs = params.get("vocab_size", -1)
        if vs is None or (isinstance(vs, int) and not isinstance(vs, bool) and vs <= 0):
            vs = vocab_size  # -1 means "take it from the weights"
            if vs is None:
                raise ConfigError(path, "vocab_size is -1 in params.json and could not be taken from the weights")
        else:
            vs = _int(params, "vocab_size", path, hi=MAX_VOCAB)
        multiple_of = _int(params, "multiple_of", path, default=256)
        ffn = int(2 * (4 * dim) / 3)
        if params.get("ffn_dim_multiplier") is not None:
            ffn = int(_float(params, "ffn_dim_multiplier", path) * ffn)
        ffn = multiple_of * ((ffn + multiple_of - 1) // multiple_of)
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = RopeScaling(
                "llama3",
                factor=_float(params, "rope_scaling_factor", path, default=8.0),
                low_freq_factor=_float(params, "rope_low_freq_factor", path, default=1.0),
                high_freq_factor=_float(params, "rope_high_freq_factor", path, default=4.0),
                # Meta's code fixes 8192; the optional key lets our own writer round-trip other values.
                original_max_position_embeddings=_int(params, "rope_original_max_position_embeddings", path,
                                                      default=8192, hi=MAX_CONTEXT),
            )
        try:
            return cls(
                vocab_size=vs,
                hidden_size=dim,
                intermediate_size=_int(params, "hidden_dim", path, default=ffn),
                num_hidden_layers=_int(params, "n_layers", path, hi=MAX_LAYERS),
                num_attention_heads=heads,
                num_key_value_heads=_int(params, "n_kv_heads", path, default=heads, hi=MAX_HEADS),
                head_dim=dim // heads or 1,
                rms_norm_eps=_float(params, "norm_eps", path, default=1e-5),
                rope_theta=_float(params, "rope_theta", path, default=10000.0),
                rope_scaling=scaling,
                max_position_embeddings=_int(params, "max_seq_len", path, default=8192 if scaling else 4096,
                                             hi=MAX_CONTEXT),
                tie_word_embeddings=False,
            )
        except ConfigError as e:
            raise ConfigError(path, e.reason) from None

    # ------------------------------------------------------------------ export
    def to_hf_config(self) -> dict:
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        return d

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h


# Sanity ceilings, far above any released Llama-family model (Llama 3.1 405B: 126 layers, 128 heads, 128k
# context; Llama 4: 10M context). A header past them is crafted or corrupt; the tensors present decide the rest.
MAX_LAYERS = 4096
MAX_HEADS = 1 << 14
MAX_VOCAB = 1 << 23
MAX_CONTEXT = 1 << 26
MAX_DIM = 1 << 24
_REQUIRED = object()


def _show(v, limit: int = 60) -> str:
    """A short repr of a value from a file: a crafted string or array must not flood the error message."""
    r = repr(v)
    if isinstance(v, (list, tuple, dict)):
        r = f"a {type(v).__name__} of {len(v)} items"
    elif isinstance(v, str):
        r = f"the string {r}"
    return r if len(r) <= limit else r[:limit] + "..."


def _present(d: Mapping[str, Any], key: str, default, path):
    v = d.get(key) if isinstance(d, Mapping) else None
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(path, f"{key} is missing")
        return None
    return v


def _int(d: Mapping[str, Any], key: str, path, *, default=_REQUIRED, lo: int = 1, hi: int = MAX_DIM) -> int:
    """`d[key]` as an int in [lo, hi]: a bool, string, array or fractional number is a ConfigError naming the key.
    A missing or null value gives `default` (required when there is none)."""
    v = _present(d, key, default, path)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(path, f"{key} must be an integer, got {_show(v)}")
    if isinstance(v, float):
        if not v.is_integer():
            raise ConfigError(path, f"{key} must be an integer, got {_show(v)}")
        v = int(v)
    if not lo <= v <= hi:
        raise ConfigError(path, f"{key} is {_show(v)}, outside the supported range [{lo}, {hi}]")
    return v


def _float(d: Mapping[str, Any], key: str, path, *, default=_REQUIRED, label: str | None = None) -> float:
    """`d[key]` as a positive finite float; anything else is a ConfigError naming the key (or `label`)."""
    v = _present(d, key, default, path)
    key = label or key
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(path, f"{key} must be a number, got {_show(v)}")
    try:
        f = float(v)
    except OverflowError:  # an int too large for a float
        raise ConfigError(path, f"{key} is {_show(v)}, too large") from None
    if not (math.isfinite(f) and f > 0):
        raise ConfigError(path, f"{key} must be a positive finite number, got {_show(v)}")
    return f


def _bool(d: Mapping[str, Any], key: str, path) -> bool:
    v = d.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ConfigError(path, f"{key} must be true or false, got {_show(v)}")
    return v


# ModelConfig field -> GGUF key, so a check in __post_init__ names the key the file actually holds.
_GGUF_KEYS = {
    "vocab_size": "llama.vocab_size", "hidden_size": "llama.embedding_length",
    "intermediate_size": "llama.feed_forward_length", "num_hidden_layers": "llama.block_count",
    "num_attention_heads": "llama.attention.head_count", "num_key_value_heads": "llama.attention.head_count_kv",
    "head_dim": "llama.attention.key_length", "max_position_embeddings": "llama.context_length",
}


def _gguf_names(reason: str) -> str:
    for field_name, key in _GGUF_KEYS.items():
        reason = re.sub(rf"\b{field_name}\b", f"{key} ({field_name})", reason, count=1)
    return reason


def _rope_scaling_from_hf(rs, path) -> RopeScaling | None:
    if not rs:
        return None
    if not isinstance(rs, Mapping):
        raise ConfigError(path, f"rope_scaling must be an object, got {_show(rs)}")
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype in (None, "default"):
        return None
    if rtype == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in rs]
        if missing:
            raise ConfigError(path, f"rope_scaling of type llama3 is missing: {', '.join(missing)}")
        f = {k: _float(rs, k, path, label=f"rope_scaling.{k}") for k in ("factor", "low_freq_factor",
                                                                           "high_freq_factor")}
        orig = _int(rs, "original_max_position_embeddings", path, hi=MAX_CONTEXT)
        return RopeScaling("llama3", original_max_position_embeddings=orig, **f)
    if rtype == "linear":
        if "factor" not in rs:
            raise ConfigError(path, "rope_scaling of type linear is missing: factor")
        return RopeScaling("linear", factor=_float(rs, "factor", path, label="rope_scaling.factor"))
    raise ConfigError(path, f"unsupported rope_scaling type {_show(rtype)}")
