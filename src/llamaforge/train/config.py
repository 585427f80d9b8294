"""TrainConfig: every fine-tuning knob in one validated dataclass, loadable from YAML or TOML."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import InvalidRequestError, LlamaforgeError
from .._fs import read_text_bounded

MAX_CONFIG_FILE_BYTES = 1 << 20   # a training config is a page of YAML/TOML

METHODS = ("full", "lora", "qlora")
TASKS = ("sft", "dpo", "rm", "kto", "orpo", "rs", "grpo")
ONLINE_TASKS = ("rs", "grpo")  # generate their own training data from prompts
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Fine-tuning settings. `task` sft|dpo|rm|kto|orpo|rs|grpo, `method` full|lora|qlora.

    sft: supervised. dpo/kto/orpo: preference optimisation. rm: a reward model (scalar head, Bradley-Terry).
    rs: rejection-sampling fine-tuning. grpo: group relative policy optimisation. rs and grpo read prompts
    (`data`) and score sampled completions with `reward` (see train/rewards.py: a reward-model directory,
    `regex:PATTERN`, `json-schema:FILE`, `exact`, or a Python file defining `reward(prompt, completion)`).
    """

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
    kto_beta: float = 0.1           # KTO's beta (Ethayarajh et al. 2024)
    kto_desirable_weight: float = 1.0    # lambda_D
    kto_undesirable_weight: float = 1.0  # lambda_U
    orpo_lambda: float = 0.1        # weight of the odds-ratio term (Hong et al. 2024)
    reward: str = ""                # rs/grpo: how completions are scored (train/rewards.py)
    group_size: int = 8             # rs: K samples per prompt; grpo: G completions per prompt (>= 2)
    max_new_tokens: int = 64        # rs/grpo: completion length limit
    temperature: float = 1.0        # rs/grpo sampling temperature (top-k/top-p off: the policy's own law)
    grpo_beta: float = 0.04         # KL coefficient to the reference (adapter disabled); 0 = no KL term
    grpo_epsilon: float = 0.2       # clip range of the policy ratio
    rs_rounds: int = 2              # rs: sample -> score -> keep -> SFT rounds
    rs_threshold: float | None = None    # rs: keep the best sample only if its reward is >= this
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
        for f in ("batch_size", "grad_accum", "max_seq_len", "lora_r", "log_every", "keep_checkpoints",
                  "group_size", "max_new_tokens", "rs_rounds"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, f"must be a positive integer, got {v!r}")
        for f in ("max_steps", "save_every", "eval_every"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                bad(f, f"must be a positive integer, got {v!r}")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        for f in ("lr", "epochs", "lora_alpha", "dpo_beta", "kto_beta", "orpo_lambda", "temperature",
                  "grpo_epsilon"):
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
        for f in ("kto_desirable_weight", "kto_undesirable_weight", "grpo_beta"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f, f"must be a number >= 0, got {v!r}")
        if self.rs_threshold is not None and (isinstance(self.rs_threshold, bool) or not isinstance(
                self.rs_threshold, (int, float)) or not math.isfinite(self.rs_threshold)):
            bad("rs_threshold", f"must be a finite number, got {self.rs_threshold!r}")
        if self.task in ONLINE_TASKS:
            if not isinstance(self.reward, str) or not self.reward.strip():
                bad("reward", f"is required for {self.task} (a reward model directory, regex:PATTERN, "
                              "json-schema:FILE, exact, or a Python file defining reward(prompt, completion))")
            if self.task == "grpo" and self.group_size < 2:
                bad("group_size", f"must be at least 2 for grpo: advantages are relative to the group, and a "
                                  f"group of {self.group_size} has none")
        if self.packing and self.task not in ("sft", "rs"):
            bad("packing", f"packs SFT examples (sft, and rs's SFT rounds); {self.task} trains on whole examples")
        if self.task == "kto" and self.batch_size < 2:
            bad("batch_size", "must be at least 2 for kto: the KL reference point is estimated from mismatched "
                              "prompt/completion pairs within a micro-batch")
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
            text = read_text_bounded(path, MAX_CONFIG_FILE_BYTES, "config")
        except LlamaforgeError as e:
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
