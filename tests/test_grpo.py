"""GRPO and its rewards on tiny Llamas: samples come from the batched engine, the reference is the base with
adapters disabled, the reward rises, per-step metrics are logged, bad rewards skip steps; reward specs."""
from __future__ import annotations

import json

import pytest
import torch

from llamaforge.errors import InvalidRequestError
from llamaforge.train.config import TrainConfig
from llamaforge.train.data import DatasetError, load_dataset
from llamaforge.train.grpo import GRPOStrategy, token_logps
from llamaforge.train.rewards import RewardFailure, make_reward, safe_scores
from llamaforge.train.rollout import sample_completions
from llamaforge.train.jobs import train
from test_train_utils import ChatMLFormat, TinyLM, tiny_llama, write_jsonl

FMT = ChatMLFormat()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say something {i}.", "answer": "aaaa"} for i in range(8)])


def _reward_file(tmp_path, body: str, name="r.py"):
    f = tmp_path / name
    f.write_text(body)
    return str(f)


FRACTION_A = "def reward(prompt, completion):\n    return completion.count('a') / max(1, len(completion))\n"


def _cfg(tmp_path, data, **kw):
    base = dict(data=str(data), out=str(tmp_path / "o"), task="grpo", method="lora", lr=3e-2, max_steps=4,
                batch_size=4, group_size=8, max_new_tokens=8, seed=0, target_modules=ALL)
    base.update(kw)
    return TrainConfig(**base)


def test_rollout_goes_through_the_batched_engine_and_is_seeded(monkeypatch):
    from llamaforge.generate import engine as eng
    rows_per_step = []
    real = eng.BatchEngine.step

    def spy(self):
        events = real(self)
        rows_per_step.append(len(events))
        return events

    monkeypatch.setattr(eng.BatchEngine, "step", spy)
    lm = TinyLM(tiny_llama())
    prompts = [FMT.encode([{"role": "user", "content": f"hi {i}"}]) for i in range(3)]
    a = sample_completions(lm, prompts, 4, max_new_tokens=6, seed=5)
    assert max(rows_per_step) == 12           # all 3 x 4 samples decode in one batched step
    b = sample_completions(lm, prompts, 4, max_new_tokens=6, seed=5)
    c = sample_completions(lm, prompts, 4, max_new_tokens=6, seed=6)
    ids = lambda s: [[x.token_ids for x in g] for g in s]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert len({tuple(x.token_ids) for x in a[0]}) > 1   # the group's samples differ
    assert all(1 <= len(x.token_ids) <= 6 for g in a for x in g)


def test_grpo_raises_reward_and_logs_per_step_metrics(tmp_path, prompts):
    cfg = _cfg(tmp_path, prompts, max_steps=14, reward=_reward_file(tmp_path, FRACTION_A))
    res = train(cfg, lm=TinyLM(tiny_llama()), chat_format=FMT)
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert all({"reward_mean", "reward_std", "kl", "completion_len", "loss", "tokens"} <= set(r) for r in rows)
    first = sum(r["reward_mean"] for r in rows[:4]) / 4
    last = sum(r["reward_mean"] for r in rows[-4:]) / 4
    assert last > 2 * first and last > 0.04
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # starts at the reference
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file() and len(res.losses) == 14


