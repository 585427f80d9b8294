"""Reward models on tiny Llamas: Bradley-Terry training raises held-out pairwise accuracy, the saved adapter + head
loads back (and into PEFT's LlamaForSequenceClassification with the same scores), full fine-tunes too."""
from __future__ import annotations

import json

import pytest
import torch

from llamaforge.errors import LlamaforgeError, ModelFormatError
from llamaforge.train.config import TrainConfig
from llamaforge.train.data import collate_preference, load_dataset
from llamaforge.train.reward_model import (RewardStrategy, last_token_rewards, load_reward_model,
                                           read_reward_meta)
from llamaforge.train.jobs import train
from test_train_utils import VOCAB, ChatMLFormat, TinyLM, llama_from_hf, tiny_llama, write_jsonl

FMT = ChatMLFormat()
TOPICS = ["cats", "dogs", "tea", "rain", "maps", "jazz", "kites", "bread", "owls", "snow", "chess", "figs",
          "moss", "lamps", "clouds", "boats"]


def _pairs(topics, flip=()):
    # chosen answers the question; rejected dodges it. `flip` swaps the order of those records in the file
    # (same content: accuracy must not depend on which side is written first).
    out = []
    for t in topics:
        rec = {"prompt": f"Tell me about {t}.", "chosen": f"{t.capitalize()} are lovely, truly.",
               "rejected": "I do not know."}
        out.append(dict(reversed(list(rec.items()))) if t in flip else rec)
    return out


@pytest.fixture
def data(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", _pairs(TOPICS[:12], flip=TOPICS[:3])),
            write_jsonl(tmp_path / "held.jsonl", _pairs(TOPICS[12:])))


def _train_rm(tmp_path, data, method="lora", steps=10, lm=None, **kw):
    lm = lm or TinyLM(tiny_llama())
    cfg = TrainConfig(data=str(data), out=str(tmp_path / f"rm-{method}"), task="rm", method=method, lr=1e-2,
                      max_steps=steps, batch_size=4, seed=0, **kw)
    return lm, train(cfg, lm=lm, chat_format=FMT)


def test_reward_model_learns_heldout_preferences_and_reloads(tmp_path, data):
    train_f, held_f = data
    held = load_dataset(held_f, FMT, kind="preference")
    lm, res = _train_rm(tmp_path, train_f, steps=12)
    assert res.losses[-1] < 0.5 * res.losses[0]
    out = tmp_path / "rm-lora"
    meta = read_reward_meta(out)
    assert meta["method"] == "lora" and meta["head"] == "score"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    # Loaded back onto a fresh copy of the base: same scores as the trained model, accuracy on held-out pairs.
    rm = load_reward_model(out, base_lm=TinyLM(tiny_llama()), chat_format=FMT)
    b = collate_preference(held)
    lengths = torch.tensor([len(e.ids) for e in held] + [len(e.rejected_ids) for e in held])
    with torch.no_grad():
        want = last_token_rewards(lm.model.eval(), b["input_ids"], lengths)
    got = rm.score_ids([e.ids for e in held] + [e.rejected_ids for e in held])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    acc = rm.pairwise_accuracy(held)
    assert acc["pairs"] == 4 and acc["accuracy"] == 1.0 and acc["mean_margin"] > 0
    # Before training the head is random: the same held-out pairs are not all ordered right.
    base = TinyLM(tiny_llama())
    RewardStrategy(TrainConfig(task="rm", method="lora")).prepare(base.model)
    with torch.no_grad():
        r0 = last_token_rewards(base.model, b["input_ids"], lengths)
    assert (r0[:4] - r0[4:]).mean() < acc["mean_margin"] / 4
    assert rm.score("Tell me about moss.", "Moss are lovely, truly.") > rm.score("Tell me about moss.",
                                                                                 "I do not know.")


def test_lora_reward_model_loads_in_peft_sequence_classification(tmp_path, data):
    from conftest import make_tiny_hf
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification
    hf = make_tiny_hf("llama31", vocab_size=VOCAB)
    lm, _ = _train_rm(tmp_path, data[0], steps=3, lm=TinyLM(llama_from_hf(hf)))
    seq = LlamaForSequenceClassification(hf.config.__class__(**{**hf.config.to_dict(), "num_labels": 1,
                                                                 "pad_token_id": 0}))
    seq.model.load_state_dict(hf.model.state_dict())
    peft_rm = PeftModel.from_pretrained(seq, tmp_path / "rm-lora").eval()
    held = load_dataset(data[1], FMT, kind="preference")
    rm = load_reward_model(tmp_path / "rm-lora", base_lm=TinyLM(llama_from_hf(hf)), chat_format=FMT)
    with torch.no_grad():
        for e in held:
            want = float(peft_rm(input_ids=torch.tensor([e.ids])).logits[0, 0])
            assert rm.score_ids([e.ids])[0] == pytest.approx(want, abs=1e-4)


def test_full_reward_model_saves_model_and_head(tmp_path, data):
    lm, res = _train_rm(tmp_path, data[0], method="full", steps=3)
    out = tmp_path / "rm-full"
    assert (out / "model" / "config.json").is_file() and (out / "reward_head.safetensors").is_file()
    from safetensors.torch import load_file
    assert "score.weight" not in load_file(str(out / "model" / "model.safetensors"))
    rm = load_reward_model(out, chat_format=FMT)   # base read from out/model
    held = load_dataset(data[1], FMT, kind="preference")
    with torch.no_grad():
        want = last_token_rewards(lm.model.eval(), torch.tensor([held[0].ids]), torch.tensor([len(held[0].ids)]))
    assert rm.score_ids([held[0].ids])[0] == pytest.approx(float(want[0]), abs=1e-4)


def test_reward_model_bad_input(tmp_path, data):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(LlamaforgeError, match=r"bad.jsonl:1: preference record is missing 'rejected'"):
        _train_rm(tmp_path, bad, steps=1)
    with pytest.raises(ModelFormatError, match="not a reward model directory"):
        load_reward_model(tmp_path)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "reward_model.json").write_text('{"format": "other"}')
    with pytest.raises(ModelFormatError, match="version-1"):
        read_reward_meta(tmp_path / "fake")
    # A reward model is not a chat adapter: applying it as one is refused (its head would be ignored).
    _train_rm(tmp_path, data[0], steps=1)
    from llamaforge.train.lora import apply_adapter
    with pytest.raises(ModelFormatError, match="whole modules"):
        apply_adapter(TinyLM(tiny_llama()), tmp_path / "rm-lora")


def test_qlora_reward_model_scores_the_same_after_reload(tmp_path, data):
    lm, _ = _train_rm(tmp_path, data[0], method="qlora", steps=2)
    held = load_dataset(data[1], FMT, kind="preference")
    rm = load_reward_model(tmp_path / "rm-qlora", base_lm=TinyLM(tiny_llama()), chat_format=FMT)
    ids = [e.ids for e in held]
    with torch.no_grad():
        want = torch.cat([last_token_rewards(lm.model.eval(), torch.tensor([r]), torch.tensor([len(r)]))
                          for r in ids])
    torch.testing.assert_close(rm.score_ids(ids), want, atol=1e-4, rtol=1e-4)
