"""Training data: Alpaca, chat (`messages` / ShareGPT `conversations`) and preference files -> token ids + masks.

Text goes through the model's chat format at the token level (`ChatFormat.encode_with_mask`), so the loss falls
on exactly the tokens the model must produce: every assistant turn's content and its end-of-turn token.
Bad records raise `DatasetError` naming the file and line, or are skipped and counted with `skip_bad=True`.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import LlamaforgeError
from .._fs import loads_json

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant"}
IGNORE = -100  # label value that contributes no loss (the torch cross_entropy default ignore_index)


class DatasetError(LlamaforgeError):
    """A training file or one of its records is invalid. `path` and `line` locate it."""

    def __init__(self, path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class _BadRecord(Exception):
    """Internal: a record-level problem, turned into DatasetError (or a skip) with the line number."""


@dataclass
class Example:
    """One tokenized training example. For preference data `ids/mask` is the chosen side.

    doc_lens: for a packed row, the lengths of the documents it holds, in order (None: one document).
    label: for unpaired (KTO) data, whether the completion is desirable. margin: an optional preference
    margin (Llama 2's reward-model loss). record: the source record, for prompt-only data (GRPO, rejection
    sampling: the reward sees the prompt and reference answer). prompt_len: where the reply starts in `ids`.
    """

    ids: list[int]
    mask: list[bool]
    line: int
    rejected_ids: list[int] | None = None
    rejected_mask: list[bool] | None = None
    doc_lens: list[int] | None = None
    label: bool | None = None
    margin: float | None = None
    record: dict | None = None
    prompt_len: int | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.ids) + len(self.rejected_ids or ())

    @property
    def n_targets(self) -> int:
        """Tokens that carry a loss: masked tokens that have a previous token in their own document."""
        return sum(sum(self.mask[a + 1:b]) for a, b in _doc_spans(self.doc_lens, len(self.ids)))


def _doc_spans(doc_lens: list[int] | None, n: int) -> list[tuple[int, int]]:
    if not doc_lens:
        return [(0, n)]
    spans, a = [], 0
    for k in doc_lens:
        spans.append((a, a + k))
        a += k
    return spans


@dataclass
class DataReport:
    """What loading produced: counts of records read, kept and skipped (by reason)."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        s = f"{self.kept} examples from {self.read} records"
        if self.skipped:
            s += "; skipped " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return s


# ---------------------------------------------------------------------------------------------------------------
# Reading records

# A record is a conversation or a document: 16 MiB of JSON is far beyond any context window, and a longer line
# (a crafted 100 MB record, /dev/zero) would only be read into memory to be refused by the tokenizer later.
MAX_RECORD_BYTES = 16 << 20
MAX_ARRAY_FILE_BYTES = 512 << 20   # a .json array is parsed whole; JSONL files are streamed and unbounded


def iter_records(path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed JSON or None, error or None) for a .jsonl file or a .json array (1-based numbers).

    JSONL is read line by line, each line bounded by MAX_RECORD_BYTES (a longer one is a DatasetError even with
    skip-bad: a stream without newlines would otherwise never end)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DatasetError(path, None, f"cannot read: {e.strerror or e}") from None
    with f:
        head = f.read(4096)
        if not head.lstrip():
            rest = f.read(MAX_RECORD_BYTES)
            if not rest.strip():
                raise DatasetError(path, None, "the file is empty")
            head += rest
        if head.lstrip().startswith(b"["):
            yield from _iter_array(path, head + _read_rest(f, path, MAX_ARRAY_FILE_BYTES - len(head)))
            return
        yield from _iter_lines(path, f, head)


def _read_rest(f, path, limit: int) -> bytes:
    data = f.read(max(0, limit) + 1)
    if len(data) > limit:
        raise DatasetError(path, None, f"a JSON array file is larger than {MAX_ARRAY_FILE_BYTES >> 20} MiB; "
                                       "use JSONL (one record per line), which is read as a stream")
    return data


