"""Training data: formats, assistant-only masks, bad records with file and line numbers, packing, collation."""
from __future__ import annotations

import json

import pytest

from llamaforge.train.data import (IGNORE, DataReport, DatasetError, collate_sft, load_dataset, pack_examples,
                                   split_eval)
from test_train_utils import ChatMLFormat, write_jsonl

FMT = ChatMLFormat()
TOK = FMT.tok


def _learned(ex):
    return [i for i, m in zip(ex.ids, ex.mask) if m]


def test_formats_give_the_same_tokens(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    share = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    alpaca = {"instruction": "Q", "input": "", "output": "A"}
    f = write_jsonl(tmp_path / "d.jsonl", [chat, share, alpaca])
    exs = load_dataset(f, FMT)
    assert exs[0].ids == exs[1].ids == exs[2].ids and [e.line for e in exs] == [1, 2, 3]
    assert _learned(exs[0]) == TOK.encode("A") + [4]
    # Alpaca as a JSON array (its original release format), with an input field.
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([alpaca, {"instruction": "Q", "input": "ctx", "output": "B"}], indent=1))
    a = load_dataset(arr, FMT)
    assert a[0].ids == exs[0].ids
    assert a[1].ids == FMT.encode_with_mask([{"role": "user", "content": "Q\n\nctx"},
                                             {"role": "assistant", "content": "B"}])[0]
    assert _learned(a[1]) == TOK.encode("B") + [4] and a[1].line == 7  # "[", then 5 lines of the first object


def test_loss_on_every_assistant_turn_only(tmp_path):
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                        {"role": "assistant", "content": "a2"}]}
    ex = load_dataset(write_jsonl(tmp_path / "d.jsonl", [rec]), FMT)[0]
    assert _learned(ex) == TOK.encode("a1") + [4] + TOK.encode("a2") + [4]
    batch = collate_sft([ex])
    labels = batch["labels"][0].tolist()
    # labels[t] = ids[t+1] exactly where ids[t+1] is learned
    assert [lab for lab in labels if lab != IGNORE] == _learned(ex)
    assert all(labels[t] == ex.ids[t + 1] for t in range(len(ex.ids) - 1) if ex.mask[t + 1])


BAD = [
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]', "malformed JSON"),
    ({"instruction": "x"}, "missing 'output'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}, "longer than"),
    ({"text": "raw"}, "unrecognised record"),
    ([1, 2], "expected a JSON object"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}, "must be a string"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_bad_record_names_file_and_line(tmp_path, bad, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [good, good, bad, good])
    with pytest.raises(DatasetError, match=rf"d\.jsonl:3: .*{message}") as e:
        load_dataset(f, FMT, max_seq_len=200)
    assert e.value.line == 3
    rep = DataReport()
    exs = load_dataset(f, FMT, max_seq_len=200, skip_bad=True, report=rep)
    assert [x.line for x in exs] == [1, 2, 4] and rep.read == 4 and rep.kept == 3 and sum(rep.skipped.values()) == 1


def test_empty_and_all_bad_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(tmp_path / "e.jsonl", FMT)
    write_jsonl(tmp_path / "b.jsonl", ["{", "nope"])
    with pytest.raises(DatasetError, match="no usable examples.*skipped 2"):
        load_dataset(tmp_path / "b.jsonl", FMT, skip_bad=True)
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(tmp_path / "missing.jsonl", FMT)
    (tmp_path / "u.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\xfe\n')
    with pytest.raises(DatasetError, match=r"u\.jsonl:2: not valid UTF-8"):
        load_dataset(tmp_path / "u.jsonl", FMT)


def test_preference_formats_and_completion_only_mask(tmp_path):
    flat = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    chat = {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}
    f = write_jsonl(tmp_path / "p.jsonl", [flat, chat])
    a, b = load_dataset(f, FMT, kind="preference")
    assert (a.ids, a.rejected_ids) == (b.ids, b.rejected_ids)
    assert _learned(a) == TOK.encode("good") + [4]
    assert [i for i, m in zip(a.rejected_ids, a.rejected_mask) if m] == TOK.encode("bad") + [4]
    # A multi-turn prompt's earlier assistant turns are context, not scored.
    multi = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                        {"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"}
    (m,) = load_dataset(write_jsonl(tmp_path / "m.jsonl", [multi]), FMT, kind="preference")
    assert _learned(m) == TOK.encode("good") + [4]
    for bad, msg in [({"prompt": "Q", "chosen": "x"}, "missing 'rejected'"),
                     ({"prompt": "Q", "chosen": "x", "rejected": "x"}, "identical"),
                     ({"prompt": "Q", "chosen": "", "rejected": "x"}, "empty 'chosen'")]:
        with pytest.raises(DatasetError, match=rf"q\.jsonl:1: .*{msg}"):
            load_dataset(write_jsonl(tmp_path / "q.jsonl", [bad]), FMT, kind="preference")


def test_pretokenized_records(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1, 20, 21, 2], "mask": [0, 0, 1, 1]},
                                           {"input_ids": [1, 30, 2]}, {"input_ids": [1, "x"]}])
    with pytest.raises(DatasetError, match="t.jsonl:3"):
        load_dataset(f, None)
    a, b = load_dataset(f, None, skip_bad=True)
    assert a.mask == [False, False, True, True] and all(b.mask)


def test_packing_and_eval_split(tmp_path):
    recs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * i}]}
            for i in range(1, 11)]
    exs = load_dataset(write_jsonl(tmp_path / "d.jsonl", recs), FMT)
    rows = pack_examples(exs, 64)
    assert all(len(r.ids) <= 64 for r in rows) and len(rows) < len(exs)
    assert sum(len(r.ids) for r in rows) == sum(len(e.ids) for e in exs)
    assert sum(sum(r.mask) for r in rows) == sum(sum(e.mask) for e in exs)
    tr, ev = split_eval(exs, 0.2, seed=3)
    tr2, ev2 = split_eval(exs, 0.2, seed=3)
    assert len(ev) == 2 and [e.line for e in ev] == [e.line for e in ev2] and len(tr) == 8
    assert not {e.line for e in tr} & {e.line for e in ev}
