"""lm-evaluation-harness backend: `lm_eval --model llamaforge --model_args pretrained=NAME_OR_PATH,...`.

Registered two ways, both lm-eval's own: the `lm_eval.models` entry point in llamaforge's package metadata (the
plugin mechanism of lm-eval releases after 0.4.13), and `@register_model("llamaforge")` when this module is
imported (`llamaforge eval lm-eval ...` imports it and then runs lm-eval's own command line, which is how the
backend is reached with lm-eval 0.4.13, whose registry reads no entry points).

model_args: pretrained (store name or path; default smollm2), dtype (float32, bfloat16, ...), quant (auto, none,
q4, int8, bf16), batch_size (sequences per scoring forward and requests decoded together; "auto" fills a token
budget), max_length (context used, default the model's), max_gen_toks (default 256), add_bos_token (default:
what the tokenizer says), compile (the AOT decode step; default off).

Scoring is batched through the model (`eval.scoring`), generation through the request seam on one continuous-
batching engine (`eval.backends.generate_batch`). Text given to the model may contain control-token text (chat
templates rendered by lm-eval): it is encoded as control tokens, as Hugging Face tokenizers do.
"""
from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's built-in models first: its registry skips them once non-empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
import torch
from tqdm import tqdm

from ..api import load
from ..errors import InvalidRequestError
from ..generate.chat_formats import chat_format
from .backends import InProcessBackend, generate_batch

DEFAULT_MAX_GEN_TOKS = 256
log = logging.getLogger("llamaforge.eval")


def _bool(v) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise InvalidRequestError(f"expected true or false, got {v!r}", field="model_args")


def _batch_size(v) -> int | None:
    if v is None or str(v).startswith("auto"):
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"batch_size must be a positive integer or 'auto', got {v!r}",
                                  field="batch_size") from None
    if n < 1:
        raise InvalidRequestError(f"batch_size must be a positive integer or 'auto', got {v!r}", field="batch_size")
    return n


@register_model("llamaforge")
class LlamaforgeLM(TemplateLM):
    """A llamaforge model as an lm-evaluation-harness `LM`."""

    def __init__(self, pretrained: str = "smollm2", dtype: str | None = None, quant: str | None = None,
                 batch_size: Any = None, max_batch_size: Any = None, max_length: Any = None,
                 max_gen_toks: Any = DEFAULT_MAX_GEN_TOKS, add_bos_token: Any = None, compile: Any = False,
                 device: str | None = None, lm=None, **kwargs):
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in ("trust_remote_code", "parallelize"))
        if unknown:
            raise InvalidRequestError(f"unknown model_args for llamaforge: {', '.join(unknown)}", field="model_args")
        device = device or "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device cuda unless told otherwise; HFLM falls back the same way.
            log.warning("device %r is not available, using 'cpu'", device)
            device = "cpu"
        self._lm = lm if lm is not None else load(str(pretrained), dtype=dtype, quant=quant, device=device,
                                                  compile=bool(_bool(compile)))
        self.pretrained = str(pretrained)
        self._batch = _batch_size(batch_size)
        self.backend_impl = InProcessBackend(self._lm, batch_size=self._batch, allow_special=True,
                                             label=self.pretrained)
        self._max_length = int(max_length) if max_length is not None else self.backend_impl.max_length
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _bool(add_bos_token)
        self.tok = self._lm.tokenizer
        self.batch_sizes = {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lm-eval's, except that a batch_size given in model_args wins over the command line's --batch_size
        (lm-eval always passes one, which would otherwise collide)."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        args = dict(arg_dict)
        for k, v in (additional_config or {}).items():
            if v is not None and k not in args:
                args[k] = v
        return cls(**args)

    # -- what lm-eval asks of a model -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        if self.tok.eos_id is not None:
            return self.tok.eos_id
        stops = sorted(self.tok.stop_ids or ())
        if not stops:
            raise InvalidRequestError("the tokenizer has no end-of-text token", field="model")
        return stops[0]

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"llamaforge:{self.pretrained}"

    def get_model_info(self) -> dict:
        md = self._lm.metadata or {}
        return {"model_name": self.pretrained, "model_file_type": md.get("file_type"), "quant": md.get("quant"),
                "model_dtype": str(next(self._lm.model.parameters()).dtype)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = list(self.tok.encode(string, allow_special=True))
        bos = self.tok.bos_id
        want_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if want_bos is None:
            want_bos = bool(getattr(self.tok, "add_bos", False))
        if want_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(tokens), skip_special=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        bar = tqdm(total=len(pairs), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        try:
            out = self.backend_impl.score_tokens(pairs, truncate=True, progress=bar.update)
        finally:
            bar.close()
        for (key, _, _), ans in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        bar = tqdm(total=len(windows), disable=disable_tqdm or self.rank != 0, desc="Running rolling loglikelihood")
        try:
            scores = self.backend_impl.score_tokens(windows, progress=bar.update)
        finally:
            bar.close()
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running generate_until")
        try:
            for idx in groups.values():
                kw = dict(requests[idx[0]].args[1])
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
                options = {}
                if kw.pop("do_sample", False) and float(kw.get("temperature", 0) or 0) > 0:
                    options = {"temperature": float(kw.pop("temperature")), "top_p": float(kw.pop("top_p", 1.0)),
                               "top_k": 0, "min_p": 0.0, "seed": 1234}
                kw.pop("temperature", None)
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                           for i in idx]
                texts = generate_batch(self._lm, prompts, max_tokens=max_gen, stop=until,
                                       batch_size=self._batch or 8, progress=bar.update, options=options)
                for i, t in zip(idx, texts):
                    out[i] = t
                    self.cache_hook.add_partial("generate_until", requests[i].args, t)
        finally:
            bar.close()
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as text in the model's chat format (control tokens spelled out, re-encoded as
        control tokens by tok_encode)."""
        ids = chat_format(self._lm).encode(list(chat_history), add_generation_prompt=add_generation_prompt)
        return self.tok.decode(ids, skip_special=False)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tok, "chat_template", None) or ""
