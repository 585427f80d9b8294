"""TrainConfig: every fine-tuning knob in one validated dataclass, loadable from YAML or TOML."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import InvalidRequestError

METHODS = ("full", "lora", "qlora")
TASKS = ("sft", "dpo")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Fine-tuning settings. `task` sft|dpo, `method` full|lora|qlora (DPO uses full or LoRA the same way)."""

    model: str = ""                 # store name or path (GGUF file, HF dir, Meta dir)
    data: str = ""                  # JSON/JSONL training file
    out: str = ""                   # output directory (adapter or model, checkpoints, metrics, plot)
    task: str = "sft"
    method: str = "lora"
    epochs: float = 1.0             # ignored when max_steps is set
    max_steps: int | None = None
    lr: float = 2e-4
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0      # 0 disables clipping
    batch_size: int = 4             # per process, per micro-batch
    grad_accum: int = 1
    max_seq_len: int = 1024
    packing: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dpo_beta: float = 0.1
    seed: int = 0
    eval_split: float = 0.0         # fraction (<1) or count (>=1) of examples held out
    eval_every: int | None = None   # steps; default: at the end only
    save_every: int | None = None   # steps between checkpoints; None = only the final save
    keep_checkpoints: int = 2
    resume: bool = False
    skip_bad: bool = False
    gradient_checkpointing: bool = False
    precision: str = "auto"         # auto = bf16 autocast on CUDA with bf16 support, else fp32
    log_every: int = 1
    device: str = "auto"

    def validate(self, required=("model", "data", "out")) -> "TrainConfig":
        """Raise InvalidRequestError(field=...) for the first invalid setting; returns self."""
        def bad(f, why):
            raise InvalidRequestError(f"{f}: {why}", field=f)

        for f in required:
            if not getattr(self, f):
                bad(f, "is required")
        if self.task not in TASKS:
            bad("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.method not in METHODS:
            bad("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for f in ("batch_size", "grad_accum", "max_seq_len", "lora_r", "log_every", "keep_checkpoints"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, f"must be a positive integer, got {v!r}")
        for f in ("max_steps", "save_every", "eval_every"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                bad(f, f"must be a positive integer, got {v!r}")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        for f in ("lr", "epochs", "lora_alpha", "dpo_beta"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(f, f"must be a positive number, got {v!r}")
        for f in ("min_lr_ratio", "lora_dropout"):
            v = getattr(self, f)
            if not (0.0 <= v <= 1.0) or (f == "lora_dropout" and v == 1.0):
                bad(f, f"must be in [0, 1), got {v!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.eval_split < 0:
            bad("weight_decay/max_grad_norm/eval_split", "must be >= 0")
        if not self.target_modules:
            bad("target_modules", "must name at least one module")
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in d.items():
            key = str(k).replace("-", "_")
            if key not in names:
                raise InvalidRequestError(f"{source}: unknown setting {k!r}", field=key)
            if key == "target_modules" and isinstance(v, str):
                v = [t.strip() for t in v.split(",") if t.strip()]
            if key == "adam_betas":
                v = tuple(v)
            kw[key] = v
        try:
            return cls(**kw)
        except TypeError as e:
            raise InvalidRequestError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path) -> dict:
        """Read a YAML (.yaml/.yml) or TOML (.toml) file into a settings dict (validated by from_dict)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"cannot read config {path}: {e}", field="config") from None
        try:
            if path.suffix == ".toml":
                import tomllib
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml
                data = yaml.safe_load(text)
            else:
                raise InvalidRequestError(f"config {path}: use a .yaml, .yml or .toml file", field="config")
        except InvalidRequestError:
            raise
        except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError carry the position
            raise InvalidRequestError(f"config {path}: {e}", field="config") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InvalidRequestError(f"config {path}: expected a mapping of settings", field="config")
        return data

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d
