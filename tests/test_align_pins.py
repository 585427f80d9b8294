"""Loss per step, pinned at a fixed seed on the tiny Llama, for the reward model, KTO, ORPO and GRPO (as
tests/test_train.py pins SFT and DPO): a change to data order, collation, a loss or sampling shows here."""
from __future__ import annotations

import json

import pytest

from llamaforge.train.config import TrainConfig
from llamaforge.train.jobs import train
from test_train_utils import FACTS, ChatMLFormat, TinyLM, tiny_llama, write_jsonl

# Computed once with this code (tiny_llama(0), seed 0, batch 4, LoRA on q/k/v/o); tolerance 2e-3 absolute.
PINNED = {
    ("rm", 1e-2): [0.6884, 0.5707, 0.3593, 0.2451],
    ("kto", 1e-2): [0.5, 0.4616, 0.3929, 0.398],
    ("orpo", 1e-2): [5.7619, 5.6134, 5.2853, 5.0356],
    ("grpo", 3e-2): [0.0, 0.00175, 0.00178, 0.00134],
}
# GRPO's loss is small (on-policy, its advantage term averages to 0 in value): pin it tighter, and the sampled
# completions' mean reward per step with it.
GRPO_REWARD_MEANS = [-0.4812, -0.6, -0.4937, -0.425]


def _data(tmp_path, task):
    if task == "grpo":
        return write_jsonl(tmp_path / "p.jsonl", [{"prompt": q, "answer": a} for q, a in FACTS])
    return write_jsonl(tmp_path / "prefs.jsonl",
                       [{"prompt": q, "chosen": a, "rejected": "I do not know."} for q, a in FACTS])


@pytest.mark.parametrize("task,lr", list(PINNED))
def test_pinned_first_four_losses(tmp_path, task, lr):
    reward = tmp_path / "len.py"
    reward.write_text("def reward(prompt, completion):\n    return completion.count('e') - 0.1 * len(completion)\n")
    cfg = TrainConfig(data=str(_data(tmp_path, task)), out=str(tmp_path / task), task=task, method="lora", lr=lr,
                      max_steps=4, batch_size=4, seed=0, reward=str(reward), group_size=4, max_new_tokens=6)
    res = train(cfg, lm=TinyLM(tiny_llama()), chat_format=ChatMLFormat())
    assert res.losses == pytest.approx(PINNED[(task, lr)], abs=1e-4 if task == "grpo" else 2e-3)
    if task == "grpo":
        rows = [json.loads(x) for x in (tmp_path / task / "metrics.jsonl").read_text().splitlines()]
        assert [r["reward_mean"] for r in rows] == pytest.approx(GRPO_REWARD_MEANS, abs=1e-3)
