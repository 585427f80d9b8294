"""The one training loop. Strategies (strategies.py) supply preparation, loss and saving; this file supplies
data order, schedule, accumulation, data parallelism, checkpoints/resume, metrics and the loss plot.

Data parallelism: under `torchrun` every process takes its share of each global batch, and gradients are summed
with one all-reduce per step (gloo on CPU, NCCL on GPU). Losses are normalised by the global batch's count,
so N processes compute exactly the gradient of one process with the same global batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._fs import atomic_file, atomic_write_text, loads_json
from ..errors import InvalidRequestError
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import DataReport, DatasetError, Example, load_dataset, pack_examples, split_eval
from .base_model import LazyChatFormat, load_base_model  # noqa: F401  (load_base_model: re-exported)
from .registry import make_strategy
from .strategies import SkipStep, Strategy


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)       # per optimizer step (this run, after resume)
    eval: dict = field(default_factory=dict)                 # final evaluation metrics
    saved: Path | None = None
    data_report: DataReport | None = None
    skipped: Counter = field(default_factory=Counter)       # reason -> optimizer steps skipped (bad rewards)
    rounds: list[dict] = field(default_factory=list)         # rejection sampling: per-round statistics

    def skipped_summary(self) -> str:
        """One line on what was skipped (steps, or samples for rejection sampling); empty when nothing was."""
        if not self.skipped:
            return ""
        return "skipped: " + "; ".join(f"{v} x {k}" for k, v in self.skipped.most_common())


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class _Dist:
    """Rank / world size and the few collectives the loop uses; a no-op in a single process."""

    def __init__(self, device_kind: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1
        self._owns_group = False
        if self.active:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
                self._owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        if not self.active or not tensors:
            return
        import torch.distributed as dist
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        off = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[off:off + n].view_as(t).to(t.dtype))
            off += n

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _pick_device(cfg: TrainConfig, dist_local_rank: int) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_local_rank)
    return torch.device("cpu")


class Trainer:
    """Fine-tune `lm` (or the model `cfg.model` names) on `cfg.data`.

    chat_format: anything with `encode_with_mask(messages)`; default `chat_format_for(lm.tokenizer)`.
    examples: pre-tokenized examples (skips reading cfg.data; used by tests and benchmarks).
    """

    def __init__(self, cfg: TrainConfig, lm=None, chat_format=None, examples: list[Example] | None = None):
        required = ("out",) + (("model",) if lm is None else ()) + (("data",) if examples is None else ())
        self.cfg = cfg.validate(required)
        self._lm, self._chat_format, self._examples = lm, chat_format, examples

    # -- setup --------------------------------------------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        if self._examples is None and not Path(cfg.data).is_file():  # fail before the slow model load
            raise DatasetError(cfg.data, None, "no such file")
        self.device = _pick_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = _Dist(self.device.type)
        torch.manual_seed(cfg.seed)  # same on every rank: identical LoRA init everywhere
        lm = self._lm if self._lm is not None else load_base_model(cfg.model)
        self.lm = lm
        model = lm if isinstance(lm, torch.nn.Module) else lm.model
        self.model = model.to(device=self.device, dtype=torch.float32)
        self.strategy: Strategy = make_strategy(cfg)
        self.report = DataReport()
        chat = self._chat_format or LazyChatFormat(lm)
        if self._examples is not None:
            examples = list(self._examples)
        else:
            reserve = cfg.max_new_tokens if self.strategy.kind == "prompt" else 0
            examples = load_dataset(cfg.data, chat, kind=self.strategy.kind, max_seq_len=cfg.max_seq_len,
                                    skip_bad=cfg.skip_bad, report=self.report, reserve=reserve)
        vocab = self.model.config.vocab_size
        for e in examples:
            if max(e.ids + (e.rejected_ids or [])) >= vocab:
                raise DatasetError(cfg.data or "<examples>", e.line,
                                   f"token id {max(e.ids + (e.rejected_ids or []))} is outside the model's "
                                   f"vocabulary (size {vocab})")
        self.train_set, self.eval_set = split_eval(examples, cfg.eval_split, cfg.seed)
        if cfg.packing and self.strategy.kind == "sft":
            self.train_set = pack_examples(self.train_set, cfg.max_seq_len)
        self.strategy.attach(lm, chat, examples)
        self.strategy.prepare(self.model)
        if self.dist.rank:  # LoRA init was identical everywhere; dropout masks should differ between ranks
            torch.manual_seed(cfg.seed + self.dist.rank)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise InvalidRequestError("nothing to train: no parameter requires a gradient")
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           weight_decay=cfg.weight_decay)
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.steps_per_epoch = max(1, math.ceil(len(self.train_set) / self.global_batch))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self._perms: dict[int, list[int]] = {}
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda"
                                               and torch.cuda.is_bf16_supported())
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 \
            else contextlib.nullcontext

    def _fingerprint(self) -> dict:
        # What must match for a resume to continue the same run.
        c = self.cfg
        return {"task": c.task, "method": c.method, "seed": c.seed, "global_batch": self.global_batch,
                "train_examples": len(self.train_set), "total_steps": self.total_steps, "lr": c.lr,
                "lora_r": c.lora_r if c.method != "full" else None}

    # -- data order ---------------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        # A pure function of (seed, epoch), so a resumed run sees the same order without saved sampler state.
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.train_set), generator=g).tolist()}
        return self._perms[epoch]

    def _global_batch(self, step: int) -> list[Example]:
        epoch, k = divmod(step, self.steps_per_epoch)
        idx = self._epoch_order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]
        return [self.train_set[i] for i in idx]

    def _my_micro_batches(self, batch: list[Example]) -> list[list[Example]]:
        bs = self.cfg.batch_size
        chunks = [batch[i:i + bs] for i in range(0, len(batch), bs)]
        return [c for j, c in enumerate(chunks) if j % self.dist.world == self.dist.rank]

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int) -> None:
        rngs = self.dist.gather_objects(ckpt.rng_state())
        if self.dist.is_main:
            opt_t, opt_meta = ckpt.optimizer_to_tensors(self.optimizer)
            rng_t = {f"rank{r}.{k}": v for r, st in enumerate(rngs) for k, v in st.items()}
            state = {"step": step, "fingerprint": self._fingerprint(), "optimizer": opt_meta,
                     "world": self.dist.world, "config": self.cfg.to_dict()}
            ckpt.save_checkpoint(self.ckpt_dir, step, {"trainable": self.strategy.trainable_state(self.model),
                                                       "optimizer": opt_t, "rng": rng_t}, state,
                                 keep=self.cfg.keep_checkpoints)
        self.dist.barrier()

    def _resume(self) -> int:
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            return 0
        tensors, state = ckpt.load_checkpoint(path)
        if state["fingerprint"] != self._fingerprint():
            raise ckpt.CheckpointError(f"{path} was written by a different run configuration: "
                                       f"{state['fingerprint']} vs now {self._fingerprint()}")
        own = dict(self.params)
        saved = tensors["trainable"]
        if set(saved) != set(own):
            raise ckpt.CheckpointError(f"{path}: trainable parameters do not match this model")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(saved[n])
        ckpt.optimizer_from_tensors(self.optimizer, tensors["optimizer"], state["optimizer"])
        if state.get("world") == self.dist.world:
            prefix = f"rank{self.dist.rank}."
            ckpt.set_rng_state({k[len(prefix):]: v for k, v in tensors["rng"].items() if k.startswith(prefix)})
        if self.dist.is_main:
            self._truncate_metrics(state["step"])
        return int(state["step"])

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if loads_json(line)["step"] <= step:
                    keep.append(line)
        _atomic_text(self.metrics_path, "".join(k + "\n" for k in keep))

    # -- the loop -----------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """One optimizer step. A strategy that raises SkipStep (e.g. a reward that failed) skips the update on
        every rank; the returned metrics then carry `skipped` (the reason) and no loss."""
        batch = self._global_batch(step)
        norm = max(1, self.strategy.count(batch))
        self.model.train()
        self.strategy.current_step = step
        stats: dict[str, torch.Tensor] = {}
        skip = None
        for micro in self._my_micro_batches(batch):
            try:
                b = {k: v.to(self.device) for k, v in self.strategy.collate(micro).items()}
            except SkipStep as e:
                skip = e.reason
                break
            with self.autocast():
                loss_sum, st = self.strategy.loss_sum(self.model, b)
            (loss_sum / norm).backward()
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v.detach().float()
        grads = []
        for _, p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        keys = sorted(set(stats) | {"loss"}) if skip is None else ["loss"]
        packed_stats = torch.stack([torch.as_tensor(stats.get(k, 0.0), dtype=torch.float32) for k in keys]
                                   + [torch.tensor(float(skip is not None))])
        self.dist.all_reduce_(grads + [packed_stats])
        if float(packed_stats[-1]) > 0:  # some rank skipped: nobody steps, so the replicas stay identical
            self.optimizer.zero_grad(set_to_none=True)
            return {"skipped": skip or "skipped on another rank", "lr": lr_at(step, self.cfg, self.total_steps),
                    "tokens": 0}
        packed_stats = packed_stats[:-1]
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in self.params],
                                               self.cfg.max_grad_norm or float("inf"))
        lr = lr_at(step, self.cfg, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.strategy.step_metrics({k: float(v) / norm for k, v in zip(keys, packed_stats)})
        out.update(lr=lr, grad_norm=float(gnorm), tokens=int(out.pop("tokens", sum(e.n_tokens for e in batch))))
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss (and DPO reward stats) over the held-out split; strategies that sample (GRPO) report the
        held-out reward instead."""
        if not self.eval_set:
            return {}
        own = self.strategy.evaluate(self.model, self.eval_set)
        if own is not None:
            return {f"eval_{k}": v for k, v in own.items()}
        self.model.eval()
        totals: dict[str, float] = {}
        bs = self.cfg.batch_size
        for i in range(0, len(self.eval_set), bs):
            chunk = self.eval_set[i:i + bs]
            b = {k: v.to(self.device) for k, v in self.strategy.collate(chunk).items()}
            with self.autocast():
                _, st = self.strategy.loss_sum(self.model, b)
            for k, v in st.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        norm = max(1, self.strategy.count(self.eval_set))
        return {f"eval_{k}": v / norm for k, v in totals.items()}

    def run(self) -> TrainResult:
        self._setup()
        cfg, d = self.cfg, self.dist
        try:
            start = self._resume() if cfg.resume else 0
            if d.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                if start == 0 and self.metrics_path.exists():
                    self.metrics_path.unlink()
            result = TrainResult(out=self.out, steps=start, data_report=self.report)
            bar = _progress(self.total_steps, start, enabled=d.is_main)
            lines = d.is_main and bar is None  # no terminal (a log file, CI, a pipe): plain log lines instead
            if lines:
                _log_line(f"training {self.total_steps - start} steps"
                          + (f" from step {start}" if start else "") + f" -> {self.out}")
            for step in range(start, self.total_steps):
                t0 = time.perf_counter()
                m = self.train_step(step)
                dt = time.perf_counter() - t0
                m.update(step=step + 1, epoch=round(step / self.steps_per_epoch, 4), tokens_per_s=m["tokens"] / dt)
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < self.total_steps:
                    m.update(self.evaluate())
                if "skipped" in m:
                    result.skipped[m["skipped"]] += 1
                else:
                    result.losses.append(m["loss"])
                result.steps = step + 1
                if d.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps):
                    _append_jsonl(self.metrics_path, m)
                if bar is not None and "loss" in m:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                elif lines and ((step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps):
                    _log_line(_step_line(m, self.total_steps))
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < self.total_steps:
                    self._save_checkpoint(step + 1)
            if bar is not None:
                bar.close()
            result.eval = self.evaluate()
            if lines and result.eval:
                _log_line("eval " + " ".join(f"{k} {v:.4f}" for k, v in result.eval.items()))
            if d.is_main:
                if result.eval:
                    _append_jsonl(self.metrics_path, {"step": self.total_steps, **result.eval})
                result.saved = self.strategy.save_final(self.model, self.out, self.lm)
                _atomic_text(self.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
                plot_metrics(self.metrics_path, self.out / "loss.png")
            d.barrier()
            return result
        finally:
            d.close()


def _progress(total: int, start: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _step_line(m: dict, total: int) -> str:
    """One step's metrics as a log line: `step 10/200 loss 1.2345 lr 2.00e-04 grad_norm 0.51 tok/s 812`."""
    if "skipped" in m:
        return f"step {m['step']}/{total} skipped ({m['skipped']})"
    parts = [f"step {m['step']}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
    if "grad_norm" in m:
        parts.append(f"grad_norm {m['grad_norm']:.3g}")
    parts += [f"{k} {v:.4f}" for k, v in m.items() if k.startswith("eval_")]
    parts.append(f"tok/s {m['tokens_per_s']:.0f}")
    return " ".join(parts)


def _log_line(text: str) -> None:
    # Flushed at once: a user tailing a log file (or a CI job) sees each step as it ends.
    print(text, file=sys.stderr, flush=True)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def plot_metrics(metrics_path: Path, png: Path) -> Path | None:
    """Loss (and eval loss) per step as a PNG, written atomically."""
    if not metrics_path.is_file():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [loads_json(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return png
