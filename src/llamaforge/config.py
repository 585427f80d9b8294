"""Architecture configuration. Runtime choices (dtype, device, batch, context used) live elsewhere."""
from __future__ import annotations

import dataclasses
import math
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

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], path=None) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (LlamaConfig)."""
        req = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in req if k not in cfg]
        if missing:
            raise ConfigError(path, f"config.json is missing required keys: {', '.join(missing)}")
        mt = cfg.get("model_type", "llama")
        if mt not in ("llama", "mistral") and "LlamaForCausalLM" not in (cfg.get("architectures") or []):
            raise ConfigError(path, f"unsupported model_type {mt!r} (only Llama-architecture models)")
        heads = _int(cfg, "num_attention_heads", path)
        hidden = _int(cfg, "hidden_size", path)
        head_dim = cfg.get("head_dim") or (hidden // heads)
        rs = cfg.get("rope_scaling") or (cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None)
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
            rope_theta = cfg["rope_parameters"].get("rope_theta")
        try:
            return cls(
                vocab_size=_int(cfg, "vocab_size", path),
                hidden_size=hidden,
                intermediate_size=_int(cfg, "intermediate_size", path),
                num_hidden_layers=_int(cfg, "num_hidden_layers", path),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=_rope_scaling_from_hf(rs, path),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
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
            raise ConfigError(path, f"unsupported GGUF architecture {arch!r} (only 'llama')")
        p = "llama."
        req = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count")
        missing = [p + k for k in req if p + k not in meta]
        if missing:
            raise ConfigError(path, f"GGUF metadata is missing required keys: {', '.join(missing)}")
        heads = _int(meta, p + "attention.head_count", path)
        hidden = _int(meta, p + "embedding_length", path)
        vs = meta.get(p + "vocab_size", vocab_size)
        if vs is None:
            raise ConfigError(path, "vocabulary size unknown: no llama.vocab_size and no token list")
        head_dim = meta.get(p + "attention.key_length") or meta.get(p + "rope.dimension_count") or hidden // heads
        scaling = None
        stype = meta.get(p + "rope.scaling.type")
        if freq_factors is not None:
            scaling = RopeScaling("factors", freq_factors=tuple(float(x) for x in freq_factors))
        elif stype == "linear":
            scaling = RopeScaling("linear", factor=float(meta.get(p + "rope.scaling.factor", 1.0)))
        elif stype not in (None, "none"):
            raise ConfigError(path, f"unsupported rope scaling type {stype!r}")
        try:
            return cls(
                vocab_size=int(vs),
                hidden_size=hidden,
                intermediate_size=_int(meta, p + "feed_forward_length", path),
                num_hidden_layers=_int(meta, p + "block_count", path),
                num_attention_heads=heads,
                num_key_value_heads=int(meta.get(p + "attention.head_count_kv", heads)),
                head_dim=int(head_dim),
                rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                max_position_embeddings=_int(meta, p + "context_length", path),
                tie_word_embeddings=False,  # decided by the loader: no output.weight tensor means tied
                name=str(meta.get("general.basename") or meta.get("general.name") or "llama"),
            )
        except ConfigError as e:
            raise ConfigError(path, e.reason) from None

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
        heads = _int(params, "n_heads", path)
        vs = params.get("vocab_size", -1)
        if vs is None or int(vs) <= 0:
            vs = vocab_size
        if vs is None:
            raise ConfigError(path, "vocab_size is -1 in params.json and could not be taken from the weights")
        multiple_of = int(params.get("multiple_of", 256))
        ffn = int(2 * (4 * dim) / 3)
        if params.get("ffn_dim_multiplier") is not None:
            ffn = int(float(params["ffn_dim_multiplier"]) * ffn)
        ffn = multiple_of * ((ffn + multiple_of - 1) // multiple_of)
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = RopeScaling(
                "llama3",
                factor=float(params.get("rope_scaling_factor") or 8.0),
                low_freq_factor=float(params.get("rope_low_freq_factor") or 1.0),
                high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
                # Meta's code fixes 8192; the optional key lets our own writer round-trip other values.
                original_max_position_embeddings=int(params.get("rope_original_max_position_embeddings") or 8192),
            )
        return cls(
            vocab_size=int(vs),
            hidden_size=dim,
            intermediate_size=int(params.get("hidden_dim") or ffn),
            num_hidden_layers=_int(params, "n_layers", path),
            num_attention_heads=heads,
            num_key_value_heads=int(params.get("n_kv_heads") or heads),
            head_dim=dim // heads,
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(params.get("max_seq_len", 8192 if scaling else 4096)),
            tie_word_embeddings=False,
        )

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


def _int(d: Mapping[str, Any], key: str, path) -> int:
    v = d.get(key)
    try:
        iv = int(v)
    except (TypeError, ValueError):
        raise ConfigError(path, f"{key} must be an integer, got {v!r}") from None
    if iv != v and not isinstance(v, (int, float)):
        raise ConfigError(path, f"{key} must be an integer, got {v!r}")
    return iv


def _rope_scaling_from_hf(rs, path) -> RopeScaling | None:
    if not rs:
        return None
    if not isinstance(rs, Mapping):
        raise ConfigError(path, f"rope_scaling must be an object, got {rs!r}")
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype in (None, "default"):
        return None
    if rtype == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in rs]
        if missing:
            raise ConfigError(path, f"rope_scaling of type llama3 is missing: {', '.join(missing)}")
        return RopeScaling("llama3", factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                           high_freq_factor=float(rs["high_freq_factor"]),
                           original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
    if rtype == "linear":
        if "factor" not in rs:
            raise ConfigError(path, "rope_scaling of type linear is missing: factor")
        return RopeScaling("linear", factor=float(rs["factor"]))
    raise ConfigError(path, f"unsupported rope_scaling type {rtype!r}")
