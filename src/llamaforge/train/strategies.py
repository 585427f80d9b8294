"""What differs between training methods: preparing the model, the loss, and the final save.

Here: full SFT, LoRA/QLoRA SFT, DPO and the shared base of the policy strategies; KTO and ORPO live in
preference.py, the reward model in reward_model.py, GRPO in grpo.py (rejection sampling: rejection.py).
The trainer normalises every loss by a count over the whole global batch (target tokens for SFT, pairs for
DPO), so gradient accumulation and data parallelism give the gradient of one big batch.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE, Example, block_causal_mask, collate_preference, collate_sft
from .lora import adapters_disabled, apply_lora, lora_modules, save_adapter
from .nf4 import NF4Linear


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """Direct Preference Optimization, sigmoid loss (Rafailov et al. 2023, eq. 7), per pair.

        loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

    Inputs are summed completion log-probabilities [N]. Returns (losses [N], chosen rewards [N],
    rejected rewards [N]) with reward = beta * (log pi - log ref).
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def target_logits(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                  position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None):
    """(logits [N, V] at the N positions that have a label, those labels [N], their row index [N]).

    The vocabulary projection is the costliest single matmul for small models with large vocabularies, and
    only the labelled positions need it (assistant tokens are a small part of a chat example).
    Packed rows pass position_ids and doc_ids (data.collate): each document attends only to itself.
    """
    keep = labels != IGNORE                                  # [B, T]
    mask = block_causal_mask(doc_ids) if doc_ids is not None else None
    h = model.hidden_states(input_ids, position_ids=position_ids, attn_mask=mask)  # [B, T, C]
    rows = keep.nonzero()[:, 0]
    return model.lm_head(h[keep]).float(), labels[keep], rows


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over the positions whose label is not IGNORE, per row: [B]."""
    logits, tgt, rows = target_logits(model, input_ids, labels)
    picked = torch.log_softmax(logits, dim=-1).gather(-1, tgt[:, None]).squeeze(-1)  # [N]
    return torch.zeros(input_ids.shape[0], device=picked.device, dtype=picked.dtype).index_add(0, rows, picked)


def quantize_decoder_linears(model: nn.Module) -> int:
    """QLoRA base: every linear layer inside the decoder blocks stored in NF4 (embeddings/lm_head stay)."""
    n = 0
    for name, mod in list(model.named_modules()):
        if ".layers." in f".{name}" and isinstance(mod, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear.from_linear(mod))
            n += 1
    return n


class SkipStep(Exception):
    """Raised by a strategy's collate when this step cannot be trained on (a reward function raised or returned
    NaN); the trainer skips the optimizer step, counts the reason and goes on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Strategy:
    """Base: SFT with every parameter trained (full fine-tuning).

    Hooks the trainer calls, in order: attach(lm, chat_format, examples) once the data is read; prepare(model);
    then per step count(batch), collate(micro) (may raise SkipStep), loss_sum(model, batch) and
    step_metrics(mean stats); evaluate(model, held_out) may replace the default held-out loss; save_final.
    `current_step` is set by the trainer before each step (online strategies seed their sampling with it).
    """

    name = "full"
    kind = "sft"  # which dataset shape it consumes: sft, preference, unpaired or prompt (data.load_dataset)
    current_step = 0

    def __init__(self, cfg):
        self.cfg = cfg

    def attach(self, lm, chat_format, examples: list[Example]) -> None:
        """See the model, its chat format and the training examples before training (default: nothing)."""

    def prepare(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    def step_metrics(self, stats: dict[str, float]) -> dict[str, float]:
        """Turn the step's statistics (summed, divided by count()) into the logged metrics."""
        return stats

    def evaluate(self, model: nn.Module, examples: list[Example]) -> dict | None:
        """Held-out metrics, or None for the trainer's default (mean loss statistics)."""
        return None

    def count(self, examples: list[Example]) -> int:
        """The loss normaliser contributed by these examples (target tokens)."""
        return sum(e.n_targets for e in examples)

    def collate(self, examples: list[Example]) -> dict:
        return collate_sft(examples)

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Summed loss over the batch and summed statistics (divided by the global count by the trainer)."""
        logits, tgt, _ = target_logits(model, batch["input_ids"], batch["labels"], batch.get("position_ids"),
                                       batch.get("doc_ids"))
        loss = F.cross_entropy(logits, tgt, reduction="sum")
        return loss, {"loss": loss.detach()}

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def save_final(self, model: nn.Module, out: Path, lm) -> Path:
        return save_full_model(model, Path(out) / "model", lm)


class LoraStrategy(Strategy):
    """SFT of LoRA adapters on a frozen base; with qlora the base is NF4."""

    name = "lora"

    def prepare(self, model: nn.Module) -> None:
        c = self.cfg
        existing = lora_modules(model)
        if existing:  # adapters from an earlier round (rejection sampling): keep training them
            for p in model.parameters():
                p.requires_grad_(False)
            for m in existing.values():
                m.lora_A.weight.requires_grad_(True)
                m.lora_B.weight.requires_grad_(True)
            return
        if c.method == "qlora":
            quantize_decoder_linears(model)
        apply_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, list(c.target_modules))

    def save_final(self, model: nn.Module, out: Path, lm) -> Path:
        return save_adapter(model, out, base_model=str(self.cfg.model))


class PolicyStrategy(Strategy):
    """Base of the preference and RL strategies: trains full weights or LoRA/QLoRA (the `inner` strategy) and,
    when `needs_reference`, keeps the frozen reference policy: a frozen copy for full fine-tuning, the same
    model with its adapters disabled for LoRA (no second copy)."""

    needs_reference = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.inner = Strategy(cfg) if cfg.method == "full" else LoraStrategy(cfg)
        self.ref_model: nn.Module | None = None

    def prepare(self, model: nn.Module) -> None:
        if self.cfg.method == "full" and self.needs_reference:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.inner.prepare(model)

    @contextlib.contextmanager
    def reference(self, model: nn.Module):
        """The reference policy, for no-grad forwards."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        with adapters_disabled(model):
            yield model

    def reference_logps(self, model: nn.Module, batch: dict) -> torch.Tensor:
        with torch.no_grad(), self.reference(model) as ref:
            return sequence_logps(ref, batch["input_ids"], batch["labels"])

    def save_final(self, model: nn.Module, out: Path, lm) -> Path:
        return self.inner.save_final(model, out, lm)


class DPOStrategy(PolicyStrategy):
    """DPO on full weights (reference = frozen copy) or LoRA/QLoRA (reference = adapters disabled)."""

    name = "dpo"
    kind = "preference"

    def count(self, examples: list[Example]) -> int:
        return len(examples)

    def collate(self, examples: list[Example]) -> dict:
        return collate_preference(examples)

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        n = int(batch["n_pairs"])
        ref = self.reference_logps(model, batch)
        pol = sequence_logps(model, batch["input_ids"], batch["labels"])
        losses, cr, rr = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], self.cfg.dpo_beta)
        margin = cr - rr
        return losses.sum(), {"loss": losses.sum().detach(), "reward_margin": margin.sum(),
                              "reward_accuracy": (margin > 0).float().sum()}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "generation_config.json")


def save_full_model(model: nn.Module, out: Path, lm) -> Path:
    """Save a full model as a Hugging Face directory (config.json + safetensors, tokenizer files when known).

    `out` is replaced as a whole (written under a temporary name, then renamed).
    """
    out = Path(out)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    src = Path(lm.path) if getattr(lm, "path", None) else None
    tok_files = [src / f for f in _TOKENIZER_FILES if src and src.is_dir() and (src / f).is_file()]
    from ..formats.safetensors import save_hf
    save_hf(out, model.config, sd, tokenizer_files=tok_files or None)
    return out
