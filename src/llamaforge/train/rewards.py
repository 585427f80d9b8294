"""Reward functions for rejection sampling and GRPO, named by a spec string:

    DIR                 a reward model written by `finetune rm` (train/reward_model.py)
    regex:PATTERN       1.0 if the whole completion (whitespace-stripped) matches PATTERN, else 0.0
    json-schema:FILE    1.0 if the completion parses as JSON and validates against the schema in FILE
                        (JSON Schema, checked with `jsonschema`), else 0.0
    exact               1.0 if the stripped completion equals the record's reference "answer" (a string or
                        number, or a list of acceptable answers), else 0.0
    PATH.py             a Python file defining reward(prompt, completion) -> float; if the function also has
                        an `answer` parameter it receives the record's "answer". The file is the user's own
                        code and runs in this process with this process's rights, like a training script.

Every reward is called as fn(prompt, completion, record) -> float, where prompt is the record's prompt as given
(a string or a list of messages). Batches go through `score_batch`, which a reward model runs batched.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .._fs import read_text_bounded, loads_json
from ..errors import InvalidRequestError

MAX_SCHEMA_BYTES = 1 << 20
MAX_REWARD_FILE_BYTES = 4 << 20


class Reward:
    """A named reward: `score_batch(prompts, completions, records) -> [float]`; `needs_answer` when every
    record must carry a reference "answer"."""

    name = "reward"
    needs_answer = False

    def __call__(self, prompt, completion: str, record: dict) -> float:
        raise NotImplementedError

    def score_batch(self, prompts: Sequence[Any], completions: Sequence[str], records: Sequence[dict]) -> list:
        return [self(p, c, r) for p, c, r in zip(prompts, completions, records)]


class RegexReward(Reward):
    def __init__(self, pattern: str):
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise InvalidRequestError(f"reward regex {pattern!r} does not compile: {e}", field="reward") from None
        self.name = f"regex:{pattern}"

    def __call__(self, prompt, completion, record):
        return 1.0 if self.pattern.fullmatch(completion.strip()) else 0.0


class JsonSchemaReward(Reward):
    def __init__(self, path: str):
        import jsonschema
        try:
            schema = loads_json(read_text_bounded(path, MAX_SCHEMA_BYTES, "JSON schema"))
        except ValueError as e:
            raise InvalidRequestError(f"reward schema {path}: not valid JSON ({e})", field="reward") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(f"reward schema {path}: a schema is an object or a boolean", field="reward")
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise InvalidRequestError(f"reward schema {path}: invalid at {where}: {e.message}",
                                      field="reward") from None
        self.validator = cls(schema)
        self.name = f"json-schema:{path}"

    def __call__(self, prompt, completion, record):
        try:
            value = loads_json(completion)
        except ValueError:
            return 0.0
        return 1.0 if self.validator.is_valid(value) else 0.0


class ExactReward(Reward):
    name = "exact"
    needs_answer = True

    def __call__(self, prompt, completion, record):
        answer = record.get("answer")
        accepted = answer if isinstance(answer, list) else [answer]
        return 1.0 if completion.strip() in {str(a).strip() for a in accepted} else 0.0


class PythonReward(Reward):
    """reward(prompt, completion[, answer=...]) from a user's Python file (run in-process: the user's code)."""

    def __init__(self, path: str):
        p = Path(path)
        if not p.is_file():
            raise InvalidRequestError(f"reward file {path} does not exist", field="reward")
        read_text_bounded(p, MAX_REWARD_FILE_BYTES, "reward file")  # a clear error for a huge/unreadable file
        name = f"llamaforge_user_reward_{abs(hash(str(p.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, p)
        if spec is None or spec.loader is None:
            raise InvalidRequestError(f"reward file {path} cannot be imported", field="reward")
        module = importlib.util.module_from_spec(spec)
        try:
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as e:  # the user's module failed at import: say so, with its own message
            sys.modules.pop(name, None)
            raise InvalidRequestError(f"reward file {path} failed to import: {type(e).__name__}: {e}",
                                      field="reward") from None
        fn = getattr(module, "reward", None)
        if not callable(fn):
            raise InvalidRequestError(f"reward file {path} must define a function reward(prompt, completion)",
                                      field="reward")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        self.pass_answer = "answer" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.fn: Callable = fn
        self.name = str(p)

    def __call__(self, prompt, completion, record):
        if self.pass_answer:
            return self.fn(prompt, completion, answer=record.get("answer"))
        return self.fn(prompt, completion)


class RewardModelReward(Reward):
    """Scores from a trained reward model, batched."""

    def __init__(self, path: str, *, base=None, base_lm=None, chat_format=None, batch_size: int = 8):
        from .reward_model import load_reward_model
        self.rm = load_reward_model(path, base=base, base_lm=base_lm, chat_format=chat_format)
        self.rm.batch_size = batch_size
        self.name = f"reward model {path}"

    def __call__(self, prompt, completion, record):
        return self.rm.score(prompt, completion)

    def score_batch(self, prompts, completions, records):
        return self.rm.score_ids([self.rm.encode(p, c) for p, c in zip(prompts, completions)]).tolist()


def make_reward(spec: str, **rm_kwargs) -> Reward:
    """The Reward a spec names (see the module docstring); InvalidRequestError(field="reward") if none."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidRequestError("a reward is required", field="reward")
    spec = spec.strip()
    if spec.startswith("regex:"):
        return RegexReward(spec[len("regex:"):])
    if spec.startswith("json-schema:"):
        return JsonSchemaReward(spec[len("json-schema:"):])
    if spec == "exact":
        return ExactReward()
    if spec.endswith(".py"):
        return PythonReward(spec)
    if Path(spec).is_dir():
        return RewardModelReward(spec, **rm_kwargs)
    raise InvalidRequestError(f"unknown reward {spec!r}: use a reward model directory, regex:PATTERN, "
                              "json-schema:FILE, exact, or a Python file defining reward(prompt, completion)",
                              field="reward")


def check_records(reward: Reward, records: Sequence[tuple[int, dict]], path) -> None:
    """Fail before training when the reward needs a reference answer that a record lacks."""
    from .data import DatasetError
    if reward.needs_answer:
        for line, rec in records:
            a = rec.get("answer") if isinstance(rec, dict) else None
            if a is None or (isinstance(a, list) and not a) or isinstance(a, (dict, bool)):
                raise DatasetError(path, line, f"the {reward.name!r} reward needs an 'answer' (a string, a number "
                                               "or a list of them)")


class RewardFailure(Exception):
    """A reward raised or returned something that is not a finite number."""


def safe_scores(reward: Reward, prompts, completions, records) -> list[float]:
    """Scores as floats; RewardFailure (with the reason) if the reward raised or returned NaN/inf/non-numbers."""
    try:
        scores = reward.score_batch(prompts, completions, records)
    except Exception as e:  # the user's reward function: any exception becomes a skipped step, not a crash
        raise RewardFailure(f"reward raised {type(e).__name__}: {str(e)[:200]}") from None
    out = []
    for s in scores:
        try:
            f = float(s)
        except (TypeError, ValueError):
            raise RewardFailure(f"reward returned {type(s).__name__}, not a number") from None
        if math.isnan(f):
            raise RewardFailure("reward returned NaN")
        if math.isinf(f):
            raise RewardFailure("reward returned an infinite value")
        out.append(f)
    if len(out) != len(completions):
        raise RewardFailure(f"reward returned {len(out)} scores for {len(completions)} completions")
    return out