def test_grpo_reference_is_the_base_with_adapters_disabled(tmp_path, prompts):
    strat = GRPOStrategy(_cfg(tmp_path, prompts, reward="exact"))
    model = tiny_llama()
    strat.prepare(model)
    assert strat.ref_model is None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.randint(8, 200, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[:, 4:8] = ids[:, 5:9]
    with torch.no_grad():
        with strat.reference(model) as ref:
            got, _ = token_logps(ref, ids, labels)
        want, _ = token_logps(tiny_llama(), ids, labels)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(token_logps(model, ids, labels)[0], want, atol=1e-3)


def test_reward_that_raises_or_returns_nan_skips_steps(tmp_path, prompts):
    # Raises in the 1st step (call 1), returns NaN in the 3rd (call 10: step 2 made calls 2-9); the run goes
    # on and counts both.
    body = ("calls = [0]\n"
            "def reward(prompt, completion):\n"
            "    calls[0] += 1\n"
            "    if calls[0] == 1:\n        raise ValueError('judge offline')\n"
            "    if calls[0] == 10:\n        return float('nan')\n"
            "    return float(len(completion))\n")
    cfg = _cfg(tmp_path, prompts, max_steps=4, batch_size=1, group_size=8, reward=_reward_file(tmp_path, body))
    res = train(cfg, lm=TinyLM(tiny_llama()), chat_format=FMT)
    assert res.steps == 4 and len(res.losses) == 2
    assert res.skipped == {"reward raised ValueError: judge offline": 1, "reward returned NaN": 1}
    assert "2 x" not in res.skipped_summary() and "judge offline" in res.skipped_summary()
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") is not None for r in rows] == [True, False, True, False]


def test_grpo_bad_input(tmp_path, prompts):
    with pytest.raises(InvalidRequestError, match="group_size") as e:
        _cfg(tmp_path, prompts, group_size=1, reward="exact").validate(("out",))
    assert e.value.field == "group_size"
    with pytest.raises(InvalidRequestError, match="reward") as e:
        _cfg(tmp_path, prompts, reward="").validate(("out",))
    # a prompt that leaves no room for max_new_tokens within max_seq_len
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "hi"}, {"prompt": "x" * 300}])
    with pytest.raises(DatasetError, match=r"long.jsonl:2: prompt is \d+ tokens; with max_new_tokens=8"):
        train(_cfg(tmp_path, long, reward="exact", max_seq_len=256), lm=TinyLM(tiny_llama()), chat_format=FMT)
    # ... or beyond the model's context window
    with pytest.raises(DatasetError, match=r"long.jsonl:2: .*context"):
        train(_cfg(tmp_path, long, reward="regex:a+", max_seq_len=4096, max_new_tokens=250),
              lm=TinyLM(tiny_llama()), chat_format=FMT)
    # exact needs a reference answer on every record
    noans = write_jsonl(tmp_path / "noans.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(DatasetError, match="noans.jsonl:2: the 'exact' reward needs an 'answer'"):
        train(_cfg(tmp_path, noans, reward="exact"), lm=TinyLM(tiny_llama()), chat_format=FMT)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"messages": [{"role": "assistant",
                                                                               "content": "x"}]}])
    with pytest.raises(DatasetError, match="bad.jsonl:2: the prompt ends with an assistant turn"):
        load_dataset(bad, FMT, kind="prompt")


def test_reward_specs(tmp_path):
    rec = {"answer": "42"}
    r = make_reward("regex:Answer: \\d+")
    assert r("q", " Answer: 12 \n", rec) == 1.0 and r("q", "Answer: 12 then", rec) == 0.0
    assert make_reward("exact")("q", " 42\n", rec) == 1.0 and make_reward("exact")("q", "42.", rec) == 0.0
    assert make_reward("exact")("q", "7", {"answer": [6, 7]}) == 1.0
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}},
                                  "required": ["n"], "additionalProperties": False}))
    js = make_reward(f"json-schema:{schema}")
    assert [js("q", t, rec) for t in ('{"n": 3}', '{"n": -1}', '{"n": 3, "m": 1}', "not json", '[1]')] == \
        [1.0, 0.0, 0.0, 0.0, 0.0]
    with_answer = make_reward(_reward_file(tmp_path, "def reward(prompt, completion, answer=None):\n"
                                                     "    return float(completion == answer)\n", "w.py"))
    assert with_answer("q", "42", rec) == 1.0 and with_answer("q", "41", rec) == 0.0
    for spec, needle in [("regex:(", "does not compile"), ("nope", "unknown reward"),
                         (str(tmp_path / "missing.py"), "does not exist"),
                         (_reward_file(tmp_path, "def reward(:\n", "syntax.py"), "failed to import"),
                         (_reward_file(tmp_path, "x = 1\n", "nofn.py"), "must define a function reward")]:
        with pytest.raises(InvalidRequestError, match=needle) as e:
            make_reward(spec)
        assert e.value.field == "reward"
    (tmp_path / "bad.json").write_text('{"type": 12}')
    with pytest.raises(InvalidRequestError, match="invalid at type"):
        make_reward(f"json-schema:{tmp_path / 'bad.json'}")
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        make_reward(f"json-schema:{tmp_path / 'notjson.json'}")
    fn = make_reward(_reward_file(tmp_path, "def reward(p, c):\n    return 'high'\n", "str.py"))
    with pytest.raises(RewardFailure, match="not a number"):
        safe_scores(fn, ["q"], ["a"], [{}])
