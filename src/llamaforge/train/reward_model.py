"""Reward models: a scalar head on the Llama, trained with the Bradley-Terry loss on preference pairs, saved as
an adapter + head, loaded back for scoring (pairwise accuracy, rejection sampling, GRPO).

The head is `score` = Linear(hidden, 1, bias=False) read at the last token of prompt + reply, as Hugging Face's
`LlamaForSequenceClassification` does, so a LoRA reward model is saved in PEFT's SEQ_CLS layout
(`adapter_config.json` with modules_to_save ["score"], `adapter_model.safetensors` holding the LoRA weights and
`base_model.model.score.weight`): `PeftModel.from_pretrained(LlamaForSequenceClassification...)` loads it.
A full fine-tune is saved as a Hugging Face model directory `model/` plus `reward_head.safetensors`.
Both carry `reward_model.json` (base model, layout) so `load_reward_model(DIR)` needs nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._fs import atomic_write_bytes, atomic_write_text, read_bounded, loads_json
from ..errors import InvalidRequestError, ModelFormatError
from .data import Example, collate_preference
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, adapter_config, lora_state_dict
from .strategies import PolicyStrategy, quantize_decoder_linears, save_full_model

META_FILE = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"
HEAD_KEY = "score.weight"
_MAX_META = 1 << 20


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None):
    """Pairwise reward-model loss, per pair: -log sigmoid(r(x, y_w) - r(x, y_l) - m).

    The Bradley-Terry model (Bradley & Terry 1952) as used for RLHF reward models (Ouyang et al. 2022, eq. 1);
    the optional margin m(r) is Llama 2's (Touvron et al. 2023, eq. 2): pairs rated far apart must be
    separated by more.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def add_reward_head(model: nn.Module) -> nn.Linear:
    """Attach `model.score` (hidden -> 1, no bias), initialised N(0, 0.02) like HF's classification heads."""
    p = model.model.norm.weight
    head = nn.Linear(model.config.hidden_size, 1, bias=False, device=p.device, dtype=torch.float32)
    nn.init.normal_(head.weight, std=0.02)
    model.score = head
    return head


def last_token_rewards(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scalar reward per row [B] from the head at each row's last real token (rows right-padded)."""
    h = model.hidden_states(input_ids)                                   # [B, T, C]
    last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]  # [B, C]
    return model.score(last.to(model.score.weight.dtype)).squeeze(-1).float()


class RewardStrategy(PolicyStrategy):
    """Reward model on full weights or LoRA/QLoRA: the decoder (or its adapters) and the head are trained."""

    name = "rm"
    kind = "preference"
    needs_reference = False

    def prepare(self, model: nn.Module) -> None:
        self.inner.prepare(model)
        add_reward_head(model).weight.requires_grad_(True)

    def count(self, examples: list[Example]) -> int:
        return len(examples)

    def collate(self, examples: list[Example]) -> dict:
        batch = collate_preference(examples)
        batch["lengths"] = torch.tensor([len(e.ids) for e in examples] + [len(e.rejected_ids) for e in examples])
        batch["margin"] = torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32)
        return batch

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        n = int(batch["n_pairs"])
        r = last_token_rewards(model, batch["input_ids"], batch["lengths"])
        losses = bradley_terry_loss(r[:n], r[n:], batch["margin"])
        diff = (r[:n] - r[n:]).detach()
        return losses.sum(), {"loss": losses.sum().detach(), "accuracy": (diff > 0).float().sum(),
                              "margin": diff.sum()}

    def save_final(self, model: nn.Module, out: Path, lm) -> Path:
        return save_reward_model(model, out, base_model=str(self.cfg.model) if self.cfg.model else None,
                                 method=self.cfg.method, lm=lm)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading

