"""Rejection-sampling fine-tuning on a tiny Llama: the kept samples' reward rises from round to round, each round
writes its kept samples as JSONL, thresholds, failing rewards, and a reward model as the scorer."""
from __future__ import annotations

import json

import pytest

from llamaforge.train.config import TrainConfig
from llamaforge.train.rejection import select_best
from llamaforge.train.jobs import train
from test_train_utils import ChatMLFormat, TinyLM, tiny_llama, write_jsonl

FMT = ChatMLFormat()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FRACTION_A = "def reward(prompt, completion):\n    return completion.count('a') / max(1, len(completion))\n"


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Write a word {i}."} for i in range(8)])


def _cfg(tmp_path, data, reward, **kw):
    base = dict(data=str(data), out=str(tmp_path / "rs"), task="rs", method="lora", lr=3e-2, max_steps=8,
                batch_size=4, group_size=8, max_new_tokens=8, rs_rounds=2, seed=0, reward=reward,
                target_modules=ALL)
    base.update(kw)
    return TrainConfig(**base)


def _reward(tmp_path, body=FRACTION_A, name="r.py"):
    (tmp_path / name).write_text(body)
    return str(tmp_path / name)


def test_kept_reward_rises_across_rounds_and_rounds_are_written(tmp_path, prompts):
    res = train(_cfg(tmp_path, prompts, _reward(tmp_path)), lm=TinyLM(tiny_llama()), chat_format=FMT)
    r1, r2 = res.rounds
    assert r1["kept"] == r2["kept"] == 8
    assert r2["kept_reward_mean"] > 2 * r1["kept_reward_mean"] > 0
    assert r2["sample_reward_mean"] > r1["sample_reward_mean"]
    out = tmp_path / "rs"
    for r, stats in ((1, r1), (2, r2)):
        kept = [json.loads(x) for x in (out / f"round-{r}" / "kept.jsonl").read_text().splitlines()]
        assert len(kept) == 8 and {"prompt", "completion", "reward", "rewards", "line"} <= set(kept[0])
        assert all(k["reward"] == max(k["rewards"]) and len(k["rewards"]) == 8 for k in kept)
        assert sum(k["reward"] for k in kept) / 8 == pytest.approx(stats["kept_reward_mean"])
        assert kept[0]["prompt"] == "Write a word 0."
        assert (out / f"round-{r}" / "adapter_model.safetensors").is_file()
    assert (out / "adapter_model.safetensors").is_file() and res.steps == 16
    assert json.loads((out / "rejection_sampling.json").read_text())["rounds"] == res.rounds


def test_threshold_and_failing_rewards(tmp_path, prompts):
    assert select_best([[0.1, 0.5, 0.5], [None, None], [0.2, None]], 0.3) == [1, None, None]
    assert select_best([[0.2, None]], None) == [0]
    # Nothing reaches the threshold: no training, a clear note, the run still finishes.
    res = train(_cfg(tmp_path, prompts, _reward(tmp_path), rs_threshold=2.0, rs_rounds=1),
                lm=TinyLM(tiny_llama()), chat_format=FMT)
    assert res.rounds[0]["kept"] == 0 and res.steps == 0 and res.saved is None
    # A reward that raises on some samples: those samples are dropped and counted, the others kept.
    body = ("def reward(prompt, completion):\n"
            "    if 'word 3' in prompt:\n        raise RuntimeError('cannot judge')\n"
            "    return float(len(completion))\n")
    res = train(_cfg(tmp_path, prompts, _reward(tmp_path, body, "f.py"), rs_rounds=1, max_steps=1,
                     out=str(tmp_path / "f")), lm=TinyLM(tiny_llama()), chat_format=FMT)
    assert res.rounds[0]["kept"] == 7
    assert res.skipped == {"round 1: reward raised RuntimeError: cannot judge (sample dropped)": 8}


def test_reward_model_as_scorer(tmp_path, prompts):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"Write a word {i}.", "chosen": "aaaa",
                                                    "rejected": "zzzz"} for i in range(8)])
    rm_lm = TinyLM(tiny_llama(seed=1))
    train(TrainConfig(data=str(prefs), out=str(tmp_path / "rm"), task="rm", lr=1e-2, max_steps=6, batch_size=4),
          lm=rm_lm, chat_format=FMT)
    # The scorer loads its base from reward_model.json; for the tiny model there is no file, so patch the
    # loader to hand back a fresh copy of the same base.
    import llamaforge.train.reward_model as rmod
    orig = rmod.load_reward_model
    rmod.load_reward_model = lambda path, **kw: orig(path, base_lm=TinyLM(tiny_llama(seed=1)), chat_format=FMT)
    try:
        res = train(_cfg(tmp_path, prompts, str(tmp_path / "rm"), rs_rounds=1, max_steps=2, out=str(tmp_path / "o")),
                    lm=TinyLM(tiny_llama()), chat_format=FMT)
    finally:
        rmod.load_reward_model = orig
    kept = [json.loads(x) for x in (tmp_path / "o" / "round-1" / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 8 and all(isinstance(k["reward"], float) for k in kept)
    assert len({round(k["reward"], 6) for k in kept}) > 1 and res.steps == 2


def test_resume_skips_finished_rounds_and_continues(tmp_path, prompts):
    from safetensors.torch import load_file
    reward = _reward(tmp_path)
    first = train(_cfg(tmp_path, prompts, reward, max_steps=2, rs_rounds=2), lm=TinyLM(tiny_llama()),
                  chat_format=FMT)
    out = tmp_path / "rs"
    saved = load_file(str(out / "adapter_model.safetensors"))
    # A new process (fresh model) asked for 3 rounds with --resume: rounds 1-2 come from disk, round 3 samples
    # from the round-2 adapter.
    again = train(_cfg(tmp_path, prompts, reward, max_steps=2, rs_rounds=3, resume=True), lm=TinyLM(tiny_llama()),
                  chat_format=FMT)
    assert again.rounds[:2] == first.rounds and len(again.rounds) == 3 and again.steps == 6
    # The round-3 samples are what the uninterrupted 3-round run samples.
    straight = train(_cfg(tmp_path, prompts, reward, max_steps=2, rs_rounds=3, out=str(tmp_path / "s")),
                     lm=TinyLM(tiny_llama()), chat_format=FMT)
    assert (out / "round-3" / "kept.jsonl").read_text() == (tmp_path / "s" / "round-3" / "kept.jsonl").read_text()
    assert straight.rounds[2]["kept_reward_mean"] == pytest.approx(again.rounds[2]["kept_reward_mean"])
    assert set(saved) == set(load_file(str(out / "adapter_model.safetensors")))