def _decode(path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(path, line + raw[:e.start].count(b"\n"), "not valid UTF-8") from None


def _iter_array(path, raw: bytes):
    text = _decode(path, raw, 1)
    # A JSON array (Alpaca's own file format): report positions as the record's line in the file.
    try:
        data = loads_json(text)
    except json.JSONDecodeError as e:
        raise DatasetError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise DatasetError(path, None, "a .json dataset must be an array of records")
    lines = _array_item_lines(text, len(data))
    for i, rec in enumerate(data):
        yield lines[i], rec, None


def _iter_lines(path, f, head: bytes):
    buf = head
    no = 0
    while True:
        nl = buf.find(b"\n")
        while nl < 0 and len(buf) <= MAX_RECORD_BYTES:
            more = f.read(min(1 << 20, MAX_RECORD_BYTES + 1 - len(buf)) or 1)
            if not more:
                break
            buf += more
            nl = buf.find(b"\n", max(0, len(buf) - len(more) - 1))
        if nl < 0 and len(buf) > MAX_RECORD_BYTES:
            raise DatasetError(path, no + 1, f"record is longer than {MAX_RECORD_BYTES >> 20} MiB")
        if nl < 0:
            line, buf = buf, b""
        else:
            line, buf = buf[:nl], buf[nl + 1:]
        no += 1
        if len(line) > MAX_RECORD_BYTES:
            raise DatasetError(path, no, f"record is longer than {MAX_RECORD_BYTES >> 20} MiB")
        if line.strip():
            text = _decode(path, line, no)
            try:
                rec = loads_json(text)
            except json.JSONDecodeError as e:
                yield no, None, f"malformed JSON ({e.msg} at column {e.colno})"
            else:
                yield no, rec, None
        if nl < 0:
            return


def _array_item_lines(text: str, n: int) -> list[int]:
    # Line where each top-level array element starts, via a raw_decode walk.
    dec, out, i = json.JSONDecoder(), [], text.index("[") + 1
    for _ in range(n):
        while text[i] in " \t\r\n,":
            i += 1
        out.append(text.count("\n", 0, i) + 1)
        _, i = dec.raw_decode(text, i)
    return out


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise _BadRecord(f"{what} must be a string, got {type(value).__name__}")
    return value


def _messages(value, what: str, *, sharegpt: bool = False) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _BadRecord(f"{what!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _BadRecord(f"{what}[{i}] is not an object")
        if sharegpt:
            if "from" not in m or "value" not in m:
                raise _BadRecord(f"{what}[{i}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
            if role is None:
                raise _BadRecord(f"{what}[{i}] has unknown role {m['from']!r}")
            content = m["value"]
        else:
            if "role" not in m or "content" not in m:
                raise _BadRecord(f"{what}[{i}] needs 'role' and 'content'")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise _BadRecord(f"{what}[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _text(content, f"{what}[{i}] content")
        if role == "assistant" and not content.strip():
            raise _BadRecord(f"{what}[{i}] is an empty assistant turn")
        out.append({"role": role, "content": content})
    return out


def sft_messages(rec: Any) -> list[dict]:
    """A chat, Alpaca or prompt/completion record -> messages with at least one assistant turn."""
    if not isinstance(rec, dict):
        raise _BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = _messages(rec["messages"], "messages")
    elif "conversations" in rec:
        msgs = _messages(rec["conversations"], "conversations", sharegpt=True)
    elif "instruction" in rec:
        if "output" not in rec:
            raise _BadRecord("Alpaca record is missing 'output'")
        instruction = _text(rec["instruction"], "instruction")
        extra = _text(rec.get("input") or "", "input")
        output = _text(rec["output"], "output")
        if not instruction.strip():
            raise _BadRecord("empty 'instruction'")
        if not output.strip():
            raise _BadRecord("empty 'output' (an empty assistant turn)")
        msgs = [{"role": "system", "content": _text(rec["system"], "system")}] if rec.get("system") else []
        msgs += [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")},
                 {"role": "assistant", "content": output}]
    elif "prompt" in rec and "completion" in rec:
        prompt, completion = _text(rec["prompt"], "prompt"), _text(rec["completion"], "completion")
        if not completion.strip():
            raise _BadRecord("empty 'completion' (an empty assistant turn)")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        raise _BadRecord("unrecognised record: expected 'messages', 'conversations', "
                         "'instruction'/'output' (Alpaca) or 'prompt'/'completion'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise _BadRecord("no assistant turn to learn from")
    return msgs


def preference_messages(rec: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """A preference record -> (prompt messages, chosen reply messages, rejected reply messages)."""
    if not isinstance(rec, dict):
        raise _BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise _BadRecord(f"preference record is missing {k!r}")

    def reply(v, what):
        if isinstance(v, str):
            if not v.strip():
                raise _BadRecord(f"empty {what!r} reply")
            return [{"role": "assistant", "content": v}]
        return _messages(v, what)

    chosen, rejected = reply(rec["chosen"], "chosen"), reply(rec["rejected"], "rejected")
    if "prompt" in rec:
        p = rec["prompt"]
        prompt = [{"role": "user", "content": _text(p, "prompt")}] if isinstance(p, str) else _messages(p, "prompt")
    else:
        # Chat-shaped pairs (whole conversations): the shared leading messages are the prompt.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise _BadRecord("no 'prompt' and the chosen/rejected conversations share no leading messages")
    for what, side in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in side):
            raise _BadRecord(f"{what!r} has no assistant reply")
    if chosen == rejected:
        raise _BadRecord("'chosen' and 'rejected' are identical")
    return prompt, chosen, rejected


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing

def pretokenized(rec: dict) -> tuple[list[int], list[bool]]:
    """{"input_ids": [...], "mask": [...]} (mask optional: learn every token) -> (ids, mask)."""
    ids, mask = rec["input_ids"], rec.get("mask")
    if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise _BadRecord("'input_ids' must be a list of at least 2 non-negative integers")
    if mask is None:
        mask = [True] * len(ids)
    if not isinstance(mask, list) or len(mask) != len(ids) or not all(isinstance(m, (bool, int)) for m in mask):
        raise _BadRecord("'mask' must be a list of booleans as long as 'input_ids'")
    return list(ids), [bool(m) for m in mask]


def _encode(chat_format, messages) -> tuple[list[int], list[bool]]:
    ids, mask = chat_format.encode_with_mask(messages)
    ids, mask = [int(i) for i in ids], [bool(m) for m in mask]
    if len(ids) != len(mask):
        raise _BadRecord("chat format returned ids and mask of different lengths")
    return ids, mask


def _completion_only(chat_format, prompt, reply) -> tuple[list[int], list[bool], int]:
    # Learn from (or score) only the reply, not assistant turns inside a multi-turn prompt.
    # Returns (ids, mask, prompt length): the reply's tokens start at ids[prompt length].
    ids, mask = _encode(chat_format, prompt + reply)
    p_ids, _ = _encode(chat_format, prompt)
    if ids[:len(p_ids)] != p_ids:
        raise _BadRecord("the chat format does not encode the prompt as a prefix of prompt+reply")
    mask = [False] * len(p_ids) + mask[len(p_ids):]
    return ids, mask, len(p_ids)


KINDS = ("sft", "preference", "unpaired", "prompt")


def unpaired_messages(rec: Any) -> list[tuple[list[dict], list[dict], bool]]:
    """An unpaired (KTO) record {"prompt", "completion", "label": bool} -> [(prompt, reply, desirable)];
    a preference pair gives two: its chosen reply desirable and its rejected reply not (as TRL unpairs them)."""
    if isinstance(rec, dict) and ("chosen" in rec or "rejected" in rec):
        prompt, chosen, rejected = preference_messages(rec)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    if not isinstance(rec, dict):
        raise _BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    for k in ("prompt", "completion", "label"):
        if k not in rec:
            raise _BadRecord(f"unpaired record is missing {k!r} (or give a 'chosen'/'rejected' pair)")
    if not isinstance(rec["label"], bool):
        raise _BadRecord(f"'label' must be true (desirable) or false (undesirable), got {rec['label']!r}")
    p, c = rec["prompt"], rec["completion"]
    prompt = [{"role": "user", "content": _text(p, "prompt")}] if isinstance(p, str) else _messages(p, "prompt")
    if isinstance(c, str):
        if not c.strip():
            raise _BadRecord("empty 'completion'")
        reply = [{"role": "assistant", "content": c}]
    else:
        reply = _messages(c, "completion")
    return [(prompt, reply, rec["label"])]


def prompt_messages(rec: Any) -> list[dict]:
    """A prompt record for rejection sampling / GRPO: {"prompt": str | messages, ...} or {"messages": [...]}
    ending with a user turn. Other fields (such as "answer") stay in the record for the reward."""
    if not isinstance(rec, dict):
        raise _BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    if "prompt" in rec:
        p = rec["prompt"]
        msgs = [{"role": "user", "content": _text(p, "prompt")}] if isinstance(p, str) else _messages(p, "prompt")
    elif "messages" in rec:
        msgs = _messages(rec["messages"], "messages")
    else:
        raise _BadRecord("prompt record needs 'prompt' (a string or a list of messages) or 'messages'")
    if msgs[-1]["role"] == "assistant":
        raise _BadRecord("the prompt ends with an assistant turn; the model needs something to answer")
    if not any(m["content"].strip() for m in msgs):
        raise _BadRecord("empty prompt")
    return msgs


def _margin(rec: dict) -> float | None:
    m = rec.get("margin")
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)) or m != m or abs(m) == float("inf"):
        raise _BadRecord(f"'margin' must be a finite number, got {m!r}")
    return float(m)


def _record_examples(kind: str, rec, chat_format, line: int, max_seq_len: int, reserve: int) -> list[Example]:
    if kind == "sft":
        if isinstance(rec, dict) and "input_ids" in rec:
            ids, mask = pretokenized(rec)
        else:
            ids, mask = _encode(chat_format, sft_messages(rec))
        exs = [Example(ids, mask, line)]
    elif kind == "preference":
        prompt, chosen, rejected = preference_messages(rec)
        ids, mask, p_len = _completion_only(chat_format, prompt, chosen)
        rej = _completion_only(chat_format, prompt, rejected)
        exs = [Example(ids, mask, line, rej[0], rej[1], margin=_margin(rec), prompt_len=p_len)]
    elif kind == "unpaired":
        exs = []
        for prompt, reply, label in unpaired_messages(rec):
            ids, mask, p_len = _completion_only(chat_format, prompt, reply)
            exs.append(Example(ids, mask, line, label=label, prompt_len=p_len))
    else:  # prompt
        msgs = prompt_messages(rec)
        ids = [int(i) for i in chat_format.encode(msgs, add_generation_prompt=True)]
        if len(ids) + reserve > max_seq_len:
            raise _BadRecord(f"prompt is {len(ids)} tokens; with max_new_tokens={reserve} that exceeds "
                             f"max_seq_len={max_seq_len}", "too long")
        return [Example(ids, [False] * len(ids), line, record=rec, prompt_len=len(ids))]
    for e in exs:
        n = max(len(e.ids), len(e.rejected_ids or ()))
        if n > max_seq_len:
            raise _BadRecord(f"example is {n} tokens, longer than max_seq_len={max_seq_len}", "too long")
        if not any(e.mask[1:]) or (e.rejected_mask is not None and not any(e.rejected_mask[1:])):
            raise _BadRecord("no assistant tokens to learn from after tokenization")
    return exs


def load_dataset(path, chat_format, *, kind: str = "sft", max_seq_len: int = 2048, skip_bad: bool = False,
                 report: DataReport | None = None, reserve: int = 0) -> list[Example]:
    """Read and tokenize a training file. kind: "sft", "preference" (prompt/chosen/rejected, optional margin),
    "unpaired" (prompt/completion/label, or pairs split in two) or "prompt" (prompts to sample from).

    SFT records may also be pre-tokenized: {"input_ids": [...], "mask": [...]}. For prompts, `reserve` tokens
    (max_new_tokens) must fit after the prompt within max_seq_len.
    Records with invalid JSON, missing fields, unknown roles, empty assistant turns, or more than max_seq_len
    tokens raise DatasetError(path, line), or are skipped and counted in `report` when skip_bad is set.
    """
    from ..errors import TemplateError, TokenizerError
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    report = report if report is not None else DataReport()
    out: list[Example] = []
    for line, rec, err in iter_records(path):
        report.read += 1
        try:
            if err is not None:
                raise _BadRecord(err)
            exs = _record_examples(kind, rec, chat_format, line, max_seq_len, reserve)
        except (_BadRecord, TemplateError, TokenizerError) as e:
            reason = str(e.args[0]) if e.args else str(e)
            if not skip_bad:
                raise DatasetError(path, line, reason + " (use --skip-bad to skip such records)") from None
            report.skipped[e.args[1] if len(e.args) > 1 else _reason_kind(reason)] += 1
            continue
        out.extend(exs)
        report.kept += 1
    if not out:
        raise DatasetError(path, None, f"no usable examples ({report.summary()})")
    return out


def _reason_kind(reason: str) -> str:
    for key in ("malformed JSON", "unknown role", "empty", "missing", "not valid"):
        if key in reason:
            return key
    return "invalid"


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Concatenate SFT examples into rows of at most max_seq_len tokens, in order (greedy).

    Each row records its documents' lengths (`doc_lens`); `collate` turns them into positions that restart at
    0 per document and a block-diagonal causal mask, so a packed document sees only itself and a packed batch
    gives the same loss as the same documents unpacked (as HF's padding-free collator with a varlen kernel).
    """
    rows: list[Example] = []
    cur: list[Example] = []

    def flush():
        if cur:
            rows.append(Example([i for e in cur for i in e.ids], [m for e in cur for m in e.mask], cur[0].line,
                                doc_lens=[len(e.ids) for e in cur]))
            cur.clear()

    for ex in examples:
        if ex.doc_lens and len(ex.doc_lens) > 1:
            raise ValueError("pack_examples: an example is already packed")
        if cur and sum(len(e.ids) for e in cur) + len(ex.ids) > max_seq_len:
            flush()
        cur.append(ex)
    flush()
    return rows


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, 1, T, T] bool: query t may attend key s iff s <= t in the same document."""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]


def collate(rows: Sequence[tuple[list[int], list[bool]]], pad_id: int = 0,
            doc_lens: Sequence[list[int] | None] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids [B, T] and next-token labels [B, T] (IGNORE where no loss is taken).

    With packed rows (any doc_lens given) also `position_ids` [B, T], restarting at 0 per document, and
    `doc_ids` [B, T] (padding gets -1); no label crosses a document boundary.
    """
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    packed = doc_lens is not None and any(d for d in doc_lens)
    if packed:
        position_ids = torch.arange(T).repeat(len(rows), 1)
        doc_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        for d, (s, e) in enumerate(_doc_spans(doc_lens[b] if packed else None, n)):
            # Position t predicts token t+1: it is a target iff token t+1 is one the model must learn.
            tgt = torch.tensor(ids[s + 1:e], dtype=torch.long)
            keep = torch.tensor(mask[s + 1:e], dtype=torch.bool)
            labels[b, s:e - 1] = torch.where(keep, tgt, torch.full_like(tgt, IGNORE))
            if packed:
                position_ids[b, s:e] = torch.arange(e - s)
                doc_ids[b, s:e] = d
    out = {"input_ids": input_ids, "labels": labels}
    if packed:
        out.update(position_ids=position_ids, doc_ids=doc_ids)
    return out


def collate_sft(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    return collate([(e.ids, e.mask) for e in examples], pad_id, [e.doc_lens for e in examples])


def collate_preference(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: [2B, T]."""
    rows = [(e.ids, e.mask) for e in examples] + [(e.rejected_ids, e.rejected_mask) for e in examples]
    batch = collate(rows, pad_id)
    batch["n_pairs"] = torch.tensor(len(examples))
    return batch


def split_eval(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a fraction (0 < x < 1) or a count (x >= 1) of examples, chosen by a seeded permutation."""
    if not eval_split:
        return examples, []
    n = len(examples)
    k = int(eval_split) if eval_split >= 1 else max(1, round(n * eval_split))
    if k >= n:
        raise DatasetError("<dataset>", None, f"eval split of {k} leaves no training examples (only {n})")
    g = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(n, generator=g)[:k].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