def save_reward_model(model: nn.Module, out, *, base_model: str | None, method: str, lm=None) -> Path:
    """Write a reward model (see the module docstring for the layout); returns `out`."""
    from safetensors.torch import save
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = model.score.weight.detach().float().contiguous().cpu()
    meta = {"format": "llamaforge-reward-model", "version": 1, "head": "score", "pooling": "last_token",
            "method": method}
    if method == "full":
        score = model.score
        del model.score  # the decoder is saved as a causal LM; the head beside it
        try:
            save_full_model(model, out / "model", lm)
        finally:
            model.score = score
        atomic_write_bytes(out / HEAD_FILE, save({HEAD_KEY: head}, metadata={"format": "pt"}))
        meta["base_model"] = "model"
    else:
        tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
        tensors[PEFT_PREFIX + HEAD_KEY] = head
        atomic_write_bytes(out / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
        cfg = adapter_config(model, base_model)
        cfg.update(task_type="SEQ_CLS", modules_to_save=["score"])
        atomic_write_text(out / ADAPTER_CONFIG, json.dumps(cfg, indent=2) + "\n")
        meta["base_model"] = base_model
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def read_reward_meta(path) -> dict:
    """reward_model.json of a reward-model directory, validated; ModelFormatError otherwise."""
    d = Path(path)
    f = d / META_FILE
    if not d.is_dir() or not f.is_file():
        raise ModelFormatError(d, f"not a reward model directory ({META_FILE} is missing; train one with "
                                  "`llamaforge finetune rm`)")
    try:
        meta = loads_json(read_bounded(f, _MAX_META).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f, f"not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "llamaforge-reward-model" or meta.get("version") != 1:
        raise ModelFormatError(f, "not a version-1 llamaforge reward model description")
    if meta.get("method") not in ("full", "lora", "qlora"):
        raise ModelFormatError(f, f"unknown method {meta.get('method')!r}")
    return meta


class RewardModel:
    """A loaded reward model: `score(prompt, completion)` and batched `score_ids`, plus `pairwise_accuracy`.

    lm: the LoadedModel (decoder with its adapter merged, head as `lm.model.score`); chat_format: how prompt
    and completion become tokens (the base model's own format by default).
    """

    def __init__(self, lm, chat_format=None, batch_size: int = 8):
        self.lm, self.model = lm, lm.model
        self.batch_size = batch_size
        if chat_format is None:
            from ..tokenizer.chat import chat_format_for
            if lm.tokenizer is None:
                raise InvalidRequestError("the reward model's base has no tokenizer; pass a chat format")
            chat_format = chat_format_for(lm.tokenizer)
        self.chat_format = chat_format

    def encode(self, prompt, completion: str) -> list[int]:
        """Token ids of a prompt (a string or messages) followed by the assistant's completion."""
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids, _ = self.chat_format.encode_with_mask(msgs + [{"role": "assistant", "content": completion}])
        return [int(i) for i in ids]

    @torch.no_grad()
    def score_ids(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Rewards [N] for token-id rows, in micro-batches of batch_size."""
        self.model.eval()
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = [list(r) for r in rows[i:i + self.batch_size]]
            T = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, r in enumerate(chunk):
                ids[b, :len(r)] = torch.tensor(r)
            lengths = torch.tensor([len(r) for r in chunk])
            out.append(last_token_rewards(self.model, ids.to(dev), lengths).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompt, completion: str) -> float:
        return float(self.score_ids([self.encode(prompt, completion)])[0])

    def pairwise_accuracy(self, examples: Sequence[Example]) -> dict:
        """Preference examples -> {"pairs", "accuracy" (chosen scored higher), "ties", "mean_margin"}."""
        if not examples:
            raise InvalidRequestError("no preference pairs to score", field="data")
        r = self.score_ids([e.ids for e in examples] + [e.rejected_ids for e in examples])
        n = len(examples)
        diff = r[:n] - r[n:]
        return {"pairs": n, "accuracy": float((diff > 0).float().mean()), "ties": int((diff == 0).sum()),
                "mean_margin": float(diff.mean())}


def _dequantize_nf4(model: nn.Module) -> None:
    """Replace NF4 layers (a QLoRA base's untargeted layers) by plain Linear layers with the same weights."""
    from .nf4 import NF4Linear
    for name, mod in list(model.named_modules()):
        if isinstance(mod, NF4Linear):
            w = mod.dequantized_weight(torch.float32)
            lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.detach().float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)


def load_reward_model(path, *, base=None, base_lm=None, chat_format=None) -> RewardModel:
    """Load a reward model written by `finetune rm`.

    base: the base model (store name or path) when it differs from the one recorded in reward_model.json
    (e.g. the model file moved); base_lm: an already loaded base to put the adapter and head on (its weights
    are changed in place).
    """
    from .lora import load_lora_tensors, merge_lora, read_adapter_config, read_adapter_tensors
    from .base_model import load_base_model
    d = Path(path)
    meta = read_reward_meta(d)
    if meta["method"] == "full":
        lm = base_lm if base_lm is not None else load_base_model(str(d / meta["base_model"]))
        from safetensors.torch import load_file
        f = d / HEAD_FILE
        if not f.is_file():
            raise ModelFormatError(d, f"{HEAD_FILE} is missing")
        head = load_file(str(f)).get(HEAD_KEY)
    else:
        cfg = read_adapter_config(d, modules_to_save=("score",))
        tensors = read_adapter_tensors(d)
        head = tensors.pop(PEFT_PREFIX + HEAD_KEY, None)
        if base_lm is not None:
            lm = base_lm
        else:
            spec = base or meta.get("base_model")
            if not spec:
                raise InvalidRequestError(f"{d}: the base model is not recorded; name it (--base)", field="base")
            lm = load_base_model(spec)
        if meta["method"] == "qlora":
            # Trained against an NF4 base: score against the same weights (NF4, then dequantized below).
            quantize_decoder_linears(lm.model)
        load_lora_tensors(lm.model, cfg, tensors, d / ADAPTER_WEIGHTS, dropout=0.0)
        merge_lora(lm.model)  # dense weights: scoring costs what the base model costs
        _dequantize_nf4(lm.model)
    C = lm.config.hidden_size
    if head is None or tuple(head.shape) != (1, C):
        raise ModelFormatError(d, f"the reward head must be a [1, {C}] tensor named {HEAD_KEY}, got "
                                  f"{None if head is None else list(head.shape)}")
    if not torch.isfinite(head).all():
        raise ModelFormatError(d, "the reward head holds non-finite values")
    add_reward_head(lm.model)
    with torch.no_grad():
        lm.model.score.weight.copy_(head)
    lm.model.eval()
    return RewardModel(lm, chat_format)

